"""Exact integer inference for trained BitLinear layers, and 16-bit float layers that run in fp32.

A trained BitLinear computes y = (X_i / s_x) (W_t / s_w)^T with int8 activations X_i and ternary
weights W_t. The same value is (X_i W_t^T) / (s_x s_w): an integer matmul with int32 accumulation,
then one rescale per token. TernaryLinear stores only W_t (int8) and s_w, and computes that.

The embeddings and the output head of a .bitnet file are 16-bit numbers. Embedding16 and Linear16
keep them in 16 bits and compute in float32 with exactly those values, so what the file holds is
what runs: at batch 1 the head is the largest read of a decode step, and half the bytes is half
the time (see Linear16).
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from bitlinear.kernels import IntegerGemm, fbgemm_fp16_exact, fbgemm_linear, fbgemm_pack
from bitlinear.layer import EPS, BitLinear, activation_quant_int, ternarize


def quantize_tokens(x, eps):
    """(int8 activations, scales) of x's tokens as rows: (N, in) and (N, 1)."""
    return activation_quant_int(x.reshape(-1, x.size(-1)), eps)


class TernaryLinear(nn.Module):
    """Inference-only BitLinear: int8 ternary weights, per-token int8 activations, int32 sums."""

    def __init__(self, in_features, out_features, bias=False, norm=None, eps=EPS):
        super().__init__()
        self.in_features, self.out_features, self.eps = in_features, out_features, eps
        # zero_, not torch.zeros: inside shell_model the memory is then left untouched
        self.register_buffer("weight", torch.empty(out_features, in_features,
                                                   dtype=torch.int8).zero_())
        self.register_buffer("weight_scale", torch.ones(()))  # s_w = 1 / mean|W|
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.norm = norm  # the BitLinear's inner RMSNorm, if it had one
        self.gemm = IntegerGemm(w_max=1)

    @classmethod
    def from_bitlinear(cls, layer: BitLinear, quantize=True) -> "TernaryLinear":
        """The layer's integer form; quantize=False makes a shell for weights loaded later."""
        if layer.group:
            raise ValueError(f"a BitLinear with a scale per group of {layer.group} weights has no "
                             f"integer form here (one scale per matrix); train with bit_group=0")
        new = cls(layer.in_features, layer.out_features, layer.bias is not None, layer.norm,
                  layer.eps)
        if quantize:
            t, s = ternarize(layer.weight.detach(), layer.eps)
            new.weight.copy_(t)
            new.weight_scale.copy_(s)
            if layer.bias is not None:
                new.bias.data.copy_(layer.bias.detach())
        return new

    def forward(self, x):
        if self.norm is not None:
            x = self.norm(x)
        x_i, s_x = quantize_tokens(x, self.eps)
        # integer sums / float32 is float32: the conversion and the rescale in one op
        y = torch.div(self.gemm(x_i, self.weight), s_x * self.weight_scale)
        y = y.to(x.dtype).view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def run_bytes(self):
        """Bytes of the copy the GEMM runs from (fbgemm's packed fp16), beside weight."""
        return self.gemm.run_bytes()

    def extra_repr(self):
        return f"{self.in_features}, {self.out_features}, bias={self.bias is not None}"


@torch.no_grad()
def to_integer(model: nn.Module, quantize=True) -> nn.Module:
    """Replace every BitLinear in model (in place) by its TernaryLinear; returns model.

    quantize=False skips ternarizing, for a shell_model whose integer weights are loaded next.
    """
    for name, child in model.named_children():
        if isinstance(child, BitLinear):
            setattr(model, name, TernaryLinear.from_bitlinear(child, quantize))
        else:
            to_integer(child, quantize)
    return model


