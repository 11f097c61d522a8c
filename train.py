"""Train a BitNet b1.58 language model (or its full-precision twin): the one training loop.

    python train.py                                    # ternary GPT on shakespeare_char
    python train.py configs/train_shakespeare_char.py --device=cpu --bitlinear=False
    python train.py configs/llama_1m.py                # a LLaMA-style model
    torchrun --standalone --nproc_per_node=8 train.py configs/gpt2_124m.py
    python train.py --list_configs                     # the configs, their sizes and memory

Every key in settings.py can be set by a config file or --key=value (python train.py --help
lists them).
"""

import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from tqdm import tqdm

import distributed
from checkpoint import load_checkpoint, load_init_weights, model_from_checkpoint, save_checkpoint
from configurator import ConfigError, UserError, list_configs, run_cli
from data.loader import Data
from metrics import MetricsLog, peak_flops
from models import build_model, model_args
from settings import DEFAULTS, resolve


def decay_progress(it, cfg):
    """How far step it is from the end of warmup (0) to lr_decay_iters (1)."""
    ratio = (it - cfg["warmup_iters"]) / max(1, cfg["lr_decay_iters"] - cfg["warmup_iters"])
    return min(max(ratio, 0.0), 1.0)


def get_lr(it, cfg):
    """Linear warmup, then a decay from learning_rate to min_lr at lr_decay_iters: cosine, or
    the b1.58 training tips' two stages (their 1.5e-3 -> 8e-4 over the first half, then a drop
    to 5e-4 and a linear decay: here the same shape relative to learning_rate)."""
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
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * p)) * (lr - min_lr)


def get_weight_decay(it, cfg):
    """weight_decay, or with wd_schedule='two_stage' none from mid-decay on (b1.58 tips)."""
    if cfg["wd_schedule"] == "two_stage" and decay_progress(it, cfg) >= 0.5:
        return 0.0
    return cfg["weight_decay"]


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


class TrainingError(UserError):
    """Training cannot go on (a diverged loss); the message says what to try."""


