"""Your own text as a dataset: data/<name>/{train,val}.bin and meta.json, for --dataset=<name>.

    python -m data.text.prepare --input=my.txt --tokenizer=char --name=mydata
    python -m data.text.prepare --input=big.txt --tokenizer=gpt2 --name=big --num_proc=4
    python train.py --dataset=mydata

Any UTF-8 file that fits on disk: it is read in chunks of chunk_size bytes, never whole. The last
val_fraction of the file (cut at a character boundary) becomes val.bin, the rest train.bin.
- char: one token per distinct character; a first pass collects the characters, a second writes
  their ids (uint16, or uint32 past 65,536 distinct characters). meta.json holds the vocabulary.
- gpt2: GPT-2 BPE via tiktoken (uint16, vocab_size 50304 for the model). Chunks are cut after a
  newline between two lines of text, so the tokens are those of the whole file tokenized at
  once (only a chunk with no such newline in it is cut where it ends).
"""

import os
import re
from pathlib import Path

import numpy as np

from common import defaults, run_cli
from data.common import (
    DataError,
    DatasetWriter,
    char_boundary,
    char_meta,
    gpt2_meta,
    read_utf8,
    write_docs,
)
from data.tokenizer import KINDS as TOKENIZERS
from data.tokenizer import gpt2_encoding

REPO = Path(__file__).resolve().parents[2]
SETTINGS = {
    "input": ("", "the text file (UTF-8)"),
    "tokenizer": ("char", f"{' or '.join(TOKENIZERS)}"),
    "name": ("", "the dataset's folder name: train with --dataset=<name>"),
    "val_fraction": (0.1, "the tail of the file that becomes val.bin"),
    "data_dir": (str(REPO / "data"), "where <name>/ goes (train.py's --data_dir)"),
    "num_proc": (max(1, (os.cpu_count() or 2) // 2), "gpt2 tokenizer processes"),
    "chunk_size": (1 << 20, "bytes read at a time"),
}
DEFAULTS = defaults(SETTINGS)


def check(cfg):
    """The input file and the output folder, or a one-line DataError."""
    name, path = cfg["name"], Path(cfg["input"])
    if not cfg["input"]:
        raise DataError("give the text file: --input=path/to/file.txt")
    if not path.is_file():
        raise DataError(f"input file '{path}' not found")
    if path.stat().st_size == 0:
        raise DataError(f"input file '{path}' is empty")
    if not name:
        raise DataError("give the dataset a name: --name=mydata (then train with "
                        "--dataset=mydata)")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise DataError(f"--name must be a plain folder name (letters, digits, '_', '.', '-'), "
                        f"got {name!r}")
    folder = Path(cfg["data_dir"]) / name
    if (folder / "prepare.py").exists():
        raise DataError(f"'{name}' is a built-in dataset ({folder / 'prepare.py'}); choose "
                        f"another --name")
    if cfg["tokenizer"] not in TOKENIZERS:
        raise DataError(f"tokenizer must be 'char' or 'gpt2', got {cfg['tokenizer']!r}")
    if not 0 < cfg["val_fraction"] < 1:
        raise DataError(f"val_fraction must be between 0 and 1, got {cfg['val_fraction']}")
    if cfg["chunk_size"] < 1:
        raise DataError(f"chunk_size must be at least 1, got {cfg['chunk_size']}")
    return path, folder


def split_ranges(path, val_fraction):
    """{'train': (0, cut), 'val': (cut, size)} in bytes, cut at the start of a character."""
    size = path.stat().st_size
    cut = char_boundary(path, int(size * (1 - val_fraction)))
    if not 0 < cut < size:
        raise DataError(f"'{path}' is too small to split into train and val at "
                        f"val_fraction={val_fraction}")
    return {"train": (0, cut), "val": (cut, size)}


def write_char(path, ranges, folder, chunk_size):
    """Pass 1 finds the characters (and checks the UTF-8), pass 2 writes their ids."""
    chars = set()
    for piece in read_utf8(path, 0, ranges["val"][1], chunk_size, desc="characters"):
        chars.update(piece)
    chars = sorted(chars)
    meta = char_meta(chars)
    print(f"{len(chars):,} distinct characters")
    # a table from code point to id turns a whole chunk into ids in one numpy step
    lut = np.zeros(ord(chars[-1]) + 1, dtype=meta["dtype"])
    lut[[ord(c) for c in chars]] = np.arange(len(chars))
    with DatasetWriter(folder, meta) as out:
        for split, (start, stop) in ranges.items():
            f = out.split(split)
            for piece in read_utf8(path, start, stop, chunk_size, desc=split):
                f.write(lut[np.frombuffer(piece.encode("utf-32-le"), dtype=np.uint32)])
    return out.counts()


def last_cut(piece):
    """Just after piece's last newline with a non-space character on both sides, else
    len(piece). GPT-2's pre-tokenizer makes such a newline a token of its own, so tokenizing
    the pieces one by one gives the tokens of the whole text tokenized at once."""
    end = piece.rfind("\n", 1, len(piece) - 1)
    while end > 0 and (piece[end - 1].isspace() or piece[end + 1].isspace()):
        end = piece.rfind("\n", 1, end)
    return end + 1 if end > 0 else len(piece)


def cut_after_newlines(pieces):
    """Re-cut text pieces at their last_cut (the rest joins the next piece)."""
    rest = ""
    for piece in pieces:
        piece = rest + piece
        end = last_cut(piece)
        rest = piece[end:]
        yield piece[:end]
    if rest:
        yield rest


def write_gpt2(path, ranges, folder, chunk_size, num_proc):
    with DatasetWriter(folder, gpt2_meta(source=path.name)) as out:
        for split, (start, stop) in ranges.items():
            pieces = cut_after_newlines(read_utf8(path, start, stop, chunk_size))
            # one piece per task: chunks are already large; no EOT, the file is one document
            write_docs(pieces, out.split(split), num_proc, total_bytes=stop - start, eot=False,
                       batch_docs=1)
    return out.counts()


def prepare(cfg):
    path, folder = check(cfg)
    if cfg["tokenizer"] == "gpt2":
        gpt2_encoding()  # offline without the GPT-2 BPE files: one line, before any work
    ranges = split_ranges(path, cfg["val_fraction"])
    print(f"{path}: {ranges['val'][1]:,} bytes -> {folder} ({cfg['tokenizer']} tokens; "
          f"val is the last {cfg['val_fraction']:.1%})")
    if cfg["tokenizer"] == "char":
        counts = write_char(path, ranges, folder, cfg["chunk_size"])
    else:
        counts = write_gpt2(path, ranges, folder, cfg["chunk_size"], cfg["num_proc"])
    command = f"python train.py --dataset={cfg['name']}"
    if Path(cfg["data_dir"]).resolve() != REPO / "data":
        command += f" --data_dir={cfg['data_dir']}"
    print(f"train on it: {command}")
    return counts


if __name__ == "__main__":
    run_cli(SETTINGS, prepare, "-m data.text.prepare", __doc__)
