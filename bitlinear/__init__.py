"""BitNet b1.58 building blocks: the quantizers and the BitLinear layer."""

from .layer import (
    BitLinear,
    RMSNorm,
    bitlinear,
    bitlinear_reference,
    make_linear,
    param_groups,
)
from .quant import (
    EPS,
    activation_quant,
    activation_quant_int,
    activation_scale,
    ternarize,
    weight_quant,
    weight_scale,
)

__all__ = [
    "EPS", "BitLinear", "RMSNorm", "bitlinear", "bitlinear_reference", "make_linear",
    "param_groups", "activation_quant", "activation_quant_int", "activation_scale", "ternarize",
    "weight_quant", "weight_scale",
]
