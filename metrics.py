"""What a run measures and where it goes: metrics.jsonl beside the checkpoint (always) and
Weights & Biases (wandb_log=True, optional)."""

import json
from pathlib import Path

from configurator import ConfigError


class MetricsLog:
    """One JSON object a line in out_dir/metrics.jsonl; the same records to wandb when asked.

    Evaluations write {step, tokens, train_loss, val_loss, lr, time}; training logs write
    {step, tokens, loss, lr, tokens_per_sec, mfu}. plot.py reads this file.
    """

    def __init__(self, cfg, out_dir, append=False):
        self.wandb = None
        if cfg["wandb_log"]:
            try:
                import wandb
            except ImportError:
                raise ConfigError("wandb_log=True needs the 'wandb' package: pip install wandb "
                                  "(WANDB_MODE=offline works without an account)") from None
            self.wandb = wandb.init(project=cfg["wandb_project"], name=cfg["wandb_run_name"],
                                    config=cfg)
        self.file = open(Path(out_dir) / "metrics.jsonl", "a" if append else "w")

    def write(self, record):
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()  # a crash loses nothing already logged
        if self.wandb is not None:
            self.wandb.log(record, step=record["step"])

    def close(self):
        self.file.close()
        if self.wandb is not None:
            self.wandb.finish()


def read_metrics(path):
    """The records of a metrics.jsonl file (or of out_dir/metrics.jsonl), in order."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
