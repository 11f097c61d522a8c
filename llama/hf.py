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
import math
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

SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
         "num_attention_heads", "max_position_embeddings")
OPTIONAL_SIZES = ("num_key_value_heads", "head_dim")  # absent or null: derived
MAX_SIZE = 2**31 - 1


def _is_number(x):
    return type(x) in (int, float) and math.isfinite(x)


def _args_from_config(config, folder):
    """LlamaConfig fields for a transformers config.json, or ExportError (one line) naming the
    key at fault: a missing or non-positive size, heads that do not divide the width, or an
    option BitGPT's LLaMA does not have."""
    def bad(what):
        return ExportError(f"'{folder}/config.json' {what}")

    if not isinstance(config, dict):
        raise ExportError(f"'{folder}/config.json' is not a readable transformers config (a JSON "
                          f"{type(config).__name__}, not an object)")
    kind = config.get("model_type")
    if kind not in ("bitnet", "llama"):
        raise ExportError(f"'{folder}' holds a '{kind}' model; BitGPT imports model_type 'bitnet' "
                          f"or 'llama'")
    for key in SIZES + OPTIONAL_SIZES:
        value = config.get(key)
        if key not in config and key in SIZES:
            raise bad(f"lacks {key}")
        if (value is not None or key in SIZES) and not (
                type(value) is int and 0 < value <= MAX_SIZE):
            raise bad(f"has {key}={value!r}; it must be a positive integer (at most {MAX_SIZE})")
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    if hidden % heads:
        raise bad(f"has num_attention_heads={heads}, which does not divide hidden_size={hidden}")
    head_dim = config.get("head_dim") or hidden // heads
    if head_dim * heads != hidden:
        raise bad(f"has head_dim={head_dim}; BitGPT's LLaMA needs hidden_size / "
                  f"num_attention_heads = {hidden // heads}")
    if heads % kv_heads:
        raise bad(f"has num_key_value_heads={kv_heads}, which does not divide "
                  f"num_attention_heads={heads}")
    if head_dim % 2:
        raise bad(f"has hidden_size / num_attention_heads = {head_dim}, an odd head size; RoPE "
                  f"needs an even one")
    for key in ("rope_parameters", "rope_scaling", "quantization_config"):
        if config.get(key) is not None and not isinstance(config[key], dict):
            raise bad(f"has {key}={config[key]!r}; it must be an object or null")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    theta = config.get("rope_theta", rope.get("rope_theta", 10000.0))
    eps = config.get("rms_norm_eps")
    for key, value in (("rope_theta", theta), ("rms_norm_eps", eps)):
        if not (_is_number(value) and value > 0):
            raise bad(f"has {key}={value!r}; it must be a positive number")
    tied = config.get("tie_word_embeddings", False)
    if not isinstance(tied, bool):
        raise bad(f"has tie_word_embeddings={tied!r}; it must be true or false")
    hidden_act = config.get("hidden_act")
    act = {"relu2": "relu2", "silu": "swiglu"}.get(hidden_act if isinstance(hidden_act, str)
                                                   else None)
    odd = {k: config[k] for k in ("attention_bias", "mlp_bias") if config.get(k)}
    if act is None or odd or rope.get("rope_type", "default") != "default":
        raise ExportError(f"'{folder}' uses options BitGPT's LLaMA does not have (hidden_act "
                          f"{hidden_act!r}, {odd or 'no biases'}, rope "
                          f"{rope.get('rope_type', 'default')!r})")
    quant = config.get("quantization_config") or {}
    return dict(
        vocab_size=config["vocab_size"], n_embd=hidden, ffn_hidden=config["intermediate_size"],
        n_layer=config["num_hidden_layers"], n_head=heads, n_kv_head=kv_heads,
        block_size=config["max_position_embeddings"], norm_eps=float(eps),
        rope_theta=float(theta), tie_embeddings=tied, mlp=act, subln=kind == "bitnet",
        bitlinear=quant.get("quant_method") == "bitnet",
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
    try:
        model = json.loads(path.read_text())["model"]
        vocab = model.get("vocab", {})
        if model.get("type") == "BPE" and not model.get("merges"):
            return char_meta(sorted(vocab, key=vocab.get))
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
        raise ExportError(f"'{path}' is not a readable tokenizer ({type(e).__name__})") from None
    tokens, _ = gpt2_vocab()
    if model.get("type") != "BPE" or vocab != {t: i for i, t in enumerate(tokens)}:
        raise ExportError(f"'{folder}''s tokenizer is not GPT-2's BPE or a character table, the "
                          f"two BitGPT's data/ prepares")
    return gpt2_meta()


def load_hf(folder):
    """(model_args, float state dict, meta) from a transformers folder of BitNetForCausalLM or
    LlamaForCausalLM, such as save_hf writes: the start of a fine-tuning run (train.py
    --init_from=FOLDER). Packed ternary projections become latent weights that ternarize back
    to the same values and scales, so the imported model computes what the folder does.

    Nothing is built or allocated on config.json's word alone: its sizes are checked, then
    compared with the names and shapes in the safetensors files' headers (the layer count
    first), before any tensor is read; a mismatch is one ExportError naming the key."""
    folder = Path(folder)
    try:
        config = json.loads((folder / "config.json").read_text())
    except (ValueError, RecursionError) as e:  # not JSON, or not UTF-8
        raise ExportError(f"'{folder}/config.json' is not a readable transformers config "
                          f"({type(e).__name__}: {e})") from None
    args = _args_from_config(config, folder)
    quant = config.get("quantization_config") or {}
    table = _safetensors_table(folder)
    ours = _check_tensors(args, table, folder)
    tensors = _read_tensors(folder)
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


# bytes per value of each safetensors dtype
SAFETENSORS_DTYPES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2,
                      "U16": 2, "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8,
                      "U64": 8, "F64": 8}
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")


