"""Export a trained checkpoint: packed for BitGPT, or for transformers and llama.cpp.

    python export.py --out_dir=out                        # writes out/model.bitnet
    python export.py --out_dir=out --packing=base3 --to=model.bitnet
    python sample.py --ckpt=out/model.bitnet --start="ROMEO:"
    python export.py --out_dir=out --format=hf --to=out/hf
    python export.py --out_dir=out --format=gguf --to=out/model.gguf [--qtype=tq1_0]

--format=packed: the file format is described in bitlinear/packed_file.py and README. Every
BitLinear weight is stored as packed ternary values plus its scale; the other tensors
(embeddings, norms, the head) as --float_dtype: fp16 by default (3 more mantissa bits than bf16,
and the CPU head runs it exactly through fbgemm's fp16 GEMM; export refuses a model with values
beyond fp16's range), bf16 (float32's range), or fp32 (the training values, a bigger file). The
integer model computes with exactly the stored values. --embed_int8=True stores the embeddings
and the output head as int8 with one scale per row instead (half the bytes of fp16, and the head
runs as an integer matmul), which changes the logits slightly: the model is no longer exactly
the trained one.

--format=hf and --format=gguf (pip install -r requirements-dev.txt): see gpt/hf.py, llama/hf.py,
gpt/gguf.py and llama/gguf.py for which model options map to which transformers class and
llama.cpp architecture (bitlinear/hf.py and bitlinear/gguf.py for the folder and the file both
write); the others are refused with a message that says why.
"""

import ctypes
import json
import os
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

from bitlinear.packed_file import (
    FLOAT_DTYPES,
    MAGIC,
    PackedFileError,
    save_packed,
    ternary_bits_per_weight,
)
from common import (
    ConfigError,
    alive,
    clean_stale,
    defaults,
    first_line,
    load_checkpoint,
    model_from_checkpoint,
    remove,
    run_cli,
)
from gpt.gguf import save_gguf as save_gpt_gguf
from gpt.hf import save_hf as save_gpt_hf
from llama.gguf import save_gguf as save_llama_gguf
from llama.hf import save_hf as save_llama_hf
from sample import first_bytes

SETTINGS = dict(
    out_dir=("out", "the run to export: out_dir/ckpt.pt"),
    ckpt=("", "the training checkpoint; empty: out_dir/ckpt.pt"),
    format=("packed", "'packed' (.bitnet for sample.py), 'hf' (transformers), 'gguf' (llama.cpp)"),
    packing=("2bit", "packed: '2bit' (4 weights a byte) or 'base3' (5 weights a byte)"),
    to=("", "the output; empty: out_dir/model.bitnet, out_dir/hf or out_dir/model.gguf"),
    float_dtype=("", "embeddings, norms, head: 'fp16', 'bf16' or 'fp32'; empty: the format's "
                 "default (packed fp16, hf fp32, gguf fp16)"),
    embed_int8=(False, "embeddings and head as int8 rows with a scale each: smaller, not exact"),
    qtype=("tq2_0", "gguf ternary blocks: 'tq2_0' (2.06 bits/weight) or 'tq1_0' (1.69) of 256; "
           "'q4_0' (4.5) of 32, for widths not a multiple of 256"),
)
DEFAULTS = defaults(SETTINGS)


FORMATS = {"packed": "model.bitnet", "hf": "hf", "gguf": "model.gguf"}
# arch -> its writer: transformers' GPTBigCode (gpt/hf.py) or its Llama and BitNet (llama/hf.py);
# llama.cpp's gpt2 (gpt/gguf.py) or its llama and bitnet (llama/gguf.py)
SAVE_HF = {"gpt": save_gpt_hf, "llama": save_llama_hf}
SAVE_GGUF = {"gpt": save_gpt_gguf, "llama": save_llama_gguf}


