"""Which tokenizer a dataset's meta means, the Tokenizer that runs it, and its vocabulary as
other libraries store it (the token strings and, for BPE, merges: llama/hf.py and llama/gguf.py
write the tokenizer next to the weights).

A dataset's meta.json (data.loader.read_meta) says which one a model was trained with: 'char'
(one token per character, stoi/itos in meta) or 'gpt2' (GPT-2's byte-level BPE, which tiktoken
downloads and caches); tokenizer_kind is the one place that reads it. GPT-2's token strings are
its byte-level forms ('Ġthe' for ' the'), as encoder.json and vocab.bpe hold them; those two files
come from tiktoken's cache, so an export works offline wherever tiktoken does. Every use of them
goes through gpt2_encoding or gpt2_file, which turn a failed download into one line.
"""

import json
import os
import tempfile

from common import ConfigError
from data.common import DataError

GPT2_FILES = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"
GPT2_EOT = "<|endoftext|>"
KINDS = ("char", "gpt2")  # what tokenizer_kind returns for the metas data/ writes


def tiktoken_cache():
    """The folder tiktoken caches its downloads in (as tiktoken.load.read_file_cached finds it)."""
    for var in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR"):
        if var in os.environ:
            return os.environ[var]  # "": no cache
    return os.path.join(tempfile.gettempdir(), "data-gym-cache")


def _gpt2_missing(e):
    why = "a corrupt download" if isinstance(e, ValueError) else type(e).__name__
    cache = tiktoken_cache() or "(none: TIKTOKEN_CACHE_DIR is empty)"
    return DataError(f"GPT-2 BPE needs its encoding files (encoder.json and vocab.bpe from "
                     f"{GPT2_FILES}), which are not in the tiktoken cache {cache} and could not "
                     f"be downloaded ({why}); set TIKTOKEN_CACHE_DIR to a cache that holds "
                     f"them, or go online once to fill it")


def _tiktoken():
    try:
        import tiktoken
        import tiktoken.load
    except ImportError:
        raise DataError("GPT-2 BPE needs the 'tiktoken' package: pip install tiktoken") from None
    return tiktoken


def gpt2_encoding():
    """tiktoken's GPT-2 encoding (tiktoken keeps it once loaded). Offline with an empty cache,
    a one-line DataError saying what is missing instead of requests' traceback."""
    tiktoken = _tiktoken()
    try:
        return tiktoken.get_encoding("gpt2")
    except (OSError, ValueError) as e:  # requests' errors are OSErrors; ValueError: bad hash
        raise _gpt2_missing(e) from None


def gpt2_file(name):
    """The bytes of one of GPT-2's encoding files ('encoder.json', 'vocab.bpe'), from tiktoken's
    cache or downloaded into it; a one-line DataError when neither works."""
    tiktoken = _tiktoken()
    try:
        return tiktoken.load.read_file_cached(GPT2_FILES + name)
    except (OSError, ValueError) as e:
        raise _gpt2_missing(e) from None


def tokenizer_kind(meta):
    """'char' or 'gpt2'. Older metas without 'tokenizer' are characters when they have stoi,
    and no meta at all means GPT-2 (as nanoGPT's sample.py assumes)."""
    meta = meta or {}
    return meta.get("tokenizer", "char" if "stoi" in meta else "gpt2")


class Tokenizer:
    """Text <-> token ids for a meta: its characters (stoi/itos), or GPT-2 BPE via tiktoken."""

    def __init__(self, meta):
        if tokenizer_kind(meta) == "char":
            self.stoi = meta["stoi"]
            self.itos = {int(i): ch for i, ch in meta["itos"].items()}  # JSON keys are strings
        else:
            self.enc = gpt2_encoding()
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


def char_tokens(meta):
    """The characters of a char-level vocabulary, in id order."""
    itos = {int(i): ch for i, ch in meta["itos"].items()}  # JSON keys are strings
    return [itos[i] for i in range(len(itos))]


def gpt2_vocab():
    """GPT-2's BPE: (tokens in id order as byte-level strings, merges as 'a b' in rank order)."""
    encoder = json.loads(gpt2_file("encoder.json"))
    lines = gpt2_file("vocab.bpe").decode("utf-8").split("\n")
    merges = [ln for ln in lines[1:] if ln]  # the first line is '#version: 0.2'
    tokens = sorted(encoder, key=encoder.get)
    assert [encoder[t] for t in tokens] == list(range(len(tokens))), "encoder.json has gaps"
    return tokens, merges
