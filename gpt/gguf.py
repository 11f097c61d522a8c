"""Our GPT as llama.cpp's 'gpt2' architecture in a GGUF file (the file, its tensor types and its
tokenizer: bitlinear/gguf.py).

    python export.py --out_dir=out --format=gguf --to=out/model.gguf [--qtype=tq1_0|q4_0]

llama.cpp's gpt2 graph is ours: learned positions, LayerNorm with bias, one fused q|k|v matrix,
GELU MLP (4 n_embd), a tied head. It requires every bias, so a bias=False model gets zero ones.
Ternary projections are TQ2_0 or TQ1_0 blocks of 256 weights, or Q4_0 blocks of 32 (the default
GPT's width, 128, fills no block of 256).

The scale. mean|W| = 1/s_w goes into every block's own scale d, an fp16: the one rounding of
this route (relative error below 2^-11, the same for every row). The LLaMA export's F32
'<name>.scale' tensor does not work here: llama.cpp loads one for every gpt2 projection, but its
gpt2 graph applies only attn_qkv's and attn_output's and drops ffn_up's and ffn_down's, and
builds before its generic scale loading refuse tensors they do not expect. ffn_down has no exact
route in this graph (GELU before it, the residual after), and folding attn_qkv's and ffn_up's
scales into the LayerNorm gains before them (our int8 activations do not see a common factor)
comes no closer to our logits than the fp16 d, so every projection takes the one route.

What differs from our forward, besides that: llama.cpp's GELU is the tanh approximation
(computed through an fp16 table), ours the exact erf form unless gelu_approximate='tanh' (GPT-2
imports); llama.cpp quantizes matmul inputs per block (Q8_K of 256, Q8_0 of 32) where we quantize
per token; K and V are kept in fp16; embeddings are F16 (or Q8_0). The logits are close, not
equal. llama.cpp runs a context of at least 256 positions and aborts the process (GGML_ASSERT in
get_rows) when one passes the block_size rows of position_embd: keep prompt + new tokens within
block_size (our sample.py slides its window instead).
"""

import torch

from bitlinear.gguf import Tensors, add_tokenizer, check_rows, gguf_file
from bitlinear.hf import ExportError
from bitlinear.layer import ternarize

LAYER = {"ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output",
         "ln_2": "ffn_norm", "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}


def check_exportable(args, qtype="tq2_0"):
    """Raise ExportError, naming the option, for a GPT llama.cpp cannot run as we do."""
    if args.get("bit_norm"):
        raise ExportError("llama.cpp has no RMSNorm inside its linears (bit_norm=True): export "
                          "this model with --format=packed")
    if args.get("bitlinear", True):
        check_rows({"n_embd": args["n_embd"]}, qtype)  # every row: n_embd, or 4 n_embd


def add_hparams(writer, args, eps):
    writer.add_context_length(args["block_size"])  # the rows of position_embd
    writer.add_embedding_length(args["n_embd"])
    writer.add_block_count(args["n_layer"])
    writer.add_feed_forward_length(4 * args["n_embd"])
    writer.add_head_count(args["n_head"])
    writer.add_layer_norm_eps(eps)
    writer.add_vocab_size(args["vocab_size"])


@torch.no_grad()
def add_tensors(out, model, args):
    """out: a Tensors. Every LayerNorm and linear with its bias (zeros where ours has none)."""
    sd = model.state_dict()
    ternary = args.get("bitlinear", True)

    def layer(ours, theirs, linear):
        w = sd[f"{ours}.weight"]
        bias = sd.get(f"{ours}.bias", torch.zeros(w.size(0)))
        if linear and ternary:
            t, s = ternarize(w)
            out.ternary(f"{theirs}.weight", t, 1 / s.item())
        else:
            out.add(f"{theirs}.weight", w, out.float if linear else out.q.F32)
        out.norm(f"{theirs}.bias", bias)

    out.add("token_embd.weight", sd["transformer.wte.weight"], out.embed)  # and the head
    out.add("position_embd.weight", sd["transformer.wpe.weight"], out.embed)
    for i in range(args["n_layer"]):
        for ours, theirs in LAYER.items():
            layer(f"transformer.h.{i}.{ours}", f"blk.{i}.{theirs}", not ours.startswith("ln"))
    layer("transformer.ln_f", "output_norm", False)


def save_gguf(model, args, meta, path, qtype="tq2_0", float_dtype="fp16", embed_int8=False):
    """Write the GPT's GGUF file; returns a summary."""
    check_exportable(args, qtype)
    with gguf_file(path, "gpt2") as writer:
        add_hparams(writer, args, model.transformer.ln_f.eps)
        add_tokenizer(writer, meta, args["vocab_size"])
        out = Tensors(writer, qtype, float_dtype, embed_int8)
        add_tensors(out, model, args)
    return {"arch": "gpt2", "embed": out.embed.name}
