"""An exported model run where users run models: file sizes, agreement, and speed against BitGPT.

    python -m tools.bench_export --ckpt=out-llama_bitnet_5m/ckpt.pt
    python -m tools.bench_export --ckpt=out-124m-bitnet/ckpt.pt --val_windows=0 \
        --prompt_tokens=128 --new_tokens=128

From one checkpoint (llama or gpt) it writes what export.py writes (.bitnet, the transformers
folder, GGUF with TQ2_0 and TQ1_0, or Q4_0 where the widths fill no block of 256) and reports:
  - the size of each;
  - agreement on val_windows windows of block_size tokens from the checkpoint's val split:
    transformers against BitGPT's integer path and training model, llama.cpp against the
    integer path (the max and mean absolute logit error, and how often the argmax agrees);
  - speed at batch 1, greedy, `threads` threads: llama.cpp's prompt processing (one eval of
    prompt_tokens random token ids) and decode (new_tokens single-token evals), best of
    `repeats`, next to BitGPT's integer path on the .bitnet file, timed the same way in its own
    process by tools/bench_inference.py (the model's own steps, as sample.py runs them);
  - greedy continuations of --start from llama.cpp and from BitGPT.
A part whose library is not installed (transformers, llama-cpp-python) is skipped, saying so.
"""

import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import bitlinear.kernels as kernels
from bitlinear.inference import to_integer
from bitlinear.pack import BLOCK
from common import ConfigError, defaults, load_checkpoint, model_from_checkpoint, run_cli
from data.loader import read_meta
from data.tokenizer import Tokenizer
from export import main as export_main
from sample import generate
from tools import bench_inference

SETTINGS = dict(
    ckpt=("out/ckpt.pt", "the training checkpoint (llama or gpt) to export and benchmark"),
    val_windows=(16, "windows of block_size val tokens to measure agreement on; 0: none"),
    prompt_tokens=(0, "random prompt tokens, run as one eval (prompt processing); 0: half the "
                      "model's context"),
    new_tokens=(0, "single-token evals after the prompt (decode); 0: the rest of the context"),
    repeats=(3, "rounds of prompt and decode; the best time of each counts"),
    threads=(2, "threads of llama.cpp and of BitGPT's worker"),
    seed=(0, "random seed of the prompt"),
    start=("ROMEO:", "the prompt of the greedy continuations"),
    gen_tokens=(60, "tokens of each greedy continuation"),
)
DEFAULTS = defaults(SETTINGS)


INSTALL = {"llama_cpp": "pip install -r requirements-llamacpp.txt",
           "transformers": "pip install -r requirements-dev.txt"}


def have(module):
    try:
        __import__(module)
        return True
    except ImportError:
        print(f"  (skipped: {module} is not installed; {INSTALL[module]})")
        return False


def fit_context(cfg, block):
    """prompt_tokens and new_tokens, 0 meaning the model's context split in two, checked
    against it before any work."""
    prompt = cfg["prompt_tokens"] or block // 2
    new = cfg["new_tokens"] or block - 1 - prompt
    if new < 1 or prompt + new + 1 > block:
        raise ConfigError(f"prompt_tokens + new_tokens ({prompt} + {new}) must be below the "
                          f"model's block_size={block}; 0 for both fits it")
    return dict(cfg, prompt_tokens=prompt, new_tokens=new)


def val_windows(ckpt, n, block):
    """n windows of block tokens from the start of the checkpoint's val split."""
    folder = Path(ckpt["config"]["data_dir"]) / ckpt["config"]["dataset"]
    if not (folder / "val.bin").is_file():
        raise ConfigError(f"no {folder}/val.bin to measure agreement on; prepare the dataset or "
                          f"pass --val_windows=0")
    dtype = (read_meta(folder) or {}).get("dtype", "uint16")  # no meta: nanoGPT's uint16
    ids = np.fromfile(folder / "val.bin", dtype=dtype)[:n * block].astype(np.int64)
    return torch.from_numpy(ids).view(n, block)


