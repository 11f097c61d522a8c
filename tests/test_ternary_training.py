"""From float to ternary, and the levers of ternary training: the quantization warm-up,
distillation, Muon, warmup-stable-decay, no weight decay on latent weights."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from bitlinear.convert import distill_loss
from bitlinear.layer import BitLinear, activation_quant, set_quantization, weight_quant
from common import ConfigError, load_checkpoint
from gpt.model import GPT, GPTConfig
from train import (
    DEFAULTS,
    configure_optimizers,
    get_lr,
    next_batch,
    quantization_strength,
    resolve,
    start,
    train,
    train_step,
)


def twins(seed=0):
    """A tiny ternary GPT and its float twin with the same weights."""
    torch.manual_seed(seed)
    args = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=65)
    ternary = GPT(GPTConfig(**args))
    fp = GPT(GPTConfig(**args, bitlinear=False))
    fp.load_state_dict(ternary.state_dict())
    return ternary, fp


def test_blend_is_float_at_zero_bitlinear_at_one_and_linear_between():
    layer_cls = BitLinear
    torch.manual_seed(0)
    layer = layer_cls(24, 8, bias=True)
    x = torch.randn(2, 5, 24, requires_grad=True)
    exact = layer(x)
    set_quantization(layer, 0.0)
    assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
    set_quantization(layer, 0.25)
    w, xd = layer.weight.detach(), x.detach()
    w_b = w + 0.25 * (weight_quant(w) - w)
    x_b = xd + 0.25 * (activation_quant(xd) - xd)
    y = layer(x)
    torch.testing.assert_close(y, F.linear(x_b, w_b, layer.bias), rtol=0, atol=1e-6)
    y.sum().backward()  # straight through: the gradients of F.linear at the blended values
    torch.testing.assert_close(x.grad, torch.ones(2, 5, 8) @ w_b, rtol=0, atol=1e-5)
    torch.testing.assert_close(layer.weight.grad, torch.ones(8, 10) @ x_b.reshape(10, 24),
                               rtol=0, atol=1e-5)
    set_quantization(layer, 1.0)
    assert layer.lam is None and torch.equal(layer(x), exact)


def test_warmup_strength_follows_the_step():
    cfg = dict(bit_warmup_start=0, bit_warmup_iters=4)
    assert [quantization_strength(i, cfg) for i in range(6)] == [0, 0.25, 0.5, 0.75, 1, 1]
    cfg = dict(bit_warmup_start=3, bit_warmup_iters=2)
    assert [quantization_strength(i, cfg) for i in range(7)] == [0, 0, 0, 0, 0.5, 1, 1]
    assert quantization_strength(0, dict(bit_warmup_start=0, bit_warmup_iters=0)) == 1.0
    assert quantization_strength(1, dict(bit_warmup_start=2, bit_warmup_iters=0)) == 0.0


def test_a_model_at_zero_strength_is_its_float_twin():
    ternary, fp = twins()
    idx = torch.randint(0, 65, (3, 16))
    set_quantization(ternary, 0.0)
    assert torch.equal(ternary(idx, idx)[0], fp(idx, idx)[0])
    set_quantization(ternary, 1.0)
    assert not torch.equal(ternary(idx, idx)[0], fp(idx, idx)[0])
    fresh, _ = twins()
    assert torch.equal(ternary(idx, idx)[0], fresh(idx, idx)[0])  # exactly BitLinear again


def float_source(tiny_cfg, tmp_path, steps=10):
    """A float checkpoint trained for a few steps: the model to convert."""
    cfg = dict(tiny_cfg, bitlinear=False, out_dir=str(tmp_path / "float"), max_iters=steps)
    train(cfg)
    return Path(cfg["out_dir"]) / "ckpt.pt"


def test_converting_a_float_checkpoint_with_a_warmup(tiny_cfg, tmp_path, capsys):
    from tools.plot import read_metrics
    source = float_source(tiny_cfg, tmp_path)
    cfg = resolve(dict(tiny_cfg, init_from=str(source), out_dir=str(tmp_path / "conv"),
                       bit_warmup_iters=4, max_iters=8, eval_interval=4))
    run = start(cfg)
    assert "converting" in capsys.readouterr().out and run.args["bitlinear"]
    assert all(isinstance(m, BitLinear) for m in run.raw_model.transformer.h[0].mlp.children()
               if isinstance(m, torch.nn.Linear))
    train(cfg, run)
    evals = {m["step"]: m["val_loss"] for m in read_metrics(cfg["out_dir"]) if "val_loss" in m}
    assert evals[0] == load_checkpoint(source)["val_loss"]  # starts at the float model's loss
    assert all(m.lam is None for m in run.raw_model.modules() if isinstance(m, BitLinear))
    converted = load_checkpoint(Path(cfg["out_dir"]) / "ckpt.pt")
    assert converted["iter_num"] == 8 and converted["model_args"]["bitlinear"]


def test_resume_in_the_middle_of_the_warmup_is_exact(tiny_cfg, tmp_path):
    base = dict(tiny_cfg, bit_warmup_start=2, bit_warmup_iters=6, max_iters=12,
                lr_decay_iters=12, eval_interval=4)
    train(dict(base, out_dir=str(tmp_path / "a")))
    train(dict(base, out_dir=str(tmp_path / "b"), max_iters=5))
    train(dict(base, out_dir=str(tmp_path / "b"), init_from="resume"))
    a, b = (load_checkpoint(tmp_path / d / "ckpt.pt") for d in "ab")
    assert a["val_loss"] == b["val_loss"]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_distill_loss_is_the_kl_divergence():
    torch.manual_seed(0)
    s, t = torch.randn(2, 3, 7), torch.randn(2, 3, 7)
    assert distill_loss(t, t, 1.0).item() == pytest.approx(0.0, abs=1e-6)
    p = F.softmax(t / 2, -1)
    kl = (p * (p.log() - F.log_softmax(s / 2, -1))).sum(-1).mean() * 4
    assert distill_loss(s, t, 2.0).item() == pytest.approx(kl.item(), rel=1e-5)


def test_distillation_adds_the_teachers_term_and_leaves_the_teacher(tiny_cfg, tmp_path):
    source = float_source(tiny_cfg, tmp_path)
    teacher_state = load_checkpoint(source)["model"]
    plain = start(dict(tiny_cfg, out_dir=str(tmp_path / "plain")))
    distilled = start(dict(tiny_cfg, out_dir=str(tmp_path / "kd"), distill_from=str(source),
                           distill_weight=0.5, distill_temperature=2.0))
    batch = next_batch(plain)
    x, y, _ = batch
    with torch.no_grad():
        logits, ce = plain.model(x, y)
        want = ce + 0.5 * distill_loss(logits, distilled.teacher.model(x, y)[0], 2.0)
    distilled.batch = batch
    loss, _ = train_step(distilled)
    assert loss.item() == pytest.approx(want.item(), rel=1e-6)
    plain.batch = batch
    loss_plain, _ = train_step(plain)
    assert loss_plain.item() == pytest.approx(ce.item(), rel=1e-6)
    for k, v in distilled.teacher.model.state_dict().items():
        assert torch.equal(v, teacher_state[k]), k
    assert not any(p.requires_grad for p in distilled.teacher.model.parameters())
    train(dict(distilled.cfg, max_iters=12), distilled)  # and the loop runs with it


def test_a_teacher_of_another_vocabulary_is_one_line(tiny_cfg, tmp_path):
    source = float_source(tiny_cfg, tmp_path, steps=1)
    for vocab in (70, 60):
        ckpt = load_checkpoint(source)
        ckpt["model_args"]["vocab_size"] = vocab
        ckpt["model"]["lm_head.weight"] = torch.zeros(vocab, 32)
        ckpt["model"]["transformer.wte.weight"] = ckpt["model"]["lm_head.weight"]
        torch.save(ckpt, tmp_path / f"v{vocab}.pt")
    with pytest.raises(ConfigError, match="teacher .* predicts 70 tokens, the student 65"):
        start(dict(tiny_cfg, out_dir=str(tmp_path / "kd"), distill_from=str(tmp_path / "v70.pt")))
    # a student whose vocabulary is the teacher's padded (GPT-2's 50257 in 50304) learns the
    # teacher's tokens: the term reads the student's first 60 logits
    run = start(dict(tiny_cfg, out_dir=str(tmp_path / "kd"), distill_from=str(tmp_path / "v60.pt"),
                     distill_weight=1.0))
    x, y, state = next_batch(run)
    x, y = x % 60, y % 60  # ids the teacher knows, as GPT-2 data holds only GPT-2's ids
    with torch.no_grad():
        logits, ce = run.model(x, y)
        want = ce + distill_loss(logits[..., :60], torch.zeros(*logits.shape[:-1], 60), 1.0)
    run.batch = (x, y, state)
    assert train_step(run)[0].item() == pytest.approx(want.item(), rel=1e-6)


@pytest.mark.parametrize("bitlinear", [True, False])
def test_muon_takes_the_blocks_linear_weights(bitlinear):
    ternary, fp = twins()
    model = ternary if bitlinear else fp
    muon, adamw = configure_optimizers(model, dict(DEFAULTS, optimizer="muon"), "cpu")
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
    linears = {id(m.weight) for b in model.transformer.h for m in b.modules()
               if isinstance(m, torch.nn.Linear)}
    assert {id(p) for g in muon.param_groups for p in g["params"]} == linears
    assert len(linears) == 8 and not any(id(p) in linears for g in adamw.param_groups
                                         for p in g["params"])
    scales = [g["lr_scale"] for g in muon.param_groups]
    assert scales == ([DEFAULTS["bit_lr_scale"]] if bitlinear else [1.0])


def test_float32_muon_is_torchs_update(tiny_cfg):
    """The CPU Muon's step is torch.optim.Muon's: exactly so with the iteration in bfloat16, to
    bfloat16's precision in float32 (and float64's to float32's). It moves every BitLinear latent
    weight, and its state resumes torch's."""
    from bitlinear.muon import Muon
    run = start(tiny_cfg)
    x, y, _ = next_batch(run)
    run.raw_model(x, y)[1].backward()
    weights = [m.weight for m in run.raw_model.modules() if isinstance(m, BitLinear)]
    before = [w.detach().clone() for w in weights]
    kw = dict(lr=1e-2, momentum=0.95, adjust_lr_fn="match_rms_adamw", weight_decay=0.1)
    steps = {}
    for name, make in (("torch", lambda g: torch.optim.Muon(g, **kw)),
                       ("bf16", lambda g: Muon(g, ns_dtype=torch.bfloat16, **kw)),
                       ("fp32", lambda g: Muon(g, **kw)),
                       ("fp64", lambda g: Muon(g, ns_dtype=torch.float64, **kw))):
        for w, b in zip(weights, before, strict=True):
            w.data.copy_(b)
        opt = make([{"params": weights}])
        opt.step()
        opt.step()  # the second step reads the momentum buffer
        steps[name] = [w.detach() - b for w, b in zip(weights, before, strict=True)]
        torch.optim.Muon([{"params": weights}], **kw).load_state_dict(opt.state_dict())
    for a, b, c, d in zip(*(steps[k] for k in ("torch", "bf16", "fp32", "fp64")), strict=True):
        assert torch.equal(a, b) and c.abs().min() > 0  # every latent weight moved
        assert (c - a).norm() < 0.1 * a.norm() and (c - d).norm() < 1e-4 * d.norm()
    assert isinstance(configure_optimizers(run.raw_model, dict(DEFAULTS, optimizer="muon"),
                                           "cpu")[0], Muon)


