"""A pipeline stage's weights without DeepSpeed: names, initial values, and the way back to a GPT.

The names are DeepSpeed's ``PipelineModule`` parameter names — ``"{layer index}.{param}"``
for ordinary layers, ``"tied_modules.embed.{param}"`` for a tied embedding — so a
coordinator can make a stage's initial weights, and put pseudo-gradients back
together, exactly as the engine on a node sees them (tests/model/test_engine.py
checks both against a real engine).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from model.config import GPTConfig
from model.gpt import GPT, Block, Embedding, FinalNorm, LMHead
from model.partition import pipeline_parts

TIED_PREFIX = "tied_modules.embed."


def stage_modules(config: GPTConfig, stages: int, stage: int, *, seed: int = 0) -> dict[str, nn.Module]:
    """The stage's modules by name prefix, built with the same classes and seeds as the engine."""
    parts = pipeline_parts(config.n_layer, stages)
    EMBED, HEAD = 0, config.n_layer + 2  # positions in the layer list
    modules: dict[str, nn.Module] = {}
    for idx in range(parts[stage], parts[stage + 1]):
        if config.tied_embeddings and idx in (EMBED, HEAD):
            modules.setdefault(TIED_PREFIX, Embedding(config, seed=seed))
        elif idx == EMBED:
            modules[f"{idx}."] = Embedding(config, seed=seed)
        elif idx <= config.n_layer:
            modules[f"{idx}."] = Block(config, idx - 1, seed=seed)
        elif idx == config.n_layer + 1:
            modules[f"{idx}."] = FinalNorm(config)
        else:
            modules[f"{idx}."] = LMHead(config, seed=seed)
    return modules


def initial_stage_weights(
    config: GPTConfig, stages: int, stage: int, *, seed: int = 0
) -> dict[str, torch.Tensor]:
    """The stage's weights at initialisation, FP32, keyed by the engine's parameter names."""
    out: dict[str, torch.Tensor] = {}
    for prefix, module in stage_modules(config, stages, stage, seed=seed).items():
        for name, p in module.named_parameters():
            out[prefix + name] = p.detach().float().clone()
    return out


def gpt_state_dict(
    config: GPTConfig, stage_weights: list[dict[str, torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """Every stage's weights as one :class:`GPT` state dict (``layers.{idx}.{param}``)."""
    state: dict[str, torch.Tensor] = {}
    for weights in stage_weights:
        for name, tensor in weights.items():
            if name.startswith(TIED_PREFIX):
                state["layers.0." + name.removeprefix(TIED_PREFIX)] = tensor
            else:
                state["layers." + name] = tensor
    return state


def assemble_gpt(config: GPTConfig, stage_weights: list[dict[str, torch.Tensor]]) -> GPT:
    """A single-process GPT holding the given stage weights (for evaluation)."""
    model = GPT(config)
    model.load_state_dict(gpt_state_dict(config, stage_weights), strict=True)
    return model


def token_row_names(names: Iterable[str]) -> list[str]:
    """The tensors whose row t belongs to token id t: the token embedding and the output head."""
    return sorted(n for n in names if n.split(".")[-2:] in (["wte", "weight"], ["lm_head", "weight"]))
