"""Files that lie: .bitnet headers and transformers folders crafted by hand to claim what they do
not hold. Every one is refused with one line, before anything is allocated on its word alone.

The files are tiny untrained models (no training: each test takes well under a second), written
by the real writers (save_packed, save_hf) and then edited.
"""

import json
import os
import shutil
import signal
import string
import struct
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

from bitlinear.hf import ExportError
from bitlinear.packed_file import save_packed
from common import CheckpointError, ConfigError, DataError, build_model, save_checkpoint
from data.common import char_meta, write_splits
from data.loader import Data
from llama.hf import save_hf
from llama.hf_import import load_hf
from sample import load_model, read_prompt
from tests.conftest import ROOT
from train import DEFAULTS, train
from train import main as train_main

CHARS = sorted(set(string.printable))[:65]
GPT = dict(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=65)
LLAMA = dict(n_layer=2, n_head=4, n_kv_head=2, n_embd=64, ffn_hidden=64, block_size=32,
             vocab_size=65, mlp="relu2", subln=True, tie_embeddings=True)


@contextmanager
def within(seconds):
    """Fail (rather than hang) when the block takes longer than `seconds`."""
    def stop(*_):
        raise TimeoutError(f"took longer than {seconds} s")
    old = signal.signal(signal.SIGALRM, stop)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def one_line(excinfo):
    text = str(excinfo.value)
    assert "\n" not in text and len(text) < 400, text
    return text


