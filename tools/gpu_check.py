"""One command that checks BitGPT on one CUDA GPU and writes what it measured to a table.

    python -m tools.gpu_check                               # on a machine with a CUDA GPU
    python -m tools.gpu_check --out=out-gpu_check --steps=bench,fsdp   # again, some steps only
    python -m tools.gpu_check --dry-run                     # the same steps on CPU, toy sizes

Each step runs the project's own commands as subprocesses, their output in out/logs/, their
runs in out/runs/:
  train     python train.py configs/train_shakespeare_char.py, ternary and float
            (--bitlinear=False) at once, two processes on the one GPU: final val loss, wall time
  export    python export.py on the ternary run: its .bitnet file
  sample    python sample.py --ckpt=<the .bitnet file>, and on the float run's ckpt.pt, each
            with two max_new_tokens: decode tokens/s from the difference of the wall times
  torchrun  torchrun --standalone --nproc_per_node=1 train.py ... --backend=nccl, a few steps
            (one process: NCCL starts, but DDP wraps the model only from two processes on)
  fsdp      the same with --fsdp=True: FSDP2's collectives and its checkpoint over NCCL
  memory    the training memory bench.py --memory estimates (configs.table.training_memory),
            for the model the bench step runs: one model, its shape, batch and vocabulary
  bench     python bench.py configs/gpt2_124m.py --compare --compile=True: the ternary/float
            step time ratio, and tokens/s, MFU and peak memory of each
A step that fails or outruns its time limit is a row saying so, and the others still run; all
of them together stop at time_limit. out/results.md (the table, printed at the end) and
out/results.json are rewritten after every step. --dry-run runs the same commands on CPU at toy
sizes, where every figure is parsed and no target is judged.
"""

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench import SETTINGS as BENCH_SETTINGS
from common import UserError, defaults, model_args, parse_args, run_cli
from configs import resolve
from configs.table import training_memory
from data.loader import read_meta
from tools.plot import read_metrics

SETTINGS = dict(
    out=("out-gpu_check", "folder for logs/, runs/, results.md and results.json"),
    dry_run=(False, "the same steps on CPU at toy sizes, in a couple of minutes"),
    data_dir=("data", "train.py's data_dir: shakespeare_char there is prepared if missing"),
    steps=("", "comma-separated steps to run, of those above; empty: all (export and sample "
               "reuse an earlier train's out/runs)"),
    time_limit=(540.0, "seconds for all the steps together; each also has its own limit"),
)

ROOT = Path(__file__).resolve().parents[1]  # the repo: the commands run there
PY = sys.executable
TORCHRUN = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
CHAR = "configs/train_shakespeare_char.py"
# the dry run appends these to the full commands: a later --key=value wins
TOY_MODEL = ["--device=cpu", "--compile=False", "--n_layer=2", "--n_head=2", "--n_embd=64",
             "--block_size=64", "--dropout=0.0"]
TOY_TRAIN = TOY_MODEL + ["--batch_size=8", "--max_iters=20", "--lr_decay_iters=20",
                         "--warmup_iters=2", "--eval_interval=10", "--eval_iters=2",
                         "--log_interval=5"]
# 4 micro-batches a step, not the config's 40: the same shapes, a tenth of the time
BENCH = ["bench.py", "configs/gpt2_124m.py", "--compare", "--compile=True",
         "--dataset=shakespeare_char", "--gradient_accumulation_steps=4", "--bench_steps=240",
         "--bench_warmup=10", "--bench_rounds=4"]
# a made-up peak, so that the dry run parses an MFU figure too
TOY_BENCH = TOY_MODEL + ["--batch_size=4", "--bench_steps=8", "--bench_warmup=2",
                         "--bench_rounds=2", "--peak_flops=1e11"]
# sample.py: (num_samples, short and long max_new_tokens); the long run stays within block_size
SAMPLE = {False: (4, 1, 250), True: (10, 1, 60)}
LIMITS = {"train": 330, "export": 60, "sample": 150, "torchrun": 120, "fsdp": 120, "memory": 60,
          "bench": 300}  # seconds on one GPU; the dry run's steps get the same
KINDS = ("ternary", "float")