def _safetensors_table(folder):
    """{tensor name: (file, dtype, shape)} of the folder's *.safetensors files, from their
    headers alone, every entry checked against its file (a damaged file is one ExportError)."""
    table = {}
    for f in sorted(folder.glob("*.safetensors")):
        def bad(what, f=f):
            return ExportError(f"'{f}' is not a readable safetensors file ({what}); export the "
                               f"model again")
        size = f.stat().st_size
        with open(f, "rb") as fh:
            start = fh.read(8)
            n = int.from_bytes(start, "little")
            if len(start) < 8 or n > size - 8:
                raise bad(f"its header claims {n} bytes, the file holds {size - 8}")
            try:
                header = json.loads(fh.read(n))
            except (ValueError, RecursionError):
                raise bad("its header is not JSON") from None
        if not isinstance(header, dict):
            raise bad("its header is not a JSON object")
        for name, e in header.items():
            if name == "__metadata__":
                continue
            if not isinstance(e, dict) or e.get("dtype") not in SAFETENSORS_DTYPES:
                raise bad(f"tensor {name} has no known dtype")
            shape, span = e.get("shape"), e.get("data_offsets")
            if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
                raise bad(f"tensor {name} has shape {shape!r}")
            if not (isinstance(span, list) and len(span) == 2 and all(type(x) is int for x in span)
                    and 0 <= span[0] <= span[1] <= size - 8 - n
                    and span[1] - span[0] == math.prod(shape) * SAFETENSORS_DTYPES[e["dtype"]]):
                raise bad(f"tensor {name}'s data_offsets {span!r} do not fit its shape and file")
            if name in table:
                raise ExportError(f"'{folder}' holds tensor {name} twice ({table[name][0].name} "
                                  f"and {f.name})")
            table[name] = (f, e["dtype"], tuple(shape))
    return table