def check(cfg):
    if cfg["format"] not in FORMATS:
        raise ConfigError(f"format '{cfg['format']}' is not one of {', '.join(FORMATS)}")
    if cfg["packing"] not in ("2bit", "base3"):
        raise ConfigError(f"packing '{cfg['packing']}' is not '2bit' or 'base3'")
    if cfg["float_dtype"] and cfg["float_dtype"] not in FLOAT_DTYPES:
        raise ConfigError(f"float_dtype '{cfg['float_dtype']}' is not one of "
                          f"{', '.join(FLOAT_DTYPES)}")
    if cfg["qtype"] not in ("tq2_0", "tq1_0", "q4_0"):
        raise ConfigError(f"qtype '{cfg['qtype']}' is not 'tq2_0', 'tq1_0' or 'q4_0'")
    if cfg["format"] == "hf" and cfg["embed_int8"]:
        raise ConfigError("--embed_int8 is for --format=packed or gguf; transformers' bitnet "
                          "models keep float embeddings")
    if cfg["format"] == "gguf" and cfg["float_dtype"] == "bf16":
        raise ConfigError("--format=gguf stores embeddings as fp16, fp32, or int8 "
                          "(--embed_int8=True, Q8_0); not bf16")


MAGICS = {"packed": MAGIC, "gguf": b"GGUF"}  # how the files an export writes begin


MARKER = "bitgpt_export.json"  # in a folder an export wrote: the files it wrote there


def check_hf_folder(dst):
    """A transformers folder is replaced only when an export wrote it (its MARKER says so) and
    holds nothing else: another folder, or one with files added, would lose them."""
    if dst.exists() and not dst.is_dir():
        raise ConfigError(f"'{dst}' is a file, not an exported model folder; choose another --to")
    if not dst.is_dir() or not any(dst.iterdir()):
        return
    try:
        files = json.loads((dst / MARKER).read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError):
        raise ConfigError(f"'{dst}' is not an exported model folder (no {MARKER}): replacing it "
                          f"would delete its files; choose another --to") from None
    others = sorted(p.name for p in dst.iterdir() if p.name not in (*files, MARKER))
    if others:
        raise ConfigError(f"'{dst}' holds files the export did not write ({', '.join(others[:3])})"
                          f"; move them out or choose another --to")


def check_destination(dst, fmt, src):
    """An export replaces only what an export wrote: a .bitnet or GGUF file, or a transformers
    folder (check_hf_folder); never the checkpoint or any other file."""
    if dst.resolve() == src.resolve():
        raise ConfigError(f"--to '{dst}' is the checkpoint being exported; choose another --to")
    if fmt == "hf":
        check_hf_folder(dst)
    elif dst.is_dir():
        raise ConfigError(f"--to '{dst}' is a folder; give a file path, e.g. {dst / FORMATS[fmt]}")
    elif dst.exists() and (not dst.is_file() or first_bytes(dst, len(MAGICS[fmt]))
                           != MAGICS[fmt]):
        raise ConfigError(f"'{dst}' exists and is not a file this export wrote; choose another "
                          f"--to")
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot make the folder of --to '{dst}' ({e.strerror})") from None


def export(cfg):
    check(cfg)
    src = Path(cfg["ckpt"] or Path(cfg["out_dir"]) / "ckpt.pt")
    ckpt = load_checkpoint(src)
    fmt = cfg["format"]
    if fmt == "packed" and not ckpt["model_args"].get("bitlinear", True):
        raise ConfigError(f"'{src}' is a float model (bitlinear=False): nothing to pack")
    if ckpt["model_args"].get("bit_group"):
        raise ConfigError(f"'{src}' has a weight scale per group of inputs (bit_group="
                          f"{ckpt['model_args']['bit_group']}); the exports hold one scale per "
                          f"matrix: train with bit_group=0 to export")
    model = model_from_checkpoint(ckpt, src)
    dst = Path(cfg["to"] or Path(cfg["out_dir"]) / FORMATS[fmt])
    check_destination(dst, fmt, src)
    try:
        return write(model, ckpt, src, dst, cfg)
    except OSError as e:  # a full or read-only disk: what was there stays (atomic_path)
        raise ConfigError(f"could not write '{dst}' ({e.strerror or first_line(e)}); what was "
                          f"there is intact: free some space or choose another --to") from None


