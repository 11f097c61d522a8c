"""Your own text as a dataset: data/<name>/{train,val}.bin and meta.json, for --dataset=<name>.

    python -m data.text.prepare --input=my.txt --tokenizer=char --name=mydata
    python -m data.text.prepare --input=big.txt --tokenizer=gpt2 --name=big --num_proc=4
    python -m data.text.prepare --input=my.txt --tokenizer=path/to/model_folder --name=mine
    python train.py --dataset=mydata

Any UTF-8 file that fits on disk: it is read in chunks of chunk_size bytes, never whole. The last
val_fraction of the file (cut at a character boundary) becomes val.bin, the rest train.bin.
- char: one token per distinct character; a first pass collects the characters, a second writes
  their ids (uint16, or uint32 past 65,536 distinct characters). meta.json holds the vocabulary.
- gpt2: GPT-2 BPE via tiktoken (uint16, vocab_size 50304 for the model).
- a tokenizer.json, or a transformers folder holding one (pip install tokenizers): any tokenizer,
  through the tokenizers library; uint32 ids past 65,536 tokens. meta.json holds the tokenizer
  whole; from a folder, vocab_size is its config.json's (the model's), so the data fits the model
  for train.py --init_from=FOLDER. Its end-of-text token (tokenizer_config.json's eos or bos
  token, else a known name such as <|endoftext|>) is printed.
Both BPE kinds: with --separator, each occurrence of that text (a Python literal for escapes:
--separator="'<|endoftext|>\\n'") ends a document and becomes the end-of-text token. Chunks are
cut after a newline between two lines of text where encoding the two sides apart gives the
tokens of encoding them together (checked on the text around each cut), so the ids are those of
each document tokenized whole; a tokenizer that admits no such cut (one that marks the start of
a text, as SentencePiece's do) is cut anyway, and the count of those cuts is printed.
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
)
from data.meta import hf_meta
from data.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[2]
SETTINGS = {
    "input": ("", "the text file (UTF-8)"),
    "tokenizer": ("char", "char, gpt2, or the path of a tokenizer.json or of a transformers "
                          "folder holding one"),
    "name": ("", "the dataset's folder name: train with --dataset=<name>"),
    "separator": ("", "text that ends each document, written as the end-of-text token (BPE "
                      "tokenizers); empty: the file is one document"),
    "val_fraction": (0.1, "the tail of the file that becomes val.bin"),
    "data_dir": (str(REPO / "data"), "where <name>/ goes (train.py's --data_dir)"),
    "num_proc": (max(1, (os.cpu_count() or 2) // 2), "BPE tokenizer threads"),
    "chunk_size": (1 << 20, "bytes read at a time"),
}
DEFAULTS = defaults(SETTINGS)
WINDOW = 256  # characters each side of a chunk cut that are encoded to check it


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
    if cfg["tokenizer"] not in ("char", "gpt2") and not Path(cfg["tokenizer"]).exists():
        raise DataError(f"tokenizer must be 'char', 'gpt2' or the path of a tokenizer.json (or "
                        f"of a folder holding one); '{cfg['tokenizer']}' is none of these")
    if cfg["separator"] and cfg["tokenizer"] == "char":
        raise DataError("--separator needs an end-of-text token, which characters do not have: "
                        "use gpt2 or a tokenizer.json")
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


def exact_cut(text, end, tok):
    """Whether the tokens of text[:end] and text[end:] apart are those of text whole, judged on
    the WINDOW characters each side (a BPE's tokens depend on nearby text only)."""
    left, right = text[max(0, end - WINDOW):end], text[end:end + WINDOW]
    a, b, both = tok.encode_ordinary([left, right, left + right])
    return a + b == both


def find_cut(text, limit, tok, tries=16):
    """(end, exact): just after the last newline before limit with a non-space character on
    both sides that exact_cut accepts, trying up to `tries` of them from the end; failing
    that, (the last such newline or limit, False). GPT-2's pre-tokenizer makes such a newline
    a token of its own, so for it the first try is exact."""
    first = None
    end = text.rfind("\n", 1, limit)
    while end > 0 and tries:
        if not (text[end - 1].isspace() or text[end + 1].isspace()):
            first = first or end + 1
            if exact_cut(text, end + 1, tok):
                return end + 1, True
            tries -= 1
        end = text.rfind("\n", 1, end)
    return first or limit, False


def bpe_texts(pieces, tok, separator, inexact):
    """The pieces of a split re-cut for encoding: texts of about a chunk each, cut by find_cut
    (an inexact cut is appended to `inexact`), and None at each separator, where the
    end-of-text token goes."""
    rest, keep = "", max(WINDOW, len(separator))  # a separator may straddle two pieces
    for piece in pieces:
        rest += piece
        if separator:
            *docs, rest = rest.split(separator)
            for doc in docs:
                yield doc
                yield None
        if len(rest) > 2 * keep:
            end, exact = find_cut(rest, len(rest) - keep, tok)
            if not exact:
                inexact.append(end)
            yield rest[:end]
            rest = rest[end:]
    yield rest


def write_bpe(path, ranges, folder, chunk_size, meta, separator, threads):
    """Each split encoded in batches of texts (tokenizers and tiktoken run a batch on their own
    threads), the end-of-text token where a separator was."""
    tok, inexact = Tokenizer(meta), []
    with DatasetWriter(folder, meta) as out:
        for split, (start, stop) in ranges.items():
            f, batch = out.split(split), []

            def flush(f=f, batch=batch):
                texts = [t for t in batch if t]
                ids = iter(tok.encode_ordinary(texts, threads))
                for t in batch:
                    if t is None:
                        f.write([tok.eot_id])
                    elif t:
                        f.write(np.array(next(ids), dtype=np.int64))
                batch.clear()

            pieces = read_utf8(path, start, stop, chunk_size, desc=split)
            for text in bpe_texts(pieces, tok, separator, inexact):
                batch.append(text)
                if sum(len(t or "") for t in batch) >= threads * chunk_size or len(batch) > 4096:
                    flush()
            flush()
    if inexact:
        print(f"note: {len(inexact)} chunk cuts where this tokenizer's tokens depend on the "
              f"cut; there the ids may differ from the whole text's by a token")
    return out.counts()


def bpe_meta(cfg, path):
    """The meta of a BPE dataset: GPT-2's, or a tokenizer.json's (printing its end-of-text
    token, which a --separator needs)."""
    if cfg["tokenizer"] == "gpt2":
        Tokenizer(gpt2_meta())  # offline without the GPT-2 BPE files: one line, before any work
        return gpt2_meta(source=path.name)
    meta, how = hf_meta(cfg["tokenizer"])
    print(f"{cfg['tokenizer']}: {meta['vocab_size']:,} tokens ({meta['dtype']} ids), "
          f"end-of-text token {meta['eot_token']!r} ({how})")
    if cfg["separator"] and meta["eot_token"] is None:
        raise DataError(f"--separator needs an end-of-text token, and '{cfg['tokenizer']}' has "
                        f"none that BitGPT can find")
    return dict(meta, source=path.name)


def prepare(cfg):
    path, folder = check(cfg)
    ranges = split_ranges(path, cfg["val_fraction"])
    if cfg["tokenizer"] != "char":  # the text first: a bad file is its own error, not the BPE's
        for _ in read_utf8(path, 0, ranges["val"][1], cfg["chunk_size"], desc="UTF-8 check"):
            pass
    meta = None if cfg["tokenizer"] == "char" else bpe_meta(cfg, path)
    print(f"{path}: {ranges['val'][1]:,} bytes -> {folder} ({cfg['tokenizer']} tokens; "
          f"val is the last {cfg['val_fraction']:.1%})")
    if meta is None:
        counts = write_char(path, ranges, folder, cfg["chunk_size"])
    else:
        counts = write_bpe(path, ranges, folder, cfg["chunk_size"], meta, cfg["separator"],
                           cfg["num_proc"])
    command = f"python train.py --dataset={cfg['name']}"
    if Path(cfg["data_dir"]).resolve() != REPO / "data":
        command += f" --data_dir={cfg['data_dir']}"
    print(f"train on it: {command}")
    return counts


if __name__ == "__main__":
    run_cli(SETTINGS, prepare, "-m data.text.prepare", __doc__)
