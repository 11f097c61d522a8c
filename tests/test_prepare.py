"""The dataset scripts, offline: HF corpora's tokenize-and-write on local documents, the user's
own text streamed in chunks (char and GPT-2), uint32 ids, one-line errors, and training on it."""

import importlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from common import run_cli
from data.common import EOT, char_boundary
from data.tokenizer import tokenizer_kind

ROOT = Path(__file__).resolve().parents[1]
EOT_TEXT = "<|endoftext|>"


@pytest.fixture(scope="module")
def enc(gpt2_encoding):
    return gpt2_encoding  # skips, saying why, without the GPT-2 files in tiktoken's cache


@pytest.fixture(scope="module")
def docs(corpus):
    """600 'documents' (speeches) from Tiny Shakespeare: several batches of 256 for the pool."""
    speeches = [s for s in corpus.read_text(encoding="utf-8").split("\n\n") if s]
    return speeches[:599] + [f"a document that spells {EOT_TEXT} is still text"]


def read(folder, split, dtype=np.uint16):
    return np.fromfile(Path(folder) / f"{split}.bin", dtype=dtype)


def read_meta(folder):
    from data.loader import read_meta
    assert (Path(folder) / "meta.json").is_file() and not (Path(folder) / "meta.pkl").exists()
    return read_meta(folder)


def joined(docs):
    return "".join(d + EOT_TEXT for d in docs)


def assert_gpt2_meta(folder):
    meta = read_meta(folder)
    assert (meta["vocab_size"], meta["tokenizer"], meta["dtype"]) == (50304, "gpt2", "uint16")
    assert "stoi" not in meta


# ---- HuggingFace corpora: the tokenize-and-write half, on local documents -------------------

@pytest.mark.parametrize("script", ["tinystories", "openwebtext"])
def test_hf_splits_decode_to_documents(script, docs, enc, tmp_path):
    write = importlib.import_module(f"data.{script}.prepare").write
    train_docs, val_docs = docs[:550], docs[550:]
    counts = write(train_docs, val_docs, tmp_path / "a", num_proc=1)
    train, val = read(tmp_path / "a", "train"), read(tmp_path / "a", "val")
    assert enc.decode(train.tolist()) == joined(train_docs)
    assert enc.decode(val.tolist()) == joined(val_docs)
    # one EOT after each document; a document that spells <|endoftext|> does not make one
    assert (train == EOT).sum() == 550 and (val == EOT).sum() == 50
    expected = sum(len(enc.encode_ordinary(d)) + 1 for d in val_docs)
    assert counts == {"train": len(train), "val": len(val)} and len(val) == expected
    assert_gpt2_meta(tmp_path / "a")
    write(train_docs, val_docs, tmp_path / "b", num_proc=2)
    for split in ("train", "val"):
        assert (tmp_path / "a" / f"{split}.bin").read_bytes() == \
            (tmp_path / "b" / f"{split}.bin").read_bytes()


def test_cosmopedia_val_first_then_budgeted_train(docs, enc, tmp_path):
    from data.cosmopedia.prepare import write
    counts = write(iter(docs), tmp_path / "a", val_docs=20, max_docs=300, num_proc=1,
                   subset="stories")
    train, val = read(tmp_path / "a", "train"), read(tmp_path / "a", "val")
    assert enc.decode(val.tolist()) == joined(docs[:20])
    assert enc.decode(train.tolist()) == joined(docs[20:320])
    assert counts == {"train": len(train), "val": len(val)}
    assert read_meta(tmp_path / "a")["source"] == "HuggingFaceTB/cosmopedia/stories"
    assert_gpt2_meta(tmp_path / "a")
    write(iter(docs), tmp_path / "b", val_docs=20, max_docs=300, num_proc=2)
    for split in ("train", "val"):
        assert (tmp_path / "a" / f"{split}.bin").read_bytes() == \
            (tmp_path / "b" / f"{split}.bin").read_bytes()
    # a token budget keeps whole documents: it stops after the one that reaches the budget
    write(iter(docs), tmp_path / "c", val_docs=20, max_tokens=5000, num_proc=2)
    train = read(tmp_path / "c", "train")
    lengths = np.cumsum([len(enc.encode_ordinary(d)) + 1 for d in docs[20:]])
    k = int(np.searchsorted(lengths, 5000))  # the document that reaches 5000 tokens
    assert len(train) == lengths[k] >= 5000 > lengths[k - 1]
    assert enc.decode(train.tolist()) == joined(docs[20:21 + k])


