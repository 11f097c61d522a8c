"""The config ladder: every config builds at its stated size and memory; schedules; the table."""

import subprocess
import sys

import pytest
import torch

from common import ConfigError, build_model, parse_args
from configs import DEFAULTS, resolve
from configs.table import (
    config_facts,
    config_files,
    config_table,
    size,
    training_memory,
    weight_bytes,
)
from tests.conftest import ROOT
from train import (
    configure_optimizers,
    get_lr,
    get_weight_decay,
    next_batch,
    start,
    train_step,
)

CONFIGS = config_files()

# each config's parameter count and training memory (at its batch_size and dtype): the ladder's
# promise, checked against what the code builds
LADDER = {
    "gpt_50k": (51.5e3, 8.25e6, "float32"), "gpt_200k": (201e3, 17.6e6, "float32"),
    "gpt_800k": (0.80e6, 40.9e6, "float32"), "gpt_3m": (3.17e6, 106e6, "float32"),
    "gpt_10m": (10.65e6, 1.7e9, "bfloat16"), "train_shakespeare_char": (10.65e6, 1.7e9, "bfloat16"),
    "gpt2_124m": (124e6, 10e9, "bfloat16"), "gpt2_350m": (354e6, 21e9, "bfloat16"),
    "gpt2_774m": (772e6, 38.4e9, "bfloat16"), "gpt2_1.5b": (1.56e9, 66.9e9, "bfloat16"),
    "llama_50k": (54e3, 10.5e6, "float32"), "llama_1m": (0.87e6, 56.5e6, "float32"),
    "llama_3m": (3.25e6, 133e6, "float32"), "llama_bitnet_5m": (4.74e6, 239e6, "float32"),
    "llama_70m": (71.4e6, 12.9e9, "bfloat16"), "llama_700m": (834e6, 56.2e9, "bfloat16"),
    "llama_1.3b": (1.44e9, 54.4e9, "bfloat16"), "llama_3b": (3.54e9, 112e9, "bfloat16"),
}


def test_every_config_is_on_the_ladder():
    assert sorted(p.stem for p in CONFIGS) == sorted(LADDER)
    modules = {p.name for p in (ROOT / "configs").glob("*.py")} - {p.name for p in CONFIGS}
    assert modules == {"__init__.py", "table.py"}  # the folder's Python that is not a config


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_builds_at_its_size_and_memory(path):
    params, memory, dtype = LADDER[path.stem]
    cfg, args, n, _ = config_facts(path)
    with torch.device("meta"):  # no memory, even for 3B parameters
        assert build_model(cfg["arch"], args).get_num_params() == n
    assert abs(n - params) / n < 0.02, (n, params)
    need = training_memory(cfg["arch"], args, cfg["batch_size"], dtype, optimizer=cfg["optimizer"])
    assert abs(need - memory) / need < 0.02, (need / 1e9, memory / 1e9)


def test_the_ladder_spans_50k_to_over_1b_for_both_archs():
    sizes = {}
    for path in CONFIGS:
        cfg, _, n, _ = config_facts(path)
        sizes.setdefault(cfg["arch"], []).append(n)
    for arch in ("gpt", "llama"):
        assert 45e3 <= min(sizes[arch]) <= 60e3 and max(sizes[arch]) > 1e9, arch


@pytest.mark.parametrize("arch", ["gpt", "llama"])
def test_memory_estimate_counts_what_autograd_really_saves(arch):
    """The meta-device count equals the bytes a real float32 CPU step keeps for the backward."""
    args = dict(n_layer=2, n_head=4, n_embd=64, block_size=32, vocab_size=65)
    model = build_model(arch, args)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    idx = torch.randint(0, 65, (3, 32))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(idx, idx)
    n = sum(p.numel() for p in model.parameters())
    real = 16 * n + sum(saved.values()) + 4 * idx.numel() * 65
    assert training_memory(arch, args, 3, "float32") == pytest.approx(real, rel=1e-3)


@pytest.mark.parametrize("arch", ["gpt", "llama"])
def test_memory_estimate_counts_the_moments_a_muon_step_keeps(arch):
    """Muon holds one moment of the blocks' linear weights where AdamW holds two: the estimate
    drops by the bytes the optimizers really stop keeping."""
    args = dict(n_layer=2, n_head=4, n_embd=64, block_size=32, vocab_size=65)
    kept = {}
    for optimizer in ("adamw", "muon"):
        torch.manual_seed(0)
        model = build_model(arch, args)
        cfg = dict(resolve(parse_args(DEFAULTS, [])), optimizer=optimizer)
        optimizers = configure_optimizers(model, cfg, "cpu")
        idx = torch.randint(0, 65, (3, 32))
        model(idx, idx)[1].backward()
        for opt in optimizers:
            opt.step()
        kept[optimizer] = sum(t.nbytes for opt in optimizers for state in opt.state.values()
                              for t in state.values() if t.dim() > 0)
    estimate = {o: training_memory(arch, args, 3, "float32", optimizer=o) for o in kept}
    assert kept["adamw"] - kept["muon"] > 0
    assert estimate["adamw"] - estimate["muon"] == kept["adamw"] - kept["muon"]


