"""Batches for training: random windows of a prepared dataset's train.bin / val.bin."""

import functools
import importlib
import pickle
from pathlib import Path

import numpy as np
import torch

from common import ConfigError

from .tokenizer import tokenizer_kind

REPO = Path(__file__).resolve().parents[1]

AUTO_PREPARE = ("shakespeare_char", "shakespeare")  # small enough to prepare on the fly


class Data:
    """Random windows of a tokenized dataset: data_dir/dataset/{train,val}.bin (+ meta.pkl)."""

    def __init__(self, cfg, device, seed, rank=0, world_size=1):
        self.folder = Path(cfg["data_dir"]) / cfg["dataset"]
        self.block_size, self.batch_size, self.device = cfg["block_size"], cfg["batch_size"], device
        self.ensure_prepared(cfg)
        self.meta = None
        if (self.folder / "meta.pkl").exists():
            with open(self.folder / "meta.pkl", "rb") as f:
                self.meta = pickle.load(f)
        # ids are uint16 unless meta says otherwise (folders prepared before meta had a dtype)
        dtype = (self.meta or {}).get("dtype", "uint16")
        if dtype not in ("uint16", "uint32"):
            raise ConfigError(f"{self.folder / 'meta.pkl'} has dtype {dtype!r}, not 'uint16' or "
                              f"'uint32'; prepare the dataset again")
        self.dtype = np.dtype(dtype)
        for split in ("train", "val"):
            n = (self.folder / f"{split}.bin").stat().st_size // self.dtype.itemsize
            if n <= self.block_size:
                raise ConfigError(f"{self.folder / f'{split}.bin'} has {n} tokens, too few for "
                                  f"block_size={self.block_size}; use more text or a smaller "
                                  f"--block_size")
        # every process draws the windows of all processes from one stream and keeps its own, so
        # N processes see exactly the batches one process sees with N times the accumulation
        self.rank, self.world_size = rank, world_size
        self.generator = torch.Generator().manual_seed(seed)  # checkpointed, for exact resume

    def ensure_prepared(self, cfg):
        if (self.folder / "train.bin").exists() and (self.folder / "val.bin").exists():
            return
        prepare_py = REPO / "data" / cfg["dataset"] / "prepare.py"
        if cfg["dataset"] in AUTO_PREPARE:
            importlib.import_module(f"data.{cfg['dataset']}.prepare").prepare(self.folder)
        elif prepare_py.exists():
            raise ConfigError(f"dataset '{cfg['dataset']}' is not prepared in {self.folder}; "
                              f"run: python -m data.{cfg['dataset']}.prepare")
        else:
            raise ConfigError(f"no dataset '{cfg['dataset']}' in {self.folder.parent} and no "
                              f"data/{cfg['dataset']}/prepare.py to make it")

    @functools.cached_property
    def val_bytes_per_token(self):
        """UTF-8 bytes of text per token of val.bin, to turn nats per token into bits per byte
        (which compares models across tokenizers); None when the tokenizer is unknown."""
        meta, tokenizer = self.meta or {}, tokenizer_kind(self.meta)
        if tokenizer == "char":
            lengths = np.zeros(meta["vocab_size"], dtype=np.int64)
            for i, ch in meta["itos"].items():
                lengths[int(i)] = len(ch.encode("utf-8"))
        elif tokenizer == "gpt2":
            import tiktoken
            enc = tiktoken.get_encoding("gpt2")  # <|endoftext|> separates texts: 0 bytes
            lengths = np.array([len(enc.decode_single_token_bytes(i)) if i < enc.eot_token
                                else 0 for i in range(enc.n_vocab)], dtype=np.int64)
        else:
            return None
        ids = np.memmap(self.folder / "val.bin", dtype=self.dtype, mode="r")
        counts = np.bincount(ids, minlength=len(lengths))[:len(lengths)]
        return float(counts @ lengths) / len(ids)

    def batch(self, split, generator=None):
        """A (x, y) batch of windows; training batches are this process's share, evaluation
        batches (from the given generator) are the same on every process."""
        # a fresh memmap per batch avoids a memory leak (as nanoGPT notes)
        data = np.memmap(self.folder / f"{split}.bin", dtype=self.dtype, mode="r")
        B, n = self.batch_size, 1 if generator else self.world_size
        r = 0 if generator else self.rank
        ix = torch.randint(len(data) - self.block_size, (n * B,),
                           generator=generator or self.generator)[r * B:(r + 1) * B]
        T = self.block_size
        x = torch.stack([torch.from_numpy(data[i:i + T].astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + T].astype(np.int64)) for i in ix])
        if self.device.startswith("cuda"):
            return (x.pin_memory().to(self.device, non_blocking=True),
                    y.pin_memory().to(self.device, non_blocking=True))
        return x.to(self.device), y.to(self.device)
