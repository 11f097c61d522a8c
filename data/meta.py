"""A dataset's meta from what other tools wrote: an old meta.pkl (nanoGPT's, and folders
prepared before meta.json), read as plain values only; and the meta of any tokenizer.json or
transformers folder holding one."""

import io
import json
import pickle
from pathlib import Path

from common import DataError
from data.common import dtype_for
from data.tokenizer import hf_tokenizer

PLAIN = (dict, list, tuple, str, int, float, bool, type(None))  # what an old meta.pkl may hold
# end-of-text tokens by name, for a tokenizer.json whose folder does not say (GPT-2 and its
# descendants, LLaMA 3, SentencePiece models, Gemma)
EOT_NAMES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>")


class _Refused(pickle.UnpicklingError):
    """A pickle that names a global (a class or a function): unpickling it could run code."""


class _PlainUnpickler(pickle.Unpickler):
    """Unpickles plain values only: every global (class, function) is refused, so no code runs."""

    def find_class(self, module, name):
        raise _Refused(f"it names {module}.{name}")


def _is_plain(value):
    if isinstance(value, dict):
        return all(_is_plain(k) and _is_plain(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return all(_is_plain(v) for v in value)
    return type(value) in PLAIN


def read_old_meta(path, again):
    """The dict of an old meta.pkl, unpickled only when it holds nothing but plain values:
    anything else could run code when unpickled, and is refused with one line."""
    try:
        meta = _PlainUnpickler(io.BytesIO(path.read_bytes())).load()
    except _Refused as e:
        raise DataError(f"{path} holds objects, not just plain values ({e}); refused, as "
                        f"unpickling it could run code: {again}") from None
    except Exception as e:  # a truncated or corrupt pickle raises many types
        raise DataError(f"{path} is not a readable meta.pkl ({type(e).__name__}); {again}"
                        ) from None
    if not _is_plain(meta):
        raise DataError(f"{path} holds values other than dicts, lists, strings and numbers; "
                        f"refused: {again}")
    return meta


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
