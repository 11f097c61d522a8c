"""The config system: files, --key=value, type checks and one-line errors."""

import subprocess
import sys

import pytest

from common import ConfigError, parse_args
from tests.conftest import ROOT

DEFAULTS = dict(learning_rate=1e-3, n_layer=4, compile="auto", device="auto", bitlinear=True,
                out_dir="out", start="\n")


def test_overrides_are_literals_checked_against_defaults():
    cfg = parse_args(DEFAULTS, ["--n_layer=6", "--learning_rate=3e-4", "--bitlinear=False",
                                "--compile=False", "--device=cpu", "--start=123"])
    assert cfg["n_layer"] == 6 and cfg["learning_rate"] == 3e-4 and cfg["bitlinear"] is False
    assert cfg["compile"] is False and cfg["device"] == "cpu"
    assert cfg["start"] == "123"  # string keys keep the text
    assert parse_args(DEFAULTS, ["--learning_rate=1"])["learning_rate"] == 1.0  # int -> float


def test_unknown_key_names_close_matches():
    with pytest.raises(ConfigError, match="unknown config key 'learnig_rate'.*'learning_rate'"):
        parse_args(DEFAULTS, ["--learnig_rate=1e-3"])


def test_a_mistyped_config_file_names_the_close_one():
    with pytest.raises(ConfigError, match="'configs/lama_1m.py' not found; did you mean "
                                          "configs/llama_1m.py\\?"):
        parse_args(DEFAULTS, ["configs/lama_1m.py"])
    with pytest.raises(ConfigError, match="'gpt_800k' not found; did you mean configs/gpt_800k"):
        parse_args(DEFAULTS, ["gpt_800k"])


def test_wrong_type_is_refused():
    with pytest.raises(ConfigError, match="'n_layer' wants int.*float 4.5"):
        parse_args(DEFAULTS, ["--n_layer=4.5"])
    with pytest.raises(ConfigError, match="'bitlinear' wants bool"):
        parse_args(DEFAULTS, ["--bitlinear=1"])


def test_config_file_values_and_checks(tmp_path):
    good = tmp_path / "good.py"
    good.write_text("import math\nn_layer = 2 * 3  # arithmetic is allowed\nout_dir = 'x'\n")
    cfg = parse_args(DEFAULTS, [str(good), "--n_layer=8"])
    assert cfg["n_layer"] == 8 and cfg["out_dir"] == "x"  # later arguments win
    bad = tmp_path / "bad.py"
    bad.write_text("n_layers = 2\n")
    with pytest.raises(ConfigError, match="bad.py: unknown config key 'n_layers'.*'n_layer'"):
        parse_args(DEFAULTS, [str(bad)])
    with pytest.raises(ConfigError, match="not found"):
        parse_args(DEFAULTS, [str(tmp_path / "missing.py")])


def test_every_shipped_config_file_is_valid():
    from configs.table import config_files
    from train import DEFAULTS as TRAIN_DEFAULTS
    files = config_files()
    assert len(files) == 18 and not {"__init__.py", "table.py"} & {f.name for f in files}
    for f in files:
        parse_args(TRAIN_DEFAULTS, [str(f)])


def run(*args):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def test_cli_error_is_one_line_before_any_work():
    r = run("train.py", "--bacth_size=4")
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("error: unknown config key 'bacth_size' (did you mean 'batch_size'")
    assert r.stdout == ""  # nothing started


def test_help_lists_every_key_with_its_default():
    from train import DEFAULTS as TRAIN_DEFAULTS
    r = run("train.py", "--help")
    assert r.returncode == 0
    for key, value in TRAIN_DEFAULTS.items():
        assert f"--{key}" in r.stdout and repr(value) in r.stdout


def test_derived_settings_are_decided_after_overrides():
    from train import DEFAULTS as TRAIN_DEFAULTS
    from train import resolve
    cfg = resolve(parse_args(TRAIN_DEFAULTS, ["--device=cpu"]))
    assert cfg["dtype"] == "float32" and cfg["compile"] is False
    with pytest.raises(ConfigError, match="not divisible"):
        resolve(parse_args(TRAIN_DEFAULTS, ["--device=cpu", "--n_embd=100", "--n_head=3"]))
    with pytest.raises(ConfigError, match="block_size must be at least 1, got 0"):
        resolve(parse_args(TRAIN_DEFAULTS, ["--device=cpu", "--block_size=0"]))


def test_gradient_accumulation_must_divide_across_processes(monkeypatch):
    from train import DEFAULTS as TRAIN_DEFAULTS
    from train import setup_processes
    for k, v in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="3").items():
        monkeypatch.setenv(k, v)
    cfg = dict(TRAIN_DEFAULTS, gradient_accumulation_steps=4, backend="gloo")
    with pytest.raises(ConfigError, match="gradient_accumulation_steps=4 does not divide across 3"):
        setup_processes(cfg)
