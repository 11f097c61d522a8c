"""tools/gpu_check.py's dry run: every step's commands run on CPU at toy sizes, and every figure
the GPU check reports is parsed from their output, so the check cannot rot before a GPU runs it."""

import json
import math

import pytest

from tools import gpu_check


def test_dry_run_gives_every_figure(data_dir, tmp_path, capsys):
    out = tmp_path / "check"
    results = gpu_check.main([f"--out={out}", "--dry-run", f"--data_dir={data_dir}"])
    failed = {s: r for s, r in results["steps"].items() if r["status"] != "ok"}
    assert not failed, {s: (r, (out / (r["log"] or "-")).read_text()[-2000:]
                            if r["log"] else "") for s, r in failed.items()}
    assert list(results["steps"]) == gpu_check.STEPS
    for _, key, *_ in gpu_check.FIGURES:
        value = results["figures"].get(key)
        assert isinstance(value, float) and math.isfinite(value), (key, value)
    for kind in ("ternary", "float"):
        assert results["figures"][f"{kind}_tokens_s"] > 0
        assert results["figures"][f"{kind}_wall_s"] > 0
    assert results["figures"]["packed_decode_tok_s"] > 0
    assert results["figures"]["float_decode_tok_s"] > 0
    assert json.loads((out / "results.json").read_text()) == results
    table = (out / "results.md").read_text()
    assert "FAILED" not in table and "n/a" not in table and "not judged (dry run)" in table
    assert table.count("\n| ") == len(gpu_check.FIGURES) + 1  # a row per figure, and the head
    assert gpu_check.table(results) in capsys.readouterr().out
    for step in set(gpu_check.STEPS) - {"memory"}:  # memory runs in the check's own process
        assert any(p.name.startswith(step) for p in (out / "logs").iterdir()), step


def test_bad_input_is_one_line(tmp_path):
    with pytest.raises(SystemExit, match="error: no step bnch; the steps are train, export"):
        gpu_check.main([f"--out={tmp_path}", "--dry-run", "--steps=train,bnch"])
