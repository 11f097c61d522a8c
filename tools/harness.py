"""BitGPT's models as an lm-evaluation-harness LM (lm_eval.api.model.LM, by way of its
TemplateLM, which splits context and continuation into tokens as lm-eval's `hf` model does).
tools/eval.py runs lm-eval's evaluator with it; this module needs lm-eval (pip install lm-eval).

The model is BitGPT's own forward on whatever sample.load_model loads: a training checkpoint
(the training model), a packed .bitnet file (the exact integer path) or a transformers folder.
Text becomes tokens as the model's dataset meta says (data.tokenizer). Each kind of request is
handled as lm-eval's `hf` model handles it, so on the same exported model the scores are equal:
  - loglikelihood: context + continuation cut to their last block_size + 1 tokens, the last one
    dropped (left truncation); the continuation's log-probabilities summed, and whether each of
    its tokens is the argmax; batched, longest first, right-padded (a causal model's earlier
    positions never see the padding);
  - loglikelihood_rolling: lm-eval's rolling windows of block_size tokens, the first one after
    the prefix token (end-of-text, else a newline for a vocabulary without one);
  - generate_until: greedy, the context cut to its last block_size - max_gen_toks tokens, until
    a stop string, the end-of-text token or max_gen_toks tokens; requests of the same length and
    settings run as one batch.
"""

from collections import defaultdict
from contextlib import nullcontext

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from common import ConfigError
from data.tokenizer import Tokenizer
from sample import generate_steps


def request_texts(requests):
    """The strings of lm-eval requests (generate_until's settings dict left out)."""
    return [a for r in requests for a in r.args if isinstance(a, str)]


