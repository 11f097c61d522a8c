"""A subset of Cosmopedia (HuggingFaceTB/cosmopedia) in GPT-2 BPE tokens: train.bin, val.bin
(uint16), meta.json. BitNet-LLama-70M was trained on a subset of it.

    python -m data.cosmopedia.prepare --subset=stories --max_docs=100000 [--num_proc=8]
    python -m data.cosmopedia.prepare --subset=wikihow --max_docs=0      # the whole subset
    python -m data.cosmopedia.prepare --max_tokens=500_000_000           # a token budget

Synthetic textbooks, blog posts, stories and WikiHow articles written by Mixtral-8x7B-Instruct:
~25B tokens in 31M documents over 8 subsets (documents, parquet download): stories 4.99M (11.9 GB),
web_samples_v1 12.4M, web_samples_v2 10.3M, auto_math_text 1.95M (4.5 GB), stanford 1.02M
(3.3 GB), wikihow 179k, openstax 126k (0.35 GB), khanacademy 24k (49 MB). The subset is streamed:
only what is read is downloaded. The first val_docs documents become val.bin; the next ones, up to
max_docs documents and max_tokens train tokens (0: no limit), become train.bin. A stories
document is ~1,000 tokens, so the default (100,000 documents) makes ~100M train tokens (~200 MB).
Needs `pip install datasets`.
"""

import os
from itertools import islice
from pathlib import Path

from common import defaults, run_cli
from data.common import (
    DataError,
    DatasetWriter,
    gpt2_meta,
    hf_texts,
    load_hf,
    require_datasets,
    write_docs,
)
from data.tokenizer import gpt2_encoding

HERE = Path(__file__).parent
HF_NAME = "HuggingFaceTB/cosmopedia"
SUBSETS = ("stories", "web_samples_v1", "web_samples_v2", "auto_math_text", "stanford",
           "wikihow", "openstax", "khanacademy")
SETTINGS = {
    "subset": ("stories", f"the Cosmopedia subset: {', '.join(SUBSETS)}"),
    "max_docs": (100_000, "train documents; 0 reads the whole subset"),
    "max_tokens": (0, "train tokens, stopping after the document that reaches it; 0: no limit"),
    "val_docs": (1000, "the first documents of the stream, which become val.bin"),
    "num_proc": (max(1, (os.cpu_count() or 2) // 2), "tokenizer processes"),
    "out": (str(HERE), "the dataset folder that gets train.bin, val.bin and meta.json"),
}
DEFAULTS = defaults(SETTINGS)


def write(docs, out, val_docs=1000, max_docs=0, max_tokens=0, num_proc=1, subset=""):
    """Tokenize one stream of documents (str): the first val_docs into out/val.bin, then up to
    max_docs documents / max_tokens tokens into out/train.bin. Returns the token counts."""
    docs = iter(docs)
    with DatasetWriter(out, gpt2_meta(source=f"{HF_NAME}/{subset}")) as w:
        write_docs(islice(docs, val_docs), w.split("val"), num_proc)
        write_docs(islice(docs, max_docs or None), w.split("train"), num_proc, max_tokens)
    return w.counts()


def prepare(cfg):
    if cfg["subset"] not in SUBSETS:
        raise DataError(f"subset '{cfg['subset']}' is not one of {', '.join(SUBSETS)}")
    if min(cfg["val_docs"], cfg["max_docs"], cfg["max_tokens"]) < 0 or cfg["val_docs"] == 0:
        raise DataError("val_docs must be positive; max_docs and max_tokens >= 0 (0: no limit)")
    datasets = require_datasets("python -m data.cosmopedia.prepare")
    gpt2_encoding()  # offline without the GPT-2 BPE files: one line, before the download
    limits = [f"{cfg['max_docs']:,} documents"] if cfg["max_docs"] else []
    limits += [f"{cfg['max_tokens']:,} tokens"] if cfg["max_tokens"] else []
    print(f"Cosmopedia: streaming {HF_NAME} subset '{cfg['subset']}' from the HuggingFace hub "
          f"({' or '.join(limits) or 'the whole subset'} for train, {cfg['val_docs']:,} "
          f"documents for val; "
          f"~1,000 GPT-2 tokens and ~4 KB of text each) into {cfg['out']}")
    ds = load_hf(datasets, HF_NAME, cfg["subset"], split="train", streaming=True)
    return write(hf_texts(ds), cfg["out"], cfg["val_docs"], cfg["max_docs"], cfg["max_tokens"],
                 cfg["num_proc"], cfg["subset"])


if __name__ == "__main__":
    run_cli(SETTINGS, prepare, "-m data.cosmopedia.prepare", __doc__)
