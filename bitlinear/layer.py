"""BitLinear: the drop-in nn.Linear replacement of BitNet b1.58, shared by every model."""

import inspect
import weakref

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.optim.optimizer import register_optimizer_step_pre_hook

from .quant import EPS, activation_quant, weight_quant


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned gain (Zhang & Sennrich, 2019)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.rms_norm(x, (x.size(-1),), self.weight, self.eps)


def straight_through(q, x):
    """q in the forward, the identity's gradient (to x) in the backward.

    The FAQ writes x + (q - x).detach(); q + (x - x.detach()) is the same estimator, but its
    forward value is q exactly (x - x.detach() is exactly 0), where the FAQ form can be an ulp off
    for a weight clamped far above its scale (x + (q - x) need not round back to q).
    """
    return q + (x - x.detach())


def bitlinear_reference(x, weight, bias=None, eps=EPS):
    """The FAQ formulation, kept as the readable definition: straight-through estimator by detach.

    Forward uses quantized x and W; backward treats both quantizers as the identity. The fast
    path (bitlinear, BitLinear) is tested to give the same values and gradients, bit for bit.
    """
    x_q = straight_through(activation_quant(x, eps), x)
    w_q = straight_through(weight_quant(weight, eps), weight)
    return F.linear(x_q, w_q, bias)


