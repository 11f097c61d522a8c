"""Batches for training: random windows of a prepared dataset's train.bin / val.bin; and
read_meta, the one reader of a dataset's meta.json."""

import functools
import importlib
import json
import os
from pathlib import Path

import numpy as np
import torch

from common import ConfigError, DataError

REPO = Path(__file__).resolve().parents[1]
META = "meta.json"  # the tokenizer facts of a dataset folder, as JSON (no code can hide in it)
OLD_META = "meta.pkl"  # what folders prepared before meta.json hold: the same dict, pickled
# GPT-2 has 50257 tokens; models get 50304, the next multiple of 64, as in nanoGPT (faster matmuls)
GPT2_VOCAB_SIZE = 50304
AUTO_PREPARE = ("shakespeare_char", "shakespeare")  # small enough to prepare on the fly


def prepare_command(folder):
    """The command that prepares dataset folder `folder` again."""
    folder = Path(folder)
    name, data_dir = folder.name, folder.parent
    if (REPO / "data" / name / "prepare.py").is_file():
        out = "" if folder.resolve() == REPO / "data" / name else f" --out={folder}"
        return f"python -m data.{name}.prepare{out}"
    out = "" if data_dir.resolve() == REPO / "data" else f" --data_dir={data_dir}"
    return f"python -m data.text.prepare --input=YOUR_TEXT --name={name}{out}"


def meta_path(folder):
    """folder's meta.json, else its old meta.pkl, else None."""
    for name in (META, OLD_META):
        if (Path(folder) / name).is_file():
            return Path(folder) / name
    return None


def read_meta(folder):
    """The dict a prepare script wrote for dataset folder `folder` ({'vocab_size', 'tokenizer',
    'dtype', ...}), or None when it has none. meta.json is read as JSON (itos' keys back to
    ints); an old meta.pkl only as plain values (data.meta.read_old_meta)."""
    path = meta_path(folder)
    again = f"prepare the dataset again ({prepare_command(folder)}) to write {META}"
    if path is None:
        return None
    if path.name == META:
        try:
            meta = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise DataError(f"{path} is not valid JSON ({str(e).splitlines()[0]}); {again}"
                            ) from None
    else:  # seam: a folder prepared before meta.json
        from data.meta import read_old_meta
        meta = read_old_meta(path, again)
    if not isinstance(meta, dict):
        raise DataError(f"{path} holds a {type(meta).__name__}, not a dict; {again}")
    if isinstance(meta.get("itos"), dict):
        meta["itos"] = {int(i): ch for i, ch in meta["itos"].items()}  # JSON keys are strings
    return meta


