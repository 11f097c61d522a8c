"""The architectures train.py and sample.py can build, by name."""

import dataclasses

from gpt.model import GPT, GPTConfig
from llama.model import Llama, LlamaConfig

ARCHS = {"gpt": (GPT, GPTConfig), "llama": (Llama, LlamaConfig)}


def arch_keys(arch):
    """The config keys that arch's model takes."""
    return {f.name for f in dataclasses.fields(ARCHS[arch][1])}


def model_args(arch, config):
    """The model's constructor arguments, taken from a full training config."""
    return {k: config[k] for k in arch_keys(arch) if k in config}


def build_model(arch, args):
    if arch not in ARCHS:
        raise ValueError(f"unknown arch '{arch}'; choose one of {sorted(ARCHS)}")
    model_cls, config_cls = ARCHS[arch]
    return model_cls(config_cls(**args))


def training_memory(arch, args, batch_size, dtype="bfloat16"):
    """Bytes one process needs to train the model without sharding: float32 weights, their
    gradients and AdamW's two moments (16 bytes a parameter), plus the activations autograd
    keeps for the backward of one micro-batch and one float32 logits-sized gradient.

    The activations are counted, not guessed: the model is built on the meta device (no memory
    used), its parameters cast to dtype (what autocast computes in), and a forward pass records
    the storage of every tensor saved for the backward, once each. Attention is counted as
    flash attention keeps it (q, k, v, output and log-sum-exp), not as a T x T matrix.
    """
    from unittest import mock

    import torch
    import torch.nn.functional as F

    def flash(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, **kw):
        return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, dropout_p,
                                                                  is_causal)[0]

    with torch.device("meta"):
        model = build_model(arch, args).to(getattr(torch, dtype))
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage._cdata not in params:
            saved[storage._cdata] = storage.nbytes()
        return t

    idx = torch.zeros(batch_size, model.config.block_size, dtype=torch.long, device="meta")
    with (torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
          mock.patch.object(F, "scaled_dot_product_attention", flash)):
        model(idx, idx)
    n = sum(p.numel() for p in model.parameters())
    autocast_copies = 0 if dtype == "float32" else 2 * n  # 16-bit weights cached by autocast
    logits_grad = 4 * batch_size * model.config.block_size * model.config.vocab_size
    return 16 * n + autocast_copies + sum(saved.values()) + logits_grad
