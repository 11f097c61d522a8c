"""The LLaMA model: RoPE against complex numbers, GQA, KV-cache generation, options, training."""

import math

import pytest
import torch

from bitlinear.layer import BitLinear, RMSNorm
from llama.model import Llama, LlamaConfig, apply_rotary_emb, precompute_rope
from sample import KVCache, generate


def tiny(**kw):
    torch.manual_seed(0)
    cfg = dict(block_size=16, vocab_size=65, n_layer=2, n_head=4, n_embd=32)
    return Llama(LlamaConfig(**{**cfg, **kw}))


def test_rope_matches_complex_rotation():
    B, H, T, D, theta = 2, 3, 7, 8, 500.0
    x = torch.randn(B, H, T, D)
    cos, sin = precompute_rope(D, T, theta)
    z = torch.complex(x[..., :D // 2], x[..., D // 2:])  # pair i is (x[i], x[i + D/2])
    pos = torch.arange(T, dtype=torch.float64)[:, None]
    freqs = theta ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
    rotated = z * torch.polar(torch.ones(T, D // 2, dtype=torch.float64), pos * freqs).cfloat()
    expected = torch.cat([rotated.real, rotated.imag], dim=-1)
    torch.testing.assert_close(apply_rotary_emb(x, cos, sin), expected, atol=1e-5, rtol=1e-5)
    # rotations keep lengths and make q.k depend only on the distance between positions
    q, k = torch.randn(D), torch.randn(D)
    qs, ks = (t.expand(1, 1, T, D) for t in (q, k))
    dots = (apply_rotary_emb(qs, cos, sin)[0, 0, 3:] * apply_rotary_emb(ks, cos, sin)[0, 0, :-3])
    torch.testing.assert_close(dots.sum(-1), dots.sum(-1)[:1].expand(T - 3))


def test_shapes_loss_and_param_count():
    C, L, V, F = 32, 2, 65, 128  # F: 8/3 * 32 rounded up to a multiple of 64
    model = tiny()
    assert model.config.ffn_hidden == F and model.config.n_kv_head == 4
    idx, targets = torch.randint(0, V, (2, 3, 16))
    logits, loss = model(idx, targets)
    assert logits.shape == (3, 16, V)
    assert abs(loss.item() - math.log(V)) < 0.1
    per_layer = 4 * C * C + 3 * C * F + 2 * C  # attention, gated MLP, two RMSNorm gains
    assert model.get_num_params() == L * per_layer + 2 * V * C + C
    assert tiny(tie_embeddings=True).get_num_params() == L * per_layer + V * C + C
    gqa = tiny(n_kv_head=1)  # wk and wv shrink to one head of 8
    assert model.get_num_params() - gqa.get_num_params() == L * 2 * C * (C - 8)


def test_every_projection_is_bitlinear_or_linear():
    ternary, float_ = tiny(), tiny(bitlinear=False)
    assert sum(isinstance(m, BitLinear) for m in ternary.modules()) == 2 * 7
    assert not any(isinstance(m, BitLinear) for m in float_.modules())
    assert not isinstance(ternary.output, BitLinear)
    shapes = lambda m: {k: v.shape for k, v in m.state_dict().items()}  # noqa: E731
    assert shapes(ternary) == shapes(float_)


def test_options_change_the_function():
    idx = torch.randint(0, 65, (1, 16))
    base = tiny()
    relu2, subln = tiny(mlp="relu2"), tiny(subln=True)
    assert isinstance(subln.layers[0].attention.sub_norm, RMSNorm)
    assert subln.layers[0].feed_forward.sub_norm.weight.shape == (128,)
    outs = [m(idx, idx)[1].item() for m in (base, relu2, subln)]
    assert len(set(outs)) == 3
    tied = tiny(tie_embeddings=True)
    assert tied.output.weight is tied.tok_embeddings.weight
    with pytest.raises(ValueError, match="mlp 'gelu'"):
        tiny(mlp="gelu")


def test_gqa_equals_attention_with_repeated_heads():
    """n_kv_head=2 computes exactly what a full model whose key/value heads are copies does."""
    gqa, full = tiny(n_kv_head=2, bitlinear=False), tiny(bitlinear=False)
    state = gqa.state_dict()
    for name, w in state.items():
        if name.endswith(("wk.weight", "wv.weight")):  # (2 heads * 8, C) -> (4 heads * 8, C)
            state[name] = w.view(2, 8, -1).repeat_interleave(2, dim=0).reshape(32, -1)
    full.load_state_dict(state)
    idx = torch.randint(0, 65, (2, 16))
    torch.testing.assert_close(gqa(idx, idx)[0], full(idx, idx)[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kw", [{}, {"n_kv_head": 1, "mlp": "relu2", "subln": True},
                                {"bitlinear": False, "tie_embeddings": True}])
def test_kv_cache_generation_equals_uncached(kw):
    model = tiny(**kw).eval()
    idx = torch.randint(0, 65, (2, 5))
    for n in (8, 30):  # within the context, and past it (the window slides)
        cached = generate(model, idx, n, temperature=0)
        assert torch.equal(cached, generate(model, idx, n, temperature=0, use_cache=False))
    cache = KVCache(2, 16)
    model(idx[:, :4], cache=cache)
    cache.length = 4
    step, _ = model(idx[:, 4:5], cache=cache)
    torch.testing.assert_close(step, model(idx)[0], atol=1e-5, rtol=1e-5)


def test_loss_falls_on_real_data(tiny_cfg):
    from train import train
    for bitlinear in (True, False):
        cfg = dict(tiny_cfg, arch="llama", bitlinear=bitlinear, max_iters=50, lr_decay_iters=50,
                   eval_interval=50, eval_iters=4, learning_rate=2e-3, n_kv_head=1,
                   overwrite=True)
        first = train(dict(cfg, max_iters=0))
        last = train(cfg)
        assert first["val"] > 4.0
        assert last["val"] < first["val"] - 0.7, (bitlinear, first, last)
