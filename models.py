"""The architectures train.py and sample.py can build, by name."""

import dataclasses

from gpt.model import GPT, GPTConfig

ARCHS = {"gpt": (GPT, GPTConfig)}


def model_args(arch, config):
    """The model's constructor arguments, taken from a full training config."""
    _, config_cls = ARCHS[arch]
    return {f.name: config[f.name] for f in dataclasses.fields(config_cls) if f.name in config}


def build_model(arch, args):
    if arch not in ARCHS:
        raise ValueError(f"unknown arch '{arch}'; choose one of {sorted(ARCHS)}")
    model_cls, config_cls = ARCHS[arch]
    return model_cls(config_cls(**args))
