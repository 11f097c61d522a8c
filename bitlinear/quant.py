"""The BitNet b1.58 quantizers: the one place their formulas live.

Weights: per tensor, absmean scale, ternary values {-1, 0, +1}.
Activations: per token (last dim), absmax scale, 8-bit integers in [-128, 127].

Each quantizer has two forms that agree exactly:
  integer form   ternarize / activation_quant_int  -> (q, s) with q integer-valued, s the scale
  fake-quant     weight_quant / activation_quant   -> q / s, the float tensor training uses

They sit on the training hot path (every BitLinear, every step), so they run without autograd
(BitLinear's straight-through estimator supplies the gradient) and round and rescale in place.
"""

import torch

EPS = 1e-5  # guards the scales of all-zero weights and all-zero tokens (no division by zero)


@torch.no_grad()
def weight_scale(w: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """s = 1 / mean(|W|).clamp(min=eps), a 0-d tensor (computed in float32)."""
    return 1.0 / w.float().abs().mean().clamp(min=eps)


@torch.no_grad()
def ternarize(w: torch.Tensor, eps: float = EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer form of the weight quantizer: W_t = clamp(round(W * s), -1, 1) as int8, and s.

    W_t / s is exactly weight_quant(W) (for float32 W).
    """
    s = weight_scale(w, eps)
    return (w.float() * s).round().clamp(-1, 1).to(torch.int8), s


@torch.no_grad()
def weight_quant(w: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Absmean ternary fake-quant: s = 1/mean|W|, W_q = clamp(round(W*s), -1, 1) / s.

    Returns a tensor of w's dtype whose entries are {-1, 0, +1} / s.
    """
    s = weight_scale(w, eps)
    return (w.float() * s).round_().clamp_(-1, 1).div_(s).to(w.dtype)


@torch.no_grad()
def activation_scale(x: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """s = 127 / max(|x|).clamp(min=eps) per token: shape x.shape[:-1] + (1,)."""
    # max and -min, not abs().amax(): no full-size temporary, and the same value
    absmax = torch.maximum(x.amax(dim=-1, keepdim=True), x.amin(dim=-1, keepdim=True).neg_())
    return 127.0 / absmax.float().clamp_(min=eps)


@torch.no_grad()
def activation_quant_int(x: torch.Tensor, eps: float = EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer form of the activation quantizer: clamp(round(x * s), -128, 127) as int8, and s."""
    s = activation_scale(x, eps)
    return (x.float() * s).round().clamp(-128, 127).to(torch.int8), s


@torch.no_grad()
def activation_quant(x: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Per-token absmax 8-bit fake-quant: s = 127/max|x|, x_q = clamp(round(x*s), -128, 127) / s.

    With the absmax scale |x * s| <= 127, so the clamp never binds and is skipped here.
    """
    s = activation_scale(x, eps)
    return (x.float() * s).round_().div_(s).to(x.dtype)
