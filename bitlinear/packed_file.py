"""The .bitnet file: a model with its BitLinear weights packed to 2 (or 1.6) bits each.

Layout, version 3 (all integers little-endian):

    magic    8 bytes   b"BITNET\\x00\\x01"
    version  uint32    3
    length   uint64    byte length of the header
    header   JSON      {"arch", "model_args", "meta", "float_dtype", "tensors": [...],
                        "aliases": {...}}
    data     the tensors' bytes, each at its header offset (from the start of data), 64-byte
             aligned (zero padding between tensors)

Each tensor entry has name, kind, shape, offset and nbytes. Kinds:
  "float16", "bfloat16", "float32"  a row-major little-endian array of that type: every tensor
        that is not a BitLinear weight (embeddings, norms, the head, biases), all in the
        export's float_dtype
  "ternary2", "ternary3"  a BitLinear weight W_t of shape (out, in), values in {-1, 0, +1},
        with its scale s_w = 1/mean|W| in "scale" (a float32 value, exact in JSON); it loads as
        a TernaryLinear's int8 weight and weight_scale. Values are stored as code = value + 1,
        row-major, the last byte padded with code 1 (value 0) (pack.py):
          ternary2: value 4k+j is bits 2j..2j+1 of byte k (least significant first): 2 bits each
          ternary3: byte k is sum_j code[5k+j] * 3**j, j = 0..4 (0..242): 1.6 bits each
  "int8"  (export.py --embed_int8=True) an embedding or output-head weight of shape (rows, cols)
        as int8, row-major, one absmax scale per row (127 / max|row|, the activation quantizer's
        formula) in the float32 tensor "<prefix>.weight_scale" of shape (rows,): the row is
        int8 / scale. Smaller (a quarter of float32) but no longer the trained values.
"aliases" maps a tied tensor's name to the name of the tensor it shares (stored once).

Version 2 is the same layout without "int8"; version 1 also has float32 as the only float kind.
Both are still read. A file with another magic or version, a bad header, or data that ends
early is refused with one line (PackedFileError). Nothing is read or allocated on a header's
word alone: its length must fit the file, every entry's offset and nbytes must lie inside the
data (aligned, not overlapping), nbytes must be what its kind and shape take, and model_args
must describe a model whose state is exactly the tensors the file holds (bitlinear/packed_model.py
builds the model's shell within a budget set by the file, before any tensor is read).

16-bit floats by default: float16 (export.py --float_dtype=fp16) keeps 3 more mantissa bits than
bfloat16 and runs exactly through fbgemm's fp16 GEMM (bitlinear.inference.Linear16); its range
(|x| <= 65504) is checked at export, and a model that exceeds it needs bf16 or fp32.
"""

import json
import math
import struct
from pathlib import Path

import torch

from bitlinear.layer import BitLinear, activation_quant_int, ternarize
from bitlinear.pack import pack_2bit, pack_base3, unpack_2bit, unpack_base3
from common import atomic_path

MAGIC = b"BITNET\x00\x01"
FORMAT_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
ALIGN = 64
PACKERS = {"ternary2": (pack_2bit, unpack_2bit), "ternary3": (pack_base3, unpack_base3)}
FLOAT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
FLOAT_KINDS = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class PackedFileError(ValueError):
    """A .bitnet file that cannot be read or written; the message says why, in one line."""


def _bit_weights(model):
    return {f"{n}.weight": m for n, m in model.named_modules() if isinstance(m, BitLinear)}


def _float_bytes(name, t, dtype):
    t = t.detach().to(torch.float32).cpu()
    out = t.to(dtype)
    if torch.isinf(out).any() and not torch.isinf(t).any():
        big = t.abs().max().item()
        raise PackedFileError(f"tensor {name} holds {big:.4g}, beyond {dtype}'s range; export "
                              f"with --float_dtype=bf16 or fp32")
    return out.reshape(-1).view(torch.uint8).numpy().tobytes()