# ---- .bitnet --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """{name: bytes} of .bitnet files of tiny models: a GPT (2-bit, fp16) and a tied LLaMA
    (base-3, int8 embeddings), each loadable as it is."""
    folder = tmp_path_factory.mktemp("packed")
    torch.manual_seed(0)
    files = {}
    for name, arch, args, options in [
            ("gpt", "gpt", GPT, {}),
            ("llama", "llama", LLAMA, dict(packing="base3", embed_int8=True))]:
        path = folder / f"{name}.bitnet"
        save_packed(build_model(arch, args), path, arch, args, meta=char_meta(CHARS), **options)
        load_model(path)  # as written, it loads
        files[name] = path.read_bytes()
    return files


def split(raw):
    n = struct.unpack("<Q", raw[12:20])[0]
    return json.loads(raw[20:20 + n]), raw[20 + n:]


def rewrite(raw, edit):
    """raw with its header edited by edit(header) (the data left as it is)."""
    header, data = split(raw)
    edit(header)
    text = json.dumps(header).encode()
    return raw[:12] + struct.pack("<Q", len(text)) + text + data


def entry(header, kind=None, name=None):
    return next(e for e in header["tensors"]
                if (kind is None or e["kind"] == kind) and (name is None or e["name"] == name))


def refused(tmp_path, data, match, name="bad.bitnet"):
    """The one-line message load_model (sample.py's loader) gives for a file holding data."""
    path = tmp_path / name
    path.write_bytes(data)
    with within(20), pytest.raises(CheckpointError, match=match) as e:
        load_model(path)
    return one_line(e)


@pytest.mark.parametrize("n", [2**40, 2**63, 2**64 - 1])
def test_a_header_length_beyond_the_file_is_refused(packed, tmp_path, n):
    raw = packed["gpt"]
    refused(tmp_path, raw[:12] + struct.pack("<Q", n) + raw[20:],
            f"truncated or corrupt: its header claims {n} bytes, the file holds "
            f"{len(raw) - 20} after the first 20")


def set_field(key, value, kind=None):
    def edit(header):
        entry(header, kind)[key] = value
    return edit


@pytest.mark.parametrize("key, value, match", [
    ("offset", -64, "has offset -64, not a byte count"),
    ("offset", -20, "has offset -20, not a byte count"),  # would read the header as weights
    ("offset", 1, "has offset 1, not a multiple of 64"),
    ("offset", 0.5, "has offset 0.5, not a byte count"),
    ("offset", "0", "has offset '0', not a byte count"),
    ("offset", True, "has offset True, not a byte count"),
    ("offset", 2**70, "truncated: its data ends"),
    ("nbytes", -1, "has nbytes -1, not a byte count"),
    ("nbytes", None, "has nbytes None, not a byte count"),
    ("shape", [-32, 32], r"has shape \[-32, 32\], not a list of sizes"),
    ("shape", [32.0, 32], r"has shape \[32.0, 32\], not a list of sizes"),
    ("shape", "32", "has shape '32', not a list of sizes"),
    ("shape", [[32], 32], r"has shape \[\[32\], 32\], not a list of sizes"),
    ("shape", [2**62, 2**62], "does not match its header entry .* takes"),
    ("kind", "float64", "has kind 'float64', not one of"),
    ("name", 7, "tensor entry 0 has no name"),
    ("name", "", "tensor entry 0 has no name"),
])
def test_every_number_of_a_tensor_entry_is_checked(packed, tmp_path, key, value, match):
    refused(tmp_path, rewrite(packed["gpt"], set_field(key, value)), match)


@pytest.mark.parametrize("kind", ["float16", "ternary2"])
@pytest.mark.parametrize("delta", [-1, 1, 64])
def test_nbytes_must_be_what_kind_and_shape_take(packed, tmp_path, kind, delta):
    header, _ = split(packed["gpt"])
    e = entry(header, kind)
    def edit(h):
        entry(h, kind)["nbytes"] += delta
    refused(tmp_path, rewrite(packed["gpt"], edit),
            f"tensor {e['name']} does not match its header entry .{kind} .* takes {e['nbytes']} "
            f"bytes, the entry says {e['nbytes'] + delta}")


@pytest.mark.parametrize("kind", ["ternary3", "int8", "float32", "float16"])
def test_nbytes_are_exact_for_every_kind(packed, tmp_path, kind):
    """A shape one row taller than the bytes hold: caught for each kind from the byte count."""
    header, _ = split(packed["llama"])
    e = entry(header, kind)
    def edit(h):
        entry(h, kind)["shape"][0] += 1
    refused(tmp_path, rewrite(packed["llama"], edit),
            f"tensor {e['name']} does not match its header entry .{kind}")


@pytest.mark.parametrize("scale, match", [
    (float("nan"), "has scale nan, not a positive number"),
    (float("inf"), "has scale inf, not a positive number"),
    (-1.0, "has scale -1.0, not a positive number"),
    ("2", "has scale '2', not a positive number"),
    (None, "has scale None, not a positive number"),
])
def test_a_ternary_scale_must_be_a_positive_finite_number(packed, tmp_path, scale, match):
    refused(tmp_path, rewrite(packed["gpt"], set_field("scale", scale, "ternary2")), match)


def test_the_table_must_be_consistent(packed, tmp_path):
    raw = packed["gpt"]
    header, _ = split(raw)
    t = [e for e in header["tensors"] if e["nbytes"]]

    def overlap(h):
        h["tensors"][2]["offset"] = h["tensors"][1]["offset"]
    cases = {
        "overlap": (overlap, "overlap"),
        "twice": (lambda h: h["tensors"].append(dict(h["tensors"][0])), "appears twice"),
        "scale lacking": (lambda h: entry(h, "ternary2").pop("scale"), "lacks a scale"),
        "scale on a float": (set_field("scale", 1.0, "float16"), "float16 tensor .* has a scale"),
        "alias to nothing": (lambda h: h["aliases"].update({"lm_head.weight": "nothing"}),
                             "alias lm_head.weight -> 'nothing' does not name a stored tensor"),
        "alias over a tensor": (lambda h: h["aliases"].update({t[0]["name"]: t[1]["name"]}),
                                "does not name a stored tensor"),
        "tensors": (lambda h: h.update(tensors={}), "tensors is not a list"),
        "model_args": (lambda h: h.update(model_args=[1, 2]), "model_args is not an object"),
        "arch": (lambda h: h.update(arch=None), "arch None is not a name"),
        "meta": (lambda h: h.update(meta="chars"), "meta is not an object"),
    }
    for name, (edit, match) in cases.items():
        refused(tmp_path, rewrite(raw, edit), match, f"{name}.bitnet")


def test_headers_that_are_not_objects_are_refused(packed, tmp_path):
    raw = packed["gpt"]
    _, data = split(raw)
    for text, match in [(b"[1, 2, 3]", "bad header.: a JSON list, not an object"),
                        (b"[" * 100000 + b"]" * 100000, "truncated or corrupt .bad header."),
                        (b"\xff\xfe{}", "truncated or corrupt .bad header.")]:
        refused(tmp_path, raw[:12] + struct.pack("<Q", len(text)) + text + data, match)


def set_arg(**args):
    def edit(header):
        header["model_args"].update(args)
    return edit


@pytest.mark.parametrize("args, match", [
    (dict(n_layer=1000000), "model_args describe a gpt model larger than the .* values of"),
    (dict(n_layer=2000), "model_args describe a gpt model larger than"),
    (dict(vocab_size=10**12), "model_args describe a gpt model larger than"),
    (dict(n_embd=2**40, n_head=2**40), "model_args describe a gpt model larger than"),
    (dict(n_layer=3), "lacks tensor transformer.h.2.ln_1.weight, which its model_args' gpt "
                      "model has"),
    (dict(n_layer=1), "holds tensor transformer.h.1.ln_1.weight, which its model_args' gpt "
                      "model does not have"),
    (dict(block_size=64), r"tensor transformer.wpe.weight is \[32, 32\] in the file, but its "
                          r"model_args make it \[64, 32\]"),
    (dict(n_head=0), "model_args n_head=0 is not a positive integer"),
    (dict(n_layer=-1), "model_args n_layer=-1 is not a positive integer"),
    (dict(n_embd="32"), "model_args n_embd='32' is not a positive integer"),
    (dict(n_embd=32.0), "model_args n_embd=32.0 is not a positive integer"),
    (dict(n_layer=True), "model_args n_layer=True is not a positive integer"),
    (dict(bias=1), "model_args bias=1 is not true or false"),
    (dict(dropout=float("nan")), "model_args dropout=nan is not a finite number"),
    (dict(n_head=3), "model_args n_head=3 does not divide n_embd=32"),
    (dict(bias=True), "lacks tensor transformer.h.0.ln_1.bias, which its model_args' gpt "
                      "model has"),
    (dict(n_rope=8), "model_args key 'n_rope', which this code's gpt model does not take"),
])
def test_model_args_must_describe_the_tensors_the_file_holds(packed, tmp_path, args, match):
    start = time.perf_counter()
    refused(tmp_path, rewrite(packed["gpt"], set_arg(**args)), match)
    assert time.perf_counter() - start < 10


@pytest.mark.parametrize("args, match", [
    (dict(block_size=2**40), "model_args describe a llama model larger than"),  # RoPE alone
    (dict(n_layer=1000000), "model_args describe a llama model larger than"),
    (dict(n_kv_head=3), r"model_args do not build a llama model \(ValueError: n_embd=64, "
                        r"n_head=4, n_kv_head=3"),
    (dict(n_embd=66, n_head=6), r"do not build a llama model \(ValueError: head size 11 must "
                                r"be even for RoPE\)"),
    (dict(n_kv_head=4), r"tensor layers.0.attention.wk.weight is \[32, 64\] in the file, but "
                        r"its model_args make it \[64, 64\]"),
    (dict(n_kv_head=-2), "model_args n_kv_head=-2 is not a non-negative integer"),
    (dict(mlp="gelu"), r"do not build a llama model \(ValueError: mlp 'gelu'"),
    (dict(subln=False), "holds tensor layers.0.attention.sub_norm.weight, which"),
])
def test_llama_model_args_too(packed, tmp_path, args, match):
    refused(tmp_path, rewrite(packed["llama"], set_arg(**args)), match)


def test_arch_and_kinds_must_fit_the_model(packed, tmp_path):
    raw = packed["llama"]
    header, data = split(raw)
    # a ternary weight stored as int8 (of its own shape, in bytes appended to the data): every
    # size agrees, the kind does not
    wq = "layers.0.attention.wq.weight"
    e = entry(header, name=wq)
    e.pop("scale")
    e.update(kind="int8", offset=len(data) + -len(data) % 64, nbytes=64 * 64)
    text = json.dumps(header).encode()
    extra = bytes(-len(data) % 64 + 64 * 64)
    refused(tmp_path, raw[:12] + struct.pack("<Q", len(text)) + text + data + extra,
            f"tensor {wq} is stored as int8, which its TernaryLinear cannot take")

    def no_scale(h):
        s = entry(h, "float32")
        s.update(kind="int8", shape=[s["nbytes"], 1])
    cases = {"arch": (lambda h: h.update(arch="mamba"),
                      "holds a 'mamba' model; this code builds gpt, llama"),
             "int8 scale": (no_scale, "int8 tensor tok_embeddings.weight lacks its float32 "
                                      r"tok_embeddings.weight_scale of one scale per row \(65\)")}
    for name, (edit, match) in cases.items():
        refused(tmp_path, rewrite(raw, edit), match, f"{name}.bitnet")


def test_sample_refuses_a_small_file_that_claims_a_million_layers(packed, tmp_path):
    """The header's claim costs nothing: one line, in the time Python takes to start."""
    path = tmp_path / "huge.bitnet"
    path.write_bytes(rewrite(packed["gpt"], set_arg(n_layer=1000000)))
    assert path.stat().st_size < 20000
    r = subprocess.run([sys.executable, "sample.py", f"--ckpt={path}", "--device=cpu"],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0 and len(lines) == 1, r.stderr
    assert "model_args describe a gpt model larger than" in lines[0]


def test_a_ternary_code_of_3_is_refused(packed, tmp_path):
    header, data = split(packed["gpt"])
    e = entry(header, kind="ternary2")
    raw = bytearray(packed["gpt"])
    raw[len(raw) - len(data) + e["offset"]] = 0xFF  # four codes 3: weights of +2
    refused(tmp_path, bytes(raw), f"tensor {e['name']} holds codes beyond the three ternary")


# ---- training checkpoints -------------------------------------------------------------------

@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A small checkpoint of a tiny untrained GPT: its model and model_args, no optimizer."""
    path = tmp_path_factory.mktemp("ckpt") / "ckpt.pt"
    torch.manual_seed(0)
    save_checkpoint({"arch": "gpt", "model_args": GPT, "meta": char_meta(CHARS),
                     "model": build_model("gpt", GPT).state_dict()}, path)
    load_model(path)  # as written, it loads
    return path


def test_a_checkpoint_claiming_a_million_layers_is_refused(ckpt, tiny_cfg, tmp_path):
    """sample.py, export.py and --init_from: one line, nothing built on model_args' word."""
    raw = torch.load(ckpt, weights_only=True)
    path = tmp_path / "huge.pt"
    save_checkpoint(dict(raw, model_args=dict(GPT, n_layer=1000000), meta=None), path)
    match = "does not fit this code's 'gpt' model .its model_args have n_layer=1000000, its " \
        "weights 2 layers"
    with within(20), pytest.raises(CheckpointError, match=match) as e:
        load_model(path)
    one_line(e)
    with within(20), pytest.raises(CheckpointError, match=match):
        train(dict(tiny_cfg, init_from=str(path)))
    save_checkpoint(dict(raw, model_args=dict(GPT, n_embd=10**6), meta=None), path)
    with within(20), pytest.raises(CheckpointError, match="model_args have n_embd=1000000, "
                                                          r"beyond its weights' largest dimension "
                                                          r"\(128\)"):
        load_model(path)


def test_resuming_needs_what_a_run_saves(ckpt, tiny_cfg):
    out = Path(tiny_cfg["out_dir"])
    out.mkdir(parents=True)
    shutil.copy(ckpt, out / "ckpt.pt")  # weights only: no optimizer, step or random state
    with pytest.raises(CheckpointError, match="lacks optimizer, scaler, iter_num, .*cannot "
                                              "resume a run; start .* --init_from="):
        train(dict(tiny_cfg, init_from="resume"))
    train(dict(tiny_cfg, max_iters=10, overwrite=True))
    with pytest.raises(ConfigError, match="block_size=64 is longer than the 32 positions of "
                                          ".*ckpt.pt's model; resume with --block_size=32"):
        train(dict(tiny_cfg, init_from="resume", block_size=64))


def test_resuming_on_another_character_mapping_is_refused(tiny_cfg, tmp_path):
    train(dict(tiny_cfg, max_iters=10))
    other = shutil.copytree(Path(tiny_cfg["data_dir"], "shakespeare_char"),
                            tmp_path / "data" / "shakespeare_char")
    meta = json.loads((other / "meta.json").read_text())
    a, b = meta["itos"]["40"], meta["itos"]["41"]  # the same 65 characters, two swapped
    meta["itos"]["40"], meta["itos"]["41"] = b, a
    meta["stoi"][a], meta["stoi"][b] = 41, 40
    (other / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match=f"checkpoint's tokens are not dataset "
                                          f"'shakespeare_char''s .id 40 is {a!r} in one, {b!r} "
                                          f"in the other"):
        train(dict(tiny_cfg, init_from="resume", data_dir=str(tmp_path / "data")))
    with pytest.raises(ConfigError, match="tokens are not dataset"):
        train(dict(tiny_cfg, init_from=str(Path(tiny_cfg["out_dir"], "ckpt.pt")),
                   data_dir=str(tmp_path / "data"), out_dir=str(tmp_path / "o")))


# ---- datasets -------------------------------------------------------------------------------

def dataset(tmp_path, train_ids, meta=None, dtype=None):
    """tmp_path/ds written by the prepare scripts' writer, its train.bin then replaced by
    train_ids as dtype (None: as written); returns the config that reads it."""
    meta = meta or char_meta(CHARS)
    write_splits(np.arange(600) % 65, np.arange(300) % 65, tmp_path / "ds", meta)
    if dtype is not None:
        np.asarray(train_ids, dtype=dtype).tofile(tmp_path / "ds" / "train.bin")
    return dict(DEFAULTS, data_dir=str(tmp_path), dataset="ds", block_size=8, batch_size=2)


def data_error(cfg, match):
    with within(20), pytest.raises(DataError, match=match) as e:
        Data(cfg, "cpu", 0)
    return one_line(e)


def test_bin_files_are_checked_against_meta(tmp_path):
    """A size that is not meta.json's, a dtype that is not the files', ids beyond the
    vocabulary: one line naming the file, before any training."""
    cfg = dataset(tmp_path, None)
    Data(cfg, "cpu", 0)  # as written, it loads
    meta_file = tmp_path / "ds" / "meta.json"
    meta = json.loads(meta_file.read_text())
    dataset(tmp_path, np.arange(600) % 65, dtype=np.uint32)  # the same ids, 4 bytes each
    data_error(cfg, "train.bin is 2,400 bytes, not the 600 uint16 ids its meta.json says")
    meta.pop("split_tokens")  # a meta.json of before the counts
    meta_file.write_text(json.dumps(meta))
    data_error(cfg, "every second id is 0, as uint32 ids read as the uint16")
    (tmp_path / "ds" / "train.bin").write_bytes(b"\0" * 1201)
    data_error(cfg, "train.bin is 1,201 bytes, not the uint16 ids its meta.json says")
    ids = np.arange(20000) % 65
    ids[5000:15000] = 70  # in the middle: not among the ids checked as the run starts
    ids.astype(np.uint16).tofile(tmp_path / "ds" / "train.bin")
    data = Data(cfg, "cpu", 0)
    with pytest.raises(DataError, match="train.bin holds token id 70, beyond the 65 of its "
                                        "vocabulary"):
        for _ in range(100):
            data.batch("train")
    ids[-1] = 1000
    ids.astype(np.uint16).tofile(tmp_path / "ds" / "train.bin")
    data_error(cfg, "train.bin holds token id 1000, beyond the 65")


@pytest.mark.parametrize("field, value", [("vocab_size", "65"), ("vocab_size", None),
                                          ("itos", ["a", "b"]), ("dtype", 16),
                                          ("split_tokens", {"train": -1})])
def test_meta_fields_of_the_wrong_type_are_one_line(tmp_path, field, value):
    cfg = dataset(tmp_path, None)
    path = tmp_path / "ds" / "meta.json"
    path.write_text(json.dumps(dict(json.loads(path.read_text()), **{field: value})))
    data_error(cfg, f"meta.json has {field}=.*, not what a prepare writes; prepare the dataset")


def test_a_dataset_swap_killed_halfway_is_refused(tmp_path):
    """SIGKILL between the renames of a prepare: meta.json is renamed first, so the .bin files
    beside it are the old ones, of other sizes; and .bin files whose meta.json never came (a
    prepare of before) are not taken for nanoGPT's GPT-2 data."""
    cfg = dataset(tmp_path, None)
    kill_after_first_rename = (
        "import os, signal, numpy as np; from data.common import char_meta, write_splits; "
        "real = os.replace; os.replace = lambda a, b: (real(a, b), os.kill(os.getpid(), "
        "signal.SIGKILL)); "
        f"write_splits(np.arange(900) % 3, np.arange(90) % 3, {str(tmp_path / 'ds')!r}, "
        "char_meta(['a', 'b', 'c']))")
    r = subprocess.run([sys.executable, "-c", kill_after_first_rename], cwd=ROOT)
    assert r.returncode == -signal.SIGKILL
    assert json.loads((tmp_path / "ds" / "meta.json").read_text())["vocab_size"] == 3
    data_error(cfg, "train.bin is 1,200 bytes, not the 900 uint16 ids its meta.json says .files "
                    "of two prepares, or one cut short")
    (tmp_path / "ds" / "meta.json").rename(tmp_path / "ds" / ".meta.json.tmp99999999")
    data_error(cfg, "has .bin files but no meta.json: a prepare was cut short; prepare the")
    write_splits(np.arange(90) % 3, np.arange(90) % 3, tmp_path / "ds", char_meta(list("abc")))
    assert sorted(p.name for p in (tmp_path / "ds").iterdir()) == [
        "meta.json", "train.bin", "val.bin"]  # the next prepare cleans up after the killed ones
    Data(cfg, "cpu", 0)


@pytest.mark.parametrize("name", ["meta.json", "train.bin"])
def test_a_fifo_in_a_dataset_is_refused_not_waited_on(tmp_path, name):
    cfg = dataset(tmp_path, None)
    (tmp_path / "ds" / name).unlink()
    os.mkfifo(tmp_path / "ds" / name)
    data_error(cfg, f"{name} is not a regular file")


def test_prompt_files_that_are_not_text_are_one_line(tmp_path):
    (tmp_path / "bin").write_bytes(b"ROMEO\xff\xfe:")
    with pytest.raises(ConfigError, match="is not UTF-8 text .byte 0xff at offset 5."):
        read_prompt(f"FILE:{tmp_path / 'bin'}")
    os.mkfifo(tmp_path / "fifo")
    with within(10), pytest.raises(ConfigError, match="not found .or not a regular file."):
        read_prompt(f"FILE:{tmp_path / 'fifo'}")


# ---- transformers folders (--init_from) -----------------------------------------------------

safetensors = pytest.importorskip("safetensors.torch", reason="safetensors is not installed: "
                                  "pip install -r requirements-dev.txt (CI installs it)")


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """A transformers folder of a tiny ternary LLaMA (GQA, sub-norms, tied), as export writes."""
    folder = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    model = build_model("llama", LLAMA)
    save_hf(model, dict(vars(model.config)), char_meta(CHARS), folder)
    load_hf(folder)  # as written, it loads
    return folder


@pytest.fixture
def hf_copy(hf_folder, tmp_path):
    return shutil.copytree(hf_folder, tmp_path / "hf")


def import_error(folder, match):
    with within(20), pytest.raises(ExportError, match=match) as e:
        load_hf(folder)
    return one_line(e)


def edit_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    for key, value in changes.items():
        if value is ...:
            config.pop(key)
        else:
            config[key] = value
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("changes, match", [
    (dict(num_hidden_layers=1000000),
     "config.json' has num_hidden_layers=1000000, but model.safetensors holds layers 0 to 1"),
    (dict(num_hidden_layers=3), "has num_hidden_layers=3, but model.safetensors holds layers 0 "
                                "to 1"),
    (dict(num_hidden_layers=1), "has num_hidden_layers=1, but"),
    (dict(num_attention_heads=0), "has num_attention_heads=0; it must be a positive integer"),
    (dict(num_attention_heads=3), "has num_attention_heads=3, which does not divide "
                                  "hidden_size=64"),
    (dict(num_attention_heads=64, num_key_value_heads=64, head_dim=None),
     "hidden_size / num_attention_heads = 1, an odd head size"),
    (dict(num_key_value_heads=3), "has num_key_value_heads=3, which does not divide "
                                  "num_attention_heads=4"),
    (dict(num_key_value_heads=0), "has num_key_value_heads=0; it must be a positive integer"),
    (dict(head_dim=8), "has head_dim=8; BitGPT's LLaMA needs hidden_size / num_attention_heads "
                       "= 16"),
    (dict(hidden_size="64"), "has hidden_size='64'; it must be a positive integer"),
    (dict(vocab_size=65.0), "has vocab_size=65.0; it must be a positive integer"),
    (dict(intermediate_size=True), "has intermediate_size=True; it must be a positive integer"),
    (dict(vocab_size=-65), "has vocab_size=-65; it must be a positive integer"),
    (dict(vocab_size=10**30), "has vocab_size=1000000000000000000000000000000; it must be a "
                              "positive integer .at most 2147483647."),
    (dict(hidden_size=...), "config.json' lacks hidden_size"),
    (dict(max_position_embeddings=None), "has max_position_embeddings=None"),
    (dict(max_position_embeddings=2**30), "has max_position_embeddings=1073741824: its rotary "
                                          "tables would outweigh the model's"),
    (dict(vocab_size=1000), r"does not fit its weights: vocab_size = 1000 makes "
                            r"model.embed_tokens.weight \[1000, 64\], but model.safetensors "
                            r"holds \[65, 64\]"),
    (dict(intermediate_size=128), r"intermediate_size = 128 makes "
                                  r"model.layers.0.mlp.gate_proj.weight \[128, 64\]"),
    (dict(num_key_value_heads=4), r"num_key_value_heads \* head_dim = 64 makes "
                                  r"model.layers.0.self_attn.k_proj.weight \[64, 64\], but "
                                  r"model.safetensors holds \[32, 64\] \(unpacked\)"),
    (dict(rms_norm_eps="1e-5"), "has rms_norm_eps='1e-5'; it must be a positive number"),
    (dict(rope_theta=float("inf")), "has rope_theta=inf; it must be a positive number"),
    (dict(rope_scaling=[1, 2]), r"has rope_scaling=\[1, 2\]; it must be an object or null"),
    (dict(quantization_config="bitnet"), "has quantization_config='bitnet'; it must be an"),
    (dict(tie_word_embeddings="yes"), "has tie_word_embeddings='yes'; it must be true or "
                                      "false"),
    (dict(hidden_act=["silu"]), r"uses options BitGPT's LLaMA does not have \(hidden_act "
                                r"\['silu'\]"),
])
def test_config_sizes_are_checked_against_the_weights(hf_copy, changes, match):
    edit_config(hf_copy, **changes)
    import_error(hf_copy, match)


def test_a_config_that_is_not_an_object_is_refused(hf_copy):
    for text in ("[1, 2, 3]", '"llama"', "null"):
        (hf_copy / "config.json").write_text(text)
        kind = type(json.loads(text)).__name__
        import_error(hf_copy, f"config.json' is not a readable transformers config .a JSON "
                              f"{kind}, not an object.")


def test_safetensors_headers_are_checked_against_their_files(hf_copy):
    path = hf_copy / "model.safetensors"
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    for claim in (2**40, 2**64 - 1, len(raw)):
        path.write_bytes(claim.to_bytes(8, "little") + raw[8:])
        import_error(hf_copy, f"model.safetensors' is not a readable safetensors file .its "
                              f"header claims {claim} bytes")
    header = json.loads(raw[8:8 + n])
    name = "model.layers.0.mlp.down_proj.weight"
    for span in ([0, 10**12], [-16, 0], [0, 1], "0"):
        bad = dict(header, **{name: dict(header[name], data_offsets=span)})
        text = json.dumps(bad).encode()
        path.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n:])
        import_error(hf_copy, f"tensor {name}'s data_offsets .* do not fit its shape and file")
    bad = dict(header, **{name: dict(header[name], shape=[-1, 64])})
    text = json.dumps(bad).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n:])
    import_error(hf_copy, rf"tensor {name} has shape \[-1, 64\]")


