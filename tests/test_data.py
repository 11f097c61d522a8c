"""Prepare scripts on the local Tiny Shakespeare copy: sizes and exact round trips."""

import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def read_meta(folder):
    from data.loader import read_meta
    assert (Path(folder) / "meta.json").is_file() and not (Path(folder) / "meta.pkl").exists()
    return read_meta(folder)


def test_shakespeare_char(corpus, data_dir):
    folder = data_dir / "shakespeare_char"
    train = np.fromfile(folder / "train.bin", dtype=np.uint16)
    val = np.fromfile(folder / "val.bin", dtype=np.uint16)
    meta = read_meta(folder)
    assert (len(train), len(val), meta["vocab_size"]) == (1_003_854, 111_540, 65)
    assert (meta["tokenizer"], meta["dtype"]) == ("char", "uint16")
    text = "".join(meta["itos"][int(i)] for i in np.concatenate([train, val]))
    assert text == corpus.read_text(encoding="utf-8")


def test_shakespeare_gpt2(corpus, gpt2_encoding, tmp_path):
    enc = gpt2_encoding
    from data.shakespeare.prepare import prepare
    prepare(tmp_path, corpus)
    train = np.fromfile(tmp_path / "train.bin", dtype=np.uint16)
    val = np.fromfile(tmp_path / "val.bin", dtype=np.uint16)
    assert (len(train), len(val)) == (301_966, 36_059)
    # the model's vocabulary is GPT-2's 50257 padded to 50304, as train.py's default
    meta = read_meta(tmp_path)
    assert (meta["vocab_size"], meta["tokenizer"], meta["dtype"]) == (50304, "gpt2", "uint16")
    text = corpus.read_text(encoding="utf-8")
    n = int(len(text) * 0.9)
    assert enc.decode(train.tolist()) == text[:n] and enc.decode(val.tolist()) == text[n:]


def test_training_prepares_shakespeare_char_when_missing(corpus, tmp_path, monkeypatch):
    from data.loader import Data
    from train import DEFAULTS, resolve
    monkeypatch.setenv("TINYSHAKESPEARE_PATH", str(corpus))
    cfg = resolve(dict(DEFAULTS, device="cpu", data_dir=str(tmp_path)))
    data = Data(cfg, "cpu", seed=0)
    assert data.meta["vocab_size"] == 65
    assert (tmp_path / "shakespeare_char" / "train.bin").stat().st_size == 2 * 1_003_854
    x, y = data.batch("train")
    assert x.shape == (12, 64) and (x[:, 1:] == y[:, :-1]).all()  # y is x shifted by one


def test_unprepared_dataset_names_its_prepare_script(tmp_path, monkeypatch):
    import data.loader
    from common import ConfigError
    from train import DEFAULTS, resolve
    monkeypatch.setattr(data.loader, "AUTO_PREPARE", ())
    cfg = resolve(dict(DEFAULTS, device="cpu", data_dir=str(tmp_path), dataset="shakespeare"))
    with pytest.raises(ConfigError,
                       match=r"not prepared .*run: python -m data\.shakespeare\.prepare$"):
        data.loader.Data(cfg, "cpu", seed=0)


def test_bytes_per_token_gives_bits_per_byte(corpus, gpt2_encoding, tmp_path, monkeypatch):
    from data.loader import Data
    from data.shakespeare.prepare import prepare
    from train import DEFAULTS, resolve
    prepare(tmp_path / "shakespeare", corpus)
    text = corpus.read_text(encoding="utf-8")
    val_text = text[int(len(text) * 0.9):]
    cfg = resolve(dict(DEFAULTS, device="cpu", data_dir=str(tmp_path), dataset="shakespeare"))
    assert Data(cfg, "cpu", 0).val_bytes_per_token == len(val_text.encode()) / 36_059
    (tmp_path / "uni").mkdir()  # characters of 1, 2 and 4 bytes
    from data.common import char_meta, write_splits
    meta = char_meta(["a", "é", "🙂"])
    write_splits([0] * 100, [0, 1, 2, 2] * 20, tmp_path / "uni", meta)
    cfg = resolve(dict(cfg, dataset="uni", block_size=8))
    assert Data(cfg, "cpu", 0).val_bytes_per_token == (1 + 2 + 4 + 4) / 4