class Linear16(nn.Module):
    """An output head whose weight is a 16-bit tensor (fp16 or bf16), computed in float32.

    On x86 CPUs the weight goes to fbgemm's fp16 GEMM (torch.ops.quantized.linear_dynamic_fp16):
    it keeps the weights in fp16, widens them to fp32 in registers and accumulates in fp32, so the
    result is x @ W^T with exactly the stored values, in half the bytes of a float32 head. A bf16
    weight takes that path when all its values are fp16 numbers too (usual for trained weights);
    elsewhere, and on other devices, the weight is widened to float32 once and F.linear runs
    (the same values, in another summation order).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.in_features, self.out_features = weight.size(1), weight.size(0)
        self.register_buffer("weight", weight)
        self.bias = None if bias is None else nn.Parameter(bias.float(), requires_grad=False)
        self._run = None  # (the weight it was made for, packed fbgemm weight or float32 weight)

    def _prepare(self):
        """fbgemm's packed fp16 weights, or a float32 copy."""
        return fbgemm_pack(self.weight) if fbgemm_fp16_exact(self.weight) else self.weight.float()

    def forward(self, x):
        if self._run is None or self._run[0] is not self.weight:  # made again after load/assign
            self._run = (self.weight, self._prepare())
        run = self._run[1]
        if isinstance(run, torch.Tensor):
            y = F.linear(x.float(), run)
        else:
            y = fbgemm_linear(x.float().reshape(-1, x.size(-1)), run)
            y = y.view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def run_bytes(self):
        """Bytes of the copy forward runs from (fbgemm's packed fp16, or float32), beside weight."""
        if self._run is None:
            return 0
        return self.weight.numel() * (4 if isinstance(self._run[1], torch.Tensor) else 2)

    def extra_repr(self):
        return f"{self.in_features}, {self.out_features}, {self.weight.dtype}"


