"""A GPT-2-style decoder whose attention and MLP linears are BitLinear (or nn.Linear).

Read like nanoGPT's model.py: LayerNorm, learned positions, causal self-attention, GELU MLP, tied
embeddings. The embeddings, norms and the output head stay full precision, as in BitNet b1.58.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from bitlinear.layer import make_linear


@dataclass
class GPTConfig:
    block_size: int = 256
    vocab_size: int = 50304  # GPT-2's 50257 padded to a multiple of 64
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    dropout: float = 0.0
    bias: bool = False  # biases in Linears and LayerNorms
    bitlinear: bool = True  # False builds the same model with nn.Linear (full precision)
    bit_norm: bool = False  # RMSNorm inside each BitLinear (the FAQ reference), see README
    bit_group: int = 0  # input weights per absmean scale; 0: one scale per matrix
    gelu_approximate: str = "none"  # 'tanh': the GELU GPT-2 was trained with (gpt/hf.py sets it)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        linear = lambda i, o: make_linear(i, o, config.bias, config.bitlinear, config.bit_norm,  # noqa: E731
                                          config.bit_group)
        self.c_attn = linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = linear(config.n_embd, config.n_embd)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.dropout = config.dropout

    def forward(self, x, cache=None):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if cache is not None:  # (B, nh, T_past + T, hs)
            k, v = cache.update(k, v)
        # a single new token attends to everything cached; a prompt attends causally
        causal = T > 1
        y = F.scaled_dot_product_attention(q, k, v, is_causal=causal,
                                           dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        linear = lambda i, o: make_linear(i, o, config.bias, config.bitlinear, config.bit_norm,  # noqa: E731
                                          config.bit_group)
        self.c_fc = linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = linear(4 * config.n_embd, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)
        if config.gelu_approximate not in ("none", "tanh"):
            raise ValueError(f"gelu_approximate '{config.gelu_approximate}' is not 'none' or "
                             f"'tanh'")
        self.approximate = config.gelu_approximate

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate=self.approximate)))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, cache=None):
        x = x + self.attn(self.ln_1(x), cache)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        assert config.vocab_size is not None and config.block_size is not None
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)  # full precision
        self.transformer.wte.weight = self.lm_head.weight  # weight tying
        self.apply(self._init_weights)
        # GPT-2's scaled init of the residual projections
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def get_num_params(self, non_embedding=True):
        """Parameter count; the position embeddings are subtracted by default, as in nanoGPT.

        The token embeddings count once: they are tied to (shared with) the output head.
        """
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wpe.weight.numel()
        return n

    def forward(self, idx, targets=None, cache=None):
        """idx (B, T) token ids -> logits (B, T, vocab), or (B, 1, vocab) when no targets.
        cache: sample.py's KVCache, which holds the keys and values of the tokens before idx."""
        B, T = idx.size()
        start = cache.length if cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of length {start + T} is longer than block_size "
                             f"{self.config.block_size}")
        pos = torch.arange(start, start + T, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for i, block in enumerate(self.transformer.h):
            x = block(x, cache.layer(i) if cache is not None else None)
        x = self.transformer.ln_f(x)
        if targets is not None:
            logits = self.lm_head(x)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1),
                                   ignore_index=-1)
            return logits, loss
        return self.lm_head(x[:, [-1], :]), None  # inference: only the last position is needed

    def flops_per_token(self):
        """Training FLOPs per token (forward + backward), as in the PaLM appendix / nanoGPT."""
        cfg = self.config
        L, H, Q, T = cfg.n_layer, cfg.n_head, cfg.n_embd // cfg.n_head, cfg.block_size
        return 6 * self.get_num_params() + 12 * L * H * Q * T
