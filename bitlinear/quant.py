"""The BitNet b1.58 quantizers: the one place their formulas live.

Weights: per tensor, absmean scale, ternary values {-1, 0, +1}.
Activations: per token (last dim), absmax scale, 8-bit integers in [-128, 127].

Each quantizer has two forms that agree exactly:
  integer form   ternarize / activation_quant_int  -> (q, s) with q integer-valued, s the scale
  fake-quant     weight_quant / activation_quant   -> q / s, the float tensor training uses
"""

import torch

EPS = 1e-5  # guards the scales of all-zero weights and all-zero tokens (no division by zero)


def weight_scale(w: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """s = 1 / mean(|W|).clamp(min=eps), a 0-d tensor (computed in float32)."""
    return 1.0 / w.float().abs().mean().clamp(min=eps)


def ternarize(w: torch.Tensor, eps: float = EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer form of the weight quantizer: W_t = clamp(round(W * s), -1, 1) as int8, and s.

    W_t / s is exactly weight_quant(W) (for float32 W).
    """
    s = weight_scale(w, eps)
    return (w.float() * s).round().clamp(-1, 1).to(torch.int8), s


def weight_quant(w: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Absmean ternary fake-quant: s = 1/mean|W|, W_q = clamp(round(W*s), -1, 1) / s.

    Returns a tensor of w's dtype whose entries are {-1, 0, +1} / s.
    """
    s = weight_scale(w, eps)
    return ((w.float() * s).round().clamp(-1, 1) / s).to(w.dtype)


def activation_scale(x: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """s = 127 / max(|x|).clamp(min=eps) per token: shape x.shape[:-1] + (1,)."""
    return 127.0 / x.abs().amax(dim=-1, keepdim=True).float().clamp(min=eps)


def activation_quant_int(x: torch.Tensor, eps: float = EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer form of the activation quantizer: clamp(round(x * s), -128, 127) as int8, and s."""
    s = activation_scale(x, eps)
    return (x.float() * s).round().clamp(-128, 127).to(torch.int8), s


def activation_quant(x: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Per-token absmax 8-bit fake-quant: s = 127/max|x|, x_q = clamp(round(x*s), -128, 127) / s."""
    s = activation_scale(x, eps)
    return ((x.float() * s).round().clamp(-128, 127) / s).to(x.dtype)