@pytest.mark.parametrize("bitlinear", [True, False])
def test_weight_bytes_counts_ternary_weights_at_their_bits(bitlinear):
    """A GPT block holds 12 C^2 linear weights (qkv 3, proj 1, fc 4, proj 4): ternary at 2 or
    1.58 bits each, and the embeddings, norms and biases (or a float model's all) at 16."""
    L, C = 2, 32
    model = build_model("gpt", dict(n_layer=L, n_head=2, n_embd=C, block_size=16,
                                    vocab_size=65, bitlinear=bitlinear))
    n = sum(p.numel() for p in model.parameters())
    linear = 12 * L * C * C if bitlinear else 0
    for bits in (2, 1.58):
        assert weight_bytes(model, bits) == pytest.approx(linear * bits / 8 + 2 * (n - linear))


def test_list_configs_prints_every_config():
    r = subprocess.run([sys.executable, "train.py", "--list_configs"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    for path in CONFIGS:
        line = next(ln for ln in r.stdout.splitlines() if f"configs/{path.name} " in ln)
        cfg, args, n, _ = config_facts(path)
        dtype = LADDER[path.stem][2]
        memory = training_memory(cfg["arch"], args, cfg["batch_size"], dtype,
                                 optimizer=cfg["optimizer"])
        assert f" {cfg['arch']} " in line and f"{size(memory)} {dtype}" in line
    assert r.stdout.strip() == config_table()


def test_include_takes_another_files_keys(tmp_path):
    (tmp_path / "base.py").write_text("n_layer = 3\nn_head = 3\n")
    (tmp_path / "top.py").write_text("include('base.py')\nn_head = 1\n")
    cfg = parse_args(DEFAULTS, [str(tmp_path / "top.py")])
    assert (cfg["n_layer"], cfg["n_head"]) == (3, 1)
    (tmp_path / "bad.py").write_text("n_layrs = 3\n")
    (tmp_path / "top2.py").write_text("include('bad.py')\n")
    with pytest.raises(ConfigError, match="bad.py: unknown config key 'n_layrs'"):
        parse_args(DEFAULTS, [str(tmp_path / "top2.py")])


def test_keys_of_the_other_arch_are_refused():
    with pytest.raises(ConfigError, match="mlp: not a setting of arch 'gpt'"):
        resolve(dict(DEFAULTS, device="cpu", mlp="relu2"))
    with pytest.raises(ConfigError, match="bias: not a setting of arch 'llama'"):
        resolve(dict(DEFAULTS, device="cpu", arch="llama", bias=True))
    with pytest.raises(ConfigError, match="n_kv_head=3 must divide n_head=4"):
        resolve(dict(DEFAULTS, device="cpu", arch="llama", n_kv_head=3))
    with pytest.raises(ConfigError, match="lr_schedule 'linear' is not one of"):
        resolve(dict(DEFAULTS, device="cpu", lr_schedule="linear"))


def test_two_stage_schedules():
    cfg = dict(DEFAULTS, learning_rate=1.5e-3, min_lr=0.0, warmup_iters=0, lr_decay_iters=100,
               lr_schedule="two_stage", wd_schedule="two_stage", weight_decay=0.1)
    # the b1.58 training tips: 1.5e-3 -> 8e-4 over the first half, then 5e-4 -> 0
    assert get_lr(0, cfg) == pytest.approx(1.5e-3)
    assert get_lr(49, cfg) == pytest.approx(1.5e-3 - 0.7e-3 * 49 / 50)
    assert get_lr(50, cfg) == pytest.approx(5e-4) and get_lr(75, cfg) == pytest.approx(2.5e-4)
    assert get_lr(100, cfg) == pytest.approx(0.0)
    assert [get_weight_decay(i, cfg) for i in (0, 49, 50, 99)] == [0.1, 0.1, 0.0, 0.0]
    assert get_weight_decay(99, dict(cfg, wd_schedule="constant")) == 0.1


def test_weight_decay_switch_off_reaches_the_optimizer(tiny_cfg):
    trainer = start(dict(tiny_cfg, wd_schedule="two_stage", warmup_iters=0,
                         lr_decay_iters=4, max_iters=4))
    trainer.batch = next_batch(trainer)
    decays = []
    for _ in range(4):
        train_step(trainer)
        decays.append(sorted({g["weight_decay"] for opt in trainer.optimizers
                              for g in opt.param_groups}))
    assert decays == [[0.0, 0.1], [0.0, 0.1], [0.0], [0.0]]