def _embedding_weights(model):
    """Names of the weights of embeddings and float output heads (not BitLinears)."""
    return {f"{n}.weight" for n, m in model.named_modules()
            if type(m) is torch.nn.Embedding or type(m) is torch.nn.Linear}


def _tensors(model, kind, dtype, embed_int8=False):
    """(name, kind, bytes, shape, scale) per tensor of the model's state; BitLinears packed,
    and with embed_int8 the embeddings and head as int8 rows plus a scale tensor each."""
    bit_weights = _bit_weights(model)
    int8_weights = _embedding_weights(model) if embed_int8 else set()
    float_kind = next(k for k, d in FLOAT_KINDS.items() if d == dtype)
    seen = {}
    for name, t in model.state_dict(keep_vars=False).items():
        scale_name = name.removesuffix("weight") + "weight_scale"
        if t.data_ptr() in seen:
            yield name, "alias", seen[t.data_ptr()], None, None
            if name in int8_weights:
                yield scale_name, "alias", seen[t.data_ptr()] + "_scale", None, None
            continue
        seen[t.data_ptr()] = name
        if name in bit_weights:
            w_t, s = ternarize(t, bit_weights[name].eps)
            yield name, kind, PACKERS[kind][0](w_t).numpy().tobytes(), list(t.shape), s.item()
        elif name in int8_weights:
            w_i, s = activation_quant_int(t.detach().float().cpu())
            yield name, "int8", w_i.numpy().tobytes(), list(t.shape), None
            yield scale_name, "float32", s.view(-1).numpy().tobytes(), [t.size(0)], None
        else:
            yield name, float_kind, _float_bytes(name, t, dtype), list(t.shape), None


@torch.no_grad()
def round_float_tensors(model, float_dtype="fp16"):
    """Round (in place) the tensors a .bitnet file stores as floats to float_dtype and back:
    the model then computes what the exported integer model computes, up to float rounding."""
    bit_weights = _bit_weights(model)
    for name, t in model.state_dict(keep_vars=True).items():
        if name not in bit_weights and t.is_floating_point():
            t.copy_(t.to(FLOAT_DTYPES[float_dtype]))
    return model


def save_packed(model, path, arch, model_args, meta=None, packing="2bit", float_dtype="fp16",
                embed_int8=False):
    """Write model to path (atomically) with its BitLinear weights packed; returns the header."""
    kind = {"2bit": "ternary2", "base3": "ternary3"}[packing]
    entries, aliases, blobs, offset = [], {}, [], 0
    tensors = _tensors(model, kind, FLOAT_DTYPES[float_dtype], embed_int8)
    for name, k, data, shape, scale in tensors:
        if k == "alias":
            aliases[name] = data
            continue
        pad = -offset % ALIGN
        blobs += [b"\0" * pad, data]
        offset += pad
        entries.append({"name": name, "kind": k, "shape": shape, "offset": offset,
                        "nbytes": len(data), **({"scale": scale} if scale is not None else {})})
        offset += len(data)
    header = json.dumps({"arch": arch, "model_args": model_args, "meta": meta,
                         "float_dtype": float_dtype, "tensors": entries,
                         "aliases": aliases}).encode()
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(MAGIC + struct.pack("<IQ", FORMAT_VERSION, len(header)) + header)
        for blob in blobs:
            f.write(blob)
    return json.loads(header)


def ternary_bits_per_weight(header):
    """Bits of file data per BitLinear weight (the packed bytes, alignment padding excluded)."""
    ternary = [e for e in header["tensors"] if e["kind"] in PACKERS]
    n = sum(torch.Size(e["shape"]).numel() for e in ternary)
    return 8 * sum(e["nbytes"] for e in ternary) / max(n, 1)


KINDS = (*FLOAT_KINDS, "int8", *PACKERS)


