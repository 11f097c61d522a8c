"""Our GPT and transformers: OpenAI's GPT-2 in, a GPTBigCodeForCausalLM folder out.

    python train.py --init_from=gpt2 --dataset=shakespeare    # or gpt2-medium, -large, -xl
    python train.py --init_from=FOLDER ...                     # any GPT2LMHeadModel folder

Import: GPT-2 is our GPT with biases (bias=True), LayerNorm eps 1e-5, learned positions
(n_positions -> block_size), a tied head and the tanh approximation of GELU ('gelu_new', our
gelu_approximate='tanh'). Our module names are its names; only its Conv1D weights are stored
(in, out) where nn.Linear holds (out, in), so c_attn, c_proj and c_fc are transposed, as nanoGPT
does. The vocabulary stays 50257: padding it to 50304 would add rows whose logits (0, not -inf)
take probability from the real tokens. A GPT-2 name is fetched from the HuggingFace hub once
(config.json and the safetensors only), then read from its cache.

Export: GPT-2's own class keeps Conv1D, which transformers' bitnet quantizer does not replace (it
swaps nn.Linear only), so a ternary GPT-2 folder would load float. GPTBigCodeForCausalLM with
multi_query=False is the same network built from nn.Linear: learned positions, LayerNorm, GELU,
tied head. Its c_attn rows are grouped per head (q, k, v of head 0, then of head 1, ...) where ours
are (all q, all k, all v), a permutation of rows that keeps every ternary value and the scale.
Ternary models carry the bitnet quantization config (bitlinear/hf.py).
"""

import re
from pathlib import Path

import torch
import torch.nn as nn

from bitlinear.hf import (
    FLOAT_DTYPES,
    HF_DTYPES,
    ExportError,
    bitnet_quantization,
    put_ternary,
    read_config,
    read_tensor,
    safetensors_table,
    write_folder,
)
from bitlinear.layer import ternarize
from common import CheckpointError, first_line
from data.tokenizer import tokenizer_kind

GELU = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu": "none"}  # HF name -> ours
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# GPT2Config's defaults, which transformers applies to a config.json that omits them
SIZES = {"vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_layer": 12, "n_head": 12}
MAX_SIZE = 2**31 - 1