def test_tensors_must_have_the_dtypes_the_model_takes(hf_copy):
    path = hf_copy / "model.safetensors"
    tensors = safetensors.load_file(path)
    scale = tensors.pop("model.layers.1.self_attn.q_proj.weight_scale")
    safetensors.save_file(tensors, path)
    import_error(hf_copy, "holds the packed model.layers.1.self_attn.q_proj.weight without a "
                          "weight_scale of one value")
    tensors["model.layers.1.self_attn.q_proj.weight_scale"] = scale
    tensors["model.norm.weight"] = tensors["model.norm.weight"].to(torch.int32)
    safetensors.save_file(tensors, path)
    import_error(hf_copy, "holds model.norm.weight as I32, not as floats or packed ternary")


def test_a_tokenizer_that_is_not_an_object_is_refused(hf_copy):
    (hf_copy / "tokenizer.json").write_text("[1, 2]")
    import_error(hf_copy, "tokenizer.json' is not a readable tokenizer")


def test_init_from_refuses_a_folder_that_claims_a_million_layers(hf_copy, tiny_cfg, tmp_path):
    """train.py --init_from: the one line, naming the key."""
    edit_config(hf_copy, num_hidden_layers=1000000)
    with within(30), pytest.raises(SystemExit, match="has num_hidden_layers=1000000, but "
                                                     "model.safetensors holds layers 0 to 1"):
        train_main([f"--data_dir={tiny_cfg['data_dir']}", "--arch=llama", "--device=cpu",
                    f"--init_from={hf_copy}", f"--out_dir={tmp_path / 'o'}"])


