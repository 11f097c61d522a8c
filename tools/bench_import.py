"""Importing a big transformers folder: a BitNet b1.58 2B4T-shaped one, random weights.

    python -m tools.bench_import                     # 30 layers: the full 2.4B shape
    python -m tools.bench_import --layers=4          # a quick run

Step 1 (its own process) makes the folder, unless it is there already: transformers' BitNetConfig
(its defaults are 2B4T's: hidden 2560, MLP 6912, 20 heads, 5 key/value heads, vocab 128,256,
relu2, sub-norms, rope_theta 500000) with 2B4T's tied embeddings and 4096 positions, the tensor
names and shapes of its BitNetForCausalLM (built on the meta device: no memory), random ternary
projections packed by its pack_weights, bf16 embeddings and norms, written shard by shard, and a
LLaMA-3-sized byte-level BPE (128,000 tokens and 256 special ones; merges trained on Tiny
Shakespeare) saved by PreTrainedTokenizerFast. Nothing is held beyond one shard.
Step 2 (a fresh process, so step 1's memory does not count) imports it with
llama.hf_import.load_hf_model (what --init_from=FOLDER runs), reporting the wall time and the
peak resident memory (VmHWM) against the float32 model's bytes, then samples new_tokens tokens
from it as sample.py does (Tokenizer(meta), generate, decode), on the integer path by default:
the float model ternarizes its 2.1B weights again at every token.
"""

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from bitlinear.inference import to_integer
from common import defaults, run_cli
from data.common import tinyshakespeare_text
from data.tokenizer import Tokenizer
from llama.hf_import import load_hf_model
from sample import generate

SETTINGS = dict(
    folder=("/tmp/bitnet-2b4t-shape", "the folder to make (once: kept, reused when present)"),
    layers=(30, "num_hidden_layers (2B4T has 30)"),
    linear_class=("autobitlinear", "the weight_scale meaning: 'autobitlinear' (2B4T's: "
                                   "mean|W|) or 'bitlinear' (1/mean|W|)"),
    shard_mb=(500, "the largest safetensors shard, in MB (one tensor may exceed it)"),
    new_tokens=(4, "tokens sampled after the import"),
    start=("ROMEO:", "the prompt"),
    integer=(True, "sample on the integer path (bitlinear.to_integer, as a .bitnet file runs); "
                   "False: the float model, which ternarizes every weight at every token"),
    step=("all", "'all', or the one step to run in this process: 'make' or 'import'"),
)
DEFAULTS = defaults(SETTINGS)
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TOKENS, SPECIAL = 128_000, 256  # LLaMA 3's layout: specials from id 128,000