class _BitLinearSTE(torch.autograd.Function):
    """bitlinear_reference with a hand-written backward. x_q and W_q may come in precomputed
    (without autograd: BitLinear reuses them, see quantized_input and quantized_weight).

    The detach trick costs two more full-size elementwise ops per quantizer in the forward and
    their autograd nodes in the backward; here the gradients are the STE's directly:
    dx = dy W_q, dW = dy^T x_q, db = sum(dy): the same matmuls, in the same layouts, that
    autograd runs for F.linear, so the results are the same bits.
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x, weight, bias, x_q, w_q, eps):
        # None: quantize here. Under torch.compile this keeps the quantizers inside the function
        # (measured: 1.01x vs 1.11x of the float step with them outside, in no_grad regions)
        x_q = activation_quant(x, eps) if x_q is None else x_q
        w_q = weight_quant(weight, eps) if w_q is None else w_q
        ctx.save_for_backward(x_q, w_q)
        return F.linear(x_q, w_q, bias)  # the bias inside, as in F.linear: the same rounding

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad_y):
        x_q, w_q = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        g = grad_y.reshape(-1, grad_y.size(-1))
        if ctx.needs_input_grad[0]:
            grad_x = grad_y @ w_q.to(grad_y.dtype)
        if ctx.needs_input_grad[1]:
            grad_w = g.t() @ x_q.reshape(-1, x_q.size(-1)).to(g.dtype)
        if ctx.needs_input_grad[2]:
            grad_b = g.sum(0)
        return grad_x, grad_w, grad_b, None, None, None


def bitlinear(x, weight, bias=None, eps=EPS):
    """y = x_q W_q^T (+ bias), with x_q, W_q the 8-bit / ternary fake-quantized input and weight."""
    return _BitLinearSTE.apply(x, weight, bias, None, None, eps)


def _eager(t):
    """Whether a quantization of t may be cached: plain eager tensors only. Under torch.compile
    the graph quantizes (and fuses) by itself; inference tensors have no version counter, and a
    quantization made in inference mode cannot be saved for backward outside it."""
    return (not torch.compiler.is_compiling() and type(t) in (nn.Parameter, torch.Tensor)
            and not t.is_inference() and not torch.is_inference_mode_enabled())


_last_input = None  # (weak reference to x, (x._version, x.data_ptr(), eps), x_q): the last input


def quantized_input(x, eps=EPS):
    """activation_quant(x, eps), reused when the previous BitLinear got this same tensor.

    LLaMA's q, k, v projections (and gate, up) read one tensor: it is quantized once for all.
    x_q depends on x alone, so identity (by weak reference: a dead tensor's id can be reused),
    an unchanged version counter (no in-place write since), the same storage (no .data swap)
    and the same eps make reuse exact. Only the one last input is kept.
    """
    global _last_input
    if not _eager(x):
        return activation_quant(x, eps)
    key, last = (x._version, x.data_ptr(), eps), _last_input
    if last is not None and last[0]() is x and last[1] == key:
        return last[2]
    x_q = activation_quant(x, eps)
    _last_input = (weakref.ref(x), key, x_q)
    return x_q


_cached = weakref.WeakSet()  # the BitLinears that now hold a cached W_q


def _drop_cached_weights(optimizer, args, kwargs):
    # before every step of every torch.optim optimizer: the weights are about to change, and
    # fused optimizers (AdamW(fused=True), the default on CUDA here) write them without bumping
    # their version counters. Dropping W_q (and the last x_q) here also frees them for the step.
    global _last_input
    for layer in list(_cached):
        layer._w_q = None
    _cached.clear()
    _last_input = None


register_optimizer_step_pre_hook(_drop_cached_weights)


class BitLinear(nn.Linear):
    """nn.Linear with ternary weights and 8-bit per-token activations (BitNet b1.58).

    The latent weight stays full precision for the optimizer; the forward sees only its ternary
    quantization. norm=True puts an RMSNorm in front of the activation quantizer, as in the
    "Training Tips, Code and FAQ" reference (models here keep their own norms by default).

    W_q is cached between forwards while the latent weight is unchanged: gradient-accumulation
    micro-steps, evaluation and token-by-token generation quantize each weight once. Every
    torch.optim step (fused optimizers included) drops all cached W_q first; any other
    autograd-visible write (load_state_dict, in-place ops under no_grad) bumps weight._version
    and any new storage (.to(), a new Parameter) moves data_ptr: both miss. A write through
    weight.data bypasses all of these: call clear_cache() after one.
    Memory: training holds every W_q from the forward to the backward anyway (saved for it) and
    drops them before the optimizer step, so its peak is unchanged; evaluation and generation
    keep one more weight-sized tensor per layer.
    """

    def __init__(self, in_features, out_features, bias=False, norm=False, eps=EPS,
                 device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.eps = eps
        self.norm = RMSNorm(in_features) if norm else None
        self._w_q = None  # (alias of the weight it came from, its _version then, W_q)

    def clear_cache(self):
        """Forget the cached W_q (needed only after writing the weight through .data)."""
        self._w_q = None

    def quantized_weight(self):
        """weight_quant(self.weight, self.eps), from the cache when the weight is unchanged."""
        w = self.weight
        if not _eager(w):
            return weight_quant(w, self.eps)
        cache = self._w_q
        # the alias keeps the old storage alive, so an equal data_ptr is the same storage
        if (cache is not None and cache[1] == w._version and cache[0].data_ptr() == w.data_ptr()
                and cache[0].dtype == w.dtype and cache[0].shape == w.shape
                and cache[0].device == w.device):
            return cache[2]
        w_q = weight_quant(w, self.eps)
        self._w_q = (w.detach(), w._version, w_q)
        _cached.add(self)
        return w_q

    def forward(self, x):
        if self.norm is not None:
            x = self.norm(x)
        if torch.compiler.is_compiling():  # the graph quantizes, and fuses, by itself
            return _BitLinearSTE.apply(x, self.weight, self.bias, None, None, self.eps)
        x_q, w_q = quantized_input(x, self.eps), self.quantized_weight()
        if not torch.is_grad_enabled():  # evaluation, generation: the same F.linear, no graph
            return F.linear(x_q, w_q, self.bias)
        return _BitLinearSTE.apply(x, self.weight, self.bias, x_q, w_q, self.eps)

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


def adamw(model, weight_decay, learning_rate, betas, device_type, bit_lr_scale=1.0, no_decay=()):
    """AdamW over param_groups (fused on CUDA), as every model's configure_optimizers makes it."""
    groups = param_groups(model, weight_decay, bit_lr_scale, no_decay)
    fused = device_type == "cuda" and "fused" in inspect.signature(torch.optim.AdamW).parameters
    return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=fused or None)
