"""The experiment tools: tools/sweep.py trains, tabulates, plots, skips and resumes a tiny grid;
tools/plot.py and tools/weight_stats.py."""

import json
import sys

import pytest
import torch

from common import ConfigError, build_model, load_checkpoint, save_checkpoint
from tools import plot, sweep, weight_stats
from tools.plot import read_metrics

TINY = ["--n_layer=1", "--n_embd=16", "--n_head=2", "--block_size=16", "--batch_size=4",
        "--max_iters=6", "--lr_decay_iters=6", "--warmup_iters=1", "--eval_interval=3",
        "--eval_iters=2", "--log_interval=3", "--device=cpu"]


def test_sweep_trains_the_grid_then_skips_it(data_dir, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    root = tmp_path / "sw"
    argv = ["--configs=gpt_50k,llama_50k", f"--sweep_dir={root}", f"--data_dir={data_dir}",
            *TINY]
    results = sweep.main(argv)
    assert set(results) == {"gpt_50k", "llama_50k"}
    for config, runs in results.items():
        assert set(runs) == {"ternary", "float"}
        for name, r in runs.items():
            evals = [m for m in read_metrics(root / f"{config}-{name}") if "val_loss" in m]
            assert r["val_loss"] == evals[-1]["val_loss"] and r["step"] == 6
            assert r["tokens"] == 6 * 4 * 16 and r["wall_time"] > 0
    table = (root / "results.md").read_text()
    gap = results["gpt_50k"]["ternary"]["val_loss"] - results["gpt_50k"]["float"]["val_loss"]
    params = results["gpt_50k"]["ternary"]["params"]
    assert params < 5000  # the command line's --n_embd=16 overrides the config's 32
    assert f"| gpt_50k | {params / 1e6:.3f}M |" in table and f"{gap:+.4f}" in table
    ternary, full = (results["gpt_50k"][v]["weight_bytes"] for v in ("ternary", "float"))
    assert 2 < full / ternary < 8  # 16 against 2 bits, less the 16-bit embeddings and norms
    assert f"| {ternary / 1e6:.3g} MB | {full / 1e6:.3g} MB |" in table
    assert (root / "curves.png").stat().st_size > 10_000 and (root / "sizes.png").exists()

    def no_training(*args, **kwargs):  # a second run of the same command must not train again
        raise AssertionError("trained again")
    monkeypatch.setattr(sweep, "start", no_training)
    monkeypatch.setattr(sweep, "train", no_training)
    assert sweep.main(argv) == results


def test_an_interrupted_run_resumes(data_dir, tmp_path):
    pytest.importorskip("matplotlib")
    root = tmp_path / "sw"
    argv = ["--configs=gpt_50k", f"--sweep_dir={root}", f"--data_dir={data_dir}",
            "--variants={'ternary': ''}", *TINY]
    assert sweep.main([*argv, "--max_time=1e-9"]) is None  # stops after its first evaluation
    assert not (root / "gpt_50k-ternary" / "result.json").exists()
    result = sweep.main(argv)["gpt_50k"]["ternary"]
    assert result["step"] == 6


def test_a_variant_can_start_from_another_runs_weights(data_dir, tmp_path):
    pytest.importorskip("matplotlib")
    root = tmp_path / "sw"
    base = ["--configs=gpt_50k", f"--sweep_dir={root}", f"--data_dir={data_dir}", *TINY]
    sweep.main([*base, "--variants={'float': '--bitlinear=False'}"])
    source = root / "gpt_50k-float" / "ckpt.pt"
    sweep.main([*base, f"--variants={{'converted': '--init_from={source} --bit_warmup_iters=3'}}"])
    ckpt = load_checkpoint(root / "gpt_50k-converted" / "ckpt.pt")
    assert ckpt["config"]["init_from"] == str(source) and ckpt["model_args"]["bitlinear"]
    evals = [m for m in read_metrics(root / "gpt_50k-converted") if "val_loss" in m]
    assert evals[0]["val_loss"] == load_checkpoint(source)["val_loss"]  # float at strength 0


@pytest.mark.parametrize("argv, message", [
    (["--configs=gpt_5k"], "no config 'configs/gpt_5k.py'"),
    (["--variants=[1, 2]"], "variants must be a dict"),
    (["--n_layr=2"], "unknown config key 'n_layr'"),
])
def test_sweep_errors_are_one_line(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        sweep.main([f"--sweep_dir={tmp_path}", *argv])
    assert message in str(e.value)


def test_plot_errors(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="no metrics.jsonl in"):
        plot.plot_curves([tmp_path], tmp_path / "x.png")
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ConfigError, match="pip install matplotlib"):
        plot.plot_curves([tmp_path], tmp_path / "x.png")


def test_a_continued_run_is_drawn_later(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    run = tmp_path / "converted"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps(
        {"step": s, "tokens": 768 * s, "val_loss": 2.0, "train_loss": 2.0, "time": s}) + "\n"
        for s in (0, 10)))
    drawn = []
    monkeypatch.setattr(plot, "save", lambda fig, out: drawn.extend(
        list(line.get_xdata()) for line in fig.axes[0].lines))
    plot.plot_curves([f"{run}@2000", run], tmp_path / "x.png", x="tokens")
    assert drawn == [[768 * 2000, 768 * 2010], [0, 768 * 10]]
    with pytest.raises(ConfigError, match="shifts by steps"):
        plot.plot_curves([f"{run}@2000"], tmp_path / "x.png", x="time")
    with pytest.raises(ConfigError, match="after @ comes a number"):
        plot.plot_curves([f"{run}@x"], tmp_path / "x.png")


def test_weight_stats_counts_each_ternary_value(tmp_path):
    args = dict(n_layer=1, n_head=2, n_embd=12, block_size=8, vocab_size=65)
    model = build_model("llama", args)  # every matrix's size divides by 6
    with torch.no_grad():  # mean|W| = 7/6: 3, -3, 0.1, 0.1, 0.4, 0.4 -> 1, -1, 0, 0, 0, 0
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.tensor([3.0, -3.0, 0.1, 0.1, 0.4, 0.4]).repeat(p.numel())
                        [:p.numel()].view_as(p))
    save_checkpoint({"arch": "llama", "model_args": args, "model": model.state_dict()},
                    tmp_path / "ckpt.pt")
    rows = weight_stats.main([f"--ckpt={tmp_path / 'ckpt.pt'}", f"--plot={tmp_path / 'w.png'}"])
    assert len(rows) == 7 and rows[0][0] == "layers.0.attention.wq"
    for name, neg, zero, pos, scale in rows:
        assert (neg, zero, pos) == pytest.approx((1 / 6, 4 / 6, 1 / 6)), name
        assert scale == pytest.approx(6 / 7, rel=0.01)
    assert (tmp_path / "w.png").stat().st_size > 5000
