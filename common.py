"""What every entry shares: the config system, one-line errors, devices, atomic writes, and
models and checkpoints by name. It imports nothing of the project but the model file an arch
names.

The config system is nanoGPT's: config files (Python that assigns keys, run in their own
namespace: run only your own) set values, --key=value overrides them, parsed with
ast.literal_eval. Every value is checked against the defaults before any work starts: an unknown
key or a value of the wrong type ends the program with one line naming the key.
"""

import ast
import dataclasses
import difflib
import glob
import importlib
import os
import pickle
import re
import shutil
import sys
import types
from contextlib import contextmanager
from pathlib import Path

import torch


class UserError(ValueError):
    """A problem the user can fix (config, data, checkpoint): shown as one line, no traceback."""


class ConfigError(UserError):
    """A config problem the user can fix; its message is one line that says how."""


class CheckpointError(UserError):
    """A checkpoint that cannot be used; the message says why and what to do, in one line."""


class DataError(UserError):
    """A problem with the user's data or setup; shown as one line."""


# ---- settings and the command line ----------------------------------------------------------

def defaults(settings):
    """{key: default} of a settings table {key: (default, description)}."""
    return {k: v for k, (v, _) in settings.items()}


def _suggest(key, known):
    close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
    return f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""


def check_value(key, value, defaults):
    """Return value converted to the type of defaults[key], or raise ConfigError."""
    if key not in defaults:
        raise ConfigError(f"unknown config key '{key}'{_suggest(key, defaults)}; "
                          f"run with --help to list every key")
    default = defaults[key]
    if default is None or default == "auto" and value != "auto":
        return value  # free-typed key: its consumer validates it
    want = type(default)
    if want is float and type(value) is int:
        return float(value)
    if type(value) is not want:
        raise ConfigError(f"config key '{key}' wants {want.__name__} (default {default!r}), "
                          f"got {type(value).__name__} {value!r}")
    return value


def parse_value(raw, default):
    """Command-line text -> Python value: a literal, or the raw text for string keys."""
    if raw.lower() in ("true", "false") and (isinstance(default, bool) or default == "auto"):
        return raw.lower() == "true"
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw  # a bare word such as --device=cpu
    if isinstance(default, str) and default != "auto" and not isinstance(value, str):
        return raw  # --start=123 is the text "123"
    return value


def read_config_file(path, defaults):
    """Run a config file and return the keys it sets, each checked against defaults."""
    path = Path(path)
    if not path.is_file():
        stems = [p.stem for p in (Path(__file__).parent / "configs").glob("*.py")
                 if p.stem not in ("__init__", "table")]
        close = [f"configs/{c}.py" for c in difflib.get_close_matches(path.stem, stems, n=1)]
        hint = f"did you mean {close[0]}? " if close else ""
        raise ConfigError(f"config file '{path}' not found; {hint}configs live in configs/ "
                          f"(python train.py --list_configs)")

    def include(name):
        """Take another config file's keys (path relative to this file); later lines override."""
        namespace.update(read_config_file(path.parent / name, defaults))

    namespace = {"include": include}
    try:
        exec(compile(path.read_text(), str(path), "exec"), namespace)
    except ConfigError:
        raise
    except Exception as e:  # a syntax or runtime error in the user's file
        raise ConfigError(f"config file '{path}' failed: {type(e).__name__}: {e}") from None
    values = {k: v for k, v in namespace.items() if not k.startswith("_") and k != "include"
              and not isinstance(v, types.ModuleType)}
    try:
        return {k: check_value(k, v, defaults) for k, v in values.items()}
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def parse_args(defaults, argv):
    """Apply config files and --key=value arguments, in order, on top of defaults."""
    config = dict(defaults)
    for arg in argv:
        if not arg.startswith("--"):
            config.update(read_config_file(arg, defaults))
            continue
        key, eq, raw = arg[2:].partition("=")
        key = key.replace("-", "_")
        if not eq:
            if isinstance(defaults.get(key), bool):
                raw = "True"  # --flag alone means --flag=True
            else:
                raise ConfigError(f"argument '{arg}' needs a value: --{key}=VALUE")
        if key not in defaults:
            check_value(key, None, defaults)  # raises, with suggestions
        config[key] = check_value(key, parse_value(raw, defaults[key]), defaults)
    return config


