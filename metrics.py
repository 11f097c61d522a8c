"""What a run measures and where it goes: metrics.jsonl beside the checkpoint (always) and
Weights & Biases (wandb_log=True, optional)."""

import json
import re
from pathlib import Path

import torch

from configurator import ConfigError

# bf16 dense tensor-core peaks from the vendors' datasheets (the sparse figures halved), matched
# against torch.cuda.get_device_name() in this order: the first match wins
PEAK_FLOPS = [
    (r"H200", 989e12, "H200"),
    (r"H100.*PCIe", 756e12, "H100 PCIe"),
    (r"H100.*NVL", 835e12, "H100 NVL"),
    (r"H100", 989e12, "H100 SXM"),
    (r"B200", 2250e12, "B200"),
    (r"A100", 312e12, "A100"),
    (r"L40S", 362e12, "L40S"),
    (r"\bL4\b", 121e12, "L4"),
    (r"\bA10\b", 125e12, "A10"),
    (r"RTX 4090", 165e12, "RTX 4090"),
    (r"MI300X", 1307e12, "MI300X"),
]


def peak_flops(device, override=0.0):
    """(the device's peak FLOPS or None, where it came from), for model FLOPs utilization."""
    if override > 0:
        return override, "--peak_flops"
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(device)
        for pattern, flops, label in PEAK_FLOPS:
            if re.search(pattern, name):
                return flops, f"{label} bf16 dense, metrics.py's table"
        return None, f"'{name}' is not in metrics.py's table; give --peak_flops="
    return None, f"no peak is known for {device}; give --peak_flops="


class MetricsLog:
    """One JSON object a line in out_dir/metrics.jsonl; the same records to wandb when asked.

    Evaluations write {step, tokens, train_loss, val_loss, lr, time}; training logs write
    {step, tokens, loss, lr, tokens_per_sec, mfu} (mfu: None where the device's peak is
    unknown, as on CPUs). plot.py reads this file.
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