def test_no_weight_decay_and_a_long_warm_down_reach_muon(tiny_cfg):
    run = start(dict(tiny_cfg, optimizer="muon", weight_decay=0.0, lr_schedule="wsd",
                     wsd_decay=0.8))
    run.batch = next_batch(run)
    train_step(run)
    assert all(g["weight_decay"] == 0.0 for opt in run.optimizers for g in opt.param_groups)
    cfg = dict(run.cfg, max_iters=100, lr_decay_iters=100, warmup_iters=0)
    assert get_lr(19, cfg) == cfg["learning_rate"] > get_lr(21, cfg)  # decaying from 20% on


def test_muon_trains_and_resumes_exactly(tiny_cfg, tmp_path):
    base = dict(tiny_cfg, optimizer="muon", max_iters=12, lr_decay_iters=12, eval_interval=4)
    first = train(dict(base, out_dir=str(tmp_path / "a"), max_iters=0))
    last = train(dict(base, out_dir=str(tmp_path / "a"), overwrite=True))
    assert last["val"] < first["val"] - 0.1
    train(dict(base, out_dir=str(tmp_path / "b"), max_iters=6))
    train(dict(base, out_dir=str(tmp_path / "b"), init_from="resume"))
    a, b = (load_checkpoint(tmp_path / d / "ckpt.pt") for d in "ab")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_warmup_stable_decay_schedule():
    cfg = dict(decay_lr=True, learning_rate=1e-3, min_lr=1e-4, warmup_iters=10,
               lr_decay_iters=110, lr_schedule="wsd", wsd_decay=0.2)
    assert get_lr(10, cfg) == get_lr(60, cfg) == 1e-3  # stable to 80% of the decay span
    assert get_lr(90, cfg) == pytest.approx(1e-3) and get_lr(91, cfg) < 1e-3
    assert get_lr(100, cfg) == pytest.approx(5.5e-4)  # halfway down the linear decay
    assert get_lr(110, cfg) == pytest.approx(1e-4) and get_lr(200, cfg) == pytest.approx(1e-4)


