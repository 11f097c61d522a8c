"""Single-token decoding of an integer model (bitlinear/inference.py) in fewer passes, with the
same bits as its forward.

model(idx, cache=cache) is the readable reference. At batch 1 its decode step is ~140 small ops
a layer, whose dispatch costs more than the ternary matmuls (RESULTS.md, Decode). Decoder
computes the same step with:
  - one GEMM per shared input: the sibling weights (wq, wk, wv; w1, w3) stacked, each output
    column divided by its own layer's s_x s_w, the division each layer makes alone;
  - the activation quantizer in fewer passes: round(x s_x) needs no clamp (|x| s_x <= 127 by
    construction: clamp(-128, 127) changes nothing), and s_x = 127 / max|x| is formed as
    Python's `127 / tensor` forms it (reciprocal, then times 127);
  - RoPE on q and k together, and grouped-query attention without copying keys and values
    (enable_gqa reads the numbers that repeat_interleave copies);
  - the cache written in place, as sample.py's KVCache holds it: a prefill by the model and
    decode steps by a Decoder share one cache.
Each op is the model's op on the same numbers, or elementwise the same arithmetic.

compile=True (LLaMA, CPU) runs the step through torch.compile, whose C++ loops fuse each chain
of elementwise ops into one pass. Its sums are torch._int_mm's where that is fast (VNNI); on
other CPUs (fbgemm's packed weights cannot enter a graph) a float32 GEMM's, on a float32 copy of
the block weights: exact integers again, but 4 bytes a weight to read for each token. The one
op whose bits the compiler would change is RMSNorm's sum of squares (its own summation order):
under compile it is written out in ATen's order (ordered_sum), checked against ATen here on
this machine before use, and the first compiled step is checked against the eager one; either
check failing, or the compiler missing, means the eager step, said once on stderr.
"""

import functools
import sys
import time

import torch
import torch.nn.functional as F

from . import kernels
from .inference import TernaryLinear
from .kernels import IntegerGemm


def int_linear(x, weight, scale, gemm=None, eps=1e-5):
    """TernaryLinear's output for rows x (rows, in), weight (out, in) and scale (out,) each
    column's s_w; gemm an IntegerGemm. gemm None is the form torch.compile sees: an int8 weight
    sums by torch._int_mm, a float32 one (the same integers) by a float32 GEMM, exact as
    IntegerGemm's fbgemm path is (every sum below 2**24), so the same bits either way."""
    s_x = x.abs().amax(dim=-1, keepdim=True).clamp(min=eps).reciprocal() * 127
    x_i = (x * s_x).round().to(torch.int8)
    if gemm is not None:
        sums = gemm(x_i, weight)
    elif weight.dtype == torch.int8:
        sums = torch._int_mm(x_i, weight.t())
    else:
        sums = x_i.float() @ weight.t()
    return torch.div(sums, s_x * scale)


class TernaryGroup:
    """Sibling TernaryLinears that read one input, as one GEMM. The layers' weights become
    views of the stacked weight (the same values): no second copy of the model."""

    def __init__(self, layers):
        self.weight = torch.cat([m.weight for m in layers])
        start = 0
        for m in layers:
            m.weight, start = self.weight[start:start + m.out_features], start + m.out_features
        self.scale = torch.cat([m.weight_scale.reshape(1).expand(m.out_features) for m in layers])
        self.bias = None if layers[0].bias is None else torch.cat([m.bias.detach() for m in layers])
        self.eps = layers[0].eps
        self.gemm = IntegerGemm(w_max=1)

    def __call__(self, x):
        y = int_linear(x, self.weight, self.scale, self.gemm, self.eps)
        return y if self.bias is None else y + self.bias


# ---- RMSNorm with ATen's summation order, for the compiled step ------------------------------
# ATen sums a contiguous float32 row (SumKernel.cpp, cascade_sum) in W-lane vectors: vector i
# goes to accumulator i % 4 of its 4-vector row; the rows run in sequence, each 16 rows' sum
# moved up a level (each 16 of those another level); then the levels, the leftover vectors,
# the 4 accumulators, and last the tail values and the W lanes one by one. W is 8 on x86 (its
# AVX2 kernel serves AVX-512 too); sum_lanes finds it by trying.

