"""BitLinear (bitlinear/layer.py) made faster for training: the same values and gradients, bit
for bit (tests/test_bitlinear.py), with fewer passes over the activations.

- A hand-written backward. The straight-through estimator written with detach() costs two more
  full-size ops per quantizer in the forward and their autograd nodes in the backward; here the
  gradients are the estimator's directly: dx = dy W_q, dW = dy^T x_q, db = sum(dy), the same
  matmuls in the same layouts that autograd runs for F.linear, so the same bits.
- Shared input quantization: layers that read one tensor (LLaMA's wq, wk, wv and w1, w3, as the
  model declares with share_input) quantize it once.
- Quantizers in fewer passes and no temporaries: each fresh full-size tensor costs the CPU
  allocator page faults, which cost more than the arithmetic (RESULTS.md, Training step time).
- W_q kept across no-grad forwards while the latent weight is unchanged: an evaluation runs
  hundreds of forwards between two optimizer steps.
"""

import torch
import torch.nn.functional as F

from .layer import EPS, BitLinear, absmean_scale


@torch.no_grad()
def activation_quant(x, eps=EPS):
    """layer.activation_quant, bit for bit: max|x| as max(max x, -min x), with no |x| tensor;
    rounding in place; no clamp (|x| s_x <= 127 already)."""
    peak = torch.maximum(x.amax(dim=-1, keepdim=True), x.amin(dim=-1, keepdim=True).neg_())
    s = 127 / peak.float().clamp_(min=eps)
    return (x.float() * s).round_().div_(s).to(x.dtype)


@torch.no_grad()
def weight_quant(w, eps=EPS):
    """layer.weight_quant, bit for bit, rounding, clamping and rescaling in place."""
    s = absmean_scale(w, eps)
    return (w.float() * s).round_().clamp_(-1, 1).div_(s).to(w.dtype)


class _BitLinearSTE(torch.autograd.Function):
    """F.linear(x_q, W_q, bias) with the straight-through gradients. x_q and W_q may come in
    precomputed (None: quantize here)."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x, weight, bias, x_q, eps):
        # under torch.compile the quantizers stay inside the function, where they fuse
        x_q = activation_quant(x, eps) if x_q is None else x_q
        w_q = weight_quant(weight, eps)
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
        return grad_x, grad_w, grad_b, None, None


class SharedInput:
    """One quantization of an input tensor, for the n sibling layers that read it in turn.

    The quantization is reused only for the same tensor object with an unchanged version
    counter (no in-place write since), and let go once all n siblings have it. Tensors without
    a version counter (inference mode) are quantized each time.
    """

    def __init__(self, quantize, n):
        self.quantize, self.n = quantize, n
        self.x = self.value = None

    def __call__(self, x, eps):
        if x.is_inference():
            return self.quantize(x, eps)
        if self.x is not x or self.version != x._version:
            self.x, self.version, self.uses = x, x._version, 0
            self.value = self.quantize(x, eps)
        self.uses += 1
        value = self.value
        if self.uses == self.n:
            self.x = self.value = None
        return value


class FastBitLinear(BitLinear):
    """BitLinear with a hand-written backward and, when declared, a shared input quantization."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.shared_input = None  # a SharedInput, set by share_input
        self.w_q_cache = None  # (weight, its state, W_q) from the last no-grad forward

    def frozen_weight_quant(self):
        """weight_quant(self.weight), reused while the weight is unchanged: the same tensor
        object, storage, dtype and device, and no in-place write since (its version counter)."""
        w, cache = self.weight, self.w_q_cache
        state = (w.data_ptr(), w._version, w.dtype, w.device)
        if cache is None or cache[0] is not w or cache[1] != state:
            self.w_q_cache = cache = (w, state, weight_quant(w, self.eps))
        return cache[2]

    def forward(self, x):
        if self.lam is not None:  # a quantization warm-up: the paper's form, with its blend
            return super().forward(x)
        if self.norm is not None:
            x = self.norm(x)
        if torch.compiler.is_compiling():  # the graph quantizes, and fuses, by itself
            return _BitLinearSTE.apply(x, self.weight, self.bias, None, self.eps)
        shared = self.shared_input
        x_q = shared(x, self.eps) if shared is not None else activation_quant(x, self.eps)
        if not torch.is_grad_enabled():  # evaluation, generation: no graph
            return F.linear(x_q, self.frozen_weight_quant(), self.bias)
        self.w_q_cache = None  # training: the optimizer is about to change the weight
        return _BitLinearSTE.apply(x, self.weight, self.bias, x_q, self.eps)


def share_input(*layers):
    """Declare that layers read the same input tensor, in this order, every forward: it is then
    quantized once for all. A no-op for float layers and for layers with their own norm."""
    if all(isinstance(m, FastBitLinear) and m.norm is None for m in layers):
        group = SharedInput(activation_quant, len(layers))
        for m in layers:
            m.shared_input = group
