"""The GPT model: shapes, parameter counts, the float switch, and KV-cache generation."""

import torch

from bitlinear.layer import BitLinear
from gpt.model import GPT, GPTConfig
from sample import generate
from train import DEFAULTS, configure_optimizers


def tiny(**kw):
    torch.manual_seed(0)
    cfg = dict(block_size=16, vocab_size=65, n_layer=2, n_head=2, n_embd=32)
    return GPT(GPTConfig(**{**cfg, **kw}))


def test_forward_shapes_and_initial_loss():
    model = tiny()
    idx, targets = torch.randint(0, 65, (2, 3, 16))
    logits, loss = model(idx, targets)
    assert logits.shape == (3, 16, 65)
    assert abs(loss.item() - torch.log(torch.tensor(65.0)).item()) < 0.1  # ~uniform at init
    logits, loss = model(idx)
    assert logits.shape == (3, 1, 65) and loss is None


def test_param_count_matches_formula():
    # per layer: 2 LayerNorm weights (2C) + attention (4C^2) + MLP (8C^2); plus wte, wpe, ln_f
    C, L, V, T = 32, 2, 65, 16
    expected = L * (12 * C * C + 2 * C) + V * C + T * C + C
    assert tiny().get_num_params(non_embedding=False) == expected
    assert tiny().get_num_params() == expected - T * C


def test_bitlinear_switch_builds_the_same_shapes():
    ternary, float_ = tiny(bitlinear=True), tiny(bitlinear=False)
    assert sum(isinstance(m, BitLinear) for m in ternary.modules()) == 2 * 4
    assert not any(isinstance(m, BitLinear) for m in float_.modules())
    shapes = lambda m: {k: v.shape for k, v in m.state_dict().items()}  # noqa: E731
    assert shapes(ternary) == shapes(float_)
    assert not isinstance(ternary.lm_head, BitLinear)  # the head stays full precision


def test_kv_cache_generation_equals_uncached():
    model = tiny().eval()
    idx = torch.randint(0, 65, (2, 5))
    for n in (8, 30):  # within the context, and past it (the window slides)
        cached = generate(model, idx, n, temperature=0)
        plain = generate(model, idx, n, temperature=0, use_cache=False)
        assert torch.equal(cached, plain)
        assert cached.shape == (2, 5 + n)


def test_kv_cache_logits_match_full_forward():
    from sample import KVCache
    model = tiny().eval()
    idx = torch.randint(0, 65, (1, 12))
    cache = KVCache(2, 16)
    model(idx[:, :8], cache=cache)
    cache.length = 8
    step_logits, _ = model(idx[:, 8:9], cache=cache)
    full_logits, _ = model(idx[:, :9])
    torch.testing.assert_close(step_logits, full_logits, atol=1e-5, rtol=1e-5)


def test_sampling_is_deterministic_for_a_generator_seed():
    model = tiny().eval()
    idx = torch.zeros(1, 1, dtype=torch.long)
    runs = [generate(model, idx, 20, temperature=1.0, top_k=10,
                     generator=torch.Generator().manual_seed(7)) for _ in range(2)]
    assert torch.equal(*runs)


def test_optimizer_groups():
    model = tiny()
    cfg = dict(DEFAULTS, weight_decay=0.1, bit_lr_scale=3.0, optimizer="adamw")
    [opt] = configure_optimizers(model, cfg, "cpu")
    bit, no_decay = opt.param_groups  # a tied GPT has no float 2-D weights outside embeddings
    assert (bit["weight_decay"], bit["lr_scale"]) == (0.1, 3.0)
    assert (no_decay["weight_decay"], no_decay["lr_scale"]) == (0.0, 1.0)
    assert len(bit["params"]) == 2 * 4  # the attention and MLP linears
    ids = {id(p) for p in no_decay["params"]}
    assert id(model.transformer.wte.weight) in ids and id(model.transformer.wpe.weight) in ids
    [float_opt] = configure_optimizers(tiny(bitlinear=False), cfg, "cpu")
    assert [g["lr_scale"] for g in float_opt.param_groups] == [1.0, 1.0]  # no BitLinear
    muon, adamw = configure_optimizers(model, dict(cfg, optimizer="muon"), "cpu")
    [bit] = muon.param_groups  # Muon takes exactly the blocks' linears, AdamW the rest
    assert (bit["weight_decay"], bit["lr_scale"], len(bit["params"])) == (0.1, 3.0, 2 * 4)
    assert {id(p) for p in adamw.param_groups[0]["params"]} == ids
