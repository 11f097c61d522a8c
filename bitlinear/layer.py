"""BitLinear, the layer of BitNet b1.58, as the paper and its "Training Tips, Code and FAQ"
write it.

    weights      W_q = clamp(round(W * s_w), -1, 1) / s_w,   s_w = 1 / mean|W|     (absmean)
                 (group=g: one s_w per g consecutive input weights of a row, not one per matrix)
    activations  x_q = clamp(round(x * s_x), -128, 127) / s_x, s_x = 127 / max|x|  per token
    forward      y = x_q W_q^T
    backward     the straight-through estimator: both quantizers pass gradients as the identity

The latent weight W stays full precision for the optimizer; the forward sees only its ternary
values. A quantization warm-up (set_quantization) blends the quantizers in over the first steps,
x + lam (x_q - x) and W + lam (W_q - W) with lam rising from 0 (float) to 1 (BitLinear exactly),
so that a float model converts without losing what it knows.

The models build this layer (bitlinear=False builds nn.Linear in its place). The integer forms
(ternarize, activation_quant_int) give the values and the scales separately: packing and exact
integer inference (bitlinear/inference.py) use them.
"""

from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

EPS = 1e-5  # guards the scales of all-zero weights and all-zero tokens (no division by zero)


def absmean_scale(w, eps=EPS, group=0):
    """s_w = 1 / mean|W|, a 0-d float32 tensor; with group=g one per g consecutive input weights,
    shape (out_features, in_features // g, 1)."""
    if group:
        return 1 / grouped(w.float(), group).abs().mean(-1, keepdim=True).clamp(min=eps)
    return 1 / w.float().abs().mean().clamp(min=eps)


def grouped(w, group):
    """(out, in) -> (out, in // group, group): the groups that share a scale."""
    return w.view(w.size(0), -1, group) if group else w


def absmax_scale(x, eps=EPS):
    """s_x = 127 / max|x| over the last dim (per token): shape x.shape[:-1] + (1,), float32."""
    return 127 / x.float().abs().amax(dim=-1, keepdim=True).clamp(min=eps)


@torch.no_grad()
def ternarize(w, eps=EPS):
    """The weight quantizer's integer form: (W_t = clamp(round(W * s_w), -1, 1) as int8, s_w)."""
    s = absmean_scale(w, eps)
    return (w.float() * s).round().clamp(-1, 1).to(torch.int8), s


@torch.no_grad()
def weight_quant(w, eps=EPS, group=0):
    """Absmean ternary fake-quant: W_t / s_w, entries {-1, 0, +1} / s_w, in w's dtype."""
    s = absmean_scale(w, eps, group)
    q = (grouped(w.float(), group) * s).round_().clamp_(-1, 1).div_(s)  # in place: fewer tensors
    return q.view_as(w).to(w.dtype)


@torch.no_grad()
def activation_quant_int(x, eps=EPS):
    """The activation quantizer's integer form: (clamp(round(x * s_x), -128, 127) as int8, s_x)."""
    s = absmax_scale(x, eps)
    return (x.float() * s).round().clamp(-128, 127).to(torch.int8), s


@torch.no_grad()
def activation_quant(x, eps=EPS):
    """Per-token absmax 8-bit fake-quant: x_i / s_x, in x's dtype."""
    s = absmax_scale(x, eps)
    return (x.float() * s).round_().clamp_(-128, 127).div_(s).to(x.dtype)


class StraightThrough(torch.autograd.Function):
    """q in the forward, the identity's gradient (to x) in the backward: the straight-through
    estimator. The FAQ writes x + (q - x).detach(), the same estimator; as a Function it costs no
    full-size tensors beyond q, and its forward value is q exactly."""

    @staticmethod
    def forward(ctx, q, x):
        return q

    @staticmethod
    def backward(ctx, grad):
        return None, grad


def straight_through(q, x):
    return StraightThrough.apply(q, x)


@torch.no_grad()
def blend(q, x, lam):
    """x + lam (q - x): the quantization warm-up's value (lam None: q, the quantizer's)."""
    return q if lam is None else x + lam.to(x.dtype) * (q - x)


def set_quantization(model, lam):
    """Set every BitLinear's quantization strength: lam >= 1 is BitLinear exactly, lam = 0 a
    float forward (the straight-through gradients are the identity's either way). The strength
    is a tensor, updated in place, so a compiled model does not recompile as it rises."""
    for m in model.modules():
        if isinstance(m, BitLinear):
            if lam >= 1:
                m.lam = None
            elif m.lam is None:
                m.lam = torch.tensor(float(lam), device=m.weight.device)
            else:
                m.lam.fill_(lam)


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned gain (Zhang & Sennrich, 2019)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.rms_norm(x, (x.size(-1),), self.weight, self.eps)


class BitLinear(nn.Linear):
    """nn.Linear with ternary weights and 8-bit per-token activations (BitNet b1.58).

    norm=True puts an RMSNorm in front of the activation quantizer, as in the FAQ's reference
    code (the models here keep their own norms by default, as LLaMA does). group=g gives each g
    consecutive input weights of a row a scale of their own (0: one scale for the matrix).
    """

    def __init__(self, in_features, out_features, bias=False, norm=False, eps=EPS, group=0,
                 device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        if group and in_features % group:
            raise ValueError(f"bit_group={group} does not divide in_features={in_features}")
        self.eps, self.group = eps, group
        self.norm = RMSNorm(in_features) if norm else None
        self.lam = None  # the quantization warm-up's strength, a 0-d tensor (set_quantization)
        self.frozen_w_q = None  # W_q made once for a stretch of forwards (frozen_weights)

    def forward(self, x):
        if self.norm is not None:
            x = self.norm(x)
        x_q = straight_through(blend(activation_quant(x, self.eps), x, self.lam), x)
        w_q = self.quantized_weight() if self.frozen_w_q is None else self.frozen_w_q
        return F.linear(x_q, w_q, self.bias)

    def quantized_weight(self):
        """W_q, with the straight-through gradient to the latent weight."""
        w = self.weight
        return straight_through(blend(weight_quant(w, self.eps, self.group), w, self.lam), w)

    def extra_repr(self):
        return super().extra_repr() + f", norm={self.norm is not None}, group={self.group}"


@contextmanager
def frozen_weights(model):
    """Within the block every BitLinear uses the W_q made on entry, for forwards that cannot
    change the weights (an evaluation, generation): else each forward quantizes every weight
    again, which costs as much as the rest of an evaluation forward of a small model."""
    layers = [m for m in model.modules() if isinstance(m, BitLinear)]
    with torch.no_grad():
        for m in layers:
            m.frozen_w_q = m.quantized_weight()
    try:
        yield model
    finally:
        for m in layers:
            m.frozen_w_q = None


def make_linear(in_features, out_features, bias=False, bitlinear=True, norm=False, group=0):
    """The one switch between a ternary model and its float twin: BitLinear, or nn.Linear."""
    if bitlinear:
        return BitLinear(in_features, out_features, bias=bias, norm=norm, group=group)
    return nn.Linear(in_features, out_features, bias=bias)
