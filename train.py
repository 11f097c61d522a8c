"""Train a BitNet b1.58 language model (or its full-precision twin): the one training loop.

    python train.py                                    # ternary GPT on shakespeare_char
    python train.py configs/train_shakespeare_char.py --device=cpu --bitlinear=False
    python train.py configs/llama_1m.py                # a LLaMA-style model
    torchrun --standalone --nproc_per_node=8 train.py configs/gpt2_124m.py
    python train.py --list_configs                     # the configs, their sizes and memory

Every setting (configs/__init__.py) can be set by a config file or --key=value
(python train.py --help lists them).
"""

import json
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.distributed.checkpoint import state_dict as dcp
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

from bitlinear.layer import BitLinear, frozen_weights, set_quantization
from bitlinear.muon import Muon
from common import (
    ConfigError,
    UserError,
    atomic_path,
    blocks,
    build_model,
    first_line,
    load_checkpoint,
    model_args,
    model_from_checkpoint,
    peak_flops,
    run_cli,
    save_checkpoint,
)
from configs import DEFAULTS, SETTINGS, resolve
from data.loader import Data, vocabulary_difference

GPT2_TOKENS = 50257  # GPT-2's vocabulary; its datasets record 50304, padded for speed
RESUME_KEYS = ("optimizer", "scaler", "iter_num", "best_val_loss", "elapsed", "rng")


class TrainingError(UserError):
    """A diverged loss; the message says what to try."""


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
    optimizers: list  # Muon and AdamW, or AdamW
    scaler: torch.amp.GradScaler
    ctx: object  # autocast, or nothing for float32
    teacher: object = None  # distill_from's (bitlinear/convert.py)
    iter_num: int = 0
    best_val_loss: float = float("inf")
    elapsed_before: float = 0.0  # seconds trained before a resume
    batch: tuple = None  # the next (x, y, data generator state before them)
    started: float = 0.0  # time.time() when train() took the run

    def elapsed(self):
        """Seconds trained, over every resume."""
        return self.elapsed_before + time.time() - self.started


# ---- the loop -------------------------------------------------------------------------------

def train(cfg, run=None):
    """Train to max_iters (or a stop signal or max_time); returns the last {'train', 'val'}
    losses. run: a start(cfg) to continue, else one is made here."""
    run = run or start(cfg)
    out_dir, warmup = Path(cfg["out_dir"]), cfg["bit_warmup_start"] or cfg["bit_warmup_iters"]
    with StopFlag() as stop, claim(out_dir) if run.rank == 0 else nullcontext():
        log, losses = Log(run), None
        run.batch = next_batch(run)
        while True:
            if warmup:  # the strength follows the step alone, so a resumed run follows it too
                set_quantization(run.raw_model, quantization_strength(run.iter_num, cfg))
            # evaluate and checkpoint; a signal cuts an evaluation short in a single process
            # (several must run the same forwards, for their collectives)
            evaluated = True
            if run.iter_num % cfg["eval_interval"] == 0 or run.iter_num >= cfg["max_iters"]:
                evaluated = estimate_loss(run.model, run.data, cfg, run.ctx, lambda: (
                    run.world_size == 1 and stop.signal is not None))
                if evaluated:
                    losses = evaluated
                    check_finite(losses["train"], run)
                    log.evaluation(losses)
                    improved = losses["val"] < run.best_val_loss
                    run.best_val_loss = min(run.best_val_loss, losses["val"])
                    if run.iter_num > 0 and (improved or cfg["always_save_checkpoint"]):
                        save(run, losses["val"])
            if (run.iter_num >= cfg["max_iters"] or cfg["eval_only"]) and evaluated:
                break
            if stop.signal or 0 < cfg["max_time"] < time.time() - run.started:
                save(run, losses["val"] if losses else float("nan"))
                why = stop.signal or f"max_time={cfg['max_time']}s reached"
                log.note(f"{why}: saved {out_dir / 'ckpt.pt'} at step {run.iter_num}; resume: "
                         f"the same command plus --init_from=resume")
                break
            # forward, backward, update
            loss, lr = train_step(run)
            # log
            log.step(loss, lr)
        log.close(losses)
    if run.world_size > 1:  # all together: a rank that tears down early can hang the rest
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return losses


