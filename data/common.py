"""What every data/<name>/prepare.py shares: fetching text, and writing train.bin / val.bin."""

import os
import pickle
import urllib.request
from pathlib import Path

import numpy as np
from tqdm import tqdm

TINYSHAKESPEARE_URL = ("https://raw.githubusercontent.com/karpathy/char-rnn/master/data/"
                       "tinyshakespeare/input.txt")
TINYSHAKESPEARE_ENV = "TINYSHAKESPEARE_PATH"  # a local copy, for offline machines and tests


def download(url, dest):
    """Download url to dest with a progress bar (written to a temp name, then renamed)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    print(f"downloading {url}\n         to {dest}")
    with urllib.request.urlopen(url) as r, open(tmp, "wb") as f:
        total = int(r.headers.get("Content-Length") or 0) or None
        with tqdm(total=total, unit="B", unit_scale=True, desc=dest.name) as bar:
            while chunk := r.read(1 << 16):
                f.write(chunk)
                bar.update(len(chunk))
    os.replace(tmp, dest)


def tinyshakespeare_text(folder, input_path=None):
    """Tiny Shakespeare (1.1 MB): input_path, else $TINYSHAKESPEARE_PATH, else a download."""
    path = input_path or os.environ.get(TINYSHAKESPEARE_ENV)
    if not path:
        path = Path(folder) / "input.txt"
        if not path.exists():
            try:
                download(TINYSHAKESPEARE_URL, path)
            except OSError as e:
                raise SystemExit(
                    f"error: could not download Tiny Shakespeare ({e}); offline? put the text at "
                    f"{path} or set {TINYSHAKESPEARE_ENV}=/path/input.txt") from None
    return Path(path).read_text(encoding="utf-8")


def write_splits(train_ids, val_ids, folder, dtype=np.uint16, meta=None):
    """Write token ids to folder/train.bin and folder/val.bin (+ meta.pkl when given)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    np.asarray(train_ids, dtype=dtype).tofile(folder / "train.bin")
    np.asarray(val_ids, dtype=dtype).tofile(folder / "val.bin")
    if meta is not None:
        with open(folder / "meta.pkl", "wb") as f:
            pickle.dump(meta, f)
    print(f"{folder}: train has {len(train_ids):,} tokens, val has {len(val_ids):,} tokens")
