"""Integer inference: a trained model run with int8 x ternary matmuls gives the training logits."""

import copy

import torch

from bitlinear import BitLinear, TernaryLinear, int_matmul, to_integer
from checkpoint import load_checkpoint, model_from_checkpoint
from generation import generate
from train import Trainer


def test_int_matmul_is_exact():
    x = torch.randint(-128, 128, (5, 300), dtype=torch.int8)
    w = torch.randint(-1, 2, (300, 7), dtype=torch.int8)
    assert torch.equal(int_matmul(x, w), x.int() @ w.int())


def test_ternary_linear_matches_bitlinear():
    torch.manual_seed(0)
    for norm in (False, True):
        layer = BitLinear(64, 48, bias=True, norm=norm)
        x = torch.randn(3, 5, 64)
        torch.testing.assert_close(TernaryLinear.from_bitlinear(layer)(x), layer(x),
                                   atol=1e-5, rtol=1e-5)


def test_trained_checkpoint_runs_exactly_in_integers(tiny_cfg):
    Trainer(dict(tiny_cfg, max_iters=30, learning_rate=3e-3)).run()
    model = model_from_checkpoint(load_checkpoint(f"{tiny_cfg['out_dir']}/ckpt.pt")).eval()
    integer = to_integer(copy.deepcopy(model))
    assert not any(isinstance(m, BitLinear) for m in integer.modules())
    assert sum(isinstance(m, TernaryLinear) for m in integer.modules()) == 2 * 4
    idx = torch.randint(0, 65, (4, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, _ = model(idx, idx)
        out, _ = integer(idx, idx)
    assert (out - ref).abs().max() < 1e-4
    prompt = idx[:1, :8]
    assert torch.equal(generate(model, prompt, 40, temperature=0),
                       generate(integer, prompt, 40, temperature=0))
