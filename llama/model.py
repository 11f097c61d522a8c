"""A LLaMA-style decoder whose attention and MLP linears are BitLinear (or nn.Linear).

BitNet b1.58 is a LLaMA-alike: RMSNorm, rotary position embeddings, a gated MLP, no biases. Read
like llama2.c's model.py. Options from the BitNet b1.58 2B4T report: a squared-ReLU gated MLP
(mlp='relu2') and sub-layer norms before the attention and MLP output projections (subln=True).
The embeddings, norms and the output head stay full precision.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from bitlinear.layer import RMSNorm, make_linear


@dataclass
class LlamaConfig:
    block_size: int = 256
    vocab_size: int = 50304
    n_layer: int = 6
    n_head: int = 6
    n_kv_head: int = 0  # key/value heads for grouped-query attention; 0 means n_head
    n_embd: int = 384
    ffn_hidden: int = 0  # MLP width; 0 means 8/3 * n_embd rounded up to a multiple of 64
    mlp: str = "swiglu"  # 'swiglu' (LLaMA) or 'relu2' (squared ReLU, BitNet b1.58 2B4T)
    subln: bool = False  # RMSNorm before wo and w2 (2B4T's sub-layer norms)
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False  # share the token embedding with the output head
    dropout: float = 0.0
    bitlinear: bool = True  # False builds the same model with nn.Linear (full precision)
    bit_norm: bool = False  # RMSNorm inside each BitLinear (the FAQ reference), see README
    bit_group: int = 0  # input weights per absmean scale; 0: one scale per matrix

    def __post_init__(self):
        self.n_kv_head = self.n_kv_head or self.n_head
        if not self.ffn_hidden:
            self.ffn_hidden = 64 * math.ceil(8 * self.n_embd / 3 / 64)
        if self.mlp not in ("swiglu", "relu2"):
            raise ValueError(f"mlp '{self.mlp}' is not 'swiglu' or 'relu2'")
        if self.n_embd % self.n_head or self.n_head % self.n_kv_head:
            raise ValueError(f"n_embd={self.n_embd}, n_head={self.n_head}, n_kv_head="
                             f"{self.n_kv_head}: n_head must divide n_embd, n_kv_head n_head")
        if (self.n_embd // self.n_head) % 2:
            raise ValueError(f"head size {self.n_embd // self.n_head} must be even for RoPE")


def precompute_rope(head_dim, length, theta=10000.0):
    """cos and sin of position * frequency, each (length, head_dim // 2)."""
    freqs = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(length, dtype=torch.float32), freqs)
    return angles.cos(), angles.sin()