def agreement(pairs):
    """pairs of (got, expected) logits -> (max abs error, mean abs error, top-1 agreement)."""
    errs = [np.abs(g - e) for g, e in pairs]
    top1 = np.concatenate([g.argmax(-1) == e.argmax(-1) for g, e in pairs])
    return max(e.max() for e in errs), np.mean([e.mean() for e in errs]), top1.mean()


def report(results, name, stats, n):
    results[name] = stats
    print(f"  {name:44s} max |err| {stats[0]:.2e}  mean |err| {stats[1]:.2e}  top-1 "
          f"{100 * stats[2]:.1f}% of {n} positions")


@torch.no_grad()
def hf_agreement(model, folder, windows):
    from transformers import AutoModelForCausalLM
    with torch._dynamo.config.patch(disable=True):
        hf = AutoModelForCausalLM.from_pretrained(folder).eval()
        return agreement([(hf(w[None]).logits[0].numpy(), model(w[None], targets=w[None])[0][0]
                           .numpy()) for w in windows])


@torch.no_grad()
def llama_cpp_agreement(integer, path, windows):
    from llama_cpp import Llama
    llm = Llama(model_path=str(path), logits_all=True, n_ctx=windows.size(1), verbose=False)
    pairs = []
    for w in windows:
        llm.reset()
        llm.eval(w.tolist())
        pairs.append((np.array(llm.scores[:w.numel()]),
                      integer(w[None], targets=w[None])[0][0].numpy()))
    llm.close()
    return agreement(pairs)


