"""Any tokenizer: a tokenizer.json (or a transformers folder) through data.text.prepare, training,
sampling, the HF export and back; and BitNet folders that transformers itself made, in both of
its weight_scale conventions, imported with --init_from=FOLDER, offline.

The tokenizer is a byte-level BPE trained on Tiny Shakespeare here (quickly) with LLaMA
3's pre-tokenizer regex, whose punctuation-then-newline pieces make some chunk cuts inexact (the
prepare must find the exact ones), and LLaMA 3's special tokens.
"""

import json
import sys
import weakref

import numpy as np
import pytest
import torch

import llama.hf_import as hf_import
from bitlinear.inference import to_integer
from common import defaults, load_checkpoint, model_from_checkpoint, run_cli
from data.loader import Data, read_meta
from data.meta import hf_meta
from data.text.prepare import SETTINGS, prepare
from data.tokenizer import Tokenizer
from export import main as export_main
from llama.hf_import import load_hf, load_hf_model
from sample import DEFAULTS as SAMPLE
from sample import generate, sample
from train import DEFAULTS, resolve, train

tokenizers = pytest.importorskip("tokenizers", reason="tokenizers is not installed: pip install "
                                 "-r requirements-dev.txt (CI installs it)")

LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}"
                r"\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"
VOCAB = 512


@pytest.fixture(scope="module")
def bpe(corpus):
    """A tokenizers.Tokenizer trained on the corpus: VOCAB tokens, EOS at id 1."""
    from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), "isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train([str(corpus)], trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=[BOS, EOS], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    assert tok.get_vocab_size() == VOCAB and tok.token_to_id(EOS) == 1
    return tok


