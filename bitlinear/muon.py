"""Muon (Jordan et al., 2024) with its Newton-Schulz iteration in float32, for CPUs.

torch.optim.Muon orthogonalizes each update in bfloat16, which is fast on GPUs and slow on CPUs
without bfloat16 matrix units. This is the same optimizer (the same state, groups and update:
nesterov momentum, five quintic Newton-Schulz steps, decoupled weight decay, the learning rate
adjusted for the matrix's shape) with the iteration in float32. train.py picks it where the
device is a CPU; a checkpoint of either resumes with the other.
"""

import math

import torch


def newton_schulz(g, coefficients, steps, eps, dtype=torch.float32):
    """An approximately orthogonal matrix with g's singular vectors: U S' V^T with S' near 1."""
    a, b, c = coefficients
    x = g.to(dtype)
    tall = g.size(0) > g.size(1)
    if tall:
        x = x.T  # iterate on the smaller Gram matrix
    x = x / x.norm().clamp(min=eps)  # spectral norm at most 1
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


def adjusted_lr(lr, adjust_lr_fn, shape):
    """The step size for a matrix of this shape: "match_rms_adamw" gives the update AdamW's RMS,
    so that rates tuned for AdamW carry over; "original" is Muon's own."""
    rows, cols = shape[:2]
    if adjust_lr_fn == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(rows, cols))
    return lr * math.sqrt(max(1, rows / cols)) if adjust_lr_fn in (None, "original") else lr


class Muon(torch.optim.Muon):
    """torch.optim.Muon, orthogonalizing in ns_dtype (float32 by default)."""

    def __init__(self, params, ns_dtype=torch.float32, **kwargs):
        super().__init__(params, **kwargs)
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, momentum = group["lr"], group["momentum"]
            for p in (p for p in group["params"] if p.grad is not None):
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - momentum)
                update = p.grad.lerp(buf, momentum) if group["nesterov"] else buf
                update = newton_schulz(update, group["ns_coefficients"], group["ns_steps"],
                                       group["eps"], self.ns_dtype)
                p.mul_(1 - lr * group["weight_decay"])
                p.add_(update.to(p.dtype), alpha=-adjusted_lr(lr, group["adjust_lr_fn"], p.shape))
        return loss
