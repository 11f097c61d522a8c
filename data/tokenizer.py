"""Which tokenizer a dataset's meta means, the Tokenizer that runs it, and its vocabulary as
other libraries store it (the token strings and, for BPE, merges: llama/hf.py and llama/gguf.py
write the tokenizer next to the weights).

A dataset's meta.json (data.loader.read_meta) says which one a model was trained with: 'char'
(one token per character, stoi/itos in meta), 'gpt2' (GPT-2's byte-level BPE, which tiktoken
downloads and caches) or 'hf' (any tokenizer.json, run by the optional `tokenizers` package: the
file's whole text is in meta, so a checkpoint carries its tokenizer; see hf_meta).
tokenizer_kind is the one place that reads it. GPT-2's token strings are its byte-level forms
('Ġthe' for ' the'), as encoder.json and vocab.bpe hold them; those two files come from
tiktoken's cache, so an export works offline wherever tiktoken does. Every use of them goes
through gpt2_encoding or gpt2_file, which turn a failed download into one line.
"""

import json
import os
import tempfile
from pathlib import Path

from common import ConfigError
from data.common import DataError, dtype_for

GPT2_FILES = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"
GPT2_EOT = "<|endoftext|>"
KINDS = ("char", "gpt2", "hf")  # what tokenizer_kind returns for the metas data/ writes
# end-of-text tokens by name, for a tokenizer.json whose folder does not say (GPT-2 and its
# descendants, LLaMA 3, SentencePiece models, Gemma)
EOT_NAMES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>")


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


def _json_file(path):
    """A JSON object file's dict; {} when it is absent; a DataError when it is not JSON."""
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError):
        raise DataError(f"'{path}' is not valid JSON") from None
    return value if isinstance(value, dict) else {}


def find_eot(tok, tokenizer_config):
    """(end-of-text token, where it came from): tokenizer_config.json's eos_token, else its
    bos_token (GPT-2's are one token), else the first of EOT_NAMES in the vocabulary; (None, why)
    when there is none."""
    for key in ("eos_token", "bos_token"):
        value = tokenizer_config.get(key)
        value = value.get("content") if isinstance(value, dict) else value  # an AddedToken's
        if isinstance(value, str) and tok.token_to_id(value) is not None:
            return value, f"tokenizer_config.json's {key}"
    for name in EOT_NAMES:
        if tok.token_to_id(name) is not None:
            return name, "found by its name"
    return None, f"none: no tokenizer_config.json eos/bos token, nor any of {', '.join(EOT_NAMES)}"


def hf_meta(path):
    """(meta, where its end-of-text token came from) for a tokenizer.json, or for a transformers
    folder holding one: meta is {'vocab_size', 'tokenizer': 'hf', 'dtype', 'tokenizer_json': the
    file's text, 'eot_token': a token string or None}. A folder also gives its
    tokenizer_config.json (the eos/bos tokens) and its config.json's vocab_size, the model's,
    which may be padded past the tokenizer's last id: data prepared with the folder then fits
    the model in it (train.py checks that the two vocab_sizes agree)."""
    path = Path(path)
    folder = path if path.is_dir() else None
    file = path / "tokenizer.json" if folder else path
    if not file.is_file():
        raise DataError(f"'{path}' is not a tokenizer.json, nor a folder holding one")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(f"'{file}' is not UTF-8 text, so not a tokenizer.json") from None
    tok = hf_tokenizer(text, f"'{file}'")
    eot, how = find_eot(tok, _json_file(folder / "tokenizer_config.json") if folder else {})
    vocab_size = max(tok.get_vocab(with_added_tokens=True).values(), default=-1) + 1
    model_vocab = _json_file(folder / "config.json").get("vocab_size") if folder else None
    if type(model_vocab) is int and model_vocab > vocab_size:
        vocab_size = model_vocab
    meta = {"vocab_size": vocab_size, "tokenizer": "hf", "dtype": dtype_for(vocab_size),
            "tokenizer_json": text, "eot_token": eot}
    return meta, how


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