def vm_hwm():
    """This process's peak resident memory so far, in bytes (/proc/self/status VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise OSError("no VmHWM in /proc/self/status (Linux only)")


def make_tokenizer(folder):
    """A byte-level BPE of LLaMA 3's size: merges trained on Tiny Shakespeare, the vocabulary
    filled to 128,000 with tokens no merge makes, then 256 special tokens."""
    from tokenizers import Tokenizer as BPETokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = BPETokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([tinyshakespeare_text(folder)], trainers.BpeTrainer(
        vocab_size=2000, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    vocab.update({f"<filler_{i}>": i for i in range(len(vocab), TOKENS)})
    tok = BPETokenizer.from_str(json.dumps(spec))
    names = ["<|begin_of_text|>", "<|end_of_text|>"]
    tok.add_special_tokens(names + [f"<|reserved_special_token_{i}|>"
                                    for i in range(SPECIAL - len(names))])
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=names[0], eos_token=names[1]
                            ).save_pretrained(folder)
    return tok.get_vocab_size()


def make(cfg):
    """Step 1: the folder, one shard in memory at a time."""
    from safetensors.torch import save_file
    from transformers import BitNetConfig, BitNetForCausalLM
    from transformers.integrations.bitnet import pack_weights
    folder = Path(cfg["folder"])
    t0 = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    config = BitNetConfig(num_hidden_layers=cfg["layers"], tie_word_embeddings=True,
                          max_position_embeddings=4096)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in BitNetForCausalLM(config).state_dict().items()
                  if k != "lm_head.weight"}  # tied: embed_tokens is the head

    def nbytes(name):  # packed: 4 values a byte, plus a bf16 scale; else bf16
        packed = name.rsplit(".", 2)[-2] in PROJECTIONS
        return math.prod(shapes[name]) // 4 + 2 if packed else 2 * math.prod(shapes[name])
    shards, size = [[]], 0
    for name in shapes:
        if size and size + nbytes(name) > cfg["shard_mb"] << 20:
            shards, size = shards + [[]], 0
        shards[-1].append(name)
        size += nbytes(name)
    g = torch.Generator().manual_seed(0)
    weight_map = {}
    for i, names in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        shard = {}
        for name in names:
            shape = shapes[name]
            if name.rsplit(".", 2)[-2] in PROJECTIONS:
                t = torch.randint(-1, 2, shape, dtype=torch.int8, generator=g)
                shard[name] = pack_weights(t)
                mean_abs = 0.01 + 0.02 * torch.rand((), generator=g)  # a latent mean|W|
                s = mean_abs if cfg["linear_class"] == "autobitlinear" else 1 / mean_abs
                shard[name + "_scale"] = s.reshape(1).to(torch.bfloat16)
            elif name.endswith("embed_tokens.weight"):
                shard[name] = (torch.randn(shape, generator=g, dtype=torch.bfloat16) * 0.02)
            else:  # norms
                shard[name] = (1 + 0.1 * torch.randn(shape, generator=g)).to(torch.bfloat16)
            weight_map.update(dict.fromkeys([k for k in shard if k.startswith(name)], file))
        save_file(shard, folder / file, metadata={"format": "pt"})
        del shard
    total = sum((folder / f).stat().st_size for f in set(weight_map.values()))
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    config.quantization_config = {"quant_method": "bitnet", "linear_class": cfg["linear_class"],
                                  "quantization_mode": "offline"}
    config.dtype = "bfloat16"
    config.save_pretrained(folder)
    tokens = make_tokenizer(folder)
    assert tokens == config.vocab_size, (tokens, config.vocab_size)
    return {"make_s": time.perf_counter() - t0, "folder_bytes": total, "shards": len(shards),
            "make_peak_rss": vm_hwm(), "tokenizer_tokens": tokens}


def import_and_sample(cfg):
    """Step 2: load_hf_model, timed and measured, then a few sampled tokens."""
    before = vm_hwm()
    t0 = time.perf_counter()
    model, args, meta = load_hf_model(cfg["folder"])
    import_s = time.perf_counter() - t0
    peak = vm_hwm()
    tensors = {t.data_ptr(): t.numel() * t.element_size()  # a tied tensor once
               for t in [*model.parameters(), *model.buffers()]}
    fp32 = sum(tensors.values())
    params = sum(t.numel() for t in model.parameters())
    model.eval()
    if cfg["integer"]:
        model = to_integer(model)
    tok = Tokenizer(meta)
    x = torch.tensor([tok.encode(cfg["start"])])
    g = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    y = generate(model, x, cfg["new_tokens"], 0.8, 200, g)
    sample_s = time.perf_counter() - t0
    return {"import_s": import_s, "params": params, "fp32_model_bytes": fp32,
            "rss_before_import": before, "import_peak_rss": peak, "ratio": peak / fp32,
            "vocab_size": args["vocab_size"], "meta_vocab_size": meta["vocab_size"],
            "eot_token": meta["eot_token"], "sample_s": sample_s,
            "s_per_token": sample_s / cfg["new_tokens"], "peak_rss_after_sampling": vm_hwm(),
            "text": tok.decode(y[0].tolist()), "threads": torch.get_num_threads()}


def step(cfg, name):
    """Run one step in a fresh process; its results (the last stdout line, JSON)."""
    argv = [f"--{k}={v}" for k, v in cfg.items() if k != "step"] + [f"--step={name}"]
    r = subprocess.run([sys.executable, "-m", "tools.bench_import", *argv], capture_output=True,
                       text=True, cwd=Path(__file__).resolve().parents[1])
    if r.returncode:
        sys.exit(f"error: the {name} step failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def gb(n):
    return f"{n / 1e9:.2f} GB"


def main(cfg):
    if cfg["step"] != "all":
        print(json.dumps({"make": make, "import": import_and_sample}[cfg["step"]](cfg)))
        return
    folder = Path(cfg["folder"])
    if not (folder / "config.json").is_file():
        made = step(cfg, "make")
        print(f"made {folder}: {gb(made['folder_bytes'])} in {made['shards']} shards, "
              f"{made['make_s']:.0f} s (peak RSS {gb(made['make_peak_rss'])}); tokenizer "
              f"{made['tokenizer_tokens']:,} tokens = config vocab_size")
    else:
        print(f"using {folder} as it is (delete it to make it again)")
    r = step(cfg, "import")
    print(f"import: {r['params'] / 1e9:.3f}B parameters, float32 model {gb(r['fp32_model_bytes'])}"
          f"; {r['import_s']:.1f} s; peak RSS {gb(r['import_peak_rss'])} = {r['ratio']:.2f}x the "
          f"float32 model (RSS before the import {gb(r['rss_before_import'])})")
    print(f"vocab: model {r['vocab_size']:,}, meta {r['meta_vocab_size']:,}; end-of-text "
          f"{r['eot_token']!r}")
    path = "integer path" if cfg["integer"] else "float model"
    print(f"sample ({path}, {r['threads']} threads): {cfg['new_tokens']} tokens in "
          f"{r['sample_s']:.1f} s ({r['s_per_token']:.2f} s/token); peak RSS now "
          f"{gb(r['peak_rss_after_sampling'])}")
    print(f"text: {r['text']!r}")
    print(f"(machine: {os.cpu_count()} cores, shared with other work: times are indicative)")
    return r


if __name__ == "__main__":
    run_cli(SETTINGS, main, "-m tools.bench_import", __doc__)