# (step, key, what it is, format, reference or target, the target's bound: value <= bound)
FIGURES = [
    ("train", "ternary_val_loss", "ternary val loss (train_shakespeare_char, final)", "{:.4f}",
     "<= 1.50", 1.50),
    ("train", "float_val_loss", "float val loss (final)", "{:.4f}", "nanoGPT's float: 1.4697",
     None),
    ("train", "val_loss_gap", "ternary - float val loss", "{:+.4f}", "<= 0.03", 0.03),
    ("train", "ternary_wall_s", "ternary wall time, beside the float run", "{:.0f} s",
     "nanoGPT's float alone: ~3 min (A100)", None),
    ("train", "float_wall_s", "float wall time, beside the ternary run", "{:.0f} s", "", None),
    ("export", "bitnet_mb", "the ternary run's .bitnet file", "{:.2f} MB", "", None),
    ("sample", "packed_decode_tok_s", "sample.py decode, packed .bitnet", "{:,.1f} tok/s", "",
     None),
    ("sample", "float_decode_tok_s", "sample.py decode, float ckpt.pt", "{:,.1f} tok/s", "",
     None),
    ("torchrun", "torchrun_val_loss", "torchrun, 1 process: val loss after its steps", "{:.4f}",
     "", None),
    ("fsdp", "fsdp_val_loss", "torchrun --fsdp=True: val loss after its steps", "{:.4f}", "",
     None),
    ("memory", "memory_estimate_mib", "gpt2_124m training memory, estimated (one model)",
     "{:,.0f} MiB", "", None),
    ("bench", "step_ratio", "gpt2_124m step time, ternary / float", "{:.3f}x",
     "<= 1.15 (stretch < 1.0)", 1.15),
] + [("bench", f"{k}_{key}", f"gpt2_124m {k}: {what}", fmt, "", None) for k in KINDS
     for key, what, fmt in (("ms", "step time", "{:.1f} ms"),
                            ("tokens_s", "tokens/s", "{:,.0f}"), ("mfu", "MFU", "{:.1%}"),
                            ("peak_mib", "peak memory (both models held)", "{:,.0f} MiB"))]
STEPS = list(dict.fromkeys(f[0] for f in FIGURES))


class StepFailed(Exception):
    """A step that did not give its figures: why, and the log that says more."""

    def __init__(self, why, log=None):
        super().__init__(why)
        self.why, self.log = why, log


class Check:
    """The out folder, the mode and the clock of one check; runs commands for the steps."""

    def __init__(self, cfg):
        self.out, self.dry = Path(cfg["out"]).resolve(), cfg["dry_run"]
        self.data = Path(cfg["data_dir"]).resolve()
        self.end = time.monotonic() + cfg["time_limit"]
        self.stop = self.end  # the running step's deadline
        for folder in ("logs", "runs"):
            (self.out / folder).mkdir(parents=True, exist_ok=True)

    def toy(self, args):
        return args if self.dry else []

    def run_dir(self, name, fresh=False):
        """out/runs/<name>; fresh: emptied first, so that no earlier run's files are read."""
        if fresh:
            shutil.rmtree(self.out / "runs" / name, ignore_errors=True)
        return self.out / "runs" / name

    def log(self, name):
        return self.out / "logs" / f"{name}.log"

    def run(self, jobs):
        """Run {name: argv} at once, each in a process group of its own writing logs/<name>.log,
        until the step's deadline; returns {name: wall seconds} or raises StepFailed."""
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        procs = {}
        try:
            for name, argv in jobs.items():
                with open(self.log(name), "w") as f:
                    f.write(f"$ {shlex.join(argv)}\n")
                    f.flush()
                    procs[name] = (subprocess.Popen(argv, cwd=ROOT, env=env, stdout=f,
                                                    stderr=subprocess.STDOUT,
                                                    start_new_session=True), time.monotonic())
            seconds = {}
            while True:
                seconds.update({n: time.monotonic() - t0 for n, (p, t0) in procs.items()
                                if n not in seconds and p.poll() is not None})
                if len(seconds) == len(procs) or time.monotonic() >= self.stop:
                    break
                time.sleep(0.1)
        finally:  # a process the deadline or Ctrl-C cut short goes with all it started
            for p, _ in procs.values():
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait()
        for name, (p, _) in procs.items():
            if name not in seconds:
                raise StepFailed("stopped at its time limit", self.log(name))
            if p.returncode != 0:
                lines = self.log(name).read_text(errors="replace").strip().splitlines()
                raise StepFailed(f"exit code {p.returncode}: {lines[-1][:160]}", self.log(name))
        return seconds


def last_eval(out_dir, log):
    """The last evaluation record of a run's metrics.jsonl."""
    try:
        evals = [m for m in read_metrics(out_dir) if "val_loss" in m]
    except (OSError, UserError):
        evals = []
    if not evals:
        raise StepFailed(f"no evaluation in {out_dir}/metrics.jsonl", log)
    return evals[-1]