def llama_cpp_speed(path, prompt, new_tokens, repeats, threads, n_ctx):
    """(prefill seconds, decode seconds), best of repeats: greedy, logits of the last token."""
    from llama_cpp import Llama
    llm = Llama(model_path=str(path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                verbose=False)
    last = lambda: int(np.argmax(np.ctypeslib.as_array(  # noqa: E731
        llm._ctx.get_logits_ith(-1), shape=(llm.n_vocab(),))))
    times = []
    for _ in range(repeats):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        token = last()
        t1 = time.perf_counter()
        for _ in range(new_tokens):
            llm.eval([token])
            token = last()
        times.append((t1 - t0, time.perf_counter() - t1))
    llm.close()
    return min(t[0] for t in times), min(t[1] for t in times)


def continuations(cfg, model, gguf_path, meta):
    """{'BitGPT': text, 'llama.cpp': text}: greedy continuations of --start."""
    tok = Tokenizer(meta)
    ids = torch.tensor([tok.encode(cfg["start"])])
    n = cfg["gen_tokens"]
    if hasattr(model, "transformer"):  # llama.cpp aborts past a GPT's learned positions
        n = min(n, model.config.block_size - ids.size(1))
    with torch.no_grad():
        ours = tok.decode(generate(model, ids, n, temperature=0)[0].tolist())
    print(f"  BitGPT    {ours!r}")
    texts = {"BitGPT": ours}
    if gguf_path is not None:
        from llama_cpp import Llama
        llm = Llama(model_path=str(gguf_path), n_ctx=model.config.block_size, verbose=False)
        out = llm(cfg["start"], max_tokens=n, temperature=0)
        llm.close()
        texts["llama.cpp"] = cfg["start"] + out["choices"][0]["text"]
        print(f"  llama.cpp {texts['llama.cpp']!r}")
    return texts


def gguf_qtypes(ckpt):
    """TQ2_0 and TQ1_0 where the widths fill their blocks of 256, else Q4_0 (blocks of 32)."""
    args = ckpt["model_args"]
    widths = [args["n_embd"]] + ([args["ffn_hidden"]] if ckpt["arch"] == "llama" else [])
    return ["tq2_0", "tq1_0"] if all(w % BLOCK["tq2_0"] == 0 for w in widths) else ["q4_0"]


def bench(cfg):
    """Print the report; return it as {'sizes', 'agreement', 'speed', 'text'}."""
    ckpt = load_checkpoint(cfg["ckpt"])
    model = model_from_checkpoint(ckpt, cfg["ckpt"]).eval()
    c = model.config
    cfg = fit_context(cfg, c.block_size)
    shape = {k: v for k, v in ckpt["model_args"].items() if k in (
        "n_layer", "n_embd", "ffn_hidden", "subln", "mlp", "bias", "gelu_approximate")}
    print(f"model: {ckpt['arch']}, {model.get_num_params() / 1e6:.2f}M parameters, {shape}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        integer = to_integer(model_from_checkpoint(ckpt, cfg["ckpt"]).eval())
        qtypes = gguf_qtypes(ckpt)
        files = {"model.bitnet": ["--format=packed"], "hf": ["--format=hf"],
                 **{f"{q}.gguf": ["--format=gguf", f"--qtype={q}"] for q in qtypes}}
        print("sizes:")
        results = dict(sizes={}, agreement={})
        for name, args in files.items():
            path = tmp / name
            export_main([f"--ckpt={cfg['ckpt']}", f"--to={path}", *args])
            size = sum(f.stat().st_size for f in path.iterdir()) if path.is_dir() else \
                path.stat().st_size
            results["sizes"][name] = size
            print(f"  {name:12s} {size:>14,} bytes")
        ggufs = [tmp / f"{q}.gguf" for q in qtypes] if have("llama_cpp") else []
        gguf_path = ggufs[0] if ggufs else None
        if cfg["val_windows"] > 0:
            windows = val_windows(ckpt, cfg["val_windows"], c.block_size)
            n = windows.numel()
            print(f"agreement on {n} val tokens ({cfg['val_windows']} windows of {c.block_size}):")
            if have("transformers"):
                for name, ours in (("integer path", integer), ("training model", model)):
                    report(results["agreement"], f"transformers vs BitGPT's {name}",
                           hf_agreement(ours, tmp / "hf", windows), n)
            for path in ggufs:
                name = f"llama.cpp {path.stem.upper()} vs BitGPT's integer path"
                report(results["agreement"], name, llama_cpp_agreement(integer, path, windows), n)
        results["speed"] = speed(cfg, ckpt, tmp / "model.bitnet", gguf_path, c.block_size,
                                 c.vocab_size)
        print(f"greedy continuations of {cfg['start']!r}:")
        results["text"] = continuations(cfg, integer, gguf_path, ckpt.get("meta"))
    return results


def speed(cfg, ckpt, bitnet_path, gguf_path, block, vocab):
    """{path: (prompt tok/s, decode tok/s)} for BitGPT's integer path as sample.py runs it and
    for llama.cpp."""
    g = torch.Generator().manual_seed(cfg["seed"])
    prompt = torch.randint(0, vocab, (cfg["prompt_tokens"],), generator=g)
    print(f"speed: batch 1, greedy, {cfg['threads']} threads, prompt {cfg['prompt_tokens']} random "
          f"tokens, then {cfg['new_tokens']} single-token steps; best of {cfg['repeats']}; "
          f"BitGPT's integer sums by {kernels.CPU_KERNEL}, its decode steps by the model's "
          f"forward with the KV cache:")
    job = dict(kind="packed", path=str(bitnet_path), arch=ckpt["arch"],
               model_args=ckpt["model_args"], prompt=prompt.tolist(),
               new_tokens=cfg["new_tokens"], repeats=cfg["repeats"], threads=cfg["threads"])
    ours = bench_inference.run_path(job)
    rows = [("BitGPT integer path (.bitnet)", ours["prefill"], ours["decode"])]
    if gguf_path is not None:
        rows.append((f"llama.cpp {gguf_path.stem.upper()} (.gguf)", *llama_cpp_speed(
            gguf_path, prompt.tolist(), cfg["new_tokens"], cfg["repeats"], cfg["threads"],
            block)))
    rates = {name: (cfg["prompt_tokens"] / p, cfg["new_tokens"] / d) for name, p, d in rows}
    for name, (p, d) in rates.items():
        print(f"  {name:36s} prompt {p:9.1f} tok/s   decode {d:8.1f} tok/s")
    if gguf_path is not None:
        (_, (_, d_ours)), (_, (_, d_theirs)) = rates.items()
        print(f"  decode, BitGPT / llama.cpp: {d_ours / d_theirs:.2f}x")
    return rates


def main(argv=None):
    return run_cli(SETTINGS, bench, "-m tools.bench_export", __doc__, argv)


if __name__ == "__main__":
    main()
