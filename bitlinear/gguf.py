"""A GGUF file for llama.cpp (written with gguf-py), whichever architecture it holds: the file, its
tensor types and its tokenizer (gpt/gguf.py and llama/gguf.py add the hparams and tensors).

Ternary projections are TQ2_0 (2.06 bits/weight) or TQ1_0 (1.69) blocks of 256 weights, or Q4_0
(4.5) blocks of 32 (bitlinear/pack.py), each block with its own fp16 scale d. A block never
spans two rows, so every row length must be a multiple of the block (check_rows). Floats are F16
or F32; embeddings may be Q8_0 instead (--embed_int8).

Tokenizer (add_tokenizer): GPT-2 BPE as 'gpt2' (tokens, merges), padded to vocab_size with unused
tokens; a character vocabulary as 'rwkv', llama.cpp's greedy longest-match tokenizer, which over
tokens of one character each is exactly our one-token-per-character encoding; a tokenizer.json
(meta kind 'hf') when it is byte-level BPE, as 'gpt2' with the pre-tokenizer llama.cpp names for
its split rule (hf_vocab).
"""

import json
from contextlib import contextmanager
from pathlib import Path

from bitlinear.hf import ExportError
from bitlinear.pack import BLOCK, PACK_BLOCKS
from common import atomic_path
from data.tokenizer import GPT2_EOT, tokenizer_kind
from data.vocab import char_tokens, gpt2_vocab

# a tokenizer.json's pre-tokenizer (the rule that splits text into words before BPE) -> the name
# llama.cpp gives the same rule (tokenizer.ggml.pre); the key is ByteLevel's own (GPT-2's
# pattern), or the pattern of a Split before a ByteLevel that only maps bytes
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?"
                r"[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE = {("ByteLevel", False): "gpt-2", (LLAMA3_SPLIT, True): "llama-bpe"}  # (rule, ignore_merges)


def _gguf():
    try:
        import gguf
    except ImportError:
        raise ExportError("--format=gguf needs gguf-py: pip install gguf") from None
    return gguf


# ---- the file and its tensors ----------------------------------------------------------------

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


# ---- the tokenizer ---------------------------------------------------------------------------

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
