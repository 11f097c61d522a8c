"""Time the training step (forward + backward + optimizer) of the model a config describes.

    python bench.py configs/train_shakespeare_char.py --device=cpu          # the ternary model
    python bench.py configs/train_shakespeare_char.py --bitlinear=False     # its float twin
    python bench.py configs/train_shakespeare_char.py --device=cpu --compare --bench_steps=400
    python bench.py --memory                # every config's training memory, and the GPUs it fits

Each step is train.py's own (train_step: gradient_accumulation_steps micro-batches, clipping,
the optimizers), timed after bench_warmup steps; reported are the median step time, tokens/s,
peak memory and MFU. With --compare the ternary and the float model run in this process on the
same batches, alternating in bench_rounds rounds so that drift in the machine's speed hits both
alike, and the ratio of their median step times is printed.

MFU = model FLOPs per token (6N + 12 L H Q T, as nanoGPT and the PaLM paper count them; the
model's flops_per_token()) x tokens/s / the device's peak FLOPS: --peak_flops if given, else the
bf16 dense peak in common.PEAK_FLOPS for known GPUs, else n/a (CPUs: no peak is known here).
Peak memory is torch.cuda.max_memory_allocated on CUDA; elsewhere the growth of the process's
peak RSS during the benchmark (getrusage), for the whole process (both models with --compare).
--profile=N shows where a step's time goes: N more steps of each model under torch.profiler,
their top ops by self CPU time, and how many operator calls a step makes. --memory prints every
config's estimated training memory per GPU instead (configs/table.py).
Keys: train.py's and those below (--help).
"""

import resource
import statistics
import sys
import tempfile
import time

import torch
from torch.profiler import profile

from common import peak_flops, run_cli
from configs import SETTINGS as TRAIN_SETTINGS
from configs import resolve
from configs.table import memory_table
from train import next_batch, start, train_step

SETTINGS = dict(
    TRAIN_SETTINGS,
    compare=(False, "time the ternary model and its float twin, alternating, and their ratio"),
    bench_steps=(50, "timed steps per model"),
    bench_warmup=(10, "untimed steps first"),
    bench_rounds=(4, "alternating rounds the timed steps are split into (--compare)"),
    peak_flops=(0.0, "FLOPS of the device for MFU; 0 looks it up in common.PEAK_FLOPS"),
    profile=(0, "then this many more steps per model under torch.profiler: print its top ops "
             "and the operator calls per step"),
    memory=(False, "print every config's estimated training memory per GPU instead"),
)


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


def time_steps(run, n):
    """Seconds per optimizer step, one sample per step; and the CUDA peak memory meanwhile."""
    device = run.cfg["device"]
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(n):
        t = time.perf_counter()
        loss, _ = train_step(run)
        sync(device)
        times.append(time.perf_counter() - t)
    loss.item()
    return times, torch.cuda.max_memory_allocated(device) if cuda else 0


def profile_steps(run, n):
    """n steps under torch.profiler: its table of ops by self CPU time, and the operator calls
    per step (aten ops with no aten op inside: each one a dispatch that runs a kernel or a view)."""
    with profile() as prof:
        for _ in range(n):
            train_step(run)
        sync(run.cfg["device"])
    calls = sum(1 for e in prof.events() if e.name.startswith("aten::")
                and not any(c.name.startswith("aten::") for c in e.cpu_children))
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12), calls / n


def run_models(cfg):
    """Warm up, then time (and profile) each model, alternating: {name: dict(trainer, times,
    mem)}, and the growth of the process's peak RSS meanwhile."""
    models = {"ternary": True, "float": False} if cfg["compare"] else {
        "ternary" if cfg["bitlinear"] else "float": cfg["bitlinear"]}
    rss0 = peak_rss_bytes()
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, bitlinear in models.items():
            run = start(dict(cfg, bitlinear=bitlinear, out_dir=tmp))
            run.batch = next_batch(run)
            _, mem = time_steps(run, cfg["bench_warmup"])
            runs[name] = dict(trainer=run, times=[], mem=mem)
        per_round = max(1, cfg["bench_steps"] // cfg["bench_rounds"])
        for _ in range(cfg["bench_rounds"]):
            for run in runs.values():
                times, mem = time_steps(run["trainer"], per_round)
                run["times"] += times
                run["mem"] = max(run["mem"], mem)
        if cfg["profile"]:
            for run in runs.values():
                run["table"], run["calls"] = profile_steps(run["trainer"], cfg["profile"])
    return runs, peak_rss_bytes() - rss0


def bench(cfg):
    runs, rss = run_models(cfg)
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
    if cfg["profile"]:
        for name, run in runs.items():
            result[name]["op_calls"] = run["calls"]
            print(f"{name}, {cfg['profile']} steps under torch.profiler:\n{run['table']}\n"
                  f"{name}: {run['calls']:.0f} operator calls per step")
    if cfg["compare"]:
        result["ratio"] = result["ternary"]["ms"] / result["float"]["ms"]
        print(f"ternary/float step time: {result['ratio']:.3f}x (median of "
              f"{result['float']['steps']} steps each, {cfg['bench_rounds']} alternating rounds)")
    return result


def main(argv=None):
    def run(cfg):
        if cfg["memory"]:
            print(memory_table())
            return None
        return bench(resolve(cfg))
    return run_cli(SETTINGS, run, "bench.py", __doc__, argv)


if __name__ == "__main__":
    main()
