"""File size, peak memory, prefill and decode speed: the packed integer model vs the float model.

    python -m tools.bench_inference --ckpt=out/ckpt.pt
    python -m tools.bench_inference --ckpt=out-124m/ckpt.pt --prompt_tokens=128 --new_tokens=128
    python -m tools.bench_inference --ckpt=out/ckpt.pt --embed_int8=True --val_batches=20

From one training checkpoint it writes two deployment files: (a) the float32 state dict of the
same config with nn.Linear where the BitLinears were, holding the latent weights (what a float
run of this architecture stores and computes), and (b) the .bitnet file export.py writes. Each is
loaded and run in a fresh process, so each peak RSS is that path's own (Python and torch, loading
the file, generating). Both get the same prompt (random token ids, fixed seed) and run the same
steps greedily at batch 1 with a KV cache: prefill is one forward over the prompt into an empty
cache; decode is new_tokens single-token steps of the model's own forward, each feeding the
previous argmax, as sample.generate runs them. Times are the best of `repeats` rounds (other
processes on the machine only ever slow a round down).
"""

import copy
import json
import resource
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch

import bitlinear.kernels as kernels
from bitlinear.inference import shell_model
from bitlinear.layer import BitLinear
from bitlinear.packed_file import save_packed, ternary_bits_per_weight
from common import (
    ConfigError,
    build_model,
    defaults,
    load_checkpoint,
    model_from_checkpoint,
    run_cli,
)
from data.loader import Data
from sample import KVCache, load_model
from train import estimate_loss

SETTINGS = dict(
    ckpt=("out/ckpt.pt", "the training checkpoint to benchmark"),
    prompt_tokens=(32, "random prompt tokens, run as one forward (prefill)"),
    new_tokens=(32, "single-token forwards after the prompt (decode)"),
    repeats=(3, "rounds of prefill and decode; the best time of each counts"),
    seed=(0, "random seed of the prompt"),
    threads=(0, "torch threads in each worker; 0: torch's default"),
    float_dtype=("fp16", "the .bitnet file's floats, as export.py --float_dtype"),
    embed_int8=(False, "the .bitnet file's embeddings and head as int8, as export.py --embed_int8"),
    val_batches=(0, "> 0: also the val loss of the training model and the .bitnet file"),
    kernel=("", "integer sums on CPU: 'int_mm' or 'fbgemm'; empty: this machine's pick"),
)
DEFAULTS = defaults(SETTINGS)

ROOT = Path(__file__).resolve().parents[1]  # the repo root: the workers run there


def as_float(model):
    """The same weights in a model with nn.Linear where the BitLinears were."""
    model = copy.deepcopy(model)
    for module in list(model.modules()):
        for name, child in module.named_children():
            if isinstance(child, BitLinear):
                linear = torch.nn.Linear(child.in_features, child.out_features,
                                         bias=child.bias is not None)
                linear.weight, linear.bias = child.weight, child.bias  # (any inner norm dropped)
                setattr(module, name, linear)
    return model


def write_files(model, ckpt, tmp, float_dtype, embed_int8=False):
    """The files to compare: (sizes, bits per ternary weight, float32 .pt path, .bitnet path)."""
    sizes, bits = {}, {}
    float_model = as_float(model)
    for dtype in (torch.float32, torch.float16):
        path = Path(tmp) / f"{str(dtype).split('.')[1]}.pt"
        torch.save(copy.deepcopy(float_model).to(dtype).state_dict(), path)  # tied tensors once
        sizes[f"state_dict {path.stem}"] = path.stat().st_size
    for packing in ("2bit", "base3"):
        path = Path(tmp) / f"{packing}.bitnet"
        header = save_packed(model, path, ckpt["arch"], ckpt["model_args"], ckpt.get("meta"),
                             packing, float_dtype, embed_int8)
        sizes[f".bitnet {packing} ({'int8 emb., ' if embed_int8 else ''}{float_dtype})"] = \
            path.stat().st_size
        bits[packing] = ternary_bits_per_weight(header)
    return sizes, bits, Path(tmp) / "float32.pt", Path(tmp) / "2bit.bitnet"


def load_float(path, arch, args):
    """The float model from its state dict file; a shell takes the loaded tensors: no copy."""
    model = shell_model(lambda: build_model(arch, dict(args, bitlinear=False)))
    model.load_state_dict(torch.load(path, weights_only=True), assign=True)
    return model


def weight_bytes(model):
    """Bytes of the model's tensors (tied ones once), plus what a Linear16 head runs from."""
    tensors = {t.data_ptr(): t for t in [*model.parameters(), *model.buffers()]}
    n = sum(t.numel() * t.element_size() for t in tensors.values())
    return n + sum(m.run_bytes() for m in model.modules() if hasattr(m, "run_bytes"))


