"""The BitNet b1.58 quantizers: the one place their formulas live.

Weights: per tensor, absmean scale, ternary values {-1, 0, +1}.
Activations: per token (last dim), absmax scale, 8-bit integers in [-128, 127].

Each quantizer has two forms that agree exactly:
  integer form   ternarize / activation_quant_int  -> (q, s) with q integer-valued, s the scale
  fake-quant     weight_quant / activation_quant   -> q / s, the float tensor training uses

They sit on the training hot path (every BitLinear, every step, on tensors of a few hundred KB
where each op's fixed cost matters as much as its memory pass), so they run under no_grad
(BitLinear's straight-through estimator supplies the gradient), compute the scales in place on
their small tensors, and round and rescale the full-size tensor in place: three full-size passes
and two reductions for activations, four passes and one reduction for weights.
`1 / t` and `127 / t` are written as reciprocal_ (and mul_): Tensor.__rtruediv__ is exactly
reciprocal() * other, so the values are those of the textbook formulas, bit for bit.
Fused fake-quant kernels (torch.fake_quantize_per_channel_affine) were measured 5-10x slower on
CPU (scalar loops) and compute x * (1/scale), another formula; they are not used.
"""

import torch

EPS = 1e-5  # guards the scales of all-zero weights and all-zero tokens (no division by zero)


def _weight_scale(w: torch.Tensor, eps: float) -> torch.Tensor:
    return w.float().abs().mean().clamp_(min=eps).reciprocal_()


def _activation_scale(x: torch.Tensor, eps: float) -> torch.Tensor:
    # max and -min, not abs().amax(): no full-size temporary, and the same value
    absmax = torch.maximum(x.amax(dim=-1, keepdim=True), x.amin(dim=-1, keepdim=True).neg_())
    return absmax.float().clamp_(min=eps).reciprocal_().mul_(127.0)


@torch.no_grad()
def weight_scale(w: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """s = 1 / mean(|W|).clamp(min=eps), a 0-d tensor (computed in float32)."""
    return _weight_scale(w, eps)


@torch.no_grad()
def ternarize(w: torch.Tensor, eps: float = EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer form of the weight quantizer: W_t = clamp(round(W * s), -1, 1) as int8, and s.

    W_t / s is exactly weight_quant(W) (for float32 W).
    """
    s = _weight_scale(w, eps)
    return (w.float() * s).round_().clamp_(-1, 1).to(torch.int8), s


@torch.no_grad()
def weight_quant(w: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Absmean ternary fake-quant: s = 1/mean|W|, W_q = clamp(round(W*s), -1, 1) / s.

    Returns a tensor of w's dtype whose entries are {-1, 0, +1} / s.
    """
    s = _weight_scale(w, eps)
    return (w.float() * s).round_().clamp_(-1, 1).div_(s).to(w.dtype)


@torch.no_grad()
def activation_scale(x: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """s = 127 / max(|x|).clamp(min=eps) per token: shape x.shape[:-1] + (1,), float32."""
    return _activation_scale(x, eps)


@torch.no_grad()
def activation_quant_int(x: torch.Tensor, eps: float = EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer form of the activation quantizer: clamp(round(x * s), -128, 127) as int8, and s."""
    s = _activation_scale(x, eps)
    return (x.float() * s).round_().clamp_(-128, 127).to(torch.int8), s


@torch.no_grad()
def activation_quant(x: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Per-token absmax 8-bit fake-quant: s = 127/max|x|, x_q = clamp(round(x*s), -128, 127) / s.

    With the absmax scale |x * s| <= 127, so the clamp never binds and is skipped here.
    """
    s = _activation_scale(x, eps)
    return (x.float() * s).round_().div_(s).to(x.dtype)