def test_a_fifo_in_a_transformers_folder_is_refused_not_waited_on(hf_copy):
    (hf_copy / "model.safetensors").unlink()
    os.mkfifo(hf_copy / "model.safetensors")
    import_error(hf_copy, "model.safetensors' is not a readable safetensors file .not a regular "
                          "file.")
    (hf_copy / "config.json").unlink()
    os.mkfifo(hf_copy / "config.json")
    import_error(hf_copy, "is not a transformers model folder .no config.json file.")


def test_a_folder_that_is_not_a_transformers_folder_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, "sample.py", f"--ckpt={tmp_path}", "--device=cpu"],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and r.stderr.strip() == (
        f"error: '{tmp_path}' is not a transformers model folder (no config.json file); give a "
        f"checkpoint (.pt), a .bitnet file, or such a folder")


def test_rope_scaling_in_its_older_spelling_is_refused(hf_copy):
    edit_config(hf_copy, rope_scaling={"type": "linear", "factor": 4})
    import_error(hf_copy, "uses options BitGPT's LLaMA does not have .* rope 'linear'")


@pytest.mark.parametrize("scale", [-1.0, float("inf"), 0.0])
def test_weight_scales_must_be_positive_and_finite(hf_copy, scale):
    path = hf_copy / "model.safetensors"
    tensors = safetensors.load_file(path)
    name = "model.layers.0.self_attn.q_proj.weight"
    tensors[name + "_scale"] = torch.full_like(tensors[name + "_scale"], scale)
    safetensors.save_file(tensors, path)
    import_error(hf_copy, f"holds {name} with weight_scale {scale}; export the model again")
