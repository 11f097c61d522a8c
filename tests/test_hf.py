"""Export to HuggingFace transformers (llama/hf.py, bitlinear/hf.py), checked with transformers
itself, offline.

Each exportable variant is trained for a few steps on real text, exported with export.py and
loaded with AutoModelForCausalLM. transformers' BitLinear computes what BitGPT's integer path
computes (int8 activations times ternary weights, summed exactly, divided by both scales), so
its logits are ours; the test allows 1e-5, for other builds' float kernels. Greedy continuations
must be equal. (Against the training model's fake-quant forward the difference is that of the
integer path itself: an activation now and then rounds the other way.)
"""

import json
import shutil

import numpy as np
import pytest
import torch

from bitlinear.convert import load_init_weights
from bitlinear.hf import ExportError
from bitlinear.inference import to_integer
from bitlinear.layer import ternarize
from bitlinear.pack import pack_2bit_rows, unpack_2bit_rows
from common import build_model, load_checkpoint, model_from_checkpoint
from data.loader import read_meta
from export import main as export_main
from llama.hf import check_exportable
from sample import generate
from train import main as train_main
from train import train

safetensors = pytest.importorskip("safetensors.torch", reason="safetensors is not installed: "
                                  "pip install -r requirements-dev.txt (CI installs it)")
transformers = pytest.importorskip("transformers", reason="transformers is not installed: "
                                   "pip install -r requirements-dev.txt (CI installs it)")
pytest.importorskip("accelerate", reason="transformers needs accelerate to load bitnet models: "
                    "pip install -r requirements-dev.txt (CI installs it)")

MAX_ERR = 1e-5
# name: (training overrides, the transformers class that must load it)
VARIANTS = {
    "bitnet_relu2": (dict(mlp="relu2", subln=True, tie_embeddings=True), "BitNetForCausalLM"),
    "bitnet_swiglu": (dict(subln=True, tie_embeddings=True), "BitNetForCausalLM"),
    "llama_gqa_untied": (dict(), "LlamaForCausalLM"),
    "llama_bit_norm": (dict(bit_norm=True), "LlamaForCausalLM"),
    "float_bitnet": (dict(bitlinear=False, subln=True, tie_embeddings=True), "BitNetForCausalLM"),
}


def val_ids(data_dir, n, dataset="shakespeare_char"):
    """The first n tokens of the validation split: real text the model did not train on."""
    folder = data_dir / dataset
    meta = read_meta(folder)
    ids = np.fromfile(folder / "val.bin", dtype=meta["dtype"])[:n].astype(np.int64)
    return torch.from_numpy(ids)[None]


def load_hf(folder):
    from transformers import AutoModelForCausalLM
    with torch._dynamo.config.patch(disable=True):  # its BitLinear would compile a quantizer
        return AutoModelForCausalLM.from_pretrained(folder).eval()


def run_hf(fn, *args, **kwargs):
    with torch._dynamo.config.patch(disable=True), torch.no_grad():
        return fn(*args, **kwargs)


@pytest.mark.parametrize("variant", VARIANTS)
def test_transformers_computes_our_logits(train_llama, data_dir, variant):
    over, cls = VARIANTS[variant]
    out = train_llama(**over)
    export_main([f"--out_dir={out}", "--format=hf"])
    ours = to_integer(model_from_checkpoint(load_checkpoint(out / "ckpt.pt")).eval())
    hf = load_hf(out / "hf")
    assert type(hf).__name__ == cls
    assert hasattr(hf.config, "quantization_config") == over.get("bitlinear", True)
    ids = val_ids(data_dir, 64)
    with torch.no_grad():
        expected = ours(ids, targets=ids)[0]
    got = run_hf(hf, ids).logits
    assert (got - expected).abs().max() <= MAX_ERR
    assert torch.equal(got.argmax(-1), expected.argmax(-1))
    prompt = ids[:, :16]
    with torch.no_grad():
        ours_text = generate(ours, prompt, 32, temperature=0)
    hf_text = run_hf(hf.generate, prompt, max_new_tokens=32, do_sample=False)
    assert torch.equal(hf_text, ours_text)