def ordered_sum(sq, lanes):
    """sq.sum(-1, keepdim=True) as ATen adds it, for rows of fewer than 2**17 values."""
    n = sq.size(-1)
    nv = n // lanes
    rows = nv // 4
    lead = sq.shape[:-1]
    v = sq[..., :rows * 4 * lanes].reshape(*lead, rows, 4, lanes)
    blocks, left = divmod(rows, 16)
    acc = v[..., blocks * 16:, :, :].sum(-3) if left else None  # sums over an outer dim run
    if blocks:                                                   # in order, in ATen and here
        b = v[..., :blocks * 16, :, :].reshape(*lead, blocks, 16, 4, lanes).sum(-3)
        b16, b_left = divmod(blocks, 16)
        for level in ([b[..., b16 * 16:, :, :].sum(-3)] if b_left else []) + (
                [b[..., :b16 * 16, :, :].reshape(*lead, b16, 16, 4, lanes).sum(-3).sum(-3)]
                if b16 else []):
            acc = level if acc is None else acc + level
    part = list(acc.unbind(-2))  # rows >= 1: sum_lanes asks for n >= 4 W
    for i in range(rows * 4, nv):
        part[0] = part[0] + sq[..., i * lanes:(i + 1) * lanes]
    p = part[0] + part[1] + part[2] + part[3]
    total = sq[..., nv * lanes:nv * lanes + 1] if n > nv * lanes else p[..., :1]
    for t in range(nv * lanes + 1, n):
        total = total + sq[..., t:t + 1]
    for lane in range(0 if n > nv * lanes else 1, lanes):
        total = total + p[..., lane:lane + 1]
    return total


def sum_lanes(widths, trials=64):
    """The lane count W for which ordered_sum equals ATen's sum on trials random rows of each
    width (a wrong order differs on most rows), or None."""
    g = torch.Generator().manual_seed(0)
    rows = {n: torch.randn(trials, n, generator=g).exp() ** 2 for n in widths}
    for lanes in (8, 16, 4):
        if all(n >= 4 * lanes and torch.equal(ordered_sum(sq, lanes), sq.sum(-1, keepdim=True))
               for n, sq in rows.items()):
            return lanes
    return None


SUM_LANES = None  # set by Decoder(compile=True)


def rms(x, weight, eps):
    """F.rms_norm(x, (C,), weight, eps), with ATen's sum order spelled out under compile."""
    if not torch.compiler.is_compiling():
        return F.rms_norm(x, (x.size(-1),), weight, eps)
    return x * torch.rsqrt(ordered_sum(x * x, SUM_LANES) / x.size(-1) + eps) * weight


# ---- the steps --------------------------------------------------------------------------------

def llama_layer(x, w, kc, vc, cos, sin, pos, positions, nq: int, nkv: int, relu2: bool,
                eps: float):
    """One LLaMA block for rows x (B, C) at position pos (a 1-element tensor); positions has
    one element per cached position after this one's, so its length is the attention's."""
    n1, qkv, sub1, wo, n2, w13, sub2, w2 = w
    B, C, hs = x.size(0), x.size(1), x.size(1) // nq
    y = int_linear(rms(x, n1, eps), *qkv).view(B, nq + 2 * nkv, hs)
    x1, x2 = y[:, :nq + nkv].chunk(2, dim=-1)  # q and k: RoPE, as apply_rotary_emb
    qk = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    kc.index_copy_(2, pos, qk[:, nq:, None])
    vc.index_copy_(2, pos, y[:, nq + nkv:, None])
    L = positions.size(0)
    o = F.scaled_dot_product_attention(qk[:, :nq, None], kc[:, :, :L], vc[:, :, :L],
                                       enable_gqa=nq != nkv).view(B, C)
    x = x + int_linear(o if sub1 is None else rms(o, sub1, eps), *wo)
    gate, up = int_linear(rms(x, n2, eps), *w13).chunk(2, dim=-1)
    h = (F.relu(gate).square() if relu2 else F.silu(gate)) * up
    return x + int_linear(h if sub2 is None else rms(h, sub2, eps), *w2)


