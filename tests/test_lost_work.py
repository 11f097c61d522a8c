"""Nothing lost: a run never replaces another run's work, a failed or interrupted write leaves the
previous file, and a resumed run's log holds each step once."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common import CheckpointError, ConfigError, load_checkpoint, parse_args
from tests.conftest import ROOT
from tools.plot import read_metrics
from train import DEFAULTS, claim, resolve, setup_processes, train


def test_a_new_run_does_not_replace_another_runs_checkpoint(tiny_cfg):
    train(dict(tiny_cfg, max_iters=10))
    before = Path(tiny_cfg["out_dir"], "ckpt.pt").read_bytes()
    with pytest.raises(ConfigError, match="holds another run's checkpoint.*--init_from=resume.*"
                                          "--overwrite=True"):
        train(dict(tiny_cfg, max_iters=10))
    assert Path(tiny_cfg["out_dir"], "ckpt.pt").read_bytes() == before
    assert [m["step"] for m in read_metrics(tiny_cfg["out_dir"]) if "val_loss" in m] == [0, 10]
    train(dict(tiny_cfg, max_iters=20, init_from="resume"))  # continuing it is fine
    train(dict(tiny_cfg, max_iters=5, overwrite=True))  # and so is saying so
    assert load_checkpoint(Path(tiny_cfg["out_dir"], "ckpt.pt"))["iter_num"] == 5


def test_a_second_run_into_a_busy_out_dir_is_refused(tiny_cfg):
    out = Path(tiny_cfg["out_dir"])
    with claim(out):
        with pytest.raises(ConfigError, match="is in use by another run"):
            train(dict(tiny_cfg, max_iters=2))
    assert not (out / "ckpt.pt").exists()
    # a killed holder leaves no stuck lock
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path;"
                               "from train import claim; lock = claim(Path(sys.argv[1]));"
                               "print('locked', flush=True); time.sleep(60)", str(out)],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(ConfigError, match="in use"):
        claim(out)
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    claim(out).close()


def test_temp_files_of_a_killed_save_are_cleaned_up(tiny_cfg):
    out = Path(tiny_cfg["out_dir"])
    out.mkdir(parents=True)
    (out / ".ckpt.pt.tmp12345").write_bytes(b"half a checkpoint")
    (out / "notes.txt").write_text("mine")
    train(dict(tiny_cfg, max_iters=2))
    assert not list(out.glob(".ckpt.pt.tmp*")) and (out / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("failure", [OSError(28, "No space left on device"),
                                     RuntimeError("[enforce fail at inline_container.cc:603] . "
                                                  "unexpected pos 512 vs 448")])
def test_a_full_disk_is_one_line_and_keeps_the_previous_checkpoint(tiny_cfg, monkeypatch,
                                                                    failure):
    train(dict(tiny_cfg, max_iters=10))
    out = Path(tiny_cfg["out_dir"])
    before = (out / "ckpt.pt").read_bytes()

    def full(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"part")  # what a failing write leaves
        raise failure
    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(CheckpointError, match="could not write .*ckpt.pt.*previous checkpoint "
                                              "there, if any, is intact"):
        train(dict(tiny_cfg, max_iters=20, init_from="resume"))
    assert (out / "ckpt.pt").read_bytes() == before
    assert not list(out.glob(".ckpt.pt.tmp*"))


def test_signals_during_a_save_do_not_interrupt_it(tiny_cfg, monkeypatch):
    import train as train_module
    real = train_module.save_checkpoint
    saves = []

    def save_under_fire(ckpt, path):
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while the checkpoint is written
        real(ckpt, path)
        saves.append(ckpt["iter_num"])
    monkeypatch.setattr(train_module, "save_checkpoint", save_under_fire)
    train(dict(tiny_cfg, max_iters=20))  # no KeyboardInterrupt
    assert saves == [10, 10]  # the evaluation's save, then the stop's save at the same step
    assert load_checkpoint(Path(tiny_cfg["out_dir"], "ckpt.pt"))["iter_num"] == 10


def test_a_resumed_log_holds_each_step_once_and_survives_a_torn_line(tiny_cfg):
    out = Path(tiny_cfg["out_dir"])
    train(dict(tiny_cfg, max_iters=10))
    with open(out / "metrics.jsonl", "a") as f:  # steps after the checkpoint, then a crash
        f.write(json.dumps({"step": 15, "loss": 2.0}) + "\n" + '{"step": 16, "lo')
    assert [m["step"] for m in read_metrics(out)][-1] == 15  # the torn line is left out
    train(dict(tiny_cfg, max_iters=20, init_from="resume"))
    records = read_metrics(out)
    evals = [m["step"] for m in records if "val_loss" in m]
    logs = [m["step"] for m in records if "loss" in m]
    assert evals == [0, 10, 20] and logs == [5, 10, 15, 20]
    (out / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    from common import UserError
    with pytest.raises(UserError, match="line 2, is not a JSON record"):
        read_metrics(out)


@pytest.mark.parametrize("text, message", [
    ('learning_rate = float("nan")', "learning_rate must be a finite number"),
    ("dropout = 1.5", r"dropout must be in \[0, 1\)"),
    ("max_iters = -5", "max_iters must be at least 0"),
    ("beta2 = 1.0", r"beta2 must be in \[0, 1\)"),
    ("min_lr = -1e-4", "min_lr must be at least 0"),
])
def test_out_of_range_values_are_one_line(tmp_path, text, message):
    (tmp_path / "c.py").write_text(text + "\n")
    with pytest.raises(ConfigError, match=message):
        resolve(parse_args(DEFAULTS, [str(tmp_path / "c.py"), "--device=cpu"]))


def test_a_diverged_run_without_a_checkpoint_says_so(tiny_cfg):
    from train import TrainingError, start
    run = start(tiny_cfg)
    with torch.no_grad():
        run.raw_model.lm_head.weight[0, 0] = float("nan")
    with pytest.raises(TrainingError, match="loss became nan at step 0; no checkpoint was written"):
        train(tiny_cfg, run)


def test_the_defaults_run_on_more_processes_than_micro_batches(monkeypatch, capsys):
    for k, v in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="2").items():
        monkeypatch.setenv(k, v)
    backends = []
    monkeypatch.setattr(torch.distributed, "init_process_group",
                        lambda backend: backends.append(backend))
    cfg = dict(DEFAULTS, device="cpu")  # backend 'auto'
    assert setup_processes(cfg) == (0, 2)
    assert backends == ["gloo"]  # nccl needs GPUs
    assert cfg["gradient_accumulation_steps"] == 1  # one micro-batch in each of the two
    assert "gradient_accumulation_steps=1 on 2 processes: one micro-batch each" in \
        capsys.readouterr().out


def test_an_export_replaces_only_what_an_export_wrote(tiny_cfg, tmp_path):
    from export import DEFAULTS as EXPORT
    from export import export
    train(dict(tiny_cfg, max_iters=2))
    out = Path(tiny_cfg["out_dir"])
    ckpt = (out / "ckpt.pt").read_bytes()
    cases = {str(out / "ckpt.pt"): "is the checkpoint being exported",
             str(tmp_path): "is a folder",
             str(out / "metrics.jsonl"): "exists and is not a file this export wrote"}
    for to, message in cases.items():
        with pytest.raises(ConfigError, match=message):
            export(dict(EXPORT, out_dir=str(out), to=to))
    assert (out / "ckpt.pt").read_bytes() == ckpt
    dst = export(dict(EXPORT, out_dir=str(out), to=str(tmp_path / "new" / "m.bitnet")))
    assert dst.is_file()  # a missing folder is made
    export(dict(EXPORT, out_dir=str(out), to=str(dst), packing="base3"))  # its own file: replaced
    assert not list(tmp_path.glob("new/.m.bitnet.tmp*"))


def test_ctrl_c_during_an_export_leaves_the_old_file_and_one_line(tiny_cfg, monkeypatch, capsys):
    import bitlinear.packed_file as packed_file
    from export import main
    train(dict(tiny_cfg, max_iters=2))
    out = Path(tiny_cfg["out_dir"])
    main([f"--out_dir={out}"])
    before = (out / "model.bitnet").read_bytes()
    capsys.readouterr()
    real = packed_file._tensors

    def interrupted(*args):
        yield from list(real(*args))[:3]
        raise KeyboardInterrupt
    monkeypatch.setattr(packed_file, "_tensors", interrupted)
    with pytest.raises(SystemExit) as e:
        main([f"--out_dir={out}", "--packing=base3"])
    assert e.value.code == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: interrupted (Ctrl-C); no file was left half-written")
    assert (out / "model.bitnet").read_bytes() == before and not list(out.glob(".model.bitnet*"))


def test_an_hf_export_replaces_only_a_folder_it_wrote(tiny_cfg, tmp_path):
    pytest.importorskip("safetensors", reason="pip install -r requirements-dev.txt")
    from export import DEFAULTS as EXPORT
    from export import export
    train(dict(tiny_cfg, max_iters=2))
    hf = dict(EXPORT, out_dir=tiny_cfg["out_dir"], format="hf")
    mine = tmp_path / "mine"  # a downloaded model with the user's notes and sources
    (mine / "src").mkdir(parents=True)
    for name in ("config.json", "model.safetensors", "notes.txt", "src/a.py"):
        (mine / name).write_text(name)
    with pytest.raises(ConfigError, match="is not an exported model folder .no "
                                          "bitgpt_export.json.: replacing it would delete"):
        export(dict(hf, to=str(mine)))
    assert sorted(str(p.relative_to(mine)) for p in mine.rglob("*")) == [
        "config.json", "model.safetensors", "notes.txt", "src", "src/a.py"]
    assert (mine / "model.safetensors").read_text() == "model.safetensors"
    dst = export(dict(hf, to=str(tmp_path / "hf")))
    export(dict(hf, to=str(dst)))  # its own folder: replaced
    (dst / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match=r"holds files the export did not write \(notes.txt\)"):
        export(dict(hf, to=str(dst)))
    assert (dst / "notes.txt").read_text() == "mine"


KILL = ("import os, signal, sys; from pathlib import Path; import export; "
        "cm = export.atomic_folder(Path(sys.argv[1])); tmp = cm.__enter__(); tmp.mkdir(); "
        "(tmp / 'f').write_text('new'); {patch}; cm.__exit__(None, None, None)")


@pytest.mark.parametrize("patch, left", [
    # killed after the swap, before the old folder is deleted
    ("export.remove = lambda p: os.kill(os.getpid(), signal.SIGKILL)", "new"),
    # where folders cannot be swapped in one step: killed between the two renames
    ("export.exchange = lambda a, b: False; real = Path.rename; "
     "Path.rename = lambda s, t: (real(s, t), os.kill(os.getpid(), signal.SIGKILL))", None),
])
def test_a_folder_swap_killed_halfway_leaves_the_old_or_the_new(tmp_path, patch, left):
    from export import atomic_folder
    dst = tmp_path / "hf"
    dst.mkdir()
    (dst / "f").write_text("old")
    r = subprocess.run([sys.executable, "-c", KILL.format(patch=patch), str(dst)], cwd=ROOT)
    assert r.returncode == -signal.SIGKILL
    if left:
        assert (dst / "f").read_text() == left
    # the next write to the same place cleans up, and puts back an old folder left aside
    with pytest.raises(RuntimeError), atomic_folder(dst):
        raise RuntimeError("a failed write")
    assert (dst / "f").read_text() == (left or "old") and os.listdir(tmp_path) == ["hf"]


def test_a_stray_line_in_the_log_keeps_the_records_after_it(tiny_cfg):
    out = Path(tiny_cfg["out_dir"])
    train(dict(tiny_cfg, max_iters=10))
    lines = (out / "metrics.jsonl").read_text().splitlines()
    (out / "metrics.jsonl").write_text("\n".join([lines[0], "a note", *lines[1:]]) + "\n")
    train(dict(tiny_cfg, max_iters=20, init_from="resume"))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in records if "val_loss" in m] == [0, 10, 20]
    assert [m["step"] for m in records if "loss" in m] == [5, 10, 15, 20]


def test_a_new_run_does_not_truncate_another_runs_log(tiny_cfg):
    out = Path(tiny_cfg["out_dir"])
    out.mkdir(parents=True)
    (out / "metrics.jsonl").write_text('{"step": 0, "val_loss": 4.2}\n')
    (out / "model.bitnet").write_bytes(b"BITNET")
    with pytest.raises(ConfigError, match="holds another run's metrics.jsonl .and no ckpt.pt to "
                                          "resume.; choose another --out_dir, or replace it "
                                          "with --overwrite=True"):
        train(dict(tiny_cfg, max_iters=2))
    assert (out / "metrics.jsonl").read_text() == '{"step": 0, "val_loss": 4.2}\n'
    train(dict(tiny_cfg, max_iters=2, overwrite=True))


def test_a_full_disk_during_an_export_or_a_prepare_is_one_line(tiny_cfg, tmp_path, monkeypatch):
    import bitlinear.packed_file as packed_file
    from data.common import BinFile, DataError, char_meta, write_splits
    from export import DEFAULTS as EXPORT
    from export import export
    train(dict(tiny_cfg, max_iters=2))

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(packed_file, "_tensors", full)
    with pytest.raises(ConfigError, match="could not write .*model.bitnet' .No space left on "
                                          "device.; what was there is intact"):
        export(dict(EXPORT, out_dir=tiny_cfg["out_dir"]))
    monkeypatch.setattr(BinFile, "write", full)
    with pytest.raises(DataError, match="preparing the dataset in .*ds failed .No space left on "
                                        "device.; the old one there, if any, is intact"):
        write_splits([0, 1], [1, 0], tmp_path / "ds", char_meta(["a", "b"]))
    assert not (tmp_path / "ds").exists()