@pytest.fixture(scope="module")
def tokenizer_json(bpe, tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    bpe.save(str(path))
    return path


def prepare_text(path, name, data_dir, **cfg):
    return prepare(dict(defaults(SETTINGS), input=str(path), name=name, data_dir=str(data_dir),
                        **cfg))


def ids(folder, split):
    return np.fromfile(folder / f"{split}.bin", dtype=read_meta(folder)["dtype"]).tolist()


def encode(tok, text):
    return tok.encode(text, add_special_tokens=False).ids


# ---- data.text.prepare --tokenizer=PATH -----------------------------------------------------

def test_prepare_is_the_whole_text_tokenized(corpus, bpe, tokenizer_json, tmp_path, capsys):
    # 4 KB chunks: each cut is one where encoding the two sides apart is exact
    counts = prepare_text(corpus, "mine", tmp_path, tokenizer=str(tokenizer_json),
                          chunk_size=4096)
    out = capsys.readouterr().out
    assert f"end-of-text token '{EOS}' (found by its name)" in out
    assert "chunk cuts where" not in out
    text, folder = corpus.read_text(encoding="utf-8"), tmp_path / "mine"
    assert ids(folder, "train") == encode(bpe, text[:1_003_854])
    assert ids(folder, "val") == encode(bpe, text[1_003_854:])
    assert counts == {"train": len(ids(folder, "train")), "val": len(ids(folder, "val"))}
    meta = read_meta(folder)
    assert meta == {"vocab_size": VOCAB, "tokenizer": "hf", "dtype": "uint16",
                    "tokenizer_json": tokenizer_json.read_text(), "eot_token": EOS,
                    "source": corpus.name, "split_tokens": counts}


def test_a_separator_becomes_the_end_of_text_token(corpus, bpe, tokenizer_json, tmp_path):
    text = corpus.read_text(encoding="utf-8")[:20_000] + f"a speech that spells {EOS}\n"
    (tmp_path / "s.txt").write_text(text, encoding="utf-8")
    # speeches are separated by a blank line; chunks of 300 bytes cut some separators in two
    prepare_text(tmp_path / "s.txt", "s", tmp_path, tokenizer=str(tokenizer_json),
                 separator="\n\n", chunk_size=300, val_fraction=0.2)
    cut = int(len(text) * 0.8)  # ASCII: bytes are characters
    ordinary = tokenizers.Tokenizer.from_str(bpe.to_str())
    ordinary.encode_special_tokens = True  # text that spells EOS is text

    def expected(part):
        docs = part.split("\n\n")
        return sum((encode(ordinary, d) + [1] for d in docs[:-1]), []) + encode(ordinary,
                                                                                docs[-1])
    assert ids(tmp_path / "s", "train") == expected(text[:cut])
    assert ids(tmp_path / "s", "val") == expected(text[cut:])  # EOS spelled out stays text
    assert ids(tmp_path / "s", "train").count(1) == text[:cut].count("\n\n")


def test_more_than_65536_tokens_are_uint32(bpe, tmp_path):
    wide = tokenizers.Tokenizer.from_str(bpe.to_str())
    wide.add_tokens([f"<w{i}>" for i in range(65_100)])  # ids up to 65,611
    wide.save(str(tmp_path / "wide.json"))
    text = "".join(f"word <w{i}> and <w{i - 7}>\n" for i in range(64_900, 65_100)) * 20
    (tmp_path / "w.txt").write_text(text, encoding="utf-8")
    prepare_text(tmp_path / "w.txt", "w", tmp_path, tokenizer=str(tmp_path / "wide.json"),
                 chunk_size=1000)
    meta = read_meta(tmp_path / "w")
    assert (meta["vocab_size"], meta["dtype"]) == (VOCAB + 65_100, "uint32")
    cut = int(len(text) * 0.9)  # ASCII: bytes are characters
    train_ids = ids(tmp_path / "w", "train")
    assert train_ids == encode(wide, text[:cut])
    assert ids(tmp_path / "w", "val") == encode(wide, text[cut:])
    assert max(train_ids) == VOCAB + 65_099
    cfg = resolve(dict(DEFAULTS, device="cpu", data_dir=str(tmp_path), dataset="w",
                       block_size=32, batch_size=64))
    assert int(Data(cfg, "cpu", seed=0).batch("train")[0].max()) > 65535


def test_a_folder_gives_its_eot_and_model_vocab(bpe, tokenizer_json, corpus, tmp_path, capsys):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "tokenizer.json").write_text(tokenizer_json.read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": BOS, "eos_token": {"content": EOS, "special": True}}))
    (folder / "config.json").write_text(json.dumps({"vocab_size": 576}))  # padded past 512
    meta, how = hf_meta(folder)
    assert (meta["vocab_size"], meta["eot_token"], how) == (
        576, EOS, "tokenizer_config.json's eos_token")
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": BOS}))
    assert hf_meta(folder)[0]["eot_token"] == BOS
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<none>"}))
    assert hf_meta(folder)[1] == "found by its name"
    # no end-of-text token at all: the file is one document, and --separator is refused
    from tokenizers import models, pre_tokenizers, trainers
    bare = tokenizers.Tokenizer(models.BPE())
    bare.pre_tokenizer = pre_tokenizers.ByteLevel()
    bare.train_from_iterator(["no special tokens here"], trainers.BpeTrainer(
        vocab_size=300, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bare.save(str(tmp_path / "plain.json"))
    meta, how = hf_meta(tmp_path / "plain.json")
    assert meta["eot_token"] is None and how.startswith("none:")
    assert Tokenizer(meta).encode(f"a{EOS}") == encode(bare, f"a{EOS}")
    small = tmp_path / "small.txt"
    small.write_text(corpus.read_text(encoding="utf-8")[:5000])
    with pytest.raises(SystemExit) as e:
        run_cli(*prepare_cli(small, tmp_path / "plain.json", "--separator=x"))
    assert e.value.code == (f"error: --separator needs an end-of-text token, and "
                            f"'{tmp_path / 'plain.json'}' has none that BitGPT can find")


def prepare_cli(path, tokenizer, *extra):
    argv = [f"--input={path}", "--name=x", f"--data_dir={path.parent / 'd'}",
            f"--tokenizer={tokenizer}", *extra]
    return SETTINGS, prepare, "-m data.text.prepare", "", argv


def test_tokenizer_errors_are_one_line(corpus, tmp_path, tokenizer_json, monkeypatch):
    small = tmp_path / "small.txt"
    small.write_text("some text\n" * 50)
    (tmp_path / "broken.json").write_text('{"model": {"type": "BPE", "vocab": 3}}')
    (tmp_path / "empty").mkdir()
    cases = [
        (tmp_path / "nope.json", f"error: tokenizer must be 'char', 'gpt2' or the path of a "
                                 f"tokenizer.json (or of a folder holding one); "
                                 f"'{tmp_path / 'nope.json'}' is none of these"),
        (tmp_path / "empty", f"error: '{tmp_path / 'empty'}' is not a tokenizer.json, nor a "
                             f"folder holding one"),
        (tmp_path / "broken.json", f"error: '{tmp_path / 'broken.json'}' is not a "
                                   f"tokenizer.json that tokenizers can read ("),
    ]
    for tokenizer, message in cases:
        with pytest.raises(SystemExit) as e:
            run_cli(*prepare_cli(small, tokenizer))
        assert e.value.code.startswith(message) and "\n" not in e.value.code
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # not installed
    with pytest.raises(SystemExit) as e:
        run_cli(*prepare_cli(small, tokenizer_json))
    assert e.value.code == ("error: a tokenizer.json needs the 'tokenizers' package: pip "
                            "install tokenizers")
    assert not (tmp_path / "d").exists()


@pytest.fixture(scope="module")
def hf_data(corpus, tokenizer_json, tmp_path_factory):
    """A data_dir holding 'bpe': Tiny Shakespeare in the trained BPE."""
    root = tmp_path_factory.mktemp("hf_data")
    prepare_text(corpus, "bpe", root, tokenizer=str(tokenizer_json))
    return root


def test_train_and_sample_with_any_tokenizer(hf_data, tiny_cfg, tmp_path):
    cfg = dict(tiny_cfg, data_dir=str(hf_data), dataset="bpe", max_iters=2, lr_decay_iters=2,
               warmup_iters=1, eval_interval=2, eval_iters=1)
    assert np.isfinite(train(cfg)["val"])
    tok = Tokenizer(read_meta(hf_data / "bpe"))
    prompt = f"ROMEO: good night{EOS}JULIET:"
    assert tok.encode(prompt).count(tok.eot_id) == 1  # the prompt's spelled EOS is the token
    assert tok.decode(tok.encode(prompt)) == prompt
    texts = sample(dict(SAMPLE, out_dir=cfg["out_dir"], start=prompt, num_samples=1,
                        max_new_tokens=12, device="cpu"))
    assert texts[0].startswith(prompt) and len(texts[0]) > len(prompt)


# ---- the HF export and import of such a model -----------------------------------------------

transformers = pytest.importorskip("transformers", reason="transformers is not installed: "
                                   "pip install -r requirements-dev.txt (CI installs it)")
pytest.importorskip("accelerate", reason="transformers needs accelerate to load bitnet models: "
                    "pip install -r requirements-dev.txt (CI installs it)")


def run_hf(fn, *args, **kwargs):
    with torch._dynamo.config.patch(disable=True), torch.no_grad():  # its BitLinear compiles
        return fn(*args, **kwargs)


def test_hf_export_round_trip_of_the_tokenizer(train_llama, hf_data, corpus, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    out = train_llama(data_dir=str(hf_data), dataset="bpe", max_iters=2, lr_decay_iters=2,
                      warmup_iters=1, eval_interval=2, subln=True, tie_embeddings=True)
    export_main([f"--out_dir={out}", "--format=hf", f"--to={tmp_path / 'hf'}"])
    meta = read_meta(hf_data / "bpe")
    assert (tmp_path / "hf" / "tokenizer.json").read_text() == meta["tokenizer_json"]
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    ours = Tokenizer(meta)
    text = corpus.read_text(encoding="utf-8")[-3000:]
    assert hf_tok(text).input_ids == ours.encode(text)
    assert hf_tok.decode(ours.encode(text)) == text == ours.decode(hf_tok(text).input_ids)
    assert hf_tok.eos_token_id == ours.eot_id == 1
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["eos_token_id"] == 1
    # transformers' greedy continuation is ours, token for token
    model = model_from_checkpoint(load_checkpoint(out / "ckpt.pt")).eval()
    prompt = torch.tensor([ours.encode("ROMEO:")])
    hf_model = run_hf(AutoModelForCausalLM.from_pretrained, tmp_path / "hf").eval()
    hf_model.generation_config.eos_token_id = None  # 8 tokens, even if one is EOS
    got = run_hf(hf_model.generate, prompt, max_new_tokens=8, do_sample=False)
    assert torch.equal(got, generate(model, prompt, 8, temperature=0))
    assert load_hf(tmp_path / "hf")[2] == {k: meta[k] for k in meta
                                           if k not in ("source", "split_tokens")}


# ---- BitNet folders made by transformers itself ---------------------------------------------

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def transformers_bitnet_folder(folder, tok, linear_class, seed=0):
    """A BitNet b1.58 2B4T-form folder (relu2, sub-norms, tied, GQA, rope_theta 500000) at a toy
    size, written by transformers' classes: BitNetForCausalLM's initial weights, ternarized as
    its own WeightQuant does, packed by its pack_weights, weight_scale in linear_class's meaning
    ('bitlinear' divides by it: 1/mean|W|; 'autobitlinear' multiplies: mean|W|), and the
    tokenizer saved by PreTrainedTokenizerFast."""
    from safetensors.torch import save_file
    from transformers import BitNetConfig, BitNetForCausalLM, PreTrainedTokenizerFast
    from transformers.integrations.bitnet import pack_weights
    config = BitNetConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2,
                          vocab_size=tok.get_vocab_size(), max_position_embeddings=64,
                          tie_word_embeddings=True, bos_token_id=0, eos_token_id=1)
    torch.manual_seed(seed)
    state = BitNetForCausalLM(config).state_dict()
    for name in [n for n in state if n.rsplit(".", 2)[-2] in PROJECTIONS]:
        w = state[name] * 20  # init std 0.02: spread them, so the layers matter
        s = 1 / w.abs().mean().clamp(min=1e-5)
        state[name] = pack_weights((w * s).round().clamp(-1, 1))
        state[name + "_scale"] = (s if linear_class == "bitlinear" else 1 / s).reshape(1)
    state.pop("lm_head.weight")  # tied
    config.quantization_config = {"quant_method": "bitnet", "linear_class": linear_class,
                                  "quantization_mode": "offline"}
    config.save_pretrained(folder)
    save_file({k: v.contiguous() for k, v in state.items()}, folder / "model.safetensors",
              metadata={"format": "pt"})
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS).save_pretrained(
        folder)
    return folder


@pytest.mark.parametrize("linear_class", ["bitlinear", "autobitlinear"])
def test_transformers_bitnet_folders_import_and_fine_tune(linear_class, bpe, corpus, tmp_path,
                                                          tiny_cfg):
    from transformers import AutoModelForCausalLM
    folder = transformers_bitnet_folder(tmp_path / "bitnet", bpe, linear_class)
    model, args, meta = load_hf_model(folder)
    assert (args["mlp"], args["subln"], args["tie_embeddings"], args["rope_theta"]) == (
        "relu2", True, True, 500000.0)
    assert (meta["tokenizer"], meta["eot_token"], meta["vocab_size"]) == ("hf", EOS, VOCAB)
    ids = torch.tensor([encode(bpe, corpus.read_text(encoding="utf-8")[:400])[:48]])
    hf = run_hf(AutoModelForCausalLM.from_pretrained, folder).eval()
    expected = run_hf(hf, ids).logits
    with torch.no_grad():
        got = to_integer(model.eval())(ids, targets=ids)[0]
    assert expected.std() > 0.1  # logits that tell tokens apart, not a flat start
    assert (got - expected).abs().max() < 1e-5  # weight_scale's other meaning is far off
    assert torch.equal(got.argmax(-1), expected.argmax(-1))
    # data prepared with the folder's tokenizer fits it: fine-tune 2 steps, then sample
    small = tmp_path / "small.txt"
    small.write_text(corpus.read_text(encoding="utf-8")[:60_000], encoding="utf-8")
    prepare_text(small, "own", tmp_path, tokenizer=str(folder))
    cfg = dict(tiny_cfg, arch="llama", data_dir=str(tmp_path), dataset="own",
               init_from=str(folder), max_iters=2, lr_decay_iters=2, warmup_iters=1,
               eval_interval=2, eval_iters=1)
    assert np.isfinite(train(cfg)["val"])
    text = sample(dict(SAMPLE, out_dir=cfg["out_dir"], start="ROMEO:", num_samples=1,
                       max_new_tokens=8, device="cpu"))[0]
    assert text.startswith("ROMEO:") and len(text) > len("ROMEO:")


def test_import_holds_one_tensor_at_a_time(bpe, tmp_path, monkeypatch):
    folder = transformers_bitnet_folder(tmp_path / "bitnet", bpe, "bitlinear")
    read, alive, most = hf_import.read_tensor, [], []

    def tracked(entry):
        alive[:] = [r for r in alive if r() is not None]
        most.append(len(alive))
        t = read(entry)
        alive.append(weakref.ref(t))
        return t
    monkeypatch.setattr(hf_import, "read_tensor", tracked)
    model, _, _ = hf_import.load_hf_model(folder)
    # every read: at most a packed weight whose weight_scale is read next is still held
    assert len(most) == 2 * 2 * 7 + 2 * 4 + 2 and max(most) == 1
    reference = hf_import.load_hf(folder)[1]
    assert all(torch.equal(v, reference[k]) for k, v in model.state_dict().items())
