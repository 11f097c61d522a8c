"""Generate text from a trained checkpoint.

    python sample.py                                   # from out/ckpt.pt
    python sample.py --out_dir=out --start="ROMEO:" --num_samples=3 --max_new_tokens=500 \
        --temperature=0.8 --top_k=200 --seed=1337
    python sample.py --start=FILE:prompt.txt --temperature=0   # temperature 0 is greedy decoding

A prompt longer than the model's context is cropped to its last block_size tokens.
"""

from contextlib import nullcontext
from pathlib import Path

import torch

from checkpoint import load_checkpoint, model_from_checkpoint, model_from_packed
from configurator import ConfigError, run_cli
from generation import generate

DEFAULTS = dict(
    out_dir="out",
    ckpt="",  # a checkpoint (.pt) or packed model (.bitnet); empty means out_dir/ckpt.pt
    start="\n",  # the prompt, or FILE:path to read it from a file
    num_samples=3,
    max_new_tokens=500,
    temperature=0.8,  # 1.0 as trained, lower is more conservative, 0 is greedy (argmax)
    top_k=200,  # keep only the k most likely tokens; 0 keeps all
    seed=1337,
    device="auto",
    dtype="auto",
    compile=False,
)


class Tokenizer:
    """The checkpoint's characters (meta with stoi/itos), else GPT-2 BPE via tiktoken.
    meta['tokenizer'] ('char' or 'gpt2') decides; older metas without it are characters when
    they have stoi, and no meta at all means GPT-2."""

    def __init__(self, meta):
        meta = meta or {}
        if meta.get("tokenizer", "char" if "stoi" in meta else "gpt2") == "char":
            self.stoi = meta["stoi"]
            self.itos = {int(i): ch for i, ch in meta["itos"].items()}  # JSON keys are strings
        else:
            import tiktoken
            self.enc = tiktoken.get_encoding("gpt2")
            self.stoi = None

    def encode(self, text):
        if self.stoi is None:
            return self.enc.encode(text, allowed_special={"<|endoftext|>"})
        unknown = sorted(set(text) - set(self.stoi))
        if unknown:
            raise ConfigError(f"the prompt has characters this model never saw: "
                              f"{''.join(unknown)!r}; its vocabulary is "
                              f"{''.join(sorted(self.stoi))!r}")
        return [self.stoi[c] for c in text]

    def decode(self, ids):
        return self.enc.decode(ids) if self.stoi is None else "".join(self.itos[i] for i in ids)


def read_prompt(start):
    if start.startswith("FILE:"):
        path = Path(start[5:])
        if not path.is_file():
            raise ConfigError(f"prompt file '{path}' not found")
        start = path.read_text(encoding="utf-8")
    if not start:
        raise ConfigError("the prompt is empty; give --start=TEXT (the default is a newline)")
    return start


def check(cfg):
    if cfg["max_new_tokens"] <= 0:
        raise ConfigError(f"max_new_tokens must be positive, got {cfg['max_new_tokens']}")
    if cfg["temperature"] < 0:
        raise ConfigError(f"temperature must be >= 0 (0 is greedy), got {cfg['temperature']}")
    if cfg["top_k"] < 0 or cfg["num_samples"] < 1:
        raise ConfigError("top_k must be >= 0 and num_samples >= 1")


def load_model(path, device):
    """A model ready for inference, with its tokenizer: from a training checkpoint (.pt), or
    from a packed .bitnet file (export.py), which runs with integer matmuls."""
    if str(path).endswith(".bitnet"):
        model, ckpt = model_from_packed(path)
    else:
        ckpt = load_checkpoint(path)
        model = model_from_checkpoint(ckpt, path)
    return model.eval().to(device), Tokenizer(ckpt.get("meta"))


def sample(cfg):
    """Return the list of generated texts (prompt included)."""
    check(cfg)
    from settings import resolve_device
    device, dtype = resolve_device(cfg["device"], cfg["dtype"])
    model, tok = load_model(cfg["ckpt"] or Path(cfg["out_dir"]) / "ckpt.pt", device)
    if cfg["compile"]:
        model = torch.compile(model)
    ids = tok.encode(read_prompt(cfg["start"]))
    x = torch.tensor(ids, dtype=torch.long, device=device)[None, ...]
    generator = torch.Generator(device=device).manual_seed(cfg["seed"])
    ctx = (nullcontext() if dtype == "float32"
           else torch.autocast(device_type=device.split(":")[0], dtype=getattr(torch, dtype)))
    texts = []
    with ctx:
        for _ in range(cfg["num_samples"]):
            y = generate(model, x, cfg["max_new_tokens"], cfg["temperature"],
                         cfg["top_k"] or None, generator)
            texts.append(tok.decode(y[0].tolist()))
    return texts


def main(argv=None):
    for text in run_cli(DEFAULTS, sample, "sample.py", __doc__, argv):
        print(text)
        print("---------------")


if __name__ == "__main__":
    main()
