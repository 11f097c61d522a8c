"""The training loop on real shakespeare_char data: loss falls, checkpoints resume exactly."""

import math
import sys
from pathlib import Path

import pytest
import torch

from common import CheckpointError, load_checkpoint
from tools.plot import read_metrics
from train import get_lr, start, train


def test_loss_falls_on_real_data(tiny_cfg):
    for bitlinear in (True, False):
        cfg = dict(tiny_cfg, bitlinear=bitlinear, max_iters=50, lr_decay_iters=50,
                   eval_interval=50, eval_iters=4, learning_rate=2e-3, overwrite=True)
        first = train(dict(cfg, max_iters=0))
        last = train(cfg)
        assert first["val"] > 4.0  # ~ln(65) at init
        assert last["val"] < first["val"] - 0.7, (bitlinear, first, last)


def test_checkpoint_contents(tiny_cfg):
    train(tiny_cfg)
    ckpt = load_checkpoint(f"{tiny_cfg['out_dir']}/ckpt.pt", arch="gpt")
    assert ckpt["iter_num"] == 20 and ckpt["arch"] == "gpt"
    assert ckpt["model_args"]["n_embd"] == 32 and ckpt["model_args"]["vocab_size"] == 65
    assert ckpt["meta"]["itos"][0] == "\n" and ckpt["config"]["batch_size"] == 8
    assert not any(k.startswith("_orig_mod.") for k in ckpt["model"])
    assert "state" in ckpt["optimizer"]
    with pytest.raises(CheckpointError, match="holds a 'gpt' model, not 'llama'"):
        load_checkpoint(f"{tiny_cfg['out_dir']}/ckpt.pt", arch="llama")
    records = read_metrics(tiny_cfg["out_dir"])
    evals = [m for m in records if "val_loss" in m]
    assert [m["step"] for m in evals] == [0, 10, 20]
    assert evals[-1]["val_bpb"] == evals[-1]["val_loss"] / math.log(2)  # ASCII: 1 byte a token
    assert 0 < evals[-1]["time"] <= ckpt["elapsed"]  # training seconds, summed over resumes
    logs = [m for m in records if "loss" in m]  # every log_interval=5 steps
    assert [m["step"] for m in logs] == [5, 10, 15, 20]
    assert all(m["tokens"] == m["step"] * 8 * 32 and m["tokens_per_sec"] > 0 for m in logs)


def test_resume_continues_exactly(tiny_cfg, tmp_path):
    straight = dict(tiny_cfg, out_dir=str(tmp_path / "a"), max_iters=30, lr_decay_iters=30)
    train(straight)
    # stops at step 23, as if interrupted between evaluations (every 10) and logs (every 5)
    split = dict(straight, out_dir=str(tmp_path / "b"), max_iters=23)
    train(split)
    cfg = dict(split, max_iters=30, init_from="resume")
    resumed = start(cfg)
    assert resumed.iter_num == 23
    train(cfg, resumed)
    a = load_checkpoint(tmp_path / "a" / "ckpt.pt")
    b = load_checkpoint(tmp_path / "b" / "ckpt.pt")
    assert a["iter_num"] == b["iter_num"] == 30
    assert a["val_loss"] == b["val_loss"]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k  # bit for bit on CPU


def test_lr_schedule():
    cfg = dict(decay_lr=True, learning_rate=1e-3, min_lr=1e-4, warmup_iters=10,
               lr_decay_iters=110, lr_schedule="cosine")
    assert get_lr(0, cfg) == pytest.approx(1e-3 / 11)
    assert get_lr(10, cfg) == pytest.approx(1e-3)
    assert get_lr(60, cfg) == pytest.approx(5.5e-4)  # halfway down the cosine
    assert get_lr(110, cfg) == pytest.approx(1e-4) and get_lr(500, cfg) == 1e-4
    assert get_lr(5, dict(cfg, decay_lr=False)) == 1e-3


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny_cfg):
    from train import TrainingError
    train(dict(tiny_cfg, max_iters=10))
    cfg = dict(tiny_cfg, init_from="resume", always_save_checkpoint=True)
    run = start(cfg)
    with torch.no_grad():
        run.raw_model.lm_head.weight[0, 0] = float("nan")  # inject a divergence
    with pytest.raises(TrainingError, match="loss became nan at step 1[05].*lower learning_rate"):
        train(cfg, run)
    ckpt = load_checkpoint(f"{tiny_cfg['out_dir']}/ckpt.pt")
    assert ckpt["iter_num"] == 10
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_bad_data_and_out_dir_fail_before_training(tiny_cfg, tmp_path):
    from common import ConfigError
    short = tmp_path / "d" / "short"
    short.mkdir(parents=True)
    for split in ("train", "val"):
        (short / f"{split}.bin").write_bytes(b"\0\0" * 10)
    with pytest.raises(ConfigError, match="has 10 tokens, too few for block_size=32"):
        start(dict(tiny_cfg, data_dir=str(tmp_path / "d"), dataset="short"))
    with pytest.raises(ConfigError, match="no dataset 'nothing'"):
        start(dict(tiny_cfg, dataset="nothing"))
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="not writable"):
        train(dict(tiny_cfg, out_dir=str(blocker / "out")))


