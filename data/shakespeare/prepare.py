"""Tiny Shakespeare (1.1 MB) in GPT-2 BPE tokens (tiktoken): train.bin, val.bin (uint16), meta.json.

    python -m data.shakespeare.prepare [--input=path/to/input.txt] [--out=folder]

train.py prepares it on its own when --dataset=shakespeare is not there yet.
"""

from pathlib import Path

from common import run_cli
from data.common import TINYSHAKESPEARE_ENV, gpt2_meta, tinyshakespeare_text, write_splits
from data.tokenizer import gpt2_encoding

HERE = Path(__file__).parent
SETTINGS = {
    "input": ("", f"the Tiny Shakespeare text; empty: ${TINYSHAKESPEARE_ENV}, else "
                  f"<out>/input.txt, downloaded when missing"),
    "out": (str(HERE), "the dataset folder that gets train.bin, val.bin and meta.json"),
}


def prepare(out=HERE, input_path=None):
    enc = gpt2_encoding()  # before the download: offline without its files is one line
    text = tinyshakespeare_text(out, input_path)
    n = int(len(text) * 0.9)  # split the text, not the tokens, as nanoGPT does
    write_splits(enc.encode_ordinary(text[:n]), enc.encode_ordinary(text[n:]), out, gpt2_meta())


def main(cfg):
    prepare(Path(cfg["out"]), cfg["input"] or None)


if __name__ == "__main__":
    run_cli(SETTINGS, main, "-m data.shakespeare.prepare", __doc__)
