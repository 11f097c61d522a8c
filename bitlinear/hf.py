"""A HuggingFace transformers model folder, written and read, whichever architecture it holds
(gpt/hf.py and llama/hf.py give the class, its config.json and its tensor names).

A folder is config.json, generation_config.json, the tokenizer's files and model.safetensors.
Ternary models carry transformers' bitnet quantization config (linear_class 'bitlinear',
offline): each projection is uint8 (out/4, in), value + 1 in 2 bits, row i*R + r in packed row r
at bits 2i..2i+1 (R = out/4), with weight_scale = 1/mean|W|, the s_w that our BitLinear divides
by (the 'autobitlinear' class multiplies by mean|W| instead). Its activations are per-token
absmax int8 like ours; bit_norm=True maps to the config's use_rms_norm. Float models
(bitlinear=False) are plain checkpoints of the same class. Loading a ternary folder in
transformers needs `pip install accelerate`.

The tokenizer goes beside the weights as tokenizer.json: characters and GPT-2 BPE rebuilt from
the meta, any other tokenizer (meta kind 'hf') as the very file it was prepared with.

Reading: the safetensors files' headers are checked, every entry against its file, before any
tensor is read; then each tensor is read alone at its offset (read_tensor), so an import holds
one tensor as the file stores it at a time.
"""

import json
import math
from collections import namedtuple
from pathlib import Path

import torch

from bitlinear.pack import pack_2bit_rows
from common import UserError, first_line
from data.tokenizer import GPT2_EOT, tokenizer_kind
from data.vocab import char_tokens, gpt2_vocab

HF_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# bytes per value of each safetensors dtype
SAFETENSORS_DTYPES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2,
                      "U16": 2, "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8,
                      "U64": 8, "F64": 8}
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
# what read_tensor reads: packed ternary values and floats (the importers refuse other dtypes)
TORCH_DTYPES = {"U8": torch.uint8, "F16": torch.float16, "BF16": torch.bfloat16,
                "F32": torch.float32, "F64": torch.float64}

Entry = namedtuple("Entry", "file dtype shape start")  # start: the data's offset in the file


class ExportError(UserError):
    """A model or option a target format cannot represent, or a folder or file that cannot be
    read as one; the message says which and why."""


# ---- writing ---------------------------------------------------------------------------------

def bitnet_quantization(args):
    """The quantization_config of a ternary model: transformers' bitnet, offline 'bitlinear'."""
    return {"quant_method": "bitnet", "linear_class": "bitlinear", "quantization_mode": "offline",
            "use_rms_norm": args.get("bit_norm", False), "rms_norm_eps": 1e-6,
            "modules_to_not_convert": ["lm_head"]}


def put_ternary(out, name, t, s, dtype):
    """out[name]: ternary values t packed 4 rows a byte; out[name + '_scale']: s_w, shape (1,)
    (transformers refuses a 0-d scale)."""
    out[name] = pack_2bit_rows(t)
    out[name + "_scale"] = s.reshape(1).to(dtype)


def generation_config(config):
    return {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"],
            "do_sample": True, "temperature": 0.8, "top_k": 200}


def tokenizer_files(meta, block_size):
    """{filename: json object or text}: tokenizer.json (rebuilt for GPT-2 BPE or characters, the
    prepared file itself for any other) and the tokenizer_config.json that makes it
    transformers' PreTrainedTokenizerFast."""
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": block_size,
              "clean_up_tokenization_spaces": False}
    if tokenizer_kind(meta) == "hf":  # its end-of-text token is the one transformers stops at
        eos = {"eos_token": meta["eot_token"]} if meta.get("eot_token") else {}
        return {"tokenizer.json": meta["tokenizer_json"], "tokenizer_config.json": config | eos}
    added = []
    if tokenizer_kind(meta) == "gpt2":
        tokens, merges = gpt2_vocab()
        byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                      "use_regex": True}
        model = {"type": "BPE", "vocab": {t: i for i, t in enumerate(tokens)},
                 "merges": [m.split(" ") for m in merges], "dropout": None, "unk_token": None,
                 "fuse_unk": False, "byte_fallback": False, "ignore_merges": False}
        added = [{"id": tokens.index(GPT2_EOT), "content": GPT2_EOT, "single_word": False,
                  "lstrip": False, "rstrip": False, "normalized": False, "special": True}]
        pre, post, decoder = byte_level, byte_level, byte_level
        special = {"bos_token": GPT2_EOT, "eos_token": GPT2_EOT, "unk_token": GPT2_EOT}
    else:  # one token per character: a BPE without merges, and pieces joined as they are
        model = {"type": "BPE", "vocab": {t: i for i, t in enumerate(char_tokens(meta))},
                 "merges": [], "dropout": None, "unk_token": None, "fuse_unk": False,
                 "byte_fallback": False, "ignore_merges": False}
        pre, post, decoder, special = None, None, {"type": "Fuse"}, {}
    tokenizer = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
                 "normalizer": None, "pre_tokenizer": pre, "post_processor": post,
                 "decoder": decoder, "model": model}
    return {"tokenizer.json": tokenizer, "tokenizer_config.json": config | special}


