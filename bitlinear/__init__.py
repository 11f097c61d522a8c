"""BitNet b1.58's BitLinear, shared by every model, and what comes after training: packed
ternary weights and exact integer inference. Read layer.py first."""

import torch.nn as nn

from .fast import FastBitLinear, share_input
from .inference import TernaryLinear, to_integer
from .kernels import int_matmul
from .layer import (
    EPS,
    BitLinear,
    RMSNorm,
    activation_quant,
    activation_quant_int,
    set_quantization,
    ternarize,
    weight_quant,
)
from .pack import pack_2bit, pack_base3, unpack_2bit, unpack_base3


def make_linear(in_features, out_features, bias=False, bitlinear=True, norm=False):
    """The one switch between ternary and float models: BitLinear (in its fast form, the same
    numbers), or a plain nn.Linear."""
    if bitlinear:
        return FastBitLinear(in_features, out_features, bias=bias, norm=norm)
    return nn.Linear(in_features, out_features, bias=bias)


__all__ = [
    "EPS", "BitLinear", "FastBitLinear", "RMSNorm", "make_linear", "set_quantization",
    "share_input",
    "activation_quant", "activation_quant_int", "ternarize", "weight_quant", "pack_2bit",
    "unpack_2bit", "pack_base3", "unpack_base3", "TernaryLinear", "int_matmul", "to_integer",
]
