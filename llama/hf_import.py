"""A transformers folder of BitNetForCausalLM or LlamaForCausalLM -> a BitGPT LLaMA: the start of
a fine-tuning run (train.py --init_from=FOLDER) or a model to sample from.

Whatever wrote the folder (llama/hf.py's export, or transformers itself, as for BitNet b1.58
2B4T), its config.json becomes LlamaConfig fields, its packed ternary projections latent weights
that ternarize back to the same values and scales (weight_scale is 1/mean|W| for transformers'
'bitlinear' class, mean|W| for 'autobitlinear'), and its tokenizer the dataset meta of
data.tokenizer (characters and GPT-2 BPE as those kinds, anything else as 'hf', the file whole).

Nothing is built or allocated on config.json's word alone: its sizes are checked, then compared
with the names and shapes in the safetensors files' headers (the layer count first), before any
tensor is read. Then the model is built as a shell (allocated, never written: no memory yet) and
each tensor is read, converted into its parameter and let go, one at a time, so importing costs
the float32 model plus its largest tensor as the file holds it, not the folder and the model.
"""

import json
import math
import re
from pathlib import Path

import torch

from bitlinear.hf import FLOAT_DTYPES, ExportError, read_config, read_tensor, safetensors_table
from bitlinear.inference import shell_model, to_integer
from bitlinear.pack import unpack_2bit_rows
from data.common import DataError, char_meta, gpt2_meta
from data.meta import hf_meta
from data.tokenizer import GPT2_EOT
from data.vocab import gpt2_vocab
from llama.hf import LINEARS, hf_key
from llama.model import Llama, LlamaConfig

SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
         "num_attention_heads", "max_position_embeddings")
OPTIONAL_SIZES = ("num_key_value_heads", "head_dim")  # absent or null: derived
MAX_SIZE = 2**31 - 1


def _is_number(x):
    return type(x) in (int, float) and math.isfinite(x)


def _heads(config, bad):
    """(hidden_size, heads, key/value heads) of a config.json whose sizes are checked; bad(what)
    is the error naming what does not fit BitGPT's LLaMA."""
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
    return hidden, heads, kv_heads


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
    hidden, heads, kv_heads = _heads(config, bad)
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
    rope_type = rope.get("rope_type", rope.get("type", "default"))  # "type": the older name
    if act is None or odd or rope_type != "default":
        raise ExportError(f"'{folder}' uses options BitGPT's LLaMA does not have (hidden_act "
                          f"{hidden_act!r}, {odd or 'no biases'}, rope {rope_type!r})")
    quant = config.get("quantization_config") or {}
    return dict(
        vocab_size=config["vocab_size"], n_embd=hidden, ffn_hidden=config["intermediate_size"],
        n_layer=config["num_hidden_layers"], n_head=heads, n_kv_head=kv_heads,
        block_size=config["max_position_embeddings"], norm_eps=float(eps),
        rope_theta=float(theta), tie_embeddings=tied, mlp=act, subln=kind == "bitnet",
        bitlinear=quant.get("quant_method") == "bitnet",
        bit_norm=bool(quant.get("use_rms_norm", False)))


def latent_weight(t, s, out=None):
    """Float weights whose ternarization is exactly (t, s): t / (s * mean|t|), so that
    mean|W| = 1/s and round(W * s) = t / mean|t|, which clamps back to t. Written into out
    (a float tensor of t's shape) when given: no float temporaries."""
    share = t.count_nonzero() / t.numel()  # mean|t| of ternary values
    w = t.float() if out is None else out.copy_(t)
    return w.div_(s * share) if share > 0 else w