def apply_rotary_emb(x, cos, sin):
    """Rotate x (B, nh, T, hs) by position: pairs (x[i], x[i + hs/2]) turn by angle pos * f_i.

    The "rotate half" pairing of GPT-NeoX, HuggingFace and llama.cpp, so exported weights need no
    permutation; cos, sin are (T, hs/2). The same as multiplying the complex numbers
    x[i] + 1j * x[i + hs/2] by exp(1j * pos * f_i).
    """
    x1, x2 = x.float().chunk(2, dim=-1)
    out = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.type_as(x)


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.n_head, self.n_kv_head = config.n_head, config.n_kv_head
        self.head_dim = config.n_embd // config.n_head
        linear = lambda i, o: make_linear(i, o, False, config.bitlinear, config.bit_norm,  # noqa: E731
                                          config.bit_group)
        self.wq = linear(config.n_embd, config.n_head * self.head_dim)
        self.wk = linear(config.n_embd, config.n_kv_head * self.head_dim)
        self.wv = linear(config.n_embd, config.n_kv_head * self.head_dim)
        self.sub_norm = RMSNorm(config.n_embd, config.norm_eps) if config.subln else None
        self.wo = linear(config.n_head * self.head_dim, config.n_embd)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.dropout = config.dropout

    def forward(self, x, cos, sin, cache=None):
        B, T, C = x.size()
        q = self.wq(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = self.wk(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, ..)
        v = self.wv(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        q, k = apply_rotary_emb(q, cos, sin), apply_rotary_emb(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v)  # (B, nkv, T_past + T, hs)
        if self.n_kv_head != self.n_head:  # each key/value head serves n_head/n_kv_head queries
            k = k.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
            v = v.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1,
                                           dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        if self.sub_norm is not None:
            y = self.sub_norm(y)
        return self.resid_dropout(self.wo(y))


class MLP(nn.Module):
    """Gated MLP: w2(act(w1 x) * w3 x), act = SiLU (SwiGLU) or squared ReLU."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        linear = lambda i, o: make_linear(i, o, False, config.bitlinear, config.bit_norm,  # noqa: E731
                                          config.bit_group)
        self.w1 = linear(config.n_embd, config.ffn_hidden)  # gate
        self.w3 = linear(config.n_embd, config.ffn_hidden)  # up
        self.sub_norm = RMSNorm(config.ffn_hidden, config.norm_eps) if config.subln else None
        self.w2 = linear(config.ffn_hidden, config.n_embd)  # down
        self.relu2 = config.mlp == "relu2"
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        gate = self.w1(x)
        gate = F.relu(gate).square() if self.relu2 else F.silu(gate)
        h = gate * self.w3(x)
        if self.sub_norm is not None:
            h = self.sub_norm(h)
        return self.dropout(self.w2(h))


class Block(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.attention_norm = RMSNorm(config.n_embd, config.norm_eps)
        self.attention = Attention(config)
        self.ffn_norm = RMSNorm(config.n_embd, config.norm_eps)
        self.feed_forward = MLP(config)

    def forward(self, x, cos, sin, cache=None):
        x = x + self.attention(self.attention_norm(x), cos, sin, cache)
        return x + self.feed_forward(self.ffn_norm(x))


class Llama(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.norm = RMSNorm(config.n_embd, config.norm_eps)
        self.output = nn.Linear(config.n_embd, config.vocab_size, bias=False)  # full precision
        if config.tie_embeddings:
            self.tok_embeddings.weight = self.output.weight
        cos, sin = precompute_rope(config.n_embd // config.n_head, config.block_size,
                                   config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)  # recomputed, not saved
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        # scaled init of the residual projections, as in GPT-2 and llama2.c
        for name, p in self.named_parameters():
            if name.endswith(("wo.weight", "w2.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def get_num_params(self, non_embedding=True):
        """Parameter count (tied embeddings count once). There are no position embeddings to
        subtract, so non_embedding changes nothing; it is there for GPT's signature."""
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx, targets=None, cache=None):
        """idx (B, T) token ids -> logits (B, T, vocab), or (B, 1, vocab) when no targets.
        cache: sample.py's KVCache, which holds the keys and values of the tokens before idx."""
        B, T = idx.size()
        start = cache.length if cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of length {start + T} is longer than block_size "
                             f"{self.config.block_size}")
        cos, sin = self.rope_cos[start:start + T], self.rope_sin[start:start + T]
        x = self.dropout(self.tok_embeddings(idx))
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, cache.layer(i) if cache is not None else None)
        x = self.norm(x)
        if targets is not None:
            logits = self.output(x)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1),
                                   ignore_index=-1)
            return logits, loss
        return self.output(x[:, [-1], :]), None  # inference: only the last position is needed

    def flops_per_token(self):
        """Training FLOPs per token (forward + backward), as in the PaLM appendix / nanoGPT:
        6 per weight that multiplies (the input embedding is a lookup), plus attention."""
        cfg = self.config
        n = self.get_num_params()
        if not cfg.tie_embeddings:
            n -= self.tok_embeddings.weight.numel()
        head_dim = cfg.n_embd // cfg.n_head
        return 6 * n + 12 * cfg.n_layer * cfg.n_head * head_dim * cfg.block_size
