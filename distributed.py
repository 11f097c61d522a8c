"""Training on several processes (torchrun): DDP, or FSDP2 for models too big for one GPU; and
activation checkpointing. train.py calls these; a single process needs none of them.

DDP keeps a full copy of the model, gradients and AdamW state on every GPU and averages the
gradients. FSDP (fully_shard) splits all three across the GPUs and gathers one block's weights
at a time, so the state of a 3B model (16 bytes a parameter, 57 GB) fits on 8 GPUs at 7 GB each.
"""

import os

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.utils.checkpoint import checkpoint

from configurator import ConfigError
from models import blocks


def setup(cfg):
    """Under torchrun: (rank, local_rank, world_size); (0, 0, 1) when not distributed."""
    if int(os.environ.get("RANK", -1)) == -1:
        return 0, 0, 1
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    if cfg["gradient_accumulation_steps"] % world_size:
        raise ConfigError(f"gradient_accumulation_steps={cfg['gradient_accumulation_steps']} does "
                          f"not divide across {world_size} processes; make it a multiple")
    from torch.distributed import init_process_group
    init_process_group(backend=cfg["backend"])
    if cfg["device"].startswith("cuda"):
        cfg["device"] = f"cuda:{local_rank}"
        torch.cuda.set_device(cfg["device"])
    cfg["gradient_accumulation_steps"] //= world_size
    return rank, local_rank, world_size


def checkpoint_activations(model):
    """Keep only each block's input for the backward and recompute the rest there: about a
    third more compute for a fraction of the activation memory. State dict names don't change."""
    for block in blocks(model):
        forward = block.forward
        block.forward = lambda *a, _f=forward, **kw: checkpoint(_f, *a, use_reentrant=False, **kw)


def shard(model):
    """FSDP2 in place: each block is one unit of gathering; the root holds embeddings and head."""
    from torch.distributed.fsdp import fully_shard
    for block in blocks(model):
        fully_shard(block)
    fully_shard(model)
    return model


def prepare(model, cfg):
    """Before the optimizer is made: activation checkpointing, and FSDP sharding in place."""
    if cfg["activation_checkpointing"]:
        checkpoint_activations(model)
    if cfg["fsdp"]:
        if not torch.distributed.is_initialized():
            raise ConfigError("fsdp=True shards across processes: start with torchrun "
                              "(README: Several GPUs)")
        if cfg["dtype"] == "float16":
            raise ConfigError("fsdp=True trains in bfloat16 or float32, not float16 (its gradient "
                              "scaler is not sharded); use --dtype=bfloat16")
        shard(model)


def wrap(model, cfg, world_size):
    """The model the training step calls: compiled, and under DDP when several processes
    train without FSDP."""
    model = torch.compile(model) if cfg["compile"] else model
    if world_size > 1 and not cfg["fsdp"]:
        from torch.nn.parallel import DistributedDataParallel as DDP
        device = cfg["device"]
        model = DDP(model, device_ids=[int(device.split(":")[1])] if "cuda:" in device else None)
    return model


def set_gradient_sync(model, cfg, sync):
    """Reduce gradients across processes only on the last micro-step of an optimizer step."""
    if cfg["fsdp"]:
        getattr(model, "_orig_mod", model).set_requires_gradient_sync(sync)
    elif hasattr(model, "require_backward_grad_sync"):
        model.require_backward_grad_sync = sync


def full_state(model, optimizer, cfg):
    """Model and optimizer state with whole (unsharded) tensors, on the CPU, for one ordinary
    checkpoint. Under FSDP every process must call this; rank 0 gets the state. The optimizer
    state is keyed by parameter name, so a checkpoint resumes with or without FSDP."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = (get_model_state_dict(model, options=options) if cfg["fsdp"]
                   else model.state_dict())
    return model_state, get_optimizer_state_dict(model, optimizer, options=options)


def load_optimizer_state(model, optimizer, state):
    """The inverse of full_state for the optimizer; the model loaded its weights before it was
    sharded (checkpoint.model_from_checkpoint)."""
    set_optimizer_state_dict(model, optimizer, state,
                             options=StateDictOptions(full_state_dict=True))