def write_folder(folder, config, meta, block_size, state):
    """config.json, generation_config.json, the tokenizer's files and model.safetensors."""
    try:
        from safetensors.torch import save_file
    except ImportError:
        raise ExportError("--format=hf writes safetensors: pip install safetensors") from None
    files = {"config.json": config,
             "generation_config.json": generation_config(config),
             **tokenizer_files(meta, block_size)}
    for name, obj in files.items():
        text = obj if isinstance(obj, str) else json.dumps(obj, indent=1, ensure_ascii=False) + "\n"
        (folder / name).write_text(text, encoding="utf-8")
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})


# ---- reading ---------------------------------------------------------------------------------

def read_config(folder):
    """config.json of a transformers folder, as a dict; one line when it cannot be read."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ExportError(f"'{folder}' is not a transformers model folder (no config.json file); "
                          f"give a checkpoint (.pt), a .bitnet file, or such a folder")
    try:
        config = json.loads((folder / "config.json").read_text())
    except (ValueError, RecursionError) as e:  # not JSON, or not UTF-8
        raise ExportError(f"'{folder}/config.json' is not a readable transformers config "
                          f"({type(e).__name__}: {first_line(e)})") from None
    if not isinstance(config, dict):
        raise ExportError(f"'{folder}/config.json' is not a readable transformers config (a "
                          f"JSON {type(config).__name__}, not an object)")
    return config


def safetensors_table(folder):
    """{tensor name: Entry} of the folder's *.safetensors files, from their headers alone, every
    entry checked against its file (a damaged file is one ExportError)."""
    table = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        def bad(what, f=f):
            return ExportError(f"'{f}' is not a readable safetensors file ({what}); export the "
                               f"model again")
        if not f.is_file():  # a FIFO would block the read
            raise bad("not a regular file")
        size = f.stat().st_size
        with open(f, "rb") as fh:
            start = fh.read(8)
            n = int.from_bytes(start, "little")
            if len(start) < 8 or n > size - 8:
                raise bad(f"its header claims {n} bytes, the file holds {size - 8}")
            try:
                header = json.loads(fh.read(n))
            except (ValueError, RecursionError):
                raise bad("its header is not JSON") from None
        if not isinstance(header, dict):
            raise bad("its header is not a JSON object")
        for name, e in header.items():
            if name == "__metadata__":
                continue
            if not isinstance(e, dict) or e.get("dtype") not in SAFETENSORS_DTYPES:
                raise bad(f"tensor {name} has no known dtype")
            shape, span = e.get("shape"), e.get("data_offsets")
            if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
                raise bad(f"tensor {name} has shape {shape!r}")
            if not (isinstance(span, list) and len(span) == 2 and all(type(x) is int for x in span)
                    and 0 <= span[0] <= span[1] <= size - 8 - n
                    and span[1] - span[0] == math.prod(shape) * SAFETENSORS_DTYPES[e["dtype"]]):
                raise bad(f"tensor {name}'s data_offsets {span!r} do not fit its shape and file")
            if name in table:
                raise ExportError(f"'{folder}' holds tensor {name} twice ({table[name][0].name} "
                                  f"and {f.name})")
            table[name] = Entry(f, e["dtype"], tuple(shape), 8 + n + span[0])
    return table


def read_tensor(entry):
    """One tensor of a safetensors file (little-endian, as this machine), read at the offset its
    header gives: plain reads, not a memory map, whose pages would count as this process's
    memory until the whole file is unmapped."""
    n = math.prod(entry.shape) * SAFETENSORS_DTYPES[entry.dtype]
    data = torch.empty(n, dtype=torch.uint8)
    with open(entry.file, "rb") as f:
        f.seek(entry.start)
        if f.readinto(data.numpy()) != n:
            raise ExportError(f"'{entry.file}' changed while it was read; export the model again")
    return data.view(TORCH_DTYPES[entry.dtype]).reshape(entry.shape)
