"""GPT-2 through transformers (gpt/hf.py), offline: a random GPT2LMHeadModel saved by
transformers stands in for OpenAI's weights, which tests cannot download.

Import: our float GPT computes transformers' GPT-2 logits, to float32 rounding, once it takes
GPT-2's tanh form of GELU (gelu_approximate='tanh'; the exact form is off by far more than the
bound). Export: GPTBigCodeForCausalLM computes our GPT.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from bitlinear.convert import load_init_weights
from bitlinear.hf import ExportError
from bitlinear.inference import to_integer
from bitlinear.layer import BitLinear
from common import CheckpointError, build_model, load_checkpoint
from configs import DEFAULTS, resolve
from gpt.hf import check_exportable, save_hf
from sample import generate
from train import main as train_main
from train import start

transformers = pytest.importorskip("transformers", reason="transformers is not installed: "
                                   "pip install -r requirements-dev.txt (CI installs it)")
safetensors = pytest.importorskip("safetensors.torch", reason="safetensors is not installed: "
                                  "pip install -r requirements-dev.txt (CI installs it)")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_ERR = 1e-5
# shakespeare_char's vocabulary, so train.py can fine-tune it on the test corpus
TINY = dict(vocab_size=65, n_positions=32, n_embd=64, n_layer=2, n_head=4, bos_token_id=None,
            eos_token_id=None)


def no_compile(fn, *args, **kwargs):
    """Run transformers without torch.compile (its BitLinear would compile a quantizer)."""
    with torch._dynamo.config.patch(disable=True), torch.no_grad():
        return fn(*args, **kwargs)


def randomize(model, seed=0):
    """Weights far from the init: norm gains and biases too (transformers starts them at 1 and
    0, where a mix-up of names or a missing transpose would not show)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            centre = 1.0 if ".ln_" in name and name.endswith("weight") else 0.0
            p.copy_(centre + torch.randn(p.shape, generator=g) * (0.5 if p.dim() == 1 else 0.2))
    return model


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    """(folder, model): a tiny random GPT2LMHeadModel and the folder save_pretrained wrote."""
    from transformers import GPT2Config, GPT2LMHeadModel
    model = randomize(GPT2LMHeadModel(GPT2Config(**TINY))).eval()
    folder = tmp_path_factory.mktemp("gpt2")
    model.save_pretrained(folder)
    return folder, model


@pytest.fixture
def gpt2_copy(gpt2, tmp_path):
    return shutil.copytree(gpt2[0], tmp_path / "gpt2")


def ids(n=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, TINY["vocab_size"], (2, n), generator=g)


def edit_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


# ---- import -----------------------------------------------------------------------------------

def test_float_gpt_computes_transformers_gpt2_logits(gpt2):
    folder, hf = gpt2
    args, state = load_init_weights(folder, "gpt")
    assert args == dict(vocab_size=65, block_size=32, n_layer=2, n_head=4, n_embd=64, bias=True,
                        bitlinear=False, gelu_approximate="tanh")
    ours = build_model("gpt", args).eval()
    ours.load_state_dict(state)  # strict: every tensor, nothing left at its init
    x = ids()
    with torch.no_grad():
        got = ours(x, targets=x)[0]
    want = no_compile(hf, x).logits
    assert (got - want).abs().max() <= MAX_ERR
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    # and token by token through our KV cache: the same greedy continuation
    prompt = x[:1, :8]
    with torch.no_grad():
        ours_text = generate(ours, prompt, 20, temperature=0)
    assert torch.equal(ours_text, no_compile(hf.generate, prompt, max_new_tokens=20,
                                             do_sample=False, pad_token_id=0))