def _meta_from_tokenizer(folder):
    """The dataset meta of the folder's tokenizer.json: a character table (BitGPT's char export)
    as 'char', GPT-2's BPE as 'gpt2', any other tokenizer as 'hf' (data.meta.hf_meta,
    vocab_size the model's)."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise ExportError(f"'{folder}' has no tokenizer.json (a transformers folder with only a "
                          f"SentencePiece tokenizer.model gets one from AutoTokenizer."
                          f"from_pretrained(folder).save_pretrained(folder))")
    try:
        tokenizer = json.loads(path.read_text(encoding="utf-8"))
        model = tokenizer["model"]
        vocab = model.get("vocab") or {}
        chars = (model.get("type") == "BPE" and not model.get("merges")
                 and not tokenizer.get("added_tokens") and isinstance(vocab, dict)
                 and all(len(t) == 1 for t in vocab)
                 and sorted(vocab.values()) == list(range(len(vocab))))
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
        raise ExportError(f"'{path}' is not a readable tokenizer ({type(e).__name__})") from None
    if chars:
        return char_meta(sorted(vocab, key=vocab.get))
    try:
        if len(vocab) == 50257 and vocab.get(GPT2_EOT) == 50256:
            tokens, _ = gpt2_vocab()
            if vocab == {t: i for i, t in enumerate(tokens)}:
                return gpt2_meta()
    except DataError:
        pass  # GPT-2's files are not at hand (offline): it stays a tokenizer.json, as good
    try:
        return hf_meta(folder)[0]
    except DataError as e:
        raise ExportError(str(e)) from None


def _open_folder(folder):
    """(model_args, shell model, {transformers name: our key}, table, weight_scale meaning,
    meta) of a folder, every check done and nothing read but headers."""
    folder = Path(folder)
    config = read_config(folder)
    args = _args_from_config(config, folder)
    quant = config.get("quantization_config") or {}
    multiplies = quant.get("linear_class") == "autobitlinear"  # weight_scale = mean|W|
    table = safetensors_table(folder)
    ours, model = _check_tensors(args, table, folder)
    return args, model, ours, table, multiplies, _meta_from_tokenizer(folder)


def load_hf_model(folder):
    """(float32 Llama, model_args, meta) from a transformers folder, filled one tensor at a time
    (see the module's docstring). A ternary folder's model computes what the folder does."""
    args, model, ours, table, multiplies, meta = _open_folder(folder)
    state = model.state_dict()  # the parameters themselves: writing them writes the model
    with torch.no_grad():
        for name, key in ours.items():
            _fill(state[key], table, name, multiplies)
    return model, args, meta


def _fill(param, table, name, multiplies):
    """Write tensor `name` into param: floats widened in the copy, packed ternary values as
    their latent weights."""
    w = read_tensor(table[name])
    if w.dtype != torch.uint8:
        param.copy_(w)
        return
    scale = read_tensor(table[name + "_scale"]).float().reshape(())
    t = unpack_2bit_rows(w)
    what = None if math.isfinite(scale) and scale > 0 else f"weight_scale {scale.item()}"
    if what is None and t.numel() and t.abs().max() > 1:
        what = "2-bit codes of 3, beyond the three ternary values"
    if what:
        raise ExportError(f"'{table[name].file}' holds {name} with {what}; export the model "
                          f"again")
    latent_weight(t, 1 / scale if multiplies else scale, out=param)


def inference_model(folder):
    """(model, meta) to sample from (sample.py's load_model): a ternary folder's model as the
    integer model, a float one as it is."""
    model, args, meta = load_hf_model(folder)
    return (to_integer(model.eval()) if args["bitlinear"] else model.eval()), meta


def load_hf(folder):
    """(model_args, float state dict, meta) from a transformers folder (train.py --init_from):
    load_hf_model's model as its state dict, which holds the model's own tensors."""
    model, args, meta = load_hf_model(folder)
    return args, model.state_dict(), meta


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
    """({transformers name: our key} of the tensors the model needs, the model as a shell), once
    the safetensors table holds each of them in the shape and dtype args make it (else one
    ExportError naming the config.json key): the layer count first, then the model is built as a
    shell (its weights allocated, never written) for its names and shapes."""
    if not table:
        raise ExportError(f"'{folder}' holds no weights (no *.safetensors file)")
    files = ", ".join(sorted({e.file.name for e in table.values()}))
    pattern = re.compile(r"model\.layers\.(\d+)\.")
    layers = sorted({int(m.group(1)) for name in table if (m := pattern.match(name))})
    if layers != list(range(args["n_layer"])):
        held = ("no layers" if not layers
                else f"layers 0 to {layers[-1]}" if layers == list(range(len(layers)))
                else f"{len(layers)} layers, numbered {layers[0]} to {layers[-1]}")
        raise ExportError(f"'{folder}/config.json' has num_hidden_layers={args['n_layer']}, "
                          f"but {files} holds {held}")
    total = sum(math.prod(e.shape) * (4 if e.dtype == "U8" else 1) for e in table.values())
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
        f, dtype, shape, _ = table[name]
        ternary = dtype == "U8" and key.rsplit(".", 2)[-2] in LINEARS and len(shape) == 2
        if ternary:
            scale = table.get(name + "_scale")
            if scale is None or scale.dtype not in FLOAT_DTYPES or math.prod(scale.shape) != 1:
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
    return ours, model