def download_gpt2(name):
    """The local folder of OpenAI's GPT-2 `name` in the HuggingFace hub cache, downloaded the
    first time (config.json and the weights, not the TF, Flax or ONNX copies)."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CheckpointError(f"--init_from={name} downloads through transformers: pip install "
                              f"-r requirements-dev.txt") from None
    repo = f"openai-community/{name}"
    try:
        return Path(snapshot_download(repo, allow_patterns=["config.json", "*.safetensors",
                                                            "*.safetensors.index.json"]))
    except OSError as e:  # offline and not cached yet, the hub unreachable, or a full disk
        raise CheckpointError(f"--init_from={name} needs the internet once to download {repo} "
                              f"from the HuggingFace hub (then it loads from the cache): "
                              f"{first_line(e)}") from None


def args_from_config(config, folder):
    """GPTConfig arguments for a GPT-2 config.json, or one line naming what does not fit."""
    def bad(what):
        return CheckpointError(f"'{folder}/config.json' {what}")

    if config.get("model_type") != "gpt2":
        raise bad(f"is model_type {config.get('model_type')!r}, not 'gpt2'")
    sizes = {k: config.get(k, default) for k, default in SIZES.items()}
    for key, value in sizes.items():
        if not (type(value) is int and 0 < value <= MAX_SIZE):
            raise bad(f"has {key}={value!r}; it must be a positive integer (at most {MAX_SIZE})")
    if sizes["n_embd"] % sizes["n_head"]:
        raise bad(f"has n_head={sizes['n_head']}, which does not divide n_embd={sizes['n_embd']}")
    # what our GPT computes; anything else is another network
    want = dict(activation_function=tuple(GELU), n_inner=(None, 4 * sizes["n_embd"]),
                layer_norm_epsilon=(1e-5,), scale_attn_weights=(True,),
                scale_attn_by_inverse_layer_idx=(False,), add_cross_attention=(False,),
                tie_word_embeddings=(True,))
    odd = {k: config[k] for k, ok in want.items() if k in config and config[k] not in ok}
    if odd:
        raise bad(f"has options BitGPT's GPT does not compute: {odd} (it has "
                  f"{ {k: ok[0] for k, ok in want.items() if k in odd} })")
    return dict(vocab_size=sizes["vocab_size"], block_size=sizes["n_positions"],
                n_layer=sizes["n_layer"], n_head=sizes["n_head"], n_embd=sizes["n_embd"],
                bias=True, bitlinear=False,  # a float model: the run's --bitlinear decides
                gelu_approximate=GELU[config.get("activation_function", "gelu_new")])


def hf_shapes(args):
    """{our state-dict key: its shape as GPT-2 stores it} (Conv1D weights (in, out))."""
    C, V, P = args["n_embd"], args["vocab_size"], args["block_size"]
    shapes = {"transformer.wte.weight": (V, C), "transformer.wpe.weight": (P, C),
              "transformer.ln_f.weight": (C,), "transformer.ln_f.bias": (C,)}
    layer = {"ln_1.weight": (C,), "ln_1.bias": (C,), "ln_2.weight": (C,), "ln_2.bias": (C,),
             "attn.c_attn.weight": (C, 3 * C), "attn.c_attn.bias": (3 * C,),
             "attn.c_proj.weight": (C, C), "attn.c_proj.bias": (C,),
             "mlp.c_fc.weight": (C, 4 * C), "mlp.c_fc.bias": (4 * C,),
             "mlp.c_proj.weight": (4 * C, C), "mlp.c_proj.bias": (C,)}
    for i in range(args["n_layer"]):
        shapes.update({f"transformer.h.{i}.{k}": s for k, s in layer.items()})
    return shapes


def load_gpt2(folder):
    """(model_args, float state dict) of a GPT-2 folder: what GPT2LMHeadModel.save_pretrained
    writes (names under 'transformer.') or the hub's files (GPT2Model's names, with the causal
    mask buffers h.N.attn.bias, which are not weights). Every tensor our GPT needs is checked
    against the safetensors headers, name, shape and dtype, before any is read."""
    folder = Path(folder)
    args = args_from_config(read_config(folder), folder)
    table = safetensors_table(folder)
    if not table:
        raise CheckpointError(f"'{folder}' holds no *.safetensors weights (a pytorch_model.bin "
                              f"folder: load it in transformers and save_pretrained it again)")
    prefix = "" if "wte.weight" in table else "transformer."
    files = ", ".join(sorted({e.file.name for e in table.values()}))
    layers = sorted({int(m.group(1)) for n in table if (m := re.match(rf"{prefix}h\.(\d+)\.", n))})
    if layers != list(range(args["n_layer"])):
        raise CheckpointError(f"'{folder}/config.json' has n_layer={args['n_layer']}, but {files} "
                              f"holds {len(layers)} layers")
    names = {}
    for key, shape in hf_shapes(args).items():
        name = prefix + key.removeprefix("transformer.")
        if name not in table:
            raise CheckpointError(f"'{folder}' lacks {name}, which GPT-2 needs (in {files})")
        entry = table[name]
        if entry.dtype not in FLOAT_DTYPES:
            raise CheckpointError(f"'{folder}' holds {name} as {entry.dtype}, not as floats")
        if entry.shape != shape:
            raise CheckpointError(f"'{folder}/config.json' does not fit its weights: it makes "
                                  f"{name} {list(shape)}, {entry.file.name} holds "
                                  f"{list(entry.shape)}")
        names[name] = key
    state = {}
    for name, key in names.items():  # one at a time, only what GPT-2 needs (not its masks)
        w = read_tensor(table[name]).float()
        state[key] = w.t().contiguous() if key.endswith(CONV1D) else w
    state["lm_head.weight"] = state["transformer.wte.weight"]  # tied
    return args, state


# ---- export: our GPT -> a GPTBigCodeForCausalLM folder ---------------------------------------

def check_exportable(args):
    if args.get("bitlinear", True) and args["n_embd"] % 4:
        raise ExportError(f"transformers packs 4 ternary rows per byte, so n_embd must be a "
                          f"multiple of 4; this model has n_embd={args['n_embd']}")


def hf_config(args, meta, dtype):
    """config.json of the GPTBigCode model that computes our GPT built from args."""
    eot = 50256 if tokenizer_kind(meta) == "gpt2" else None
    config = {
        "architectures": ["GPTBigCodeForCausalLM"], "model_type": "gpt_bigcode",
        "multi_query": False, "vocab_size": args["vocab_size"], "n_positions": args["block_size"],
        "n_embd": args["n_embd"], "n_layer": args["n_layer"], "n_head": args["n_head"],
        "n_inner": 4 * args["n_embd"], "layer_norm_epsilon": 1e-5,
        "activation_function": {"tanh": "gelu_pytorch_tanh", "none": "gelu"}[
            args.get("gelu_approximate", "none")],
        "scale_attn_weights": True, "attention_softmax_in_fp32": True,
        "scale_attention_softmax_in_fp32": True, "resid_pdrop": 0.0, "embd_pdrop": 0.0,
        "attn_pdrop": 0.0, "tie_word_embeddings": True, "bos_token_id": eot, "eos_token_id": eot,
        "dtype": str(dtype).removeprefix("torch."),
    }
    if args.get("bitlinear", True):
        config["quantization_config"] = bitnet_quantization(args)
    return config


def per_head(w, n_head):
    """c_attn's rows (q, k, v, each head after head) -> GPTBigCode's (head: its q, k, v)."""
    three_c = w.size(0)
    return w.reshape(3, n_head, three_c // (3 * n_head), *w.shape[1:]).transpose(0, 1).reshape(
        w.shape)


@torch.no_grad()
def hf_state(model, args, dtype):
    """The model's tensors under GPTBigCode's names (ours, but for a BitLinear's inner norm):
    ternary linears packed with their weight_scale, absent biases (bias=False) as zeros, since
    its Linears and LayerNorms always have them."""
    out = {}
    for name, m in model.named_modules():
        if name == "lm_head":
            continue  # tied: transformers takes wte
        if isinstance(m, nn.Linear):
            fix = (lambda t: per_head(t, args["n_head"])) if name.endswith("attn.c_attn") \
                else (lambda t: t)
            if args.get("bitlinear", True):
                t, s = ternarize(m.weight)
                put_ternary(out, f"{name}.weight", fix(t), s, dtype)
                if getattr(m, "norm", None) is not None:  # bit_norm's RMSNorm
                    out[f"{name}.rms_norm.weight"] = m.norm.weight.to(dtype)
            else:
                out[f"{name}.weight"] = fix(m.weight).to(dtype)
            bias = m.bias if m.bias is not None else torch.zeros(m.out_features)
            out[f"{name}.bias"] = fix(bias).to(dtype)
        elif isinstance(m, nn.LayerNorm):
            out[f"{name}.weight"] = m.weight.to(dtype)
            out[f"{name}.bias"] = (m.bias if m.bias is not None else torch.zeros_like(m.weight)
                                   ).to(dtype)
        elif isinstance(m, nn.Embedding):
            out[f"{name}.weight"] = m.weight.to(dtype)
    return {k: v.contiguous() for k, v in out.items()}


def save_hf(model, args, meta, folder, float_dtype="fp32"):
    """Write the folder (bitlinear/hf.py's write_folder) of a GPTBigCodeForCausalLM."""
    check_exportable(args)
    dtype = HF_DTYPES[float_dtype]
    config = hf_config(args, meta, dtype)
    write_folder(Path(folder), config, meta, args["block_size"], hf_state(model, args, dtype))
    return config