def test_packed_weights_are_the_ternary_weights_bit_for_bit(train_llama):
    out = train_llama(subln=True, tie_embeddings=True)
    export_main([f"--out_dir={out}", "--format=hf", f"--to={out}/hf_bits"])
    tensors = safetensors.load_file(out / "hf_bits" / "model.safetensors")
    state = load_checkpoint(out / "ckpt.pt")["model"]
    w = state["layers.1.feed_forward.w2.weight"]
    t, s = ternarize(w)
    packed = tensors["model.layers.1.mlp.down_proj.weight"]
    assert packed.dtype == torch.uint8 and packed.shape == (w.size(0) // 4, w.size(1))
    assert torch.equal(unpack_2bit_rows(packed), t)
    assert tensors["model.layers.1.mlp.down_proj.weight_scale"].item() == s.item()
    assert "lm_head.weight" not in tensors  # tied: transformers takes embed_tokens
    assert torch.equal(tensors["model.embed_tokens.weight"], state["tok_embeddings.weight"])


def test_packing_matches_transformers_own_packer():
    from transformers.integrations.bitnet import pack_weights
    t = torch.randint(-1, 2, (64, 24), generator=torch.Generator().manual_seed(0))
    assert torch.equal(pack_2bit_rows(t.to(torch.int8)), pack_weights(t.clone()))
    assert torch.equal(unpack_2bit_rows(pack_2bit_rows(t.to(torch.int8))), t.to(torch.int8))


def test_char_tokenizer_and_pipeline(train_llama, data_dir):
    from transformers import AutoTokenizer, pipeline
    out = train_llama(subln=True, tie_embeddings=True)
    export_main([f"--out_dir={out}", "--format=hf"])
    tok = AutoTokenizer.from_pretrained(out / "hf")
    meta = read_meta(data_dir / "shakespeare_char")
    text = "First Citizen:\nBefore we proceed any further, hear me speak."
    assert tok(text).input_ids == [meta["stoi"][c] for c in text]
    assert tok.decode(tok(text).input_ids) == text
    gen = run_hf(pipeline("text-generation", model=load_hf(out / "hf"), tokenizer=tok),
                 "ROMEO:", max_new_tokens=20, do_sample=False)[0]["generated_text"]
    ours = model_from_checkpoint(load_checkpoint(out / "ckpt.pt")).eval()
    with torch.no_grad():
        ids = generate(ours, torch.tensor([[meta["stoi"][c] for c in "ROMEO:"]]), 20, temperature=0)
    assert gen == "".join(meta["itos"][i] for i in ids[0].tolist())


def test_gpt2_tokenizer_matches_tiktoken(train_llama, bpe_data_dir, corpus):
    import tiktoken
    from transformers import AutoTokenizer, pipeline
    out = train_llama(data_dir=str(bpe_data_dir), dataset="shakespeare", max_iters=10,
                      lr_decay_iters=10, eval_interval=10, subln=True, tie_embeddings=True)
    export_main([f"--out_dir={out}", "--format=hf"])
    tok = AutoTokenizer.from_pretrained(out / "hf")
    text = corpus.read_text()[-3000:]
    enc = tiktoken.get_encoding("gpt2")
    assert tok(text).input_ids == enc.encode(text)
    assert tok.decode(tok(text).input_ids) == text
    config = json.loads((out / "hf" / "config.json").read_text())
    assert (config["vocab_size"], config["eos_token_id"]) == (50304, 50256)
    gen = run_hf(pipeline("text-generation", model=load_hf(out / "hf"), tokenizer=tok),
                 "ROMEO:", max_new_tokens=8, do_sample=False)[0]["generated_text"]
    ours = model_from_checkpoint(load_checkpoint(out / "ckpt.pt")).eval()
    with torch.no_grad():
        ids = generate(ours, torch.tensor([enc.encode("ROMEO:")]), 8, temperature=0)
    assert gen == enc.decode(ids[0].tolist())


def test_unexportable_models_and_options_are_refused(tiny_cfg, tmp_path, capsys):
    train(dict(tiny_cfg, max_iters=2))  # a GPT
    with pytest.raises(SystemExit, match="--embed_int8 is for --format=packed or gguf"):
        export_main([f"--out_dir={tiny_cfg['out_dir']}", "--format=hf", "--embed_int8=True"])
    with pytest.raises(SystemExit, match="format 'onnx' is not one of"):
        export_main([f"--out_dir={tiny_cfg['out_dir']}", "--format=onnx"])
    args = dict(n_embd=64, ffn_hidden=130, n_head=4, n_kv_head=4, bitlinear=True)
    with pytest.raises(ExportError, match="multiple of 4.*'ffn_hidden': 130"):
        check_exportable(args)
    check_exportable(dict(args, bitlinear=False))  # float models have no packing constraint


def test_export_never_overwrites_a_folder_it_did_not_write(train_llama, tmp_path):
    out = train_llama(subln=True, tie_embeddings=True)
    keep = tmp_path / "notes"
    keep.mkdir()
    (keep / "thesis.txt").write_text("precious")
    with pytest.raises(SystemExit, match="is not an exported model folder"):
        export_main([f"--out_dir={out}", "--format=hf", f"--to={keep}"])
    assert (keep / "thesis.txt").read_text() == "precious"
    dst = tmp_path / "hf"
    export_main([f"--out_dir={out}", "--format=hf", f"--to={dst}"])
    export_main([f"--out_dir={out}", "--format=hf", f"--to={dst}"])  # again: replaced whole
    assert sorted(p.name for p in dst.iterdir()) == [
        "bitgpt_export.json", "config.json", "generation_config.json", "model.safetensors",
        "tokenizer.json", "tokenizer_config.json"]
    assert not list(tmp_path.glob(".hf*"))


def test_import_back_gives_the_same_model_and_fine_tunes(train_llama, data_dir, tiny_cfg):
    out = train_llama(mlp="relu2", subln=True, tie_embeddings=True)
    export_main([f"--out_dir={out}", "--format=hf", f"--to={out}/hf_import"])
    args, state = load_init_weights(out / "hf_import", "llama")
    original = model_from_checkpoint(load_checkpoint(out / "ckpt.pt")).eval()
    assert all(getattr(original.config, k) == v for k, v in args.items())
    imported = build_model("llama", args).eval()
    imported.load_state_dict(state)
    for key in ("layers.0.attention.wk.weight", "layers.1.feed_forward.w2.weight"):
        (t1, s1), (t2, s2) = ternarize(state[key]), ternarize(original.state_dict()[key])
        assert torch.equal(t1, t2) and torch.allclose(s1, s2, rtol=1e-6, atol=0)
    ids = val_ids(data_dir, 64)
    with torch.no_grad():
        torch.testing.assert_close(imported(ids, targets=ids)[0], original(ids, targets=ids)[0],
                                   atol=1e-4, rtol=0)
    # train.py starts a run from the folder as from the checkpoint: the same val loss at step 0
    cfg = dict(tiny_cfg, arch="llama", max_iters=0, eval_iters=2)
    from_hf = train(dict(cfg, init_from=str(out / "hf_import")))["val"]
    from_ckpt = train(dict(cfg, init_from=str(out / "ckpt.pt"), out_dir=cfg["out_dir"] + "2")
                        )["val"]
    assert abs(from_hf - from_ckpt) < 1e-4 and from_hf < 3.0  # trained: a fresh init is ln 65


def test_import_errors_are_one_line(train_llama, bpe_data_dir, tiny_cfg, tmp_path):
    out = train_llama(data_dir=str(bpe_data_dir), dataset="shakespeare", max_iters=10,
                      lr_decay_iters=10, eval_interval=10, subln=True, tie_embeddings=True)
    export_main([f"--out_dir={out}", "--format=hf"])
    with pytest.raises(SystemExit, match=r"vocabulary \(50304\) is not dataset "
                                         r"'shakespeare_char''s \(65\)"):
        train_main([f"--data_dir={tiny_cfg['data_dir']}", "--arch=llama", "--device=cpu",
                    f"--init_from={out / 'hf'}", f"--out_dir={tmp_path / 'o'}"])
    with pytest.raises(SystemExit, match="add --arch=llama"):
        train_main([f"--data_dir={bpe_data_dir}", "--dataset=shakespeare", "--device=cpu",
                    f"--init_from={out / 'hf'}", f"--out_dir={tmp_path / 'o'}"])
    with pytest.raises(SystemExit, match="not 'scratch', 'resume', or the path"):
        train_main([f"--init_from={tmp_path / 'nothing'}"])
    broken = tmp_path / "broken"
    shutil.copytree(out / "hf", broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # a download cut short
    args = [f"--data_dir={bpe_data_dir}", "--dataset=shakespeare", "--device=cpu", "--arch=llama",
            f"--init_from={broken}", f"--out_dir={tmp_path / 'o'}"]
    with pytest.raises(SystemExit, match="model.safetensors' is not a readable safetensors"):
        train_main(args)
    (broken / "config.json").write_text('{"model_type": "bitnet", "hidden_')
    with pytest.raises(SystemExit, match="config.json' is not a readable transformers config"):
        train_main(args)