def entry_nbytes(kind, shape):
    """The bytes a tensor of this kind and shape takes in the file."""
    n = math.prod(shape)
    if kind in PACKERS:
        return -(-n // (4 if kind == "ternary2" else 5))
    return n * (1 if kind == "int8" else FLOAT_KINDS[kind].itemsize)


def is_int(x):
    return type(x) is int  # not bool, which is an int to Python


def _read_header(f, path, size):
    """(header, data start) of an open .bitnet file, every number in the header checked
    against the file: nothing is read or allocated on a header's word alone."""
    start = f.read(20)
    if start[:8] != MAGIC:
        raise PackedFileError(f"'{path}' is not a .bitnet file (export one with export.py)")
    if len(start) < 20:
        raise PackedFileError(f"'{path}' is truncated (no header)")
    version, n = struct.unpack("<IQ", start[8:20])
    if version not in READABLE_VERSIONS:
        raise PackedFileError(f"'{path}' is .bitnet version {version}; this code reads versions "
                              f"{', '.join(map(str, READABLE_VERSIONS))}")
    if n > size - 20:
        raise PackedFileError(f"'{path}' is truncated or corrupt: its header claims {n} bytes, "
                              f"the file holds {size - 20} after the first 20")
    try:
        header = json.loads(f.read(n))
    except (ValueError, RecursionError):  # not JSON, not UTF-8, or nested beyond reason
        raise PackedFileError(f"'{path}' is truncated or corrupt (bad header)") from None
    _check_header(header, path, size - 20 - n)
    return header, 20 + n


def _bad_header(path, what):
    return PackedFileError(f"'{path}' is corrupt (bad header): {what}")


def _check_header(header, path, data_size):
    """Refuse (one line) a header whose fields have the wrong types, or whose tensor table
    does not fit data_size bytes of data: every entry's offset and byte count must lie inside
    the data, 64-byte aligned, not overlapping another, and nbytes must be what its kind and
    shape take (_check_entry). Aliases must name stored tensors."""
    def bad(what):
        return _bad_header(path, what)

    if not isinstance(header, dict):
        raise bad(f"a JSON {type(header).__name__}, not an object")
    if not isinstance(header.get("arch"), str):
        raise bad(f"arch {header.get('arch')!r} is not a name")
    if not isinstance(header.get("model_args"), dict):
        raise bad("model_args is not an object")
    if header.get("meta") is not None and not isinstance(header["meta"], dict):
        raise bad("meta is not an object")
    tensors, aliases = header.get("tensors"), header.setdefault("aliases", {})
    if not isinstance(tensors, list) or not isinstance(aliases, dict):
        raise bad("tensors is not a list or aliases is not an object")
    names = set()
    for i, e in enumerate(tensors):
        _check_entry(e, i, path)
        if e["name"] in names:
            raise bad(f"tensor {e['name']} appears twice")
        names.add(e["name"])
    ends = [e["offset"] + e["nbytes"] for e in tensors]
    if ends and max(ends) > data_size:
        raise PackedFileError(f"'{path}' is truncated: its data ends {max(ends) - data_size} "
                              f"bytes early")
    end, last = 0, None
    for e in sorted(tensors, key=lambda e: e["offset"]):
        if e["nbytes"] and e["offset"] < end:
            raise bad(f"tensors {last} and {e['name']} overlap")
        if e["nbytes"]:
            end, last = e["offset"] + e["nbytes"], e["name"]
    for name, target in aliases.items():
        if not isinstance(target, str) or target not in names or name in names:
            raise bad(f"alias {name} -> {target!r} does not name a stored tensor")


def _check_entry(e, i, path):
    """Refuse (one line) tensor entry i unless its name, kind, shape, offset, nbytes and scale
    have their types, and nbytes is what its kind and shape take."""
    if not isinstance(e, dict) or not isinstance(e.get("name"), str) or not e["name"]:
        raise _bad_header(path, f"tensor entry {i} has no name")
    name, kind, shape = e["name"], e.get("kind"), e.get("shape")
    if kind not in KINDS:
        raise _bad_header(path, f"tensor {name} has kind {kind!r}, not one of {', '.join(KINDS)}")
    if not isinstance(shape, list) or not all(is_int(d) and d >= 0 for d in shape):
        raise _bad_header(path, f"tensor {name} has shape {shape!r}, not a list of sizes")
    if (kind in PACKERS or kind == "int8") and len(shape) != 2:
        raise PackedFileError(f"'{path}' is corrupt: tensor {name} does not match its header "
                              f"entry ({kind} {shape} is not (rows, columns))")
    for key in ("offset", "nbytes"):
        if not is_int(e.get(key)) or e[key] < 0:
            raise _bad_header(path, f"tensor {name} has {key} {e.get(key)!r}, not a byte count")
    if e["offset"] % ALIGN:
        raise _bad_header(path, f"tensor {name} has offset {e['offset']}, not a multiple of "
                                f"{ALIGN}")
    need = entry_nbytes(kind, shape)
    if e["nbytes"] != need:
        raise PackedFileError(f"'{path}' is corrupt: tensor {name} does not match its header "
                              f"entry ({kind} {shape} takes {need} bytes, the entry says "
                              f"{e['nbytes']})")
    scale = e.get("scale")
    if (kind in PACKERS) != ("scale" in e):
        raise _bad_header(path, f"{kind} tensor {name} "
                                f"{'lacks' if kind in PACKERS else 'has'} a scale")
    if "scale" in e and not (type(scale) in (int, float) and math.isfinite(scale) and scale > 0):
        raise _bad_header(path, f"tensor {name} has scale {scale!r}, not a positive number")


def _tensor(e, buf):
    """One header entry's tensor from its bytes: float as stored, ternary as int8 (out, in)."""
    dtype = torch.int8 if e["kind"] == "int8" else FLOAT_KINDS.get(e["kind"], torch.uint8)
    t = torch.frombuffer(buf, dtype=dtype) if len(buf) else torch.empty(0, dtype=dtype)
    if e["kind"] in PACKERS:
        return PACKERS[e["kind"]][1](t, e["shape"])
    return t.view(e["shape"])


def load_packed(path, check=None):
    """Read a .bitnet file -> (header dict, state dict for the model after to_integer).

    Float tensors keep the file's dtype (bitlinear.inference.load_integer_state decides how they
    run); tensors are read one at a time, so the whole file is never in memory at once. The
    header is checked against the file first (_check_header), then by check(header) if given,
    before any tensor is read.
    """
    if not Path(path).is_file():  # a FIFO would block the read
        raise PackedFileError(f"'{path}' is not a regular file; give a .bitnet file")
    size = Path(path).stat().st_size
    state = {}
    with open(path, "rb") as f:
        header, data_start = _read_header(f, path, size)
        if check is not None:
            check(header)
        for e in header["tensors"]:
            try:
                f.seek(data_start + e["offset"])
                buf = bytearray(e["nbytes"])
                if f.readinto(buf) != e["nbytes"]:
                    raise ValueError("short read")
                state[e["name"]] = _tensor(e, buf)
                if "scale" in e:
                    prefix = e["name"].removesuffix("weight")
                    state[prefix + "weight_scale"] = torch.tensor(e["scale"], dtype=torch.float32)
            except (ValueError, KeyError, TypeError, RuntimeError):
                raise PackedFileError(f"'{path}' is corrupt: tensor {e.get('name')} does not "
                                      f"match its header entry") from None
            if e["kind"] in PACKERS and e["nbytes"] and state[e["name"]].abs().max() > 1:
                raise PackedFileError(f"'{path}' is corrupt: tensor {e['name']} holds codes "
                                      f"beyond the three ternary values")
    for name, target in header["aliases"].items():
        state[name] = state[target]
    return header, state