def llama_steps(idx, weights, caches, *args, model, layer=llama_layer):
    """The LLaMA step up to the head: embedding, every block (weights and caches hold each
    block's, args the rest of llama_layer's), the final norm."""
    x = model.tok_embeddings(idx).view(idx.size(0), model.config.n_embd)
    for w, (kc, vc) in zip(weights, caches, strict=True):
        x = layer(x, w, kc, vc, *args)
    return rms(x, model.norm.weight, model.norm.eps).view(idx.size(0), 1, -1)


def supports(model) -> bool:
    """Whether Decoder runs this model: an integer model (to_integer, or a .bitnet file), GPT or
    LLaMA, on the CPU, without the FAQ's inner BitLinear norm."""
    linears = [m for m in model.modules() if isinstance(m, TernaryLinear)]
    return (type(model).__name__ in ("GPT", "Llama") and bool(linears)
            and all(m.norm is None for m in linears)
            and next(model.parameters()).device.type == "cpu")


def can_compile(model) -> bool:
    """Whether Decoder(model, compile=True) compiles: LLaMA models."""
    return supports(model) and type(model).__name__ == "Llama"


# Without VNNI a compiled step reads a float32 copy of the block weights for each token: it beat
# the eager Decoder with a 19 MB copy and lost with a 340 MB one (RESULTS.md, Decode); this
# bound lies between the two.
FLOAT_COPY_BYTES = 64 << 20


def compile_pays(model) -> bool:
    """Whether the compiled step should beat the eager one here (sample.py's compile='auto')."""
    if not can_compile(model):
        return False
    n = sum(m.weight.numel() for m in model.modules() if isinstance(m, TernaryLinear))
    return kernels.CPU_KERNEL == "int_mm" or 4 * n <= FLOAT_COPY_BYTES