class Data:
    """Random windows of a tokenized dataset: data_dir/dataset/{train,val}.bin (+ meta.json).
    meta is None for a folder without one (nanoGPT's: GPT-2 BPE assumed); note then says so, in
    a line printed once (by rank 0)."""

    def __init__(self, cfg, device, seed, rank=0, world_size=1):
        self.folder = Path(cfg["data_dir"]) / cfg["dataset"]
        self.block_size, self.batch_size, self.device = cfg["block_size"], cfg["batch_size"], device
        self.ensure_prepared(cfg)
        self.meta = read_meta(self.folder)
        self.vocab_size = self.meta["vocab_size"] if self.meta else GPT2_VOCAB_SIZE
        self.note = None
        if self.meta is None:
            self.note = (f"note: {self.folder} has no {META}; assuming GPT-2 BPE, "
                         f"{GPT2_VOCAB_SIZE} tokens (as nanoGPT does)")
            if rank == 0:
                print(self.note)
        # ids are uint16 unless meta says otherwise (folders prepared before meta had a dtype)
        dtype = (self.meta or {}).get("dtype", "uint16")
        if dtype not in ("uint16", "uint32"):
            raise ConfigError(f"{meta_path(self.folder)} has dtype {dtype!r}, not 'uint16' or "
                              f"'uint32'; prepare the dataset again "
                              f"({prepare_command(self.folder)})")
        self.dtype = np.dtype(dtype)
        self.tokens, self.sizes = {}, {}  # of each split as the run starts; a change: DataError
        for split in ("train", "val"):
            self.sizes[split] = (self.folder / f"{split}.bin").stat().st_size
            n = self.sizes[split] // self.dtype.itemsize
            if n <= self.block_size:
                raise ConfigError(f"{self.folder / f'{split}.bin'} has {n} tokens, too few for "
                                  f"block_size={self.block_size}; use more text or a smaller "
                                  f"--block_size")
            self.tokens[split] = n
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
        lengths = self.token_bytes()
        if lengths is None:
            return None
        counts, n = np.zeros(len(lengths), dtype=np.int64), 0
        with self.open_split("val") as f:  # in chunks: val.bin may be large
            while chunk := f.read((1 << 24) * self.dtype.itemsize):
                ids = np.frombuffer(chunk, dtype=self.dtype)
                counts += np.bincount(ids, minlength=len(lengths))[:len(lengths)]
                n += len(ids)
        if n != self.tokens["val"]:
            raise self.changed("val", n)
        return float(counts @ lengths) / n

    def token_bytes(self):
        """UTF-8 bytes of each token id's text: characters' from meta, a BPE's from its tokenizer
        (None for a tokenizer.json, whose pieces need not be whole characters)."""
        itos = (self.meta or {}).get("itos")
        if itos is not None:  # one token per character
            return np.array([len(itos[i].encode("utf-8")) for i in range(len(itos))])
        from data.tokenizer import Tokenizer  # seam: a BPE dataset's token texts
        return Tokenizer(self.meta).token_bytes()

    def changed(self, split, now):
        """The DataError of a split whose file changed under the run (now: its tokens, or None
        when it is gone)."""
        now = "now deleted" if now is None else f"now {now:,} tokens"
        return DataError(f"{self.folder / f'{split}.bin'} changed during the run ({now}, "
                         f"{self.tokens[split]:,} when it started): it is not the data this run "
                         f"trains on; the last checkpoint is intact, prepare the data again "
                         f"({prepare_command(self.folder)}) and resume with --init_from=resume")

    def open_split(self, split):
        """The split's file, opened for reading; a DataError when it is gone or changed size."""
        try:
            f = open(self.folder / f"{split}.bin", "rb")
        except FileNotFoundError:
            raise self.changed(split, None) from None
        size = os.fstat(f.fileno()).st_size
        if size != self.sizes[split]:
            f.close()
            raise self.changed(split, size // self.dtype.itemsize)
        return f

    def batch(self, split, generator=None):
        """A (x, y) batch of windows; training batches are this process's share, evaluation
        batches (from the given generator) are the same on every process. A split file deleted,
        truncated or replaced by one of another size since the run started is a DataError."""
        B, n = self.batch_size, 1 if generator else self.world_size
        r, T = 0 if generator else self.rank, self.block_size
        width = self.dtype.itemsize
        with self.open_split(split) as f:  # read, not mmapped: a file cut short cannot crash us
            ix = torch.randint(self.tokens[split] - T, (n * B,),
                               generator=generator or self.generator)[r * B:(r + 1) * B]
            windows = np.empty((len(ix), T + 1), dtype=self.dtype)
            for row, i in enumerate(ix.tolist()):
                f.seek(i * width)
                chunk = f.read((T + 1) * width)
                if len(chunk) != (T + 1) * width:  # cut short since open_split checked its size
                    raise self.changed(split, (i * width + len(chunk)) // width)
                windows[row] = np.frombuffer(chunk, dtype=self.dtype)
        windows = torch.from_numpy(windows.astype(np.int64))
        x, y = windows[:, :-1].contiguous(), windows[:, 1:].contiguous()
        if self.device.startswith("cuda"):
            return (x.pin_memory().to(self.device, non_blocking=True),
                    y.pin_memory().to(self.device, non_blocking=True))
        return x.to(self.device), y.to(self.device)
