"""The .bitnet file: a model with its BitLinear weights packed to 2 (or 1.6) bits each.

Layout (all integers little-endian):

    magic    8 bytes   b"BITNET\\x00\\x01"
    version  uint32    FORMAT_VERSION
    length   uint64    byte length of the header
    header   JSON      {"arch", "model_args", "meta", "tensors": [...], "aliases": {...}}
    data     the tensors' bytes, each at header offset (from the start of data), 64-byte aligned

Each tensor entry has name, kind, shape, offset and nbytes. kind "float32" is a plain
row-major float32 array. kind "ternary2" / "ternary3" is a BitLinear weight of shape (out, in)
packed by pack_2bit / pack_base3 (see pack.py for the bit order), with its scale s_w = 1/mean|W|
in "scale" (a float32 value, exact in JSON); it loads as a TernaryLinear's weight_t and
weight_scale. "aliases" maps a tied tensor's name to the name it shares storage with.
"""

import json
import os
import struct
from pathlib import Path

import numpy as np
import torch

from .layer import BitLinear
from .pack import pack_2bit, pack_base3, unpack_2bit, unpack_base3
from .quant import ternarize

MAGIC = b"BITNET\x00\x01"
FORMAT_VERSION = 1
ALIGN = 64
PACKERS = {"ternary2": (pack_2bit, unpack_2bit), "ternary3": (pack_base3, unpack_base3)}


class PackedFileError(ValueError):
    """A .bitnet file that cannot be read; the message says why, in one line."""


def _tensors(model, kind):
    """(name, kind, bytes, shape, scale) per tensor of the model's state; BitLinears packed."""
    bit_weights = {f"{n}.weight": m for n, m in model.named_modules() if isinstance(m, BitLinear)}
    seen = {}
    for name, t in model.state_dict(keep_vars=False).items():
        if t.data_ptr() in seen:
            yield name, "alias", seen[t.data_ptr()], None, None
            continue
        seen[t.data_ptr()] = name
        if name in bit_weights:
            w_t, s = ternarize(t, bit_weights[name].eps)
            yield name, kind, PACKERS[kind][0](w_t).numpy().tobytes(), list(t.shape), s.item()
        else:
            yield name, "float32", t.detach().float().cpu().numpy().tobytes(), list(t.shape), None


def save_packed(model, path, arch, model_args, meta=None, packing="2bit"):
    """Write model to path (atomically) with its BitLinear weights packed."""
    kind = {"2bit": "ternary2", "base3": "ternary3"}[packing]
    entries, aliases, blobs, offset = [], {}, [], 0
    for name, k, data, shape, scale in _tensors(model, kind):
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
                         "tensors": entries, "aliases": aliases}).encode()
    tmp = Path(path).with_name(Path(path).name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(MAGIC + struct.pack("<IQ", FORMAT_VERSION, len(header)) + header)
        for blob in blobs:
            f.write(blob)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_packed(path):
    """Read a .bitnet file -> (header dict, state dict for the model after to_integer)."""
    raw = Path(path).read_bytes()
    if raw[:8] != MAGIC:
        raise PackedFileError(f"'{path}' is not a .bitnet file (export one with export.py)")
    if len(raw) < 20:
        raise PackedFileError(f"'{path}' is truncated (no header)")
    version, n = struct.unpack("<IQ", raw[8:20])
    if version != FORMAT_VERSION:
        raise PackedFileError(f"'{path}' is .bitnet version {version}; this code reads version "
                              f"{FORMAT_VERSION}")
    try:
        header = json.loads(raw[20:20 + n])
    except ValueError:
        raise PackedFileError(f"'{path}' is truncated or corrupt (bad header)") from None
    data, state = memoryview(raw)[20 + n:], {}
    for e in header["tensors"]:
        if e["offset"] + e["nbytes"] > len(data):
            raise PackedFileError(f"'{path}' is truncated: tensor {e['name']} runs past the end")
        buf = data[e["offset"]:e["offset"] + e["nbytes"]]
        if e["kind"] == "float32":
            state[e["name"]] = torch.from_numpy(np.frombuffer(buf, np.float32).copy()
                                                ).view(e["shape"])
        else:
            packed = torch.from_numpy(np.frombuffer(buf, np.uint8).copy())
            w_t = PACKERS[e["kind"]][1](packed, e["shape"])
            prefix = e["name"].removesuffix("weight")
            state[prefix + "weight_t"] = w_t.t().contiguous()
            state[prefix + "weight_scale"] = torch.tensor(e["scale"], dtype=torch.float32)
    for name, target in header["aliases"].items():
        state[name] = state[target]
    return header, state
