"""Standard benchmarks with EleutherAI's lm-evaluation-harness on BitGPT's own forward.

    pip install lm-eval
    python -m tools.eval --ckpt=out/ckpt.pt --tasks=hellaswag,arc_easy --limit=100
    python -m tools.eval --ckpt=out/model.bitnet --tasks=arc_easy,piqa      # the integer path
    python -m tools.eval --ckpt=out/ckpt.pt --compare=out-float/ckpt.pt --tasks=arc_easy
    python -m tools.eval --ckpt=out/ckpt.pt --tasks=mytask --include_path=tasks/ \\
        --builtin_tasks=False

ckpt (and compare) is a training checkpoint, a packed .bitnet file (the exact integer path) or a
transformers folder, loaded as sample.py loads it; no export is needed. lm-eval's evaluator runs
the tasks on it through tools/harness.py, prints lm-eval's table, and writes its results JSON
beside the model: DIR/eval_NAME_TASKS.json (an existing file there that this tool did not write
is refused, not overwritten). --compare runs a second model (the float twin, say) the same way
and puts its column beside the first. An exported folder (export.py --format=hf) runs in
lm-eval itself too, with the same scores: lm_eval --model hf --model_args pretrained=out/hf
--tasks=... (a character vocabulary has no end-of-text token to start a text with, which rolling
log-likelihood tasks need: add prefix_token_id=N, N its newline's id, as BitGPT's model uses).
"""

import difflib
import json
from contextlib import nullcontext
from importlib.metadata import version
from pathlib import Path

import torch

from bitlinear.layer import frozen_weights
from common import (
    ConfigError,
    DataError,
    atomic_path,
    defaults,
    first_line,
    resolve_device,
    run_cli,
)
from sample import load_model

SETTINGS = dict(
    ckpt=("out/ckpt.pt", "a checkpoint (.pt), a packed model (.bitnet) or a transformers folder"),
    tasks=("", "comma-separated lm-eval task or group names, e.g. hellaswag,arc_easy"),
    limit=(0, "documents per task (the first ones); 0: all"),
    num_fewshot=(-1, "examples before each question; -1: the task's own number"),
    batch_size=(16, "sequences per forward"),
    max_gen_toks=(256, "most tokens a generation makes when its task sets none"),
    compare=("", "a second model evaluated the same way, its column beside the first"),
    include_path=("", "a folder of local task YAMLs (lm-eval's --include_path)"),
    builtin_tasks=(True, "index lm-eval's own tasks too (some seconds); False: include_path's"),
    device=("auto", "'auto' (cuda, else mps, else cpu), 'cpu', 'cuda', 'mps'"),
    dtype=("float32", "'float32', 'bfloat16', 'float16' or 'auto' (the device's fastest)"),
    seed=(1234, "lm-eval's seeds (few-shot examples, sampling of documents)"),
)
DEFAULTS = defaults(SETTINGS)
MARK = "bitgpt_eval"  # the key that says this tool wrote a results file


def lm_eval_modules():
    """(lm_eval, its TaskManager, tools.harness): lm-eval is optional."""
    try:
        import lm_eval
        import lm_eval.utils
        from lm_eval.tasks import TaskManager

        from tools import harness
    except ImportError as e:
        if not (e.name or "").startswith("lm_eval"):
            raise
        raise ConfigError("tools.eval needs EleutherAI's lm-evaluation-harness: "
                          "pip install lm-eval") from None
    return lm_eval, TaskManager, harness


def task_names(cfg):
    names = [t.strip() for t in cfg["tasks"].split(",") if t.strip()]
    if not names:
        raise ConfigError("give the tasks to run: --tasks=hellaswag,arc_easy (lm-eval's names, "
                          "or local ones with --include_path=DIR)")
    return names


def check_tasks(names, manager, cfg):
    """A name lm-eval does not know is one line, with the closest it knows."""
    known = manager.all_tasks
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            where = ([f"in {cfg['include_path']}"] if cfg["include_path"] else []) + (
                ["among lm-eval's tasks (lm_eval ls tasks)"] if cfg["builtin_tasks"] else [])
            raise ConfigError(f"no task '{name}'{hint} {' or '.join(where)}".rstrip() +
                              "; local task YAMLs come with --include_path=DIR")


