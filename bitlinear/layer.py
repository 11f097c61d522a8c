"""BitLinear: the drop-in nn.Linear replacement of BitNet b1.58, shared by every model."""

import torch
import torch.nn as nn
import torch.nn.functional as F

from .quant import EPS, activation_quant, weight_quant


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned gain (Zhang & Sennrich, 2019)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.rms_norm(x, (x.size(-1),), self.weight, self.eps)


def bitlinear_reference(x, weight, bias=None, eps=EPS):
    """The FAQ formulation, kept as the readable definition: straight-through estimator by detach.

    Forward uses quantized x and W; backward treats both quantizers as the identity.
    """
    x_q = x + (activation_quant(x, eps) - x).detach()
    w_q = weight + (weight_quant(weight, eps) - weight).detach()
    return F.linear(x_q, w_q, bias)


class _BitLinearSTE(torch.autograd.Function):
    """The same function as bitlinear_reference with a hand-written backward.

    Skipping the detach trick saves two full-size elementwise ops per quantizer in the forward and
    their autograd nodes in the backward; the gradients are the STE's: dx = dy @ W_q, dW = dy^T x_q.
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x, weight, eps):
        x_q = activation_quant(x, eps)
        w_q = weight_quant(weight, eps)
        ctx.save_for_backward(x_q, w_q)
        return F.linear(x_q, w_q)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad_y):
        x_q, w_q = ctx.saved_tensors
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_y @ w_q.to(grad_y.dtype)
        if ctx.needs_input_grad[1]:
            g = grad_y.reshape(-1, grad_y.size(-1))
            grad_w = g.t() @ x_q.reshape(-1, x_q.size(-1)).to(g.dtype)
        return grad_x, grad_w, None


def bitlinear(x, weight, bias=None, eps=EPS):
    """y = x_q W_q^T (+ bias), with x_q, W_q the 8-bit / ternary fake-quantized input and weight."""
    y = _BitLinearSTE.apply(x, weight, eps)
    return y if bias is None else y + bias


class BitLinear(nn.Linear):
    """nn.Linear with ternary weights and 8-bit per-token activations (BitNet b1.58).

    The latent weight stays full precision for the optimizer; the forward sees only its ternary
    quantization. norm=True puts an RMSNorm in front of the activation quantizer, as in the
    "Training Tips, Code and FAQ" reference (models here keep their own norms by default).
    """

    def __init__(self, in_features, out_features, bias=False, norm=False, eps=EPS,
                 device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.eps = eps
        self.norm = RMSNorm(in_features) if norm else None

    def forward(self, x):
        if self.norm is not None:
            x = self.norm(x)
        return bitlinear(x, self.weight, self.bias, self.eps)

    def extra_repr(self):
        return super().extra_repr() + f", norm={self.norm is not None}"


def make_linear(in_features, out_features, bias=False, bitlinear=True, norm=False):
    """The one switch between ternary and float models: BitLinear, or a plain nn.Linear."""
    if bitlinear:
        return BitLinear(in_features, out_features, bias=bias, norm=norm)
    return nn.Linear(in_features, out_features, bias=bias)


def param_groups(model, weight_decay, bit_lr_scale=1.0, no_decay=()):
    """AdamW parameter groups: decay 2-D weights, not norms, biases or the `no_decay` params;
    BitLinear latent weights get their own group whose learning rate is scaled by bit_lr_scale.

    Ternary weights change only when a latent weight crosses a rounding threshold, so they learn
    slower than float weights at the same rate; the BitNet b1.58 recipes train them at a higher
    learning rate. Each group's "lr_scale" multiplies the scheduled learning rate.
    """
    bit = {id(m.weight) for m in model.modules() if isinstance(m, BitLinear)}
    skip = {id(p) for p in no_decay}
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if id(p) in bit], "weight_decay": weight_decay,
         "lr_scale": bit_lr_scale},
        {"params": [p for p in params if id(p) not in bit and p.dim() >= 2 and id(p) not in skip],
         "weight_decay": weight_decay, "lr_scale": 1.0},
        {"params": [p for p in params if id(p) not in bit and (p.dim() < 2 or id(p) in skip)],
         "weight_decay": 0.0, "lr_scale": 1.0},
    ]
    return [g for g in groups if g["params"]]
