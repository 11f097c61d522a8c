"""Export a trained checkpoint with its ternary weights packed: 2 bits (or 1.6) per weight.

    python export.py --out_dir=out                        # writes out/model.bitnet
    python export.py --out_dir=out --packing=base3 --to=model.bitnet
    python sample.py --ckpt=out/model.bitnet --start="ROMEO:"

The file format is described in bitlinear/packed_file.py and README. Embeddings, norms and the
output head are stored as float32; every BitLinear weight as packed ternary values plus its scale.
"""

from pathlib import Path

from bitlinear.packed_file import save_packed
from checkpoint import load_checkpoint, model_from_checkpoint
from configurator import ConfigError, run_cli

DEFAULTS = dict(
    out_dir="out",
    ckpt="",  # the training checkpoint; empty means out_dir/ckpt.pt
    format="packed",  # the only format for now
    packing="2bit",  # '2bit' (4 weights per byte) or 'base3' (5 weights per byte)
    to="",  # the output file; empty means out_dir/model.bitnet
)


def export(cfg):
    if cfg["format"] != "packed":
        raise ConfigError(f"format '{cfg['format']}' is not supported; use --format=packed")
    if cfg["packing"] not in ("2bit", "base3"):
        raise ConfigError(f"packing '{cfg['packing']}' is not '2bit' or 'base3'")
    src = Path(cfg["ckpt"] or Path(cfg["out_dir"]) / "ckpt.pt")
    ckpt = load_checkpoint(src)
    if not ckpt["model_args"].get("bitlinear", True):
        raise ConfigError(f"'{src}' is a float model (bitlinear=False): nothing to pack")
    model = model_from_checkpoint(ckpt, src)
    dst = Path(cfg["to"] or Path(cfg["out_dir"]) / "model.bitnet")
    save_packed(model, dst, ckpt["arch"], ckpt["model_args"], ckpt.get("meta"), cfg["packing"])
    print(f"wrote {dst}: {dst.stat().st_size / 1e6:.2f} MB ({src} is "
          f"{src.stat().st_size / 1e6:.2f} MB with optimizer state)")
    return dst


def main(argv=None):
    run_cli(DEFAULTS, export, "export.py", __doc__, argv)


if __name__ == "__main__":
    main()