def _config_keys(key):
    """The config.json keys that set each dimension of our tensor `key`."""
    h, ffn = "hidden_size", "intermediate_size"
    q, kv = "num_attention_heads * head_dim", "num_key_value_heads * head_dim"
    dims = {"tok_embeddings.weight": ("vocab_size", h), "output.weight": ("vocab_size", h),
            "norm.weight": (h,), "attention_norm.weight": (h,), "ffn_norm.weight": (h,),
            "attention.sub_norm.weight": (h,), "feed_forward.sub_norm.weight": (ffn,),
            "attention.wq.weight": (q, h), "attention.wk.weight": (kv, h),
            "attention.wv.weight": (kv, h), "attention.wo.weight": (h, q),
            "feed_forward.w1.weight": (ffn, h), "feed_forward.w3.weight": (ffn, h),
            "feed_forward.w2.weight": (h, ffn)}
    part = re.sub(r"^layers\.\d+\.", "", key)
    if part.endswith(".norm.weight") and part.removesuffix(".norm.weight") + ".weight" in dims:
        return dims[part.removesuffix(".norm.weight") + ".weight"][1:]  # a bit_norm's input
    return dims.get(part, ())


def _check_tensors(args, table, folder):
    """{transformers name: our key} of the tensors the model needs, once the safetensors
    table holds each of them in the shape and dtype args make it (else one ExportError naming
    the config.json key): the layer count first, then the model is built as a shell (its weights
    allocated, never written) for its names and shapes."""
    from bitlinear.inference import shell_model
    from llama.model import Llama, LlamaConfig
    if not table:
        raise ExportError(f"'{folder}' holds no weights (no *.safetensors file)")
    files = ", ".join(sorted({f.name for f, _, _ in table.values()}))
    pattern = re.compile(r"model\.layers\.(\d+)\.")
    layers = sorted({int(m.group(1)) for name in table if (m := pattern.match(name))})
    if layers != list(range(args["n_layer"])):
        held = ("no layers" if not layers
                else f"layers 0 to {layers[-1]}" if layers == list(range(len(layers)))
                else f"{len(layers)} layers, numbered {layers[0]} to {layers[-1]}")
        raise ExportError(f"'{folder}/config.json' has num_hidden_layers={args['n_layer']}, "
                          f"but {files} holds {held}")
    total = sum(math.prod(shape) * (4 if dtype == "U8" else 1)
                for _, dtype, shape in table.values())
    head_dim = args["n_embd"] // args["n_head"]
    if args["block_size"] * head_dim > max(total, 2**24):  # RoPE's cos and sin tables
        raise ExportError(f"'{folder}/config.json' has max_position_embeddings="
                          f"{args['block_size']}: its rotary tables would outweigh the model's "
                          f"{total} weights; at most {max(total, 2**24) // head_dim} fits")
    try:
        model = shell_model(lambda: Llama(LlamaConfig(**args)))
    except (ValueError, RuntimeError) as e:
        raise ExportError(f"'{folder}/config.json' describes a model BitGPT cannot build ({e})"
                          ) from None
    ours = {}
    for key, t in model.state_dict().items():
        if key == "output.weight" and args["tie_embeddings"]:
            continue  # tied: transformers keeps only embed_tokens
        name, want = hf_key(key), tuple(t.shape)
        if name not in table:
            raise ExportError(f"'{folder}' lacks tensors BitGPT needs, e.g. {name} (in {files})")
        f, dtype, shape = table[name]
        ternary = dtype == "U8" and key.rsplit(".", 2)[-2] in LINEARS and len(shape) == 2
        if ternary:
            scale = table.get(name + "_scale")
            if scale is None or scale[1] not in FLOAT_DTYPES or math.prod(scale[2]) != 1:
                raise ExportError(f"'{folder}' holds the packed {name} without a weight_scale "
                                  f"of one value (in {files})")
            shape = (4 * shape[0], shape[1])
        elif dtype not in FLOAT_DTYPES:
            raise ExportError(f"'{folder}' holds {name} as {dtype}, not as floats or packed "
                              f"ternary values")
        if shape != want:
            keys = _config_keys(key)
            at = [i for i in range(len(want)) if i >= len(shape) or shape[i] != want[i]]
            what = ", ".join(f"{keys[i]} = {want[i]}" for i in at if i < len(keys)) or \
                "its sizes"
            raise ExportError(f"'{folder}/config.json' does not fit its weights: {what} makes "
                              f"{name} {list(want)}, but {f.name} holds "
                              f"{list(shape)}{' (unpacked)' if ternary else ''}")
        ours[name] = key
    return ours


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
