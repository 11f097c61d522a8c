"""DDP under torchrun (gloo, CPU): 2 processes follow the 1-process run of the same batch."""

import subprocess
import sys

import torch

from checkpoint import load_checkpoint
from metrics import read_metrics
from tests.conftest import ROOT


def test_two_processes_match_one(data_dir, tmp_path):
    common = [f"--data_dir={data_dir}", "--device=cpu", "--backend=gloo", "--n_layer=2",
              "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=4",
              "--gradient_accumulation_steps=2", "--max_iters=20", "--lr_decay_iters=20",
              "--warmup_iters=2", "--eval_interval=5", "--eval_iters=2", "--learning_rate=3e-3"]
    runs = {"one": [sys.executable, "train.py"],
            "two": [sys.executable, "-m", "torch.distributed.run", "--standalone",
                    "--nproc_per_node=2", "train.py"]}
    for name, cmd in runs.items():
        r = subprocess.run(cmd + common + [f"--out_dir={tmp_path / name}"], cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
    curves = {name: [m for m in read_metrics(tmp_path / name) if "val_loss" in m]
              for name in runs}
    assert [m["step"] for m in curves["one"]] == [m["step"] for m in curves["two"]] == \
        [0, 5, 10, 15, 20]
    for a, b in zip(curves["one"], curves["two"], strict=True):
        assert abs(a["train_loss"] - b["train_loss"]) < 1e-4, (a, b)
        assert abs(a["val_loss"] - b["val_loss"]) < 1e-4, (a, b)
    assert curves["one"][-1]["val_loss"] < curves["one"][0]["val_loss"] - 0.3  # it did learn
    one, two = (load_checkpoint(tmp_path / n / "ckpt.pt")["model"] for n in runs)
    for k in one:
        torch.testing.assert_close(one[k], two[k], atol=1e-4, rtol=1e-4)