def peak_rss_mb():
    """This process's peak resident memory (VmHWM: unlike ru_maxrss it starts afresh at exec,
    so it is not the parent's peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux: best effort


@torch.no_grad()
def timed_generation(model, prompt, new_tokens):
    """(prefill seconds, decode seconds, tokens): greedy, batch 1, KV cache, the steps
    sample.generate runs."""
    cache = KVCache(model.config.n_layer, model.config.block_size)
    t0 = time.perf_counter()
    logits, _ = model(prompt, cache=cache)
    cache.length = prompt.size(1)
    t1 = time.perf_counter()
    tokens = [logits[:, -1].argmax(-1, keepdim=True)]
    for _ in range(new_tokens):
        logits, _ = model(tokens[-1], cache=cache)
        cache.length += 1
        tokens.append(logits[:, -1].argmax(-1, keepdim=True))
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, torch.cat(tokens, 1)[0].tolist()


def worker(job):
    """Run in a fresh process (see run_path): load one model, time it, print a JSON line."""
    if job["threads"]:
        torch.set_num_threads(job["threads"])
    if job.get("kernel"):
        kernels.CPU_KERNEL = job["kernel"]
    before = peak_rss_mb()
    if job["kind"] == "float":
        model = load_float(job["path"], job["arch"], job["model_args"])
    else:
        model, _ = load_model(job["path"])
    model.eval()
    prompt = torch.tensor([job["prompt"]])
    runs = [timed_generation(model, prompt, job["new_tokens"]) for _ in range(job["repeats"])]
    print(json.dumps({"prefill": min(r[0] for r in runs), "decode": min(r[1] for r in runs),
                      "tokens": runs[0][2], "weights": weight_bytes(model),
                      "rss_before": before, "rss_peak": peak_rss_mb(),
                      "threads": torch.get_num_threads()}))


def val_losses(ckpt, models, n_batches):
    """Each model's val loss as training measures it (train.estimate_loss, the run's batch size
    and seed): the same n_batches batches of the checkpoint's val.bin for every model."""
    cfg = dict(ckpt["config"], eval_iters=n_batches)
    data = Data(cfg, "cpu", cfg["seed"])
    return {name: estimate_loss(m, data, cfg, nullcontext(), splits=("val",))["val"]
            for name, m in models.items()}


def run_path(job):
    code = (f"import json; from tools import bench_inference as b; "
            f"b.worker(json.loads({json.dumps(job)!r}))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"the {job['kind']} worker failed: {r.stderr.strip()[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def bench(cfg):
    ckpt = load_checkpoint(cfg["ckpt"])
    trained = model_from_checkpoint(ckpt, cfg["ckpt"]).eval()
    block = trained.config.block_size
    if cfg["prompt_tokens"] + cfg["new_tokens"] > block:
        raise ConfigError(f"prompt_tokens + new_tokens must fit block_size={block}")
    if cfg["kernel"] not in ("", "int_mm", "fbgemm"):
        raise ConfigError(f"kernel '{cfg['kernel']}' is not 'int_mm' or 'fbgemm'")
    kernel = cfg["kernel"] or kernels.CPU_KERNEL
    g = torch.Generator().manual_seed(cfg["seed"])
    prompt = torch.randint(0, trained.config.vocab_size, (cfg["prompt_tokens"],), generator=g)
    job = dict(arch=ckpt["arch"], model_args=ckpt["model_args"], prompt=prompt.tolist(),
               new_tokens=cfg["new_tokens"], repeats=cfg["repeats"], threads=cfg["threads"],
               kernel=kernel)
    names = {"float": "float32 (nn.Linear)", "packed": "packed int8 x ternary"}
    with tempfile.TemporaryDirectory() as tmp:
        files = write_files(trained, ckpt, tmp, cfg["float_dtype"], cfg["embed_int8"])
        sizes, bits, float_path, packed_path = files
        n_params = trained.get_num_params()
        losses = val_losses(ckpt, {"training model": trained,
                                   packed_path.name: load_model(packed_path)[0].eval()},
                            cfg["val_batches"]) if cfg["val_batches"] > 0 else {}
        del trained
        results = {kind: run_path(dict(job, kind=kind, path=str(path)))
                   for kind, path in (("float", float_path), ("packed", packed_path))}
    threads = results["float"]["threads"]
    print(f"model: {ckpt['arch']}, {n_params / 1e6:.2f}M parameters; {threads} threads; "
          f"batch 1, greedy, KV cache; prompt {cfg['prompt_tokens']} random tokens (prefill: one "
          f"forward), then {cfg['new_tokens']} single-token forwards (decode); best of "
          f"{cfg['repeats']}; each model in its own process; integer sums by {kernel}")
    for name, size in sizes.items():
        print(f"  file {name:34s} {size:>14,} bytes")
    print(f"  linear layers: {bits['2bit']:.3f} bits/weight (2bit), {bits['base3']:.3f} (base3)")
    for kind, r in results.items():
        p, d = cfg["prompt_tokens"] / r["prefill"], cfg["new_tokens"] / r["decode"]
        r.update(prefill_tps=p, decode_tps=d)
        print(f"  {names[kind]:22s} weights {r['weights'] / 1e6:8.2f} MB   peak RSS "
              f"{r['rss_peak']:7.1f} MB ({r['rss_before']:.0f} before loading)   prefill "
              f"{p:9.1f} tok/s   decode {d:8.1f} tok/s")
    for name, loss in losses.items():
        print(f"  val loss, {cfg['val_batches']} batches of {ckpt['config']['batch_size']}: "
              f"{name:16s} {loss:.4f}")
    f, i = results["float"], results["packed"]
    print(f"  integer / float: prefill {i['prefill_tps'] / f['prefill_tps']:.2f}x, decode "
          f"{i['decode_tps'] / f['decode_tps']:.2f}x")
    return sizes, results


def main(argv=None):
    run_cli(SETTINGS, bench, "-m tools.bench_inference", __doc__, argv)


if __name__ == "__main__":
    main()