class Embedding16(nn.Module):
    """Token (or position) embeddings stored in 16 bits; rows are widened to float32 on lookup."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.register_buffer("weight", weight)

    def forward(self, idx):
        return F.embedding(idx, self.weight).float()

    def extra_repr(self):
        return f"{self.weight.size(0)}, {self.weight.size(1)}, {self.weight.dtype}"


class Embedding8(nn.Module):
    """Embeddings stored as int8 rows with one scale each (export.py --embed_int8=True)."""

    def __init__(self, weight: torch.Tensor, weight_scale: torch.Tensor):
        super().__init__()
        self.register_buffer("weight", weight)  # (rows, dim) int8
        self.register_buffer("weight_scale", weight_scale)  # (rows,): a row is int8 / scale

    def forward(self, idx):
        return F.embedding(idx, self.weight).float() / F.embedding(idx, self.weight_scale[:, None])

    def extra_repr(self):
        return f"{self.weight.size(0)}, {self.weight.size(1)}, int8"


class Linear8(nn.Module):
    """An output head stored as int8 rows with one scale each, run as an integer matmul: the
    input is quantized per token to int8 (as in TernaryLinear), y = (X_i W_i^T) / (s_x s_w)."""

    def __init__(self, weight: torch.Tensor, weight_scale: torch.Tensor, bias=None, eps=EPS):
        super().__init__()
        self.in_features, self.out_features, self.eps = weight.size(1), weight.size(0), eps
        self.register_buffer("weight", weight)  # (out, in) int8
        self.register_buffer("weight_scale", weight_scale)  # (out,)
        self.bias = None if bias is None else nn.Parameter(bias.float(), requires_grad=False)
        self.gemm = IntegerGemm(w_max=127)

    def forward(self, x):
        x_i, s_x = quantize_tokens(x, self.eps)
        y = torch.div(self.gemm(x_i, self.weight), s_x * self.weight_scale)
        y = y.view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def run_bytes(self):
        return self.gemm.run_bytes()

    def extra_repr(self):
        return f"{self.in_features}, {self.out_features}, int8"


LOW_PRECISION = (torch.float16, torch.bfloat16)


class BuildTooLarge(ValueError):
    """A shell_model build that would make more tensors or values than its budget allows."""


class _SkipInit(TorchFunctionMode):
    """Turns the initializers (nn.init's and the in-place Tensor fills) into no-ops, and counts
    the tensors and values the build makes against a budget: the size of a factory call
    (empty, zeros, ones), an arange or an outer product is known, and refused, before it is
    made; any other result is counted after."""

    SKIP = {torch.Tensor.normal_, torch.Tensor.uniform_, torch.Tensor.zero_, torch.Tensor.fill_,
            nn.init.normal_, nn.init.uniform_, nn.init.kaiming_uniform_, nn.init.trunc_normal_,
            nn.init.xavier_uniform_, nn.init.xavier_normal_, nn.init.zeros_, nn.init.ones_}

    def __init__(self, values=math.inf, tensors=math.inf):
        super().__init__()
        self.values, self.tensors = values, tensors

    def take(self, n):
        self.values, self.tensors = self.values - n, self.tensors - 1
        if self.values < 0 or self.tensors < 0:
            raise BuildTooLarge("more tensors or values than the budget")

    def __torch_function__(self, func, types, args=(), kwargs=None):
        # nn.init functions dispatch here themselves, and a mode is off while it handles a
        # call: the Tensor methods they use inside would not be seen, so both are listed
        kwargs = kwargs or {}
        if func in self.SKIP:
            return args[0] if args else kwargs["tensor"]
        planned = _planned_size(func, args, kwargs)
        if planned is not None:
            self.take(planned)
        out = func(*args, **kwargs)
        if planned is None and isinstance(out, torch.Tensor):
            self.take(out.numel())
        return out


def _planned_size(func, args, kwargs):
    """The number of values a factory call, an arange or an outer product will make; None for
    other calls."""
    if func in (torch.empty, torch.zeros, torch.ones):
        size = args[0] if len(args) == 1 and not isinstance(args[0], int) else args
        return math.prod(int(d) for d in kwargs.get("size", size))
    if func is torch.arange and all(type(a) in (int, float) for a in args) and args:
        start, end, step = (0, args[0], 1) if len(args) == 1 else (*args[:2], (args[2:] or [1])[0])
        return max(0, math.ceil((end - start) / step)) if step and math.isfinite(end) else 0
    if func in (torch.outer, torch.Tensor.outer) and len(args) == 2:
        return args[0].numel() * args[1].numel()
    return None


def shell_model(build, values=math.inf, tensors=math.inf):
    """build() with its weights allocated but never written, for a model whose weights are
    loaded next (load_state_dict(assign=True)): untouched pages are not resident memory, so
    building a 124M GPT-2 costs nothing, and the shell's tensors are freed at the assign.
    Everything else (shapes, ties, RoPE tables and other computed buffers) is built as usual.
    (The meta device would do the same, but its first use imports a large part of torch.) A
    build that would make more than `tensors` tensors or `values` values stops with
    BuildTooLarge: a model that a file describes costs at most what the file holds."""
    with _SkipInit(values, tensors):
        return build()


@torch.no_grad()
def load_integer_state(model: nn.Module, state: dict) -> nn.Module:
    """Load a .bitnet state (bitlinear.packed_file.load_packed) into an integer model; returns it.

    model comes from to_integer, typically of a shell_model. 16-bit embeddings and heads become
    Embedding16 / Linear16 holding the file's tensors, int8 ones Embedding8 / Linear8; every
    other float tensor is widened to float32 (exactly). The model takes the state's tensors
    themselves (assign=True): no copies.
    """
    for qual, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            prefix = f"{qual}.{name}." if qual else f"{name}."
            w, bias = state.get(prefix + "weight"), state.get(prefix + "bias")
            if w is None or type(child) not in (nn.Embedding, nn.Linear):
                continue
            embedding = type(child) is nn.Embedding
            if w.dtype == torch.int8:
                scale = state[prefix + "weight_scale"]
                new = Embedding8(w, scale) if embedding else Linear8(w, scale, bias)
            elif w.dtype in LOW_PRECISION:
                new = Embedding16(w) if embedding else Linear16(w, bias)
            else:
                continue
            setattr(parent, name, new)
    state = {k: v.float() if v.dtype in LOW_PRECISION and not _is_16bit_weight(model, k) else v
             for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    return model


def _is_16bit_weight(model, key):
    owner, _, leaf = key.rpartition(".")
    module = model.get_submodule(owner) if owner else model
    return leaf == "weight" and isinstance(module, (Linear16, Embedding16, Linear8, Embedding8))
