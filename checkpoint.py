"""Checkpoints: written atomically, read with weights_only=True, checked before use."""

import os
import pickle
from pathlib import Path

import torch

from configurator import UserError

FORMAT_VERSION = 2  # 2: optimizer state keyed by parameter name (FSDP or not)


class CheckpointError(UserError):
    """A checkpoint that cannot be used; the message says why and what to do, in one line."""


def save_checkpoint(ckpt, path):
    """Write to a temp file in the same folder, fsync, then rename over path.

    A crash at any moment leaves either the old file or the new one, never half of one.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save({"format_version": FORMAT_VERSION, **ckpt}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def model_from_checkpoint(ckpt, path="checkpoint"):
    """Build the checkpoint's model and load its weights; a mismatch is a CheckpointError."""
    from models import build_model
    try:
        model = build_model(ckpt["arch"], ckpt["model_args"])
        model.load_state_dict(ckpt["model"])
    except (ValueError, TypeError, KeyError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"'{path}' does not fit this code's '{ckpt.get('arch')}' model "
                              f"({first[:200]})") from None
    return model


def model_from_packed(path):
    """The integer model (TernaryLinear layers) and header of a .bitnet file from export.py.

    The model is built as a shell (bitlinear.inference.shell_model) and takes the file's tensors
    as they are read: no float copy of the ternary weights is ever made, so memory is what the
    integer model holds.
    """
    from bitlinear import to_integer
    from bitlinear.inference import load_integer_state, shell_model
    from bitlinear.packed_file import PackedFileError, load_packed
    from models import build_model
    if not Path(path).is_file():
        raise CheckpointError(f"no file at '{path}'; make one with python export.py")
    try:
        header, state = load_packed(path)
        model = shell_model(lambda: to_integer(build_model(header["arch"], header["model_args"]),
                                               quantize=False))
        load_integer_state(model, state)
    except PackedFileError as e:
        raise CheckpointError(str(e)) from None
    except (ValueError, TypeError, KeyError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise CheckpointError(f"'{path}' does not fit this code's models ({type(e).__name__}: "
                              f"{first})") from None
    return model, header


def load_checkpoint(path, arch=None, map_location="cpu"):
    """Load and validate a checkpoint dict; raise CheckpointError with a one-line reason."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at '{path}'; train one first (python train.py "
                              f"--out_dir={path.parent})")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises many types for bad files; all mean "unusable"
        blocked = [ln for ln in str(e).splitlines() if "GLOBAL" in ln]
        if isinstance(e, pickle.UnpicklingError) and blocked:
            raise CheckpointError(f"'{path}' holds code or objects, not just tensors and values; "
                                  f"refused for safety (weights_only=True): {blocked[0].strip()}"
                                  ) from None
        raise CheckpointError(f"'{path}' is not a readable checkpoint (truncated or corrupt?): "
                              f"{type(e).__name__}") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_args" not in ckpt:
        raise CheckpointError(f"'{path}' is not a BitGPT training checkpoint")
    version = ckpt.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"'{path}' has checkpoint format version {version}, this code reads "
                              f"version {FORMAT_VERSION}; use the BitGPT version that wrote it")
    if arch is not None and ckpt.get("arch") != arch:
        raise CheckpointError(f"'{path}' holds a '{ckpt.get('arch')}' model, not '{arch}'; "
                              f"use --arch={ckpt.get('arch')} or another out_dir")
    return ckpt


def load_init_weights(path, arch):
    """(model_args, state dict) for a run that starts from trained weights (train.py
    --init_from=PATH): a BitGPT checkpoint, or a transformers folder (llama/hf.py import)."""
    path = Path(path)
    if not path.is_dir():
        ckpt = load_checkpoint(path, arch=arch)
        return ckpt["model_args"], ckpt["model"]
    if arch != "llama":
        raise CheckpointError(f"'{path}' is a transformers folder, which holds a LLaMA-"
                              f"architecture model: add --arch=llama")
    if not (path / "config.json").is_file():
        raise CheckpointError(f"'{path}' is a folder without config.json: not a transformers "
                              f"model folder")
    try:
        from llama.hf import load_hf
        args, state, _ = load_hf(path)
    except ImportError as e:
        raise CheckpointError(f"importing '{path}' needs {e.name}: pip install -r "
                              f"requirements-export.txt") from None
    return args, state