def help_text(settings, prog, doc=""):
    lines = [f"usage: python {prog} [config_file.py ...] [--key=value ...]", ""]
    if doc:
        lines += [doc.strip(), ""]
    width = min(36, max(len(f"{k}={v!r}") for k, (v, _) in settings.items()))
    lines += [f"  --{f'{k}={v!r}':<{width}}  {text}" for k, (v, text) in settings.items()]
    return "\n".join(lines)


def run_cli(settings, run, prog, doc="", argv=None):
    """A script's main: --help, or check the config and return run(cfg). A UserError (bad
    config, data or file) exits 1 with one line, printed once under torchrun (by rank 0);
    Ctrl-C exits 130 with one line (what was being written is left as it was before)."""
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        print(help_text(settings, prog, doc))
        sys.exit(0)
    try:
        return run(parse_args(defaults(settings), argv))
    except UserError as e:
        sys.exit(f"error: {e}" if os.environ.get("RANK", "0") == "0" else 1)
    except KeyboardInterrupt:
        print("error: interrupted (Ctrl-C); no file was left half-written", file=sys.stderr)
        sys.exit(130)


# ---- devices --------------------------------------------------------------------------------

def resolve_device(device="auto", dtype="auto"):
    """'auto' device: cuda, else mps, else cpu. 'auto' dtype: bfloat16 where the GPU has it,
    float16 on other GPUs, float32 elsewhere. Returns (device, dtype) or raises ConfigError."""
    if device == "auto":
        device = ("cuda" if torch.cuda.is_available()
                  else "mps" if torch.backends.mps.is_available() else "cpu")
    device_type = device.split(":")[0]
    if device_type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"device '{device}' is not one of auto, cpu, cuda, cuda:N, mps")
    if device_type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' asked for but no CUDA GPU is visible; use --device=cpu")
    if dtype == "auto":
        dtype = ("bfloat16" if device_type == "cuda" and torch.cuda.is_bf16_supported()
                 else "float16" if device_type == "cuda" else "float32")
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"dtype '{dtype}' is not one of auto, float32, bfloat16, float16")
    return device, dtype


# bf16 dense tensor-core peaks from the vendors' datasheets (the sparse figures halved), matched
# against torch.cuda.get_device_name() in this order: the first match wins
PEAK_FLOPS = [
    (r"H200", 989e12, "H200"),
    (r"H100.*PCIe", 756e12, "H100 PCIe"),
    (r"H100.*NVL", 835e12, "H100 NVL"),
    (r"H100", 989e12, "H100 SXM"),
    (r"B200", 2250e12, "B200"),
    (r"A100", 312e12, "A100"),
    (r"L40S", 362e12, "L40S"),
    (r"\bL4\b", 121e12, "L4"),
    (r"\bA10\b", 125e12, "A10"),
    (r"RTX 4090", 165e12, "RTX 4090"),
    (r"MI300X", 1307e12, "MI300X"),
]


def peak_flops(device, override=0.0):
    """(the device's peak FLOPS or None, where it came from), for model FLOPs utilization."""
    if override > 0:
        return override, "--peak_flops"
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(device)
        for pattern, flops, label in PEAK_FLOPS:
            if re.search(pattern, name):
                return flops, f"{label} bf16 dense, common.PEAK_FLOPS"
        return None, f"'{name}' is not in common.PEAK_FLOPS; give --peak_flops="
    return None, f"no peak is known for {device}; give --peak_flops="


# ---- atomic writes --------------------------------------------------------------------------

