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
CHECKED = 4096  # ids read at each end of a .bin file as a run starts, to check them


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
    """folder's meta.json, else its old meta.pkl, else None; a DataError when one is there but
    is not a regular file (a FIFO would block the read), or when a prepare was killed before
    writing it (its temporary meta.json is there)."""
    again = f"prepare the dataset again ({prepare_command(folder)})"
    for name in (META, OLD_META):
        path = Path(folder) / name
        if path.is_file():
            return path
        if path.exists():
            raise DataError(f"{path} is not a regular file; {again}")
    if any(Path(folder).glob(f".{META}.tmp*")):
        raise DataError(f"{folder} has .bin files but no {META}: a prepare was cut short; {again}")
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
    check_meta(meta, path, again)
    if isinstance(meta.get("itos"), dict):
        meta["itos"] = {int(i): ch for i, ch in meta["itos"].items()}  # JSON keys are strings
    return meta


def check_meta(meta, path, again):
    """A DataError naming the field of a meta whose value has the wrong type."""
    itos, counts = meta.get("itos", {}), meta.get("split_tokens", {})
    fields = {"vocab_size": type(meta.get("vocab_size")) is int and meta["vocab_size"] > 0,
              "dtype": isinstance(meta.get("dtype", ""), str),
              "tokenizer": isinstance(meta.get("tokenizer", ""), str),
              "itos": isinstance(itos, dict) and all(
                  str(i).isdigit() and isinstance(ch, str) for i, ch in itos.items()),
              "split_tokens": isinstance(counts, dict) and all(
                  type(n) is int and n >= 0 for n in counts.values())}
    for key, ok in fields.items():
        if not ok:
            raise DataError(f"{path} has {key}={repr(meta.get(key))[:60]}, not what a prepare "
                            f"writes; {again}")


def vocabulary_difference(a, b):
    """How dataset meta b's tokens differ from meta a's, as a phrase, or None when they are the
    same tokens (or a is unknown): the same character at each id, the same tokenizer.json."""
    if a is None:
        return None
    itos_a, itos_b = a.get("itos") or {}, (b or {}).get("itos") or {}
    for i in sorted(set(itos_a) | set(itos_b)):
        if itos_a.get(i) != itos_b.get(i):
            return f"id {i} is {itos_a.get(i)!r} in one, {itos_b.get(i)!r} in the other"
    if a.get("tokenizer_json") != (b or {}).get("tokenizer_json"):
        return "another tokenizer.json"
    return None


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
        counts = (self.meta or {}).pop("split_tokens", {})  # the data's, not the tokenizer's
        for split in ("train", "val"):
            n = self.check_split(split, counts.get(split))
            if n <= self.block_size:
                raise ConfigError(f"{self.folder / f'{split}.bin'} has {n} tokens, too few for "
                                  f"block_size={self.block_size}; use more text or a smaller "
                                  f"--block_size")
            self.tokens[split] = n
        # every process draws the windows of all processes from one stream and keeps its own, so
        # N processes see exactly the batches one process sees with N times the accumulation
        self.rank, self.world_size = rank, world_size
        self.generator = torch.Generator().manual_seed(seed)  # checkpointed, for exact resume

    def check_split(self, split, count):
        """The tokens of split's .bin file, once its size is what meta.json says (count, or whole
        ids of its dtype) and the ids at its two ends are below vocab_size; else a DataError."""
        path, width = self.folder / f"{split}.bin", self.dtype.itemsize
        again = f"prepare the dataset again ({prepare_command(self.folder)})"
        if not path.is_file():
            raise DataError(f"{path} is not a regular file; {again}")
        self.sizes[split] = size = path.stat().st_size
        if size % width or count is not None and size != count * width:
            said = f"{count:,} {self.dtype} ids" if count is not None else f"{self.dtype} ids"
            raise DataError(f"{path} is {size:,} bytes, not the {said} its {META} says (files of "
                            f"two prepares, or one cut short?); {again}")
        with open(path, "rb") as f:  # the two ends: a wrong dtype shows at once
            head = np.frombuffer(f.read(CHECKED * width), dtype=self.dtype)
            f.seek(max(0, size - CHECKED * width))
            ids = np.concatenate([head, np.frombuffer(f.read(), dtype=self.dtype)])
        if ids.size and int(ids.max()) >= self.vocab_size:
            raise self.beyond(split, int(ids.max()))
        if self.dtype == np.uint16 and head.size >= 64 and head[::2].any() and not head[1::2].any():
            raise DataError(f"{path}: every second id is 0, as uint32 ids read as the uint16 its "
                            f"{META} says would be; {again}")
        return size // width

    def beyond(self, split, token):
        return DataError(f"{self.folder / f'{split}.bin'} holds token id {token}, beyond the "
                         f"{self.vocab_size} of its vocabulary ({META}'s vocab_size, or GPT-2's); "
                         f"prepare the dataset again ({prepare_command(self.folder)})")

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
        if int(windows.max()) >= self.vocab_size:  # an IndexError deep in the model, else
            raise self.beyond(split, int(windows.max()))
        windows = torch.from_numpy(windows.astype(np.int64))
        x, y = windows[:, :-1].contiguous(), windows[:, 1:].contiguous()
        if self.device.startswith("cuda"):
            return (x.pin_memory().to(self.device, non_blocking=True),
                    y.pin_memory().to(self.device, non_blocking=True))
        return x.to(self.device), y.to(self.device)
