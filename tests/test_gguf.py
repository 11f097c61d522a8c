"""Export to GGUF (llama/gguf.py, gpt/gguf.py, bitlinear/gguf.py), read back with gguf-py and run
by llama.cpp (llama-cpp-python).

The ternary weights must come back bit for bit (the GPT's with its scale as each block's fp16 d).
llama.cpp's logits are compared with BitGPT's integer inference path on real validation text.
They are close, not equal: llama.cpp quantizes the inputs of its ternary matmuls per block (Q8_K
of 256 values; Q8_0 of 32 beside Q4_0) where we quantize per token, keeps K and V in fp16, and its
gpt2 graph computes the tanh approximation of GELU. Stated bounds: top-1 agreement >= 95% of
positions, max abs logit error < 0.1.
Tokenizers: llama.cpp must tokenize as ours do (characters, GPT-2 BPE through tiktoken, and
byte-level BPE tokenizer.json files trained here with the tokenizers library).
"""

from dataclasses import asdict

import numpy as np
import pytest
import torch

from bitlinear.gguf import LLAMA3_SPLIT
from bitlinear.hf import ExportError
from bitlinear.inference import to_integer
from bitlinear.layer import ternarize
from bitlinear.pack import pack_q4_0, pack_tq1_0, pack_tq2_0
from common import build_model, load_checkpoint, model_from_checkpoint
from data.loader import read_meta
from export import main as export_main
from gpt.gguf import check_exportable as check_gpt
from gpt.gguf import save_gguf as save_gpt_gguf
from llama.gguf import check_exportable, rope_pairs_adjacent
from llama.gguf import save_gguf as save_llama_gguf
from llama.model import apply_rotary_emb, precompute_rope
from tests.test_hf import val_ids
from tools.bench_export import main as bench_main
from train import DEFAULTS, resolve, train

gguf = pytest.importorskip("gguf", reason="gguf-py is not installed: pip install -r "
                           "requirements-dev.txt (CI installs it)")

BITNET = dict(subln=True, tie_embeddings=True)  # llama.cpp arch 'bitnet'
LLAMA = dict()  # arch 'llama': untied head, grouped-query attention (n_kv_head=2)
GPT = dict()  # arch 'gpt2', no biases (zeros written)
TOP1, MAX_ERR = 0.95, 0.1
# Q8_0 rounds embeddings and head per 32 values and llama.cpp rounds the head's input to 8 bits
# as well, so those files agree less closely, by an amount that moves with the CPU's kernels.
MAX_ERR_Q8 = 0.2


@pytest.fixture(scope="session")
def train_gpt(data_dir, tmp_path_factory):
    """train_gpt(**overrides) -> out_dir of a small GPT (width 256: whole TQ blocks) trained on
    real text, once per set of overrides."""
    done = {}

    def run(**over):
        key = tuple(sorted(over.items()))
        if key not in done:
            out = tmp_path_factory.mktemp("gpt")
            cfg = dict(DEFAULTS, arch="gpt", out_dir=str(out), data_dir=str(data_dir),
                       device="cpu", compile=False, n_layer=2, n_head=4, n_embd=256,
                       block_size=64, batch_size=8, max_iters=80, lr_decay_iters=80,
                       warmup_iters=10, eval_interval=80, eval_iters=2, log_interval=80,
                       learning_rate=2e-3)
            train(resolve(dict(cfg, **over)))
            done[key] = out
        return done[key]
    return run


def llama_cpp():
    return pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed: pip "
                               "install -r requirements-llamacpp.txt (builds llama.cpp; CI does)")


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
    heads, hs, T = 2, 8, 5
    x, wq, wk = torch.randn(T, 16), torch.randn(heads * hs, 16), torch.randn(heads * hs, 16)
    cos, sin = precompute_rope(hs, T)

    def scores(wq, wk, rope):
        q, k = ((x @ w.T).view(T, heads, hs).transpose(0, 1) for w in (wq, wk))
        return rope(q, cos, sin) @ rope(k, cos, sin).transpose(-1, -2)
    permuted = rope_pairs_adjacent(wq, heads), rope_pairs_adjacent(wk, heads)
    torch.testing.assert_close(scores(*permuted, adjacent_rope),
                               scores(wq, wk, apply_rotary_emb))


