"""The integer model a .bitnet file describes (bitlinear/packed_file.py reads the file), built
within what the file holds: its model_args are checked against the arch's config, and its shell is
built (shell_model) with a budget set by the file's tensors, before any tensor is read. A small
file claiming a huge model costs nothing; sample.py loads a packed file through inference_model.
"""

import dataclasses
import math
from pathlib import Path

import torch

from bitlinear.inference import (
    BuildTooLarge,
    TernaryLinear,
    load_integer_state,
    shell_model,
    to_integer,
)
from bitlinear.packed_file import FLOAT_KINDS, PACKERS, PackedFileError, is_int, load_packed
from common import ARCHS, CheckpointError, build_model, first_line, model_classes


def _check_args(arch, args, path):
    """Refuse model_args whose arch this code does not build, or whose values are not of the
    types of the arch's config (sizes: positive ints, or 0 where 0 is the default)."""
    if arch not in ARCHS:
        raise PackedFileError(f"'{path}' holds a '{arch}' model; this code builds "
                              f"{', '.join(sorted(ARCHS))}")
    fields = {f.name: f.default for f in dataclasses.fields(model_classes(arch)[1])}
    for key, value in args.items():
        if key not in fields:
            raise PackedFileError(f"'{path}' has model_args key '{key}', which this code's "
                                  f"{arch} model does not take (a file of another version?)")
        default = fields[key]
        if isinstance(default, bool):
            ok, want = isinstance(value, bool), "true or false"
        elif isinstance(default, int):
            ok = is_int(value) and (value > 0 or value == 0 == default)
            want = "a non-negative integer" if default == 0 else "a positive integer"
        elif isinstance(default, float):
            ok = type(value) in (int, float) and math.isfinite(value)
            want = "a finite number"
        elif isinstance(default, str):
            ok, want = isinstance(value, str), "a string"
        else:
            ok, want = True, ""
        if not ok:
            raise PackedFileError(f"'{path}' is corrupt: model_args {key}={value!r} is not "
                                  f"{want}")
    sizes = {**fields, **args}
    if {"n_embd", "n_head"} <= sizes.keys() and sizes["n_embd"] % sizes["n_head"]:
        raise PackedFileError(f"'{path}' is corrupt: model_args n_head={sizes['n_head']} does not "
                              f"divide n_embd={sizes['n_embd']}")


def _file_tensors(header):
    """{name: (shape, kind)} of the state a header's file loads ("scale": a ternary scale)."""
    table = {}
    for e in header["tensors"]:
        table[e["name"]] = (tuple(e["shape"]), e["kind"])
        if "scale" in e:
            table[e["name"].removesuffix("weight") + "weight_scale"] = ((), "scale")
    for name, target in header["aliases"].items():
        table[name] = table[target]
    return table


def shell_for(header, path):
    """The integer model's shell (shell_model) that a header's model_args describe, refused in
    one line (PackedFileError) unless it fits the tensors the file holds: the build stops as
    soon as it makes more than the file's tensors allow (a small file claiming a huge model
    costs nothing), and the shell's names, shapes and kinds must be the header's table."""
    arch, args = header["arch"], header["model_args"]
    _check_args(arch, args, path)
    table = _file_tensors(header)
    values = sum(math.prod(shape) for shape, _ in table.values())
    try:  # the build makes each tensor about twice (BitLinear, then TernaryLinear), and RoPE
        model = shell_model(lambda: to_integer(build_model(arch, args), quantize=False),
                            values=3 * values + 2**24, tensors=8 * len(table) + 256)
    except BuildTooLarge:
        raise PackedFileError(f"'{path}' is corrupt: its model_args describe a {arch} model "
                              f"larger than the {values} values of the tensors it holds"
                              ) from None
    except Exception as e:  # any failure of the build means: args this code cannot build
        why = first_line(e)
        why = why if why == type(e).__name__ else f"{type(e).__name__}: {why}"
        raise PackedFileError(f"'{path}' is corrupt: its model_args do not build a {arch} model "
                              f"({why})") from None
    modules = dict(model.named_modules())
    state = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for key, shape in state.items():
        if key not in table:
            raise PackedFileError(f"'{path}' is corrupt: it lacks tensor {key}, which its "
                                  f"model_args' {arch} model has")
        stored, kind = table[key]
        if stored != shape:
            raise PackedFileError(f"'{path}' is corrupt: tensor {key} is {list(stored)} in the "
                                  f"file, but its model_args make it {list(shape)}")
        owner, _, leaf = key.rpartition(".")
        module = modules[owner]
        if isinstance(module, TernaryLinear) and leaf in ("weight", "weight_scale"):
            ok = kind in PACKERS if leaf == "weight" else kind == "scale"
        elif kind == "int8":
            ok = leaf == "weight" and type(module) in (torch.nn.Embedding, torch.nn.Linear)
        else:
            ok = kind in FLOAT_KINDS
        if not ok:
            raise PackedFileError(f"'{path}' is corrupt: tensor {key} is stored as {kind}, which "
                                  f"its {type(module).__name__} cannot take")
    int8_scales = set()
    for key, (shape, kind) in table.items():
        if kind == "int8":  # its rows' scales come as a float32 tensor beside it
            scale = key.removesuffix("weight") + "weight_scale"
            if table.get(scale) != (shape[:1], "float32"):
                raise PackedFileError(f"'{path}' is corrupt: int8 tensor {key} lacks its float32 "
                                      f"{scale} of one scale per row ({shape[0]})")
            int8_scales.add(scale)
    for key in table:
        if key not in state and key not in int8_scales:
            raise PackedFileError(f"'{path}' is corrupt: it holds tensor {key}, which its "
                                  f"model_args' {arch} model does not have")
    return model


def load_integer_model(path):
    """(the integer model, header) of a .bitnet file.

    The header is checked first, against the file and against the model its model_args
    describe (shell_for), before any tensor is read. The model is then built as a shell
    (shell_model) and takes the file's tensors as they are read: no float copy of the ternary
    weights is ever made, so memory is what the integer model holds.
    """
    shell = []
    header, state = load_packed(path, check=lambda h: shell.append(shell_for(h, path)))
    return load_integer_state(shell[0], state), header


def inference_model(path):
    """(the integer model, meta) of a .bitnet file, for sample.py; any file this code cannot
    run is refused in one line (CheckpointError)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no file at '{path}'; make one with python export.py")
    try:
        model, header = load_integer_model(path)
    except PackedFileError as e:
        raise CheckpointError(str(e)) from None
    except (ValueError, TypeError, KeyError, RuntimeError) as e:
        raise CheckpointError(f"'{path}' does not fit this code's models "
                              f"({type(e).__name__}: {first_line(e)})") from None
    return model, header.get("meta")