def step_train(c):
    """Both runs of nanoGPT's shakespeare_char recipe at once, into runs/ternary and runs/float."""
    data = c.data / "shakespeare_char"
    if not all((data / f).is_file() for f in ("train.bin", "val.bin", "meta.json")):
        # here, so that the two runs do not both prepare it
        c.run({"prepare": [PY, "-m", "data.shakespeare_char.prepare", f"--out={data}"]})
    argv = [PY, "train.py", CHAR, f"--data_dir={c.data}"]
    seconds = c.run({f"train_{k}": argv + [f"--out_dir={c.run_dir(k, fresh=True)}",
                                           f"--bitlinear={k == 'ternary'}", *c.toy(TOY_TRAIN)]
                     for k in KINDS})
    figures = {}
    for k in KINDS:
        figures[f"{k}_val_loss"] = last_eval(c.run_dir(k), c.log(f"train_{k}"))["val_loss"]
        figures[f"{k}_wall_s"] = seconds[f"train_{k}"]
    figures["val_loss_gap"] = figures["ternary_val_loss"] - figures["float_val_loss"]
    return figures


def step_export(c):
    c.run({"export": [PY, "export.py", f"--out_dir={c.run_dir('ternary')}"]})
    return {"bitnet_mb": (c.run_dir("ternary") / "model.bitnet").stat().st_size / 1e6}


def step_sample(c):
    """Each model's sample.py twice, one at a time: the longer run's extra wall time is
    num_samples x (long - short) single-token steps (both have one prefill and start-up)."""
    n, short, long = SAMPLE[c.dry]
    sources = {"packed": c.run_dir("ternary") / "model.bitnet",
               "float": c.run_dir("float") / "ckpt.pt"}
    figures = {}
    for kind, path in sources.items():
        argv = [PY, "sample.py", f"--ckpt={path}", f"--device={'cpu' if c.dry else 'cuda'}",
                f"--num_samples={n}"]
        t = {m: c.run({f"sample_{kind}_{m}": argv + [f"--max_new_tokens={m}"]})[
            f"sample_{kind}_{m}"] for m in (short, long)}
        if t[long] <= t[short]:
            raise StepFailed("the longer run was not slower (start-up noise): run it again",
                             c.log(f"sample_{kind}_{long}"))
        figures[f"{kind}_decode_tok_s"] = n * (long - short) / (t[long] - t[short])
    return figures


def torchrun_step(c, name, args):
    """One process under torchrun over NCCL (gloo in the dry run): a few steps and a checkpoint."""
    c.run({name: TORCHRUN + ["train.py", CHAR, f"--data_dir={c.data}",
                             f"--out_dir={c.run_dir(name, fresh=True)}",
                             "--always_save_checkpoint=True",
                             "--compile=False", f"--backend={'gloo' if c.dry else 'nccl'}",
                             *c.toy(TOY_TRAIN), *args]})
    last = last_eval(c.run_dir(name), c.log(name))
    if not (c.run_dir(name) / "ckpt.pt").is_file():
        raise StepFailed("it wrote no checkpoint", c.log(name))
    return {f"{name}_val_loss": last["val_loss"]}


def step_torchrun(c):
    return torchrun_step(c, "torchrun", ["--max_iters=20", "--lr_decay_iters=20",
                                         "--eval_interval=10", "--eval_iters=5"])


def step_fsdp(c):
    return torchrun_step(c, "fsdp", ["--fsdp=True", "--max_iters=4", "--lr_decay_iters=4",
                                     "--eval_interval=4", "--eval_iters=4"])


def step_memory(c):
    """bench.py --memory's count for the bench step's model, run here: bench.py --memory counts
    every config (minutes on a CPU), each at its own vocabulary, not the bench's."""
    cfg = resolve(parse_args(defaults(BENCH_SETTINGS), [*BENCH[1:], *c.toy(TOY_BENCH)]))
    meta = read_meta(c.data / cfg["dataset"])
    if meta is None:
        raise StepFailed(f"{c.data / cfg['dataset']} is not prepared (the train step prepares it)")
    args = dict(model_args(cfg["arch"], cfg), vocab_size=meta["vocab_size"])
    need = training_memory(cfg["arch"], args, cfg["batch_size"], cfg["dtype"],
                           optimizer=cfg["optimizer"])
    return {"memory_estimate_mib": need / 2**20}


BENCH_ROW = re.compile(r"^(ternary|float) .* ([\d.]+) ms/step +([\d,]+) tokens/s +MFU +"
                       r"(n/a|[\d.]+%) +(?:peak mem|peak RSS growth) ([\d,]+) MiB")


def step_bench(c):
    c.run({"bench": [PY, *BENCH, f"--data_dir={c.data}", *c.toy(TOY_BENCH)]})
    text = c.log("bench").read_text()
    figures = {}
    for m in map(BENCH_ROW.match, text.splitlines()):
        if m:
            k, ms, tokens, mfu, mib = m.groups()
            figures.update({f"{k}_ms": float(ms), f"{k}_tokens_s": float(tokens.replace(",", "")),
                            f"{k}_mfu": None if mfu == "n/a" else float(mfu[:-1]) / 100,
                            f"{k}_peak_mib": float(mib.replace(",", ""))})
    ratio = re.search(r"ternary/float step time: ([\d.]+)x", text)
    if not ratio or len(figures) < 8:
        raise StepFailed("its output lacks a model's line or the ratio", c.log("bench"))
    return {**figures, "step_ratio": float(ratio.group(1))}