@pytest.mark.parametrize("qtype,bits,width", [("tq2_0", 2.0625, 256), ("tq1_0", 1.6875, 256),
                                              ("q4_0", 4.5, 128)])
def test_gpt_weights_round_trip_with_the_scale_in_each_block(train_gpt, qtype, bits, width):
    out = train_gpt(**GPT) if width == 256 else train_gpt(n_embd=width)
    reader = gguf.GGUFReader(export_gguf(out, f"--qtype={qtype}"))
    tensors = {t.name: t for t in reader.tensors}
    state = load_checkpoint(out / "ckpt.pt")["model"]
    for ours, theirs in [("transformer.h.1.mlp.c_proj", "blk.1.ffn_down"),
                         ("transformer.h.0.attn.c_attn", "blk.0.attn_qkv")]:
        w = state[ours + ".weight"]
        t, s = ternarize(w)
        stored = tensors[theirs + ".weight"]
        assert stored.tensor_type.name == qtype.upper()
        assert stored.n_bytes * 8 / w.numel() == bits
        values = gguf.quants.dequantize(stored.data, stored.tensor_type).reshape(w.shape)
        d = np.float16(1 / s.item()).astype(np.float32)  # mean|W| rounded to fp16, every block
        assert np.array_equal(values, t.float().numpy() * d)
        assert np.array_equal(tensors[theirs + ".bias"].data, np.zeros(w.size(0), np.float32))
    assert not [name for name in tensors if name.endswith(".scale")]  # gpt2 would ignore some
    assert np.array_equal(tensors["blk.1.attn_norm.weight"].data,
                          state["transformer.h.1.ln_1.weight"].numpy())
    assert np.array_equal(tensors["position_embd.weight"].data,
                          state["transformer.wpe.weight"].half().numpy())
    assert "output.weight" not in tensors  # the head is token_embd, as ours is tied
    field = lambda key: reader.get_field(key).contents()  # noqa: E731
    assert field("general.architecture") == "gpt2"
    assert field("gpt2.context_length") == 64 and field("gpt2.embedding_length") == width
    assert np.float32(field("gpt2.attention.layer_norm_epsilon")) == np.float32(1e-5)


