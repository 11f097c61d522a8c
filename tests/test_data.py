"""Prepare scripts on the local Tiny Shakespeare copy: sizes and exact round trips."""

import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_shakespeare_char(corpus, data_dir):
    folder = data_dir / "shakespeare_char"
    train = np.fromfile(folder / "train.bin", dtype=np.uint16)
    val = np.fromfile(folder / "val.bin", dtype=np.uint16)
    meta = pickle.loads((folder / "meta.pkl").read_bytes())
    assert (len(train), len(val), meta["vocab_size"]) == (1_003_854, 111_540, 65)
    assert (meta["tokenizer"], meta["dtype"]) == ("char", "uint16")
    text = "".join(meta["itos"][int(i)] for i in np.concatenate([train, val]))
    assert text == corpus.read_text(encoding="utf-8")


def test_shakespeare_gpt2(corpus, tmp_path):
    tiktoken = pytest.importorskip("tiktoken")
    try:
        enc = tiktoken.get_encoding("gpt2")
    except Exception as e:  # no network and no cache
        pytest.skip(f"GPT-2 BPE files unavailable offline ({e}); set TIKTOKEN_CACHE_DIR")
    from data.shakespeare.prepare import prepare
    prepare(tmp_path, corpus)
    train = np.fromfile(tmp_path / "train.bin", dtype=np.uint16)
    val = np.fromfile(tmp_path / "val.bin", dtype=np.uint16)
    assert (len(train), len(val)) == (301_966, 36_059)
    # the model's vocabulary is GPT-2's 50257 padded to 50304, as train.py's default
    meta = pickle.loads((tmp_path / "meta.pkl").read_bytes())
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


def test_bytes_per_token_gives_bits_per_byte(corpus, tmp_path, monkeypatch):
    pytest.importorskip("tiktoken")
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
    meta = pickle.loads((tmp_path / "sc" / "meta.pkl").read_bytes())
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
    assert sorted(before) == ["meta.pkl", "train.bin", "val.bin"]
    # the new train split is complete, val fails halfway: nothing of the new dataset lands
    with pytest.raises(RuntimeError, match="halfway"), \
            DatasetWriter(folder, char_meta(["a", "b", "c"])) as out:
        out.split("train").write([2] * 50)
        out.split("val").write([2] * 5)
        raise RuntimeError("halfway")
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # no temporary files
    # every split complete but meta.pkl cannot be written: still the old dataset
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
    assert pickle.loads((folder / "meta.pkl").read_bytes())["vocab_size"] == 3
    assert np.fromfile(folder / "train.bin", dtype=np.uint16).tolist() == [2] * 50
    assert sorted(p.name for p in folder.iterdir()) == ["meta.pkl", "train.bin", "val.bin"]


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
