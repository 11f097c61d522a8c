"""Property tests (hypothesis): quantizers and packing on random shapes, magnitudes and dtypes."""

import pytest
import torch
import torch.nn.functional as F

from bitlinear.layer import (
    BitLinear,
    activation_quant,
    activation_quant_int,
    ternarize,
    weight_quant,
)
from bitlinear.pack import pack_2bit, pack_base3, unpack_2bit, unpack_base3

hypothesis = pytest.importorskip("hypothesis", reason="pip install hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

shapes = st.lists(st.integers(1, 9), min_size=1, max_size=3)
dtypes = st.sampled_from([torch.float32, torch.float16, torch.bfloat16])
magnitudes = st.sampled_from([0.0, 1e-30, 1e-8, 1e-3, 1.0, 1e3, 1e30])


def make(shape, magnitude, dtype, seed, zero_rows):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g) * magnitude
    if zero_rows and x.dim() > 1:
        x[..., 0, :] = 0
    return x.to(dtype)  # fp16 overflows 1e30 to inf: excluded below


def tensor_cases(test):
    """Run test(x) on random tensors: shapes, magnitudes, dtypes, all-zero rows."""
    @settings(max_examples=150, deadline=None)
    @given(shapes, magnitudes, dtypes, st.integers(0, 2**16), st.booleans())
    def run(shape, magnitude, dtype, seed, zero_rows):
        x = make(shape, magnitude, dtype, seed, zero_rows)
        if torch.isfinite(x).all():
            test(x)
    run.__name__ = test.__name__
    return run


@tensor_cases
def test_activation_quant_properties(x):
    q, s = activation_quant_int(x)
    assert q.dtype == torch.int8 and q.shape == x.shape
    assert int(q.min()) >= -128 and int(q.max()) <= 127
    assert torch.isfinite(s).all() and (s > 0).all()
    xq = activation_quant(x)
    assert xq.dtype == x.dtype and torch.isfinite(xq).all()
    assert (xq[x == 0] == 0).all()  # zeros (and all-zero tokens) stay zero


@tensor_cases
def test_weight_quant_properties(w):
    t, s = ternarize(w)
    assert set(t.unique().tolist()) <= {-1, 0, 1}
    assert torch.isfinite(s) and s > 0
    wq = weight_quant(w)
    assert wq.dtype == w.dtype and torch.isfinite(wq).all()
    if w.dtype == torch.float32:
        assert torch.equal(t.float() / s, wq)  # the integer form is the fake-quant, exactly


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 3), st.integers(1, 40), st.integers(1, 40), magnitudes, st.booleans(),
       st.integers(0, 2**16))
def test_bitlinear_is_the_papers_formula_with_straight_through_gradients(batch, k, n, magnitude,
                                                                          bias, seed):
    """BitLinear's output is F.linear(x_q, W_q, b) and its gradients the straight-through
    estimator's (dx = dy W_q, dW = dy^T x_q), exactly, on any shape and scale."""
    g = torch.Generator().manual_seed(seed)
    layer = BitLinear(k, n, bias=bias)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(n, k, generator=g) * magnitude)
    x = torch.randn(batch, 3, k, generator=g).mul_(magnitude).requires_grad_()
    dy = torch.randn(batch, 3, n, generator=g)
    y = layer(x)
    y.backward(dy)
    x_q, w_q = activation_quant(x.detach()), weight_quant(layer.weight.detach())
    want = [F.linear(x_q, w_q, layer.bias), dy @ w_q, dy.reshape(-1, n).t() @ x_q.reshape(-1, k)]
    for a, b in zip([y, x.grad, layer.weight.grad], want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


@settings(max_examples=200, deadline=None)
@given(shapes, st.integers(0, 2**16), st.floats(0.0, 1.0))
def test_packing_round_trips_exactly(shape, seed, p_zero):
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(-1, 2, shape, generator=g, dtype=torch.int8)
    t[torch.rand(shape, generator=g) < p_zero] = 0
    two, three = pack_2bit(t), pack_base3(t)
    assert two.dtype == three.dtype == torch.uint8
    assert two.numel() == -(-t.numel() // 4) and three.numel() == -(-t.numel() // 5)
    assert torch.equal(unpack_2bit(two, t.shape), t)
    assert torch.equal(unpack_base3(three, t.shape), t)
    assert int(three.max()) <= 242


def test_packing_layout_and_errors():
    t = torch.tensor([-1, 0, 1, 1, 0, -1], dtype=torch.int8)
    # codes 0,1,2,2 | 1,0 (+ pad code 1, 1): least significant bits first
    assert pack_2bit(t).tolist() == [0 | 1 << 2 | 2 << 4 | 2 << 6, 1 | 0 << 2 | 1 << 4 | 1 << 6]
    assert pack_base3(t).tolist() == [0 + 1 * 3 + 2 * 9 + 2 * 27 + 1 * 81, 0 + 1 * 3 + 9 + 27 + 81]
    with pytest.raises(ValueError, match="int8 tensor of -1, 0, \\+1"):
        pack_2bit(torch.tensor([2], dtype=torch.int8))
    with pytest.raises(ValueError, match="needs 9"):
        unpack_2bit(pack_2bit(torch.zeros(4, dtype=torch.int8)), (3, 3))
