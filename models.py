"""The architectures train.py and sample.py can build, by name."""

import dataclasses

import gpt.model
import llama.model

ARCHS = {"gpt": (gpt.model.GPT, gpt.model.GPTConfig),
         "llama": (llama.model.Llama, llama.model.LlamaConfig)}


def blocks(model):
    """The model's transformer blocks, in order: the units of FSDP and of recomputation."""
    return [m for m in model.modules() if isinstance(m, (gpt.model.Block, llama.model.Block))]


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


def saved_activations(model, batch_size):
    """Bytes autograd keeps for the backward of one (batch_size, block_size) micro-batch:
    (total, [bytes kept inside each block]). Run it on a meta-device model: nothing is
    allocated. Each storage counts once; parameters don't count. Attention counts what flash
    attention keeps (q, k, v, output, log-sum-exp), not a T x T matrix."""
    from unittest import mock

    import torch
    import torch.nn.functional as F

    def flash(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, **kw):
        return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, dropout_p,
                                                                  is_causal)[0]

    params = {p.untyped_storage()._cdata for p in model.parameters()}
    saved, owner, current = {}, {}, [None]

    def pack(t):
        storage = t.untyped_storage()
        if storage._cdata not in params and storage._cdata not in saved:
            saved[storage._cdata], owner[storage._cdata] = storage.nbytes(), current[0]
        return t

    for i, block in enumerate(blocks(model)):
        block.register_forward_pre_hook(lambda m, a, i=i: current.__setitem__(0, i))
        block.register_forward_hook(lambda m, a, out: current.__setitem__(0, None))
    idx = torch.zeros(batch_size, model.config.block_size, dtype=torch.long,
                      device=next(model.parameters()).device)
    with (torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
          mock.patch.object(F, "scaled_dot_product_attention", flash)):
        model(idx, idx)
    per_block = [sum(b for k, b in saved.items() if owner[k] == i)
                 for i in range(len(blocks(model)))]
    return sum(saved.values()), per_block


def training_memory(arch, args, batch_size, dtype="bfloat16", shards=1,
                    activation_checkpointing=False):
    """Estimated bytes one process needs to train the model, counted on the meta device:

    - float32 weights, gradients and AdamW's two moments: 16 bytes a parameter, and under
      autocast its 16-bit copy of each weight: 2 more; all divided by `shards` under FSDP,
      which then holds two whole blocks at a time (the one running and the next, prefetched);
    - the activations kept for the backward (saved_activations), in dtype; with activation
      checkpointing only each block's input, plus one block's activations while it recomputes;
    - a float32 logits-sized gradient.
    """
    import torch
    with torch.device("meta"):
        model = build_model(arch, args).to(getattr(torch, dtype))
    n = sum(p.numel() for p in model.parameters())
    state = (16 + (0 if dtype == "float32" else 2)) * n
    if shards > 1:
        biggest = max(sum(p.numel() for p in b.parameters()) for b in blocks(model))
        state = state / shards + 2 * 4 * biggest
    acts, per_block = saved_activations(model, batch_size)
    B, T, C = batch_size, model.config.block_size, model.config.n_embd
    if activation_checkpointing:
        block_input = B * T * C * torch.finfo(getattr(torch, dtype)).bits // 8
        acts += len(per_block) * block_input - sum(per_block) + max(per_block)
    return int(state + acts + 4 * B * T * model.config.vocab_size)
