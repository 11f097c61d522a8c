"""BitLinear (bitlinear/layer.py): the quantizers' exact values, the straight-through estimator,
and the layer as the models build it."""

import torch

from bitlinear.layer import (
    BitLinear,
    activation_quant,
    activation_quant_int,
    frozen_weights,
    make_linear,
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
    assert type(make_linear(8, 4, bitlinear=True)) is BitLinear
    assert type(make_linear(8, 4)) is BitLinear
    assert type(make_linear(8, 4, bitlinear=False)) is torch.nn.Linear
    assert BitLinear(8, 4, norm=True).norm is not None


def test_tiny_gpt_compiles_without_graph_breaks_and_matches_eager():
    """fullgraph=True fails on any graph break. aot_eager traces forward and backward as inductor
    would, in a fraction of inductor's time."""
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


def test_frozen_weights_quantize_once_with_the_same_numbers():
    torch.manual_seed(0)
    layer = BitLinear(16, 8, bias=True)
    x = torch.randn(3, 16)
    calls = []
    quantized = layer.quantized_weight
    layer.quantized_weight = lambda: calls.append(1) or quantized()
    with torch.no_grad():
        want = [layer(x) for _ in range(3)]
        assert len(calls) == 3
        with frozen_weights(layer):
            got = [layer(x) for _ in range(3)]
        assert len(calls) == 4 and layer.frozen_w_q is None  # made once, let go on exit
    for a, b in zip(want, got, strict=True):
        assert torch.equal(a, b)