def test_no_weight_decay_on_latent_weights_reaches_the_optimizer(tiny_cfg):
    run = start(dict(tiny_cfg, bit_decay=False, wd_schedule="two_stage"))
    bit = {id(m.weight) for m in run.raw_model.modules() if isinstance(m, BitLinear)}
    run.batch = next_batch(run)
    train_step(run)
    for g in run.optimizers[0].param_groups:
        if any(id(p) in bit for p in g["params"]):
            assert g["weight_decay"] == 0.0 and not g["decay"]


def test_bad_settings_are_one_line(tiny_cfg):
    for key, value, match in (("optimizer", "sgd", "optimizer 'sgd' is not one of"),
                              ("lr_schedule", "linear", "lr_schedule 'linear'"),
                              ("wsd_decay", 0.0, "wsd_decay must be in"),
                              ("fsdp", True, "fsdp=True holds shards of them: add "
                                             "--optimizer=adamw"),
                              ("bit_warmup_iters", -1, "bit_warmup_iters must be at least 0"),
                              ("distill_temperature", 0.0, "distill_temperature must be positive"),
                              ("bit_warmup_iters", tiny_cfg["max_iters"] + 1,
                               "the quantization warm-up ends at step .*, after max_iters")):
        with pytest.raises(ConfigError, match=match):
            resolve(dict(tiny_cfg, **{key: value}))
    resolve(dict(tiny_cfg, bit_warmup_iters=tiny_cfg["max_iters"] + 1, bitlinear=False))