def train_step(run):
    """One optimizer step over gradient_accumulation_steps micro-batches, the first one
    run.batch; returns (the last micro-batch's loss, lr) and leaves the next batch in run.batch."""
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
        elif run.world_size > 1:
            run.model.require_backward_grad_sync = sync
        x, y, _ = run.batch
        with run.ctx:
            logits, loss = run.model(x, y)
            if run.teacher is not None:
                loss = loss + run.teacher.loss(x, y, logits)
            loss = loss / accum
        run.batch = next_batch(run)  # fetch the next batch while the GPU works
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
    return loss, lr


def next_batch(run):
    """(x, y, the data generator's state before them): a checkpoint stores that state, so a
    resumed run draws this same batch next."""
    state = run.data.generator.get_state()
    return (*run.data.batch("train"), state)


@torch.no_grad()
def estimate_loss(model, data, cfg, ctx, stop=lambda: False, splits=("train", "val")):
    """Mean loss over eval_iters batches per split; the same batches at every evaluation.
    Returns None, unfinished, as soon as stop() is true (a signal should not wait for it)."""
    out = {}
    model.eval()
    # FSDP holds shards outside a forward: its BitLinear layers quantize in their forwards
    with nullcontext() if cfg["fsdp"] else frozen_weights(model):
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


# ---- the learning rate, the optimizers ------------------------------------------------------

def get_lr(it, cfg):
    """Linear warmup, then a decay to min_lr at lr_decay_iters: cosine, the b1.58 training tips'
    two stages (relative to learning_rate), or warmup-stable-decay."""
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


def decay_progress(it, cfg):
    """How far step it is from the end of warmup (0) to lr_decay_iters (1)."""
    ratio = (it - cfg["warmup_iters"]) / max(1, cfg["lr_decay_iters"] - cfg["warmup_iters"])
    return min(max(ratio, 0.0), 1.0)


def get_weight_decay(it, cfg):
    """weight_decay, or with wd_schedule='two_stage' none from mid-decay on (b1.58 tips)."""
    if cfg["wd_schedule"] == "two_stage" and decay_progress(it, cfg) >= 0.5:
        return 0.0
    return cfg["weight_decay"]


def quantization_strength(it, cfg):
    """BitLinear's quantization strength at step it (set_quantization): 0, a float forward, for
    bit_warmup_start steps; then rising linearly to 1, BitLinear exactly, over bit_warmup_iters."""
    if it < cfg["bit_warmup_start"]:
        return 0.0
    return min(1.0, (it - cfg["bit_warmup_start"]) / cfg["bit_warmup_iters"]) \
        if cfg["bit_warmup_iters"] else 1.0


