"""Draw loss curves from runs' metrics.jsonl files (matplotlib, an optional dependency).

    python -m tools.plot out-gpt_800k out-float --out=loss.png     # val loss against tokens
    python -m tools.plot sweeps/gpt/* --x=step --title="GPT sizes" --out=assets/gpt_curves.png

Each argument that is not a --key=value is a run's out_dir; a run whose name ends in "float"
is drawn dashed, so ternary/float pairs from tools/sweep.py read at a glance. RUN@N draws a run
N steps later, as one that continues another's N steps (--init_from=its checkpoint):

    python -m tools.plot out-float out-converted@2000 out-scratch --x=step tools/sweep.py
also calls plot_sizes for val loss against parameter count.
"""

import json
import sys
from pathlib import Path

from common import ConfigError, UserError, defaults, run_cli

SETTINGS = dict(
    out=("loss.png", "the PNG file to write"),
    x=("tokens", "the x axis: 'tokens', 'step' or 'time' (seconds)"),
    title=("", "the plot's title"),
    train=(False, "also draw each run's train loss (faint)"),
)
DEFAULTS = defaults(SETTINGS)


def read_metrics(path):
    """The records of a metrics.jsonl file (or of out_dir/metrics.jsonl), in order. A last line
    torn by a crash is left out; a bad line before it is a one-line error."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except ValueError:
            if i < len(lines) - 1:
                raise UserError(f"{path}, line {i + 1}, is not a JSON record") from None
    return records


def pyplot():
    """matplotlib's pyplot, drawing to files only; a clear message when it is not installed."""
    try:
        import matplotlib
    except ImportError:
        raise ConfigError("plotting needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_curves(runs, out, x="tokens", title="", train=False):
    """Val loss (and train loss) against x ('tokens', 'step' or 'time') for each run dir."""
    if x not in ("tokens", "step", "time"):
        raise ConfigError(f"x '{x}' is not one of tokens, step, time")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    paired = runs_paired(runs)  # then each pair shares a color
    for i, run in enumerate(runs):
        run, offset = split_offset(str(run), x)
        path = Path(run)
        if not (path / "metrics.jsonl").is_file():
            raise ConfigError(f"no metrics.jsonl in '{run}'; give the out_dir of a training run")
        evals = [m for m in read_metrics(path) if "val_loss" in m]
        if x == "tokens" and offset:  # the run's tokens per step, from its own records
            offset *= next((m["tokens"] / m["step"] for m in evals if m["step"]), 0)
        xs = [m[x] + offset for m in evals]
        style = "--" if path.name.endswith("float") else "-"
        color = f"C{i // 2 if paired else i}"
        ax.plot(xs, [m["val_loss"] for m in evals], style, color=color, label=f"{path.name} (val)")
        if train:
            ax.plot(xs, [m["train_loss"] for m in evals], style, color=color, alpha=0.4,
                    label=f"{path.name} (train)")
    ax.set_xlabel({"tokens": "training tokens", "step": "step", "time": "seconds"}[x])
    ax.set_ylabel("loss (nats per token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save(fig, out)


def split_offset(run, x):
    """'RUN@N' -> (RUN, N steps later); 'RUN' -> (RUN, 0)."""
    run, at, steps = run.rpartition("@") if "@" in run else (run, "", "0")
    if not steps.isdigit():
        raise ConfigError(f"'{run}{at}{steps}': after @ comes a number of steps")
    if at and x == "time":
        raise ConfigError("RUN@N shifts by steps: plot it with --x=step or --x=tokens")
    return run, int(steps)


def runs_paired(runs):
    """True when runs come in (ternary, float) pairs, as tools/sweep.py writes them."""
    names = [Path(str(r).split("@")[0]).name for r in runs]
    return len(names) % 2 == 0 and all(b.endswith("float") and not a.endswith("float")
               for a, b in zip(names[::2], names[1::2], strict=True))


def plot_sizes(rows, out, title=""):
    """Final val loss against parameters for each variant, the ternary - float gap, and val loss
    against bytes of weights (where every run has its count): ternary against float at equal
    memory.

    rows: [{"params": n, "<variant>": val_loss, ..., "bytes": {"<variant>": n}}] as
    tools/sweep.py collects them."""
    plt = pyplot()
    variants = [k for k in rows[0] if k not in ("params", "bytes")]
    pair = {"ternary", "float"} <= set(variants)
    memory = all(b is not None for r in rows for b in r.get("bytes", {None: None}).values())
    fig, axes = plt.subplots(1, 1 + pair + memory, figsize=(5 * (1 + pair + memory), 4),
                             squeeze=False)
    axes = list(axes[0])
    params = [r["params"] for r in rows]
    for v in variants:
        axes[0].plot(params, [r[v] for r in rows], "o-", label=v)
    axes[0].set(xscale="log", xlabel="parameters", ylabel="final val loss", title=title)
    axes[0].legend()
    if pair:
        axes[1].plot(params, [r["ternary"] - r["float"] for r in rows], "o-", color="C3")
        axes[1].axhline(0, color="gray", lw=0.8)
        axes[1].set(xscale="log", xlabel="parameters", ylabel="ternary - float (nats)",
                    title="the gap")
    if memory:
        for v in variants:
            axes[-1].plot([r["bytes"][v] / 1e6 for r in rows], [r[v] for r in rows], "o-",
                          label=v)
        axes[-1].set(xscale="log", xlabel="MB of weights (ternary at 2 bits, the rest at 16)",
                     ylabel="final val loss", title="equal memory")
        axes[-1].legend()
    for ax in axes:
        ax.grid(alpha=0.3)
    save(fig, out)


def save(fig, out):
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    runs = [a for a in argv if not a.startswith("--")]
    if not runs and not {"-h", "--help"} & set(argv):
        sys.exit("error: give one or more run folders (out_dir) to plot; --help for the keys")
    flags = [a for a in argv if a.startswith("--") or a == "-h"]
    run_cli(SETTINGS, lambda cfg: plot_curves(runs, cfg["out"], cfg["x"], cfg["title"],
                                              cfg["train"]), "-m tools.plot", __doc__, flags)


if __name__ == "__main__":
    main()
