"""A LLaMA-architecture BitGPT model as a GGUF file for llama.cpp (written with gguf-py).

    python export.py --out_dir=out --format=gguf --to=out/model.gguf [--qtype=tq1_0]

Which llama.cpp architecture runs our forward:
    subln=True   'bitnet': sub-norms before attn_output and ffn_down; its head is always the
                 token embedding, so the model needs tie_embeddings=True
    subln=False  'llama': a tied head, or its own output.weight. llama.cpp's LLaMA RoPE rotates
                 adjacent pairs where ours (and its 'bitnet') rotates halves, so the wq and wk
                 rows are permuted within each head: q.k, and so attention, is unchanged
Both graphs compute SwiGLU: mlp='relu2' models export to --format=hf only, and bit_norm has no
counterpart here. Ternary projections are TQ2_0 (2.06 bits/weight) or TQ1_0 (1.69) blocks of 256
weights with block scale d = 1, and the tensor's scale mean|W| = 1/s_w goes, exact, into an F32
'<name>.scale' tensor that llama.cpp multiplies the output by. A block never spans two rows, so
every row length (n_embd, ffn_hidden) must be a multiple of 256. llama.cpp quantizes the inputs
of those matmuls per 256-value block (Q8_K), not per token as we do, and keeps K and V in fp16:
its logits are close to ours, not equal (RESULTS.md has the agreement). Float models
(bitlinear=False) are written with F16 (or F32) projections and no shape constraint.

Tokenizer: GPT-2 BPE as 'gpt2' (tokens, merges), padded to vocab_size with unused tokens; a
character vocabulary as 'rwkv', llama.cpp's greedy longest-match tokenizer, which over tokens of
one character each is exactly our one-token-per-character encoding.
"""

from pathlib import Path

import numpy as np
import torch

from bitlinear import ternarize
from common import atomic_path
from data.tokenizer import GPT2_EOT, char_tokens, gpt2_vocab, tokenizer_kind
from llama.hf import ExportError

QK = 256  # values per TQ1_0 / TQ2_0 block
NAMES = {"attention_norm": "attn_norm", "ffn_norm": "ffn_norm",
         "attention.sub_norm": "attn_sub_norm", "feed_forward.sub_norm": "ffn_sub_norm",
         "attention.wq": "attn_q", "attention.wk": "attn_k", "attention.wv": "attn_v",
         "attention.wo": "attn_output", "feed_forward.w1": "ffn_gate",
         "feed_forward.w3": "ffn_up", "feed_forward.w2": "ffn_down"}
TOP = {"tok_embeddings": "token_embd", "norm": "output_norm", "output": "output"}
LINEARS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")


def _gguf():
    try:
        import gguf
    except ImportError:
        raise ExportError("--format=gguf needs gguf-py: pip install gguf") from None
    return gguf


def check_exportable(args):
    """Raise ExportError, naming the option, for a model llama.cpp cannot run as we do."""
    if args["mlp"] != "swiglu":
        raise ExportError("llama.cpp's llama and bitnet graphs compute SwiGLU; this model has "
                          "mlp='relu2': export it with --format=hf (BitNetForCausalLM)")
    if args.get("bit_norm"):
        raise ExportError("llama.cpp has no RMSNorm inside its linears (bit_norm=True): export "
                          "this model with --format=hf")
    if args["subln"] and not args["tie_embeddings"]:
        raise ExportError("llama.cpp's 'bitnet' graph (subln=True) uses the token embedding as "
                          "its head; train with tie_embeddings=True to export it")
    if args.get("bitlinear", True):
        rows = {"n_embd": args["n_embd"], "ffn_hidden": args["ffn_hidden"]}
        odd = {k: v for k, v in rows.items() if v % QK}
        if odd:
            raise ExportError(f"TQ1_0/TQ2_0 pack rows in blocks of {QK} weights; {odd} is not a "
                              f"multiple of {QK} (configs/llama_bitnet_5m.py is shaped for it)")


def gguf_name(key):
    """'layers.3.attention.wq.weight' -> 'blk.3.attn_q.weight'."""
    parts = key.split(".")
    if parts[0] == "layers":
        return f"blk.{parts[1]}.{NAMES['.'.join(parts[2:-1])]}.{parts[-1]}"
    return f"{TOP[parts[0]]}.{parts[-1]}"


