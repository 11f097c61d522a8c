"""train.py's settings, each with its default and what it does (python train.py --help prints
this table), and the checks and choices made on them once the config files and --key=value
overrides are in. The other files in this folder are config files: Python that assigns some of
these keys (python train.py --list_configs)."""

import math
from pathlib import Path

from common import GPT2_NAMES, ConfigError, defaults, resolve_device

SETTINGS = dict(
    # I/O
    out_dir=("out", "folder of the run: ckpt.pt and metrics.jsonl"),
    eval_interval=(250, "steps between evaluations (and checkpoints)"),
    log_interval=(10, "steps between training-loss logs"),
    eval_iters=(100, "batches per split in an evaluation"),
    eval_only=(False, "evaluate once and exit"),
    always_save_checkpoint=(True, "save at every evaluation; False: only when val loss improves"),
    init_from=("scratch", "'scratch', 'resume' (out_dir/ckpt.pt), or weights to start from: a "
               "checkpoint, a transformers folder, or gpt2, gpt2-medium, gpt2-large, gpt2-xl"),
    overwrite=(False, "let a new run replace the checkpoint and metrics.jsonl in out_dir"),
    wandb_log=(False, "also log to Weights & Biases (pip install wandb)"),
    wandb_project=("bitgpt", "wandb project"),
    wandb_run_name=("run", "wandb run name"),
    # data
    data_dir=("data", "folder that holds the datasets"),
    dataset=("shakespeare_char", "a prepared dataset: data_dir/dataset/{train,val}.bin"),
    gradient_accumulation_steps=(1, "micro-batches per optimizer step, summed over processes "
                                    "(at least one per process)"),
    batch_size=(12, "sequences per micro-batch and process"),
    block_size=(64, "context length in tokens"),
    # model
    arch=("gpt", "'gpt' (gpt/model.py) or 'llama' (llama/model.py)"),
    n_layer=(4, "transformer blocks"),
    n_head=(4, "attention heads"),
    n_embd=(128, "model width"),
    dropout=(0.0, "dropout rate"),
    bitlinear=(True, "ternary BitLinear layers; False builds the same model with nn.Linear"),
    bit_norm=(False, "RMSNorm inside each BitLinear (the b1.58 FAQ's reference layout)"),
    bit_group=(0, "input weights per absmean weight scale (a divisor of every BitLinear's input "
                  "width); 0: one scale per matrix, as the paper"),
    bias=(False, "gpt only: biases in Linears and LayerNorms"),
    n_kv_head=(0, "llama only: key/value heads (grouped-query attention); 0 means n_head"),
    ffn_hidden=(0, "llama only: MLP width; 0 means 8/3 n_embd rounded up to a multiple of 64"),
    mlp=("swiglu", "llama only: 'swiglu', or 'relu2' (squared ReLU, as b1.58 2B4T)"),
    subln=(False, "llama only: RMSNorm before the attention and MLP output projections (2B4T)"),
    rope_theta=(10000.0, "llama only: rotary embedding base"),
    norm_eps=(1e-5, "llama only: RMSNorm epsilon"),
    tie_embeddings=(False, "llama only: share the token embedding with the output head"),
    # the optimizers and the learning-rate schedule
    learning_rate=(1e-3, "peak learning rate"),
    bit_lr_scale=(4.0, "BitLinear weights train at learning_rate * bit_lr_scale"),
    max_iters=(2000, "optimizer steps in all"),
    max_time=(0.0, "seconds of training after which to save and stop; 0: no limit"),
    weight_decay=(0.1, "weight decay of the linear layers"),
    beta1=(0.9, "AdamW beta1"),
    beta2=(0.99, "AdamW beta2"),
    grad_clip=(1.0, "clip the gradient norm to this; 0 disables"),
    decay_lr=(True, "warm up, then decay to min_lr by lr_schedule; False: constant"),
    lr_schedule=("wsd", "'wsd' (warmup, stable, decay: constant, then linear to min_lr), "
                 "'cosine', or 'two_stage' (the b1.58 training tips)"),
    wsd_decay=(0.5, "lr_schedule='wsd': the fraction of the decay span spent decaying, at its end"),
    wd_schedule=("constant", "'constant', or 'two_stage': no weight decay from mid-decay on"),
    warmup_iters=(100, "steps of linear warmup"),
    lr_decay_iters=(2000, "step at which the decay reaches min_lr"),
    min_lr=(1e-4, "learning rate at the end of the decay"),
    optimizer=("muon", "'muon': Muon for the blocks' linear weights (BitLinear or float), AdamW "
               "for the rest; or 'adamw' for all"),
    bit_decay=(True, "weight decay on the BitLinear latent weights; False: none on them"),
    # from float to ternary: a quantization warm-up, distillation
    bit_warmup_iters=(0, "steps over which BitLinear's quantizers blend in (lambda 0 -> 1), for "
                      "converting float weights; 0: none"),
    bit_warmup_start=(0, "steps of float forward before that warm-up (a float warm start)"),
    distill_from=("", "a teacher (checkpoint or transformers folder): the loss adds the KL "
                  "divergence from its logits on the same batch; empty: none"),
    distill_weight=(1.0, "weight of the distillation term"),
    distill_temperature=(1.0, "softmax temperature of teacher and student in that term"),
    # system
    backend=("auto", "torchrun's backend: 'auto' (nccl on GPUs, gloo on CPUs), 'nccl', 'gloo'"),
    fsdp=(False, "shard weights, gradients and AdamW state across processes (FSDP2)"),
    activation_checkpointing=(False, "recompute each block's activations in the backward"),
    device=("auto", "'auto' (cuda, else mps, else cpu), 'cpu', 'cuda', 'cuda:1', 'mps'"),
    dtype=("auto", "'auto' (bfloat16 on GPUs that have it, float16 on other GPUs, else "
           "float32), or one of those"),
    compile=("auto", "torch.compile the model; 'auto': on for cuda"),
    seed=(1337, "random seed"),
)
DEFAULTS = defaults(SETTINGS)
ARCH_ONLY = {"gpt": ("bias",), "llama": ("n_kv_head", "ffn_hidden", "mlp", "subln", "rope_theta",
                                         "norm_eps", "tie_embeddings")}


