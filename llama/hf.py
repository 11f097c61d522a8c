"""A LLaMA-architecture BitGPT model as a HuggingFace transformers folder (the folder itself, its
ternary packing and its tokenizer: bitlinear/hf.py; the import, train.py --init_from=FOLDER:
llama/hf_import.py).

    python export.py --out_dir=out --format=hf --to=out/hf
    python -c "from transformers import pipeline; print(pipeline('text-generation', 'out/hf')('A'))"

Which transformers class runs our forward exactly:
    subln=True   BitNetForCausalLM (model_type 'bitnet', BitNet b1.58 2B4T's shape: sub-norms
                 before o_proj and down_proj)
    subln=False  LlamaForCausalLM
    mlp          'swiglu' -> hidden_act 'silu', 'relu2' -> hidden_act 'relu2' (both gated)
Ternary models carry the bitnet quantization config, which packs the seven projections.
"""

import re
from pathlib import Path

import torch

from bitlinear.hf import (
    HF_DTYPES,
    ExportError,
    bitnet_quantization,
    put_ternary,
    write_folder,
)
from bitlinear.layer import ternarize
from data.tokenizer import Tokenizer, tokenizer_kind

# our state-dict names -> transformers', inside model.layers.N.
LAYER_NAMES = {
    "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attention.sub_norm": "self_attn.attn_sub_norm", "feed_forward.sub_norm": "mlp.ffn_sub_norm",
    "attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj", "feed_forward.w3": "mlp.up_proj",
    "feed_forward.w2": "mlp.down_proj",
}
TOP_NAMES = {"tok_embeddings": "model.embed_tokens", "norm": "model.norm", "output": "lm_head"}
LINEARS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")


def hf_key(key):
    """'layers.3.attention.wq.weight' -> 'model.layers.3.self_attn.q_proj.weight' (and the
    inner norm of a bit_norm linear, '...wq.norm.weight', -> '...q_proj.rms_norm.weight')."""
    m = re.fullmatch(r"layers\.(\d+)\.(.+?)\.(norm\.)?weight", key)
    if m and m.group(2) in LAYER_NAMES:
        inner = "rms_norm." if m.group(3) else ""
        return f"model.layers.{m.group(1)}.{LAYER_NAMES[m.group(2)]}.{inner}weight"
    top, _, leaf = key.rpartition(".")
    return f"{TOP_NAMES[top]}.{leaf}"


def check_exportable(args):
    if args.get("bitlinear", True):
        sizes = {"n_embd": args["n_embd"], "ffn_hidden": args["ffn_hidden"],
                 "n_kv_head * head_dim": args["n_kv_head"] * args["n_embd"] // args["n_head"]}
        odd = {k: v for k, v in sizes.items() if v % 4}
        if odd:
            raise ExportError(f"transformers packs 4 ternary rows per byte, so every output width "
                              f"must be a multiple of 4; this model has {odd}")


def hf_config(args, meta, dtype):
    """config.json for the model built from args (a LlamaConfig's fields)."""
    ternary = args.get("bitlinear", True)
    bitnet = args["subln"]
    eot = eot_id(meta)
    config = {
        "architectures": ["BitNetForCausalLM" if bitnet else "LlamaForCausalLM"],
        "model_type": "bitnet" if bitnet else "llama",
        "hidden_act": "relu2" if args["mlp"] == "relu2" else "silu",
        "vocab_size": args["vocab_size"], "hidden_size": args["n_embd"],
        "intermediate_size": args["ffn_hidden"], "num_hidden_layers": args["n_layer"],
        "num_attention_heads": args["n_head"], "num_key_value_heads": args["n_kv_head"],
        "head_dim": args["n_embd"] // args["n_head"],
        "max_position_embeddings": args["block_size"], "rms_norm_eps": args["norm_eps"],
        "rope_theta": args["rope_theta"], "tie_word_embeddings": args["tie_embeddings"],
        "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0,
        "bos_token_id": eot if tokenizer_kind(meta) == "gpt2" else None, "eos_token_id": eot,
        "dtype": str(dtype).removeprefix("torch."),
    }
    if ternary:
        config["quantization_config"] = bitnet_quantization(args)
    return config


@torch.no_grad()
def hf_state(model, args, dtype):
    """The model's tensors under transformers' names: ternary projections packed with their
    weight_scale, everything else in dtype."""
    ternary = args.get("bitlinear", True)
    out = {}
    for key, w in model.state_dict().items():
        if key == "output.weight" and args["tie_embeddings"]:
            continue  # tied: transformers keeps only embed_tokens
        name = hf_key(key)
        if ternary and key.rsplit(".", 2)[-2] in LINEARS:
            put_ternary(out, name, *ternarize(w), dtype)
        else:
            out[name] = w.to(dtype)
    return {k: v.contiguous() for k, v in out.items()}


def eot_id(meta):
    """The id of the meta's end-of-text token (GPT-2's, or a tokenizer.json's), else None."""
    kind = tokenizer_kind(meta)
    return 50256 if kind == "gpt2" else Tokenizer(meta).eot_id if kind == "hf" else None


def save_hf(model, args, meta, folder, float_dtype="fp32"):
    """Write the folder (bitlinear/hf.py's write_folder) of a LlamaForCausalLM or
    BitNetForCausalLM."""
    check_exportable(args)
    dtype = HF_DTYPES[float_dtype]
    config = hf_config(args, meta, dtype)
    write_folder(Path(folder), config, meta, args["block_size"], hf_state(model, args, dtype))
    return config
