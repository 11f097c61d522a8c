"""bench.py on a tiny model: the fields it prints and returns are consistent."""

import pytest
import torch

import bench
from common import build_model, model_args, peak_flops


def tiny(tiny_cfg, **kw):
    return {**tiny_cfg, "compare": False, "bench_steps": 4, "bench_warmup": 1,
            "bench_rounds": 2, "peak_flops": 0.0, "profile": 0, **kw}


def test_compare_reports_both_models_and_their_ratio(tiny_cfg, capsys):
    r = bench.bench(tiny(tiny_cfg, compare=True))
    out = capsys.readouterr().out
    for name in ("ternary", "float"):
        m = r[name]
        assert m["ms"] > 0 and m["steps"] == 4 and m["peak_mem"] >= 0
        tokens = tiny_cfg["batch_size"] * tiny_cfg["block_size"]
        assert m["tokens_per_s"] == pytest.approx(tokens / m["ms"] * 1e3)
        assert m["mfu"] is None  # CPU, no --peak_flops
    assert r["ratio"] == r["ternary"]["ms"] / r["float"]["ms"]
    assert f"ternary/float step time: {r['ratio']:.3f}x" in out
    assert "MFU n/a" in out and "no peak is known for cpu" in out and "peak RSS growth" in out


def test_mfu_comes_from_the_stated_peak(tiny_cfg, capsys):
    r = bench.bench(tiny(tiny_cfg, bitlinear=False, peak_flops=1e12))
    out = capsys.readouterr().out
    assert set(r) == {"float", "peak_flops", "peak_flops_source"}
    args = dict(model_args("gpt", dict(tiny_cfg, bitlinear=False)), vocab_size=65)
    per_token = build_model("gpt", args).flops_per_token()
    assert r["float"]["mfu"] == pytest.approx(per_token * r["float"]["tokens_per_s"] / 1e12)
    assert "1e+12 (--peak_flops)" in out and "MFU n/a" not in out


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H200", 989e12),
    ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA L40S", 362e12), ("NVIDIA L4", 121e12),
    ("NVIDIA A10G", None), ("Some Future GPU", None)])
def test_gpu_peaks_are_matched_by_name(monkeypatch, name, peak):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    flops, source = peak_flops("cuda")
    assert flops == peak
    assert ("not in common.PEAK_FLOPS" in source) == (peak is None)
    assert peak_flops("cuda", 5e14) == (5e14, "--peak_flops")


def test_command_line(tiny_cfg, capsys):
    keys = ("data_dir", "n_layer", "n_head", "n_embd", "block_size", "batch_size")
    argv = [f"--{k}={tiny_cfg[k]}" for k in keys] + [
        "--device=cpu", "--compile=False", "--compare", "--bench_steps=2", "--bench_warmup=1",
        "--bench_rounds=1"]
    r = bench.main(argv)
    assert r["ratio"] > 0 and "ternary/float step time" in capsys.readouterr().out


def test_profile_shows_the_quantizers_operator_calls(tiny_cfg, capsys):
    r = bench.bench(tiny(tiny_cfg, compare=True, profile=2))
    out = capsys.readouterr().out
    layers = 4 * tiny_cfg["n_layer"]  # BitLinears: qkv, attention out, MLP in and out
    # each quantizes its weight and its input in the forward: at least 8 more calls apiece
    assert r["ternary"]["op_calls"] - r["float"]["op_calls"] >= 8 * layers
    assert r["float"]["op_calls"] > 100
    for name in ("ternary", "float"):
        assert f"{name}: {r[name]['op_calls']:.0f} operator calls per step" in out
    assert out.count("Self CPU time total") == 2
