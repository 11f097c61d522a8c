"""Train a BitNet b1.58 language model (or its full-precision twin): the one training loop.

    python train.py                                    # ternary GPT on shakespeare_char
    python train.py configs/train_shakespeare_char.py --device=cpu --bitlinear=False
    python train.py configs/llama_1m.py                # a LLaMA-style model
    torchrun --standalone --nproc_per_node=8 train.py configs/gpt2_124m.py
    python train.py --list_configs                     # the configs, their sizes and memory

Every setting (configs/__init__.py) can be set by a config file or --key=value
(python train.py --help lists them).
"""

import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from bitlinear import set_quantization
from common import (
    ConfigError,
    UserError,
    atomic_path,
    build_model,
    first_line,
    load_checkpoint,
    load_init_weights,
    load_model,
    model_args,
    model_from_checkpoint,
    peak_flops,
    run_cli,
    save_checkpoint,
)
from configs import DEFAULTS, SETTINGS, resolve
from data.loader import Data

GPT2_TOKENS = 50257  # GPT-2's vocabulary; its datasets record 50304, padded for speed

# ---- schedules, the optimizer, distillation ------------------------------------------------

def decay_progress(it, cfg):
    """How far step it is from the end of warmup (0) to lr_decay_iters (1)."""
    ratio = (it - cfg["warmup_iters"]) / max(1, cfg["lr_decay_iters"] - cfg["warmup_iters"])
    return min(max(ratio, 0.0), 1.0)


def get_lr(it, cfg):
    """Linear warmup, then a decay from learning_rate to min_lr at lr_decay_iters: cosine, the
    b1.58 training tips' two stages (their 1.5e-3 -> 8e-4 over the first half, then a drop to
    5e-4 and a linear decay: here the same shape relative to learning_rate), or
    warmup-stable-decay."""
    lr, min_lr = cfg["learning_rate"], cfg["min_lr"]
    if not cfg["decay_lr"]:
        return lr
    if it < cfg["warmup_iters"]:
        return lr * (it + 1) / (cfg["warmup_iters"] + 1)
    p = decay_progress(it, cfg)
    if cfg["lr_schedule"] == "two_stage":
        if p < 0.5:
            return lr * (1 - (7 / 15) * p / 0.5)
        return min_lr + (lr / 3 - min_lr) * (1 - p) / 0.5
    if cfg["lr_schedule"] == "wsd":  # constant, then a linear decay over the last wsd_decay
        return min_lr + (lr - min_lr) * min(1.0, (1 - p) / cfg["wsd_decay"])
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * p)) * (lr - min_lr)


def get_weight_decay(it, cfg):
    """weight_decay, or with wd_schedule='two_stage' none from mid-decay on (b1.58 tips)."""
    if cfg["wd_schedule"] == "two_stage" and decay_progress(it, cfg) >= 0.5:
        return 0.0
    return cfg["weight_decay"]


def quantization_strength(it, cfg):
    """BitLinear's quantization strength at step it (bitlinear.set_quantization): 0, a float
    forward, for bit_warmup_start steps; then rising linearly to 1, BitLinear exactly, over
    bit_warmup_iters."""
    if it < cfg["bit_warmup_start"]:
        return 0.0
    return min(1.0, (it - cfg["bit_warmup_start"]) / cfg["bit_warmup_iters"]) \
        if cfg["bit_warmup_iters"] else 1.0


def distill_loss(logits, teacher_logits, temperature):
    """KL(teacher || student) of the distributions softened by the temperature, per token, times
    T^2 so that its gradients keep their scale as T changes (Hinton et al., 2015)."""
    student = F.log_softmax(logits.float() / temperature, dim=-1).flatten(0, -2)
    teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1).flatten(0, -2)
    return F.kl_div(student, teacher, log_target=True, reduction="batchmean") * temperature ** 2


