"""BitLinear: the quantizers' exact values, the straight-through estimator, and its fast form
(bitlinear/fast.py) against the paper's (bitlinear/layer.py).

The fast form is compared with torch.equal: it runs the same quantizers and the same matmuls, in
the same layouts, as autograd runs for the reference, so the bits agree.
"""

import copy

import pytest
import torch

from bitlinear import (
    BitLinear,
    FastBitLinear,
    activation_quant,
    activation_quant_int,
    fast,
    make_linear,
    share_input,
    ternarize,
    weight_quant,
)
from gpt.model import GPT, GPTConfig


def test_weight_quant_exact_values():
    w = torch.tensor([[0.5, -1.0, 0.1], [2.0, 0.0, -0.4]])
    gamma = w.abs().mean()  # 4.0 / 6
    expected = torch.tensor([[1.0, -1.0, 0.0], [1.0, 0.0, -1.0]]) * gamma
    torch.testing.assert_close(weight_quant(w), expected)
    t, s = ternarize(w)
    assert t.dtype == torch.int8
    assert t.tolist() == [[1, -1, 0], [1, 0, -1]]
    torch.testing.assert_close(s, 1 / gamma)


def test_weight_quant_takes_only_three_values():
    w = torch.randn(64, 48)
    t, s = ternarize(w)
    values = set(weight_quant(w).unique().tolist())
    step = (1 / s).item()  # float32, as the quantizer computes it
    assert values <= {-step, 0.0, step}
    assert torch.equal(t.float() / s, weight_quant(w))  # integer form == fake-quant, bit for bit


def test_activation_quant_exact_values():
    x = torch.tensor([[1.0, -0.5, 0.25, 0.0], [0.0, 0.0, 0.0, 3.0]])
    q, s = activation_quant_int(x)
    assert q.dtype == torch.int8
    assert q.tolist() == [[127, -64, 32, 0], [0, 0, 0, 127]]  # round(-63.5) = -64 (half to even)
    torch.testing.assert_close(s.squeeze(-1), torch.tensor([127.0, 127.0 / 3]))
    assert torch.equal(q.float() / s, activation_quant(x))


def test_activation_quant_is_per_token_and_in_range():
    x = torch.randn(3, 5, 40) * torch.tensor([1e-3, 1.0, 1e3])[:, None, None]
    q, s = activation_quant_int(x)
    assert q.min() >= -128 and q.max() <= 127
    assert (q.abs().amax(-1) == 127).all()  # every token uses the full range
    err = (activation_quant(x) - x).abs()
    assert (err <= 0.5 / s + 1e-6 * x.abs()).all()  # at most half a step off


def test_all_zero_inputs_give_zeros_not_nan():
    assert torch.equal(weight_quant(torch.zeros(4, 4)), torch.zeros(4, 4))
    assert torch.equal(activation_quant(torch.zeros(2, 8)), torch.zeros(2, 8))
    y = BitLinear(8, 4)(torch.zeros(3, 8))
    assert torch.isfinite(y).all() and (y == 0).all()


def test_ste_gradients_reach_latent_weights():
    layer = BitLinear(16, 8)
    x = torch.randn(4, 16, requires_grad=True)
    layer(x).sum().backward()
    # straight-through: dL/dW = dy^T x_q, dL/dx = dy W_q
    ones = torch.ones(4, 8)
    torch.testing.assert_close(layer.weight.grad, ones.t() @ activation_quant(x.detach()))
    torch.testing.assert_close(x.grad, ones @ weight_quant(layer.weight.detach()))


def test_layer_output_is_quantized_matmul():
    layer = BitLinear(32, 16, norm=False)
    x = torch.randn(5, 32)
    expected = activation_quant(x) @ weight_quant(layer.weight).t()
    assert torch.equal(layer(x), expected)


def test_make_linear_switch():
    assert type(make_linear(8, 4, bitlinear=True)) is FastBitLinear
    assert isinstance(make_linear(8, 4), BitLinear)
    assert type(make_linear(8, 4, bitlinear=False)) is torch.nn.Linear
    assert BitLinear(8, 4, norm=True).norm is not None


def reference(layer, x):
    """What the layer means: the paper's BitLinear.forward on its current latent weight."""
    return BitLinear.forward(layer, x)


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fast_quantizers_equal_the_papers(dtype):
    """fast.py's in-place quantizers, without the activation clamp, give layer.py's bits: over
    six decades of token scales, an all-zero token, ties at .5 and outlying weights."""
    torch.manual_seed(0)
    x = torch.randn(64, 300) * torch.logspace(-6, 4, 64)[:, None]
    x[3] = 0.0
    x[5] = torch.arange(300) - 149.5  # x s_x lands on many halves
    w = torch.randn(300, 64) * 0.02
    w[0, :8] = torch.tensor([1.0, -1.0, 0.5, -0.5, 0.0, 1e-9, 0.1, -0.1])
    for t in (x, w.t(), torch.zeros(4, 8)):
        t = t.to(dtype)
        assert torch.equal(fast.activation_quant(t), activation_quant(t))
        assert torch.equal(fast.weight_quant(t), weight_quant(t))


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize("shape", [(7, 48), (3, 5, 48), (2, 9, 600)])  # 600: BLAS blocks K
def test_fast_path_equals_reference_bit_for_bit(bias, norm, shape):
    torch.manual_seed(0)
    layer = FastBitLinear(shape[-1], 40, bias=bias, norm=norm)
    with torch.no_grad():  # an outlier far above the absmean scale: the clamp binds
        layer.weight[0, 0] = 1.0
        if norm:
            layer.norm.weight.uniform_(0.5, 1.5)
    x, g = torch.randn(*shape) * 3, torch.randn(*shape[:-1], 40)
    assert_same(grads(lambda m, x: m(x), layer, x, g), grads(reference, layer, x, g))
    with torch.no_grad():  # evaluation skips the autograd Function: the same values
        assert torch.equal(layer(x), reference(layer, x))


