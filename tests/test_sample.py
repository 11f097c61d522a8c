"""sample.py from a tiny checkpoint: token counts, determinism, and prompt errors."""

import subprocess
import sys

import pytest
import torch

from data.tokenizer import Tokenizer
from export import main as export_main
from sample import generate, load_model
from tests.conftest import ROOT
from train import DEFAULTS, resolve, train


@pytest.fixture(scope="module")
def ckpt_dir(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("sample_out")
    cfg = resolve(dict(DEFAULTS, out_dir=str(out), data_dir=str(data_dir), device="cpu",
                       n_layer=1, n_head=2, n_embd=16, block_size=16, batch_size=4, max_iters=10,
                       eval_interval=10, eval_iters=1))
    train(cfg)
    return out


def sample(ckpt_dir, *args):
    return subprocess.run([sys.executable, "sample.py", f"--out_dir={ckpt_dir}", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_sample_count_length_and_determinism(ckpt_dir):
    args = ["--start=ROMEO:", "--num_samples=3", "--max_new_tokens=40", "--seed=1337"]
    r = sample(ckpt_dir, *args)
    assert r.returncode == 0, r.stderr
    texts = r.stdout.split("---------------\n")[:-1]
    assert len(texts) == 3
    for t in texts:
        assert t.startswith("ROMEO:") and len(t) == len("ROMEO:") + 40 + 1  # + print's newline
    assert sample(ckpt_dir, *args).stdout == r.stdout  # same seed, same text
    assert sample(ckpt_dir, *args[:-1], "--seed=1").stdout != r.stdout


def test_prompt_from_file_longer_than_context(ckpt_dir, tmp_path):
    prompt = tmp_path / "p.txt"
    prompt.write_text("First Citizen:\nBefore we proceed any further, hear me speak.\n")
    r = sample(ckpt_dir, f"--start=FILE:{prompt}", "--num_samples=1", "--max_new_tokens=5")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(prompt.read_text())


@pytest.mark.parametrize("args, message", [
    (["--start=héllo"], "characters this model never saw: 'é'"),
    (["--start="], "the prompt is empty"),
    (["--max_new_tokens=0"], "max_new_tokens must be positive"),
    (["--temperature=-1.0"], "temperature must be >= 0"),
    (["--compile=maybe"], "config key 'compile' wants bool"),
])
def test_bad_input_is_one_clear_line(ckpt_dir, args, message):
    r = sample(ckpt_dir, *args)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0]


def test_greedy_is_deterministic_without_seed(ckpt_dir):
    a = sample(ckpt_dir, "--temperature=0", "--num_samples=2", "--max_new_tokens=30", "--seed=1")
    b = sample(ckpt_dir, "--temperature=0", "--num_samples=1", "--max_new_tokens=30", "--seed=2")
    assert a.returncode == 0, a.stderr
    first, second = a.stdout.split("---------------\n")[:2]
    assert first == second == b.stdout.split("---------------\n")[0]


def test_packed_model_samples_the_models_tokens(ckpt_dir):
    """sample.py on a .bitnet file runs the integer model's cached steps: the text is what the
    model's uncached forward draws from the same seed."""
    path = ckpt_dir / "m.bitnet"
    export_main([f"--out_dir={ckpt_dir}", f"--to={path}", "--format=packed"])
    r = sample(ckpt_dir, f"--ckpt={path}", "--start=ROMEO:", "--num_samples=1",
               "--max_new_tokens=30", "--seed=7")
    assert r.returncode == 0, r.stderr
    model, meta = load_model(path)
    tok = Tokenizer(meta)
    ids = torch.tensor([tok.encode("ROMEO:")])
    for cache in (True, False):
        want = generate(model.eval(), ids, 30, 0.8, 200, torch.Generator().manual_seed(7),
                        use_cache=cache)
        assert r.stdout == tok.decode(want[0].tolist()) + "\n---------------\n"
