"""A BitGPT model as a GGUF file for llama.cpp (written with gguf-py): the file and its tokenizer
for both architectures, and the LLaMA architecture's tensors (the GPT's are in gpt/gguf.py).

    python export.py --out_dir=out --format=gguf --to=out/model.gguf [--qtype=tq1_0]

Which llama.cpp architecture runs our LLaMA's forward:
    subln=True   'bitnet': sub-norms before attn_output and ffn_down; its head is always the
                 token embedding, so the model needs tie_embeddings=True
    subln=False  'llama': a tied head, or its own output.weight. llama.cpp's LLaMA RoPE rotates
                 adjacent pairs where ours (and its 'bitnet') rotates halves, so the wq and wk
                 rows are permuted within each head: q.k, and so attention, is unchanged
Both graphs compute SwiGLU: mlp='relu2' models export to --format=hf only, and bit_norm has no
counterpart here. Ternary projections are TQ2_0 (2.06 bits/weight) or TQ1_0 (1.69) blocks of 256
weights, or Q4_0 (4.5) blocks of 32 (bitlinear/pack.py), with block scale d = 1, and the
tensor's scale mean|W| = 1/s_w goes, exact, into an F32 '<name>.scale' tensor that these graphs
multiply the output by. A block never spans two rows, so every row length (n_embd, ffn_hidden)
must be a multiple of the block. llama.cpp quantizes the inputs of those matmuls per block (Q8_K
of 256, Q8_0 of 32), not per token as we do, and keeps K and V in fp16: its logits are close to
ours, not equal (RESULTS.md has the agreement).
Float models (bitlinear=False) are written with F16 (or F32) projections and no shape constraint.

Tokenizer (add_tokenizer): GPT-2 BPE as 'gpt2' (tokens, merges), padded to vocab_size with unused
tokens; a character vocabulary as 'rwkv', llama.cpp's greedy longest-match tokenizer, which over
tokens of one character each is exactly our one-token-per-character encoding; a tokenizer.json
(meta kind 'hf') when it is byte-level BPE, as 'gpt2' with the pre-tokenizer llama.cpp names for
its split rule (hf_vocab).
"""

import json
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from bitlinear import ternarize
from bitlinear.pack import BLOCK, PACK_BLOCKS
from common import atomic_path
from data.tokenizer import GPT2_EOT, char_tokens, gpt2_vocab, tokenizer_kind
from llama.hf import ExportError

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


# ---- both architectures: the file, its tensors, its tokenizer --------------------------------

def check_rows(rows, qtype):
    """rows: {option: row length}; ExportError unless each fills whole blocks of qtype."""
    n = BLOCK[qtype]
    odd = {k: v for k, v in rows.items() if v % n}
    if odd:
        fix = "export with --qtype=q4_0 (blocks of 32, 4.5 bits/weight), or " if n > 32 else ""
        raise ExportError(f"{qtype.upper()} packs rows in blocks of {n} weights; {odd} is not a "
                          f"multiple of {n}: {fix}train a width that is (configs/gpt_3m.py, "
                          f"configs/llama_bitnet_5m.py)")


class Tensors:
    """Adds tensors to a GGUFWriter in the export's types: ternary blocks, embeddings, floats."""

    def __init__(self, writer, qtype, float_dtype, embed_int8):
        q = _gguf().GGMLQuantizationType
        self.writer, self.qtype, self.q = writer, qtype, q
        self.float = q.F32 if float_dtype == "fp32" else q.F16
        self.embed = q.Q8_0 if embed_int8 else self.float

    def ternary(self, name, t, d=1.0):
        """Ternary int8 values in qtype's blocks of scale d (stored as fp16)."""
        self.writer.add_tensor(name, PACK_BLOCKS[self.qtype](t, d).numpy(),
                               raw_dtype=getattr(self.q, self.qtype.upper()))

    def add(self, name, w, qt):
        """A float tensor as qt (F32, F16, Q8_0)."""
        data = _gguf().quants.quantize(w.detach().float().numpy(), qt)
        self.writer.add_tensor(name, data, raw_dtype=None if qt in (self.q.F32, self.q.F16)
                               else qt)

    def norm(self, name, w):
        self.add(name, w, self.q.F32)


def add_tokenizer(writer, meta, vocab_size):
    """The meta's tokenizer as llama.cpp's: 'gpt2' BPE (GPT-2's, or a byte-level tokenizer.json),
    or 'rwkv' for characters; the model's rows past the tokenizer's last id (GPT-2's 50257
    padded to 50304) as unused tokens."""
    types = _gguf().TokenType
    kind = tokenizer_kind(meta)
    if kind == "char":
        chars = char_tokens(meta)
        writer.add_tokenizer_model("rwkv")
        writer.add_token_list([rwkv_escape(c) for c in chars])
        writer.add_token_types([types.NORMAL] * len(chars))
        writer.add_add_bos_token(False)
        return
    if kind == "gpt2":
        tokens, merges = gpt2_vocab()
        eot, special, pre = tokens.index(GPT2_EOT), {}, "gpt-2"
    else:
        tokens, merges, special, pre, eot = hf_vocab(meta)
    if len(tokens) > vocab_size:
        raise ExportError(f"the tokenizer has {len(tokens)} tokens, more than the model's "
                          f"vocab_size {vocab_size}")
    kinds = [special.get(i, types.NORMAL) for i in range(len(tokens))]
    if eot is not None:
        kinds[eot] = types.CONTROL
    pad = vocab_size - len(tokens)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens + [f"[PAD{i}]" for i in range(pad)])
    writer.add_token_types(kinds + [types.UNUSED] * pad)
    writer.add_token_merges(merges)
    if eot is not None:
        writer.add_bos_token_id(eot)
        writer.add_eos_token_id(eot)
    writer.add_add_bos_token(False)


