"""TinyStories (roneneldan/TinyStories) in GPT-2 BPE tokens: train.bin, val.bin (uint16), meta.json.

    python -m data.tinystories.prepare [--num_proc=8] [--out=data/tinystories]

Short stories in simple English written by GPT-3.5/GPT-4 (Eldan & Li, 2023): 2,119,719 training
and about 22,000 validation stories, 1.9 GB of text. The download is about 1 GB of parquet files
into the HuggingFace cache (~/.cache/huggingface); the dataset's own validation split becomes
val.bin. Expect roughly 0.5B tokens (~1 GB train.bin). Needs `pip install datasets`.
"""

import os
from pathlib import Path

from common import defaults, run_cli
from data.common import hf_num_bytes, hf_texts, load_hf, require_datasets, write_gpt2_splits
from data.tokenizer import gpt2_encoding

HERE = Path(__file__).parent
HF_NAME = "roneneldan/TinyStories"
SETTINGS = {
    "num_proc": (max(1, (os.cpu_count() or 2) // 2), "tokenizer (and download) processes"),
    "out": (str(HERE), "the dataset folder that gets train.bin, val.bin and meta.json"),
}
DEFAULTS = defaults(SETTINGS)


def write(train_docs, val_docs, out, num_proc=1, total_bytes=None):
    """Tokenize stories (iterables of str) into out/{train,val}.bin; returns the token counts."""
    return write_gpt2_splits({"train": train_docs, "val": val_docs}, out, num_proc, total_bytes,
                             source=HF_NAME)


def prepare(cfg):
    datasets = require_datasets("python -m data.tinystories.prepare")
    gpt2_encoding()  # offline without the GPT-2 BPE files: one line, before the download
    print(f"TinyStories: downloading {HF_NAME} (~1 GB of parquet, 2.1M stories) into the "
          f"HuggingFace cache, then writing ~1 GB of GPT-2 tokens to {cfg['out']}")
    ds = load_hf(datasets, HF_NAME, num_proc=cfg["num_proc"])
    train, val = ds["train"], ds["validation"]
    return write(hf_texts(train), hf_texts(val), cfg["out"], cfg["num_proc"],
                 {"train": hf_num_bytes(train), "val": hf_num_bytes(val)})


if __name__ == "__main__":
    run_cli(SETTINGS, prepare, "-m data.tinystories.prepare", __doc__)
