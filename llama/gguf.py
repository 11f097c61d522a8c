"""A LLaMA-architecture BitGPT model as a GGUF file for llama.cpp (the file, its tensor types and
its tokenizer: bitlinear/gguf.py; the GPT's tensors: gpt/gguf.py).

    python export.py --out_dir=out --format=gguf --to=out/model.gguf [--qtype=tq1_0]

Which llama.cpp architecture runs our LLaMA's forward:
    subln=True   'bitnet': sub-norms before attn_output and ffn_down; its head is always the
                 token embedding, so the model needs tie_embeddings=True
    subln=False  'llama': a tied head, or its own output.weight. llama.cpp's LLaMA RoPE rotates
                 adjacent pairs where ours (and its 'bitnet') rotates halves, so the wq and wk
                 rows are permuted within each head: q.k, and so attention, is unchanged
Both graphs compute SwiGLU: mlp='relu2' models export to --format=hf only, and bit_norm has no
counterpart here. Ternary projections are blocks with d = 1, and the tensor's scale
mean|W| = 1/s_w goes, exact, into an F32 '<name>.scale' tensor that these graphs multiply the
output by; every row length (n_embd, ffn_hidden) must fill whole blocks. llama.cpp quantizes the
inputs of those matmuls per block (Q8_K of 256, Q8_0 of 32), not per token as we do, and keeps K
and V in fp16: its logits are close to ours, not equal.
Float models (bitlinear=False) are written with F16 (or F32) projections and no shape constraint.
"""

import numpy as np
import torch

from bitlinear.gguf import Tensors, add_tokenizer, check_rows, gguf_file
from bitlinear.hf import ExportError
from bitlinear.layer import ternarize
from llama.hf import LINEARS

NAMES = {"attention_norm": "attn_norm", "ffn_norm": "ffn_norm",
         "attention.sub_norm": "attn_sub_norm", "feed_forward.sub_norm": "ffn_sub_norm",
         "attention.wq": "attn_q", "attention.wk": "attn_k", "attention.wv": "attn_v",
         "attention.wo": "attn_output", "feed_forward.w1": "ffn_gate",
         "feed_forward.w3": "ffn_up", "feed_forward.w2": "ffn_down"}
TOP = {"tok_embeddings": "token_embd", "norm": "output_norm", "output": "output"}


def check_exportable(args, qtype="tq2_0"):
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
        check_rows({"n_embd": args["n_embd"], "ffn_hidden": args["ffn_hidden"]}, qtype)


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


def add_hparams(writer, args):
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


def llama_cpp_rows(w, kind, args, arch):
    """llama.cpp's 'llama' RoPE pairs adjacent dims: the rows of wq and wk permuted per head."""
    if arch == "llama" and kind in ("wq", "wk"):
        return rope_pairs_adjacent(w, args["n_head"] if kind == "wq" else args["n_kv_head"])
    return w


@torch.no_grad()
def add_tensors(out, model, args, arch):
    """out: a Tensors. Ternary projections with d = 1 and their exact scale beside them."""
    ternary = args.get("bitlinear", True)
    for key, w in model.state_dict().items():
        if key == "output.weight" and args["tie_embeddings"]:
            continue
        name, kind = gguf_name(key), key.rsplit(".", 2)[-2]
        if kind in LINEARS and ternary:
            t, s = ternarize(w)  # before any permutation: the scale is the checkpoint's to the bit
            out.ternary(name, llama_cpp_rows(t, kind, args, arch))
            out.writer.add_tensor(name.replace(".weight", ".scale"),
                                  np.array([1.0 / s.item()], dtype=np.float32))
        elif key in ("tok_embeddings.weight", "output.weight"):
            out.add(name, w, out.embed)
        elif kind in LINEARS:
            out.add(name, llama_cpp_rows(w, kind, args, arch), out.float)
        else:
            out.norm(name, w)


def save_gguf(model, args, meta, path, qtype="tq2_0", float_dtype="fp16", embed_int8=False):
    """Write the LLaMA model's GGUF file; returns a summary."""
    check_exportable(args, qtype)
    arch = "bitnet" if args["subln"] else "llama"
    with gguf_file(path, arch) as writer:
        add_hparams(writer, args)
        add_tokenizer(writer, meta, args["vocab_size"])
        out = Tensors(writer, qtype, float_dtype, embed_int8)
        add_tensors(out, model, args, arch)
    return {"arch": arch, "embed": out.embed.name}