def verdict(value, bound, dry):
    if bound is None or value is None:
        return ""
    if dry:
        return "not judged (dry run)"
    return "meets" if value <= bound else f"misses by {value - bound:.3g}"


def table(results):
    """Markdown: a row per figure of each step that ran, one row for a step that did not."""
    rows = ["| step | figure | value | reference / target | verdict |", "|---|---|---|---|---|"]
    for step in STEPS:
        r = results["steps"].get(step, {"status": "not run"})
        if r["status"] != "ok":
            why = r["status"] if r["status"] != "failed" else f"FAILED: {r['why']}" + (
                f" ({r['log']})" if r.get("log") else "")
            why = why.replace("|", "/")  # a cell of the table
            rows.append(f"| {step} | | {why} | | |")
            continue
        for _, key, what, fmt, ref, bound in (f for f in FIGURES if f[0] == step):
            value = results["figures"].get(key)
            text = "n/a" if value is None else fmt.format(value)
            rows.append(f"| {step} | {what} | {text} | {ref} | "
                        f"{verdict(value, bound, results['dry_run'])} |")
    return "\n".join(rows)


def write(c, results):
    text = (f"# BitGPT GPU check: {results['device']}\n\n`{results['command']}`, "
            f"{results['date']}; logs in logs/\n\n{table(results)}\n")
    (c.out / "results.md").write_text(text)
    (c.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")


def first_results(c, cfg, argv):
    """The results to fill: new, or with --steps those of the last check into this out folder
    (of the same mode), so that a step run again replaces only its own rows."""
    command = shlex.join(["python", "-m", "tools.gpu_check", *argv])
    results = {"device": "CPU (dry run)" if c.dry else torch.cuda.get_device_name(0),
               "command": command, "date": time.strftime("%Y-%m-%d %H:%M"), "dry_run": c.dry,
               "steps": {}, "figures": {}}
    old = c.out / "results.json"
    if cfg["steps"] and old.is_file():
        before = json.loads(old.read_text())
        if before.get("dry_run") == c.dry:
            results.update(steps=before["steps"], figures=before["figures"],
                           command=f"{before['command']}; then {command}")
    return results


def run_step(c, step, results):
    """Run one step within its limit; its figures, or why it gave none, go into results."""
    start = time.monotonic()
    c.stop = min(start + LIMITS[step], c.end)
    print(f"== {step} (at most {max(0, c.stop - start):.0f} s)", flush=True)
    for f in FIGURES:
        if f[0] == step:
            results["figures"].pop(f[1], None)
    try:
        if c.stop <= start:
            raise StepFailed("no time left (time_limit)")
        results["figures"].update(STEPS_RUN[step](c))
        r = {"status": "ok"}
    except StepFailed as e:
        r = {"status": "failed", "why": e.why,
             "log": str(e.log.relative_to(c.out)) if e.log else None}
    except (OSError, ValueError, KeyError, IndexError, TypeError) as e:  # output unread
        r = {"status": "failed", "why": f"{type(e).__name__}: {e}", "log": None}
    results["steps"][step] = dict(r, seconds=round(time.monotonic() - start, 1))


def check(cfg, argv):
    steps = [s.strip() for s in cfg["steps"].split(",") if s.strip()] or STEPS
    unknown = sorted(set(steps) - set(STEPS))
    if unknown:
        raise UserError(f"no step {', '.join(unknown)}; the steps are {', '.join(STEPS)}")
    if cfg["time_limit"] <= 0:
        raise UserError(f"time_limit must be positive, got {cfg['time_limit']}")
    if not cfg["dry_run"] and not torch.cuda.is_available():
        raise UserError("no CUDA GPU is visible; --dry-run runs the same steps on CPU")
    c = Check(cfg)
    results = first_results(c, cfg, argv)
    for step in (s for s in STEPS if s in steps):
        run_step(c, step, results)
        write(c, results)
    print((c.out / "results.md").read_text())
    return results


STEPS_RUN = {"train": step_train, "export": step_export, "sample": step_sample,
             "torchrun": step_torchrun, "fsdp": step_fsdp, "memory": step_memory,
             "bench": step_bench}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    return run_cli(SETTINGS, lambda cfg: check(cfg, argv), "-m tools.gpu_check", __doc__, argv)


if __name__ == "__main__":
    main()