@pytest.mark.parametrize("d", [1.0, 0.0123])
def test_tq_packing_is_ggmls(d):
    """pack_tq2_0 / pack_tq1_0 write the bytes gguf-py's own quantizer writes for the values d*t
    (a block of all zeros aside: gguf-py stores d = 0 there, we store d); pack_q4_0's blocks
    (which gguf-py's Q4_0 quantizer would not make: its scale is max/-8, so +1 is not a step)
    read back as d*t."""
    t = torch.randint(-1, 2, (6, 512), generator=torch.Generator().manual_seed(0), dtype=torch.int8)
    d = float(np.float16(d))
    for pack, qtype in [(pack_tq2_0, gguf.GGMLQuantizationType.TQ2_0),
                        (pack_tq1_0, gguf.GGMLQuantizationType.TQ1_0)]:
        ours = pack(t, d).numpy()
        assert np.array_equal(ours, gguf.quants.quantize(t.float().numpy() * np.float32(d),
                                                         qtype))
        assert np.array_equal(gguf.quants.dequantize(ours, qtype), t.float().numpy() * d)
    q4 = pack_q4_0(t, d).numpy()
    assert q4.shape == (6, 512 // 32 * 18)
    assert np.array_equal(gguf.quants.dequantize(q4, gguf.GGMLQuantizationType.Q4_0),
                          t.float().numpy() * d)
    with pytest.raises(ValueError, match="multiple of 256"):
        pack_tq2_0(t[:, :300], 1.0)


@pytest.mark.parametrize("arch,over,args", [
    ("llama", BITNET, ["--qtype=tq2_0"]),
    ("llama", LLAMA, ["--qtype=tq2_0", "--embed_int8=True"]),
    ("llama", dict(BITNET, bitlinear=False), []),
    ("gpt", GPT, ["--qtype=tq2_0"]),
    ("gpt", dict(bias=True), ["--qtype=tq2_0", "--embed_int8=True"]),
    ("gpt", dict(bitlinear=False), []),
    ("gpt", dict(n_embd=128), ["--qtype=q4_0"]),
], ids=["bitnet_tq2", "llama_q8_embeddings", "float_bitnet", "gpt_tq2", "gpt_bias_q8_embeddings",
        "float_gpt", "gpt_default_width_q4"])
def test_llama_cpp_agrees_with_integer_inference(request, data_dir, arch, over, args):
    out = request.getfixturevalue(f"train_{arch}")(**over)
    ids = val_ids(data_dir, 64)[0].tolist()
    theirs, llm = llama_cpp_logits(export_gguf(out, *args), ids)
    llm.close()
    ours = our_logits(out, ids)
    assert theirs.shape == ours.shape
    assert (theirs.argmax(-1) == ours.argmax(-1)).mean() >= TOP1
    assert np.abs(theirs - ours).max() < (MAX_ERR_Q8 if "--embed_int8=True" in args else MAX_ERR)


@pytest.mark.parametrize("arch,over", [("llama", BITNET), ("gpt", GPT)])
def test_tq1_and_tq2_files_give_identical_logits(request, data_dir, arch, over):
    out = request.getfixturevalue(f"train_{arch}")(**over)
    ids = val_ids(data_dir, 32)[0].tolist()
    tq2, llm = llama_cpp_logits(export_gguf(out, "--qtype=tq2_0"), ids)
    llm.close()
    tq1, llm = llama_cpp_logits(export_gguf(out, "--qtype=tq1_0"), ids)
    llm.close()
    assert np.array_equal(tq1, tq2)
    assert export_gguf(out, "--qtype=tq1_0").stat().st_size < export_gguf(out).stat().st_size


@pytest.mark.parametrize("arch,over", [("llama", BITNET), ("gpt", GPT)])
def test_llama_cpp_tokenizes_and_generates_characters(request, data_dir, arch, over):
    out = request.getfixturevalue(f"train_{arch}")(**over)
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


@pytest.mark.parametrize("arch,over", [("llama", BITNET), ("gpt", GPT)])
def test_llama_cpp_tokenizes_gpt2_like_tiktoken(request, bpe_data_dir, corpus, arch, over):
    import tiktoken
    out = request.getfixturevalue(f"train_{arch}")(
        data_dir=str(bpe_data_dir), dataset="shakespeare", max_iters=10, lr_decay_iters=10,
        eval_interval=10, **over)
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


def bpe_tokenizer(corpus, split):
    """A byte-level BPE tokenizer.json of 1000 tokens trained on the corpus (seconds), with
    GPT-2's split rule or LLaMA 3's."""
    tk = pytest.importorskip("tokenizers", reason="tokenizers is not installed: pip install -r "
                             "requirements-dev.txt")
    if split == "gpt2":
        tok = tk.Tokenizer(tk.models.BPE())
        tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:  # LLaMA 3's: its own regex, then bytes mapped without a second split
        tok = tk.Tokenizer(tk.models.BPE(ignore_merges=True))
        tok.pre_tokenizer = tk.pre_tokenizers.Sequence([
            tk.pre_tokenizers.Split(tk.Regex(LLAMA3_SPLIT), behavior="isolated"),
            tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(vocab_size=1000, special_tokens=["<|endoftext|>"],
                                     initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
                                     show_progress=False)
    text = corpus.read_text()
    tok.train_from_iterator([text[i:i + 10000] for i in range(0, len(text), 10000)], trainer)
    return tok


def hf_meta_of(tok):
    """A dataset meta for a tokenizer.json (data/tokenizer.py's format, kind 'hf')."""
    return {"vocab_size": tok.get_vocab_size(), "tokenizer": "hf", "tokenizer_json": tok.to_str(),
            "eot_token": "<|endoftext|>"}


def tiny_float_gguf(tmp_path, arch, meta, vocab_size=1024):
    """A GGUF file of an untrained float model (any width) with meta's tokenizer."""
    args = dict(block_size=32, vocab_size=vocab_size, n_layer=1, n_head=2, n_embd=32,
                bitlinear=False)
    save_gguf = save_gpt_gguf
    if arch == "llama":
        save_gguf = save_llama_gguf
        args |= dict(n_kv_head=2, ffn_hidden=64, subln=True, tie_embeddings=True)
    model = build_model(arch, args)
    save_gguf(model, asdict(model.config), meta, tmp_path / f"{arch}.gguf")
    return tmp_path / f"{arch}.gguf"


@pytest.mark.parametrize("split", ["gpt2", "llama3"])
@pytest.mark.parametrize("arch", ["gpt", "llama"])
def test_llama_cpp_tokenizes_a_tokenizer_json_like_tokenizers(tmp_path, corpus, split, arch):
    tok = bpe_tokenizer(corpus, split)
    meta = hf_meta_of(tok)
    llm = llama_cpp().Llama(model_path=str(tiny_float_gguf(tmp_path, arch, meta)),
                            vocab_only=True, verbose=False)
    try:
        text = corpus.read_text()[-3000:] + " 2024 and 123456, naïve Ünïcödé\t\ttabs   spaces\n\n"
        tokens = llm.tokenize(text.encode(), add_bos=False)
        assert tokens == tok.encode(text, add_special_tokens=False).ids
        assert llm.detokenize(tokens).decode() == text
        assert llm.n_vocab() == 1024  # 1000 tokens and unused padding, as the model's rows
        assert llm.token_eos() == tok.token_to_id("<|endoftext|>")
    finally:
        llm.close()


def test_tokenizers_llama_cpp_cannot_run_are_refused_in_one_line(tmp_path, corpus):
    tk = pytest.importorskip("tokenizers")
    tok = bpe_tokenizer(corpus, "gpt2")
    meta = hf_meta_of(tok)
    tok.pre_tokenizer = tk.pre_tokenizers.Metaspace()  # SentencePiece-style words
    with pytest.raises(ExportError, match="byte-level BPE.*has a pre-tokenizer of another "
                       "kind: export with --format=hf"):
        tiny_float_gguf(tmp_path, "gpt", hf_meta_of(tok))
    wordpiece = tk.Tokenizer(tk.models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    with pytest.raises(ExportError, match="a WordPiece model"):
        tiny_float_gguf(tmp_path, "gpt", hf_meta_of(wordpiece))
    with pytest.raises(ExportError, match="1000 tokens, more than the model's vocab_size 512"):
        tiny_float_gguf(tmp_path, "gpt", meta, vocab_size=512)
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_unexportable_models_are_refused_in_one_line(train_llama, train_gpt):
    args = dict(mlp="swiglu", subln=True, tie_embeddings=True, n_embd=256, ffn_hidden=512)
    check_exportable(args)
    for bad, msg in [(dict(mlp="relu2"), "compute SwiGLU.*--format=hf"),
                     (dict(bit_norm=True), "bit_norm=True"),
                     (dict(tie_embeddings=False), "train with tie_embeddings=True"),
                     (dict(ffn_hidden=704), "'ffn_hidden': 704.* multiple of 256")]:
        with pytest.raises(ExportError, match=msg):
            check_exportable(dict(args, **bad))
    check_exportable(dict(args, ffn_hidden=704, bitlinear=False))  # float: no blocks to fill
    check_gpt(dict(n_embd=768))
    for bad, msg in [(dict(bit_norm=True), "bit_norm=True"),
                     (dict(n_embd=384), "'n_embd': 384.* multiple of 256.*gpt_3m")]:
        with pytest.raises(ExportError, match=msg):
            check_gpt({"n_embd": 768, **bad})
    check_gpt(dict(n_embd=384, bitlinear=False))
    check_gpt(dict(n_embd=128), "q4_0")  # the default GPT's width: blocks of 32
    with pytest.raises(ExportError, match="'n_embd': 128.*--qtype=q4_0"):
        check_gpt(dict(n_embd=128))
    with pytest.raises(ExportError, match="Q4_0 packs rows in blocks of 32.*'n_embd': 48"):
        check_gpt(dict(n_embd=48), "q4_0")
    for out in (train_llama(**BITNET), train_gpt(**GPT)):
        with pytest.raises(SystemExit, match="not 'tq2_0', 'tq1_0' or 'q4_0'"):
            export_main([f"--out_dir={out}", "--format=gguf", "--qtype=q8_0"])
        with pytest.raises(SystemExit, match="not bf16"):
            export_main([f"--out_dir={out}", "--format=gguf", "--float_dtype=bf16"])


def test_bench_export_fits_the_context_before_any_work(train_gpt, monkeypatch):
    import tools.bench_export as bench_export
    cfg = bench_export.DEFAULTS
    assert bench_export.fit_context(cfg, 64) == dict(cfg, prompt_tokens=32, new_tokens=31)
    monkeypatch.setattr(bench_export, "export_main", lambda argv: pytest.fail("exported"))
    with pytest.raises(SystemExit, match=r"\(60 \+ 4\) must be below the model's block_size=64"):
        bench_main([f"--ckpt={train_gpt(**GPT) / 'ckpt.pt'}", "--prompt_tokens=60",
                    "--new_tokens=4"])


@pytest.mark.parametrize("arch,over", [("llama", BITNET), ("gpt", GPT), ("gpt", dict(n_embd=128))],
                         ids=["bitnet", "gpt", "gpt_default_width"])
def test_bench_export_measures_every_file_and_path(request, arch, over):
    llama_cpp()
    out = request.getfixturevalue(f"train_{arch}")(**over)
    r = bench_main([f"--ckpt={out / 'ckpt.pt'}", "--val_windows=2", "--prompt_tokens=8",
                    "--new_tokens=4", "--repeats=1", "--gen_tokens=8"])
    sizes = r["sizes"]
    hf_err, _, hf_top1 = r["agreement"]["transformers vs BitGPT's integer path"]
    assert hf_err <= 1e-5 and hf_top1 == 1.0
    if over.get("n_embd") == 128:  # fills no TQ block: Q4_0's blocks of 32
        assert set(sizes) == {"model.bitnet", "hf", "q4_0.gguf"}
        q4 = r["agreement"]["llama.cpp Q4_0 vs BitGPT's integer path"]
        assert q4[2] >= TOP1 and q4[0] < MAX_ERR
    else:
        assert set(sizes) == {"model.bitnet", "hf", "tq2_0.gguf", "tq1_0.gguf"}
        assert sizes["tq1_0.gguf"] < sizes["tq2_0.gguf"]
        tq2, tq1 = (r["agreement"][f"llama.cpp {q} vs BitGPT's integer path"]
                    for q in ("TQ2_0", "TQ1_0"))
        assert tq1 == tq2 and tq2[2] >= TOP1 and tq2[0] < MAX_ERR
    assert all(p > 0 and d > 0 for p, d in r["speed"].values()) and len(r["speed"]) == 2
    assert [len(t) for t in r["text"].values()] == [len("ROMEO:") + 8] * 2