def _fsync(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove(p):
    """Delete a file or a folder, if there."""
    if p.is_dir():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process
        pass
    return True


def clean_stale(path, kind="tmp"):
    """Remove what killed writers of `path` left beside it: .NAME.tmpPID of a dead process."""
    for p in path.parent.glob(f".{glob.escape(path.name)}.{kind}*"):
        pid = p.name[len(path.name) + 2 + len(kind):]
        if pid.isdigit() and not alive(int(pid)):
            remove(p)


@contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path` to write a file at; when the block ends without error
    it replaces `path` by a rename, else it is deleted. A crash at any moment leaves the old file
    or the new one, never half of one; what a killed writer left is cleaned by the next write.

        with atomic_path("out/model.bitnet") as tmp:
            tmp.write_bytes(data)
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    if path.parent.is_dir():
        clean_stale(path)
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync(path.parent)  # make the rename itself durable
    finally:
        remove(tmp)


# ---- models by name, and checkpoints --------------------------------------------------------

ARCHS = {"gpt": ("gpt.model", "GPT", "GPTConfig"), "llama": ("llama.model", "Llama", "LlamaConfig")}
GPT2_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")  # OpenAI's, for --init_from


def model_classes(arch):
    """(model class, config class) of an architecture; only its own model file is loaded."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch '{arch}'; choose one of {sorted(ARCHS)}")
    module, model, config = ARCHS[arch]
    module = importlib.import_module(module)
    return getattr(module, model), getattr(module, config)


def blocks(model):
    """The model's transformer blocks, in order (its one ModuleList): the units of FSDP, of
    recomputation, and of Muon's matrices."""
    return next(m for m in model.modules() if isinstance(m, torch.nn.ModuleList))


def model_args(arch, config):
    """The model's constructor arguments, taken from a full training config."""
    return {f.name: config[f.name] for f in dataclasses.fields(model_classes(arch)[1])
            if f.name in config}


def build_model(arch, args):
    """The model of architecture `arch` ('gpt' or 'llama') with config args."""
    model_cls, config_cls = model_classes(arch)
    return model_cls(config_cls(**args))


CHECKPOINT_VERSION = 2  # 2: optimizer state keyed by parameter name (FSDP or not)


def save_checkpoint(ckpt, path):
    """Write a training checkpoint (a dict of tensors and plain values) atomically; a failed
    write (a full disk) is one line, and the previous checkpoint stays."""
    try:
        with atomic_path(path) as tmp:
            torch.save({"format_version": CHECKPOINT_VERSION, **ckpt}, tmp)
    except (OSError, RuntimeError) as e:  # torch reports a failed write as a RuntimeError
        why = e.strerror if isinstance(e, OSError) and e.strerror else first_line(e)
        raise CheckpointError(f"could not write '{path}' ({why}); the previous checkpoint there, "
                              f"if any, is intact: free some space and resume") from None


def load_checkpoint(path, arch=None, map_location="cpu", needs=()):
    """Load and validate a checkpoint dict (weights_only: no code runs), holding the keys in
    needs besides its model's; one-line errors."""
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
    if not (isinstance(ckpt, dict) and isinstance(ckpt.get("model"), dict)
            and isinstance(ckpt.get("model_args"), dict)):
        raise CheckpointError(f"'{path}' is not a BitGPT training checkpoint")
    version = ckpt.get("format_version")
    if version != CHECKPOINT_VERSION:
        raise CheckpointError(f"'{path}' has checkpoint format version {version}, this code reads "
                              f"version {CHECKPOINT_VERSION}; use the BitGPT version that wrote it")
    if arch is not None and ckpt.get("arch") != arch:
        raise CheckpointError(f"'{path}' holds a '{ckpt.get('arch')}' model, not '{arch}'; "
                              f"use --arch={ckpt.get('arch')} or another out_dir")
    missing = [k for k in needs if k not in ckpt]
    if missing:
        raise CheckpointError(f"'{path}' lacks {', '.join(missing)}, so it cannot resume a run; "
                              f"start from its weights with --init_from={path}")
    return ckpt


def first_line(e):
    """An exception's message cut to its first line (for one-line errors)."""
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


def check_sizes(state, args):
    """Refuse (ValueError) model_args that claim more than the weights hold, before anything is
    built: n_layer must be the number of blocks the weights hold, and no other size (block_size
    aside: RoPE's positions are not weights) may exceed the weights' largest dimension."""
    blocks = {next((p for p in key.split(".") if p.isdigit()), None) for key in state} - {None}
    if args.get("n_layer") != len(blocks):
        raise ValueError(f"its model_args have n_layer={args.get('n_layer')!r}, its weights "
                         f"{len(blocks)} layers")
    largest = max((max(t.shape, default=1) for t in state.values()
                   if isinstance(t, torch.Tensor)), default=0)
    for key, value in args.items():
        if type(value) is int and key not in ("n_layer", "block_size") and value > largest:
            raise ValueError(f"its model_args have {key}={value}, beyond its weights' largest "
                             f"dimension ({largest})")


def model_from_checkpoint(ckpt, path="checkpoint"):
    """Build the checkpoint's model, once its sizes fit its weights (check_sizes), and load its
    weights; a mismatch is a CheckpointError."""
    try:
        model_classes(ckpt["arch"])  # an unknown arch is said first
        check_sizes(ckpt["model"], ckpt["model_args"])
        model = build_model(ckpt["arch"], ckpt["model_args"])
        model.load_state_dict(ckpt["model"])
    except (ValueError, TypeError, KeyError, RuntimeError) as e:
        raise CheckpointError(f"'{path}' does not fit this code's '{ckpt.get('arch')}' model "
                              f"({first_line(e)})") from None
    return model
