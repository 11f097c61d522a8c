"""The .bitnet file: export a trained checkpoint, reload it bit-exactly, refuse bad files."""

import copy
import struct

import pytest
import torch

from bitlinear import BitLinear, TernaryLinear, to_integer
from bitlinear.packed_file import FORMAT_VERSION, MAGIC
from checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint, model_from_packed
from configurator import ConfigError
from export import DEFAULTS, export
from generation import generate
from train import Trainer


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
    from train import DEFAULTS as TRAIN
    from train import resolve
    out = tmp_path_factory.mktemp("packed")
    cfg = resolve(dict(TRAIN, out_dir=str(out), data_dir=str(data_dir), device="cpu", n_layer=2,
                       n_head=2, n_embd=32, block_size=32, batch_size=8, max_iters=30,
                       eval_interval=30, eval_iters=1, learning_rate=3e-3))
    Trainer(cfg).run()
    return out


@pytest.mark.parametrize("packing, bits", [("2bit", 2.0), ("base3", 1.6)])
def test_export_reloads_exactly(trained, packing, bits):
    dst = export(dict(DEFAULTS, out_dir=str(trained), packing=packing,
                      to=str(trained / f"m_{packing}.bitnet")))
    ckpt = load_checkpoint(trained / "ckpt.pt")
    model = model_from_checkpoint(ckpt).eval()
    packed, header = model_from_packed(dst)
    packed.eval()
    assert header["meta"]["vocab_size"] == 65
    # the ternary matrices and scales are exactly those of the training model
    integer = to_integer(copy.deepcopy(model))
    for (name, a), (_, b) in zip(integer.state_dict().items(), packed.state_dict().items(),
                                 strict=True):
        assert torch.equal(a, b), name
    idx = torch.randint(0, 65, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (packed(idx, idx)[0] - model(idx, idx)[0]).abs().max() < 1e-4
    prompt = idx[:1, :5]
    assert torch.equal(generate(packed, prompt, 30, temperature=0),
                       generate(model, prompt, 30, temperature=0))
    # size: the linear weights take `bits` per weight (+ padding), the rest float32
    n_ternary = sum(m.weight.numel() for m in model.modules() if isinstance(m, BitLinear))
    n_float = model.get_num_params(non_embedding=False) - n_ternary
    expected = n_ternary * bits / 8 + 4 * n_float
    assert expected <= dst.stat().st_size < expected + 64 * 40 + 8000  # alignment + header
    assert sum(isinstance(m, TernaryLinear) for m in packed.modules()) == 8


def test_bad_files_give_one_clear_error(trained, tmp_path):
    dst = export(dict(DEFAULTS, out_dir=str(trained), to=str(tmp_path / "m.bitnet")))
    raw = dst.read_bytes()
    cases = {"truncated": (raw[: len(raw) - 100], "truncated"),
             "header": (raw[:40], "truncated or corrupt"),
             "magic": (b"NOTBITNT" + raw[8:], "not a .bitnet file"),
             "version": (MAGIC + struct.pack("<I", FORMAT_VERSION + 1) + raw[12:],
                         f"version {FORMAT_VERSION + 1}")}
    for name, (data, message) in cases.items():
        bad = tmp_path / f"{name}.bitnet"
        bad.write_bytes(data)
        with pytest.raises(CheckpointError, match=message):
            model_from_packed(bad)


def test_float_models_are_not_exported(data_dir, tmp_path):
    from train import DEFAULTS as TRAIN
    from train import resolve
    cfg = resolve(dict(TRAIN, out_dir=str(tmp_path), data_dir=str(data_dir), device="cpu",
                       n_layer=1, n_head=1, n_embd=8, block_size=8, max_iters=1, eval_iters=1,
                       bitlinear=False))
    Trainer(cfg).run()
    with pytest.raises(ConfigError, match="float model"):
        export(dict(DEFAULTS, out_dir=str(tmp_path)))


def test_bench_inference_compares_the_same_model(trained, capsys):
    from bench_inference import DEFAULTS as BENCH
    from bench_inference import bench
    sizes, results = bench(dict(BENCH, ckpt=str(trained / "ckpt.pt"), prompt_tokens=8,
                                new_tokens=8, repeats=1))
    assert sizes[".bitnet base3"] < sizes[".bitnet 2bit"] < sizes["state_dict float16"]
    assert sizes["state_dict float16"] < sizes["state_dict float32"]
    assert all(p > 0 and d > 0 for p, d in results.values())
    assert "integer / float" in capsys.readouterr().out
