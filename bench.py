"""Time the training step (forward + backward + optimizer) of the model a config describes.

    python bench.py configs/train_shakespeare_char.py --device=cpu          # the ternary model
    python bench.py configs/train_shakespeare_char.py --bitlinear=False     # its float twin
    python bench.py configs/train_shakespeare_char.py --device=cpu --compare --bench_steps=400
    python bench.py --memory                # every config's training memory, and the GPUs it fits

Each step is train.py's own (Trainer.step: gradient_accumulation_steps micro-batches, clipping,
AdamW), timed after bench_warmup steps; reported are the median step time, tokens/s, peak memory
and MFU. With --compare the ternary and the float model run in this process on the same batches,
alternating in bench_rounds rounds so that drift in the machine's speed hits both alike, and the
ratio of their median step times is printed.

MFU = model FLOPs per token (6N + 12 L H Q T, as nanoGPT and the PaLM paper count them; the
model's flops_per_token()) x tokens/s / the device's peak FLOPS: --peak_flops if given, else the
bf16 dense peak from the table below for known GPUs, else n/a (CPUs: no peak is known here).
Peak memory is torch.cuda.max_memory_allocated on CUDA; elsewhere the growth of the process's
peak RSS during the benchmark (getrusage), for the whole process (both models with --compare).
Keys are train.py's, plus compare, bench_steps, bench_warmup, bench_rounds and peak_flops.
"""

import resource
import statistics
import sys
import tempfile
import time

import torch

from configurator import run_cli
from metrics import peak_flops
from settings import DEFAULTS as TRAIN_DEFAULTS
from settings import resolve
from train import Trainer

DEFAULTS = dict(TRAIN_DEFAULTS, compare=False, bench_steps=50, bench_warmup=10, bench_rounds=4,
                peak_flops=0.0,  # FLOPS of the device; 0 looks it up in metrics.PEAK_FLOPS
                memory=False)  # print every config's estimated training memory instead

def device_name(device):
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device)
    return f"{device} ({torch.get_num_threads()} threads)"


def peak_rss_bytes():
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb if sys.platform == "darwin" else kb * 1024  # macOS reports bytes, Linux KiB


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def time_steps(trainer, n):
    """Seconds per optimizer step, one sample per step; and the CUDA peak memory meanwhile."""
    cuda = trainer.device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats(trainer.device)
    times = []
    for _ in range(n):
        t = time.perf_counter()
        loss, _ = trainer.step()
        sync(trainer.device)
        times.append(time.perf_counter() - t)
    loss.item()
    return times, torch.cuda.max_memory_allocated(trainer.device) if cuda else 0


def bench(cfg):
    models = {"ternary": True, "float": False} if cfg["compare"] else {
        "ternary" if cfg["bitlinear"] else "float": cfg["bitlinear"]}
    rss0 = peak_rss_bytes()
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, bitlinear in models.items():
            trainer = Trainer(dict(cfg, bitlinear=bitlinear, out_dir=tmp))
            trainer.next_batch()
            _, mem = time_steps(trainer, cfg["bench_warmup"])
            runs[name] = dict(trainer=trainer, times=[], mem=mem)
        per_round = max(1, cfg["bench_steps"] // cfg["bench_rounds"])
        for _ in range(cfg["bench_rounds"]):
            for run in runs.values():
                times, mem = time_steps(run["trainer"], per_round)
                run["times"] += times
                run["mem"] = max(run["mem"], mem)
    rss = peak_rss_bytes() - rss0
    flops, source = peak_flops(cfg["device"], cfg["peak_flops"])
    tokens = cfg["batch_size"] * cfg["block_size"] * cfg["gradient_accumulation_steps"]
    print(f"device {device_name(cfg['device'])}, dtype {cfg['dtype']}, compile {cfg['compile']}, "
          f"{tokens:,} tokens/step; peak FLOPS "
          + (f"{flops:.3g} ({source})" if flops else f"n/a ({source})"))
    result = {"peak_flops": flops, "peak_flops_source": source}
    for name, run in runs.items():
        model = run["trainer"].raw_model
        ms = statistics.median(run["times"]) * 1e3
        tokens_per_s = tokens / ms * 1e3
        per_token = model.flops_per_token() if hasattr(model, "flops_per_token") else None
        mfu = per_token * tokens_per_s / flops if flops and per_token else None
        mem = run["mem"] if cfg["device"].startswith("cuda") else rss
        result[name] = dict(ms=ms, tokens_per_s=tokens_per_s, mfu=mfu, peak_mem=mem,
                            steps=len(run["times"]))
        mem_text = (f"peak mem {mem / 2**20:,.0f} MiB" if cfg["device"].startswith("cuda") else
                    f"peak RSS growth {mem / 2**20:,.0f} MiB (process)")
        print(f"{name:8s} {model.get_num_params() / 1e6:7.2f}M params  {ms:8.2f} ms/step  "
              f"{tokens_per_s:10,.0f} tokens/s  MFU "
              + (f"{mfu:6.2%}" if mfu is not None else "n/a") + f"  {mem_text}")
    if cfg["compare"]:
        result["ratio"] = result["ternary"]["ms"] / result["float"]["ms"]
        print(f"ternary/float step time: {result['ratio']:.3f}x (median of "
              f"{result['float']['steps']} steps each, {cfg['bench_rounds']} alternating rounds)")
    return result


def memory_table(gpus=8):
    """Markdown: each config's estimated training memory per GPU (models.training_memory) at its
    batch_size, plain (one GPU, or DDP), with activation checkpointing, and with FSDP across
    `gpus` GPUs; and the smallest of 24/40/80 GB GPUs each fits in (using at most 90% of it:
    the CUDA context and the allocator's slack take the rest)."""
    from pathlib import Path

    from configurator import config_facts, parse_args
    from models import model_args, training_memory
    rows = ["| config | params | batch | one GPU / DDP | + act. ckpt | FSDP x8 | FSDP x8 + act. "
            "ckpt |", "|---|---|---|---|---|---|---|"]
    fit = lambda b: f"{b / 1e9:.1f} GB" + next((f" ({g})" for g in (24, 40, 80)  # noqa: E731
                                                if b < g * 1e9 * 0.9), " (>80)")
    configs = sorted(Path(__file__).parent.glob("configs/*.py"),
                     key=lambda p: config_facts(p)["params"] or 0)
    for path in configs:
        cfg = parse_args(TRAIN_DEFAULTS, [str(path)])
        args = dict(model_args(cfg["arch"], cfg),
                    vocab_size=65 if cfg["dataset"] == "shakespeare_char" else 50304)
        dtype = config_facts(path)["setting"].split(", ")[1]
        need = [training_memory(cfg["arch"], args, cfg["batch_size"], dtype, shards, ckpt)
                for shards in (1, gpus) for ckpt in (False, True)]
        rows.append(f"| {path.stem} | {config_facts(path)['params_text']} | "
                    f"{cfg['batch_size']} | " + " | ".join(map(fit, need)) + " |")
    return "\n".join(rows)


def main(argv=None):
    def run(cfg):
        if cfg["memory"]:
            print(memory_table())
            return None
        return bench(resolve(cfg))
    return run_cli(DEFAULTS, run, "bench.py", __doc__, argv)


if __name__ == "__main__":
    main()
