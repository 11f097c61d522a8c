"""Checkpoint files: atomic writes, and one clear error for every kind of bad file."""

import os

import pytest
import torch

from common import CHECKPOINT_VERSION, CheckpointError, load_checkpoint, save_checkpoint


def good(path):
    save_checkpoint({"arch": "gpt", "model_args": {"n_layer": 1}, "model": {"w": torch.ones(3)}},
                    path)


def test_round_trip_and_no_temp_files_left(tmp_path):
    path = tmp_path / "ckpt.pt"
    good(path)
    ckpt = load_checkpoint(path, arch="gpt")
    assert ckpt["format_version"] == CHECKPOINT_VERSION and torch.equal(ckpt["model"]["w"],
                                                                    torch.ones(3))
    assert os.listdir(tmp_path) == ["ckpt.pt"]


def test_failed_write_keeps_the_old_checkpoint(tmp_path):
    path = tmp_path / "ckpt.pt"
    good(path)
    with pytest.raises(AttributeError):  # torch.save fails midway: a lambda cannot be pickled
        save_checkpoint({"arch": "gpt", "model_args": {}, "model": {}, "bad": lambda: 0}, path)
    assert load_checkpoint(path)["model"]["w"].sum() == 3
    assert os.listdir(tmp_path) == ["ckpt.pt"]


def test_truncated_file(tmp_path):
    path = tmp_path / "ckpt.pt"
    good(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(path)


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "ckpt.pt"
    path.write_text("hello")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(path)
    torch.save({"something": 1}, path)
    with pytest.raises(CheckpointError, match="not a BitGPT training checkpoint"):
        load_checkpoint(path)


def test_newer_format_version(tmp_path):
    path = tmp_path / "ckpt.pt"
    torch.save({"format_version": CHECKPOINT_VERSION + 1, "model": {}, "model_args": {}}, path)
    with pytest.raises(CheckpointError, match=f"format version {CHECKPOINT_VERSION + 1}"):
        load_checkpoint(path)


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_pickle_that_runs_code_is_refused(tmp_path):
    path = tmp_path / "ckpt.pt"
    torch.save({"format_version": CHECKPOINT_VERSION, "model": Evil(), "model_args": {}}, path)
    with pytest.raises(CheckpointError, match="refused for safety"):
        load_checkpoint(path)


def test_missing_file_says_how_to_make_one(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint at .*train one first"):
        load_checkpoint(tmp_path / "nope.pt")


def test_weights_that_do_not_fit_the_model(tmp_path):
    from common import model_from_checkpoint
    path = tmp_path / "ckpt.pt"
    args = dict(block_size=8, vocab_size=10, n_layer=1, n_head=1, n_embd=8)
    save_checkpoint({"arch": "gpt", "model_args": args, "model": {"w": torch.ones(3)}}, path)
    with pytest.raises(CheckpointError, match="does not fit this code's 'gpt' model"):
        model_from_checkpoint(load_checkpoint(path), path)
    save_checkpoint({"arch": "mamba", "model_args": args, "model": {}}, path)
    with pytest.raises(CheckpointError, match="unknown arch 'mamba'"):
        model_from_checkpoint(load_checkpoint(path), path)
