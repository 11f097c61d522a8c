"""The core a learner reads, and the direction of every import.

A default `python train.py` and `python sample.py` load a small, fixed set of project files (the
core); everything else (exports, packed files, integer inference, imports, distillation, tools)
is an extension that imports the core and is loaded only at a named seam, where a setting asks
for it. Checked here from what the processes load and from the import statements themselves.
"""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

TRAIN_CORE = ["bitlinear/layer.py", "bitlinear/muon.py", "common.py", "configs/__init__.py",
              "data/loader.py", "gpt/model.py", "train.py"]
SAMPLE_CORE = ["bitlinear/layer.py", "common.py", "data/tokenizer.py", "gpt/model.py",
               "sample.py"]
CORE = set(TRAIN_CORE + SAMPLE_CORE + ["llama/model.py"])
# the loop, one model, the layer, the loader, and the checks of every file they read
MAX_FILES, MAX_LINES = 8, 1830
# Where the core may load an extension: one named place per setting that asks for one
# (file, the function holding the import, the module it imports).
SEAMS = {
    ("train.py", "start", "bitlinear.convert"),  # --init_from=PATH|gpt2, --distill_from
    ("train.py", "prepare_model", "torch.distributed.fsdp"),  # --fsdp
    ("train.py", "main", "configs.table"),  # --list_configs
    ("train.py", "open", "wandb"),  # --wandb_log (Log.open)
    ("train.py", "claim", "fcntl"),  # the out_dir lock, where the platform has one
    ("sample.py", "load_model", "bitlinear.packed_model"),  # a .bitnet file
    ("sample.py", "load_model", "llama.hf_import"),  # a transformers folder
    ("data/loader.py", "read_meta", "data.meta"),  # an old meta.pkl
    ("data/loader.py", "token_bytes", "data.tokenizer"),  # a BPE dataset's bits per byte
    ("data/tokenizer.py", "hf_tokenizer", "tokenizers"),  # a tokenizer.json
    ("data/tokenizer.py", "tiktoken_module", "tiktoken"),  # GPT-2 BPE
    ("data/tokenizer.py", "tiktoken_module", "tiktoken.load"),
}

LOADED = """
import json, runpy, sys
from pathlib import Path
root = Path.cwd().resolve()
script, sys.argv = sys.argv[1], sys.argv[1:]
try:
    runpy.run_path(script, run_name="__main__")
finally:
    files = {script}
    for m in list(sys.modules.values()):
        f = Path(getattr(m, "__file__", None) or "/")
        if f.is_absolute() and f.resolve().is_relative_to(root) and ".venv" not in f.parts:
            f = f.resolve()
            files.add(f.relative_to(root).as_posix())
    print("LOADED " + json.dumps(sorted(files)))
"""


def loaded(args):
    """The project files a command (a script and its arguments) loads, run from the repo root."""
    out = subprocess.run([sys.executable, "-c", LOADED, *args], cwd=ROOT, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("LOADED "))
    return json.loads(line[len("LOADED "):])


def lines(files):
    return sum(len((ROOT / f).read_text().splitlines()) for f in files)


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("core")
    files = loaded(["train.py", f"--data_dir={data_dir}", f"--out_dir={out}", "--max_iters=2",
                    "--eval_interval=2", "--eval_iters=1", "--device=cpu"])
    return out, files


def test_a_default_run_loads_the_core_only(trained):
    _, files = trained
    assert files == TRAIN_CORE
    assert len(files) <= MAX_FILES and lines(files) <= MAX_LINES, (len(files), lines(files))


def test_a_default_sample_loads_the_core_only(trained):
    out, _ = trained
    files = loaded(["sample.py", f"--out_dir={out}", "--num_samples=1", "--max_new_tokens=5",
                    "--device=cpu"])
    assert files == SAMPLE_CORE
    assert len(files) <= MAX_FILES and lines(files) <= MAX_LINES, (len(files), lines(files))


def project_files():
    skip = {".venv", "tests", ".git"}
    return sorted(p for p in ROOT.rglob("*.py") if not skip & set(p.relative_to(ROOT).parts))


def module_name(path):
    rel = path.relative_to(ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def imports(path):
    """[(the function holding it or None at the top, the module imported)] of a file."""
    found = []

    def visit(node, func):
        for child in ast.iter_child_nodes(node):
            inner = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) \
                else func
            if isinstance(child, ast.Import):
                found.extend((func, a.name) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                found.append((func, child.module))
            visit(child, inner)
    visit(ast.parse(path.read_text()), None)
    return found


def project_module(name, modules):
    """The project module an import names (the longest known prefix), or None."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in modules:
            return ".".join(parts[:n])
    return None


def test_imports_point_from_extensions_to_the_core():
    files = {module_name(p): p for p in project_files()}
    core = {module_name(ROOT / f) for f in CORE}
    graph = {}
    for name, path in files.items():
        rel = path.relative_to(ROOT).as_posix()
        for func, target in imports(path):
            dep = project_module(target, files)
            if dep is not None:
                graph.setdefault(name, set()).add(dep)
            top = name.split(".")[0]
            if dep is not None and top in ("gpt", "llama"):
                assert dep.split(".")[0] != {"gpt": "llama", "llama": "gpt"}[top], (rel, target)
            if rel in CORE and func is not None:
                assert (rel, func, target) in SEAMS, f"{rel}: {target} imported in {func}()"
            if rel in CORE and func is None and dep is not None:
                assert dep in core, f"the core file {rel} imports the extension {target}"
    assert graph.get("common", set()) <= set(), graph.get("common")  # the ground floor


def test_no_import_cycles():
    files = {module_name(p): p for p in project_files()}
    graph = {name: {project_module(t, files) for f, t in imports(path) if f is None} - {None}
             for name, path in files.items()}
    state = {}

    def visit(node, trail):
        state[node] = "open"
        for dep in graph.get(node, ()):
            if state.get(dep) == "open":
                raise AssertionError("import cycle: " + " -> ".join(trail + [node, dep]))
            if dep not in state:
                visit(dep, trail + [node])
        state[node] = "done"
    for name in graph:
        if name not in state:
            visit(name, [])