def resolve(cfg):
    """Decide the settings derived from others (device, dtype, compile) and check the rest."""
    cfg["device"], cfg["dtype"] = resolve_device(cfg["device"], cfg["dtype"])
    if cfg["compile"] == "auto":
        cfg["compile"] = cfg["device"].startswith("cuda")
    if not isinstance(cfg["compile"], bool):
        raise ConfigError(f"compile wants True, False or 'auto', got {cfg['compile']!r}")
    if cfg["arch"] not in ARCH_ONLY:
        raise ConfigError(f"arch '{cfg['arch']}' is not one of {', '.join(ARCH_ONLY)}")
    foreign = [k for a, keys in ARCH_ONLY.items() if a != cfg["arch"] for k in keys
               if cfg[k] != DEFAULTS[k]]
    if foreign:
        raise ConfigError(f"{', '.join(sorted(foreign))}: not a setting of arch '{cfg['arch']}'; "
                          f"drop it or pick the arch it belongs to")
    for key, choices in (("lr_schedule", ("cosine", "two_stage", "wsd")),
                         ("optimizer", ("adamw", "muon")),
                         ("wd_schedule", ("constant", "two_stage")), ("mlp", ("swiglu", "relu2"))):
        if cfg[key] not in choices:
            raise ConfigError(f"{key} '{cfg[key]}' is not one of {', '.join(choices)}")
    if cfg["init_from"] not in ("scratch", "resume", *GPT2_NAMES):
        source = Path(cfg["init_from"])
        if not source.exists():
            raise ConfigError(f"init_from '{source}' is not 'scratch', 'resume', or the path of a "
                              f"checkpoint or transformers folder, or {', '.join(GPT2_NAMES)}")
        if source.resolve() == (Path(cfg["out_dir"]) / "ckpt.pt").resolve():
            raise ConfigError(f"init_from '{source}' is this run's own checkpoint, which it would "
                              f"overwrite: fine-tune into another --out_dir, or continue the run "
                              f"with --init_from=resume")
    teacher = cfg["distill_from"]
    if teacher and teacher not in GPT2_NAMES and not Path(teacher).exists():
        raise ConfigError(f"distill_from '{teacher}' is not the path of a checkpoint or "
                          f"transformers folder, or {', '.join(GPT2_NAMES)}")
    for key in ("n_layer", "n_head", "n_embd", "block_size", "batch_size", "eval_interval",
                "eval_iters", "log_interval", "gradient_accumulation_steps"):
        if cfg[key] < 1:
            raise ConfigError(f"{key} must be at least 1, got {cfg[key]}")
    for key, value in cfg.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{key} must be a finite number, got {value}")
    for key in ("max_iters", "max_time", "learning_rate", "min_lr", "bit_lr_scale", "weight_decay",
                "grad_clip", "warmup_iters", "lr_decay_iters", "n_kv_head", "ffn_hidden",
                "bit_warmup_iters", "bit_warmup_start", "distill_weight", "bit_group"):
        if cfg[key] < 0:
            raise ConfigError(f"{key} must be at least 0, got {cfg[key]}")
    for key in ("dropout", "beta1", "beta2"):
        if not 0 <= cfg[key] < 1:
            raise ConfigError(f"{key} must be in [0, 1), got {cfg[key]}")
    ternary_at = cfg["bit_warmup_start"] + cfg["bit_warmup_iters"]
    if cfg["bitlinear"] and cfg["max_iters"] and ternary_at > cfg["max_iters"]:
        raise ConfigError(f"the quantization warm-up ends at step {ternary_at} (bit_warmup_start "
                          f"+ bit_warmup_iters), after max_iters={cfg['max_iters']}: the model "
                          f"would never train as BitLinear; shorten the warm-up or train longer")
    if not 0 < cfg["wsd_decay"] <= 1:
        raise ConfigError(f"wsd_decay must be in (0, 1], got {cfg['wsd_decay']}")
    if cfg["fsdp"] and cfg["optimizer"] == "muon":
        raise ConfigError("optimizer='muon' orthogonalizes whole matrices and fsdp=True holds "
                          "shards of them: add --optimizer=adamw")
    for key in ("norm_eps", "rope_theta", "distill_temperature"):
        if cfg[key] <= 0:
            raise ConfigError(f"{key} must be positive, got {cfg[key]}")
    if cfg["n_embd"] % cfg["n_head"]:
        raise ConfigError(f"n_embd={cfg['n_embd']} is not divisible by n_head={cfg['n_head']}")
    if cfg["n_kv_head"] < 0 or cfg["n_kv_head"] and cfg["n_head"] % cfg["n_kv_head"]:
        raise ConfigError(f"n_kv_head={cfg['n_kv_head']} must divide n_head={cfg['n_head']} "
                          f"(0 means n_head)")
    if cfg["arch"] == "llama" and cfg["n_embd"] // cfg["n_head"] % 2:
        raise ConfigError(f"llama's head size n_embd/n_head={cfg['n_embd'] // cfg['n_head']} "
                          f"must be even (rotary embeddings turn pairs)")
    return cfg
