"""tools/eval.py and tools/harness.py: BitGPT's models in EleutherAI's lm-evaluation-harness,
offline, on local tasks in lm-eval's YAML format over JSONL files the tests write.

A small BitNet-style LLaMA is trained on Tiny Shakespeare (characters) and exported. Two tasks
come from the validation text it never trained on: shakespeare_order, multiple choice between a
line and the same line with its words shuffled (after the line before it), and shakespeare_ppl,
the rolling log-likelihood of whole passages. The scores of lm-eval's own `hf` model on the
exported folder are BitGPT's on the checkpoint, request by request, to the agreement of the
logits (the training model's fake quantization against the integer path), and so are they on
GPT (GPTBigCode) and LLaMA folders; the packed file's are the checkpoint's; the trained model
tells Shakespeare's word order from a shuffle. Generation is sample.py's greedy decoding cut at
the stop strings; a vocabulary that cannot hold a task's text, an unknown task and a missing
lm-eval are one line each.
"""

import json
import random
import sys
from itertools import pairwise
from pathlib import Path

import pytest
import torch

from export import main as export_main
from sample import generate, load_model
from tools.eval import MARK
from tools.eval import main as eval_main

STEPS = 120  # enough that shakespeare_order scores ~0.85, far above its chance of 0.5
DOCS = 60
TASKS = ["shakespeare_order", "shakespeare_ppl"]


def order_docs(val_text, n):
    """(line, next line) pairs: the next line against itself with its words shuffled."""
    rng, docs = random.Random(0), []
    lines = val_text.split("\n")
    for prev, line in pairwise(lines):
        words = line.split()
        if len(words) < 5 or not prev.strip() or prev.endswith(":"):
            continue
        shuffled = words[:]
        while shuffled == words:
            rng.shuffle(shuffled)
        docs.append({"context": prev, "choices": [line, " ".join(shuffled)], "label": 0})
        if len(docs) == n:
            break
    return docs


