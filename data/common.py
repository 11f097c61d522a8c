"""What every dataset script shares: fetching text, tokenizing it, writing the files. Each one
runs from the repo root as a module, e.g.

    python -m data.shakespeare_char.prepare
    python -m data.text.prepare --input=my.txt --name=mydata
    python -m data.cosmopedia.prepare --help    # every option, with its default

A prepared dataset is a folder with train.bin and val.bin (token ids, back to back, in the dtype
that meta.json names) and meta.json ({'vocab_size', 'tokenizer': 'char' or 'gpt2', 'dtype'}, plus
'stoi'/'itos' for characters; data.loader.read_meta reads it, and the meta.pkl of folders prepared
before it, which holds the same dict, only as plain values). Large corpora never sit in memory:
documents are tokenized in batches and appended to the .bin files as they come. Every file is
written beside its final name and renamed over it (common.atomic_path), meta.json and then the
.bin files only once all are complete; Ctrl-C at any point leaves the old dataset or the new one,
and no temporary file. meta.json's split_tokens counts each .bin file's tokens, so a kill between
the renames leaves files that data.loader refuses, never a mixed dataset it trains on.
"""

import codecs
import json
import multiprocessing
import os
import signal
import sys
import threading
import urllib.request
from collections import deque
from contextlib import ExitStack, closing, contextmanager
from itertools import islice
from pathlib import Path

import numpy as np
from tqdm import tqdm

from common import DataError, atomic_path
from data.loader import GPT2_VOCAB_SIZE, META, OLD_META, REPO, prepare_command
from data.tokenizer import gpt2_encoding

TINYSHAKESPEARE_URL = ("https://raw.githubusercontent.com/karpathy/char-rnn/master/data/"
                       "tinyshakespeare/input.txt")
TINYSHAKESPEARE_ENV = "TINYSHAKESPEARE_PATH"  # a local copy, for offline machines and tests

EOT = 50256  # GPT-2's <|endoftext|>, appended after every document to mark where it ends




def download(url, dest):
    """Download url to dest with a progress bar (written beside it, renamed over it when whole:
    an interrupted download leaves no partial dest)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    print(f"downloading {url}\n         to {dest}")
    with atomic_path(dest) as tmp, urllib.request.urlopen(url) as r, open(tmp, "wb") as f:
        total = int(r.headers.get("Content-Length") or 0) or None
        with tqdm(total=total, unit="B", unit_scale=True, desc=dest.name) as bar:
            while chunk := r.read(1 << 16):
                f.write(chunk)
                bar.update(len(chunk))


def tinyshakespeare_text(folder, input_path=None):
    """Tiny Shakespeare (1.1 MB): input_path, else $TINYSHAKESPEARE_PATH, else the copy in this
    folder or the other Shakespeare dataset's, else a download into this folder."""
    path = input_path or os.environ.get(TINYSHAKESPEARE_ENV)
    if not path:
        copies = [Path(folder) / "input.txt"] + [REPO / "data" / name / "input.txt"
                                                 for name in ("shakespeare_char", "shakespeare")]
        path = next((p for p in copies if p.is_file()), copies[0])
        if not path.exists():
            try:
                download(TINYSHAKESPEARE_URL, path)
            except OSError as e:
                raise DataError(
                    f"could not download Tiny Shakespeare ({e}); offline? put the text at "
                    f"{path}, or run {prepare_command(folder)} --input=/path/input.txt, or set "
                    f"{TINYSHAKESPEARE_ENV}=/path/input.txt") from None
    return Path(path).read_text(encoding="utf-8")


# ---- meta.json ------------------------------------------------------------------------------



def dtype_for(vocab_size):
    """The smallest dtype that holds every id (0 .. vocab_size-1): 2 bytes a token when it fits."""
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def char_meta(chars):
    """meta for a one-token-per-character vocabulary (data.tokenizer.Tokenizer decodes it)."""
    return {"vocab_size": len(chars), "tokenizer": "char", "dtype": dtype_for(len(chars)),
            "stoi": {ch: i for i, ch in enumerate(chars)},
            "itos": {i: ch for i, ch in enumerate(chars)}}


def gpt2_meta(**extra):
    return {"vocab_size": GPT2_VOCAB_SIZE, "tokenizer": "gpt2", "dtype": "uint16", **extra}


# ---- writing train.bin / val.bin ------------------------------------------------------------

class BinFile:
    """Token ids appended to one .bin file; counts what it wrote. name: the split, for progress
    bars (path may be a temporary name)."""

    def __init__(self, path, dtype, name=None):
        self.path, self.dtype, self.n = Path(path), np.dtype(dtype), 0
        self.name = name or self.path.name.split(".")[0]
        self.f = open(self.path, "wb")

    def write(self, ids):
        ids = np.asarray(ids)
        if ids.size and int(ids.max()) > np.iinfo(self.dtype).max:
            raise DataError(f"token id {int(ids.max())} does not fit in {self.dtype}")
        ids.astype(self.dtype, copy=False).tofile(self.f)
        self.n += ids.size

    def finish(self):
        """Close the file, its bytes on disk (so the renames that follow are quick)."""
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()


