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
With --reference=True the ternary model runs bitlinear/layer.py's BitLinear, the paper's
formulation, instead of its fast form (bitlinear/fast.py); with --compare too, all three run
side by side. The two ternary forms compute the same numbers: the step times say what the fast
one buys. --profile=N shows where a step's time goes: N more steps of each model under
torch.profiler, their top ops by self CPU time, and how many operator calls a step makes.
Keys: train.py's and those below (--help).
"""

import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from common import blocks, build_model, model_args, parse_args, peak_flops, run_cli
from train import DEFAULTS as TRAIN_DEFAULTS
from train import SETTINGS as TRAIN_SETTINGS
from train import next_batch, resolve, start, train_step

SETTINGS = dict(
    TRAIN_SETTINGS,
    compare=(False, "time the ternary model and its float twin, alternating, and their ratio"),
    reference=(False, "time the paper's BitLinear (bitlinear/layer.py) instead of its fast form; "
               "with --compare beside it"),
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
        loss, _, run.batch = train_step(run, run.batch)
        sync(device)
        times.append(time.perf_counter() - t)
    loss.item()
    return times, torch.cuda.max_memory_allocated(device) if cuda else 0


def profile_steps(run, n):
    """n steps under torch.profiler: its table of ops by self CPU time, and the operator calls
    per step (aten ops with no aten op inside: each one a dispatch that runs a kernel or a view)."""
    from torch.profiler import profile
    with profile() as prof:
        for _ in range(n):
            _, _, run.batch = train_step(run, run.batch)
        sync(run.cfg["device"])
    calls = sum(1 for e in prof.events() if e.name.startswith("aten::")
                and not any(c.name.startswith("aten::") for c in e.cpu_children))
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12), calls / n


def use_reference(model):
    """Turn the model's fast BitLinears into the paper's (the same weights and numbers)."""
    from bitlinear import BitLinear, FastBitLinear
    for m in model.modules():
        if type(m) is FastBitLinear:
            m.__class__ = BitLinear
    return model


def bench(cfg):
    models = {"ternary": True, "float": False} if cfg["compare"] else {
        "ternary" if cfg["bitlinear"] else "float": cfg["bitlinear"]}
    if cfg["reference"]:  # the paper's layer: alone, or beside the fast one and the float twin
        models = ({"ternary": True, "reference": True, "float": False} if cfg["compare"]
                  else {"reference": True})
    rss0 = peak_rss_bytes()
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, bitlinear in models.items():
            run = start(dict(cfg, bitlinear=bitlinear, out_dir=tmp))
            if name == "reference":
                use_reference(run.raw_model)
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
    if cfg["profile"]:
        for name, run in runs.items():
            result[name]["op_calls"] = run["calls"]
            print(f"{name}, {cfg['profile']} steps under torch.profiler:\n{run['table']}\n"
                  f"{name}: {run['calls']:.0f} operator calls per step")
    if cfg["compare"]:
        result["ratio"] = result["ternary"]["ms"] / result["float"]["ms"]
        print(f"ternary/float step time: {result['ratio']:.3f}x (median of "
              f"{result['float']['steps']} steps each, {cfg['bench_rounds']} alternating rounds)")
        if "reference" in result:
            result["reference_ratio"] = result["reference"]["ms"] / result["float"]["ms"]
            fast = result["ternary"]["ms"] / result["reference"]["ms"]
            print(f"reference/float step time: {result['reference_ratio']:.3f}x (the paper's "
                  f"BitLinear; fast/reference {fast:.3f}x)")
    return result


def saved_activations(model, batch_size):
    """Bytes autograd keeps for the backward of one (batch_size, block_size) micro-batch:
    (total, [bytes kept inside each block]). Run it on a meta-device model: nothing is
    allocated. Each storage counts once; parameters don't count. Attention counts what flash
    attention keeps (q, k, v, output, log-sum-exp), not a T x T matrix."""
    from unittest import mock

    import torch.nn.functional as F

    def flash(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, **kw):
        return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, dropout_p,
                                                                  is_causal)[0]

    params = {p.untyped_storage()._cdata for p in model.parameters()}
    saved, owner, current = {}, {}, [None]

    def pack(t):
        storage = t.untyped_storage()
        if storage._cdata not in params and storage._cdata not in saved:
            saved[storage._cdata], owner[storage._cdata] = storage.nbytes(), current[0]
        return t

    for i, block in enumerate(blocks(model)):
        block.register_forward_pre_hook(lambda m, a, i=i: current.__setitem__(0, i))
        block.register_forward_hook(lambda m, a, out: current.__setitem__(0, None))
    idx = torch.zeros(batch_size, model.config.block_size, dtype=torch.long,
                      device=next(model.parameters()).device)
    with (torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
          mock.patch.object(F, "scaled_dot_product_attention", flash)):
        model(idx, idx)
    per_block = [sum(b for k, b in saved.items() if owner[k] == i)
                 for i in range(len(blocks(model)))]
    return sum(saved.values()), per_block


def training_memory(arch, args, batch_size, dtype="bfloat16", shards=1,
                    activation_checkpointing=False):
    """Estimated bytes one process needs to train the model, counted on the meta device:

    - float32 weights, gradients and AdamW's two moments: 16 bytes a parameter, and under
      autocast its 16-bit copy of each weight: 2 more; all divided by `shards` under FSDP,
      which then holds two whole blocks at a time (the one running and the next, prefetched);
    - the activations kept for the backward (saved_activations), in dtype; with activation
      checkpointing only each block's input, plus one block's activations while it recomputes;
    - a float32 logits-sized gradient.
    """
    with torch.device("meta"):
        model = build_model(arch, args).to(getattr(torch, dtype))
    n = sum(p.numel() for p in model.parameters())
    state = (16 + (0 if dtype == "float32" else 2)) * n
    if shards > 1:
        biggest = max(sum(p.numel() for p in b.parameters()) for b in blocks(model))
        state = state / shards + 2 * 4 * biggest
    acts, per_block = saved_activations(model, batch_size)
    B, T, C = batch_size, model.config.block_size, model.config.n_embd
    if activation_checkpointing:
        block_input = B * T * C * torch.finfo(getattr(torch, dtype)).bits // 8
        acts += len(per_block) * block_input - sum(per_block) + max(per_block)
    return int(state + acts + 4 * B * T * model.config.vocab_size)


def weight_bytes(model, bits=2.0):
    """Bytes of the model's weights, stored: BitLinear weights at `bits` each (2 as .bitnet and
    TQ2_0 store them, 1.58 = log2(3) at best), every other parameter at 16 bits."""
    from bitlinear import BitLinear
    ternary = {id(m.weight) for m in model.modules() if isinstance(m, BitLinear)}
    return sum(p.numel() * (bits / 8 if id(p) in ternary else 2) for p in model.parameters())


def config_facts(path):
    """What a config file trains, as the code builds it: (cfg, model args, parameter count,
    bytes of weights ternary and float)."""
    cfg = parse_args(TRAIN_DEFAULTS, [str(path)])
    vocab_size = 65 if cfg["dataset"] == "shakespeare_char" else 50304
    args = dict(model_args(cfg["arch"], cfg), vocab_size=vocab_size)
    with torch.device("meta"):
        model = build_model(cfg["arch"], args)
        float_twin = build_model(cfg["arch"], dict(args, bitlinear=False))
    return cfg, args, model.get_num_params(), (weight_bytes(model), weight_bytes(float_twin))


def count(n):
    return f"{n / 1e3:.1f}k" if n < 1e6 else f"{n / 1e6:.2f}M" if n < 1e9 else f"{n / 1e9:.2f}B"


def configs():
    """The config files with their facts, smallest model first."""
    paths = [p for p in Path(__file__).parent.glob("configs/*.py") if p.name != "__init__.py"]
    facts = [(p, *config_facts(p)) for p in paths]
    return sorted(facts, key=lambda f: (f[3], f[0].name))


def size(b):
    return f"{b / 1e6:.3g} MB" if b < 1e9 else f"{b / 1e9:.3g} GB"


def config_table():
    """What `python train.py --list_configs` prints: every config, its model and the memory to
    train it, in float32 for the CPU-sized ones (under 5M parameters), else bfloat16."""
    rows = [("config", "arch", "params", "layers x width, context", "dataset", "batch",
             "weights", "memory")]
    for path, cfg, args, params, (ternary, full) in configs():
        dtype = "float32" if params < 5e6 else "bfloat16"
        mem = training_memory(cfg["arch"], args, cfg["batch_size"], dtype)
        rows.append((f"configs/{path.name}", cfg["arch"], count(params),
                     f"{cfg['n_layer']} x {cfg['n_embd']}, {cfg['block_size']}", cfg["dataset"],
                     str(cfg["batch_size"]), f"{size(ternary)} / {size(full)}",
                     f"{size(mem)} {dtype}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines + ["weights: stored, ternary (2 bits each) / float (16 bits) "
                              "(bench.weight_bytes)",
                              "memory: to train on one device without sharding, at the config's "
                              "batch_size (bench.training_memory)"])


def memory_table(gpus=8):
    """Markdown: each config's estimated training memory per GPU (training_memory) at its
    batch_size, in float32 for the CPU-sized configs (under 5M parameters), else bfloat16:
    plain (one GPU, or DDP), with activation checkpointing, and with FSDP across `gpus` GPUs;
    and the smallest of 24/40/80 GB GPUs each fits in (using at most 90% of it: the CUDA
    context and the allocator's slack take the rest)."""
    rows = ["| config | params | batch | one GPU / DDP | + act. ckpt | FSDP x8 | FSDP x8 + act. "
            "ckpt |", "|---|---|---|---|---|---|---|"]
    fit = lambda b: f"{b / 1e9:.1f} GB" + next((f" ({g})" for g in (24, 40, 80)  # noqa: E731
                                                if b < g * 1e9 * 0.9), " (>80)")
    for path, cfg, args, params, _ in configs():
        dtype = "float32" if params < 5e6 else "bfloat16"
        need = [training_memory(cfg["arch"], args, cfg["batch_size"], dtype, shards, ckpt)
                for shards in (1, gpus) for ckpt in (False, True)]
        rows.append(f"| {path.stem} | {count(params)} | {cfg['batch_size']} | "
                    + " | ".join(map(fit, need)) + " |")
    return "\n".join(rows)


def main(argv=None):
    def run(cfg):
        if cfg["memory"]:
            print(memory_table())
            return None
        return bench(resolve(cfg))
    return run_cli(SETTINGS, run, "bench.py", __doc__, argv)


if __name__ == "__main__":
    main()
