"""How a trained model's ternary weights fall: the share of -1, 0 and +1 in every BitLinear.

    python -m tools.weight_stats --ckpt=out/ckpt.pt
    python -m tools.weight_stats --ckpt=out/ckpt.pt --plot=assets/ternary_share.png

The zeros are what the b1.58 paper calls feature filtering: a 0 weight drops its input from that
output, which 1-bit (+-1) weights cannot do. The scale is s = 1/mean|W| of the latent weights.
"""

import torch

from bitlinear.layer import BitLinear, ternarize
from common import ConfigError, defaults, load_checkpoint, model_from_checkpoint, run_cli
from tools.plot import pyplot, save

SETTINGS = dict(
    ckpt=("out/ckpt.pt", "the training checkpoint whose ternary weights to count"),
    plot=("", "a PNG path to draw the shares to; empty: print only"),
)
DEFAULTS = defaults(SETTINGS)


def ternary_shares(model):
    """[(layer name, share of -1, share of 0, share of +1, scale)] for every BitLinear."""
    rows = []
    for name, module in model.named_modules():
        if isinstance(module, BitLinear):
            w_t, s = ternarize(module.weight.detach(), module.eps)
            shares = [(w_t == v).float().mean().item() for v in (-1, 0, 1)]
            rows.append((name, *shares, s.item()))
    return rows


def plot_shares(rows, path):
    plt = pyplot()
    names = [r[0] for r in rows]
    fig, ax = plt.subplots(figsize=(10, max(3, 0.22 * len(rows))))
    left = [0.0] * len(rows)
    for k, (label, color) in enumerate([("-1", "C0"), ("0", "0.75"), ("+1", "C3")]):
        share = [r[1 + k] for r in rows]
        ax.barh(names, share, left=left, color=color, label=label)
        left = [a + b for a, b in zip(left, share, strict=True)]
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("share of the layer's weights")
    ax.legend(ncol=3, loc="lower center", bbox_to_anchor=(0.5, 1.0))
    ax.tick_params(axis="y", labelsize=7)
    save(fig, path)


def stats(cfg):
    ckpt = load_checkpoint(cfg["ckpt"])
    if not ckpt["model_args"].get("bitlinear", True):
        raise ConfigError(f"'{cfg['ckpt']}' is a float model (bitlinear=False): no ternary weights")
    rows = ternary_shares(model_from_checkpoint(ckpt, cfg["ckpt"]))
    width = max(len(r[0]) for r in rows)
    print(f"{'layer':<{width}}      -1       0      +1   scale 1/mean|W|")
    for name, neg, zero, pos, s in rows:
        print(f"{name:<{width}}  {neg:6.1%}  {zero:6.1%}  {pos:6.1%}   {s:10.2f}")
    n = torch.tensor([[r[1], r[2], r[3]] for r in rows]).mean(0)
    print(f"{'mean over layers':<{width}}  {n[0]:6.1%}  {n[1]:6.1%}  {n[2]:6.1%}")
    if cfg["plot"]:
        plot_shares(rows, cfg["plot"])
    return rows


def main(argv=None):
    return run_cli(SETTINGS, stats, "-m tools.weight_stats", __doc__, argv)


if __name__ == "__main__":
    main()
