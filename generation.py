"""Autoregressive sampling with a key/value cache, shared by every architecture.

A model takes part by accepting `cache=` in forward (calling `cache.layer(i).update(k, v)` in
layer i's attention) and returning the last position's logits when no targets are given.
"""

import torch


class LayerCache:
    """Keys and values of one attention layer, preallocated to the model's context length."""

    def __init__(self, parent):
        self.parent = parent
        self.k = self.v = None

    def update(self, k, v):
        """Append k, v (B, n_kv_head, T, head_size) and return everything cached so far."""
        start, end = self.parent.length, self.parent.length + k.size(2)
        if self.k is None:
            shape = (k.size(0), k.size(1), self.parent.max_length, k.size(3))
            self.k = k.new_empty(shape)
            self.v = v.new_empty(shape)
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class KVCache:
    """One LayerCache per layer; `length` counts the positions already cached."""

    def __init__(self, n_layer, max_length):
        self.max_length = max_length
        self.length = 0
        self.layers = [LayerCache(self) for _ in range(n_layer)]

    def layer(self, i):
        return self.layers[i]


def sample_next(logits, temperature=1.0, top_k=None, generator=None):
    """Pick the next token from (B, vocab) logits; temperature 0 means greedy (argmax)."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None and top_k < logits.size(-1):
        v, _ = torch.topk(logits, top_k)
        logits = logits.masked_fill(logits < v[:, [-1]], float("-inf"))
    probs = torch.softmax(logits.float(), dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)


@torch.no_grad()
def generate(model, idx, max_new_tokens, temperature=1.0, top_k=None, generator=None,
             use_cache=True):
    """Extend idx (B, T) by max_new_tokens sampled tokens.

    Once the text outgrows the context, the model sees only its last block_size tokens, as in
    nanoGPT; with the cache that means one fresh prefill of that window per token from there on,
    so cached and uncached generation give exactly the same tokens.
    """
    block_size = model.config.block_size
    cache = None
    for _ in range(max_new_tokens):
        if not use_cache or cache is None or cache.length + 1 > block_size:
            cache = KVCache(model.config.n_layer, block_size) if use_cache else None
            logits, _ = model(idx[:, -block_size:], cache=cache)
            if cache is not None:
                cache.length = min(idx.size(1), block_size)
        else:
            logits, _ = model(idx[:, -1:], cache=cache)
            cache.length += 1
        idx_next = sample_next(logits[:, -1, :], temperature, top_k, generator)
        idx = torch.cat((idx, idx_next), dim=1)
    return idx