def test_group_scales_reach_the_layers(tiny_cfg):
    """bit_group=g gives each g consecutive inputs of a row their own absmean scale, in every
    BitLinear of both models; a width it does not divide is one line."""
    for arch in ("gpt", "llama"):
        run = start(dict(tiny_cfg, arch=arch, bit_group=16))
        layers = [m for m in run.raw_model.modules() if isinstance(m, BitLinear)]
        assert layers and all(m.group == 16 for m in layers)
        w = layers[0].weight.detach()
        blocks = w.view(w.size(0), -1, 16)
        want = (blocks * (1 / blocks.abs().mean(-1, keepdim=True))).round().clamp(-1, 1)
        want = (want * blocks.abs().mean(-1, keepdim=True)).view_as(w)
        assert torch.allclose(layers[0].quantized_weight(), want, atol=1e-7)
        assert not torch.allclose(layers[0].quantized_weight(), weight_quant(w))
    with pytest.raises(ConfigError, match="bit_group=24 does not divide in_features=32"):
        start(dict(tiny_cfg, bit_group=24))


def test_group_scales_are_refused_by_the_exports(tiny_cfg):
    from bitlinear.inference import to_integer
    from export import main as export_main
    train(dict(tiny_cfg, bit_group=16, max_iters=2, eval_interval=2))
    for fmt in ("packed", "hf", "gguf"):
        with pytest.raises(SystemExit, match="bit_group=16.*train with bit_group=0"):
            export_main([f"--out_dir={tiny_cfg['out_dir']}", f"--format={fmt}"])
    with pytest.raises(ValueError, match="group of 16 weights has no integer form"):
        to_integer(start(dict(tiny_cfg, bit_group=16, init_from="resume")).raw_model)