def test_resume_on_a_dataset_with_another_vocabulary(tiny_cfg, tmp_path):
    import pickle

    from common import ConfigError
    train(dict(tiny_cfg, max_iters=10))
    other = tmp_path / "d" / "other"
    other.mkdir(parents=True)
    for split in ("train", "val"):
        (other / f"{split}.bin").write_bytes(b"\0\0" * 100)
    (other / "meta.pkl").write_bytes(pickle.dumps({"vocab_size": 70}))
    with pytest.raises(ConfigError, match=r"vocabulary \(65\) is not dataset 'other''s \(70\)"):
        start(dict(tiny_cfg, data_dir=str(tmp_path / "d"), dataset="other", init_from="resume"))


def test_fine_tuning_starts_a_new_run_from_trained_weights(tiny_cfg, tmp_path):
    from common import ConfigError
    from train import resolve
    train(dict(tiny_cfg, max_iters=10))
    source = Path(tiny_cfg["out_dir"]) / "ckpt.pt"
    trained = load_checkpoint(source)
    tune = dict(tiny_cfg, out_dir=str(tmp_path / "tuned"), init_from=str(source), n_embd=64,
                max_iters=12, lr_decay_iters=12, dropout=0.1)
    cfg = resolve(dict(tune))
    trainer = start(cfg)
    assert trainer.iter_num == 0 and trainer.args["n_embd"] == 32  # the shape is the source's
    assert trainer.args["dropout"] == 0.1  # but dropout is this run's
    for k, v in trained["model"].items():
        assert torch.equal(trainer.raw_model.state_dict()[k], v), k
    assert all(not s for s in trainer.optimizers[0].state.values())  # a fresh AdamW
    train(cfg, trainer)
    tuned = load_checkpoint(tmp_path / "tuned" / "ckpt.pt")
    assert tuned["iter_num"] == 12 and tuned["val_loss"] < trained["val_loss"]
    assert load_checkpoint(source)["iter_num"] == 10  # the source is left as it was
    with pytest.raises(ConfigError, match="this run's own checkpoint.*--init_from=resume"):
        resolve(dict(tiny_cfg, init_from=str(source)))
    with pytest.raises(CheckpointError, match="holds a 'gpt' model, not 'llama'"):
        start(resolve(dict(tune, arch="llama", n_embd=32)))


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_signal_saves_and_exits_cleanly(tiny_cfg, sig):
    import signal
    import subprocess
    import sys

    from tests.conftest import ROOT
    args = [f"--{k}={tiny_cfg[k]}" for k in ("out_dir", "data_dir", "n_layer", "n_head", "n_embd",
                                             "block_size", "batch_size", "eval_iters")]
    proc = subprocess.Popen([sys.executable, "-u", "train.py", *args, "--device=cpu",
                             "--max_iters=100000", "--eval_interval=5"], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    for line in proc.stdout:
        if line.startswith("step 5:"):
            break
    proc.send_signal(getattr(signal, sig))
    out = proc.stdout.read()
    assert proc.wait(timeout=60) == 0
    assert f"{sig}: saved" in out and "--init_from=resume" in out
    step = load_checkpoint(f"{tiny_cfg['out_dir']}/ckpt.pt")["iter_num"]
    assert 5 <= step < 100000
    resumed = start(dict(tiny_cfg, init_from="resume", max_iters=step + 1))
    assert resumed.iter_num == step


def test_a_signal_cuts_an_evaluation_short(tiny_cfg):
    """SIGTERM during a (here endless) evaluation saves and exits at once: schedulers give a
    stopping job seconds, not the length of an evaluation."""
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import ROOT
    args = [f"--{k}={tiny_cfg[k]}" for k in ("out_dir", "data_dir", "n_layer", "n_head", "n_embd",
                                             "block_size", "batch_size")]
    proc = subprocess.Popen([sys.executable, "-u", "train.py", *args, "--device=cpu",
                             "--eval_iters=100000000"], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert "parameters" in proc.stdout.readline()  # printed just before the loop
        time.sleep(1.0)  # into the step-0 evaluation, which would take hours
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
    out = proc.stdout.read()
    assert "SIGTERM: saved" in out and "final val loss not evaluated" in out
    assert load_checkpoint(f"{tiny_cfg['out_dir']}/ckpt.pt")["iter_num"] == 0


def test_max_time_ends_cleanly_with_a_checkpoint(tiny_cfg):
    # a one-batch evaluation: the budget must not go to the step-0 evaluation on a busy machine
    train(dict(tiny_cfg, max_iters=10**6, max_time=2.0, eval_iters=1))
    step = load_checkpoint(f"{tiny_cfg['out_dir']}/ckpt.pt")["iter_num"]
    assert 0 < step < 10**6


def test_sigkill_at_any_moment_leaves_a_loadable_checkpoint(tiny_cfg):
    """Kill -9 a run that saves every step, at several moments, resuming each time."""
    import subprocess
    import sys
    import time

    from tests.conftest import ROOT
    args = [f"--{k}={tiny_cfg[k]}" for k in ("out_dir", "data_dir", "n_layer", "n_head", "n_embd",
                                             "block_size", "batch_size", "eval_iters")]
    cmd = [sys.executable, "train.py", *args, "--device=cpu", "--max_iters=100000",
           "--eval_interval=1"]  # a checkpoint write at every step
    ckpt_path = Path(tiny_cfg["out_dir"]) / "ckpt.pt"
    steps = [0]
    for i, delay in enumerate((0.0, 0.05, 0.13)):
        proc = subprocess.Popen(cmd + (["--init_from=resume"] if i else []), cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 60
        while time.time() < deadline:  # wait until this run has saved a step of its own
            mtime = ckpt_path.stat().st_mtime if ckpt_path.exists() else 0
            if mtime and load_checkpoint(ckpt_path)["iter_num"] > steps[-1] + 1:
                break
            time.sleep(0.02)
        time.sleep(delay)  # then kill it among its saves
        proc.kill()
        proc.wait()
        steps.append(load_checkpoint(ckpt_path)["iter_num"])  # loadable, whatever the moment
    assert steps == sorted(steps) and steps[-1] > 3  # each run resumed where the last one died
    assert start(dict(tiny_cfg, init_from="resume")).iter_num == steps[-1]


def test_wandb_gets_the_same_records(tiny_cfg, monkeypatch):
    import types
    calls = []
    fake = types.SimpleNamespace(
        init=lambda **kw: calls.append(("init", kw)) or fake,
        log=lambda record, step: calls.append(("log", step, record)),
        finish=lambda: calls.append(("finish",)))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    train(dict(tiny_cfg, wandb_log=True, wandb_project="p", wandb_run_name="r"))
    assert calls[0][0] == "init" and calls[0][1]["project"] == "p" and calls[0][1]["name"] == "r"
    assert calls[-1] == ("finish",)
    logged = [c[2] for c in calls if c[0] == "log"]
    assert logged == read_metrics(tiny_cfg["out_dir"])  # the JSONL and wandb agree


def test_wandb_missing_is_one_clear_line(tiny_cfg, monkeypatch):
    from common import ConfigError
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    with pytest.raises(ConfigError, match="needs the 'wandb' package: pip install wandb"):
        train(dict(tiny_cfg, wandb_log=True))


def test_mfu_is_logged_against_the_device_peak(tiny_cfg, monkeypatch):
    import train as train_module
    monkeypatch.setattr(train_module, "peak_flops", lambda device: (1e12, "test"))
    trainer = start(tiny_cfg)
    train(tiny_cfg, trainer)
    logs = [m for m in read_metrics(tiny_cfg["out_dir"]) if "loss" in m]
    per_token = trainer.raw_model.flops_per_token()
    for m in logs:
        assert m["mfu"] == pytest.approx(per_token * m["tokens_per_sec"] / 1e12)
