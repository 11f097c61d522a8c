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
Both are still read. A file with
another magic or version, a bad header, or data that ends early is refused with one line.

16-bit floats by default: float16 (export.py --float_dtype=fp16) keeps 3 more mantissa bits than
bfloat16 and runs exactly through fbgemm's fp16 GEMM (bitlinear.inference.Linear16); its range
(|x| <= 65504) is checked at export, and a model that exceeds it needs bf16 or fp32.
"""

import json
import struct
from pathlib import Path

import torch

from common import atomic_path

from .inference import load_integer_state, shell_model, to_integer
from .layer import BitLinear, activation_quant_int, ternarize
from .pack import pack_2bit, pack_base3, unpack_2bit, unpack_base3

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


def _read_header(f, path, size):
    start = f.read(20)
    if start[:8] != MAGIC:
        raise PackedFileError(f"'{path}' is not a .bitnet file (export one with export.py)")
    if len(start) < 20:
        raise PackedFileError(f"'{path}' is truncated (no header)")
    version, n = struct.unpack("<IQ", start[8:20])
    if version not in READABLE_VERSIONS:
        raise PackedFileError(f"'{path}' is .bitnet version {version}; this code reads versions "
                              f"{', '.join(map(str, READABLE_VERSIONS))}")
    try:
        header = json.loads(f.read(n))
        data_start = 20 + n
        ends = [data_start + e["offset"] + e["nbytes"] for e in header["tensors"]]
    except (ValueError, KeyError, TypeError):
        raise PackedFileError(f"'{path}' is truncated or corrupt (bad header)") from None
    if ends and max(ends) > size:
        raise PackedFileError(f"'{path}' is truncated: its data ends {max(ends) - size} bytes "
                              f"early")
    return header, data_start


def _tensor(e, buf):
    """One header entry's tensor from its bytes: float as stored, ternary as int8 (out, in)."""
    dtype = torch.int8 if e["kind"] == "int8" else FLOAT_KINDS.get(e["kind"])
    if dtype is not None:
        t = torch.frombuffer(buf, dtype=dtype) if len(buf) else torch.empty(0, dtype=dtype)
        return t.view(e["shape"])
    return PACKERS[e["kind"]][1](torch.frombuffer(buf, dtype=torch.uint8), e["shape"])


def load_packed(path):
    """Read a .bitnet file -> (header dict, state dict for the model after to_integer).

    Float tensors keep the file's dtype (bitlinear.inference.load_integer_state decides how they
    run); tensors are read one at a time, so the whole file is never in memory at once.
    """
    size = Path(path).stat().st_size
    state = {}
    with open(path, "rb") as f:
        header, data_start = _read_header(f, path, size)
        for e in header["tensors"]:
            try:
                f.seek(data_start + e["offset"])
                buf = bytearray(e["nbytes"])
                f.readinto(buf)
                state[e["name"]] = _tensor(e, buf)
                if "scale" in e:
                    prefix = e["name"].removesuffix("weight")
                    state[prefix + "weight_scale"] = torch.tensor(e["scale"], dtype=torch.float32)
            except (ValueError, KeyError, TypeError, RuntimeError):
                raise PackedFileError(f"'{path}' is corrupt: tensor {e.get('name')} does not "
                                      f"match its header entry") from None
    for name, target in header["aliases"].items():
        state[name] = state[target]
    return header, state


def load_integer_model(path, build):
    """(the integer model, header) of a .bitnet file; build(arch, model_args) makes the model.

    The model is built as a shell (shell_model) and takes the file's tensors as they are read:
    no float copy of the ternary weights is ever made, so memory is what the integer model holds.
    """
    header, state = load_packed(path)
    model = shell_model(lambda: to_integer(build(header["arch"], header["model_args"]),
                                           quantize=False))
    return load_integer_state(model, state), header
