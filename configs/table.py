"""What each config file trains, as the code builds it: its parameters, bytes of weights and the
memory to train it, counted on the meta device (nothing is allocated, even for billions of
parameters). `python train.py --list_configs` prints config_table(); `python bench.py --memory`
prints memory_table().

This is a module of the configs folder, not a config file: config_files() leaves it out.
"""

from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F

from bitlinear.layer import BitLinear
from common import blocks, build_model, model_args, parse_args
from configs import DEFAULTS

FOLDER = Path(__file__).resolve().parent
MODULES = ("__init__.py", "table.py")  # Python of the folder that is not a config file


def config_files():
    """The config files of this folder, by name."""
    return sorted(p for p in FOLDER.glob("*.py") if p.name not in MODULES)


def saved_activations(model, batch_size):
    """Bytes autograd keeps for the backward of one (batch_size, block_size) micro-batch:
    (total, [bytes kept inside each block]). Run it on a meta-device model: nothing is
    allocated. Each storage counts once; parameters don't count. Attention counts what flash
    attention keeps (q, k, v, output, log-sum-exp), not a T x T matrix."""

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
                    activation_checkpointing=False, optimizer="adamw"):
    """Estimated bytes one process needs to train the model, counted on the meta device:

    - float32 weights, gradients and AdamW's two moments: 16 bytes a parameter, and under
      autocast its 16-bit copy of each weight: 2 more; all divided by `shards` under FSDP,
      which then holds two whole blocks at a time (the one running and the next, prefetched);
      Muon keeps one moment, not two, of the blocks' linear weights: 4 bytes less for each;
    - the activations kept for the backward (saved_activations), in dtype; with activation
      checkpointing only each block's input, plus one block's activations while it recomputes;
    - a float32 logits-sized gradient.
    """
    with torch.device("meta"):
        model = build_model(arch, args).to(getattr(torch, dtype))
    n = sum(p.numel() for p in model.parameters())
    state = (16 + (0 if dtype == "float32" else 2)) * n
    if optimizer == "muon":
        state -= 4 * sum(m.weight.numel() for m in blocks(model).modules()
                         if isinstance(m, torch.nn.Linear))
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
    ternary = {id(m.weight) for m in model.modules() if isinstance(m, BitLinear)}
    return sum(p.numel() * (bits / 8 if id(p) in ternary else 2) for p in model.parameters())


def config_facts(path):
    """What a config file trains, as the code builds it: (cfg, model args, parameter count,
    bytes of weights ternary and float)."""
    cfg = parse_args(DEFAULTS, [str(path)])
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
    facts = [(p, *config_facts(p)) for p in config_files()]
    return sorted(facts, key=lambda f: (f[3], f[0].name))


def size(b):
    return f"{b / 1e6:.3g} MB" if b < 1e9 else f"{b / 1e9:.3g} GB"


def train_dtype(params):
    """The dtype a config is sized in: float32 for the CPU-sized ones (under 5M parameters)."""
    return "float32" if params < 5e6 else "bfloat16"


def config_table():
    """What `python train.py --list_configs` prints: every config, its model and the memory to
    train it, in float32 for the CPU-sized ones (under 5M parameters), else bfloat16."""
    rows = [("config", "arch", "params", "layers x width, context", "dataset", "batch",
             "weights", "memory")]
    for path, cfg, args, params, (ternary, full) in configs():
        dtype = train_dtype(params)
        mem = training_memory(cfg["arch"], args, cfg["batch_size"], dtype,
                              optimizer=cfg["optimizer"])
        rows.append((f"configs/{path.name}", cfg["arch"], count(params),
                     f"{cfg['n_layer']} x {cfg['n_embd']}, {cfg['block_size']}", cfg["dataset"],
                     str(cfg["batch_size"]), f"{size(ternary)} / {size(full)}",
                     f"{size(mem)} {dtype}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines + ["weights: stored, ternary (2 bits each) / float (16 bits) "
                              "(configs.table.weight_bytes)",
                              "memory: to train on one device without sharding, at the config's "
                              "batch_size (configs.table.training_memory)"])


def memory_table(gpus=8):
    """Markdown: each config's estimated training memory per GPU (training_memory) at its
    batch_size, in train_dtype: plain (one GPU, or DDP), with activation checkpointing, and with
    FSDP across `gpus` GPUs; and the smallest of 24/40/80 GB GPUs each fits in (using at most
    90% of it: the CUDA context and the allocator's slack take the rest)."""
    rows = [f"| config | params | batch | one GPU / DDP | + act. ckpt | FSDP x{gpus} | "
            f"FSDP x{gpus} + act. ckpt |", "|---|---|---|---|---|---|---|"]
    fit = lambda b: f"{b / 1e9:.1f} GB" + next((f" ({g})" for g in (24, 40, 80)  # noqa: E731
                                                if b < g * 1e9 * 0.9), " (>80)")
    for path, cfg, args, params, _ in configs():
        need = [training_memory(cfg["arch"], args, cfg["batch_size"], train_dtype(params),
                                shards, ckpt, cfg["optimizer"])
                for shards in (1, gpus) for ckpt in (False, True)]
        rows.append(f"| {path.stem} | {count(params)} | {cfg['batch_size']} | "
                    + " | ".join(map(fit, need)) + " |")
    return "\n".join(rows)
