"""Train a grid of configs x variants (ternary and float by default) with the same data, tokens
and seed, then write a markdown results table and plots.

    python -m tools.sweep --configs=gpt_50k,gpt_200k,gpt_800k,gpt_3m --sweep_dir=sweeps/gpt
    python -m tools.sweep --configs=llama_1m,llama_3m --sweep_dir=sweeps/llama
    python -m tools.sweep --configs=gpt_800k --sweep_dir=sweeps/tips \\
        --variants="{'cosine': '', 'two_stage': '--lr_schedule=two_stage'}"
    python -m tools.sweep ... --max_iters=500 --device=cpu  # any train.py key applies to every run
    python -m tools.sweep --configs=gpt_3m --variants="{'converted': \\
        '--init_from=sweeps/gpt/gpt_3m-float/ckpt.pt --max_iters=1000 --bit_warmup_iters=250'}"

Run r of config c trains in sweep_dir/c-r. A finished run is skipped and an interrupted one
(Ctrl-C) resumes, so running the same command again continues the sweep. The results go to
sweep_dir/results.md, sweep_dir/curves.png and, with more than one config, sweep_dir/sizes.png.
"""

import ast
import json
import sys
from pathlib import Path

from common import ConfigError, defaults, parse_args, run_cli
from configs import DEFAULTS as TRAIN_DEFAULTS
from configs import SETTINGS as TRAIN_SETTINGS
from configs import resolve
from configs.table import config_files, weight_bytes
from tools.plot import plot_curves, plot_sizes, read_metrics
from train import start, train

ROOT = Path(__file__).resolve().parents[1]  # the repo: configs/ is there
SWEEP_SETTINGS = dict(
    configs=("gpt_50k,gpt_200k,gpt_800k,gpt_3m", "comma-separated names of configs/*.py to train"),
    sweep_dir=("sweep", "folder of the sweep: one run folder per config and variant, the results"),
    variants=("{'ternary': '--bitlinear=True', 'float': '--bitlinear=False'}",
              "dict of variant name -> train.py flags, each variant trained for every config"),
)
SWEEP_DEFAULTS = defaults(SWEEP_SETTINGS)
# the sweep's keys, then every train.py key: those apply to every run (after its config file)
SETTINGS = {**SWEEP_SETTINGS, **TRAIN_SETTINGS}


def parse_variants(text):
    """"{'name': '--key=value --key=value', ...}" -> {name: [flags]}."""
    try:
        variants = ast.literal_eval(text)
        assert isinstance(variants, dict) and variants
        return {str(k): str(v).split() for k, v in variants.items()}
    except (ValueError, SyntaxError, AssertionError):
        raise ConfigError(f"variants must be a dict of name -> flags, got {text!r}") from None


def run_one(config, flags, out_dir):
    """Train (or resume, or skip) one run; returns its result dict, or None if interrupted."""
    result_file = out_dir / "result.json"
    if result_file.exists():
        return json.loads(result_file.read_text())
    resume = (out_dir / "ckpt.pt").exists()
    argv = [str(ROOT / "configs" / f"{config}.py"), *flags, f"--out_dir={out_dir}",
            "--always_save_checkpoint=True"] + (["--init_from=resume"] if resume else [])
    cfg = resolve(parse_args(TRAIN_DEFAULTS, argv))
    print(f"== {out_dir.name}: python train.py {' '.join(argv)}")
    run = start(cfg)
    train(cfg, run)
    if run.iter_num < cfg["max_iters"]:
        return None  # stopped by a signal or max_time; the checkpoint is saved
    last = [m for m in read_metrics(out_dir) if "val_loss" in m][-1]
    result = {"config": config, "params": run.raw_model.get_num_params(),
              "weight_bytes": weight_bytes(run.raw_model),
              "val_loss": last["val_loss"], "val_bpb": last.get("val_bpb"), "step": last["step"],
              "tokens": last["tokens"], "wall_time": last["time"]}  # time: across resumes
    result_file.write_text(json.dumps(result))
    return result


def table(results, variants):
    """Markdown: one row per config, val loss (and bits per byte) per variant, wall times, bytes
    of weights (configs.table.weight_bytes: ternary weights at 2 bits, the rest at 16)."""
    pair = {"ternary", "float"} <= set(variants)
    head = ["config", "params"] + [f"{v} val loss" for v in variants]
    head += ["ternary - float"] if pair else []
    head += [f"{v} bpb" for v in variants] + [f"{v} time" for v in variants]
    head += [f"{v} weights" for v in variants]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for config, runs in results.items():
        first = next(iter(runs.values()))
        cells = [config, f"{first['params'] / 1e6:.3f}M"]
        cells += [f"{runs[v]['val_loss']:.4f}" for v in variants]
        cells += [f"{runs['ternary']['val_loss'] - runs['float']['val_loss']:+.4f}"] if pair else []
        cells += [f"{runs[v]['val_bpb']:.4f}" if runs[v]["val_bpb"] else "-" for v in variants]
        cells += [f"{runs[v]['wall_time']:.0f} s" for v in variants]
        cells += [f"{runs[v]['weight_bytes'] / 1e6:.3g} MB" if "weight_bytes" in runs[v] else "-"
                  for v in variants]  # a result.json from before the count
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def sweep(argv):
    sweep_args = [a for a in argv if a.split("=")[0].lstrip("-") in SWEEP_DEFAULTS]
    train_flags = [a for a in argv if a not in sweep_args]
    cfg = parse_args(SWEEP_DEFAULTS, sweep_args)
    parse_args(TRAIN_DEFAULTS, train_flags)  # check the train keys before any run starts
    variants = parse_variants(cfg["variants"])
    configs = [c.strip() for c in cfg["configs"].split(",") if c.strip()]
    for c in configs:
        if c not in {p.stem for p in config_files()}:
            raise ConfigError(f"no config 'configs/{c}.py' (python train.py --list_configs)")
    root = Path(cfg["sweep_dir"])
    results = {}
    for config in configs:
        for name, flags in variants.items():
            result = run_one(config, train_flags + flags, root / f"{config}-{name}")
            if result is None:
                print("sweep interrupted; run the same command again to continue")
                return None
            results.setdefault(config, {})[name] = result
    text = table(results, list(variants))
    (root / "results.md").write_text(f"python -m tools.sweep {' '.join(argv)}\n\n{text}\n")
    print(text)
    plot_curves([root / f"{c}-{v}" for c in configs for v in variants], root / "curves.png")
    if len(configs) > 1:
        plot_sizes([{"params": r[next(iter(r))]["params"], **{v: r[v]["val_loss"] for v in r},
                     "bytes": {v: r[v].get("weight_bytes") for v in r}}
                    for r in results.values()], root / "sizes.png")
    return results


def main(argv=None):
    """--help lists SETTINGS; every key is checked (run_cli) before sweep() splits the
    arguments into the sweep's and the runs' own."""
    argv = sys.argv[1:] if argv is None else argv
    return run_cli(SETTINGS, lambda cfg: sweep(argv), "-m tools.sweep", __doc__, argv)


if __name__ == "__main__":
    main()
