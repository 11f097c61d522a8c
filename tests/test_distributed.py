"""Several processes under torchrun (gloo, CPU): DDP and FSDP follow the 1-process run of the
same global batch; FSDP checkpoints resume; activation checkpointing changes no number."""

import os
import signal
import subprocess
import sys

import pytest
import torch

from common import build_model, load_checkpoint
from configs.table import saved_activations, training_memory
from tests.conftest import ROOT
from tools.plot import read_metrics
from train import checkpoint_activations

COMMON = ["--device=cpu", "--backend=gloo", "--n_layer=2", "--n_head=2", "--n_embd=32",
          "--block_size=32", "--batch_size=4", "--gradient_accumulation_steps=2",
          "--lr_decay_iters=20", "--warmup_iters=2", "--eval_interval=5", "--eval_iters=2",
          "--learning_rate=3e-3"]
ADAMW = "--optimizer=adamw"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def train(out, data_dir, *args, launcher=(sys.executable,)):
    # its own session, so a hung run's workers are killed with torchrun, not left behind
    proc = subprocess.Popen([*launcher, "train.py", *COMMON, f"--data_dir={data_dir}",
                             f"--out_dir={out}", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, err[-2000:]
    return [m for m in read_metrics(out) if "val_loss" in m]


@pytest.fixture(scope="module")
def one_process(data_dir, tmp_path_factory):
    """one_process(*flags) -> (out_dir, val metrics) of the 1-process run, trained once."""
    runs = {}

    def run(*flags):
        if flags not in runs:
            out = tmp_path_factory.mktemp("one")
            runs[flags] = out, train(out, data_dir, "--max_iters=20", *flags)
        return runs[flags]
    return run


def assert_same_run(a_dir, a, b_dir, b, tol=1e-4):
    assert [m["step"] for m in a] == [m["step"] for m in b] == [0, 5, 10, 15, 20]
    for x, y in zip(a, b, strict=True):
        assert abs(x["train_loss"] - y["train_loss"]) < tol and \
            abs(x["val_loss"] - y["val_loss"]) < tol, (x, y)
    one, two = (load_checkpoint(d / "ckpt.pt")["model"] for d in (a_dir, b_dir))
    assert one.keys() == two.keys()
    for k in one:
        torch.testing.assert_close(one[k], two[k], atol=tol, rtol=tol)


# The all-reduce sums in another order. A float model keeps those last bits; a ternary one
# turns some into whole rounding steps, which Muon's steps on this tiny model carry to ~1e-3 in
# 20 steps (AdamW's stay under 1e-4): Muon's run is checked on the float model.
@pytest.mark.parametrize("mode,flags", [("ddp", (ADAMW,)), ("ddp", ("--bitlinear=False",)),
                                        ("fsdp", (ADAMW,))], ids=["ddp", "ddp-muon", "fsdp"])
def test_two_processes_match_one(mode, flags, one_process, data_dir, tmp_path):
    one_dir, one = one_process(*flags)
    assert one[-1]["val_loss"] < one[0]["val_loss"] - 0.3  # it did learn
    two = train(tmp_path, data_dir, "--max_iters=20", f"--fsdp={mode == 'fsdp'}", *flags,
                launcher=TORCHRUN)
    assert_same_run(one_dir, one, tmp_path, two)


def test_fsdp_checkpoint_resumes_with_and_without_fsdp(one_process, data_dir, tmp_path):
    one_dir, _ = one_process(ADAMW)  # FSDP shards AdamW's state; Muon needs whole matrices
    train(tmp_path / "a", data_dir, "--max_iters=10", "--fsdp=True", ADAMW, launcher=TORCHRUN)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "ckpt.pt").write_bytes((tmp_path / "a" / "ckpt.pt").read_bytes())
    train(tmp_path / "a", data_dir, "--max_iters=20", "--fsdp=True", "--init_from=resume", ADAMW,
          launcher=TORCHRUN)
    # the same checkpoint, resumed by one process without FSDP (2x the accumulation)
    train(tmp_path / "b", data_dir, "--max_iters=20", "--init_from=resume", ADAMW,
          "--gradient_accumulation_steps=2")
    final = load_checkpoint(one_dir / "ckpt.pt")
    for run in ("a", "b"):
        ckpt = load_checkpoint(tmp_path / run / "ckpt.pt")
        assert ckpt["iter_num"] == 20
        assert abs(ckpt["val_loss"] - final["val_loss"]) < 1e-4, run
        for k, v in final["model"].items():
            torch.testing.assert_close(ckpt["model"][k], v, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ["gpt", "llama"])
def test_activation_checkpointing_changes_no_number(arch):
    args = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=65)
    plain, recomputed = build_model(arch, args), build_model(arch, args)
    recomputed.load_state_dict(plain.state_dict())
    checkpoint_activations(recomputed)
    idx = torch.randint(0, 65, (3, 16))
    losses = [m(idx, idx)[1] for m in (plain, recomputed)]
    for loss in losses:
        loss.backward()
    assert torch.equal(*losses)
    for (name, p), q in zip(plain.named_parameters(), recomputed.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad), name


def test_memory_estimates_for_sharding_and_recomputation():
    args = dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50304)
    plain = training_memory("gpt", args, 12)
    sharded = training_memory("gpt", args, 12, shards=8)
    recomputed = training_memory("gpt", args, 12, activation_checkpointing=True)
    n = 123.59e6 + 1024 * 768  # get_num_params() + position embeddings
    block = 12 * 768 * 768 + 2 * 768  # one block's weights, gathered whole in float32
    assert plain - sharded == pytest.approx(18 * n * 7 / 8 - 2 * 4 * block, rel=1e-3)
    with torch.device("meta"):
        _, per_block = saved_activations(build_model("gpt", args).bfloat16(), 12)
    assert len(per_block) == 12 and min(per_block) == max(per_block) > 0
    assert plain - recomputed > 0.75 * sum(per_block)  # most of the blocks' activations go
