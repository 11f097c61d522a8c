"""Time the training step (forward + backward + optimizer) of ternary and float models.

    python bench.py                                    # the default shape, ternary vs float
    python bench.py configs/train_shakespeare_char.py --device=cpu --batch_size=12 --block_size=64 \
        --n_layer=4 --n_head=4 --n_embd=128 --dropout=0.0 --bench_steps=100

Both models run in this process on the same batches, alternating in rounds so that drift in the
machine's speed hits both alike; the median step time of each is reported, and their ratio.
Keys are train.py's, plus bench_steps, bench_warmup and bench_rounds.
"""

import statistics
import tempfile
import time

import torch

from configurator import run_cli
from train import DEFAULTS as TRAIN_DEFAULTS
from train import Trainer, resolve

DEFAULTS = dict(TRAIN_DEFAULTS, bench_steps=50, bench_warmup=10, bench_rounds=4)


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_steps(trainer, n):
    """Seconds per optimizer step, one sample per step."""
    times = []
    for _ in range(n):
        t = time.perf_counter()
        loss, _ = trainer.step()
        sync(trainer.device)
        times.append(time.perf_counter() - t)
    loss.item()
    return times


def bench(cfg):
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, bitlinear in (("ternary", True), ("float", False)):
            trainer = Trainer(dict(cfg, bitlinear=bitlinear, out_dir=tmp))
            trainer.next_batch()
            time_steps(trainer, cfg["bench_warmup"])
            runs[name] = (trainer, [])
        per_round = max(1, cfg["bench_steps"] // cfg["bench_rounds"])
        for _ in range(cfg["bench_rounds"]):
            for trainer, times in runs.values():
                times += time_steps(trainer, per_round)
    tokens = cfg["batch_size"] * cfg["block_size"] * cfg["gradient_accumulation_steps"]
    result = {}
    for name, (trainer, times) in runs.items():
        ms = statistics.median(times) * 1e3
        result[name] = ms
        print(f"{name:8s} {trainer.raw_model.get_num_params() / 1e6:7.2f}M params  "
              f"{ms:8.2f} ms/step  {tokens / ms * 1e3:10,.0f} tokens/s")
    print(f"ternary/float step time: {result['ternary'] / result['float']:.3f}x "
          f"(device {cfg['device']}, {torch.get_num_threads()} threads, median of "
          f"{len(runs['float'][1])} steps each)")
    return result


def main(argv=None):
    run_cli(DEFAULTS, lambda cfg: bench(resolve(cfg)), "bench.py", __doc__, argv)


if __name__ == "__main__":
    main()