class BitGPTLM(TemplateLM):
    """lm-eval's LM on a BitGPT model (sample.load_model's model and meta)."""

    def __init__(self, model, meta, device="cpu", batch_size=16, max_gen_toks=256,
                 autocast=nullcontext):
        super().__init__()
        self.model, self.tok = model.eval().to(device), Tokenizer(meta)
        self._device, self.batch_size, self.max_gen_toks = device, batch_size, max_gen_toks
        self.block_size, self.autocast = model.config.block_size, autocast
        newline = ([] if self.tok.kind == "char" and "\n" not in self.tok.stoi
                   else self.tok.encode("\n"))
        # a vocabulary without end-of-text starts a text after a newline, its usual boundary
        self._prefix = self.tok.eot_id if self.tok.eot_id is not None else (
            newline[0] if len(newline) == 1 else None)

    @property
    def eot_token_id(self):
        return self.tok.eot_id

    @property
    def prefix_token_id(self):
        if self._prefix is None:
            raise ConfigError("this model's vocabulary has neither an end-of-text token nor a "
                              "newline token to start a text with, which this task needs")
        return self._prefix

    @property
    def device(self):
        return self._device

    def tok_encode(self, string, add_special_tokens=None, **kwargs):
        return self.tok.encode(string)

    def check_vocabulary(self, requests):
        """One line naming the characters of the tasks' text that a character vocabulary lacks
        (and the tasks), before any work."""
        if self.tok.kind != "char":
            return
        unknown = set("".join(request_texts(requests))) - set(self.tok.stoi)
        if unknown:
            tasks = sorted({str(r.task_name) for r in requests})
            raise ConfigError(f"task {', '.join(tasks)} has characters this model's vocabulary "
                              f"cannot encode: {''.join(sorted(unknown))!r}; evaluate a model "
                              f"with a tokenizer that holds them (GPT-2 BPE: data/shakespeare)")

    # ---- log-likelihoods ------------------------------------------------------------------

    def loglikelihood(self, requests, disable_tqdm=False):
        self.check_vocabulary(requests)
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm)

    def _loglikelihood_tokens(self, requests, disable_tqdm=False, **kwargs):
        """[(log-probability of the continuation, is it greedy)] of [(key, context ids,
        continuation ids)], in batches of similar length."""
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1] + requests[i][2]))
        out = [None] * len(requests)
        bar = tqdm(total=len(order), disable=disable_tqdm, desc="loglikelihood", leave=False)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            for i, result in zip(chunk, self.score([requests[i] for i in chunk]), strict=True):
                out[i] = result
            bar.update(len(chunk))
        bar.close()
        return out

    def score(self, batch):
        rows, conts = [], []
        for _, context, cont in batch:
            if len(cont) > self.block_size:
                raise ConfigError(f"a continuation of {len(cont)} tokens is longer than the "
                                  f"model's context ({self.block_size} tokens)")
            rows.append((context + cont)[-(self.block_size + 1):][:-1])
            conts.append(cont)
        x = torch.zeros(len(rows), max(map(len, rows)), dtype=torch.long)
        for i, row in enumerate(rows):
            x[i, :len(row)] = torch.tensor(row)
        x = x.to(self.device)
        with torch.no_grad(), self.autocast():
            logits = self.model(x, targets=x)[0]  # with targets: every position's logits
        logp = logits.float().log_softmax(-1).cpu()
        results = []
        for i, (row, cont) in enumerate(zip(rows, conts, strict=True)):
            lp, target = logp[i, len(row) - len(cont):len(row)], torch.tensor(cont)
            results.append((lp.gather(1, target[:, None]).sum().item(),
                            bool((lp.argmax(-1) == target).all())))
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm=False):
        """Each text's whole log-likelihood: the sum over its rolling windows."""
        self.check_vocabulary(requests)
        windows, owners = [], []
        for i, (text,) in enumerate(r.args for r in requests):
            pairs = get_rolling_token_windows(token_list=self.tok_encode(text),
                                              prefix_token=self.prefix_token_id,
                                              max_seq_len=self.block_size, context_len=1)
            for context, cont in map(make_disjoint_window, pairs):
                windows.append((None, context, cont))
                owners.append(i)
        totals = [0.0] * len(requests)
        scores = self._loglikelihood_tokens(windows, disable_tqdm)
        for i, (logprob, _) in zip(owners, scores, strict=True):
            totals[i] += logprob
        return totals

    # ---- generation -----------------------------------------------------------------------

    def settings(self, gen_kwargs, task):
        """(stop strings, max new tokens) of a request; sampling is refused, not ignored."""
        if gen_kwargs.get("do_sample"):
            raise ConfigError(f"task {task} asks for sampling (do_sample); this model generates "
                              f"greedily only")
        until = gen_kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        if self.tok.eot is not None and self.tok.eot not in until:
            until.append(self.tok.eot)
        return until, int(gen_kwargs.get("max_gen_toks", self.max_gen_toks))

    def generate_until(self, requests, disable_tqdm=False):
        self.check_vocabulary(requests)
        groups = defaultdict(list)  # requests that can share a batch: same length and settings
        for i, r in enumerate(requests):
            until, new = self.settings(r.args[1], r.task_name)
            # room for the new tokens, as lm-eval's hf model leaves; a request for more than
            # the context keeps a whole context, and the window slides as in sample.generate
            keep = self.block_size - new if new < self.block_size else self.block_size
            ids = self.tok_encode(r.args[0])[-keep:]
            groups[len(ids), tuple(until), new].append((i, ids))
        out = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="generate_until", leave=False)
        for (_, until, new), items in groups.items():
            for start in range(0, len(items), self.batch_size):
                chunk = items[start:start + self.batch_size]
                x = torch.tensor([ids for _, ids in chunk], device=self.device)
                for (i, _), text in zip(chunk, self.greedy(x, until, new), strict=True):
                    out[i] = text
                bar.update(len(chunk))
        bar.close()
        return out

    def greedy(self, x, until, max_new):
        """The greedy continuations of the rows of x (sample.generate's tokens), each cut at its
        first stop string; they end once every row holds a stop string."""
        n, texts = x.size(1), [""] * x.size(0)
        with torch.no_grad(), self.autocast():
            for ids in generate_steps(self.model, x, max_new, temperature=0):
                texts = [self.tok.decode(row) for row in ids[:, n:].tolist()]
                if all(any(s in t for s in until) for t in texts):
                    break
        for s in until:
            texts = [t.split(s)[0] for t in texts]
        return texts
