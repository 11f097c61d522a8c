"""Exact integer inference for trained BitLinear layers.

A trained BitLinear computes y = (X_i / s_x) (W_t / s_w)^T with int8 activations X_i and ternary
weights W_t. The same value is (X_i W_t^T) / (s_x s_w): an integer matmul with int32 accumulation,
then one rescale per token. TernaryLinear stores only W_t (int8) and s_w, and computes that.
"""

import torch
import torch.nn as nn

from .layer import BitLinear
from .quant import EPS, activation_quant_int, ternarize


def int_matmul(x_i: torch.Tensor, w_t: torch.Tensor) -> torch.Tensor:
    """(M, K) int8 @ (K, N) int8 -> (M, N) int32, with torch._int_mm where the device has it.

    The fallback multiplies in float32, which is exact here: |sum| <= 128 * K < 2**24 for any
    K below 131072.
    """
    if x_i.device.type in ("cpu", "cuda"):
        try:
            return torch._int_mm(x_i, w_t)
        except RuntimeError:  # shapes the CUDA kernel refuses (M <= 16, K or N not 8-aligned)
            pass
    return (x_i.float() @ w_t.float()).to(torch.int32)


class TernaryLinear(nn.Module):
    """Inference-only BitLinear: int8 ternary weights, per-token int8 activations, int32 sums."""

    def __init__(self, in_features, out_features, bias=False, norm=None, eps=EPS):
        super().__init__()
        self.in_features, self.out_features, self.eps = in_features, out_features, eps
        self.register_buffer("weight_t", torch.zeros(in_features, out_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(()))  # s_w = 1 / mean|W|
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.norm = norm  # the BitLinear's inner RMSNorm, if it had one

    @classmethod
    def from_bitlinear(cls, layer: BitLinear) -> "TernaryLinear":
        new = cls(layer.in_features, layer.out_features, layer.bias is not None, layer.norm,
                  layer.eps)
        t, s = ternarize(layer.weight.detach(), layer.eps)
        new.weight_t.copy_(t.t())  # (in, out): the layout _int_mm takes as its second operand
        new.weight_scale.copy_(s)
        if layer.bias is not None:
            new.bias.data.copy_(layer.bias.detach())
        return new

    def forward(self, x):
        if self.norm is not None:
            x = self.norm(x)
        shape = x.shape
        x_i, s_x = activation_quant_int(x.reshape(-1, shape[-1]), self.eps)
        y = int_matmul(x_i, self.weight_t).float() / (s_x * self.weight_scale)
        y = y.to(x.dtype).view(*shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def extra_repr(self):
        return f"{self.in_features}, {self.out_features}, bias={self.bias is not None}"


@torch.no_grad()
def to_integer(model: nn.Module) -> nn.Module:
    """Replace every BitLinear in model (in place) by its TernaryLinear; returns model."""
    for name, child in model.named_children():
        if isinstance(child, BitLinear):
            setattr(model, name, TernaryLinear.from_bitlinear(child))
        else:
            to_integer(child)
    return model
