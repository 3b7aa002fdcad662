"""Named model shapes, from a CPU-test toy to 1T, and loading a config from a file.

Every preset uses the 50k BPE vocabulary and a 2048-token context unless it says
otherwise. `seed-article` reproduces the figures of the article that seeded this
project (100 layers, d_model 8192, 128 heads, 50k vocabulary): the planner shows that
this is about 81 B parameters, not the 1 T the article claimed; `1t` is a shape that
really has 1.0 × 10¹² parameters.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from model.config import GPTConfig, ModelConfigError

PRESETS: dict[str, GPTConfig] = {
    # For tests: builds and trains in milliseconds on a CPU (≈ 270 k parameters).
    "tiny": GPTConfig(vocab_size=512, seq_len=64, n_layer=4, n_head=4, d_model=64),
    # GPT-2 small / GPT-3 Small widths; tied embeddings like GPT-2.
    "125m": GPTConfig(n_layer=12, n_head=12, d_model=768, tied_embeddings=True),
    # GPT-3 XL widths.
    "1.3b": GPTConfig(n_layer=24, n_head=16, d_model=2048, tied_embeddings=True),
    # LLaMA-7B depth and width, with a GELU MLP.
    "7b": GPTConfig(n_layer=32, n_head=32, d_model=4096),
    # Chinchilla's width (8192, 64 heads of 128), 88 layers: 71.7 B.
    "70b": GPTConfig(n_layer=88, n_head=64, d_model=8192),
    # 128 layers of 7.86 B parameters each: 1.009 × 10¹².
    "1t": GPTConfig(n_layer=128, n_head=160, d_model=25600),
    # The seed article's figures: 81.4 B parameters.
    "seed-article": GPTConfig(n_layer=100, n_head=128, d_model=8192),
}

# A config file is parsed only up to this size: it comes from outside.
MAX_CONFIG_FILE_BYTES = 1 << 20


def get_preset(name: str) -> GPTConfig:
    """The preset called `name`; an unknown name lists the valid ones."""
    try:
        return PRESETS[name.lower()]
    except KeyError:
        raise ModelConfigError(f"unknown preset {name!r}; valid presets are: {', '.join(PRESETS)}") from None


def config_from_mapping(data: Any) -> GPTConfig:
    """A config from parsed YAML/JSON.

    Accepted forms: the fields of GPTConfig; ``{"preset": NAME, ...fields to override}``;
    either of those under a top-level ``model:`` key (as in a job spec).
    """
    if isinstance(data, dict) and set(data) == {"model"}:
        data = data["model"]
    if not isinstance(data, dict):
        raise ModelConfigError(
            f"a model config must be a mapping of fields (or preset: NAME), got {type(data).__name__}"
        )
    data = dict(data)
    preset = data.pop("preset", None)
    if preset is None:
        return GPTConfig.from_dict(data)
    if not isinstance(preset, str):
        raise ModelConfigError(f"preset must be a name, got {preset!r}")
    return get_preset(preset).replace(**data) if data else get_preset(preset)


def load_config(path: str | Path) -> GPTConfig:
    """Read a model config from a YAML or JSON file (see :func:`config_from_mapping`)."""
    p = Path(path)
    try:
        size = p.stat().st_size
    except OSError as e:
        raise ModelConfigError(f"cannot read model config {p}: {e.strerror}") from None
    if size > MAX_CONFIG_FILE_BYTES:
        raise ModelConfigError(
            f"model config {p} is {size} bytes, over the {MAX_CONFIG_FILE_BYTES}-byte limit; "
            f"a model config is a few lines"
        )
    text = p.read_text(encoding="utf-8")
    try:
        data = json.loads(text) if p.suffix.lower() == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise ModelConfigError(f"model config {p} is not valid YAML/JSON: {e}") from None
    try:
        return config_from_mapping(data)
    except (ModelConfigError, TypeError) as e:
        raise ModelConfigError(f"{p}: {e}") from None


def resolve_config(preset: str | None, config_path: str | Path | None) -> tuple[str, GPTConfig]:
    """(name, config) from exactly one of a preset name or a config file."""
    if preset is not None and config_path is not None:
        raise ModelConfigError(
            "give either --preset or --config, not both (a config file may itself say "
            "`preset: NAME` and override fields)"
        )
    if preset is not None:
        return preset.lower(), get_preset(preset)
    if config_path is not None:
        return str(config_path), load_config(config_path)
    raise ModelConfigError(f"give --preset NAME ({', '.join(PRESETS)}) or --config FILE")
