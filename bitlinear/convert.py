"""From trained weights to a BitGPT run: train.py's --init_from=PATH (a BitGPT checkpoint, a
transformers folder, or OpenAI's GPT-2 by name) and --distill_from (a teacher whose softened
logits join the loss). The run's --bitlinear decides whether the weights train ternary or float;
a float model converts best with a quantization warm-up (--bit_warmup_iters)."""

from pathlib import Path

import torch
import torch.nn.functional as F

from bitlinear.hf import read_config
from common import (
    GPT2_NAMES,
    CheckpointError,
    ConfigError,
    build_model,
    load_checkpoint,
)
from gpt.hf import download_gpt2, load_gpt2
from llama.hf_import import load_hf
from sample import load_model


def load_init_weights(path, arch):
    """(model_args, state dict) of trained weights: a BitGPT checkpoint, a transformers folder
    (GPT-2, or LLaMA and BitNet), or OpenAI's GPT-2 by name (gpt2, ..., gpt2-xl)."""
    return load_init_source(path, arch)[:2]


def load_init_source(path, arch):
    """load_init_weights' (model_args, state dict), and the dataset meta of their tokens (None
    for GPT-2's)."""
    name = str(path)
    if name in GPT2_NAMES and arch != "gpt":
        raise CheckpointError(f"--init_from={name} is a GPT-2 model: use --arch=gpt")
    path = download_gpt2(name) if name in GPT2_NAMES else Path(path)
    if not path.is_dir():
        ckpt = load_checkpoint(path, arch=arch)
        return ckpt["model_args"], ckpt["model"], ckpt.get("meta")
    if not (path / "config.json").is_file():
        raise CheckpointError(f"'{path}' is a folder without config.json: not a transformers "
                              f"model folder")
    kind = read_config(path).get("model_type")
    if kind == "gpt2":
        if arch != "gpt":
            raise CheckpointError(f"'{path}' holds a GPT-2 model (model_type 'gpt2'): use "
                                  f"--arch=gpt")
        return (*load_gpt2(path), None)
    if arch != "llama":
        raise CheckpointError(
            f"'{path}' is a transformers folder, which holds a LLaMA-architecture model: add "
            f"--arch=llama" if kind in ("llama", "bitnet") else
            f"'{path}' holds a {kind!r} model; BitGPT imports model_type 'gpt2' (--arch=gpt), "
            f"'llama' or 'bitnet' (--arch=llama)")
    try:
        return load_hf(path)
    except ImportError as e:
        raise CheckpointError(f"importing '{path}' needs {e.name}: pip install -r "
                              f"requirements-dev.txt") from None


def init_weights(cfg, rank=0):
    """The state dict a fine-tuning run starts from (--init_from); cfg takes the source's model
    shape, at the run's block_size (at most the source's) and with the run's dropout and
    --bitlinear; returned with the dataset meta of its tokens (None when unknown)."""
    source, weights, meta = load_init_source(cfg["init_from"], cfg["arch"])
    source.pop("dropout", None)  # a training choice, not part of the weights
    was_ternary = source.pop("bitlinear", cfg["bitlinear"])
    if was_ternary != cfg["bitlinear"] and rank == 0:
        kind = lambda ternary: "ternary" if ternary else "float"  # noqa: E731
        print(f"note: converting {cfg['init_from']}'s {kind(was_ternary)} weights into a "
              f"{kind(cfg['bitlinear'])} model (--bitlinear={cfg['bitlinear']})")
    positions = source.pop("block_size")  # the run's context, at most the source's
    if "transformer.wpe.weight" in weights:  # learned positions: keep the first block_size
        if cfg["block_size"] > positions:
            raise ConfigError(f"block_size={cfg['block_size']} is longer than "
                              f"{cfg['init_from']}'s {positions} positions: lower it")
        if cfg["block_size"] < positions and rank == 0:
            print(f"note: the first {cfg['block_size']} of {cfg['init_from']}'s {positions} "
                  f"positions (--block_size sets how many)")
        weights["transformer.wpe.weight"] = weights["transformer.wpe.weight"][:cfg["block_size"]]
    cfg.update(source)
    return weights, meta


def distill_loss(logits, teacher_logits, temperature):
    """KL(teacher || student) of the distributions softened by the temperature, per token, times
    T^2 so that its gradients keep their scale as T changes (Hinton et al., 2015)."""
    student = F.log_softmax(logits.float() / temperature, dim=-1).flatten(0, -2)
    teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1).flatten(0, -2)
    return F.kl_div(student, teacher, log_target=True, reduction="batchmean") * temperature ** 2


class Teacher:
    """distill_from's model, frozen: a checkpoint (.pt or .bitnet), a transformers folder or a
    GPT-2 name. It must predict the student's vocabulary over the student's context."""

    def __init__(self, cfg, student_args):
        path = cfg["distill_from"]
        if Path(path).is_file():
            model, _ = load_model(path)
        else:
            gpt2 = path in GPT2_NAMES or (Path(path) / "config.json").is_file() and read_config(
                path).get("model_type") == "gpt2"
            arch = "gpt" if gpt2 else "llama"
            args, state = load_init_weights(path, arch)
            model = build_model(arch, args)
            model.load_state_dict(state)
        config = model.config  # the student's vocabulary may be the teacher's padded (GPT-2)
        if not 0 <= student_args["vocab_size"] - config.vocab_size < 64:
            raise ConfigError(f"the teacher {path} predicts {config.vocab_size} tokens, the "
                              f"student {student_args['vocab_size']}: distill from a model of "
                              f"the same tokenizer and vocabulary")
        if config.block_size < student_args["block_size"]:
            raise ConfigError(f"the teacher {path} reads at most {config.block_size} tokens, the "
                              f"student's block_size is {student_args['block_size']}: lower it")
        model = model.to(cfg["device"]).eval().requires_grad_(False)
        self.model = torch.compile(model) if cfg["compile"] else model
        self.weight, self.temperature = cfg["distill_weight"], cfg["distill_temperature"]

    def loss(self, x, y, logits):
        """The distillation term for the student's logits on the batch (x, y)."""
        with torch.no_grad():
            teacher_logits, _ = self.model(x, y)
        return self.weight * distill_loss(logits[..., :teacher_logits.size(-1)], teacher_logits,
                                          self.temperature)