def rwkv_escape(ch):
    """A token's text as llama.cpp's rwkv vocabulary stores it (backslash escapes)."""
    escapes = {"\\": "\\\\", "\n": "\\n", "\t": "\\t", "\r": "\\r"}
    if ch in escapes:
        return escapes[ch]
    return f"\\x{ord(ch):02x}" if ord(ch) < 32 else ch


# a tokenizer.json's pre-tokenizer (the rule that splits text into words before BPE) -> the name
# llama.cpp gives the same rule (tokenizer.ggml.pre); the key is ByteLevel's own (GPT-2's
# pattern), or the pattern of a Split before a ByteLevel that only maps bytes
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?"
                r"[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE = {("ByteLevel", False): "gpt-2", (LLAMA3_SPLIT, True): "llama-bpe"}  # (rule, ignore_merges)


def split_rule(pre):
    """A byte-level pre-tokenizer's split rule, a key of PRE; None for any other."""
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    *split, last = steps or [{}]
    if last.get("type") != "ByteLevel" or last.get("add_prefix_space", True):
        return None
    if not split and last.get("use_regex", True):
        return "ByteLevel"
    if len(split) == 1 and not last.get("use_regex", True):
        s = split[0]
        if s.get("type") == "Split" and s.get("behavior") == "Isolated" and not s.get("invert"):
            return (s.get("pattern") or {}).get("Regex")
    return None


def hf_vocab(meta):
    """A meta's tokenizer.json as llama.cpp's byte-level BPE ('gpt2'): (tokens in id order,
    merges as 'a b', {id: TokenType} of its added tokens, the pre-tokenizer's name, the
    end-of-text id or None); an ExportError naming what llama.cpp lacks for any other."""
    types = _gguf().TokenType
    tj = json.loads(meta["tokenizer_json"])
    model, decoder = tj.get("model") or {}, tj.get("decoder") or {}
    rule = split_rule(tj.get("pre_tokenizer") or {})
    pre = PRE.get((rule, bool(model.get("ignore_merges"))))
    lacks = [f"a {model.get('type')} model with a {decoder.get('type')} decoder"] * (
        model.get("type") != "BPE" or decoder.get("type") != "ByteLevel")
    lacks += ["a normalizer"] * bool(tj.get("normalizer")) + ["no merges"] * (
        not model.get("merges")) + ["a pre-tokenizer of another kind"] * (pre is None)
    if lacks:
        raise ExportError(f"llama.cpp's GGUF tokenizers take byte-level BPE split as GPT-2's or "
                          f"LLaMA 3's; this tokenizer.json has {', '.join(lacks)}: export with "
                          f"--format=hf, which carries it as it is")
    ids = dict(model["vocab"])
    special = {}
    for a in tj.get("added_tokens", []):
        ids[a["content"]] = a["id"]
        special[a["id"]] = types.CONTROL if a.get("special") else types.USER_DEFINED
    tokens = [None] * (max(ids.values()) + 1)
    for token, i in ids.items():
        tokens[i] = token
    for i in (i for i, t in enumerate(tokens) if t is None):  # ids the file skips
        tokens[i], special[i] = f"[UNUSED{i}]", types.UNUSED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    eot = meta.get("eot_token")
    return tokens, merges, special, pre, ids.get(eot) if eot else None


@contextmanager
def gguf_file(path, arch):
    """Yield a GGUFWriter for arch; the file is written when the block ends (atomically: a
    temporary name, then a rename), or not at all."""
    gguf = _gguf()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        writer = gguf.GGUFWriter(str(tmp), arch)
        writer.add_name(f"BitGPT {arch}")
        yield writer
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()


# ---- the LLaMA architecture: llama.cpp's 'llama' and 'bitnet' --------------------------------

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


@torch.no_grad()
def add_tensors(out, model, args, arch):
    """out: a Tensors. Ternary projections with d = 1 and their exact scale beside them."""
    ternary = args.get("bitlinear", True)
    for key, w in model.state_dict().items():
        if key == "output.weight" and args["tie_embeddings"]:
            continue
        name, kind = gguf_name(key), key.rsplit(".", 2)[-2]
        if arch == "llama" and kind in ("wq", "wk"):
            w = rope_pairs_adjacent(w, args["n_head"] if kind == "wq" else args["n_kv_head"])
        if kind in LINEARS and ternary:
            t, s = ternarize(w)
            out.ternary(name, t)
            out.writer.add_tensor(name.replace(".weight", ".scale"),
                                  np.array([1.0 / s.item()], dtype=np.float32))
        elif key in ("tok_embeddings.weight", "output.weight"):
            out.add(name, w, out.embed)
        elif kind in LINEARS:
            out.add(name, w, out.float)
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