def write_task(folder, name, docs, lines):
    """A task YAML over a JSONL file of docs; lines: the YAML's own keys."""
    (folder / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    head = [f"task: {name}", "dataset_path: json", "dataset_kwargs:", "  data_files:",
            f"    test: {json.dumps(str(folder / f'{name}.jsonl'))}", "test_split: test"]
    (folder / f"{name}.yaml").write_text("\n".join(head + lines) + "\n")


@pytest.fixture(scope="module")
def tasks(corpus, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tasks")
    text = corpus.read_text(encoding="utf-8")
    val = text[int(len(text) * 0.9):]  # the validation split (data/shakespeare_char/prepare.py)
    write_task(folder, "shakespeare_order", order_docs(val, DOCS), [
        "output_type: multiple_choice", 'doc_to_text: "{{context}}"',
        'target_delimiter: "\\n"', 'doc_to_choice: "{{choices}}"', "doc_to_target: label",
        "metric_list:", "  - metric: acc"])
    passages = [{"text": p} for p in val.split("\n\n") if len(p) > 200][:6]
    write_task(folder, "shakespeare_ppl", passages, [
        "output_type: loglikelihood_rolling", 'doc_to_text: ""', 'doc_to_target: "{{text}}"',
        "metric_list:", "  - metric: word_perplexity", "  - metric: bits_per_byte"])
    write_task(folder, "accented", [{"context": "Café", "choices": [" au lait", " noir"],
                                     "label": 0}], [
        "output_type: multiple_choice", 'doc_to_text: "{{context}}"',
        'doc_to_choice: "{{choices}}"', "doc_to_target: label"])
    return folder


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
    """out_dir of a small ternary LLaMA (BitNet layout) with its .bitnet file and hf folder."""
    from train import DEFAULTS, resolve, train
    out = tmp_path_factory.mktemp("eval_model")
    cfg = dict(DEFAULTS, arch="llama", out_dir=str(out), data_dir=str(data_dir), device="cpu",
               compile=False, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, ffn_hidden=128,
               block_size=64, batch_size=16, max_iters=STEPS, lr_decay_iters=STEPS,
               warmup_iters=10, eval_interval=STEPS, eval_iters=2, log_interval=STEPS,
               learning_rate=5e-3, subln=True, tie_embeddings=True,
               optimizer="adamw", lr_schedule="cosine")  # the weights the tolerances were set on
    train(resolve(cfg))
    export_main([f"--out_dir={out}"])
    return out


@pytest.fixture(scope="module")
def lm_eval():
    return pytest.importorskip("lm_eval", reason="lm-eval is not installed: pip install -r "
                               "requirements-dev.txt (CI installs it)")


@pytest.fixture(scope="module")
def manager(lm_eval, tasks):
    from lm_eval.tasks import TaskManager
    return TaskManager(include_path=str(tasks), include_defaults=False)


@pytest.fixture(scope="module")
def ckpt_results(lm_eval, manager, trained):
    return run_ours(lm_eval, manager, trained / "ckpt.pt")


@pytest.fixture(scope="module")
def newline(data_dir):
    """The newline's id: a character vocabulary has no end-of-text, so lm-eval's hf model is
    told to start a text after a newline, as BitGPT's does."""
    return json.loads((data_dir / "shakespeare_char" / "meta.json").read_text())["stoi"]["\n"]


def run_ours(lm_eval, manager, path, limit=None):
    from tools.harness import BitGPTLM
    model, meta = load_model(path)
    return lm_eval.simple_evaluate(model=BitGPTLM(model, meta, "cpu", batch_size=64),
                                   tasks=TASKS, task_manager=manager, limit=limit)


def run_hf(lm_eval, manager, folder, newline, limit=None):
    """lm-eval's own hf model (transformers) on an exported folder."""
    pytest.importorskip("transformers", reason="transformers is not installed: pip install -r "
                        "requirements-dev.txt (CI installs it)")
    args = {"pretrained": str(folder), "dtype": "float32", "prefix_token_id": newline}
    return lm_eval.simple_evaluate(model="hf", model_args=args, tasks=TASKS, task_manager=manager,
                                   device="cpu", batch_size=64, limit=limit)


def per_doc(results, task):
    """{doc_id: [each request's first response]} of a run with log_samples."""
    return {s["doc_id"]: [r[0] for r in s["resps"]] for s in results["samples"][task]}


def assert_same_scores(a, b, rel, same_choices=True):
    """Every log-likelihood within rel, and (same_choices) the same choice in each document."""
    order_a, order_b = per_doc(a, "shakespeare_order"), per_doc(b, "shakespeare_order")
    assert order_a.keys() == order_b.keys()
    for doc in order_a:
        la, lb = ([ll for ll, _ in d[doc]] for d in (order_a, order_b))
        assert la == pytest.approx(lb, rel=rel), doc
        assert not same_choices or la.index(max(la)) == lb.index(max(lb)), doc
    acc = [r["results"]["shakespeare_order"]["acc,none"] for r in (a, b)]
    assert not same_choices or acc[0] == acc[1]
    ppl_a, ppl_b = per_doc(a, "shakespeare_ppl"), per_doc(b, "shakespeare_ppl")
    assert ppl_a.keys() == ppl_b.keys()
    for doc in ppl_a:
        assert ppl_a[doc][0] == pytest.approx(ppl_b[doc][0], rel=rel), doc


def test_hf_model_on_the_export_scores_what_bitgpt_scores(lm_eval, manager, trained, newline,
                                                          ckpt_results):
    export_main([f"--out_dir={trained}", "--format=hf"])
    hf = run_hf(lm_eval, manager, trained / "hf", newline)
    assert_same_scores(hf, ckpt_results, rel=1e-3)  # fake quantization against integer sums
    folder = run_ours(lm_eval, manager, trained / "hf")  # BitGPT's integer model from the folder
    assert_same_scores(hf, folder, rel=1e-4)


@pytest.mark.parametrize("arch", ["gpt", "llama"])
def test_hf_model_runs_gpt_and_llama_folders(lm_eval, manager, tiny_cfg, newline, arch):
    """GPT exports as GPTBigCode, a LLaMA without subln as LlamaForCausalLM: lm-eval's hf model
    runs both, its scores BitGPT's on the checkpoint. The models are barely trained, so two
    choices may be a near tie: only the log-likelihoods are compared."""
    from train import train
    train(dict(tiny_cfg, arch=arch, block_size=64))  # the longest line fits
    out = Path(tiny_cfg["out_dir"])
    export_main([f"--out_dir={out}", "--format=hf"])
    hf = run_hf(lm_eval, manager, out / "hf", newline, limit=20)
    ours = run_ours(lm_eval, manager, out / "ckpt.pt", limit=20)
    assert_same_scores(hf, ours, rel=1e-3, same_choices=False)


def test_trained_model_knows_shakespeare_word_order(ckpt_results):
    assert ckpt_results["results"]["shakespeare_order"]["acc,none"] > 0.7  # chance: 0.5


def test_packed_file_scores_what_the_checkpoint_scores(lm_eval, manager, trained, ckpt_results):
    packed = run_ours(lm_eval, manager, trained / "model.bitnet")  # fp16 embeddings and head
    assert_same_scores(ckpt_results, packed, rel=1e-3)


def test_generate_until_is_greedy_generation_cut_at_a_stop(lm_eval, trained):
    from lm_eval.api.instance import Instance

    from tools.harness import BitGPTLM
    model, meta = load_model(trained / "ckpt.pt")
    lm = BitGPTLM(model, meta, "cpu", batch_size=4)
    prompts = ["ROMEO:\n", "KING RICHARD III:\nNow is the", "QUEEN:\n"]
    requests = [Instance("generate_until", {}, (p, {"until": [".", "\n\n"], "max_gen_toks": 24}),
                         i, ("t", i, 1)) for i, p in enumerate(prompts)]
    got = lm.generate_until(requests)  # ROMEO and QUEEN have one length: one batch
    for prompt, text in zip(prompts, got, strict=True):
        ids = torch.tensor([lm.tok.encode(prompt)])
        full = lm.tok.decode(generate(lm.model, ids, 24, temperature=0)[0, ids.size(1):].tolist())
        assert text == full.split(".")[0].split("\n\n")[0]


def test_cli_prints_writes_and_compares(lm_eval, tasks, trained, capsys):
    argv = [f"--ckpt={trained / 'ckpt.pt'}", f"--compare={trained / 'model.bitnet'}",
            "--tasks=shakespeare_order", f"--include_path={tasks}", "--builtin_tasks=False",
            "--limit=10", "--device=cpu"]
    eval_main(argv)
    out = capsys.readouterr().out
    assert "|shakespeare_order|" in out and f"| {trained / 'model.bitnet'} |" in out
    for name in ("ckpt", "model"):
        written = json.loads((trained / f"eval_{name}_shakespeare_order.json").read_text())
        assert written[MARK]["limit"] == 10
        assert "acc,none" in written["results"]["shakespeare_order"]
    eval_main(argv)  # its own files are replaced
    foreign = trained / "eval_ckpt_shakespeare_order.json"
    foreign.write_text("notes\n")
    with pytest.raises(SystemExit) as e:
        eval_main(argv)
    assert "is not a results file of tools.eval" in str(e.value)
    assert foreign.read_text() == "notes\n"
    foreign.unlink()


def one_line_error(argv):
    with pytest.raises(SystemExit) as e:
        eval_main(argv)
    message = str(e.value)
    assert message.startswith("error: ") and "\n" not in message
    return message


def test_errors_are_one_line(lm_eval, tasks, trained):
    base = [f"--ckpt={trained / 'ckpt.pt'}", f"--include_path={tasks}", "--builtin_tasks=False",
            "--device=cpu"]
    message = one_line_error(base + ["--tasks=accented"])
    assert "accented" in message and "'é'" in message
    message = one_line_error(base + ["--tasks=shakespeare_ordr"])
    assert "no task 'shakespeare_ordr'" in message and "shakespeare_order" in message


def test_without_lm_eval_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if not installed
    message = one_line_error([f"--ckpt={tmp_path / 'ckpt.pt'}", "--tasks=arc_easy"])
    assert "pip install lm-eval" in message