def configure_optimizers(model, cfg, device_type):
    """[AdamW] (fused on CUDA), or with optimizer='muon' [Muon, AdamW]: Muon for the blocks'
    linear weights, AdamW for the rest. Weight decay on the linear layers (on BitLinear latent
    weights only with bit_decay), not on norms, biases or embeddings. BitLinear latent weights
    train at learning_rate * bit_lr_scale: a ternary weight changes only when its latent weight
    crosses a rounding threshold, so it learns slower than a float weight at the same rate. Each
    group's lr_scale multiplies the schedule's rate."""
    from bitlinear import BitLinear
    from common import blocks
    bit = {id(m.weight) for m in model.modules() if isinstance(m, BitLinear)}
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    matrices = {id(m.weight) for b in blocks(model) for m in b.modules()
                if isinstance(m, torch.nn.Linear)}  # BitLinear, or their float twins
    params = [p for p in model.parameters() if p.requires_grad]
    decayed = lambda p: p.dim() >= 2 and id(p) not in embeddings  # noqa: E731
    groups = [  # "decay": the groups whose weight decay wd_schedule sets
        {"params": [p for p in params if id(p) in bit], "lr_scale": cfg["bit_lr_scale"],
         "decay": cfg["bit_decay"]},
        {"params": [p for p in params if id(p) not in bit and decayed(p)], "lr_scale": 1.0,
         "decay": True},
        {"params": [p for p in params if id(p) not in bit and not decayed(p)], "lr_scale": 1.0,
         "decay": False},
    ]
    groups = [dict(g, weight_decay=cfg["weight_decay"] if g["decay"] else 0.0)
              for g in groups if g["params"]]
    adamw = lambda groups: torch.optim.AdamW(  # noqa: E731
        groups, lr=cfg["learning_rate"], betas=(cfg["beta1"], cfg["beta2"]),
        fused=True if device_type == "cuda" else None)
    if cfg["optimizer"] == "adamw":
        return [adamw(groups)]
    split = lambda g, muon: dict(g, params=[p for p in g["params"]  # noqa: E731
                                            if (id(p) in matrices) == muon])
    muon_groups = [g for g in (split(g, True) for g in groups) if g["params"]]
    # the "match_rms_adamw" step size: the learning rates tuned for AdamW carry over
    return [torch.optim.Muon(muon_groups, lr=cfg["learning_rate"], momentum=0.95,
                             adjust_lr_fn="match_rms_adamw"),
            adamw([g for g in (split(g, False) for g in groups) if g["params"]])]


# ---- several processes (torchrun): DDP, or FSDP2 for models too big for one GPU -------------

def setup_processes(cfg):
    """Under torchrun: (rank, world_size) after joining the process group; else (0, 1)."""
    if int(os.environ.get("RANK", -1)) == -1:
        return 0, 1
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    world_size, accum = int(os.environ["WORLD_SIZE"]), cfg["gradient_accumulation_steps"]
    if accum < world_size:  # fewer than the processes: one micro-batch each
        if rank == 0:
            print(f"note: gradient_accumulation_steps={accum} on {world_size} processes: one "
                  f"micro-batch each, {world_size} a step")
        cfg["gradient_accumulation_steps"] = accum = world_size
    if accum % world_size:
        raise ConfigError(f"gradient_accumulation_steps={accum} does not divide across "
                          f"{world_size} processes; make it a multiple of {world_size}")
    backend = cfg["backend"]
    if backend == "auto":
        backend = "nccl" if cfg["device"].startswith("cuda") else "gloo"
    torch.distributed.init_process_group(backend=backend)
    if cfg["device"].startswith("cuda"):
        cfg["device"] = f"cuda:{local_rank}"
        torch.cuda.set_device(cfg["device"])
    cfg["gradient_accumulation_steps"] //= world_size
    return rank, world_size


def checkpoint_activations(model):
    """Keep only each block's input for the backward and recompute the rest there: about a
    third more compute for a fraction of the activation memory. State dict names don't change."""
    from torch.utils.checkpoint import checkpoint

    from common import blocks
    for block in blocks(model):
        forward = block.forward
        block.forward = lambda *a, _f=forward, **kw: checkpoint(_f, *a, use_reentrant=False, **kw)


