"""Export to GGUF (llama/gguf.py), read back with gguf-py and run by llama.cpp (llama-cpp-python).

The ternary weights must come back bit for bit. llama.cpp's logits are compared with BitGPT's
integer inference path on real validation text. They are close, not equal: llama.cpp quantizes
the inputs of its ternary matmuls per block of 256 values (Q8_K) where we quantize per token, and
keeps K and V in fp16. Stated bounds: top-1 agreement >= 95% of positions, max abs logit error
< 0.1 (measured on these models: 100% and 0.0009-0.023).
"""


import numpy as np
import pytest
import torch

from bitlinear import ternarize, to_integer
from common import load_checkpoint, model_from_checkpoint
from data.loader import read_meta
from export import main as export_main
from llama.gguf import ExportError, check_exportable, rope_pairs_adjacent
from tests.test_hf import val_ids

gguf = pytest.importorskip("gguf", reason="gguf-py is not installed: pip install -r "
                           "requirements-dev.txt (CI installs it)")

BITNET = dict(subln=True, tie_embeddings=True)  # llama.cpp arch 'bitnet'
LLAMA = dict()  # arch 'llama': untied head, grouped-query attention (n_kv_head=2)
TOP1, MAX_ERR = 0.95, 0.1


def llama_cpp():
    return pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed: pip "
                               "install -r requirements-dev.txt (CI builds it)")


def export_gguf(out, *args):
    name = "_".join(a.split("=")[1] for a in args) or "default"
    path = out / f"{name}.gguf"
    export_main([f"--out_dir={out}", "--format=gguf", f"--to={path}", *args])
    return path


def llama_cpp_logits(path, ids):
    llm = llama_cpp().Llama(model_path=str(path), logits_all=True, n_ctx=len(ids), n_threads=2,
                            verbose=False)
    try:
        llm.eval(ids)
        return np.array(llm.scores[:len(ids)]), llm
    except Exception:
        llm.close()
        raise


def our_logits(out, ids):
    model = to_integer(model_from_checkpoint(load_checkpoint(out / "ckpt.pt")).eval())
    with torch.no_grad():
        return model(torch.tensor([ids]), targets=torch.tensor([ids]))[0][0].numpy()


@pytest.mark.parametrize("qtype,bits", [("tq2_0", 2.0625), ("tq1_0", 1.6875)])
def test_ternary_weights_round_trip_bit_for_bit(train_llama, qtype, bits):
    out = train_llama(**LLAMA)
    path = export_gguf(out, f"--qtype={qtype}")
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    state = load_checkpoint(out / "ckpt.pt")["model"]
    for ours, theirs, heads in [("layers.1.feed_forward.w2", "blk.1.ffn_down", 0),
                                ("layers.0.attention.wk", "blk.0.attn_k", 2)]:
        w = state[ours + ".weight"]
        t, s = ternarize(w)
        if heads:  # llama.cpp's 'llama' RoPE pairs adjacent dims: rows permuted per head
            t = rope_pairs_adjacent(t, heads)
        stored = tensors[theirs + ".weight"]
        assert stored.tensor_type.name == qtype.upper()
        assert stored.n_bytes * 8 / w.numel() == bits
        values = gguf.quants.dequantize(stored.data, stored.tensor_type).reshape(w.shape)
        assert np.array_equal(values, t.float().numpy())
        assert tensors[theirs + ".scale"].data[0] == np.float32(1 / s.item())
    embd = tensors["token_embd.weight"]
    assert embd.tensor_type.name == "F16"
    assert np.array_equal(embd.data, state["tok_embeddings.weight"].half().numpy())
    assert "output.weight" in tensors  # untied: llama.cpp's 'llama' arch takes its own head