def configure_optimizers(model, cfg, device_type):
    """[Muon, AdamW]: Muon for the blocks' linear weights, AdamW (fused on CUDA) for the rest;
    with optimizer='adamw', [AdamW]. Each group's lr_scale multiplies the schedule's rate."""
    bit = {id(m.weight) for m in model.modules() if isinstance(m, BitLinear)}
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    params = [p for p in model.parameters() if p.requires_grad]
    matrix = lambda p: p.dim() >= 2 and id(p) not in embeddings  # noqa: E731
    groups = [  # "decay": the groups whose weight decay wd_schedule sets
        # a ternary weight changes only when its latent weight crosses a rounding threshold, so
        # the BitLinear weights learn at a higher rate than float weights
        {"params": [p for p in params if id(p) in bit], "lr_scale": cfg["bit_lr_scale"],
         "decay": cfg["bit_decay"]},
        # the other matrices decay; norms, biases and embeddings do not
        {"params": [p for p in params if id(p) not in bit and matrix(p)], "lr_scale": 1.0,
         "decay": True},
        {"params": [p for p in params if id(p) not in bit and not matrix(p)], "lr_scale": 1.0,
         "decay": False},
    ]
    groups = [dict(g, weight_decay=cfg["weight_decay"] if g["decay"] else 0.0)
              for g in groups if g["params"]]
    adamw = lambda groups: torch.optim.AdamW(  # noqa: E731
        groups, lr=cfg["learning_rate"], betas=(cfg["beta1"], cfg["beta2"]),
        fused=True if device_type == "cuda" else None)
    if cfg["optimizer"] == "adamw":
        return [adamw(groups)]
    in_blocks = {id(m.weight) for m in blocks(model).modules()
                 if isinstance(m, torch.nn.Linear)}  # BitLinear, or their float twins
    split = lambda muon: [g for g in (dict(g, params=[p for p in g["params"]  # noqa: E731
                                                      if (id(p) in in_blocks) == muon])
                                      for g in groups) if g["params"]]
    # torch's Muon orthogonalizes in bfloat16, slow on CPUs: there the same update in float32
    muon = torch.optim.Muon if device_type == "cuda" else Muon
    # the "match_rms_adamw" step size: the learning rates tuned for AdamW carry over
    return [muon(split(True), lr=cfg["learning_rate"], momentum=0.95,
                 adjust_lr_fn="match_rms_adamw"), adamw(split(False))]


# ---- the run's state: made, saved, resumed --------------------------------------------------

def start(cfg):
    """Everything a run needs: a new model, one from init_from's weights, or the one out_dir's
    checkpoint resumes, with its optimizers and data."""
    rank, world_size = setup_processes(cfg)
    device_type = cfg["device"].split(":")[0]
    torch.manual_seed(cfg["seed"])  # the same initial weights in every process (FSDP)
    data = Data(cfg, cfg["device"], cfg["seed"], rank, world_size)
    ckpt_path = Path(cfg["out_dir"]) / "ckpt.pt"
    ckpt = weights = source_meta = None
    if cfg["init_from"] == "resume":
        ckpt = load_checkpoint(ckpt_path, arch=cfg["arch"], needs=RESUME_KEYS)
        trained = ckpt["model_args"].get("block_size", cfg["block_size"])
        if cfg["block_size"] > trained:
            raise ConfigError(f"block_size={cfg['block_size']} is longer than the {trained} "
                              f"positions of {ckpt_path}'s model; resume with --block_size="
                              f"{trained}")
        cfg.update(ckpt["model_args"])  # the model's shape comes from the checkpoint
        source_meta = ckpt.get("meta")
    elif cfg["init_from"] != "scratch":  # seam: start from another model's weights
        from bitlinear.convert import init_weights
        weights, source_meta = init_weights(cfg, rank)
    vocab_size = data.vocab_size
    if ckpt or weights:
        vocab_size = check_vocabulary(cfg, data, source_meta)
    check_out_dir(cfg, ckpt_path)
    args = dict(model_args(cfg["arch"], cfg), vocab_size=vocab_size)
    if ckpt or weights:
        model = model_from_checkpoint(ckpt or dict(arch=cfg["arch"], model_args=args,
                                                   model=weights),
                                      ckpt_path if ckpt else cfg["init_from"])
    else:
        try:
            model = build_model(cfg["arch"], args)
        except ValueError as e:  # a shape the model refuses
            raise ConfigError(first_line(e)) from None
    model.to(cfg["device"])
    wrapped = prepare_model(model, cfg, world_size)  # FSDP shards in place, before AdamW
    torch.manual_seed(cfg["seed"] + rank)  # but different dropout in each process
    ptdtype = getattr(torch, cfg["dtype"])
    run = Run(cfg, rank, world_size, data, args, model, wrapped,
              configure_optimizers(model, cfg, device_type),
              torch.amp.GradScaler(device_type, enabled=cfg["dtype"] == "float16"),
              nullcontext() if ptdtype == torch.float32
              else torch.autocast(device_type=device_type, dtype=ptdtype))
    if cfg["distill_from"]:  # seam: a teacher's logits join the loss
        from bitlinear.convert import Teacher
        run.teacher = Teacher(cfg, args)
    if ckpt:
        dcp.set_optimizer_state_dict(model, run.optimizers, ckpt["optimizer"],
                                     options=dcp.StateDictOptions(full_state_dict=True))
        run.scaler.load_state_dict(ckpt["scaler"])
        run.iter_num, run.best_val_loss = ckpt["iter_num"], ckpt["best_val_loss"]
        run.elapsed_before = ckpt["elapsed"]
        torch.set_rng_state(ckpt["rng"]["torch"])
        data.generator.set_state(ckpt["rng"]["data"])
    return run