def check_writable(folder):
    """Fail at the start, not at the first checkpoint hours later."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write_test{os.getpid()}"
        probe.write_bytes(b"x" * 4096)
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"out_dir '{folder}' is not writable ({e.strerror}); choose another "
                          f"--out_dir") from None


class Trainer:
    """One training run: model, optimizer and data, with evaluate / save / step / run."""

    def __init__(self, cfg):
        self.rank, _, self.world_size = distributed.setup(cfg)
        self.master = self.rank == 0
        self.cfg, self.device = cfg, cfg["device"]
        device_type = self.device.split(":")[0]
        torch.manual_seed(cfg["seed"])  # the same initial weights in every process (FSDP)
        self.out_dir = Path(cfg["out_dir"])
        self.data = Data(cfg, self.device, cfg["seed"], self.rank, self.world_size)
        ckpt = weights = None
        if cfg["init_from"] == "resume":
            ckpt = load_checkpoint(self.out_dir / "ckpt.pt", arch=cfg["arch"])
            cfg.update(ckpt["model_args"])  # the model's shape comes from the checkpoint
        elif cfg["init_from"] != "scratch":  # a fine-tuning run: weights, not optimizer state
            source, weights = load_init_weights(cfg["init_from"], cfg["arch"])
            source.pop("dropout", None)  # a training choice, not part of the weights
            cfg.update(source)
        self.args = model_args(cfg["arch"], cfg)
        vocab_size = self.data.meta["vocab_size"] if self.data.meta else 50304
        if cfg["init_from"] != "scratch" and cfg["vocab_size"] != vocab_size:
            raise ConfigError(f"the model's vocabulary ({cfg['vocab_size']}) is not dataset "
                              f"'{cfg['dataset']}''s ({vocab_size}); train it on data with its "
                              f"tokenizer")
        self.args["vocab_size"] = vocab_size
        if ckpt:
            self.raw_model = model_from_checkpoint(ckpt, self.out_dir / "ckpt.pt")
        else:
            self.raw_model = build_model(cfg["arch"], self.args)
        if weights:
            self.raw_model.load_state_dict(weights)
        self.raw_model.to(self.device)
        distributed.prepare(self.raw_model, cfg)  # FSDP shards it in place, before AdamW sees it
        torch.manual_seed(cfg["seed"] + self.rank)  # but different dropout in each
        ptdtype = getattr(torch, cfg["dtype"])
        self.ctx = (nullcontext() if ptdtype == torch.float32
                    else torch.autocast(device_type=device_type, dtype=ptdtype))
        self.scaler = torch.amp.GradScaler(device_type, enabled=cfg["dtype"] == "float16")
        self.optimizer = self.raw_model.configure_optimizers(
            cfg["weight_decay"], cfg["learning_rate"], (cfg["beta1"], cfg["beta2"]), device_type,
            cfg["bit_lr_scale"])
        self.decayed = [g for g in self.optimizer.param_groups if g["weight_decay"] > 0]
        self.iter_num, self.best_val_loss, self.elapsed_before = 0, float("inf"), 0.0
        if ckpt:
            distributed.load_optimizer_state(self.raw_model, self.optimizer, ckpt["optimizer"])
            self.scaler.load_state_dict(ckpt["scaler"])
            self.iter_num, self.best_val_loss = ckpt["iter_num"], ckpt["best_val_loss"]
            self.elapsed_before = ckpt["elapsed"]
            torch.set_rng_state(ckpt["rng"]["torch"])
            self.data.generator.set_state(ckpt["rng"]["data"])
        self.model = distributed.wrap(self.raw_model, cfg, self.world_size)
        self.peak_flops = peak_flops(self.device)[0]
        self.tokens_per_iter = (cfg["gradient_accumulation_steps"] * self.world_size
                                * cfg["batch_size"] * cfg["block_size"])

    def save(self, val_loss):
        """Write out_dir/ckpt.pt. Every process calls this (FSDP gathers the shards); the
        master writes."""
        model_state, optimizer_state = distributed.full_state(self.raw_model, self.optimizer,
                                                              self.cfg)
        if not self.master:
            return
        save_checkpoint({
            "arch": self.cfg["arch"], "model_args": self.args, "config": self.cfg,
            "model": model_state, "optimizer": optimizer_state,
            "scaler": self.scaler.state_dict(), "iter_num": self.iter_num,
            "best_val_loss": self.best_val_loss, "val_loss": val_loss, "meta": self.data.meta,
            "rng": {"torch": torch.get_rng_state(), "data": self.batch_state},
            "elapsed": self.elapsed(),
        }, self.out_dir / "ckpt.pt")

    def elapsed(self):
        """Seconds this run has trained (evaluations included), summed over its resumes."""
        return self.elapsed_before + time.time() - self.t_start

    def evaluate(self):
        """Estimate losses, log them, and save a checkpoint when due (on the master only).
        A stop signal abandons the evaluation (None) in a single process; with several, the
        processes must run the same forwards (collectives), so it waits for the end."""
        alone = self.world_size == 1
        losses = estimate_loss(self.model, self.data, self.cfg, self.ctx,
                               lambda: alone and self.stop.signal is not None)
        if losses is None:
            return None
        self.check_finite(losses["train"])
        if self.master:
            self.bar.write(f"step {self.iter_num}: train loss {losses['train']:.4f}, "
                           f"val loss {losses['val']:.4f}")
            bytes_per_token = self.data.val_bytes_per_token
            self.metrics.write({
                "step": self.iter_num, "tokens": self.iter_num * self.tokens_per_iter,
                "train_loss": losses["train"], "val_loss": losses["val"],
                "val_bpb": losses["val"] / math.log(2) / bytes_per_token if bytes_per_token
                else None, "lr": get_lr(self.iter_num, self.cfg), "time": self.elapsed()})
        improved = losses["val"] < self.best_val_loss
        self.best_val_loss = min(self.best_val_loss, losses["val"])
        if self.iter_num > 0 and (improved or self.cfg["always_save_checkpoint"]):
            self.save(losses["val"])
        return losses

    def next_batch(self):
        self.batch_state = self.data.generator.get_state()  # a resume redraws this same batch
        self.x, self.y = self.data.batch("train")

    def step(self):
        """One optimizer step over gradient_accumulation_steps micro-batches; returns the loss."""
        lr = get_lr(self.iter_num, self.cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
        for group in self.decayed:
            group["weight_decay"] = get_weight_decay(self.iter_num, self.cfg)
        accum = self.cfg["gradient_accumulation_steps"]
        for micro_step in range(accum):
            # reduce gradients across processes on the last micro-step only
            distributed.set_gradient_sync(self.model, self.cfg, micro_step == accum - 1)
            with self.ctx:
                _, loss = self.model(self.x, self.y)
                loss = loss / accum
            self.next_batch()  # fetch the next batch while the GPU works
            self.scaler.scale(loss).backward()
        if self.cfg["grad_clip"] > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg["grad_clip"])
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.iter_num += 1
        return loss, lr

    def log(self, loss, lr):
        """The training loss and speed since the last log, to the progress bar and metrics."""
        self.check_finite(loss)
        (t, it), now = self.mark, time.time()
        self.mark = (now, self.iter_num)
        tokens_per_sec = (self.iter_num - it) * self.tokens_per_iter / max(now - t, 1e-9)
        self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_sec:,.0f}")
        mfu = (self.raw_model.flops_per_token() * tokens_per_sec / self.peak_flops
               if self.peak_flops else None)
        self.metrics.write({"step": self.iter_num, "tokens": self.iter_num * self.tokens_per_iter,
                            "loss": loss, "lr": lr, "tokens_per_sec": tokens_per_sec,
                            "mfu": mfu})

    def check_finite(self, loss):
        """Stop on a NaN/inf loss before it reaches a checkpoint; the last good one stays."""
        if not math.isfinite(loss):
            raise TrainingError(f"the loss became {loss} at step {self.iter_num}; the checkpoint "
                                f"in {self.out_dir} is from before it. Try a lower learning_rate "
                                f"or grad_clip, and check the data")

    def run(self):
        """Train to max_iters (or a stop signal); returns the last {'train', 'val'} losses."""
        cfg, master = self.cfg, self.master
        if master:
            check_writable(self.out_dir)
            kind = "ternary (BitLinear)" if cfg["bitlinear"] else "float (nn.Linear)"
            print(f"{cfg['arch']} {kind}: {self.raw_model.get_num_params() / 1e6:.2f}M parameters;"
                  f" device {self.device}, dtype {cfg['dtype']}, compile {cfg['compile']}, "
                  f"{self.world_size} process(es)")
            self.metrics = MetricsLog(cfg, self.out_dir, append=self.iter_num > 0)
        self.t_start = time.time()
        self.mark = (self.t_start, self.iter_num)  # (time, step) of the last log, for tokens/s
        self.bar = tqdm(total=cfg["max_iters"], initial=self.iter_num, disable=not master,
                        dynamic_ncols=True, desc="train")
        self.next_batch()
        losses = None
        with StopFlag() as stop:
            self.stop = stop
            while True:
                abandoned = False  # an evaluation cut short by a signal: save below
                if self.iter_num % cfg["eval_interval"] == 0 or self.iter_num >= cfg["max_iters"]:
                    evaluated = self.evaluate()
                    abandoned, losses = evaluated is None, evaluated or losses
                    self.mark = (time.time(), self.iter_num)  # speed leaves evaluation out
                if (self.iter_num >= cfg["max_iters"] or cfg["eval_only"]) and not abandoned:
                    break
                out_of_time = 0 < cfg["max_time"] < time.time() - self.t_start
                if stop.signal or out_of_time:
                    self.save(losses["val"] if losses else float("nan"))
                    if master:
                        why = stop.signal or f"max_time={cfg['max_time']}s reached"
                        self.bar.write(f"{why}: saved {self.out_dir / 'ckpt.pt'} at step "
                                       f"{self.iter_num}; resume: the same command plus "
                                       f"--init_from=resume")
                    break
                loss, lr = self.step()
                self.bar.update(1)
                if self.iter_num % cfg["log_interval"] == 0 and master:
                    self.log(loss.item() * cfg["gradient_accumulation_steps"], lr)
        self.bar.close()
        if master:
            self.metrics.close()
            val = f"{losses['val']:.4f}" if losses else "not evaluated"
            print(f"done: {self.iter_num} steps in {time.time() - self.t_start:.1f}s; final val "
                  f"loss {val}; checkpoint {self.out_dir / 'ckpt.pt'}")
        if self.world_size > 1:  # all together: a rank that tears down early can hang the rest
            from torch.distributed import barrier, destroy_process_group
            barrier()
            destroy_process_group()
        return losses


def train(cfg):
    """Run the configured (and resolved) training; returns the final {'train', 'val'} losses."""
    return Trainer(cfg).run()


def main(argv=None, arch=None):
    """The command line: parse and check the config, then train. arch fixes the architecture."""
    def run(cfg):
        if arch is not None:
            if cfg["arch"] not in (arch, DEFAULTS["arch"]):
                raise ConfigError(f"this entry trains '{arch}' models; drop --arch={cfg['arch']}")
            cfg["arch"] = arch
        return train(resolve(cfg))
    if "--list_configs" in (sys.argv[1:] if argv is None else argv):
        print(list_configs(Path(__file__).parent / "configs"))
        return
    run_cli(DEFAULTS, run, "train.py", __doc__, argv)


if __name__ == "__main__":
    main()
