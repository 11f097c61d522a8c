"""The config system, as in nanoGPT: config files set values, --key=value overrides them.

    python train.py configs/gpt_10m.py --batch_size=32 --compile=False

Every value is checked against the defaults before any work starts: an unknown key or a value of
the wrong type ends the program with one line naming the key (and the close matches).
Command-line values are parsed with ast.literal_eval, never eval; config files are Python files
that assign keys, run in their own namespace.
"""

import ast
import difflib
import re
import sys
import types
from pathlib import Path


class UserError(ValueError):
    """A problem the user can fix (config, data, checkpoint): shown as one line, no traceback."""


class ConfigError(UserError):
    """A config problem the user can fix; its message is one line that says how."""


def _suggest(key, known):
    close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
    return f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""


def check_value(key, value, defaults):
    """Return value converted to the type of defaults[key], or raise ConfigError."""
    if key not in defaults:
        raise ConfigError(f"unknown config key '{key}'{_suggest(key, defaults)}; "
                          f"run with --help to list every key")
    default = defaults[key]
    if default is None or default == "auto" and value != "auto":
        return value  # free-typed key: its consumer validates it
    want = type(default)
    if want is float and type(value) is int:
        return float(value)
    if type(value) is not want:
        raise ConfigError(f"config key '{key}' wants {want.__name__} (default {default!r}), "
                          f"got {type(value).__name__} {value!r}")
    return value


def parse_value(raw, default):
    """Command-line text -> Python value: a literal, or the raw text for string keys."""
    if raw.lower() in ("true", "false") and (isinstance(default, bool) or default == "auto"):
        return raw.lower() == "true"
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw  # a bare word such as --device=cpu
    if isinstance(default, str) and default != "auto" and not isinstance(value, str):
        return raw  # --start=123 is the text "123"
    return value


def read_config_file(path, defaults):
    """Run a config file and return the keys it sets, each checked against defaults."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file '{path}' not found; configs live in configs/ "
                          f"(python train.py --list_configs)")
    def include(name):
        """Take another config file's keys (path relative to this file); later lines override."""
        namespace.update(read_config_file(path.parent / name, defaults))

    namespace = {"include": include}
    try:
        exec(compile(path.read_text(), str(path), "exec"), namespace)
    except ConfigError:
        raise
    except Exception as e:  # a syntax or runtime error in the user's file
        raise ConfigError(f"config file '{path}' failed: {type(e).__name__}: {e}") from None
    values = {k: v for k, v in namespace.items() if not k.startswith("_") and k != "include"
              and not isinstance(v, types.ModuleType)}
    try:
        return {k: check_value(k, v, defaults) for k, v in values.items()}
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def parse_args(defaults, argv):
    """Apply config files and --key=value arguments, in order, on top of defaults."""
    config = dict(defaults)
    for arg in argv:
        if not arg.startswith("--"):
            config.update(read_config_file(arg, defaults))
            continue
        key, eq, raw = arg[2:].partition("=")
        key = key.replace("-", "_")
        if not eq:
            if isinstance(defaults.get(key), bool):
                raw = "True"  # --flag alone means --flag=True
            else:
                raise ConfigError(f"argument '{arg}' needs a value: --{key}=VALUE")
        if key not in defaults:
            check_value(key, None, defaults)  # raises, with suggestions
        config[key] = check_value(key, parse_value(raw, defaults[key]), defaults)
    return config


CONFIG_FACTS = re.compile(
    r"# parameters: (([\d.]+)([kMB])) \| training memory: ([\d.]+) ([MG])B \((.*)\)")


def config_facts(path):
    """What a config file's header states: {description, params, params_text, memory, setting}.

    Its first line is "# name: description", and one line reads
    "# parameters: 10.65M | training memory: 1.70 GB (batch_size 64, bfloat16)".
    """
    lines = Path(path).read_text().splitlines()
    facts = {"description": lines[0].lstrip("# ").partition(": ")[2] if lines else "",
             "params": None, "params_text": "-", "memory": None, "memory_text": "-",
             "setting": ""}
    for line in lines:
        if m := CONFIG_FACTS.match(line):
            facts.update(params=float(m[2]) * {"k": 1e3, "M": 1e6, "B": 1e9}[m[3]],
                         params_text=m[1], memory=float(m[4]) * {"M": 1e6, "G": 1e9}[m[5]],
                         memory_text=f"{m[4]} {m[5]}B", setting=m[6])
    return facts


def list_configs(folder):
    """The table `python train.py --list_configs` prints: each config file and its stated size."""
    facts = {f"configs/{p.name}": config_facts(p) for p in Path(folder).glob("*.py")}
    width = max(map(len, facts))
    rows = [f"{'config':<{width}}  {'params':>6}  {'memory':>9}  description"]
    for name, f in sorted(facts.items(), key=lambda kv: (kv[1]["params"] or 0, kv[0])):
        rows.append(f"{name:<{width}}  {f['params_text']:>6}  {f['memory_text']:>9}  "
                    f"{f['description']}")
    return "\n".join(rows + ["memory: to train on one device without sharding, at the config's "
                             "batch_size (README)"])


def help_text(defaults, prog, doc=""):
    lines = [f"usage: python {prog} [config_file.py ...] [--key=value ...]", ""]
    if doc:
        lines += [doc.strip(), ""]
    width = max(len(k) for k in defaults)
    lines += [f"  --{k:<{width}} = {v!r}" for k, v in defaults.items()]
    return "\n".join(lines)


def configure(defaults, argv=None, prog="train.py", doc=""):
    """The command-line front door: --help, or the checked config; errors exit with one line."""
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        print(help_text(defaults, prog, doc))
        sys.exit(0)
    try:
        return parse_args(defaults, argv)
    except ConfigError as e:
        sys.exit(f"error: {e}")


def run_cli(defaults, run, prog, doc="", argv=None):
    """A script's main: check the config, return run(cfg); a UserError exits with one line."""
    cfg = configure(defaults, argv, prog, doc)
    try:
        return run(cfg)
    except UserError as e:
        sys.exit(f"error: {e}")