def test_shakespeare_char_cli_runs_as_module(corpus, tmp_path):
    r = subprocess.run([sys.executable, "-m", "data.shakespeare_char.prepare", f"--input={corpus}",
                        f"--out={tmp_path / 'sc'}"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    meta = read_meta(tmp_path / "sc")
    assert meta["vocab_size"] == 65 and (tmp_path / "sc" / "val.bin").stat().st_size == 2 * 111_540
    r = subprocess.run([sys.executable, "-m", "data.shakespeare_char.prepare", "--outt=x"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip() == ("error: unknown config key 'outt' (did you mean 'out'?); run with "
                                "--help to list every key")


def test_a_failed_write_leaves_the_old_dataset_whole(tmp_path):
    from data.common import DatasetWriter, char_meta, write_splits
    folder = tmp_path / "ds"
    old = char_meta(["a", "b"])
    write_splits([0, 1] * 10, [1, 0] * 5, folder, old)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert sorted(before) == ["meta.json", "train.bin", "val.bin"]
    # the new train split is complete, val fails halfway: nothing of the new dataset lands
    with pytest.raises(RuntimeError, match="halfway"), \
            DatasetWriter(folder, char_meta(["a", "b", "c"])) as out:
        out.split("train").write([2] * 50)
        out.split("val").write([2] * 5)
        raise RuntimeError("halfway")
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # no temporary files
    # every split complete but meta.json cannot be written: still the old dataset
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)), \
            DatasetWriter(folder, dict(char_meta(["a", "b", "c"]), bad=lambda: 0)) as out:
        out.split("train").write([2] * 50)
        out.split("val").write([2] * 5)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    # a new folder that fails is removed, so it cannot look like a dataset
    with pytest.raises(RuntimeError), DatasetWriter(tmp_path / "new", old) as out:
        out.split("train").write([0])
        raise RuntimeError("halfway")
    assert not (tmp_path / "new").exists()
    # and a complete write replaces every file
    write_splits([2] * 50, [2, 1] * 5, folder, char_meta(["a", "b", "c"]))
    assert read_meta(folder)["vocab_size"] == 3
    assert np.fromfile(folder / "train.bin", dtype=np.uint16).tolist() == [2] * 50
    assert sorted(p.name for p in folder.iterdir()) == ["meta.json", "train.bin", "val.bin"]


def test_an_interrupted_download_leaves_no_file(tmp_path, monkeypatch):
    import io
    import urllib.request

    from data.common import download

    class Response(io.BytesIO):
        """An HTTP response whose connection drops after `lost_at` bytes."""
        lost_at = None

        @property
        def headers(self):
            return {"Content-Length": str(len(self.getvalue()))}

        def read(self, n=-1):
            if self.lost_at is not None and self.tell() >= self.lost_at:
                raise ConnectionResetError("connection lost")
            return super().read(n)

    cut = Response(b"x" * (3 << 16))
    cut.lost_at = 1 << 16
    monkeypatch.setattr(urllib.request, "urlopen", lambda url: cut)
    with pytest.raises(ConnectionResetError):
        download("http://example.invalid/input.txt", tmp_path / "input.txt")
    assert list(tmp_path.iterdir()) == []  # neither input.txt nor a partial file
    monkeypatch.setattr(urllib.request, "urlopen", lambda url: Response(b"whole text"))
    download("http://example.invalid/input.txt", tmp_path / "input.txt")
    assert [p.name for p in tmp_path.iterdir()] == ["input.txt"]
    assert (tmp_path / "input.txt").read_text() == "whole text"


def test_tiny_shakespeare_offline(tmp_path, monkeypatch):
    """Offline, the text comes from the other Shakespeare dataset's copy; with none, the error
    names the prepare command that takes --input (train.py has no such key)."""
    import urllib.request

    import data.common as common

    def offline(url):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    monkeypatch.delenv(common.TINYSHAKESPEARE_ENV, raising=False)
    monkeypatch.setattr(common, "REPO", tmp_path)
    (tmp_path / "data" / "shakespeare_char").mkdir(parents=True)
    (tmp_path / "data" / "shakespeare_char" / "input.txt").write_text("First Citizen:")
    assert common.tinyshakespeare_text(tmp_path / "data" / "shakespeare") == "First Citizen:"
    (tmp_path / "data" / "shakespeare_char" / "input.txt").unlink()
    with pytest.raises(common.DataError, match=r"offline\? put the text at .*input.txt, or run "
                       r"python -m data.shakespeare.prepare --out=.* --input=/path/input.txt"):
        common.tinyshakespeare_text(tmp_path / "data" / "shakespeare")


# ---- meta: JSON, and old meta.pkl files only as plain values ---------------------------------

def tiny(tmp_path, name="ds", meta=None, **cfg):
    """A small char dataset in tmp_path/name and the training config that reads it."""
    from data.common import char_meta, write_splits
    from train import DEFAULTS, resolve
    write_splits(list(range(3)) * 40, [2, 1, 0] * 20, tmp_path / name,
                 meta or char_meta(["a", "b", "é"]))
    return resolve(dict(DEFAULTS, device="cpu", data_dir=str(tmp_path), dataset=name,
                        block_size=8, batch_size=4, **cfg))


def test_meta_is_json_with_the_same_dict(tmp_path):
    import json

    from data.common import char_meta
    from data.loader import Data
    cfg = tiny(tmp_path)
    written = json.loads((tmp_path / "ds" / "meta.json").read_text())
    assert written["itos"] == {"0": "a", "1": "b", "2": "é"}  # JSON's keys are strings
    # read back as written, with the token count of each .bin file
    assert read_meta(tmp_path / "ds") == dict(char_meta(["a", "b", "é"]),
                                              split_tokens={"train": 120, "val": 60})
    assert Data(cfg, "cpu", 0).meta == char_meta(["a", "b", "é"])


def test_an_old_plain_meta_pkl_still_loads(tmp_path):
    from data.common import char_meta
    from data.loader import Data, read_meta
    from data.tokenizer import Tokenizer
    cfg = tiny(tmp_path)
    (tmp_path / "ds" / "meta.json").unlink()
    old = char_meta(["a", "b", "é"])
    (tmp_path / "ds" / "meta.pkl").write_bytes(pickle.dumps(old))
    data = Data(cfg, "cpu", 0)
    assert data.meta == old and data.note is None
    assert Tokenizer(data.meta).decode([2, 0]) == "éa"
    # nanoGPT's meta.pkl (no tokenizer, no dtype), in every pickle protocol
    nano = {"vocab_size": 3, "itos": {0: "a", 1: "b", 2: "é"}, "stoi": {"a": 0, "b": 1, "é": 2}}
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        (tmp_path / "ds" / "meta.pkl").write_bytes(pickle.dumps(nano, protocol=protocol))
        assert read_meta(tmp_path / "ds") == nano
    # preparing the folder again writes meta.json and takes the old meta.pkl away
    tiny(tmp_path)
    assert sorted(p.name for p in (tmp_path / "ds").iterdir()) == [
        "meta.json", "train.bin", "val.bin"]


class RunsCode:
    """A pickle payload: unpickling it calls os.system."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        import os
        return os.system, (self.command,)


def test_a_meta_pkl_that_runs_code_is_refused(tmp_path):
    from common import UserError
    from data.common import DataError
    from data.loader import Data, read_meta
    cfg = tiny(tmp_path)
    (tmp_path / "ds" / "meta.json").unlink()
    marker = tmp_path / "pwned"
    payload = {"vocab_size": 3, "dtype": RunsCode(f"touch {marker}")}
    (tmp_path / "ds" / "meta.pkl").write_bytes(pickle.dumps(payload))
    message = (rf"^{tmp_path}/ds/meta\.pkl holds objects, not just plain values \(it names "
               rf"(posix|os)\.system\); refused, as unpickling it could run code: prepare the "
               rf"dataset again \(python -m data\.text\.prepare --input=YOUR_TEXT --name=ds "
               rf"--data_dir={tmp_path}\) to write meta\.json$")
    with pytest.raises(DataError, match=message):
        Data(cfg, "cpu", 0)
    with pytest.raises(UserError, match=message):  # one line from run_cli, as any UserError
        read_meta(tmp_path / "ds")
    assert not marker.exists()
    # the payload does run with plain pickle: the test would notice a loader that used it
    pickle.loads((tmp_path / "ds" / "meta.pkl").read_bytes())
    assert marker.exists()
    # values that need no global but are not plain, and a truncated file: refused too
    (tmp_path / "ds" / "meta.pkl").write_bytes(pickle.dumps({"vocab_size": {1, 2}}))
    with pytest.raises(DataError, match=r"holds values other than dicts.*refused: prepare"):
        read_meta(tmp_path / "ds")
    (tmp_path / "ds" / "meta.pkl").write_bytes(pickle.dumps({"vocab_size": 3})[:-3])
    with pytest.raises(DataError, match=r"meta\.pkl is not a readable meta\.pkl \(.*\); prepare"):
        read_meta(tmp_path / "ds")
    (tmp_path / "ds" / "meta.json").write_text("{'vocab_size': 3}")
    with pytest.raises(DataError, match=r"meta\.json is not valid JSON \(.*\); prepare the "
                                        r"dataset again"):
        read_meta(tmp_path / "ds")


def test_a_built_in_dataset_names_its_prepare_script(tmp_path):
    from data.loader import prepare_command
    assert prepare_command(ROOT / "data" / "shakespeare") == "python -m data.shakespeare.prepare"
    assert prepare_command(tmp_path / "shakespeare") == (
        f"python -m data.shakespeare.prepare --out={tmp_path}/shakespeare")
    assert prepare_command(ROOT / "data" / "mine") == (
        "python -m data.text.prepare --input=YOUR_TEXT --name=mine")


def test_a_folder_without_meta_says_it_assumes_gpt2(tmp_path, capsys):
    from data.loader import Data
    from train import DEFAULTS, resolve
    (tmp_path / "raw").mkdir()
    for split in ("train", "val"):
        np.arange(100, dtype=np.uint16).tofile(tmp_path / "raw" / f"{split}.bin")
    cfg = resolve(dict(DEFAULTS, device="cpu", data_dir=str(tmp_path), dataset="raw",
                       block_size=8, batch_size=4))
    data = Data(cfg, "cpu", 0)
    note = (f"note: {tmp_path}/raw has no meta.json; assuming GPT-2 BPE, 50304 tokens (as "
            f"nanoGPT does)")
    assert data.meta is None and data.note == note
    assert capsys.readouterr().out == note + "\n"
    Data(cfg, "cpu", 0, rank=1, world_size=2)  # printed once, by rank 0
    assert capsys.readouterr().out == ""
    x, _ = data.batch("train")
    assert x.shape == (4, 8)


# ---- train.bin / val.bin changed under a run --------------------------------------------------

def test_a_split_changed_during_the_run_is_one_line(tmp_path):
    import torch

    from data.common import DataError
    from data.loader import Data
    cfg = tiny(tmp_path)
    data = Data(cfg, "cpu", 0)
    x, y = data.batch("train")
    assert (x[:, 1:] == y[:, :-1]).all()
    train, val = tmp_path / "ds" / "train.bin", tmp_path / "ds" / "val.bin"
    whole = train.read_bytes()
    tail = (rf"\): it is not the data this run trains on; the last checkpoint is intact, prepare "
            rf"the data again \(python -m data\.text\.prepare --input=YOUR_TEXT --name=ds "
            rf"--data_dir={tmp_path}\) and resume with --init_from=resume$")
    for content, now in ((b"", "now 0 tokens"), (whole[:10], "now 5 tokens"),
                         (whole[:-2], "now 119 tokens"), (whole + whole, "now 240 tokens"),
                         (None, "now deleted")):
        if content is None:
            train.unlink()
        else:
            train.write_bytes(content)
        with pytest.raises(DataError, match=rf"^{train} changed during the run \({now}, 120 "
                                            rf"when it started" + tail):
            data.batch("train")
    train.write_bytes(whole)  # the same data again: the run goes on
    assert data.batch("train")[0].shape == (4, 8)
    val.write_bytes(b"")  # evaluation batches, and bits per byte, read val.bin the same way
    with pytest.raises(DataError, match=rf"^{val} changed during the run \(now 0 tokens, 60 "):
        data.batch("val", torch.Generator().manual_seed(0))
    with pytest.raises(DataError, match=rf"^{val} changed during the run"):
        _ = data.val_bytes_per_token
