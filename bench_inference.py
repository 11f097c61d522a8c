"""File size, weight memory, prefill and decode speed: packed integer model vs float model.

    python bench_inference.py --ckpt=out/ckpt.pt
    python bench_inference.py --ckpt=out-124m/ckpt.pt --prompt_tokens=128 --new_tokens=128

From one training checkpoint it builds (a) the float model of the same config, nn.Linear with the
latent weights, as a float run would have them, and (b) the integer model that sample.py runs from
a .bitnet file. Both get the same prompt (random token ids) and generate the same number of
tokens greedily at batch 1 with the KV cache; prefill is one forward over the prompt.
"""

import copy
import tempfile
import time
from pathlib import Path

import torch

from bitlinear import BitLinear
from bitlinear.packed_file import save_packed
from checkpoint import load_checkpoint, model_from_checkpoint, model_from_packed
from configurator import ConfigError, run_cli
from generation import KVCache, generate

DEFAULTS = dict(ckpt="out/ckpt.pt", prompt_tokens=32, new_tokens=32, repeats=3, seed=0,
                threads=0)  # threads 0: torch's default


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


def file_sizes(model, ckpt, tmp):
    sizes = {}
    for dtype in (torch.float32, torch.float16):
        path = Path(tmp) / f"{dtype}.pt"
        torch.save(copy.deepcopy(model).to(dtype).state_dict(), path)  # tied weights once
        sizes[f"state_dict {str(dtype).split('.')[1]}"] = path.stat().st_size
    for packing in ("2bit", "base3"):
        path = Path(tmp) / f"{packing}.bitnet"
        save_packed(model, path, ckpt["arch"], ckpt["model_args"], ckpt.get("meta"), packing)
        sizes[f".bitnet {packing}"] = path.stat().st_size
    return sizes, Path(tmp) / "2bit.bitnet"


@torch.no_grad()
def speed(model, prompt, new_tokens, repeats):
    """Best-of-repeats (prefill tokens/s, decode tokens/s) at batch 1."""
    prefill, decode = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        model(prompt, cache=KVCache(model.config.n_layer, model.config.block_size))
        t_prefill = time.perf_counter() - t
        t = time.perf_counter()
        out = generate(model, prompt, new_tokens, temperature=0)  # one prefill, then decode steps
        t_decode = time.perf_counter() - t - t_prefill
        prefill.append(prompt.size(1) / t_prefill)
        decode.append((new_tokens - 1) / t_decode)
    return max(prefill), max(decode), out


def weight_bytes(model):
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def bench(cfg):
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    ckpt = load_checkpoint(cfg["ckpt"])
    trained = model_from_checkpoint(ckpt, cfg["ckpt"]).eval()
    block = trained.config.block_size
    if cfg["prompt_tokens"] + cfg["new_tokens"] > block:
        raise ConfigError(f"prompt_tokens + new_tokens must fit block_size={block}")
    with tempfile.TemporaryDirectory() as tmp:
        sizes, packed_path = file_sizes(trained, ckpt, tmp)
        integer, _ = model_from_packed(packed_path)
    models = {"float32 (nn.Linear)": as_float(trained).eval(), "packed int8 x ternary": integer}
    g = torch.Generator().manual_seed(cfg["seed"])
    prompt = torch.randint(0, trained.config.vocab_size, (1, cfg["prompt_tokens"]), generator=g)
    print(f"model: {ckpt['arch']}, {trained.get_num_params() / 1e6:.2f}M parameters; "
          f"{torch.get_num_threads()} threads; prompt {cfg['prompt_tokens']} tokens, "
          f"{cfg['new_tokens']} new")
    for name, size in sizes.items():
        print(f"  file {name:18s} {size:>14,} bytes")
    results = {}
    for name, model in models.items():
        p, d, _ = speed(model, prompt, cfg["new_tokens"], cfg["repeats"])
        results[name] = (p, d)
        print(f"  {name:22s} weights {weight_bytes(model) / 1e6:8.2f} MB   prefill {p:9.1f} "
              f"tok/s   decode {d:8.1f} tok/s")
    (pf, df), (pi, di) = results.values()
    print(f"  integer / float: prefill {pi / pf:.2f}x, decode {di / df:.2f}x")
    return sizes, results


def main(argv=None):
    run_cli(DEFAULTS, bench, "bench_inference.py", __doc__, argv)


if __name__ == "__main__":
    main()