def test_the_hubs_file_layout_loads_the_same(gpt2, tmp_path):
    """The hub's GPT-2 files hold GPT2Model's names (no 'transformer.') and the causal masks
    h.N.attn.bias and attn.masked_bias, which are not weights."""
    folder, hf = gpt2
    tensors = {k: v.contiguous() for k, v in hf.transformer.state_dict().items()}
    for i in range(TINY["n_layer"]):
        tensors[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 32, 32))
        tensors[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    hub = tmp_path / "hub"
    hub.mkdir()
    shutil.copy(folder / "config.json", hub)
    safetensors.save_file(tensors, hub / "model.safetensors")
    (args, state), (args2, state2) = load_init_weights(hub, "gpt"), load_init_weights(folder, "gpt")
    assert args == args2 and state.keys() == state2.keys()
    assert all(torch.equal(state[k], state2[k]) for k in state)


def test_a_ternary_build_takes_the_same_latent_weights(gpt2):
    args, state = load_init_weights(gpt2[0], "gpt")
    ternary = build_model("gpt", dict(args, bitlinear=True))
    ternary.load_state_dict(state)
    assert isinstance(ternary.transformer.h[0].attn.c_attn, BitLinear)
    held = ternary.state_dict()
    assert held.keys() == state.keys() and all(torch.equal(held[k], state[k]) for k in state)
    # the transposed Conv1D: our (out, in) row j is GPT-2's column j
    hf_w = gpt2[1].transformer.h[1].mlp.c_fc.weight
    assert torch.equal(held["transformer.h.1.mlp.c_fc.weight"], hf_w.t())


def test_train_starts_from_the_folder(gpt2, tiny_cfg, tmp_path):
    folder = str(gpt2[0])
    _, state = load_init_weights(folder, "gpt")
    run = start(dict(tiny_cfg, init_from=folder, bitlinear=False))
    assert run.args["gelu_approximate"] == "tanh" and run.args["bias"]
    held = run.raw_model.state_dict()
    assert all(torch.equal(held[k], state[k]) for k in state)  # step 0: GPT-2's weights
    out = tmp_path / "ternary"
    train_main([f"--data_dir={tiny_cfg['data_dir']}", "--device=cpu", "--compile=False",
                f"--init_from={folder}", f"--out_dir={out}", "--max_iters=2", "--eval_iters=1",
                "--batch_size=4", "--block_size=32", "--eval_interval=2", "--log_interval=1"])
    ckpt = load_checkpoint(out / "ckpt.pt")
    assert ckpt["iter_num"] == 2 and ckpt["model_args"]["bitlinear"]
    assert ckpt["model_args"]["n_embd"] == 64 and torch.isfinite(torch.tensor(ckpt["val_loss"]))


# ---- bad input: one line each -----------------------------------------------------------------

def test_a_gpt2_name_offline_and_uncached_is_one_line(data_dir, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"),
               HF_HUB_CACHE=str(tmp_path / "hf" / "hub"))
    r = subprocess.run([sys.executable, "train.py", "--init_from=gpt2", f"--data_dir={data_dir}",
                        "--device=cpu", f"--out_dir={tmp_path / 'out'}"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1, r.stderr
    assert lines[0].startswith("error: --init_from=gpt2 needs the internet once to download "
                               "openai-community/gpt2")


def test_gpt2_names_pass_the_config_check():
    for name in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"):
        assert resolve(dict(DEFAULTS, init_from=name, device="cpu"))["init_from"] == name
    with pytest.raises(CheckpointError, match="--init_from=gpt2-xl is a GPT-2 model: use "
                                              "--arch=gpt"):
        load_init_weights("gpt2-xl", "llama")  # refused before any download


def test_other_folders_and_options_are_one_line(gpt2_copy):
    def refused(match, arch="gpt"):
        with pytest.raises(CheckpointError, match=match) as e:
            load_init_weights(gpt2_copy, arch)
        assert "\n" not in str(e.value)

    refused(r"holds a GPT-2 model \(model_type 'gpt2'\): use --arch=gpt", arch="llama")
    edit_config(gpt2_copy, activation_function="relu")
    refused(r"options BitGPT's GPT does not compute: \{'activation_function': 'relu'\}")
    edit_config(gpt2_copy, activation_function="gelu_new", n_inner=100)
    refused(r"'n_inner': 100")
    edit_config(gpt2_copy, n_inner=None, n_embd=96)
    refused(r"it makes transformer.wte.weight \[65, 96\], model.safetensors holds \[65, 64\]")
    edit_config(gpt2_copy, n_embd=64, n_layer=3)
    refused(r"has n_layer=3, but model.safetensors holds 2 layers")
    edit_config(gpt2_copy, n_layer=2, model_type="gpt_neo")
    refused(r"holds a 'gpt_neo' model; BitGPT imports model_type 'gpt2' \(--arch=gpt\)")
    edit_config(gpt2_copy, model_type="gpt2")
    tensors = safetensors.load_file(gpt2_copy / "model.safetensors")
    del tensors["transformer.h.1.mlp.c_fc.weight"]
    safetensors.save_file(tensors, gpt2_copy / "model.safetensors")
    refused(r"lacks transformer.h.1.mlp.c_fc.weight, which GPT-2 needs")
    (gpt2_copy / "model.safetensors").unlink()
    refused(r"holds no \*.safetensors weights")


# ---- export: our GPT as GPTBigCodeForCausalLM ---------------------------------------------------

VARIANTS = {  # name: GPTConfig overrides
    "ternary": dict(),
    "ternary_bias_bit_norm": dict(bias=True, bit_norm=True),
    "float_gpt2": dict(bitlinear=False, bias=True, gelu_approximate="tanh"),
}
CHAR_META = {"vocab_size": 65, "tokenizer": "char", "itos": {i: chr(40 + i) for i in range(65)},
             "stoi": {chr(40 + i): i for i in range(65)}}


@pytest.mark.parametrize("variant", VARIANTS)
def test_gptbigcode_computes_our_logits(variant, tmp_path):
    from transformers import AutoModelForCausalLM
    over = VARIANTS[variant]
    ternary = over.get("bitlinear", True)
    if ternary:
        pytest.importorskip("accelerate", reason="transformers needs accelerate to load bitnet "
                            "models: pip install -r requirements-dev.txt (CI installs it)")
    model = build_model("gpt", dict(vocab_size=65, block_size=32, n_layer=2, n_head=4, n_embd=64,
                                    **over)).eval()
    with torch.no_grad():  # norms and biases away from 1 and 0
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)) * 0.3)
    save_hf(model, dict(vars(model.config)), CHAR_META, tmp_path)
    hf, info = no_compile(AutoModelForCausalLM.from_pretrained, tmp_path, output_loading_info=True)
    hf.eval()
    assert type(hf).__name__ == "GPTBigCodeForCausalLM"
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    linear = type(hf.transformer.h[0].mlp.c_fc).__name__
    assert linear == ("BitLinear" if ternary else "Linear")
    ours = to_integer(model) if ternary else model
    x = ids()
    with torch.no_grad():
        want = ours(x, targets=x)[0]
    got = no_compile(hf, x).logits
    assert (got - want).abs().max() <= MAX_ERR
    assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_an_imported_gpt2_exports_to_what_gpt2_computes(gpt2, tmp_path):
    """GPT-2 -> our GPT -> GPTBigCode: transformers' two classes give the same logits."""
    from transformers import AutoModelForCausalLM
    args, state = load_init_weights(gpt2[0], "gpt")
    ours = build_model("gpt", args)
    ours.load_state_dict(state)
    save_hf(ours, dict(vars(ours.config)), CHAR_META, tmp_path)
    bigcode = no_compile(AutoModelForCausalLM.from_pretrained, tmp_path).eval()
    x = ids()
    assert (no_compile(bigcode, x).logits - no_compile(gpt2[1], x).logits).abs().max() <= MAX_ERR


def test_odd_widths_are_refused():
    with pytest.raises(ExportError, match="n_embd must be a multiple of 4; this model has "
                                          "n_embd=66"):
        check_exportable(dict(n_embd=66, bitlinear=True))
    check_exportable(dict(n_embd=66, bitlinear=False))  # float: no packing
