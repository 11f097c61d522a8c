"""train.py's settings: every key with its default, and the checks and choices made on them
after the config file and --key=value overrides (configurator.py reads those).

Each key can be set by a config file or --key=value; `python train.py --help` lists them.
"""

from pathlib import Path

import torch

from configurator import ConfigError
from models import ARCHS, arch_keys

DEFAULTS = dict(
    # I/O
    out_dir="out",
    eval_interval=250,
    log_interval=10,
    eval_iters=100,
    eval_only=False,
    always_save_checkpoint=True,  # False: save only when val loss improves
    init_from="scratch",  # 'scratch', 'resume' (out_dir/ckpt.pt), or the path of a checkpoint
    # or transformers folder whose weights a new run starts from (fine-tuning)
    # logging
    wandb_log=False,
    wandb_project="bitgpt",
    wandb_run_name="run",
    # data
    data_dir="data",
    dataset="shakespeare_char",
    gradient_accumulation_steps=1,  # summed over all processes
    batch_size=12,  # per process and micro-step
    block_size=64,
    # model
    arch="gpt",  # 'gpt' (gpt/model.py) or 'llama' (llama/model.py)
    n_layer=4,
    n_head=4,
    n_embd=128,
    dropout=0.0,
    bitlinear=True,  # ternary BitLinear layers; False builds the same model with nn.Linear
    bit_norm=False,  # RMSNorm inside each BitLinear (the FAQ reference layout)
    bias=False,  # gpt only: biases in Linears and LayerNorms
    n_kv_head=0,  # llama only: key/value heads (grouped-query attention); 0 means n_head
    ffn_hidden=0,  # llama only: MLP width; 0 means 8/3 * n_embd rounded up to a multiple of 64
    mlp="swiglu",  # llama only: 'swiglu', or 'relu2' (squared ReLU, as BitNet b1.58 2B4T)
    subln=False,  # llama only: RMSNorm before the attention and MLP output projections (2B4T)
    rope_theta=10000.0,  # llama only
    norm_eps=1e-5,  # llama only: RMSNorm epsilon
    tie_embeddings=False,  # llama only: share the token embedding with the output head
    # AdamW and the learning-rate schedule
    learning_rate=1e-3,
    bit_lr_scale=4.0,  # BitLinear weights train at learning_rate * bit_lr_scale (see README)
    max_iters=2000,
    max_time=0.0,  # seconds of training after which to save and stop cleanly; 0 means no limit
    weight_decay=0.1,
    beta1=0.9,
    beta2=0.99,
    grad_clip=1.0,  # 0 disables clipping
    decay_lr=True,  # decay to min_lr after a linear warmup, by lr_schedule
    lr_schedule="cosine",  # 'cosine', or 'two_stage' (the BitNet b1.58 training tips, README)
    wd_schedule="constant",  # 'constant', or 'two_stage': no weight decay in the second half
    warmup_iters=100,
    lr_decay_iters=2000,
    min_lr=1e-4,
    # system
    backend="nccl",  # torchrun's backend: 'nccl' on GPUs, 'gloo' on CPUs
    fsdp=False,  # shard weights, gradients and AdamW state across processes (FSDP2), see README
    activation_checkpointing=False,  # recompute each block's activations in the backward
    device="auto",  # 'auto' picks cuda, else mps, else cpu; or 'cpu', 'cuda', 'cuda:1', 'mps'
    dtype="auto",  # 'auto': bfloat16 on GPUs that have it, else float16 on cuda, else float32
    compile="auto",  # torch.compile; 'auto' means on for cuda, off elsewhere
    seed=1337,
)


def resolve_device(device="auto", dtype="auto"):
    """'auto' device: cuda, else mps, else cpu. 'auto' dtype: bfloat16 where the GPU has it,
    float16 on other GPUs, float32 elsewhere. Returns (device, dtype) or raises ConfigError."""
    if device == "auto":
        device = ("cuda" if torch.cuda.is_available()
                  else "mps" if torch.backends.mps.is_available() else "cpu")
    device_type = device.split(":")[0]
    if device_type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"device '{device}' is not one of auto, cpu, cuda, cuda:N, mps")
    if device_type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' asked for but no CUDA GPU is visible; use --device=cpu")
    if dtype == "auto":
        dtype = ("bfloat16" if device_type == "cuda" and torch.cuda.is_bf16_supported()
                 else "float16" if device_type == "cuda" else "float32")
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"dtype '{dtype}' is not one of auto, float32, bfloat16, float16")
    return device, dtype


def resolve(cfg):
    """Decide the settings derived from others (device, dtype, compile), after all overrides."""
    cfg["device"], cfg["dtype"] = resolve_device(cfg["device"], cfg["dtype"])
    device_type = cfg["device"].split(":")[0]
    if cfg["compile"] == "auto":
        cfg["compile"] = device_type == "cuda"
    if not isinstance(cfg["compile"], bool):
        raise ConfigError(f"compile wants True, False or 'auto', got {cfg['compile']!r}")
    if cfg["arch"] not in ARCHS:
        raise ConfigError(f"arch '{cfg['arch']}' is not one of {', '.join(ARCHS)}")
    foreign = set().union(*map(arch_keys, ARCHS)) - arch_keys(cfg["arch"])
    changed = sorted(k for k in foreign if cfg[k] != DEFAULTS[k])
    if changed:
        raise ConfigError(f"{', '.join(changed)}: not a setting of arch '{cfg['arch']}'; drop "
                          f"it or pick the arch it belongs to")
    for key, choices in (("lr_schedule", ("cosine", "two_stage")),
                         ("wd_schedule", ("constant", "two_stage")), ("mlp", ("swiglu", "relu2"))):
        if cfg[key] not in choices:
            raise ConfigError(f"{key} '{cfg[key]}' is not one of {', '.join(choices)}")
    if cfg["init_from"] not in ("scratch", "resume"):
        source = Path(cfg["init_from"])
        if not source.exists():
            raise ConfigError(f"init_from '{source}' is not 'scratch', 'resume', or the path of a "
                              f"checkpoint or transformers folder")
        if source.resolve() == (Path(cfg["out_dir"]) / "ckpt.pt").resolve():
            raise ConfigError(f"init_from '{source}' is this run's own checkpoint, which it would "
                              f"overwrite: fine-tune into another --out_dir, or continue the run "
                              f"with --init_from=resume")
    for key in ("n_layer", "n_head", "n_embd", "block_size", "batch_size", "eval_interval",
                "eval_iters", "log_interval", "gradient_accumulation_steps"):
        if cfg[key] < 1:
            raise ConfigError(f"{key} must be at least 1, got {cfg[key]}")
    if cfg["n_embd"] % cfg["n_head"]:
        raise ConfigError(f"n_embd={cfg['n_embd']} is not divisible by n_head={cfg['n_head']}")
    if cfg["n_kv_head"] < 0 or cfg["n_kv_head"] and cfg["n_head"] % cfg["n_kv_head"]:
        raise ConfigError(f"n_kv_head={cfg['n_kv_head']} must divide n_head={cfg['n_head']} "
                          f"(0 means n_head)")
    if cfg["arch"] == "llama" and cfg["n_embd"] // cfg["n_head"] % 2:
        raise ConfigError(f"llama's head size n_embd/n_head={cfg['n_embd'] // cfg['n_head']} "
                          f"must be even (rotary embeddings turn pairs)")
    return cfg
