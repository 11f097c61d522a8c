"""Export a trained checkpoint with its ternary weights packed: 2 bits (or 1.6) per weight.

    python export.py --out_dir=out                        # writes out/model.bitnet
    python export.py --out_dir=out --packing=base3 --to=model.bitnet
    python sample.py --ckpt=out/model.bitnet --start="ROMEO:"

The file format is described in bitlinear/packed_file.py and README. Every BitLinear weight is
stored as packed ternary values plus its scale; the other tensors (embeddings, norms, the head)
as --float_dtype: fp16 by default (3 more mantissa bits than bf16, and the CPU head runs it
exactly through fbgemm's fp16 GEMM; export refuses a model with values beyond fp16's range),
bf16 (float32's range), or fp32 (the training values, a bigger file). The integer model computes
with exactly the stored values. --embed_int8=True stores the embeddings and the output head as
int8 with one scale per row instead (half the bytes of fp16, and the head runs as an integer
matmul), which changes the logits slightly: the model is no longer exactly the trained one.
"""

from pathlib import Path

from bitlinear.packed_file import (
    FLOAT_DTYPES,
    PackedFileError,
    save_packed,
    ternary_bits_per_weight,
)
from checkpoint import load_checkpoint, model_from_checkpoint
from configurator import ConfigError, run_cli

DEFAULTS = dict(
    out_dir="out",
    ckpt="",  # the training checkpoint; empty means out_dir/ckpt.pt
    format="packed",  # the only format for now
    packing="2bit",  # '2bit' (4 weights per byte) or 'base3' (5 weights per byte)
    to="",  # the output file; empty means out_dir/model.bitnet
    float_dtype="fp16",  # embeddings, norms, head: 'fp16', 'bf16' or 'fp32'
    embed_int8=False,  # embeddings and head as int8 rows with a scale each: smaller, not exact
)


def export(cfg):
    if cfg["format"] != "packed":
        raise ConfigError(f"format '{cfg['format']}' is not supported; use --format=packed")
    if cfg["packing"] not in ("2bit", "base3"):
        raise ConfigError(f"packing '{cfg['packing']}' is not '2bit' or 'base3'")
    if cfg["float_dtype"] not in FLOAT_DTYPES:
        raise ConfigError(f"float_dtype '{cfg['float_dtype']}' is not one of "
                          f"{', '.join(FLOAT_DTYPES)}")
    src = Path(cfg["ckpt"] or Path(cfg["out_dir"]) / "ckpt.pt")
    ckpt = load_checkpoint(src)
    if not ckpt["model_args"].get("bitlinear", True):
        raise ConfigError(f"'{src}' is a float model (bitlinear=False): nothing to pack")
    model = model_from_checkpoint(ckpt, src)
    dst = Path(cfg["to"] or Path(cfg["out_dir"]) / "model.bitnet")
    try:
        header = save_packed(model, dst, ckpt["arch"], ckpt["model_args"], ckpt.get("meta"),
                             cfg["packing"], cfg["float_dtype"], cfg["embed_int8"])
    except PackedFileError as e:
        raise ConfigError(str(e)) from None
    print(f"wrote {dst}: {dst.stat().st_size / 1e6:.2f} MB ({src} is "
          f"{src.stat().st_size / 1e6:.2f} MB with optimizer state); linear layers "
          f"{ternary_bits_per_weight(header):.3f} bits/weight, "
          f"{'embeddings and head int8, ' if cfg['embed_int8'] else ''}other tensors "
          f"{cfg['float_dtype']}")
    return dst


def main(argv=None):
    run_cli(DEFAULTS, export, "export.py", __doc__, argv)


if __name__ == "__main__":
    main()
