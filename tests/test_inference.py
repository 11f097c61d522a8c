"""Integer inference: trained GPT and LLaMA models run with int8 x ternary matmuls give the
training logits and the same greedy tokens; 16-bit heads compute with exactly their values."""

import copy

import pytest
import torch

import bitlinear.kernels as kernels
from bitlinear.inference import (
    Embedding8,
    Embedding16,
    Linear8,
    Linear16,
    TernaryLinear,
    to_integer,
)
from bitlinear.kernels import fbgemm_fp16_exact, int_matmul
from bitlinear.layer import BitLinear, activation_quant, activation_quant_int
from bitlinear.packed_file import save_packed
from common import build_model, load_checkpoint, model_from_checkpoint
from sample import generate, load_model
from train import train

# every model variant the integer path must handle: GQA, squared ReLU, sub-layer norms, tied and
# untied heads, biases and the FAQ's inner BitLinear norm
VARIANTS = {
    "gpt": dict(arch="gpt"),
    "gpt-bias-bitnorm": dict(arch="gpt", bias=True, bit_norm=True),
    "llama-gqa-relu2-subln-tied": dict(arch="llama", n_head=4, n_kv_head=2, mlp="relu2",
                                       subln=True, tie_embeddings=True),
    "llama-swiglu-untied": dict(arch="llama", n_head=4),
}


def train_variant(tiny_cfg, variant, iters=30):
    """A tiny model of the variant trained a few steps on Tiny Shakespeare, in eval mode."""
    cfg = dict(tiny_cfg, **VARIANTS[variant], max_iters=iters, lr_decay_iters=iters,
               eval_interval=iters, learning_rate=3e-3,
               optimizer="adamw", lr_schedule="cosine")  # the weights the tolerances were set on
    train(cfg)
    return model_from_checkpoint(load_checkpoint(f"{cfg['out_dir']}/ckpt.pt")).eval()


def assert_same_logits(out, ref):
    """The integer model's logits are the fake-quant model's to float tolerance.

    The int32 sums are exact and (X_i W_t^T) / (s_x s_w) rounds once, where the fake-quant
    matmul rounds every partial sum: layer outputs differ in the last bits. Where a next layer's
    x * s_x lands within those bits of a rounding step (.5), one int8 code of one token differs
    by 1, which moves that token's logits (and later tokens', through attention) by ~1e-4..1e-2;
    so most positions agree to 1e-5 and a few may move, never far.
    """
    diff = (out - ref).abs().amax(dim=-1)  # per position
    assert (diff < 1e-5).float().mean() > 0.75, diff
    assert diff.max() < 1e-2, diff.max()


def test_int_matmul_is_exact():
    for m, k, n in [(5, 300, 7), (1, 768, 64), (33, 64, 48)]:
        x = torch.randint(-128, 128, (m, k), dtype=torch.int8)
        w = torch.randint(-1, 2, (n, k), dtype=torch.int8)  # (out, in), as nn.Linear
        assert torch.equal(int_matmul(x, w), x.int() @ w.int().t())


needs_fbgemm = pytest.mark.skipif("fbgemm" not in torch.backends.quantized.supported_engines,
                                  reason="fbgemm (x86 CPUs only) is not in this torch build")


@needs_fbgemm
@pytest.mark.parametrize("kernel", ["int_mm", "fbgemm"])
def test_integer_gemm_is_exact_with_either_kernel(monkeypatch, kernel):
    monkeypatch.setattr(kernels, "CPU_KERNEL", kernel)
    g = torch.Generator().manual_seed(0)
    # the worst case for float32 sums: every product at its largest, one sign
    for w_max, m, k, n in [(1, 33, 4096, 48), (1, 1, 768, 64), (127, 3, 1032, 40),
                           (127, 2, 2048, 8)]:  # 127 * 127 * 2048 > 2**24: int_mm instead
        x = torch.randint(-127, 128, (m, k), dtype=torch.int8, generator=g)
        x[0] = -127
        w = torch.randint(-w_max, w_max + 1, (n, k), dtype=torch.int8, generator=g)
        w[0] = -w_max
        gemm = kernels.IntegerGemm(w_max)
        assert gemm.fbgemm(x, w) == (kernel == "fbgemm" and 127 * w_max * k < 2**24)
        exact = x.long() @ w.long().t()
        assert exact[0, 0] == 127 * w_max * k
        assert torch.equal(gemm(x, w).long(), exact)
        assert gemm.run_bytes() == (2 * w.numel() if gemm.fbgemm(x, w) else 0)
        w.mul_(-1)  # an in-place change (as load_state_dict makes) packs the weight again
        assert torch.equal(gemm(x, w).long(), -exact)