@contextmanager
def ctrl_c_deferred():
    """Ctrl-C during the block takes effect when it ends, so the renames that swap a dataset in
    are never cut halfway (the main thread's default SIGINT handler only; else a plain block)."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield
        return
    caught = []
    signal.signal(signal.SIGINT, lambda *_: caught.append(True))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if caught:
        raise KeyboardInterrupt


class DatasetWriter:
    """Writes folder/{split}.bin and meta.json, each at a temporary name beside it
    (common.atomic_path); they replace the old files only when every split is complete, so a
    failure or Ctrl-C halfway leaves the old dataset (or, in a new folder, nothing), never a
    mixed one. A meta.pkl of the old dataset goes once the new one is in place.

        with DatasetWriter(folder, meta) as out:
            out.split("train").write(ids)
    """

    def __init__(self, folder, meta):
        self.folder, self.meta, self.files = Path(folder), meta, {}
        self.stack = ExitStack()

    def __enter__(self):
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise self.failed(e) from None
        return self

    def failed(self, e):
        """The one-line DataError of a prepare that failed on a file (a full or read-only
        disk)."""
        return DataError(f"preparing the dataset in {self.folder} failed ({e.strerror or e}); "
                         f"the old one there, if any, is intact: free some space or choose "
                         f"another folder")

    def split(self, name):
        tmp = self.stack.enter_context(atomic_path(self.folder / f"{name}.bin"))
        self.files[name] = BinFile(tmp, self.meta["dtype"], name)
        return self.files[name]

    def _discard(self, *exc_info):
        for f in self.files.values():
            f.f.close()
        self.stack.__exit__(*exc_info)  # deletes every temporary file not yet renamed
        if self.folder.is_dir() and not any(self.folder.iterdir()):
            self.folder.rmdir()  # an empty folder would look like a dataset

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self._discard(exc_type, exc, tb)
            if isinstance(exc, OSError):
                raise self.failed(exc) from None
            return
        try:
            for f in self.files.values():
                f.finish()
            # itos' int keys become strings; split_tokens lets a reader check the .bin files
            text = json.dumps(dict(self.meta, split_tokens=self.counts())) + "\n"
            with ctrl_c_deferred():
                # meta.json first: a kill between the renames leaves it beside .bin files of
                # other sizes, which data.loader refuses (never .bin files without meta.json)
                with atomic_path(self.folder / META) as tmp:
                    tmp.write_text(text)
                self.stack.close()  # the .bin files' renames
                (self.folder / OLD_META).unlink(missing_ok=True)  # the old dataset's
        except BaseException as e:
            self._discard(*sys.exc_info())
            if isinstance(e, OSError):
                raise self.failed(e) from None
            raise
        counts = ", ".join(f"{name} has {f.n:,} tokens" for name, f in self.files.items())
        print(f"{self.folder}: {counts} ({self.meta['dtype']}, vocab_size "
              f"{self.meta['vocab_size']})")

    def counts(self):
        return {name: f.n for name, f in self.files.items()}


def write_splits(train_ids, val_ids, folder, meta):
    """Write in-memory token ids to folder/train.bin and folder/val.bin, with meta.json."""
    with DatasetWriter(folder, meta) as out:
        out.split("train").write(train_ids)
        out.split("val").write(val_ids)


# ---- GPT-2 BPE on many documents, in worker processes ---------------------------------------

def _encode_batch(task):
    """Worker: (docs, eot) -> (ids of all docs back to back, tokens per doc, utf-8 bytes)."""
    docs, eot = task
    enc = gpt2_encoding()  # cached per process by tiktoken
    ids, lengths = [], []
    for doc in docs:
        n = len(ids)
        ids.extend(enc.encode_ordinary(doc))  # ordinary: text that spells <|endoftext|> stays text
        if eot:
            ids.append(EOT)
        lengths.append(len(ids) - n)
    nbytes = sum(len(doc.encode("utf-8")) for doc in docs)
    return np.array(ids, dtype=np.uint16), np.array(lengths, dtype=np.int64), nbytes


def _ignore_ctrl_c():
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _batched(items, n):
    items = iter(items)
    while batch := list(islice(items, n)):
        yield batch


def gpt2_batches(docs, num_proc=1, batch_docs=256, eot=True):
    """Yield _encode_batch's result for consecutive batches of docs, in order. With num_proc > 1
    the batches go to a pool with a bounded number in flight (Pool.imap would read the whole
    corpus ahead into memory), so the output is the same bytes for any num_proc. The workers
    ignore Ctrl-C: it stops this process, which ends them (no traceback from each worker)."""
    gpt2_encoding()  # a missing tokenizer is one line here, before any worker starts
    tasks = ((batch, eot) for batch in _batched(docs, batch_docs))
    if num_proc <= 1:
        yield from map(_encode_batch, tasks)
        return
    with multiprocessing.Pool(num_proc, initializer=_ignore_ctrl_c) as pool:
        pending = deque()
        for task in tasks:
            pending.append(pool.apply_async(_encode_batch, (task,)))
            if len(pending) >= 2 * num_proc:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def write_docs(docs, out, num_proc=1, max_tokens=0, total_bytes=None, eot=True, batch_docs=256):
    """Tokenize an iterable of documents (str) with GPT-2 BPE into BinFile out, EOT after each
    one when eot. With max_tokens, stop after the document that reaches it (whole documents
    only). Returns the number of documents written."""
    n_docs = 0
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc=out.name)
    with bar, closing(gpt2_batches(docs, num_proc, batch_docs, eot)) as batches:
        for ids, lengths, nbytes in batches:
            done = bool(max_tokens) and out.n + len(ids) >= max_tokens
            if done:
                ends = np.cumsum(lengths)
                k = int(np.searchsorted(ends, max_tokens - out.n))  # the doc that reaches it
                ids, lengths = ids[:ends[k]], lengths[:k + 1]
            out.write(ids)
            n_docs += len(lengths)
            bar.update(nbytes)
            bar.set_postfix(docs=f"{n_docs:,}", tokens=f"{out.n:,}", refresh=False)
            if done:
                break
    return n_docs


def write_gpt2_splits(splits, folder, num_proc=1, total_bytes=None, **meta):
    """{'train': docs, 'val': docs} -> folder/{train,val}.bin (EOT after each document) and
    meta.json. Returns the token count of each split."""
    total_bytes = total_bytes or {}
    with DatasetWriter(folder, gpt2_meta(**meta)) as out:
        for name, docs in splits.items():
            write_docs(docs, out.split(name), num_proc, total_bytes=total_bytes.get(name))
    return out.counts()


# ---- the user's own text, streamed ----------------------------------------------------------

def read_utf8(path, start=0, stop=None, chunk_size=1 << 20, desc=None):
    """Yield the text of bytes [start, stop) of a file, chunk_size bytes at a time (a character
    cut by a chunk boundary is completed from the next chunk). Invalid UTF-8 raises DataError
    with its byte offset in the file. start and stop must fall on character boundaries."""
    stop = os.path.getsize(path) if stop is None else stop
    decoder = codecs.getincrementaldecoder("utf-8")()
    bar = tqdm(total=stop - start, unit="B", unit_scale=True, desc=desc, disable=desc is None)
    with open(path, "rb") as f, bar:
        f.seek(start)
        pos = start
        while pos < stop:
            chunk = f.read(min(chunk_size, stop - pos))
            if not chunk:
                break
            base = pos - len(decoder.getstate()[0])  # bytes held back from the last chunk
            pos += len(chunk)
            try:
                text = decoder.decode(chunk, final=pos >= stop)
            except UnicodeDecodeError as e:
                raise DataError(f"'{path}' is not UTF-8 text: invalid byte "
                                f"0x{e.object[e.start]:02x} at byte offset {base + e.start:,}"
                                ) from None
            bar.update(len(chunk))
            if text:
                yield text


def char_boundary(path, offset):
    """The first offset >= offset where a UTF-8 character starts (skips continuation bytes)."""
    with open(path, "rb") as f:
        f.seek(offset)
        for b in f.read(4):
            if b & 0xC0 != 0x80:
                break
            offset += 1
    return offset


# ---- HuggingFace datasets (optional) --------------------------------------------------------

def require_datasets(script):
    """The `datasets` package, or a one-line DataError saying how to install it."""
    try:
        import datasets
    except ImportError:
        raise DataError(f"{script} needs the 'datasets' package: pip install datasets") from None
    return datasets


def load_hf(datasets, *args, **kwargs):
    """datasets.load_dataset, with download and hub errors as one line."""
    try:
        return datasets.load_dataset(*args, **kwargs)
    except (OSError, ConnectionError, RuntimeError, ValueError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"could not load {args[0]} from the HuggingFace hub ({msg}); offline, "
                        f"or a 'datasets' version that cannot read it?") from None


def hf_texts(ds, column="text", batch_size=1000):
    """The column's strings, read batch by batch (ds[column] would load them all at once)."""
    try:
        for batch in ds.select_columns([column]).iter(batch_size=batch_size):
            yield from batch[column]
    except (OSError, ConnectionError) as e:  # a streamed dataset downloads as it goes
        raise DataError(f"reading the dataset failed ({type(e).__name__}: {e}); nothing was "
                        f"written, run the same command again") from None


def hf_num_bytes(ds):
    """A split's size from the dataset card, for the progress bar; None when unknown."""
    try:
        return ds.info.splits[str(ds.split)].num_bytes
    except (AttributeError, KeyError, TypeError):
        return None