@pytest.mark.parametrize("script", ["tinystories", "openwebtext", "cosmopedia"])
def test_missing_datasets_package_is_one_line(script, monkeypatch):
    mod = importlib.import_module(f"data.{script}.prepare")
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` raises ImportError
    with pytest.raises(SystemExit) as e:
        run_cli(mod.SETTINGS, mod.prepare, "prepare.py", argv=[])
    assert e.value.code == (f"error: python -m data.{script}.prepare needs the 'datasets' "
                            f"package: pip install datasets")


def test_missing_datasets_cli_has_no_traceback():
    # as `python -m data.tinystories.prepare`, with `import datasets` failing
    code = ("import runpy, sys; sys.modules['datasets'] = None; "
            "runpy.run_module('data.tinystories.prepare', run_name='__main__', alter_sys=True)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [
        "error: python -m data.tinystories.prepare needs the 'datasets' package: "
        "pip install datasets"]


@pytest.mark.parametrize("script", ["shakespeare_char", "shakespeare", "text", "tinystories",
                                    "openwebtext", "cosmopedia"])
def test_prepare_scripts_run_as_modules_with_help(script):
    r = subprocess.run([sys.executable, "-m", f"data.{script}.prepare", "--help"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and r.stderr == ""
    lines = r.stdout.splitlines()
    assert lines[0].startswith(f"usage: python -m data.{script}.prepare ")
    settings = importlib.import_module(f"data.{script}.prepare").SETTINGS
    for key, (default, text) in settings.items():
        assert text and any(ln.strip().startswith(f"--{key}={default!r}") and ln.endswith(text)
                            for ln in lines), key


# ---- data/text/prepare.py: the user's own text ----------------------------------------------

def prepare_text(path, name, data_dir, **cfg):
    from common import defaults
    from data.text.prepare import SETTINGS, prepare
    return prepare(dict(defaults(SETTINGS), input=str(path), name=name, data_dir=str(data_dir),
                        **cfg))


def decode_split(folder, split, enc=None):
    meta = read_meta(folder)
    ids = read(folder, split, meta["dtype"])
    if tokenizer_kind(meta) == "gpt2":
        return enc.decode(ids.tolist())
    return "".join(meta["itos"][int(i)] for i in ids)


def test_text_char_on_corpus_matches_shakespeare_char(corpus, tmp_path):
    counts = prepare_text(corpus, "mine", tmp_path)
    folder = tmp_path / "mine"
    meta = read_meta(folder)
    # Tiny Shakespeare is ASCII: the byte split is the character split of shakespeare_char
    assert counts == {"train": 1_003_854, "val": 111_540}
    assert (meta["vocab_size"], meta["tokenizer"], meta["dtype"]) == (65, "char", "uint16")
    text = corpus.read_text(encoding="utf-8")
    assert decode_split(folder, "train") + decode_split(folder, "val") == text
    assert decode_split(folder, "val") == text[1_003_854:]


def test_text_gpt2_on_corpus_is_the_whole_text_tokenized(corpus, enc, tmp_path):
    # 4 KB chunks, 2 processes: chunks are cut after a newline between two lines of text, so
    # the ids are exactly those of tokenizing each split whole (as data/shakespeare does)
    counts = prepare_text(corpus, "mine", tmp_path, tokenizer="gpt2", num_proc=2,
                          chunk_size=4096)
    text = corpus.read_text(encoding="utf-8")
    assert counts == {"train": 301_966, "val": 36_059}
    assert read(tmp_path / "mine", "train").tolist() == enc.encode_ordinary(text[:1_003_854])
    assert read(tmp_path / "mine", "val").tolist() == enc.encode_ordinary(text[1_003_854:])
    assert_gpt2_meta(tmp_path / "mine")


TRICKY = "Café — naïve 🙂 façade\n" * 7 + "🎭🎭 end — é\n"


@pytest.mark.parametrize("tokenizer", ["char", "gpt2"])
@pytest.mark.parametrize("chunk_size", [1, 2, 3, 5, 64])
def test_text_streams_across_multibyte_characters(tokenizer, chunk_size, request, tmp_path):
    enc = request.getfixturevalue("enc") if tokenizer == "gpt2" else None
    path = tmp_path / "t.txt"
    path.write_text(TRICKY, encoding="utf-8")
    data = TRICKY.encode("utf-8")
    # 0.13 puts the raw cut inside a 4-byte emoji: it must move forward to the next character
    raw_cut = int(len(data) * (1 - 0.13))
    assert data[raw_cut] & 0xC0 == 0x80
    prepare_text(path, "t", tmp_path, tokenizer=tokenizer, chunk_size=chunk_size,
                 val_fraction=0.13)
    cut = char_boundary(path, raw_cut)
    assert cut > raw_cut
    assert decode_split(tmp_path / "t", "train", enc) == data[:cut].decode("utf-8")
    assert decode_split(tmp_path / "t", "val", enc) == data[cut:].decode("utf-8")


def test_text_with_more_than_65536_characters_is_uint32(tmp_path):
    import torch

    from data.loader import Data
    from train import DEFAULTS, resolve
    # every code point from U+0100 on (no surrogates), then the last ones (ids > 65535) again
    chars = [chr(c) for c in range(0x100, 0x100 + 70_000) if not 0xD800 <= c < 0xE000]
    text = "".join(chars) + "".join(chars[65536:]) * 40
    (tmp_path / "u.txt").write_text(text, encoding="utf-8")
    counts = prepare_text(tmp_path / "u.txt", "wide", tmp_path, chunk_size=1000,
                          val_fraction=0.3)
    meta = read_meta(tmp_path / "wide")
    assert (meta["vocab_size"], meta["dtype"]) == (len(chars), "uint32")
    expected = list(range(len(chars))) + list(range(65536, len(chars))) * 40
    train = read(tmp_path / "wide", "train", np.uint32)
    assert train.tolist() + read(tmp_path / "wide", "val", np.uint32).tolist() == expected
    cfg = resolve(dict(DEFAULTS, device="cpu", data_dir=str(tmp_path), dataset="wide",
                       block_size=32, batch_size=8))
    data = Data(cfg, "cpu", seed=0)
    x, y = data.batch("train")
    # the loader draws its windows from a generator seeded with 0: the same starts here
    ix = torch.randint(counts["train"] - 32, (8,), generator=torch.Generator().manual_seed(0))
    assert x.tolist() == [train[i:i + 32].tolist() for i in ix]
    assert y.tolist() == [train[i + 1:i + 33].tolist() for i in ix]
    assert int(x.max()) > 65535


def test_train_on_prepared_text(corpus, enc, tiny_cfg, tmp_path):
    from data.tokenizer import Tokenizer
    from train import start, train
    text = corpus.read_text(encoding="utf-8")[:50_000]
    (tmp_path / "small.txt").write_text(text, encoding="utf-8")
    for tokenizer, vocab_size in (("char", len(set(text))), ("gpt2", 50304)):
        name = f"small_{tokenizer}"
        prepare_text(tmp_path / "small.txt", name, tmp_path, tokenizer=tokenizer)
        cfg = dict(tiny_cfg, data_dir=str(tmp_path), dataset=name, out_dir=str(tmp_path / name),
                   max_iters=2, lr_decay_iters=2, warmup_iters=1, eval_interval=2, eval_iters=1)
        run = start(cfg)
        assert run.args["vocab_size"] == vocab_size
        losses = train(cfg, run)
        assert np.isfinite(losses["val"])
        tok = Tokenizer(read_meta(tmp_path / name))
        assert tok.decode(tok.encode("ROMEO: good night")) == "ROMEO: good night"


@pytest.mark.parametrize("setup, args, message", [
    (None, {"input": "nope.txt"}, "error: input file '{tmp}/nope.txt' not found"),
    (b"", {}, "error: input file '{tmp}/in.txt' is empty"),
    (b"caf\xc3\xa9 ok\n\xff more", {},
     "error: '{tmp}/in.txt' is not UTF-8 text: invalid byte 0xff at byte offset 9"),
    (b"caf\xc3\xa9 ok\n\xff more", {"tokenizer": "gpt2"},
     "error: '{tmp}/in.txt' is not UTF-8 text: invalid byte 0xff at byte offset 9"),
    (b"abc\n", {"name": "a/b"},
     "error: --name must be a plain folder name (letters, digits, '_', '.', '-'), got 'a/b'"),
    (b"abc\n", {"name": "shakespeare", "data_dir": str(ROOT / "data")},
     f"error: 'shakespeare' is a built-in dataset ({ROOT}/data/shakespeare/prepare.py); "
     f"choose another --name"),
])
def test_text_errors_are_one_line(setup, args, message, tmp_path):
    from data.text.prepare import SETTINGS, prepare
    if setup is not None:
        (tmp_path / "in.txt").write_bytes(setup)
    cfg = dict(input=str(tmp_path / "in.txt"), name="x", data_dir=str(tmp_path / "d")) | args
    if "input" in args:
        cfg["input"] = str(tmp_path / args["input"])
    argv = [f"--{k}={v}" for k, v in cfg.items()]
    with pytest.raises(SystemExit) as e:
        run_cli(SETTINGS, prepare, "-m data.text.prepare", argv=argv)
    assert e.value.code == message.format(tmp=tmp_path)
    assert not (tmp_path / "d" / "x").exists()  # nothing half-written is left behind


def test_text_cli_error_has_no_traceback(tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"ab\x80c")
    r = subprocess.run([sys.executable, "-m", "data.text.prepare", f"--input={tmp_path}/bad.txt",
                        "--name=bad", f"--data_dir={tmp_path}"], capture_output=True, text=True,
                       cwd=ROOT)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == (
        f"error: '{tmp_path}/bad.txt' is not UTF-8 text: invalid byte 0x80 at byte offset 2")


# ---- GPT-2 BPE offline without tiktoken's cache ----------------------------------------------

@pytest.fixture
def no_gpt2_files(tmp_path, monkeypatch):
    """An empty tiktoken cache and no network: every GPT-2 BPE download fails, as offline."""
    pytest.importorskip("tiktoken")
    import requests
    import tiktoken.registry

    def offline(*args, **kwargs):
        raise requests.exceptions.ConnectionError("Max retries exceeded (offline)")

    cache = tmp_path / "empty_cache"
    cache.mkdir()
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(cache))
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})  # forget the encoding loaded so far
    monkeypatch.setattr(requests, "get", offline)
    return (rf"^GPT-2 BPE needs its encoding files \(encoder\.json and vocab\.bpe from "
            rf"https://\S+\), which are not in the tiktoken cache {cache} and could not be "
            rf"downloaded \(ConnectionError\); set TIKTOKEN_CACHE_DIR to a cache that holds "
            rf"them, or go online once to fill it$")


def test_gpt2_offline_without_its_files_is_one_line(no_gpt2_files, corpus, tmp_path,
                                                    monkeypatch):
    import types

    from data.common import DataError, gpt2_meta, write_splits
    from data.loader import Data
    from data.shakespeare.prepare import SETTINGS, main
    from data.tokenizer import Tokenizer, gpt2_encoding
    from data.vocab import gpt2_vocab
    from train import DEFAULTS, resolve
    with pytest.raises(DataError, match=no_gpt2_files):
        gpt2_encoding()
    with pytest.raises(DataError, match=no_gpt2_files):
        Tokenizer(gpt2_meta())  # sample.py, bench_export
    with pytest.raises(DataError, match=no_gpt2_files):
        gpt2_vocab()  # export --format=hf / gguf
    # python -m data.shakespeare.prepare: one line, and no dataset folder
    with pytest.raises(SystemExit) as e:
        run_cli(SETTINGS, main, "-m data.shakespeare.prepare",
                argv=[f"--input={corpus}", f"--out={tmp_path / 'sp'}"])
    assert e.value.code.startswith("error: GPT-2 BPE needs its encoding files")
    assert not (tmp_path / "sp").exists()
    # python train.py --dataset=shakespeare prepares it: the same line
    cfg = resolve(dict(DEFAULTS, device="cpu", data_dir=str(tmp_path), dataset="shakespeare"))
    with pytest.raises(DataError, match=no_gpt2_files):
        Data(cfg, "cpu", 0)
    # a GPT-2 dataset prepared elsewhere trains; its bits per byte need the files
    write_splits([1, 2, 3] * 40, [3, 2, 1] * 40, tmp_path / "bpe", gpt2_meta())
    data = Data(dict(cfg, dataset="bpe", block_size=8, batch_size=4), "cpu", 0)
    assert data.batch("train")[0].shape == (4, 8)
    with pytest.raises(DataError, match=no_gpt2_files):
        _ = data.val_bytes_per_token
    # the user's text with the GPT-2 tokenizer, and the HF corpora before their download
    (tmp_path / "in.txt").write_text("some text\n" * 100)
    with pytest.raises(DataError, match=no_gpt2_files):
        prepare_text(tmp_path / "in.txt", "mine", tmp_path, tokenizer="gpt2")
    assert not (tmp_path / "mine").exists()
    monkeypatch.setitem(sys.modules, "datasets", types.ModuleType("datasets"))  # installed
    for script in ("tinystories", "openwebtext", "cosmopedia"):
        mod = importlib.import_module(f"data.{script}.prepare")
        with pytest.raises(SystemExit) as e:
            run_cli(mod.SETTINGS, mod.prepare, "prepare.py", argv=[])
        assert e.value.code.startswith("error: GPT-2 BPE needs its encoding files"), script


def test_gpt2_offline_cli_has_no_traceback(corpus, tmp_path):
    # a real process: an empty cache, and every connection refused (a proxy nobody listens on)
    (tmp_path / "cache").mkdir()
    env = {k: v for k, v in os.environ.items() if k.lower() != "no_proxy"}
    env.update(TIKTOKEN_CACHE_DIR=str(tmp_path / "cache"), HTTPS_PROXY="http://127.0.0.1:9",
               https_proxy="http://127.0.0.1:9")
    r = subprocess.run([sys.executable, "-m", "data.shakespeare.prepare", f"--input={corpus}",
                        f"--out={tmp_path / 'sp'}"], capture_output=True, text=True, cwd=ROOT,
                       env=env, timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [
        f"error: GPT-2 BPE needs its encoding files (encoder.json and vocab.bpe from "
        f"https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/), which are not in "
        f"the tiktoken cache {tmp_path}/cache and could not be downloaded (ProxyError); set "
        f"TIKTOKEN_CACHE_DIR to a cache that holds them, or go online once to fill it"]
    assert not (tmp_path / "sp").exists()


def test_gpt2_tests_skip_without_its_files(tmp_path):
    # the suite offline with an empty tiktoken cache: GPT-2 tests skip, saying why
    (tmp_path / "cache").mkdir()
    env = dict(os.environ, TIKTOKEN_CACHE_DIR=str(tmp_path / "cache"))
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                        "tests/test_data.py::test_bytes_per_token_gives_bits_per_byte"],
                       capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "1 skipped" in r.stdout and "GPT-2 BPE unavailable offline: GPT-2 BPE needs its " \
        "encoding files" in r.stdout


# ---- Ctrl-C: no traceback, no partial files --------------------------------------------------

def test_ctrl_c_while_writing_leaves_the_old_dataset_or_nothing(tmp_path):
    from data.common import DatasetWriter, char_meta, write_splits
    folder = tmp_path / "ds"
    write_splits([0, 1] * 10, [1, 0] * 5, folder, char_meta(["a", "b"]))
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(KeyboardInterrupt), \
            DatasetWriter(folder, char_meta(["a", "b", "c"])) as out:
        out.split("train").write([2] * 50)
        raise KeyboardInterrupt
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # no .tmp files
    with pytest.raises(KeyboardInterrupt), DatasetWriter(tmp_path / "new", char_meta(["a"])) as out:
        out.split("train").write([0])
        raise KeyboardInterrupt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


def test_ctrl_c_waits_for_the_renames_that_swap_a_dataset_in():
    import signal

    from data.common import ctrl_c_deferred
    done = []
    with pytest.raises(KeyboardInterrupt):
        with ctrl_c_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            done.append("renamed")
    assert done == ["renamed"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_ctrl_c_in_gpt2_workers_leaves_no_file_and_no_traceback(corpus, enc, tmp_path):
    import signal
    import time
    big = tmp_path / "big.txt"
    big.write_text(corpus.read_text(encoding="utf-8") * 30, encoding="utf-8")  # 33 MB
    p = subprocess.Popen([sys.executable, "-m", "data.text.prepare", f"--input={big}",
                          "--name=big", f"--data_dir={tmp_path}", "--tokenizer=gpt2",
                          "--num_proc=2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, cwd=ROOT, start_new_session=True)
    deadline = time.time() + 60
    # once the workers' first tokens are in train.bin's temporary file, Ctrl-C (to the group)
    while time.time() < deadline and p.poll() is None and not any(
            f.stat().st_size for f in (tmp_path / "big").glob(".train.bin.tmp*")):
        time.sleep(0.01)
    assert p.poll() is None, "the prepare ended before it could be interrupted"
    os.killpg(p.pid, signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode != 0 and "Traceback" not in err, err
    assert not (tmp_path / "big").exists()  # no partial dataset, no temporary files


IDLE_WORKERS = """
import sys, time
from common import run_cli
from data.common import DatasetWriter, gpt2_meta, write_docs

def docs():  # two batches for the two workers, then the reading stalls: the workers wait idle
    for i in range(1000):
        yield "a short document. " * 20
        if i == 600:
            print("idle", flush=True)
            time.sleep(60)

def write(cfg):
    with DatasetWriter(sys.argv[1], gpt2_meta()) as out:
        write_docs(docs(), out.split("train"), num_proc=2)

run_cli({}, write, "idle", argv=[])
"""


def test_ctrl_c_reaches_idle_gpt2_workers_without_a_traceback(enc, tmp_path):
    import signal
    p = subprocess.Popen([sys.executable, "-c", IDLE_WORKERS, str(tmp_path / "ds")],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                         start_new_session=True)
    assert p.stdout.readline() == "idle\n"
    os.killpg(p.pid, signal.SIGINT)  # as Ctrl-C in a terminal: every process of the group
    try:
        _, err = p.communicate(timeout=30)
    except subprocess.TimeoutExpired:  # workers that die of it can leave the pool hanging
        os.killpg(p.pid, signal.SIGKILL)
        pytest.fail(f"still running 30 s after Ctrl-C: {p.communicate()[1][-2000:]}")
    assert p.returncode != 0 and "Traceback" not in err, err
    assert not (tmp_path / "ds").exists()