@needs_fbgemm
@pytest.mark.parametrize("variant", ["gpt-bias-bitnorm", "llama-gqa-relu2-subln-tied"])
def test_both_kernels_give_identical_logits(tiny_cfg, variant, monkeypatch):
    model = to_integer(train_variant(tiny_cfg, variant))
    idx = torch.randint(0, 65, (2, 32), generator=torch.Generator().manual_seed(1))
    logits = {}
    for kernel in ("int_mm", "fbgemm"):
        monkeypatch.setattr(kernels, "CPU_KERNEL", kernel)
        with torch.no_grad():
            logits[kernel] = model(idx, idx)[0]
    assert torch.equal(logits["int_mm"], logits["fbgemm"])


def test_ternary_linear_matches_bitlinear():
    torch.manual_seed(0)
    for norm in (False, True):
        layer = BitLinear(64, 48, bias=True, norm=norm)
        x = torch.randn(3, 5, 64)
        torch.testing.assert_close(TernaryLinear.from_bitlinear(layer)(x), layer(x),
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16bit_head_computes_with_its_exact_values(dtype):
    torch.manual_seed(0)
    w = (torch.randn(1000, 96) * 0.05).to(dtype)
    x = torch.randn(3, 96)
    exact = (x.double() @ w.double().t()).float()  # the stored values, no other rounding
    head = Linear16(w)
    torch.testing.assert_close(head(x), exact, atol=2e-6, rtol=1e-5)
    assert head.run_bytes() == w.numel() * (2 if fbgemm_fp16_exact(w) else 4)
    rounded_x = x.to(dtype).double() @ w.double().t()  # what a 16-bit matmul would compute
    assert (rounded_x.float() - exact).abs().max() > 1e-4  # (so the check above can tell)
    emb = Embedding16(w)
    idx = torch.tensor([[3, 999]])
    assert emb(idx).dtype == torch.float32 and torch.equal(emb(idx), w.float()[idx])


def test_int8_embeddings_and_head_compute_their_quantized_values():
    torch.manual_seed(0)
    w = torch.randn(1000, 96) * 0.05
    w_i, s = activation_quant_int(w)  # one absmax scale per row
    emb, head = Embedding8(w_i, s.view(-1)), Linear8(w_i, s.view(-1))
    idx = torch.tensor([[3, 999]])
    assert torch.equal(emb(idx), (w_i.float() / s)[idx])
    x = torch.randn(3, 96)
    # the fake-quant model of an int8 head: 8-bit tokens times the dequantized rows
    torch.testing.assert_close(head(x), activation_quant(x) @ (w_i.float() / s).t(),
                               atol=1e-5, rtol=1e-5)
    assert (head(x) - x @ w.t()).abs().max() < 0.02  # close to the float head, not equal


def test_bf16_values_outside_fp16_take_the_float32_path():
    w = torch.tensor([[1e-7, 70000.0], [1.0, 2.0]]).bfloat16()  # fp16: underflow, overflow
    assert not fbgemm_fp16_exact(w)
    head = Linear16(w)
    x = torch.tensor([[1e7, 1.0]])
    assert torch.equal(head(x), x @ w.float().t())
    assert head.run_bytes() == 4 * w.numel()


@pytest.mark.parametrize("variant", VARIANTS)
def test_trained_model_runs_exactly_in_integers(tiny_cfg, variant):
    model = train_variant(tiny_cfg, variant)
    integer = to_integer(copy.deepcopy(model))
    assert not any(isinstance(m, BitLinear) for m in integer.modules())
    n_linear = 4 if VARIANTS[variant]["arch"] == "gpt" else 7
    assert sum(isinstance(m, TernaryLinear) for m in integer.modules()) == 2 * n_linear
    idx = torch.randint(0, 65, (4, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, _ = model(idx, idx)
        out, _ = integer(idx, idx)
    assert_same_logits(out, ref)
    prompt = idx[:1, :8]
    assert torch.equal(generate(model, prompt, 40, temperature=0),
                       generate(integer, prompt, 40, temperature=0))


def packed_model(variant, tmp_path):
    """A small model of the variant (random weights) as its .bitnet file loads, with 16-bit
    embeddings and head, as sample.py runs it."""
    args = {k: v for k, v in VARIANTS[variant].items() if k != "arch"}
    args = dict(dict(n_layer=2, n_head=2, n_embd=64, block_size=32, vocab_size=65), **args)
    torch.manual_seed(0)
    model = build_model(VARIANTS[variant]["arch"], args)
    save_packed(model, tmp_path / "m.bitnet", VARIANTS[variant]["arch"], args)
    return load_model(tmp_path / "m.bitnet")[0].eval()


@pytest.mark.parametrize("variant", VARIANTS)
def test_packed_model_draws_the_same_tokens_with_and_without_the_cache(variant, tmp_path):
    """Sampled generation (temperature, top-k) past the context: the cached decode steps draw
    what the uncached forward over the whole window draws."""
    model = packed_model(variant, tmp_path)
    prompt = torch.randint(0, 65, (1, 5), generator=torch.Generator().manual_seed(4))
    draw = lambda cache: generate(model, prompt, 40, 0.8, 10,  # noqa: E731
                                  torch.Generator().manual_seed(5), use_cache=cache)
    assert torch.equal(draw(True), draw(False))