def prepare_model(model, cfg, world_size):
    """Activation checkpointing and FSDP sharding (in place, before the optimizer sees the
    weights); returns the model the step calls: compiled, and under DDP when several processes
    train without FSDP."""
    from common import blocks
    if cfg["activation_checkpointing"]:
        checkpoint_activations(model)
    if cfg["fsdp"]:
        if not torch.distributed.is_initialized():
            raise ConfigError("fsdp=True shards across processes: start with torchrun "
                              "(README: Several GPUs)")
        if cfg["dtype"] == "float16":
            raise ConfigError("fsdp=True trains in bfloat16 or float32, not float16 (its gradient "
                              "scaler is not sharded); use --dtype=bfloat16")
        from torch.distributed.fsdp import fully_shard
        for block in blocks(model):  # one unit of gathering each; the root keeps the rest
            fully_shard(block)
        fully_shard(model)
    wrapped = torch.compile(model) if cfg["compile"] else model
    if world_size > 1 and not cfg["fsdp"]:
        from torch.nn.parallel import DistributedDataParallel as DDP
        device = cfg["device"]
        wrapped = DDP(wrapped, device_ids=[int(device.split(":")[1])] if "cuda:" in device
                      else None)
    return wrapped


def full_state(model, optimizers, cfg):
    """Whole (unsharded) model and optimizer state on the CPU, the optimizers' keyed by
    parameter name, so a checkpoint resumes with or without FSDP. Every process must call it."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = (get_model_state_dict(model, options=options) if cfg["fsdp"]
                   else model.state_dict())
    return model_state, get_optimizer_state_dict(model, optimizers, options=options)


# ---- the run --------------------------------------------------------------------------------

class TrainingError(UserError):
    """Training cannot go on (a diverged loss); the message says what to try."""


@dataclass
class Run:
    """What a training run holds; start() makes it."""
    cfg: dict
    rank: int
    world_size: int
    data: Data
    args: dict  # the model's constructor arguments, saved in the checkpoint
    raw_model: torch.nn.Module
    model: torch.nn.Module  # the one the step calls: compiled, DDP-wrapped
    optimizers: list  # AdamW, or Muon and AdamW
    scaler: torch.amp.GradScaler
    ctx: object  # autocast, or nothing for float32
    teacher: torch.nn.Module | None = None  # distill_from's model
    iter_num: int = 0
    best_val_loss: float = float("inf")
    elapsed_before: float = 0.0  # seconds trained before a resume


def start(cfg):
    """Everything a run needs, from scratch or from the checkpoint it resumes."""
    rank, world_size = setup_processes(cfg)
    device_type = cfg["device"].split(":")[0]
    torch.manual_seed(cfg["seed"])  # the same initial weights in every process (FSDP)
    data = Data(cfg, cfg["device"], cfg["seed"], rank, world_size)
    ckpt = weights = None
    if cfg["init_from"] == "resume":
        ckpt = load_checkpoint(Path(cfg["out_dir"]) / "ckpt.pt", arch=cfg["arch"])
        cfg.update(ckpt["model_args"])  # the model's shape comes from the checkpoint
    elif cfg["init_from"] != "scratch":  # a fine-tuning run: weights, not optimizer state
        source, weights = load_init_weights(cfg["init_from"], cfg["arch"])
        source.pop("dropout", None)  # a training choice, not part of the weights
        was_ternary = source.pop("bitlinear", cfg["bitlinear"])  # the run's --bitlinear decides
        if was_ternary != cfg["bitlinear"] and rank == 0:
            kind = lambda ternary: "ternary" if ternary else "float"  # noqa: E731
            print(f"note: converting {cfg['init_from']}'s {kind(was_ternary)} weights into a "
                  f"{kind(cfg['bitlinear'])} model (--bitlinear={cfg['bitlinear']})")
        positions = source.pop("block_size")  # the run's context, at most the source's
        if "transformer.wpe.weight" in weights:  # learned positions: keep the first block_size
            if cfg["block_size"] > positions:
                raise ConfigError(f"block_size={cfg['block_size']} is longer than "
                                  f"{cfg['init_from']}'s {positions} positions: lower it")
            if cfg["block_size"] < positions and rank == 0:
                print(f"note: the first {cfg['block_size']} of {cfg['init_from']}'s {positions} "
                      f"positions (--block_size sets how many)")
            weights["transformer.wpe.weight"] = weights["transformer.wpe.weight"][
                :cfg["block_size"]]
        cfg.update(source)
    vocab_size = data.meta["vocab_size"] if data.meta else 50304
    if cfg["init_from"] != "scratch" and cfg["vocab_size"] == GPT2_TOKENS and (
            data.meta or {}).get("tokenizer") == "gpt2":
        vocab_size = GPT2_TOKENS  # OpenAI's GPT-2, unpadded: every GPT-2 id fits
    if cfg["init_from"] != "scratch" and cfg["vocab_size"] != vocab_size:
        raise ConfigError(f"the model's vocabulary ({cfg['vocab_size']}) is not dataset "
                          f"'{cfg['dataset']}''s ({vocab_size}); train it on data with its "
                          f"tokenizer")
    existing = Path(cfg["out_dir"]) / "ckpt.pt"
    if cfg["init_from"] != "resume" and existing.exists() and not cfg["overwrite"]:
        raise ConfigError(f"out_dir '{cfg['out_dir']}' holds another run's checkpoint; continue "
                          f"it with --init_from=resume, choose another --out_dir, or replace it "
                          f"with --overwrite=True")
    args = dict(model_args(cfg["arch"], cfg), vocab_size=vocab_size)
    if ckpt:
        model = model_from_checkpoint(ckpt, Path(cfg["out_dir"]) / "ckpt.pt")
    else:
        try:
            model = build_model(cfg["arch"], args)
        except ValueError as e:  # a shape the model refuses
            raise ConfigError(first_line(e)) from None
    if weights:
        model.load_state_dict(weights)
    model.to(cfg["device"])
    wrapped = prepare_model(model, cfg, world_size)  # FSDP shards in place, before AdamW
    torch.manual_seed(cfg["seed"] + rank)  # but different dropout in each process
    ptdtype = getattr(torch, cfg["dtype"])
    run = Run(cfg, rank, world_size, data, args, model, wrapped,
              configure_optimizers(model, cfg, device_type),
              torch.amp.GradScaler(device_type, enabled=cfg["dtype"] == "float16"),
              nullcontext() if ptdtype == torch.float32
              else torch.autocast(device_type=device_type, dtype=ptdtype))
    if cfg["distill_from"]:
        teacher = load_teacher(cfg["distill_from"], args, cfg["device"])
        run.teacher = torch.compile(teacher) if cfg["compile"] else teacher
    if ckpt:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_optimizer_state_dict,
        )
        set_optimizer_state_dict(model, run.optimizers, ckpt["optimizer"],
                                 options=StateDictOptions(full_state_dict=True))
        run.scaler.load_state_dict(ckpt["scaler"])
        run.iter_num, run.best_val_loss = ckpt["iter_num"], ckpt["best_val_loss"]
        run.elapsed_before = ckpt["elapsed"]
        torch.set_rng_state(ckpt["rng"]["torch"])
        data.generator.set_state(ckpt["rng"]["data"])
    return run


def load_teacher(path, student_args, device):
    """distill_from's model, frozen: a checkpoint (.pt or .bitnet), a transformers folder or a
    GPT-2 name. It must predict the student's vocabulary over the student's context."""
    if Path(path).is_file():
        teacher, _ = load_model(path)
    else:
        from gpt.hf import GPT2_NAMES
        from llama.hf_import import read_config
        config = Path(path) / "config.json"
        gpt2 = path in GPT2_NAMES or config.is_file() and read_config(path).get(
            "model_type") == "gpt2"
        arch = "gpt" if gpt2 else "llama"
        args, state = load_init_weights(path, arch)
        teacher = build_model(arch, args)
        teacher.load_state_dict(state)
    config = teacher.config  # the student's vocabulary may be the teacher's padded (GPT-2)
    if not 0 <= student_args["vocab_size"] - config.vocab_size < 64:
        raise ConfigError(f"the teacher {path} predicts {config.vocab_size} tokens, the student "
                          f"{student_args['vocab_size']}: distill from a model of the same "
                          f"tokenizer and vocabulary")
    if config.block_size < student_args["block_size"]:
        raise ConfigError(f"the teacher {path} reads at most {config.block_size} tokens, the "
                          f"student's block_size is {student_args['block_size']}: lower it")
    return teacher.to(device).eval().requires_grad_(False)


def next_batch(run):
    """(x, y, the data generator's state before them): a checkpoint stores that state, so a
    resumed run draws this same batch next."""
    state = run.data.generator.get_state()
    return (*run.data.batch("train"), state)


def train_step(run, batch):
    """One optimizer step over gradient_accumulation_steps micro-batches, the first one `batch`;
    returns (the last micro-batch's loss, lr, the batch to start the next step with)."""
    cfg, optimizers = run.cfg, run.optimizers
    lr = get_lr(run.iter_num, cfg)
    for group in (g for opt in optimizers for g in opt.param_groups):
        group["lr"] = lr * group["lr_scale"]
        if group["decay"]:
            group["weight_decay"] = get_weight_decay(run.iter_num, cfg)
    accum = cfg["gradient_accumulation_steps"]
    for micro_step in range(accum):
        sync = micro_step == accum - 1  # reduce gradients across processes on the last only
        if cfg["fsdp"]:
            getattr(run.model, "_orig_mod", run.model).set_requires_gradient_sync(sync)
        elif hasattr(run.model, "require_backward_grad_sync"):
            run.model.require_backward_grad_sync = sync
        x, y, _ = batch
        with run.ctx:
            logits, loss = run.model(x, y)
            if run.teacher is not None:
                with torch.no_grad():
                    teacher_logits, _ = run.teacher(x, y)
                loss = loss + cfg["distill_weight"] * distill_loss(
                    logits[..., :teacher_logits.size(-1)], teacher_logits,
                    cfg["distill_temperature"])
            loss = loss / accum
        batch = next_batch(run)  # fetch the next batch while the GPU works
        run.scaler.scale(loss).backward()
    if cfg["grad_clip"] > 0:
        for opt in optimizers:
            run.scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg["grad_clip"])
    for opt in optimizers:
        run.scaler.step(opt)
    run.scaler.update()
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    run.iter_num += 1
    return loss, lr, batch


# ---- evaluation, logs, signals --------------------------------------------------------------

@torch.no_grad()
def estimate_loss(model, data, cfg, ctx, stop=lambda: False, splits=("train", "val")):
    """Mean loss over eval_iters batches per split; the same batches at every evaluation.
    Returns None, unfinished, as soon as stop() is true (a signal should not wait for it)."""
    out = {}
    model.eval()
    for split in splits:
        gen = torch.Generator().manual_seed(cfg["seed"] + 1)
        losses = torch.zeros(cfg["eval_iters"])
        for k in range(cfg["eval_iters"]):
            if stop():
                model.train()
                return None
            x, y = data.batch(split, gen)
            with ctx:
                _, loss = model(x, y)
            losses[k] = loss.item()
        out[split] = losses.mean().item()
    model.train()
    return out


class MetricsLog:
    """One JSON object a line in out_dir/metrics.jsonl (evaluations: step, tokens, train_loss,
    val_loss, val_bpb, lr, time; logs: step, tokens, loss, lr, tokens_per_sec, mfu), and the
    same records to Weights & Biases with wandb_log=True."""

    def __init__(self, cfg, resume_step=None):
        self.wandb = None
        if cfg["wandb_log"]:
            try:
                import wandb
            except ImportError:
                raise ConfigError("wandb_log=True needs the 'wandb' package: pip install wandb "
                                  "(WANDB_MODE=offline works without an account)") from None
            self.wandb = wandb.init(project=cfg["wandb_project"], name=cfg["wandb_run_name"],
                                    config=cfg)
        path = Path(cfg["out_dir"]) / "metrics.jsonl"
        if resume_step is not None and path.exists():
            self.keep_until(path, resume_step, cfg["eval_interval"])
        self.file = open(path, "a" if resume_step is not None else "w")

    @staticmethod
    def keep_until(path, step, eval_interval):
        """Cut the log of a resumed run back to its checkpoint: a line torn by a crash and the
        records after the checkpoint's step go (those steps run again), and so does the
        evaluation at that step if the resumed run makes it again."""
        import json
        keep = []
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                break
            if record["step"] < step or record["step"] == step and (
                    "val_loss" not in record or step % eval_interval):
                keep.append(line + "\n")
        with atomic_path(path) as tmp:
            tmp.write_text("".join(keep))

    def write(self, record):
        import json
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()  # a crash loses nothing already logged
        if self.wandb is not None:
            self.wandb.log(record, step=record["step"])

    def close(self):
        self.file.close()
        if self.wandb is not None:
            self.wandb.finish()


class StopFlag:
    """Set by SIGINT/SIGTERM; the loop checks it between steps, saves, and exits cleanly."""

    def __enter__(self):
        self.signal = None
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def handle(self, signum, frame):
        self.signal = signal.Signals(signum).name


def claim(folder):
    """Make out_dir and check it is writable (fail at the start, not at the first checkpoint
    hours later), and lock it for this run: a second run into it is refused while this one
    lives; the lock goes with the process, however it ends. Returns the lock's file."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write_test{os.getpid()}"
        probe.write_bytes(b"x" * 4096)
        probe.unlink()
        lock = open(folder / ".lock", "a")
    except OSError as e:
        raise ConfigError(f"out_dir '{folder}' is not writable ({e.strerror}); choose another "
                          f"--out_dir") from None
    try:
        import fcntl
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except ImportError:  # no flock (Windows): no lock
        pass
    except OSError:
        lock.close()
        raise ConfigError(f"out_dir '{folder}' is in use by another run; wait for it to end or "
                          f"choose another --out_dir") from None
    for stale in folder.glob(".ckpt.pt.tmp*"):  # left by a run killed while saving
        stale.unlink(missing_ok=True)
    return lock


# ---- the loop -------------------------------------------------------------------------------

def train(cfg, run=None):
    """Train to max_iters (or a stop signal or max_time); returns the last {'train', 'val'}
    losses. run: a start(cfg) to continue, else one is made here."""
    run = run or start(cfg)
    master, alone, out_dir = run.rank == 0, run.world_size == 1, Path(cfg["out_dir"])
    with StopFlag() as stop, claim(out_dir) if master else nullcontext():
        tokens_per_iter = (cfg["gradient_accumulation_steps"] * run.world_size * cfg["batch_size"]
                           * cfg["block_size"])
        peak = peak_flops(cfg["device"])[0]
        if master:
            kind = "ternary (BitLinear)" if cfg["bitlinear"] else "float (nn.Linear)"
            print(f"{cfg['arch']} {kind}: {run.raw_model.get_num_params() / 1e6:.2f}M parameters; "
                  f"device {cfg['device']}, dtype {cfg['dtype']}, compile {cfg['compile']}, "
                  f"{run.world_size} process(es)")
            metrics = MetricsLog(cfg, resume_step=run.iter_num if run.iter_num > 0 else None)
        t_start = time.time()
        elapsed = lambda: run.elapsed_before + time.time() - t_start  # noqa: E731
        mark = (t_start, run.iter_num)  # (time, step) of the last log, for tokens/s
        bar = tqdm(total=cfg["max_iters"], initial=run.iter_num, disable=not master,
                   dynamic_ncols=True, desc="train")

        def save(val_loss):
            """out_dir/ckpt.pt: every process calls it (FSDP gathers the shards), the master
            writes it."""
            model_state, optimizer_state = full_state(run.raw_model, run.optimizers, cfg)
            if master:
                save_checkpoint({
                    "arch": cfg["arch"], "model_args": run.args, "config": cfg,
                    "model": model_state, "optimizer": optimizer_state,
                    "scaler": run.scaler.state_dict(),
                    "iter_num": run.iter_num, "best_val_loss": run.best_val_loss,
                    "val_loss": val_loss, "meta": run.data.meta, "elapsed": elapsed(),
                    "rng": {"torch": torch.get_rng_state(), "data": batch[2]},
                }, out_dir / "ckpt.pt")

        def check_finite(loss):
            """Stop on a NaN/inf loss before it reaches a checkpoint; the last good one stays."""
            if not math.isfinite(loss):
                kept = (f"the checkpoint {out_dir / 'ckpt.pt'} is from before it" if
                        (out_dir / "ckpt.pt").exists() else "no checkpoint was written")
                raise TrainingError(f"the loss became {loss} at step {run.iter_num}; {kept}. "
                                    f"Try a lower learning_rate or grad_clip, and check the data")

        batch, losses = next_batch(run), None
        warmup = cfg["bit_warmup_start"] or cfg["bit_warmup_iters"]
        while True:
            if warmup:  # the strength follows the step alone, so a resumed run follows it too
                set_quantization(run.raw_model, quantization_strength(run.iter_num, cfg))
            # evaluate and checkpoint; a signal cuts an evaluation short in a single process
            # (several must run the same forwards, for their collectives)
            abandoned = False
            if run.iter_num % cfg["eval_interval"] == 0 or run.iter_num >= cfg["max_iters"]:
                evaluated = estimate_loss(run.model, run.data, cfg, run.ctx,
                                          lambda: alone and stop.signal is not None)
                abandoned = evaluated is None
                if not abandoned:
                    losses = evaluated
                    check_finite(losses["train"])
                    if master:
                        bar.write(f"step {run.iter_num}: train loss {losses['train']:.4f}, "
                                  f"val loss {losses['val']:.4f}")
                        bytes_per_token = run.data.val_bytes_per_token
                        metrics.write({
                            "step": run.iter_num, "tokens": run.iter_num * tokens_per_iter,
                            "train_loss": losses["train"], "val_loss": losses["val"],
                            "val_bpb": losses["val"] / math.log(2) / bytes_per_token
                            if bytes_per_token else None,
                            "lr": get_lr(run.iter_num, cfg), "time": elapsed()})
                    improved = losses["val"] < run.best_val_loss
                    run.best_val_loss = min(run.best_val_loss, losses["val"])
                    if run.iter_num > 0 and (improved or cfg["always_save_checkpoint"]):
                        save(losses["val"])
                mark = (time.time(), run.iter_num)  # speed leaves evaluation out
            if (run.iter_num >= cfg["max_iters"] or cfg["eval_only"]) and not abandoned:
                break
            out_of_time = 0 < cfg["max_time"] < time.time() - t_start
            if stop.signal or out_of_time:
                save(losses["val"] if losses else float("nan"))
                if master:
                    why = stop.signal or f"max_time={cfg['max_time']}s reached"
                    bar.write(f"{why}: saved {out_dir / 'ckpt.pt'} at step {run.iter_num}; "
                              f"resume: the same command plus --init_from=resume")
                break
            # step
            loss, lr, batch = train_step(run, batch)
            bar.update(1)
            # log
            if run.iter_num % cfg["log_interval"] == 0 and master:
                loss = loss.item() * cfg["gradient_accumulation_steps"]
                check_finite(loss)
                (t, it), now = mark, time.time()
                mark = (now, run.iter_num)
                tokens_per_sec = (run.iter_num - it) * tokens_per_iter / max(now - t, 1e-9)
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_sec:,.0f}")
                mfu = (run.raw_model.flops_per_token() * tokens_per_sec / peak if peak else None)
                metrics.write({"step": run.iter_num, "tokens": run.iter_num * tokens_per_iter,
                               "loss": loss, "lr": lr, "tokens_per_sec": tokens_per_sec,
                               "mfu": mfu})
        bar.close()
        if master:
            metrics.close()
            val = f"{losses['val']:.4f}" if losses else "not evaluated"
            ckpt = out_dir / "ckpt.pt"
            print(f"done: {run.iter_num} steps in {time.time() - t_start:.1f}s; final val loss "
                  f"{val}; " + (f"checkpoint {ckpt}" if ckpt.exists() else "no checkpoint"))
        if run.world_size > 1:  # all together: a rank that tears down early can hang the rest
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()
        return losses


def main(argv=None, arch=None):
    """The command line: parse and check the config, then train. arch fixes the architecture."""
    def run(cfg):
        if arch is not None:
            if cfg["arch"] not in (arch, DEFAULTS["arch"]):
                raise ConfigError(f"this entry trains '{arch}' models; drop --arch={cfg['arch']}")
            cfg["arch"] = arch
        return train(resolve(cfg))
    if "--list_configs" in (sys.argv[1:] if argv is None else argv):
        from bench import config_table
        print(config_table())
        return
    run_cli(SETTINGS, run, "train.py", __doc__, argv)


if __name__ == "__main__":
    main()
