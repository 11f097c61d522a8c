"""BitNet b1.58: the quantizers, the BitLinear layer, packed weights, integer inference."""

from .inference import TernaryLinear, int_matmul, to_integer
from .layer import (
    BitLinear,
    RMSNorm,
    adamw,
    bitlinear,
    bitlinear_reference,
    make_linear,
    param_groups,
)
from .pack import pack_2bit, pack_base3, unpack_2bit, unpack_base3
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
    "EPS", "BitLinear", "adamw", "RMSNorm", "bitlinear", "bitlinear_reference", "make_linear",
    "param_groups", "activation_quant", "activation_quant_int", "activation_scale", "ternarize",
    "weight_quant", "weight_scale", "pack_2bit", "unpack_2bit", "pack_base3", "unpack_base3",
    "TernaryLinear", "int_matmul", "to_integer",
]
