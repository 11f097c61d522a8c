"""Tiny Shakespeare, one token per character: train.bin, val.bin (uint16) and meta.pkl (1.1 MB).

    python data/shakespeare_char/prepare.py [--input=path/to/input.txt] [--out=folder]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root, for `data.common`

from data.common import char_meta, tinyshakespeare_text, write_splits  # noqa: E402

HERE = Path(__file__).parent


def prepare(out=HERE, input_path=None):
    text = tinyshakespeare_text(out, input_path)
    meta = char_meta(sorted(set(text)))
    print(f"{len(text):,} characters, vocabulary of {meta['vocab_size']}")
    ids = [meta["stoi"][c] for c in text]
    n = int(len(ids) * 0.9)
    write_splits(ids[:n], ids[n:], out, meta)


if __name__ == "__main__":
    args = dict(a[2:].split("=", 1) for a in sys.argv[1:] if a.startswith("--") and "=" in a)
    prepare(Path(args.get("out", HERE)), args.get("input"))