def adjacent_rope(x, cos, sin):
    """llama.cpp's RoPE for its 'llama' arch: pairs (2i, 2i + 1) turn by pos * f_i."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), -1).flatten(-2)


def test_rope_permutation_keeps_attention_scores():
    from llama.model import apply_rotary_emb, precompute_rope
    heads, hs, T = 2, 8, 5
    x, wq, wk = torch.randn(T, 16), torch.randn(heads * hs, 16), torch.randn(heads * hs, 16)
    cos, sin = precompute_rope(hs, T)

    def scores(wq, wk, rope):
        q, k = ((x @ w.T).view(T, heads, hs).transpose(0, 1) for w in (wq, wk))
        return rope(q, cos, sin) @ rope(k, cos, sin).transpose(-1, -2)
    permuted = rope_pairs_adjacent(wq, heads), rope_pairs_adjacent(wk, heads)
    torch.testing.assert_close(scores(*permuted, adjacent_rope),
                               scores(wq, wk, apply_rotary_emb))


@pytest.mark.parametrize("over,args", [
    (BITNET, ["--qtype=tq2_0"]),
    (LLAMA, ["--qtype=tq2_0", "--embed_int8=True"]),
    (dict(BITNET, bitlinear=False), []),
], ids=["bitnet_tq2", "llama_q8_embeddings", "float_bitnet"])
def test_llama_cpp_agrees_with_integer_inference(train_llama, data_dir, over, args):
    out = train_llama(**over)
    ids = val_ids(data_dir, 64)[0].tolist()
    theirs, llm = llama_cpp_logits(export_gguf(out, *args), ids)
    llm.close()
    ours = our_logits(out, ids)
    assert theirs.shape == ours.shape
    assert (theirs.argmax(-1) == ours.argmax(-1)).mean() >= TOP1
    assert np.abs(theirs - ours).max() < MAX_ERR


def test_tq1_and_tq2_files_give_identical_logits(train_llama, data_dir):
    out = train_llama(**BITNET)
    ids = val_ids(data_dir, 32)[0].tolist()
    tq2, llm = llama_cpp_logits(export_gguf(out, "--qtype=tq2_0"), ids)
    llm.close()
    tq1, llm = llama_cpp_logits(export_gguf(out, "--qtype=tq1_0"), ids)
    llm.close()
    assert np.array_equal(tq1, tq2)
    assert export_gguf(out, "--qtype=tq1_0").stat().st_size < export_gguf(out).stat().st_size


def test_llama_cpp_tokenizes_and_generates_characters(train_llama, data_dir):
    out = train_llama(**BITNET)
    meta = read_meta(data_dir / "shakespeare_char")
    llm = llama_cpp().Llama(model_path=str(export_gguf(out)), n_ctx=64, n_threads=2,
                            verbose=False)
    try:
        text = "First Citizen:\nBefore we proceed any further, hear me speak."
        tokens = llm.tokenize(text.encode(), add_bos=False)
        assert tokens == [meta["stoi"][c] for c in text]
        assert llm.detokenize(tokens).decode() == text
        gen = llm("ROMEO:", max_tokens=24, temperature=0)["choices"][0]["text"]
    finally:
        llm.close()
    assert len(gen) == 24 and set(gen) <= set(meta["stoi"])


def test_llama_cpp_tokenizes_gpt2_like_tiktoken(train_llama, bpe_data_dir, corpus):
    import tiktoken
    out = train_llama(data_dir=str(bpe_data_dir), dataset="shakespeare", max_iters=10,
                      lr_decay_iters=10, eval_interval=10, **BITNET)
    llm = llama_cpp().Llama(model_path=str(export_gguf(out)), n_ctx=64, n_threads=2,
                            verbose=False, vocab_only=True)
    try:
        text = corpus.read_text()[-3000:]
        tokens = llm.tokenize(text.encode(), add_bos=False)
        assert tokens == tiktoken.get_encoding("gpt2").encode(text)
        assert llm.detokenize(tokens).decode() == text
        assert llm.n_vocab() == 50304  # GPT-2's 50257 and unused padding, as the model's rows
    finally:
        llm.close()


def test_unexportable_models_are_refused_in_one_line(train_llama):
    args = dict(mlp="swiglu", subln=True, tie_embeddings=True, n_embd=256, ffn_hidden=512)
    check_exportable(args)
    for bad, msg in [(dict(mlp="relu2"), "compute SwiGLU.*--format=hf"),
                     (dict(bit_norm=True), "bit_norm=True"),
                     (dict(tie_embeddings=False), "train with tie_embeddings=True"),
                     (dict(ffn_hidden=704), "'ffn_hidden': 704.* multiple of 256")]:
        with pytest.raises(ExportError, match=msg):
            check_exportable(dict(args, **bad))
    check_exportable(dict(args, ffn_hidden=704, bitlinear=False))  # float: no blocks to fill
    out = train_llama(**BITNET)
    with pytest.raises(SystemExit, match="not 'tq2_0' or 'tq1_0'"):
        export_main([f"--out_dir={out}", "--format=gguf", "--qtype=q4_0"])
    with pytest.raises(SystemExit, match="not bf16"):
        export_main([f"--out_dir={out}", "--format=gguf", "--float_dtype=bf16"])


def test_bench_export_measures_every_file_and_path(train_llama, capsys):
    from tools.bench_export import main as bench_main
    llama_cpp()
    out = train_llama(**BITNET)
    r = bench_main([f"--ckpt={out / 'ckpt.pt'}", "--val_windows=2", "--prompt_tokens=8",
                    "--new_tokens=4", "--repeats=1", "--gen_tokens=8"])
    sizes = r["sizes"]
    assert set(sizes) == {"model.bitnet", "hf", "tq2_0.gguf", "tq1_0.gguf"}
    assert sizes["tq1_0.gguf"] < sizes["tq2_0.gguf"]
    hf_err, _, hf_top1 = r["agreement"]["transformers vs BitGPT's integer path"]
    assert hf_err <= 1e-5 and hf_top1 == 1.0
    tq2, tq1 = (r["agreement"][f"llama.cpp {q} vs BitGPT's integer path"] for q in ("TQ2_0",
                                                                                  "TQ1_0"))
    assert tq1 == tq2 and tq2[2] >= TOP1 and tq2[0] < MAX_ERR
    assert all(p > 0 and d > 0 for p, d in r["speed"].values()) and len(r["speed"]) == 2
    assert [len(t) for t in r["text"].values()] == [len("ROMEO:") + 8] * 2
