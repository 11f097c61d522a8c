"""Tiny Shakespeare, one token per character: train.bin, val.bin (uint16) and meta.json (1.1 MB).

    python -m data.shakespeare_char.prepare [--input=path/to/input.txt] [--out=folder]

train.py prepares it on its own when --dataset=shakespeare_char is not there yet.
"""

from pathlib import Path

from common import run_cli
from data.common import TINYSHAKESPEARE_ENV, char_meta, tinyshakespeare_text, write_splits

HERE = Path(__file__).parent
SETTINGS = {
    "input": ("", f"the Tiny Shakespeare text; empty: ${TINYSHAKESPEARE_ENV}, else "
                  f"<out>/input.txt, downloaded when missing"),
    "out": (str(HERE), "the dataset folder that gets train.bin, val.bin and meta.json"),
}


def prepare(out=HERE, input_path=None):
    text = tinyshakespeare_text(out, input_path)
    meta = char_meta(sorted(set(text)))
    print(f"{len(text):,} characters, vocabulary of {meta['vocab_size']}")
    ids = [meta["stoi"][c] for c in text]
    n = int(len(ids) * 0.9)
    write_splits(ids[:n], ids[n:], out, meta)


def main(cfg):
    prepare(Path(cfg["out"]), cfg["input"] or None)


if __name__ == "__main__":
    run_cli(SETTINGS, main, "-m data.shakespeare_char.prepare", __doc__)
