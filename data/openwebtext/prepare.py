"""OpenWebText in GPT-2 BPE tokens, as nanoGPT prepares it: train.bin, val.bin (uint16), meta.json.

    python -m data.openwebtext.prepare [--num_proc=8] [--out=data/openwebtext]

An open copy of the web text GPT-2 was trained on (Gokaslan & Cohen, 2019): 8,013,769 documents.
The download fills ~54 GB of HuggingFace cache (~/.cache/huggingface); 0.05% of the documents
(shuffled with seed 2357, as nanoGPT does) become val.bin. nanoGPT reports ~9.0B train tokens
(train.bin ~17 GB) and ~4.4M val tokens (val.bin ~8.5 MB). Needs `pip install datasets`; with
datasets >= 4, which no longer runs dataset scripts, pass --hf_name=<a parquet copy> if the hub
copy still needs its script.
"""

import os
from pathlib import Path

from common import defaults, run_cli
from data.common import hf_num_bytes, hf_texts, load_hf, require_datasets, write_gpt2_splits
from data.tokenizer import gpt2_encoding

HERE = Path(__file__).parent
SETTINGS = {
    "num_proc": (max(1, (os.cpu_count() or 2) // 2), "tokenizer (and download) processes"),
    "hf_name": ("Skylion007/openwebtext", "the HuggingFace hub dataset to read (a parquet copy "
                                          "works)"),
    "out": (str(HERE), "the dataset folder that gets train.bin, val.bin and meta.json"),
}
DEFAULTS = defaults(SETTINGS)
VAL_FRACTION, SEED = 0.0005, 2357  # nanoGPT's split: ~4,000 documents for validation


def write(train_docs, val_docs, out, num_proc=1, total_bytes=None):
    """Tokenize documents (iterables of str) into out/{train,val}.bin; returns the token counts."""
    return write_gpt2_splits({"train": train_docs, "val": val_docs}, out, num_proc, total_bytes,
                             source="openwebtext")


def prepare(cfg):
    datasets = require_datasets("python -m data.openwebtext.prepare")
    gpt2_encoding()  # offline without the GPT-2 BPE files: one line, before the download
    print(f"OpenWebText: downloading {cfg['hf_name']} (8M documents, ~54 GB of HuggingFace "
          f"cache), then writing ~17 GB of GPT-2 tokens (~9B) to {cfg['out']}")
    ds = load_hf(datasets, cfg["hf_name"], num_proc=cfg["num_proc"])["train"]
    split = ds.train_test_split(test_size=VAL_FRACTION, seed=SEED, shuffle=True)
    train, val = split["train"], split["test"]
    return write(hf_texts(train), hf_texts(val), cfg["out"], cfg["num_proc"],
                 {"train": hf_num_bytes(ds), "val": None})


if __name__ == "__main__":
    run_cli(SETTINGS, prepare, "-m data.openwebtext.prepare", __doc__)