def check_vocabulary(cfg, data, source_meta):
    """The vocabulary size of a trained model (cfg's) that reads the data's tokens, or OpenAI's
    unpadded GPT-2's; a ConfigError when its tokens are not the data's."""
    gpt2 = cfg["vocab_size"] == GPT2_TOKENS and (data.meta or {}).get("tokenizer") == "gpt2"
    source = "out_dir's checkpoint" if cfg["init_from"] == "resume" else cfg["init_from"]
    if cfg["vocab_size"] != data.vocab_size and not gpt2:
        raise ConfigError(f"the model's vocabulary ({cfg['vocab_size']}) is not dataset "
                          f"'{cfg['dataset']}''s ({data.vocab_size}); train it on data with its "
                          f"tokenizer")
    differ = vocabulary_difference(source_meta, data.meta)
    if differ:
        raise ConfigError(f"{source}'s tokens are not dataset '{cfg['dataset']}''s ({differ}); "
                          f"train it on data prepared with its tokenizer")
    return cfg["vocab_size"]


def check_out_dir(cfg, ckpt_path):
    """A new run replaces no other run's checkpoint or log without --overwrite=True."""
    if cfg["init_from"] == "resume" or cfg["overwrite"]:
        return
    if ckpt_path.exists():
        raise ConfigError(f"out_dir '{cfg['out_dir']}' holds another run's checkpoint; continue "
                          f"it with --init_from=resume, choose another --out_dir, or replace it "
                          f"with --overwrite=True")
    if (ckpt_path.parent / "metrics.jsonl").exists():
        raise ConfigError(f"out_dir '{cfg['out_dir']}' holds another run's metrics.jsonl (and "
                          f"no ckpt.pt to resume); choose another --out_dir, or replace it with "
                          f"--overwrite=True")


def save(run, val_loss):
    """out_dir/ckpt.pt: every process calls it (FSDP gathers the shards), the master writes it.
    Its optimizer state is keyed by parameter name, so it resumes with or without FSDP."""
    options = dcp.StateDictOptions(full_state_dict=True, cpu_offload=True)
    cfg = run.cfg
    model_state = (dcp.get_model_state_dict(run.raw_model, options=options) if cfg["fsdp"]
                   else run.raw_model.state_dict())
    optimizer_state = dcp.get_optimizer_state_dict(run.raw_model, run.optimizers, options=options)
    if run.rank == 0:
        save_checkpoint({
            "arch": cfg["arch"], "model_args": run.args, "config": cfg,
            "model": model_state, "optimizer": optimizer_state,
            "scaler": run.scaler.state_dict(),
            "iter_num": run.iter_num, "best_val_loss": run.best_val_loss,
            "val_loss": val_loss, "meta": run.data.meta,
            "elapsed": run.elapsed(),
            "rng": {"torch": torch.get_rng_state(), "data": run.batch[2]},
        }, Path(cfg["out_dir"]) / "ckpt.pt")


