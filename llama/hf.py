"""A LLaMA-architecture BitGPT model as a HuggingFace transformers folder (and back: the import,
train.py --init_from=FOLDER, is llama/hf_import.py).

    python export.py --out_dir=out --format=hf --to=out/hf
    python -c "from transformers import pipeline; print(pipeline('text-generation', 'out/hf')('A'))"

Which transformers class runs our forward exactly:
    subln=True   BitNetForCausalLM (model_type 'bitnet', BitNet b1.58 2B4T's shape: sub-norms
                 before o_proj and down_proj)
    subln=False  LlamaForCausalLM
    mlp          'swiglu' -> hidden_act 'silu', 'relu2' -> hidden_act 'relu2' (both gated)
Ternary models carry transformers' bitnet quantization config (linear_class 'bitlinear', offline):
the seven projections are uint8 (out/4, in), value + 1 in 2 bits, row i*R + r in packed row r at
bits 2i..2i+1 (R = out/4), each with weight_scale = 1/mean|W|, the s_w that our BitLinear divides
by (the 'autobitlinear' class multiplies by mean|W| instead). Its activations are per-token absmax
int8 like ours. bit_norm=True maps to the config's use_rms_norm. Float models (bitlinear=False)
are plain checkpoints of the same class. Loading a ternary folder needs `pip install accelerate`.
The tokenizer goes beside it as tokenizer.json: characters and GPT-2 BPE rebuilt from the meta,
any other tokenizer (meta kind 'hf') as the very file it was prepared with.
"""

import json
import re
from pathlib import Path

import torch

from bitlinear import ternarize
from bitlinear.pack import pack_2bit_rows
from common import UserError
from data.tokenizer import GPT2_EOT, Tokenizer, char_tokens, gpt2_vocab, tokenizer_kind

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
HF_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class ExportError(UserError):
    """A model or option a target format cannot represent; the message says which and why."""


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
        config["quantization_config"] = {
            "quant_method": "bitnet", "linear_class": "bitlinear", "quantization_mode": "offline",
            "use_rms_norm": args.get("bit_norm", False), "rms_norm_eps": 1e-6,
            "modules_to_not_convert": ["lm_head"]}
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
            t, s = ternarize(w)
            out[name] = pack_2bit_rows(t)
            out[name + "_scale"] = s.reshape(1).to(dtype)  # (1,): transformers refuses a 0-d
        else:
            out[name] = w.to(dtype)
    return {k: v.contiguous() for k, v in out.items()}


def generation_config(config):
    return {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"],
            "do_sample": True, "temperature": 0.8, "top_k": 200}


def eot_id(meta):
    """The id of the meta's end-of-text token (GPT-2's, or a tokenizer.json's), else None."""
    kind = tokenizer_kind(meta)
    return 50256 if kind == "gpt2" else Tokenizer(meta).eot_id if kind == "hf" else None


def tokenizer_files(meta, block_size):
    """{filename: json object or text}: tokenizer.json (rebuilt for GPT-2 BPE or characters, the
    prepared file itself for any other) and the tokenizer_config.json that makes it
    transformers' PreTrainedTokenizerFast."""
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": block_size,
              "clean_up_tokenization_spaces": False}
    if tokenizer_kind(meta) == "hf":  # its end-of-text token is the one transformers stops at
        eos = {"eos_token": meta["eot_token"]} if meta.get("eot_token") else {}
        return {"tokenizer.json": meta["tokenizer_json"], "tokenizer_config.json": config | eos}
    added = []
    if tokenizer_kind(meta) == "gpt2":
        tokens, merges = gpt2_vocab()
        byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                      "use_regex": True}
        model = {"type": "BPE", "vocab": {t: i for i, t in enumerate(tokens)},
                 "merges": [m.split(" ") for m in merges], "dropout": None, "unk_token": None,
                 "fuse_unk": False, "byte_fallback": False, "ignore_merges": False}
        added = [{"id": tokens.index(GPT2_EOT), "content": GPT2_EOT, "single_word": False,
                  "lstrip": False, "rstrip": False, "normalized": False, "special": True}]
        pre, post, decoder = byte_level, byte_level, byte_level
        special = {"bos_token": GPT2_EOT, "eos_token": GPT2_EOT, "unk_token": GPT2_EOT}
    else:  # one token per character: a BPE without merges, and pieces joined as they are
        model = {"type": "BPE", "vocab": {t: i for i, t in enumerate(char_tokens(meta))},
                 "merges": [], "dropout": None, "unk_token": None, "fuse_unk": False,
                 "byte_fallback": False, "ignore_merges": False}
        pre, post, decoder, special = None, None, {"type": "Fuse"}, {}
    tokenizer = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
                 "normalizer": None, "pre_tokenizer": pre, "post_processor": post,
                 "decoder": decoder, "model": model}
    return {"tokenizer.json": tokenizer, "tokenizer_config.json": config | special}


def write_folder(folder, config, meta, block_size, state):
    """config.json, generation_config.json, the tokenizer's files and model.safetensors."""
    try:
        from safetensors.torch import save_file
    except ImportError:
        raise ExportError("--format=hf writes safetensors: pip install safetensors") from None
    files = {"config.json": config,
             "generation_config.json": generation_config(config),
             **tokenizer_files(meta, block_size)}
    for name, obj in files.items():
        text = obj if isinstance(obj, str) else json.dumps(obj, indent=1, ensure_ascii=False) + "\n"
        (folder / name).write_text(text, encoding="utf-8")
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})


def save_hf(model, args, meta, folder, float_dtype="fp32"):
    """Write the folder of a LlamaForCausalLM or BitNetForCausalLM."""
    check_exportable(args)
    dtype = HF_DTYPES[float_dtype]
    config = hf_config(args, meta, dtype)
    write_folder(Path(folder), config, meta, args["block_size"], hf_state(model, args, dtype))
    return config