def out_path(model_path, names):
    """DIR/eval_NAME_TASKS.json beside the model; refused when something else is there."""
    model_path = Path(model_path)
    path = model_path.parent / f"eval_{model_path.stem}_{'-'.join(names)[:120]}.json"
    if path.exists() or path.is_symlink():
        try:
            ours = MARK in json.loads(path.read_text())
        except (OSError, ValueError, TypeError):
            ours = False
        if not ours:
            raise ConfigError(f"'{path}' exists and is not a results file of tools.eval; move "
                              f"it away, it is not overwritten")
    return path


def evaluate_model(path, cfg, manager, modules):
    """lm-eval's results dict for one model."""
    lm_eval, _, harness = modules
    device, dtype = resolve_device(cfg["device"], cfg["dtype"])
    model, meta = load_model(path)
    autocast = (nullcontext if dtype == "float32" else lambda: torch.autocast(
        device_type=device.split(":")[0], dtype=getattr(torch, dtype)))
    lm = harness.BitGPTLM(model, meta, device, cfg["batch_size"], cfg["max_gen_toks"], autocast)
    try:
        with frozen_weights(lm.model):
            return lm_eval.simple_evaluate(
                model=lm, tasks=task_names(cfg), num_fewshot=None if cfg["num_fewshot"] < 0
                else cfg["num_fewshot"], limit=cfg["limit"] or None, task_manager=manager,
                log_samples=False, random_seed=cfg["seed"], numpy_random_seed=cfg["seed"],
                torch_random_seed=cfg["seed"], fewshot_random_seed=cfg["seed"])
    except ConnectionError as e:  # datasets' words for a task whose data is not in its cache
        raise DataError(f"a task's data could not be downloaded ({first_line(e)}); run once "
                        f"online (datasets keeps it in its cache) or use local tasks") from None


def write_results(path, results, model_path, cfg, default):
    keys = ("limit", "num_fewshot", "batch_size", "device", "dtype", "seed")
    record = {MARK: {"model": str(model_path), "tasks": task_names(cfg),
                     **{k: cfg[k] for k in keys}, "lm_eval": version("lm-eval")}, **results}
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(record, indent=2, default=default) + "\n")


def metrics(results):
    """{(task, metric): value} of lm-eval's results; standard errors and counts left out."""
    return {(task, key.replace(",none", "")): value
            for task, row in results["results"].items() for key, value in row.items()
            if key not in ("alias", "sample_len") and "_stderr" not in key
            and isinstance(value, (int, float))}


def compare_table(a, b, name_a, name_b):
    """A markdown table: task, metric, then model a's and model b's values."""
    ma, mb = metrics(a), metrics(b)
    lines = [f"| task | metric | {name_a} | {name_b} |", "|---|---|---:|---:|"]
    for task, metric in dict.fromkeys([*ma, *mb]):
        va, vb = (f"{m[task, metric]:.4f}" if (task, metric) in m else "-" for m in (ma, mb))
        lines.append(f"| {task} | {metric} | {va} | {vb} |")
    return "\n".join(lines)


def evaluate(cfg):
    """Evaluate ckpt (and compare); returns {model path: lm-eval's results dict}."""
    names = task_names(cfg)
    if cfg["limit"] < 0 or cfg["batch_size"] < 1 or cfg["max_gen_toks"] < 1:
        raise ConfigError("limit must be >= 0, batch_size and max_gen_toks >= 1")
    if cfg["include_path"] and not Path(cfg["include_path"]).is_dir():
        raise ConfigError(f"include_path '{cfg['include_path']}' is not a folder")
    paths = [p for p in (cfg["ckpt"], cfg["compare"]) if p]
    outs = [out_path(p, names) for p in paths]  # refused before any work, not after
    modules = lm_eval_modules()
    manager = modules[1](include_path=cfg["include_path"] or None,
                         include_defaults=cfg["builtin_tasks"])
    check_tasks(names, manager, cfg)
    found = []
    for path, out in zip(paths, outs, strict=True):
        results = evaluate_model(path, cfg, manager, modules)
        print(f"{path}:")
        print(modules[0].utils.make_table(results))
        if results.get("groups"):
            print(modules[0].utils.make_table(results, "groups"))
        write_results(out, results, path, cfg, modules[0].utils.handle_non_serializable)
        print(f"results: {out}")
        found.append(results)
    if cfg["compare"]:
        print(compare_table(*found, *paths))
    return dict(zip(paths, found, strict=True))


def main(argv=None):
    return run_cli(SETTINGS, evaluate, "-m tools.eval", __doc__, argv)


if __name__ == "__main__":
    main()