def check_finite(loss, run):
    """Stop on a NaN/inf loss before it reaches a checkpoint; the last good one stays."""
    if not math.isfinite(loss):
        ckpt = Path(run.cfg["out_dir"]) / "ckpt.pt"
        kept = f"the checkpoint {ckpt} is from before it" if ckpt.exists() else \
            "no checkpoint was written"
        raise TrainingError(f"the loss became {loss} at step {run.iter_num}; {kept}. Try a lower "
                            f"learning_rate or grad_clip, and check the data")


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
    for block in blocks(model):
        forward = block.forward
        block.forward = lambda *a, _f=forward, **kw: checkpoint(_f, *a, use_reentrant=False, **kw)


def prepare_model(model, cfg, world_size):
    """Activation checkpointing and FSDP sharding (in place, before the optimizer sees the
    weights); returns the model the step calls: compiled, and under DDP when several processes
    train without FSDP."""
    if cfg["activation_checkpointing"]:
        checkpoint_activations(model)
    if cfg["fsdp"]:
        if not torch.distributed.is_initialized():
            raise ConfigError("fsdp=True shards across processes: start with torchrun "
                              "(README: Several GPUs)")
        if cfg["dtype"] == "float16":
            raise ConfigError("fsdp=True trains in bfloat16 or float32, not float16 (its gradient "
                              "scaler is not sharded); use --dtype=bfloat16")
        from torch.distributed.fsdp import fully_shard  # seam: sharding
        for block in blocks(model):  # one unit of gathering each; the root keeps the rest
            fully_shard(block)
        fully_shard(model)
    wrapped = torch.compile(model) if cfg["compile"] else model
    if world_size > 1 and not cfg["fsdp"]:
        device = cfg["device"]
        wrapped = DDP(wrapped, device_ids=[int(device.split(":")[1])] if "cuda:" in device
                      else None)
    return wrapped


# ---- reports, signals, the out_dir -------------------------------------------------------------