def rope_pairs_adjacent(w, n_heads):
    """Rows of wq/wk from rotate-half order (i, i + hs/2) to adjacent pairs (2i, 2i + 1)."""
    out, inp = w.shape
    return w.view(n_heads, 2, out // n_heads // 2, inp).transpose(1, 2).reshape(out, inp)


def add_tokenizer(writer, meta, vocab_size):
    gguf = _gguf()
    types = gguf.TokenType
    if tokenizer_kind(meta) == "gpt2":
        tokens, merges = gpt2_vocab()
        eot = tokens.index(GPT2_EOT)
        kinds = [types.CONTROL if i == eot else types.NORMAL for i in range(len(tokens))]
        pad = vocab_size - len(tokens)  # GPT-2's 50257 tokens, the model's rows padded to 50304
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("gpt-2")
        writer.add_token_list(tokens + [f"[PAD{i}]" for i in range(pad)])
        writer.add_token_types(kinds + [types.UNUSED] * pad)
        writer.add_token_merges(merges)
        writer.add_bos_token_id(eot)
        writer.add_eos_token_id(eot)
    else:
        chars = char_tokens(meta)
        writer.add_tokenizer_model("rwkv")
        writer.add_token_list([rwkv_escape(c) for c in chars])
        writer.add_token_types([types.NORMAL] * len(chars))
    writer.add_add_bos_token(False)


def rwkv_escape(ch):
    """A token's text as llama.cpp's rwkv vocabulary stores it (backslash escapes)."""
    escapes = {"\\": "\\\\", "\n": "\\n", "\t": "\\t", "\r": "\\r"}
    if ch in escapes:
        return escapes[ch]
    return f"\\x{ord(ch):02x}" if ord(ch) < 32 else ch


def add_hparams(writer, args, arch):
    head_dim = args["n_embd"] // args["n_head"]
    writer.add_context_length(args["block_size"])
    writer.add_embedding_length(args["n_embd"])
    writer.add_block_count(args["n_layer"])
    writer.add_feed_forward_length(args["ffn_hidden"])
    writer.add_head_count(args["n_head"])
    writer.add_head_count_kv(args["n_kv_head"])
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(args["rope_theta"])
    writer.add_layer_norm_rms_eps(args["norm_eps"])
    writer.add_vocab_size(args["vocab_size"])


@torch.no_grad()
def add_tensors(writer, model, args, arch, qtype, float_type, embed_type):
    gguf = _gguf()
    q = gguf.GGMLQuantizationType
    ternary = args.get("bitlinear", True)
    for key, w in model.state_dict().items():
        if key == "output.weight" and args["tie_embeddings"]:
            continue
        name, kind = gguf_name(key), key.rsplit(".", 2)[-2]
        if arch == "llama" and kind in ("wq", "wk"):
            w = rope_pairs_adjacent(w, args["n_head"] if kind == "wq" else args["n_kv_head"])
        if kind in LINEARS and ternary:
            t, s = ternarize(w)
            writer.add_tensor(name, gguf.quants.quantize(t.float().numpy(), qtype), raw_dtype=qtype)
            writer.add_tensor(name.replace(".weight", ".scale"),
                              np.array([1.0 / s.item()], dtype=np.float32))
        else:
            qt = embed_type if key in ("tok_embeddings.weight", "output.weight") else (
                float_type if kind in LINEARS else q.F32)  # norms stay F32
            data = gguf.quants.quantize(w.float().numpy(), qt)
            writer.add_tensor(name, data, raw_dtype=None if qt in (q.F32, q.F16) else qt)


def save_gguf(model, args, meta, path, qtype="tq2_0", float_dtype="fp16", embed_int8=False):
    """Write the GGUF file (atomically: a temporary name, then a rename); returns a summary."""
    gguf = _gguf()
    check_exportable(args)
    q = gguf.GGMLQuantizationType
    arch = "bitnet" if args["subln"] else "llama"
    qt = q.TQ2_0 if qtype == "tq2_0" else q.TQ1_0
    float_type = q.F32 if float_dtype == "fp32" else q.F16
    embed_type = q.Q8_0 if embed_int8 else float_type
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        writer = gguf.GGUFWriter(str(tmp), arch)
        writer.add_name(f"BitGPT {arch}")
        add_hparams(writer, args, arch)
        add_tokenizer(writer, meta, args["vocab_size"])
        add_tensors(writer, model, args, arch, qt, float_type, embed_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return {"arch": arch, "embed": embed_type.name}
