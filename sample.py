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

from bitlinear.layer import frozen_weights
from common import (
    ConfigError,
    defaults,
    load_checkpoint,
    model_from_checkpoint,
    resolve_device,
    run_cli,
)
from data.tokenizer import Tokenizer

SETTINGS = dict(
    out_dir=("out", "the run whose out_dir/ckpt.pt to sample from"),
    ckpt=("", "a checkpoint (.pt), a packed model (.bitnet) or a transformers folder; empty: "
              "out_dir/ckpt.pt"),
    start=("\n", "the prompt, or FILE:path to read it from a file"),
    num_samples=(3, "samples to draw"),
    max_new_tokens=(500, "tokens generated per sample"),
    temperature=(0.8, "1.0 as trained, lower is more conservative, 0 is greedy (argmax)"),
    top_k=(200, "keep only the k most likely tokens; 0 keeps all"),
    seed=(1337, "random seed"),
    device=("auto", "'auto' (cuda, else mps, else cpu), 'cpu', 'cuda', 'mps'"),
    dtype=("auto", "'auto', 'float32', 'bfloat16' or 'float16'"),
    compile=(False, "torch.compile the model"),
)
DEFAULTS = defaults(SETTINGS)


# ---- generation with a key/value cache, for every architecture ------------------------------
# A model takes part by accepting `cache=` in forward (calling cache.layer(i).update(k, v) in
# layer i's attention) and returning the last position's logits when no targets are given.

class LayerCache:
    """Keys and values of one attention layer, preallocated to the model's context length."""

    def __init__(self, parent):
        self.parent = parent
        self.k = self.v = None

    def update(self, k, v):
        """Append k, v (B, n_kv_head, T, head_size) and return everything cached so far."""
        start, end = self.parent.length, self.parent.length + k.size(2)
        if self.k is None:
            shape = (k.size(0), k.size(1), self.parent.max_length, k.size(3))
            self.k = k.new_empty(shape)
            self.v = v.new_empty(shape)
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class KVCache:
    """One LayerCache per layer; `length` counts the positions already cached."""

    def __init__(self, n_layer, max_length):
        self.max_length = max_length
        self.length = 0
        self.layers = [LayerCache(self) for _ in range(n_layer)]

    def layer(self, i):
        return self.layers[i]


def sample_next(logits, temperature=1.0, top_k=None, generator=None):
    """Pick the next token from (B, vocab) logits; temperature 0 means greedy (argmax)."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None and top_k < logits.size(-1):
        v, _ = torch.topk(logits, top_k)
        logits = logits.masked_fill(logits < v[:, [-1]], float("-inf"))
    probs = torch.softmax(logits.float(), dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)


def generate(model, idx, max_new_tokens, temperature=1.0, top_k=None, generator=None,
             use_cache=True):
    """Extend idx (B, T) by max_new_tokens sampled tokens."""
    for longer in generate_steps(model, idx, max_new_tokens, temperature, top_k, generator,
                                 use_cache):
        idx = longer
    return idx


@torch.no_grad()
def generate_steps(model, idx, max_new_tokens, temperature=1.0, top_k=None, generator=None,
                   use_cache=True):
    """Yield idx (B, T + i) after each new token i = 1 .. max_new_tokens, for a caller that
    stops early (at a stop string, say).

    Once the text outgrows the context, the model sees only its last block_size tokens, as in
    nanoGPT; with the cache that means one fresh prefill of that window per token from there on,
    so cached and uncached generation give exactly the same tokens.
    """
    block_size = model.config.block_size
    cache = None
    for _ in range(max_new_tokens):
        if not use_cache or cache is None or cache.length + 1 > block_size:
            cache = KVCache(model.config.n_layer, block_size) if use_cache else None
            logits, _ = model(idx[:, -block_size:], cache=cache)
            if cache is not None:
                cache.length = min(idx.size(1), block_size)
        else:
            logits, _ = model(idx[:, -1:], cache=cache)
            cache.length += 1
        idx_next = sample_next(logits[:, -1, :], temperature, top_k, generator)
        idx = torch.cat((idx, idx_next), dim=1)
        yield idx


def load_model(path):
    """(model, meta) to sample from: a training checkpoint; or, each loaded by its extension, a
    packed .bitnet file (export.py), which runs exact integer inference, or a transformers
    folder of a LLaMA or BitNet model."""
    path = Path(path)
    if path.is_dir():  # seam: transformers folders
        from llama.hf_import import inference_model
        return inference_model(path)
    if path.suffix == ".bitnet" or path.is_file() and first_bytes(path) == b"BITNET":
        from bitlinear.packed_model import inference_model  # seam: packed files
        return inference_model(path)
    ckpt = load_checkpoint(path)
    return model_from_checkpoint(ckpt, path), ckpt.get("meta")


def first_bytes(path, n=6):
    with open(path, "rb") as f:
        return f.read(n)


def read_prompt(start):
    if start.startswith("FILE:"):
        path = Path(start[5:])
        if not path.is_file():
            raise ConfigError(f"prompt file '{path}' not found (or not a regular file)")
        try:
            start = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(f"prompt file '{path}' is not UTF-8 text (byte 0x"
                              f"{e.object[e.start]:02x} at offset {e.start}); give a text file"
                              ) from None
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


def sample(cfg):
    """Return the list of generated texts (prompt included)."""
    check(cfg)
    device, dtype = resolve_device(cfg["device"], cfg["dtype"])
    model, meta = load_model(cfg["ckpt"] or Path(cfg["out_dir"]) / "ckpt.pt")
    model, tok = model.eval().to(device), Tokenizer(meta)
    if cfg["compile"]:
        model = torch.compile(model)
    ids = tok.encode(read_prompt(cfg["start"]))
    x = torch.tensor(ids, dtype=torch.long, device=device)[None, ...]
    generator = torch.Generator(device=device).manual_seed(cfg["seed"])
    ctx = (nullcontext() if dtype == "float32"
           else torch.autocast(device_type=device.split(":")[0], dtype=getattr(torch, dtype)))
    texts = []
    with ctx, frozen_weights(model):
        for _ in range(cfg["num_samples"]):
            y = generate(model, x, cfg["max_new_tokens"], cfg["temperature"],
                         cfg["top_k"] or None, generator)
            texts.append(tok.decode(y[0].tolist()))
    return texts


def main(argv=None):
    for text in run_cli(SETTINGS, sample, "sample.py", __doc__, argv):
        print(text)
        print("---------------")


if __name__ == "__main__":
    main()