class Decoder:
    """decoder(idx, cache) -> logits (B, 1, vocab), bit for bit model(idx, cache=cache)[0] for
    one new token per row (idx (B, 1)) once the cache holds cache.length positions; the caller
    advances cache.length, as with the model. compile_seconds: the first compiled step's time."""

    def __init__(self, model, compile=False):
        if not supports(model):
            raise ValueError("Decoder runs integer GPT and LLaMA models on the CPU")
        self.model, self.config = model, model.config
        self.compiled, self.compile_seconds = None, None
        if type(model).__name__ == "Llama":
            self.layers = [self._llama_weights(b) for b in model.layers]
        else:
            self.layers = [self._gpt_layer(b) for b in model.transformer.h]
        if compile:
            self._compile()

    @torch.no_grad()
    def __call__(self, idx, cache):
        if idx.size(1) != 1:
            raise ValueError("Decoder takes one new token per row")
        if cache.length + 1 > self.config.block_size:
            raise ValueError(f"sequence of length {cache.length + 1} is longer than block_size "
                             f"{self.config.block_size}")
        if type(self.model).__name__ != "Llama":
            return self._gpt_step(idx, cache)
        if self.compiled is None:
            return self._llama_step(idx, cache, llama_steps, self.layers)
        if self.compile_seconds is None:
            return self._first_compiled_step(idx, cache)
        return self._llama_step(idx, cache, self.compiled, self.compiled_layers)

    # ---- LLaMA ---------------------------------------------------------------------------
    @staticmethod
    def _llama_weights(b):
        a, f = b.attention, b.feed_forward
        lin = lambda *ms: (lambda g: (g.weight, g.scale, g.gemm, g.eps))(TernaryGroup(ms))  # noqa: E731
        sub = lambda n: None if n is None else n.weight  # noqa: E731
        return (b.attention_norm.weight, lin(a.wq, a.wk, a.wv), sub(a.sub_norm), lin(a.wo),
                b.ffn_norm.weight, lin(f.w1, f.w3), sub(f.sub_norm), lin(f.w2))

    def _llama_step(self, idx, cache, steps, weights):
        m, c, p = self.model, self.config, cache.length
        pos = torch.tensor([p], device=idx.device)
        positions = torch.empty(p + 1, device=idx.device)  # only its length is read
        if steps is self.compiled:
            torch._dynamo.maybe_mark_dynamic(positions, 0)  # one graph for every length
            idx = idx.clone(memory_format=torch.contiguous_format)  # idx[:, -1:]'s strides vary
        x = steps(idx, weights, [(lc.k, lc.v) for lc in cache.layers], m.rope_cos[p:p + 1],
                  m.rope_sin[p:p + 1], pos, positions, c.n_head, c.n_kv_head, c.mlp == "relu2",
                  c.norm_eps, model=m)
        return m.output(x)  # fbgemm's packed head stays out of the graph

    def _compile(self):
        global SUM_LANES
        c = self.config
        if can_compile(self.model):
            SUM_LANES = SUM_LANES or sum_lanes((c.n_embd, c.ffn_hidden))
        if not can_compile(self.model) or SUM_LANES is None:
            why = ("ATen's summation order was not found on this machine" if can_compile(
                self.model) else "compile runs LLaMA models")
            print(f"note: decoding without compile ({why})", file=sys.stderr)
            return
        def own_sums(t):  # a linear as (weight, scale, None, eps): int_linear sums by itself
            weight = t[0] if kernels.CPU_KERNEL == "int_mm" else t[0].float()
            return weight, t[1], None, t[3]
        self.compiled_layers = [tuple(own_sums(t) if isinstance(t, tuple) else t for t in w)
                                for w in self.layers]
        region = torch.compiler.nested_compile_region(llama_layer)  # traced once for all blocks
        # one thread in the generated loops: at batch 1 they are too small for a parallel
        # region's barriers to pay (the GEMMs still take torch's threads)
        self.compiled = torch.compile(functools.partial(llama_steps, layer=region),
                                      dynamic=False, options={"cpp.threads": 1})

    def _first_compiled_step(self, idx, cache):
        """Compile (timed), then run the eager step on the same input: equal logits keep the
        compiled step, anything else the eager one."""
        t0 = time.perf_counter()
        try:
            got = self._llama_step(idx, cache, self.compiled, self.compiled_layers)
            why = "its first step differed from the eager step"
        except Exception as e:  # no C++ compiler, an unsupported platform, ...
            got, why = None, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        self.compile_seconds = time.perf_counter() - t0
        want = self._llama_step(idx, cache, llama_steps, self.layers)  # rewrites the same k, v
        if got is None or not torch.equal(got, want):
            print(f"note: decoding without compile ({why})", file=sys.stderr)
            self.compiled = None
        return want

    # ---- GPT -----------------------------------------------------------------------------
    @staticmethod
    def _gpt_layer(b):
        return (b.ln_1, TernaryGroup([b.attn.c_attn]), TernaryGroup([b.attn.c_proj]), b.ln_2,
                TernaryGroup([b.mlp.c_fc]), TernaryGroup([b.mlp.c_proj]), b.mlp.approximate)

    def _gpt_step(self, idx, cache):
        t, c, p = self.model.transformer, self.config, cache.length
        B, C, nh = idx.size(0), c.n_embd, c.n_head
        x = (t.wte(idx) + t.wpe(torch.arange(p, p + 1, device=idx.device))).view(B, C)
        for i, (ln1, attn, proj, ln2, fc, fc_proj, approximate) in enumerate(self.layers):
            q, k, v = attn(ln1(x)).view(B, 3, nh, C // nh).unbind(1)
            layer = cache.layer(i)
            layer.k[:, :, p] = k
            layer.v[:, :, p] = v
            o = F.scaled_dot_product_attention(q[:, :, None], layer.k[:, :, :p + 1],
                                               layer.v[:, :, :p + 1])
            x = x + proj(o.view(B, C))
            x = x + fc_proj(F.gelu(fc(ln2(x)), approximate=approximate))
        return self.model.lm_head(t.ln_f(x.view(B, 1, C)))