@pytest.mark.parametrize("bias", [False, True])
def test_fast_path_equals_reference_under_bf16_autocast(bias):
    """Mixed precision (CPU autocast here; custom_fwd/custom_bwd carry it on CUDA): the bf16
    matmuls and the dtype of every gradient are the reference's."""
    torch.manual_seed(0)
    layer = FastBitLinear(48, 40, bias=bias)
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


@pytest.mark.parametrize("impl", ["foreach", "for_loop", "fused"])
def test_training_matches_the_reference_over_optimizer_steps_and_accumulation(impl):
    """Micro-steps and every AdamW implementation (fused ones write the weights without bumping
    their version counters): the fast layer trains exactly as the reference."""
    torch.manual_seed(0)
    fast = FastBitLinear(32, 24, bias=True)
    ref = copy.deepcopy(fast)
    opts = [torch.optim.AdamW(m.parameters(), lr=0.05, foreach=impl == "foreach",
                              fused=impl == "fused" or None) for m in (fast, ref)]
    for _ in range(4):
        for _ in range(2):  # gradient accumulation: two micro-steps
            x, g = torch.randn(5, 32), torch.randn(5, 24)
            fast(x).backward(g)
            reference(ref, x).backward(g)
        assert_same([p.grad for p in fast.parameters()], [p.grad for p in ref.parameters()])
        for opt in opts:
            opt.step()
            opt.zero_grad()
        assert torch.equal(fast.weight, ref.weight)


def test_fast_layer_follows_load_state_dict_to_and_inference_mode():
    torch.manual_seed(0)
    layer, other = FastBitLinear(16, 8), FastBitLinear(16, 8)
    x = torch.randn(3, 16)
    with torch.no_grad():
        layer(x)
    layer.load_state_dict(other.state_dict())
    assert torch.equal(layer(x), other(x))
    with torch.no_grad():
        layer(x)
    layer.to(torch.float64)
    assert layer(x.double()).dtype == torch.float64
    layer.to(torch.float32)
    with torch.inference_mode():
        y = layer(x)
    assert torch.equal(y, reference(layer, x))
    layer(x.requires_grad_()).sum().backward()
    assert torch.equal(layer.weight.grad, torch.ones(3, 8).t() @ activation_quant(x.detach()))


def test_no_grad_forwards_reuse_w_q_until_the_weight_changes(monkeypatch):
    """An evaluation's forwards quantize the weight once; any change to it is seen: a training
    step (fused AdamW leaves the version counter alone), in-place writes, a new state dict."""
    torch.manual_seed(0)
    layer = FastBitLinear(16, 8)
    calls = []
    quantize = fast.weight_quant
    monkeypatch.setattr(fast, "weight_quant", lambda w, eps: calls.append(1) or quantize(w, eps))
    opt = torch.optim.AdamW(layer.parameters(), lr=0.1, fused=True)
    x = torch.randn(3, 16)

    def check():  # three no-grad forwards, right, for one quantization
        before = len(calls)
        with torch.no_grad():
            for _ in range(3):
                assert torch.equal(layer(x), reference(layer, x))
        assert len(calls) == before + 1

    check()
    layer(x).sum().backward()  # a training forward lets W_q go
    opt.step()
    check()
    with torch.no_grad():
        layer.weight.mul_(-1)
    check()
    layer.load_state_dict(FastBitLinear(16, 8).state_dict())
    check()
    layer.weight.data = torch.randn(8, 16)
    check()
    with torch.inference_mode():
        assert torch.equal(layer(x), reference(layer, x))
    assert "w_q_cache" not in str(layer.state_dict().keys())


def test_layers_reading_one_tensor_share_its_quantization(monkeypatch):
    """LLaMA's q, k, v (and gate, up) read one tensor: quantized once, the same gradients."""
    torch.manual_seed(0)
    layers = [FastBitLinear(32, 16) for _ in range(3)]
    share_input(*layers)
    group = layers[0].shared_input
    assert all(m.shared_input is group for m in layers) and group.n == 3
    calls = []
    quantize = group.quantize
    monkeypatch.setattr(group, "quantize", lambda x, eps: calls.append(x) or quantize(x, eps))
    h = torch.randn(4, 32, requires_grad=True)
    x = h * 2  # a non-leaf, as in a model
    sum(m(x) for m in layers).sum().backward()
    assert len(calls) == 1 and group.value is None  # once, and let go after the third
    fast = [h.grad] + [m.weight.grad for m in layers]
    h.grad = None
    for m in layers:
        m.zero_grad()
    x = h * 2
    sum(reference(m, x) for m in layers).sum().backward()
    assert_same(fast, [h.grad] + [m.weight.grad for m in layers])
    with torch.no_grad():
        y = layers[0](x)
        x.add_(1)  # an in-place write: the old quantization is stale
        assert torch.equal(layers[1](x), reference(layers[1], x))
        assert torch.equal(y, reference(layers[0], x - 1))
    assert len(calls) == 3
    # a layer with its own norm reads a different input: nothing is shared
    normed = [FastBitLinear(8, 8, norm=True) for _ in range(2)]
    share_input(*normed)
    assert normed[0].shared_input is None


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
