"""A LLaMA-architecture BitGPT model as a HuggingFace transformers folder, and back.

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
"""

import json
import re
from pathlib import Path

import torch

from bitlinear import ternarize
from bitlinear.pack import pack_2bit_rows, unpack_2bit_rows
from common import UserError
from data.tokenizer import GPT2_EOT, char_tokens, gpt2_vocab, tokenizer_kind

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
    eot = 50256 if tokenizer_kind(meta) == "gpt2" else None
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
        "bos_token_id": eot, "eos_token_id": eot, "dtype": str(dtype).removeprefix("torch."),
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


def tokenizer_files(meta, block_size):
    """{filename: json object}: a tokenizers tokenizer.json for GPT-2 BPE or for characters."""
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
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": block_size,
              "clean_up_tokenization_spaces": False, **special}
    return {"tokenizer.json": tokenizer, "tokenizer_config.json": config}


def save_hf(model, args, meta, folder, float_dtype="fp32"):
    """Write config.json, model.safetensors, generation_config.json and the tokenizer."""
    try:
        from safetensors.torch import save_file
    except ImportError:
        raise ExportError("--format=hf writes safetensors: pip install safetensors") from None
    check_exportable(args)
    dtype = HF_DTYPES[float_dtype]
    config = hf_config(args, meta, dtype)
    files = {"config.json": config,
             "generation_config.json": generation_config(config),
             **tokenizer_files(meta, args["block_size"])}
    for name, obj in files.items():
        (folder / name).write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n")
    save_file(hf_state(model, args, dtype), folder / "model.safetensors",
              metadata={"format": "pt"})
    return config


# ---- import: a transformers folder -> our model's arguments and weights ----------------------

def _args_from_config(config, folder):
    """LlamaConfig fields for a transformers config.json, or ExportError naming what differs."""
    kind = config.get("model_type")
    if kind not in ("bitnet", "llama"):
        raise ExportError(f"'{folder}' holds a '{kind}' model; BitGPT imports model_type 'bitnet' "
                          f"or 'llama'")
    act = {"relu2": "relu2", "silu": "swiglu"}.get(config.get("hidden_act"))
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    theta = config.get("rope_theta", rope.get("rope_theta", 10000.0))
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    odd = {k: config[k] for k in ("attention_bias", "mlp_bias") if config.get(k)}
    if act is None or odd or rope.get("rope_type", "default") != "default" or \
            head_dim * config["num_attention_heads"] != config["hidden_size"]:
        raise ExportError(f"'{folder}' uses options BitGPT's LLaMA does not have (hidden_act "
                          f"{config.get('hidden_act')!r}, {odd or 'no biases'}, rope "
                          f"{rope.get('rope_type', 'default')!r}, head_dim {head_dim})")
    quant = config.get("quantization_config") or {}
    return dict(
        vocab_size=config["vocab_size"], n_embd=config["hidden_size"],
        ffn_hidden=config["intermediate_size"], n_layer=config["num_hidden_layers"],
        n_head=config["num_attention_heads"],
        n_kv_head=config.get("num_key_value_heads") or config["num_attention_heads"],
        block_size=config["max_position_embeddings"], norm_eps=config["rms_norm_eps"],
        rope_theta=float(theta), tie_embeddings=config.get("tie_word_embeddings", False),
        mlp=act, subln=kind == "bitnet", bitlinear=quant.get("quant_method") == "bitnet",
        bit_norm=bool(quant.get("use_rms_norm", False)))


def latent_weight(t, s):
    """Float weights whose ternarization is exactly (t, s): t / (s * mean|t|), so that
    mean|W| = 1/s and round(W * s) = t / mean|t|, which clamps back to t."""
    share = t.float().abs().mean()
    return t.float() / (s * share) if share > 0 else t.float()


def _meta_from_tokenizer(folder):
    from data.common import char_meta, gpt2_meta
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise ExportError(f"'{folder}' has no tokenizer.json; BitGPT needs GPT-2's BPE or a "
                          f"character vocabulary")
    model = json.loads(path.read_text())["model"]
    vocab = model.get("vocab", {})
    if model.get("type") == "BPE" and not model.get("merges"):
        return char_meta(sorted(vocab, key=vocab.get))
    tokens, _ = gpt2_vocab()
    if model.get("type") != "BPE" or vocab != {t: i for i, t in enumerate(tokens)}:
        raise ExportError(f"'{folder}''s tokenizer is not GPT-2's BPE or a character table, the "
                          f"two BitGPT's data/ prepares")
    return gpt2_meta()


def load_hf(folder):
    """(model_args, float state dict, meta) from a transformers folder of BitNetForCausalLM or
    LlamaForCausalLM, such as save_hf writes: the start of a fine-tuning run (train.py
    --init_from=FOLDER). Packed ternary projections become latent weights that ternarize back
    to the same values and scales, so the imported model computes what the folder does."""
    folder = Path(folder)
    try:
        config = json.loads((folder / "config.json").read_text())
        args = _args_from_config(config, folder)
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ExportError(f"'{folder}/config.json' is not a readable transformers config "
                          f"({type(e).__name__}: {e})") from None
    quant = config.get("quantization_config") or {}
    tensors = _read_tensors(folder)
    ours = {hf_key(k): k for k in _our_keys(args)}
    missing = sorted(set(ours) - set(tensors))
    if missing:
        raise ExportError(f"'{folder}' lacks {len(missing)} tensors BitGPT needs, e.g. "
                          f"{missing[0]}")
    state = {}
    for name, key in ours.items():
        w = tensors[name]
        if w.dtype == torch.uint8:  # packed ternary, with its weight_scale
            scale = tensors[name + "_scale"].float().reshape(())
            s = 1 / scale if quant.get("linear_class") == "autobitlinear" else scale
            w = latent_weight(unpack_2bit_rows(w), s)
        state[key] = w.float()
    if args["tie_embeddings"]:
        state["output.weight"] = state["tok_embeddings.weight"]
    return args, state, _meta_from_tokenizer(folder)


def _read_tensors(folder):
    """Every tensor of the folder's *.safetensors files; a damaged file is one ExportError."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    tensors = {}
    for f in sorted(folder.glob("*.safetensors")):
        try:
            tensors.update(load_file(f))
        except (SafetensorError, OSError) as e:
            raise ExportError(f"'{f}' is not a readable safetensors file ({e}); export the "
                              f"model again") from None
    return tensors


def _our_keys(args):
    """The state-dict keys of our model with these args (the tied head's key left out)."""
    from llama.model import Llama, LlamaConfig
    with torch.device("meta"):
        keys = Llama(LlamaConfig(**args)).state_dict().keys()
    return [k for k in keys if not (k == "output.weight" and args["tie_embeddings"])]
