"""The .bitnet file: export trained GPT and LLaMA checkpoints, reload them bit-exactly, run what
the file holds, refuse bad files with one line."""

import copy
import json
import re
import struct
import subprocess
import sys

import pytest
import torch

from bitlinear.inference import (
    Embedding8,
    Embedding16,
    Linear8,
    Linear16,
    TernaryLinear,
    to_integer,
)
from bitlinear.layer import activation_quant_int, ternarize
from bitlinear.packed_file import (
    FORMAT_VERSION,
    MAGIC,
    PackedFileError,
    load_packed,
    round_float_tensors,
    save_packed,
)
from common import CheckpointError, ConfigError, load_checkpoint, model_from_checkpoint
from export import DEFAULTS, export
from sample import generate, load_model
from tests.conftest import ROOT
from tests.test_inference import VARIANTS, assert_same_logits
from tools.bench_inference import DEFAULTS as BENCH
from tools.bench_inference import as_float, bench
from train import DEFAULTS as TRAIN
from train import resolve, train

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def model_from_packed(path):
    """(integer model, header) of a .bitnet file, loaded as sample.py loads it."""
    return load_model(path)[0], load_packed(path)[0]


@pytest.fixture(scope="module", params=list(VARIANTS))
def trained(request, data_dir, tmp_path_factory):
    """(out_dir, model): a tiny model of each variant trained 30 steps on Tiny Shakespeare."""
    out = tmp_path_factory.mktemp(request.param)
    cfg = resolve({**TRAIN, **dict(out_dir=str(out), data_dir=str(data_dir), device="cpu",
                                   compile=False, n_layer=2, n_head=2, n_embd=32, block_size=32,
                                   batch_size=8, max_iters=30, lr_decay_iters=30, warmup_iters=5,
                                   eval_interval=30, eval_iters=1, learning_rate=3e-3),
                   **VARIANTS[request.param]})
    train(cfg)
    return out, model_from_checkpoint(load_checkpoint(out / "ckpt.pt")).eval()


# the slow (subprocess) tests run for one GPT and one LLaMA variant only
SOME = pytest.mark.parametrize("trained", ["gpt", "llama-gqa-relu2-subln-tied"], indirect=True)


def check_bit_exact(packed, model, dtype):
    """Every tensor of the reloaded model is what the training model's tensor quantizes to."""
    latent = model.state_dict()
    layers = {n: m for n, m in packed.named_modules() if isinstance(m, TernaryLinear)}
    int8 = {n for n, m in packed.named_modules() if isinstance(m, (Embedding8, Linear8))}
    for name, t in packed.state_dict().items():
        owner, _, leaf = name.rpartition(".")
        if owner in int8:  # --embed_int8: test_int8_embeddings_store_each_row_quantized_once
            continue
        if owner in layers and leaf in ("weight", "weight_scale"):
            w_t, s = ternarize(latent[f"{owner}.weight"], layers[owner].eps)
            assert torch.equal(t, w_t if leaf == "weight" else s), name
        else:  # stored in dtype; 16-bit heads and embeddings keep it, the rest run widened
            assert t.dtype in (dtype, torch.float32), name
            assert torch.equal(t.float(), latent[name].to(dtype).float()), name


