"""Shared fixtures: the real Tiny Shakespeare corpus (offline copy) and tiny training configs.

The corpus comes from $TINYSHAKESPEARE_PATH, else ../shared/data/tinyshakespeare/input.txt beside
the repo, else data/shakespeare_char/input.txt (where python train.py downloads it); tests that
need it skip, saying so, when none exists. GPT-2 BPE tests use the offline tiktoken cache in
../shared/tiktoken when TIKTOKEN_CACHE_DIR is not set, and skip, saying so, when the GPT-2 files
are not in the cache (the gpt2_encoding fixture: it never downloads).
"""

import os
import signal
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"

if "TIKTOKEN_CACHE_DIR" not in os.environ and (SHARED / "tiktoken").is_dir():
    os.environ["TIKTOKEN_CACHE_DIR"] = str(SHARED / "tiktoken")


@pytest.fixture(autouse=True)
def python_ctrl_c():
    """Every test starts with Python's own Ctrl-C handler: a library run by an earlier test in
    this process may leave SIGINT ignored, which the processes a test starts would inherit."""
    signal.signal(signal.SIGINT, signal.default_int_handler)


def corpus_path():
    env = os.environ.get("TINYSHAKESPEARE_PATH")
    candidates = [Path(env)] if env else []
    candidates += [SHARED / "data" / "tinyshakespeare" / "input.txt",
                   ROOT / "data" / "shakespeare_char" / "input.txt"]
    return next((path for path in candidates if path.is_file()), None)


@pytest.fixture(scope="session")
def corpus():
    path = corpus_path()
    if path is None:
        pytest.skip("Tiny Shakespeare not found: set TINYSHAKESPEARE_PATH, put ../shared beside "
                    "the repo or data/shakespeare_char/input.txt in it")
    return path


def gpt2_offline():
    """(tiktoken's GPT-2 encoding, None) when its files are in the cache, else (None, why):
    loaded with downloads refused, so a test never waits on the network."""
    import tiktoken.load
    import tiktoken.registry

    from data.common import DataError
    from data.tokenizer import gpt2_encoding
    if "gpt2" in tiktoken.registry.ENCODINGS:
        return tiktoken.registry.ENCODINGS["gpt2"], None

    def offline(blobpath):
        if "://" in blobpath:
            raise ConnectionError(f"tests do not download ({blobpath})")
        return read_file(blobpath)

    read_file = tiktoken.load.read_file
    tiktoken.load.read_file = offline
    try:
        return gpt2_encoding(), None
    except DataError as e:
        return None, str(e)
    finally:
        tiktoken.load.read_file = read_file


@pytest.fixture(scope="session")
def gpt2_encoding():
    """tiktoken's GPT-2 encoding; the test skips, saying why, when its files are not cached."""
    pytest.importorskip("tiktoken")
    enc, why = gpt2_offline()
    if enc is None:
        pytest.skip(f"GPT-2 BPE unavailable offline: {why}")
    return enc


@pytest.fixture(scope="session")
def data_dir(corpus, tmp_path_factory):
    """A data_dir holding shakespeare_char prepared from the local corpus."""
    from data.shakespeare_char.prepare import prepare
    root = tmp_path_factory.mktemp("data")
    prepare(root / "shakespeare_char", corpus)
    return root


@pytest.fixture
def tiny_cfg(data_dir, tmp_path):
    """A resolved training config for a ~30k-parameter model that trains in seconds on CPU."""
    from train import DEFAULTS, resolve
    cfg = dict(DEFAULTS, out_dir=str(tmp_path / "out"), data_dir=str(data_dir), device="cpu",
               compile=False, n_layer=2, n_head=2, n_embd=32, block_size=32, batch_size=8,
               max_iters=20, lr_decay_iters=20, warmup_iters=5, eval_interval=10, eval_iters=2,
               log_interval=5)
    return resolve(cfg)


@pytest.fixture(scope="session")
def bpe_data_dir(corpus, gpt2_encoding, tmp_path_factory):
    """A data_dir holding shakespeare (GPT-2 BPE, offline tiktoken cache) from the local corpus."""
    from data.shakespeare.prepare import prepare
    root = tmp_path_factory.mktemp("bpe_data")
    prepare(root / "shakespeare", corpus)
    return root


@pytest.fixture(scope="session")
def train_llama(data_dir, tmp_path_factory):
    """train_llama(**overrides) -> out_dir of a small LLaMA trained on real text (once per set
    of overrides). Widths are multiples of 256, so the ternary model also fits GGUF's blocks."""
    from train import DEFAULTS, resolve, train
    done = {}

    def run(**over):
        key = tuple(sorted(over.items()))
        if key not in done:
            out = tmp_path_factory.mktemp("llama")
            cfg = dict(DEFAULTS, arch="llama", out_dir=str(out), data_dir=str(data_dir),
                       device="cpu", compile=False, n_layer=2, n_head=4, n_kv_head=2,
                       n_embd=256, ffn_hidden=256, block_size=64, batch_size=8, max_iters=80,
                       lr_decay_iters=80, warmup_iters=10, eval_interval=80, eval_iters=2,
                       log_interval=80, learning_rate=2e-3,
                       # the weights the exports' float tolerances were checked on: AdamW's
                       optimizer="adamw", lr_schedule="cosine")
            train(resolve(dict(cfg, **over)))
            done[key] = out
        return done[key]
    return run
