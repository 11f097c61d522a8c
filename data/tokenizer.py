"""Which tokenizer a dataset's meta means, and the Tokenizer that runs it.

A dataset's meta.json (data.loader.read_meta) says which one a model was trained with: 'char'
(one token per character, stoi/itos in meta), 'gpt2' (GPT-2's byte-level BPE, which tiktoken
downloads and caches) or 'hf' (any tokenizer.json, run by the optional `tokenizers` package: the
file's whole text is in meta, so a checkpoint carries its tokenizer). tokenizer_kind is the one
place that reads it. GPT-2's files come from tiktoken's cache; gpt2_encoding turns a failed
download into one line.
"""

import os
import tempfile

import numpy as np

from common import ConfigError, DataError

GPT2_FILES = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"
GPT2_EOT = "<|endoftext|>"
KINDS = ("char", "gpt2", "hf")  # what tokenizer_kind returns for the metas data/ writes


def tiktoken_cache():
    """The folder tiktoken caches its downloads in (as tiktoken.load.read_file_cached finds it)."""
    for var in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR"):
        if var in os.environ:
            return os.environ[var]  # "": no cache
    return os.path.join(tempfile.gettempdir(), "data-gym-cache")


def gpt2_missing(e):
    why = "a corrupt download" if isinstance(e, ValueError) else type(e).__name__
    cache = tiktoken_cache() or "(none: TIKTOKEN_CACHE_DIR is empty)"
    return DataError(f"GPT-2 BPE needs its encoding files (encoder.json and vocab.bpe from "
                     f"{GPT2_FILES}), which are not in the tiktoken cache {cache} and could not "
                     f"be downloaded ({why}); set TIKTOKEN_CACHE_DIR to a cache that holds "
                     f"them, or go online once to fill it")


def tiktoken_module():
    try:
        import tiktoken
        import tiktoken.load
    except ImportError:
        raise DataError("GPT-2 BPE needs the 'tiktoken' package: pip install tiktoken") from None
    return tiktoken


def gpt2_encoding():
    """tiktoken's GPT-2 encoding (tiktoken keeps it once loaded). Offline with an empty cache,
    a one-line DataError saying what is missing instead of requests' traceback."""
    tiktoken = tiktoken_module()
    try:
        return tiktoken.get_encoding("gpt2")
    except (OSError, ValueError) as e:  # requests' errors are OSErrors; ValueError: bad hash
        raise gpt2_missing(e) from None


def tokenizer_kind(meta):
    """'char', 'gpt2' or 'hf'. Older metas without 'tokenizer' are characters when they have
    stoi, and no meta at all means GPT-2 (as nanoGPT's sample.py assumes)."""
    meta = meta or {}
    return meta.get("tokenizer", "char" if "stoi" in meta else "gpt2")


# ---- any tokenizer.json, through the tokenizers library -------------------------------------

def hf_tokenizer(text, where):
    """A tokenizers.Tokenizer from the text of a tokenizer.json (where: for the message), or a
    one-line DataError. Text that spells a special token stays text (as tiktoken's
    encode_ordinary): only Tokenizer.encode turns the end-of-text token's spelling into it."""
    try:
        import tokenizers
    except ImportError:
        raise DataError("a tokenizer.json needs the 'tokenizers' package: pip install tokenizers"
                        ) from None
    try:
        tok = tokenizers.Tokenizer.from_str(text)
    except Exception as e:  # the Rust side raises plain Exceptions
        why = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DataError(f"{where} is not a tokenizer.json that tokenizers can read ({why})"
                        ) from None
    tok.encode_special_tokens = True
    return tok


class Tokenizer:
    """Text <-> token ids for a meta: its characters (stoi/itos), GPT-2 BPE via tiktoken, or a
    tokenizer.json via tokenizers. eot_id is the end-of-text token's id (None for characters,
    and for a tokenizer.json without one)."""

    def __init__(self, meta):
        self.kind, self.eot, self.eot_id = tokenizer_kind(meta), None, None
        if self.kind == "char":
            self.stoi = meta["stoi"]
            self.itos = {int(i): ch for i, ch in meta["itos"].items()}  # JSON keys are strings
        elif self.kind == "gpt2":
            self.enc = gpt2_encoding()
            self.eot, self.eot_id = GPT2_EOT, self.enc.eot_token
        elif self.kind == "hf":
            self.hf = hf_tokenizer(meta["tokenizer_json"], "the meta's tokenizer_json")
            self.eot = meta.get("eot_token")
            self.eot_id = self.hf.token_to_id(self.eot) if self.eot else None
        else:
            raise DataError(f"the meta names tokenizer {self.kind!r}; this code knows "
                            f"{', '.join(KINDS)}")

    def encode(self, text):
        """A prompt's ids; the end-of-text token spelled out (e.g. <|endoftext|>) is that token."""
        if self.kind == "char":
            unknown = sorted(set(text) - set(self.stoi))
            if unknown:
                raise ConfigError(f"the prompt has characters this model never saw: "
                                  f"{''.join(unknown)!r}; its vocabulary is "
                                  f"{''.join(sorted(self.stoi))!r}")
            return [self.stoi[c] for c in text]
        if self.kind == "gpt2":
            return self.enc.encode(text, allowed_special={GPT2_EOT})
        parts = text.split(self.eot) if self.eot else [text]
        ids = []
        for i, part in enumerate(self.encode_ordinary(parts)):
            ids += [self.eot_id] * (i > 0) + part
        return ids

    def encode_ordinary(self, texts, threads=1):
        """The ids of each of texts, every special token's spelling kept as text (what the
        dataset scripts write; they add end-of-text tokens themselves)."""
        if self.kind == "gpt2":
            return self.enc.encode_ordinary_batch(texts, num_threads=threads)
        if self.kind == "hf":  # tokenizers runs a batch on its own threads
            return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=False)]
        return [self.encode(t) for t in texts]

    def decode(self, ids):
        if self.kind == "char":
            return "".join(self.itos[i] for i in ids)
        if self.kind == "gpt2":
            return self.enc.decode(ids)
        return self.hf.decode(ids, skip_special_tokens=False)

    def token_bytes(self):
        """UTF-8 bytes of each GPT-2 token id's text (end-of-text: 0), to turn nats per token into
        bits per byte; None for a tokenizer.json, whose pieces need not be whole characters."""
        if self.kind == "gpt2":
            return np.array([len(self.enc.decode_single_token_bytes(i)) if i < self.eot_id
                             else 0 for i in range(self.enc.n_vocab)])
        return None