def test_export_reloads_exactly_and_runs_what_it_holds(trained):
    out, model = trained
    dst = export(dict(DEFAULTS, out_dir=str(out)))  # 2bit, fp16: the defaults
    packed, header = model_from_packed(dst)
    packed.eval()
    assert header["meta"]["vocab_size"] == 65 and header["float_dtype"] == "fp16"
    check_bit_exact(packed, model, torch.float16)
    assert sum(isinstance(m, (Linear16, Embedding16)) for m in packed.modules()) >= 2
    for name, buf in model.named_buffers():  # RoPE tables: not in the file, computed alike
        assert torch.equal(packed.get_buffer(name), buf), name
    rounded = round_float_tensors(copy.deepcopy(model), "fp16")
    idx = torch.randint(0, 65, (4, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out_logits = packed(idx, idx)[0]
        # the file's model is the training model with its floats rounded to fp16, run in integers
        torch.testing.assert_close(out_logits, to_integer(copy.deepcopy(rounded))(idx, idx)[0],
                                   atol=1e-5, rtol=0)
        assert_same_logits(out_logits, rounded(idx, idx)[0])
        # against the unrounded model, fp16 embeddings and head move the logits a little
        assert (out_logits - model(idx, idx)[0]).abs().max() < 0.1
    prompt = idx[:1, :5]
    assert torch.equal(generate(packed, prompt, 30, temperature=0),
                       generate(rounded, prompt, 30, temperature=0))


@pytest.mark.parametrize("packing, bits", [("2bit", 2.0), ("base3", 1.6)])
@pytest.mark.parametrize("float_dtype", ["fp16", "bf16", "fp32"])
def test_sizes_and_float_dtypes(trained, tmp_path, packing, bits, float_dtype):
    out, model = trained
    dst = export(dict(DEFAULTS, out_dir=str(out), packing=packing, float_dtype=float_dtype,
                      to=str(tmp_path / "m.bitnet")))
    packed, _ = model_from_packed(dst)
    check_bit_exact(packed, model, DTYPES[float_dtype])
    header, _ = load_packed(dst)
    kinds = {e["kind"] for e in header["tensors"]}
    assert kinds == {"ternary2" if packing == "2bit" else "ternary3",
                     str(DTYPES[float_dtype]).split(".")[1]}
    # size: the linear weights take `bits` per weight (+ padding), the rest 2 or 4 bytes
    linears = [m for m in packed.modules() if isinstance(m, TernaryLinear)]
    n_ternary = sum(m.weight.numel() for m in linears)
    n_float = sum(torch.Size(e["shape"]).numel() for e in header["tensors"]
                  if not e["kind"].startswith("ternary"))
    expected = n_ternary * bits / 8 + DTYPES[float_dtype].itemsize * n_float
    assert expected <= dst.stat().st_size < expected + 64 * 60 + 12000  # alignment + header


@SOME
def test_int8_embeddings_store_each_row_quantized_once(trained, tmp_path):
    out, model = trained
    fp16 = export(dict(DEFAULTS, out_dir=str(out), to=str(tmp_path / "a.bitnet")))
    int8 = export(dict(DEFAULTS, out_dir=str(out), embed_int8=True, to=str(tmp_path / "b.bitnet")))
    packed, header = model_from_packed(int8)
    packed.eval()
    check_bit_exact(packed, model, torch.float16)  # ternary weights, norms: as before
    state, n_int8 = model.state_dict(), 0
    for name, m in packed.named_modules():
        if isinstance(m, (Embedding8, Linear8)):
            w_i, s = activation_quant_int(state[name + ".weight"])
            assert torch.equal(m.weight, w_i) and torch.equal(m.weight_scale, s.view(-1)), name
            n_int8 += m.weight.numel()
    assert not any(isinstance(m, (Embedding16, Linear16)) for m in packed.modules())
    entries = {e["name"]: e for e in header["tensors"]}
    stored = [e for e in entries.values() if e["kind"] == "int8"]
    for e in stored:  # one byte a value, and a float32 scale a row
        assert e["nbytes"] == torch.Size(e["shape"]).numel()
        scale = entries[e["name"].removesuffix("weight") + "weight_scale"]
        assert scale["kind"] == "float32" and scale["shape"] == e["shape"][:1]
    assert 0 < sum(e["nbytes"] for e in stored) < n_int8  # the tied head is stored once
    assert int8.stat().st_size < fp16.stat().st_size
    idx = torch.randint(0, 65, (4, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (packed(idx, idx)[0] - model(idx, idx)[0]).abs().max() < 0.1


def test_fp16_overflow_is_refused(trained, tmp_path):
    _, model = trained
    model = copy.deepcopy(model)
    norm = next(m for m in model.modules() if type(m).__name__ in ("LayerNorm", "RMSNorm"))
    with torch.no_grad():
        norm.weight[0] = 1e5
    with pytest.raises(PackedFileError, match="beyond torch.float16's range.*bf16 or fp32"):
        save_packed(model, tmp_path / "m.bitnet", "gpt", {}, packing="2bit", float_dtype="fp16")
    assert not (tmp_path / "m.bitnet").exists()
    save_packed(model, tmp_path / "m.bitnet", "gpt", {}, packing="2bit", float_dtype="bf16")


@pytest.mark.parametrize("version", [1, 2])
def test_older_versions_still_load(trained, tmp_path, version):
    out, model = trained
    dst = export(dict(DEFAULTS, out_dir=str(out), float_dtype="fp32", to=str(tmp_path / "v3")))
    raw = dst.read_bytes()
    old = tmp_path / "old.bitnet"  # versions 1 and 2 wrote this layout (1: float32 only)
    old.write_bytes(MAGIC + struct.pack("<I", version) + raw[12:])
    a, b = model_from_packed(dst)[0], model_from_packed(old)[0]
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), name


def test_bad_files_give_one_clear_error(trained, tmp_path):
    out, _ = trained
    dst = export(dict(DEFAULTS, out_dir=str(out), to=str(tmp_path / "m.bitnet")))
    raw = dst.read_bytes()
    n = struct.unpack("<Q", raw[12:20])[0]
    header = json.loads(raw[20:20 + n])
    header["tensors"][0]["shape"] = [7, 7, 7]  # bytes that do not fit the shape
    bad_entry = json.dumps(header).encode()
    cases = {"truncated": (raw[: len(raw) - 100], "truncated"),
             "header": (raw[:40], "truncated or corrupt"),
             "magic": (b"NOTBITNT" + raw[8:], "not a .bitnet file"),
             "version": (MAGIC + struct.pack("<I", FORMAT_VERSION + 1) + raw[12:],
                         f"version {FORMAT_VERSION + 1}; this code reads versions 1, 2, 3"),
             "entry": (raw[:12] + struct.pack("<Q", len(bad_entry)) + bad_entry + raw[20 + n:],
                       "corrupt: tensor .* does not match its header entry")}
    for name, (data, message) in cases.items():
        bad = tmp_path / f"{name}.bitnet"
        bad.write_bytes(data)
        with pytest.raises(CheckpointError, match=message):
            model_from_packed(bad)


@pytest.mark.parametrize("trained", ["gpt"], indirect=True)
def test_sample_refuses_a_truncated_file_in_one_line(trained, tmp_path):
    out, _ = trained
    raw = export(dict(DEFAULTS, out_dir=str(out), to=str(tmp_path / "m.bitnet"))).read_bytes()
    (tmp_path / "truncated.bitnet").write_bytes(raw[: len(raw) - 100])
    r = subprocess.run([sys.executable, "sample.py", f"--ckpt={tmp_path / 'truncated.bitnet'}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0 and len(lines) == 1 and "truncated" in lines[0], r.stderr


@SOME
def test_export_and_sample_from_the_command_line(trained):
    out, _ = trained
    r = subprocess.run([sys.executable, "export.py", f"--out_dir={out}", "--packing=base3"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    bits = float(re.search(r"linear layers ([\d.]+) bits/weight", r.stdout).group(1))
    assert 1.6 <= bits < 1.61  # 5 weights a byte, each tensor padded to a whole byte
    r = subprocess.run([sys.executable, "sample.py", f"--ckpt={out / 'model.bitnet'}",
                        "--start=ROMEO:", "--num_samples=1", "--max_new_tokens=20"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("ROMEO:") and len(r.stdout.split("---")[0]) == 6 + 20 + 1


@SOME
def test_bench_inference_runs_the_same_prompt_in_both_paths(trained, capsys):
    out, model = trained
    sizes, results = bench(dict(BENCH, ckpt=str(out / "ckpt.pt"), prompt_tokens=8,
                                new_tokens=8, repeats=1, val_batches=1))
    assert sizes[".bitnet base3 (fp16)"] < sizes[".bitnet 2bit (fp16)"]
    assert sizes[".bitnet 2bit (fp16)"] < sizes["state_dict float16"] < sizes["state_dict float32"]
    for r in results.values():
        assert r["prefill_tps"] > 0 and r["decode_tps"] > 0 and r["rss_peak"] >= r["rss_before"]
        assert len(r["tokens"]) == 9
    # the integer worker ran the model the file holds: its greedy tokens are the rounded model's
    g = torch.Generator().manual_seed(BENCH["seed"])
    prompt = torch.randint(0, 65, (1, 8), generator=g)
    rounded = round_float_tensors(copy.deepcopy(model), "fp16")
    greedy = lambda m: generate(m, prompt, 9, temperature=0)[0, 8:].tolist()  # noqa: E731
    assert greedy(rounded) == results["packed"]["tokens"]
    assert greedy(as_float(model)) == results["float"]["tokens"]
    printed = capsys.readouterr().out
    assert "integer / float" in printed
    # the val losses of the training model (as its run measured it: eval_iters=1 there) and
    # of its .bitnet file, fp16 rounding apart
    losses = [float(x) for x in re.findall(r"val loss, 1 batches of \d+: .* ([\d.]+)\n", printed)]
    assert len(losses) == 2 and abs(losses[0] - load_checkpoint(out / "ckpt.pt")["val_loss"]) < 1e-4
    assert abs(losses[0] - losses[1]) < 0.01


def test_float_models_are_not_exported(data_dir, tmp_path):
    cfg = resolve(dict(TRAIN, out_dir=str(tmp_path), data_dir=str(data_dir), device="cpu",
                       n_layer=1, n_head=1, n_embd=8, block_size=8, max_iters=1, eval_iters=1,
                       bitlinear=False))
    train(cfg)
    with pytest.raises(ConfigError, match="float model"):
        export(dict(DEFAULTS, out_dir=str(tmp_path)))
    with pytest.raises(ConfigError, match="float_dtype 'int4' is not one of fp16, bf16, fp32"):
        export(dict(DEFAULTS, out_dir=str(tmp_path), float_dtype="int4"))