def write(model, ckpt, src, dst, cfg):
    fmt, float_dtype = cfg["format"], cfg["float_dtype"]
    if fmt == "hf":
        return export_hf(model, ckpt, dst, float_dtype or "fp32")
    if fmt == "gguf":
        return export_gguf(model, ckpt, dst, cfg["qtype"], float_dtype or "fp16",
                           cfg["embed_int8"])
    float_dtype = float_dtype or "fp16"
    try:
        header = save_packed(model, dst, ckpt["arch"], ckpt["model_args"], ckpt.get("meta"),
                             cfg["packing"], float_dtype, cfg["embed_int8"])
    except PackedFileError as e:
        raise ConfigError(str(e)) from None
    print(f"wrote {dst}: {dst.stat().st_size / 1e6:.2f} MB ({src} is "
          f"{src.stat().st_size / 1e6:.2f} MB with optimizer state); linear layers "
          f"{ternary_bits_per_weight(header):.3f} bits/weight, "
          f"{'embeddings and head int8, ' if cfg['embed_int8'] else ''}other tensors "
          f"{float_dtype}")
    return dst


def exchange(a, b):
    """Swap paths a and b in one step (Linux's renameat2 RENAME_EXCHANGE); False where the system
    or the file system cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError, TypeError):
        return False
    return renameat2(-100, os.fsencode(a), -100, os.fsencode(b), 2) == 0  # AT_FDCWD, EXCHANGE


@contextmanager
def atomic_folder(path):
    """common.atomic_path for a folder: written beside `path`, then swapped in one step where the
    system can; else the old one is moved aside first, and a kill between the two renames leaves
    it aside, where the next export to the same place puts it back."""
    tmp, old = (path.with_name(f".{path.name}.{kind}{os.getpid()}") for kind in ("tmp", "old"))
    for aside in path.parent.glob(f".{path.name}.old*"):
        pid = aside.name[len(path.name) + 5:]
        if pid.isdigit() and not alive(int(pid)) and not path.exists():
            aside.rename(path)
    clean_stale(path)
    clean_stale(path, "old")
    try:
        yield tmp
        if not path.exists():
            tmp.rename(path)
        elif not exchange(tmp, path):
            path.rename(old)
            tmp.rename(path)
            remove(old)
    finally:
        remove(tmp)  # after an exchange, the old folder


def export_hf(model, ckpt, dst, float_dtype):
    """Write the folder under a temporary name, then swap it in: never half a folder."""
    save_hf = SAVE_HF[ckpt["arch"]]
    with atomic_folder(dst) as tmp:
        tmp.mkdir(parents=True)
        config = save_hf(model, asdict(model.config), ckpt.get("meta"), tmp, float_dtype)
        files = sorted(p.name for p in tmp.iterdir())
        (tmp / MARKER).write_text(json.dumps({"written_by": "BitGPT export.py --format=hf",
                                              "files": files}) + "\n")
    size = sum(f.stat().st_size for f in dst.iterdir())
    packed = "ternary projections packed 2 bits/weight, " if "quantization_config" in config else ""
    print(f"wrote {dst}/: {config['architectures'][0]}, {size / 1e6:.2f} MB, {packed}other "
          f"tensors {float_dtype}; load it with AutoModelForCausalLM.from_pretrained('{dst}')")
    return dst


def export_gguf(model, ckpt, dst, qtype, float_dtype, embed_int8):
    save_gguf = SAVE_GGUF[ckpt["arch"]]
    info = save_gguf(model, asdict(model.config), ckpt.get("meta"), dst, qtype, float_dtype,
                     embed_int8)
    print(f"wrote {dst}: {dst.stat().st_size / 1e6:.2f} MB, llama.cpp architecture "
          f"'{info['arch']}', projections {qtype.upper()}, embeddings {info['embed']}")
    return dst


def main(argv=None):
    run_cli(SETTINGS, export, "export.py", __doc__, argv)


if __name__ == "__main__":
    main()