class Log:
    """What a run reports, from rank 0: a progress bar, and one JSON object a line in
    out_dir/metrics.jsonl (evaluations: step, tokens, train_loss, val_loss, val_bpb, lr, time;
    logs: step, tokens, loss, lr, tokens_per_sec, mfu), also sent to Weights & Biases with
    wandb_log=True."""

    def __init__(self, run):
        cfg, self.run, self.master, self.file, self.wandb = run.cfg, run, run.rank == 0, None, None
        self.tokens_per_iter = (cfg["gradient_accumulation_steps"] * run.world_size
                                * cfg["batch_size"] * cfg["block_size"])
        self.peak = peak_flops(cfg["device"])[0]
        if self.master:
            kind = "ternary (BitLinear)" if cfg["bitlinear"] else "float (nn.Linear)"
            print(f"{cfg['arch']} {kind}: {run.raw_model.get_num_params() / 1e6:.2f}M "
                  f"parameters; device {cfg['device']}, dtype {cfg['dtype']}, compile "
                  f"{cfg['compile']}, {run.world_size} process(es)")
            self.open(cfg, resume_step=run.iter_num or None)
        run.started = time.time()
        self.mark = (run.started, run.iter_num)  # (time, step) of the last log, for tokens/s
        self.bar = tqdm(total=cfg["max_iters"], initial=run.iter_num, disable=not self.master,
                        dynamic_ncols=True, desc="train")

    def open(self, cfg, resume_step):
        """metrics.jsonl: new, or for a resumed run cut back to its checkpoint's step."""
        if cfg["wandb_log"]:  # seam: Weights & Biases
            try:
                import wandb
            except ImportError:
                raise ConfigError("wandb_log=True needs the 'wandb' package: pip install wandb "
                                  "(WANDB_MODE=offline works without an account)") from None
            self.wandb = wandb.init(project=cfg["wandb_project"], name=cfg["wandb_run_name"],
                                    config=cfg)
        path = Path(cfg["out_dir"]) / "metrics.jsonl"
        if resume_step is not None and path.exists():
            keep_until(path, resume_step, cfg["eval_interval"])
        self.file = open(path, "a" if resume_step is not None else "w")

    def evaluation(self, losses):
        run, bytes_per_token = self.run, self.run.data.val_bytes_per_token
        self.note(f"step {run.iter_num}: train loss {losses['train']:.4f}, val loss "
                  f"{losses['val']:.4f}")
        self.write({"step": run.iter_num, "tokens": run.iter_num * self.tokens_per_iter,
                    "train_loss": losses["train"], "val_loss": losses["val"],
                    "val_bpb": losses["val"] / math.log(2) / bytes_per_token
                    if bytes_per_token else None,
                    "lr": get_lr(run.iter_num, run.cfg), "time": run.elapsed()})
        self.mark = (time.time(), run.iter_num)  # speed leaves evaluation out

    def step(self, loss, lr):
        run, cfg = self.run, self.run.cfg
        self.bar.update(1)
        if run.iter_num % cfg["log_interval"] or not self.master:
            return
        loss = loss.item() * cfg["gradient_accumulation_steps"]
        check_finite(loss, run)
        (t, it), now = self.mark, time.time()
        self.mark = (now, run.iter_num)
        tokens_per_sec = (run.iter_num - it) * self.tokens_per_iter / max(now - t, 1e-9)
        self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_sec:,.0f}")
        mfu = run.raw_model.flops_per_token() * tokens_per_sec / self.peak if self.peak else None
        self.write({"step": run.iter_num, "tokens": run.iter_num * self.tokens_per_iter,
                    "loss": loss, "lr": lr, "tokens_per_sec": tokens_per_sec, "mfu": mfu})

    def note(self, text):
        if self.master:
            self.bar.write(text)

    def write(self, record):
        if not self.master:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()  # a crash loses nothing already logged
        if self.wandb is not None:
            self.wandb.log(record, step=record["step"])

    def close(self, losses):
        self.bar.close()
        if not self.master:
            return
        self.file.close()
        if self.wandb is not None:
            self.wandb.finish()
        ckpt = Path(self.run.cfg["out_dir"]) / "ckpt.pt"
        val = f"{losses['val']:.4f}" if losses else "not evaluated"
        print(f"done: {self.run.iter_num} steps in {time.time() - self.run.started:.1f}s; final "
              f"val loss {val}; " + (f"checkpoint {ckpt}" if ckpt.exists() else "no checkpoint"))


def keep_until(path, step, eval_interval):
    """Cut the log of a resumed run back to its checkpoint: a line torn by a crash and the
    records after the checkpoint's step go (those steps run again), and so does the evaluation
    at that step if the resumed run makes it again."""
    keep = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # torn by a crash, or a stray line: not a record, and the later ones stay
        if not isinstance(record, dict) or type(record.get("step")) is not int:
            continue
        if record["step"] < step or record["step"] == step and (
                "val_loss" not in record or step % eval_interval):
            keep.append(line + "\n")
    with atomic_path(path) as tmp:
        tmp.write_text("".join(keep))


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
        import fcntl  # not on Windows: no lock there
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except ImportError:
        pass
    except OSError:
        lock.close()
        raise ConfigError(f"out_dir '{folder}' is in use by another run; wait for it to end or "
                          f"choose another --out_dir") from None
    for stale in folder.glob(".ckpt.pt.tmp*"):  # left by a run killed while saving
        stale.unlink(missing_ok=True)
    return lock


def main(argv=None, arch=None):
    """The command line: parse and check the config, then train. arch fixes the architecture."""
    def run(cfg):
        if arch is not None:
            if cfg["arch"] not in (arch, DEFAULTS["arch"]):
                raise ConfigError(f"this entry trains '{arch}' models; drop --arch={cfg['arch']}")
            cfg["arch"] = arch
        return train(resolve(cfg))
    if "--list_configs" in (sys.argv[1:] if argv is None else argv):
        from configs.table import config_table  # seam: builds every config's model
        print(config_table())
        return
    run_cli(SETTINGS, run, "train.py", __doc__, argv)


if __name__ == "__main__":
    main()
