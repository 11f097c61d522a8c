"""Prepare scripts on the local Tiny Shakespeare copy: sizes and exact round trips."""

import pickle

import numpy as np
import pytest


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
    from settings import DEFAULTS, resolve
    monkeypatch.setenv("TINYSHAKESPEARE_PATH", str(corpus))
    cfg = resolve(dict(DEFAULTS, device="cpu", data_dir=str(tmp_path)))
    data = Data(cfg, "cpu", seed=0)
    assert data.meta["vocab_size"] == 65
    assert (tmp_path / "shakespeare_char" / "train.bin").stat().st_size == 2 * 1_003_854
    x, y = data.batch("train")
    assert x.shape == (12, 64) and (x[:, 1:] == y[:, :-1]).all()  # y is x shifted by one



def test_unprepared_dataset_names_its_prepare_script(tmp_path, monkeypatch):
    import data.loader
    import settings
    from configurator import ConfigError
    monkeypatch.setattr(data.loader, "AUTO_PREPARE", ())
    cfg = settings.resolve(dict(settings.DEFAULTS, device="cpu", data_dir=str(tmp_path),
                                dataset="shakespeare"))
    with pytest.raises(ConfigError, match=r"not prepared .*run: python data/shakespeare/prepare"):
        data.loader.Data(cfg, "cpu", seed=0)


def test_bytes_per_token_gives_bits_per_byte(corpus, tmp_path, monkeypatch):
    pytest.importorskip("tiktoken")
    from data.loader import Data
    from data.shakespeare.prepare import prepare
    from settings import DEFAULTS, resolve
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
