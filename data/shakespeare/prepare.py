"""Tiny Shakespeare (1.1 MB) in GPT-2 BPE tokens (tiktoken): train.bin, val.bin (uint16), meta.pkl.

    python data/shakespeare/prepare.py [--input=path/to/input.txt] [--out=folder]
"""

import sys
from pathlib import Path

import tiktoken

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root, for `data.common`

from data.common import gpt2_meta, tinyshakespeare_text, write_splits  # noqa: E402

HERE = Path(__file__).parent


def prepare(out=HERE, input_path=None):
    text = tinyshakespeare_text(out, input_path)
    enc = tiktoken.get_encoding("gpt2")
    n = int(len(text) * 0.9)  # split the text, not the tokens, as nanoGPT does
    write_splits(enc.encode_ordinary(text[:n]), enc.encode_ordinary(text[n:]), out, gpt2_meta())


if __name__ == "__main__":
    args = dict(a[2:].split("=", 1) for a in sys.argv[1:] if a.startswith("--") and "=" in a)
    prepare(Path(args.get("out", HERE)), args.get("input"))
