"""The fast BitLinear (hand-written STE backward, cached W_q) against the readable reference.

Everything here is compared with torch.equal: the fast path runs the same quantizer code and the
same matmuls, in the same layouts, as autograd runs for bitlinear_reference, so the bits agree.
"""

import copy

import pytest
import torch

from bitlinear import BitLinear, activation_quant, bitlinear, bitlinear_reference, weight_quant
from bitlinear.layer import quantized_input
from gpt.model import GPT, GPTConfig


def reference(layer, x):
    """What BitLinear(x) means: the detach-trick formulation on the current latent weight."""
    if layer.norm is not None:
        x = layer.norm(x)
    return bitlinear_reference(x, layer.weight, layer.bias, layer.eps)


def grads(fn, layer, x, g):
    layer.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    y = fn(layer, x)
    y.backward(g)
    return [y.detach(), x.grad] + [p.grad for p in layer.parameters()]


def assert_same(a, b):
    assert len(a) == len(b)
    for u, v in zip(a, b, strict=True):
        assert torch.equal(u, v), (u - v).abs().max()


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize("shape", [(7, 48), (3, 5, 48), (2, 9, 600)])  # 600: BLAS blocks K
def test_fast_path_equals_reference_bit_for_bit(bias, norm, shape):
    torch.manual_seed(0)
    layer = BitLinear(shape[-1], 40, bias=bias, norm=norm)
    with torch.no_grad():  # an outlier far above the absmean scale: the clamp binds
        layer.weight[0, 0] = 1.0
        if norm:
            layer.norm.weight.uniform_(0.5, 1.5)
    x, g = torch.randn(*shape) * 3, torch.randn(*shape[:-1], 40)
    assert_same(grads(lambda m, x: m(x), layer, x, g), grads(reference, layer, x, g))
    with torch.no_grad():  # evaluation skips the autograd Function: the same values
        assert torch.equal(layer(x), reference(layer, x))
    if not norm:  # the functional form too
        fn = lambda m, x: bitlinear(x, m.weight, m.bias)  # noqa: E731
        assert_same(grads(fn, layer, x, g), grads(reference, layer, x, g))


@pytest.mark.parametrize("bias", [False, True])
def test_fast_path_equals_reference_under_bf16_autocast(bias):
    """Mixed precision (CPU autocast here; custom_fwd/custom_bwd carry it on CUDA): the bf16
    matmuls and the dtype of every gradient are the reference's."""
    torch.manual_seed(0)
    layer = BitLinear(48, 40, bias=bias)
    x, g = torch.randn(3, 5, 48), torch.randn(3, 5, 40, dtype=torch.bfloat16)

    def autocast(fn):
        def run(m, x):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return fn(m, x)
        return run
    fast = grads(autocast(lambda m, x: m(x)), layer, x, g)
    assert fast[0].dtype == torch.bfloat16 and fast[2].dtype == torch.float32
    assert_same(fast, grads(autocast(reference), layer, x, g))
    with torch.no_grad():
        assert torch.equal(autocast(lambda m, x: m(x))(layer, x), autocast(reference)(layer, x))


def test_quantized_weight_is_cached_until_the_weight_changes():
    layer = BitLinear(16, 8)
    w_q = layer.quantized_weight()
    assert layer.quantized_weight() is w_q  # unchanged weight: reused
    with torch.no_grad():
        layer(torch.randn(2, 16))
    assert layer.quantized_weight() is w_q  # evaluation reuses it too
    with torch.no_grad():
        layer.weight.mul_(-1)  # an in-place change bumps the version counter
    assert torch.equal(layer.quantized_weight(), -w_q)
    layer.weight.data.mul_(-1)  # .data bypasses the version counter: clear_cache is the remedy
    layer.clear_cache()
    assert torch.equal(layer.quantized_weight(), w_q)


@pytest.mark.parametrize("impl", ["foreach", "for_loop", "fused"])
def test_cache_follows_optimizer_steps_and_accumulation(impl):
    """Micro-steps reuse W_q; every optimizer step drops it: the run matches the reference."""
    torch.manual_seed(0)
    fast = BitLinear(32, 24, bias=True)
    ref = copy.deepcopy(fast)
    opts = [torch.optim.AdamW(m.parameters(), lr=0.05, foreach=impl == "foreach",
                              fused=impl == "fused" or None) for m in (fast, ref)]
    for _ in range(4):
        for _ in range(2):  # gradient accumulation: two micro-steps on one W_q
            x, g = torch.randn(5, 32), torch.randn(5, 24)
            fast(x).backward(g)
            reference(ref, x).backward(g)
        assert_same([p.grad for p in fast.parameters()], [p.grad for p in ref.parameters()])
        for opt in opts:
            opt.step()
            opt.zero_grad()
        assert fast._w_q is None  # dropped before the step: fused steps bump no version counter
        assert torch.equal(fast.weight, ref.weight)
        assert torch.equal(fast.quantized_weight(), weight_quant(fast.weight))


def test_cache_follows_load_state_dict_to_and_inference_mode():
    torch.manual_seed(0)
    layer, other = BitLinear(16, 8), BitLinear(16, 8)
    x = torch.randn(3, 16)
    with torch.no_grad():
        layer(x)
    layer.load_state_dict(other.state_dict())
    assert torch.equal(layer(x), other(x))
    with torch.no_grad():
        layer(x)
    layer.to(torch.float64)  # new storage (and dtype): the cache misses
    assert layer.quantized_weight().dtype == torch.float64
    layer.to(torch.float32)
    with torch.inference_mode():
        layer(x)  # not cached: a W_q made here could not be saved for backward later
    layer(x.requires_grad_()).sum().backward()
    assert torch.equal(layer.quantized_weight(), weight_quant(layer.weight))


def test_layers_reading_one_tensor_share_its_quantization():
    """LLaMA's q, k, v (and gate, up) read one tensor: quantized once, gradients unchanged."""
    torch.manual_seed(0)
    layers = [BitLinear(32, 16) for _ in range(3)]
    h = torch.randn(4, 32, requires_grad=True)
    x = h * 2  # a non-leaf, as in a model
    x_q = quantized_input(x)
    assert quantized_input(x) is x_q and torch.equal(x_q, activation_quant(x))
    assert quantized_input(x, eps=1e-3) is not x_q  # another eps: another quantization
    sum(m(x) for m in layers).sum().backward()
    fast = [h.grad] + [m.weight.grad for m in layers]
    h.grad = None
    for m in layers:
        m.zero_grad()
    x = h * 2
    sum(reference(m, x) for m in layers).sum().backward()
    assert_same(fast, [h.grad] + [m.weight.grad for m in layers])
    with torch.no_grad():
        x.add_(1)  # an in-place write: the old quantization is stale
    assert torch.equal(quantized_input(x), activation_quant(x))


def test_tiny_gpt_compiles_without_graph_breaks_and_matches_eager():
    """fullgraph=True fails on any graph break. aot_eager traces forward and backward as inductor
    would, in seconds; the same check with inductor matched too (loss equal, grads to 2e-8)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=65))
    idx = torch.randint(0, 65, (2, 16), generator=torch.Generator().manual_seed(1))
    _, loss = model(idx, idx)
    loss.backward()
    eager = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    _, closs = compiled(idx, idx)
    closs.backward()
    torch.testing.assert_close(closs, loss, atol=1e-5, rtol=1e-5)
    for p, g in zip(model.parameters(), eager, strict=True):
        torch.testing.assert_close(p.grad, g, atol=1e-5, rtol=1e-5)
