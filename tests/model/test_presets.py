"""Presets and config files: every preset is valid and counts what its name says."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from model.config import GPTConfig, ModelConfigError, default_d_ff
from model.gpt import GPT
from model.plan import count_params
from model.presets import PRESETS, config_from_mapping, get_preset, load_config, resolve_config

torch.set_num_threads(1)

NOMINAL = {"125m": 125e6, "1.3b": 1.3e9, "7b": 7e9, "70b": 70e9, "1t": 1e12}


@pytest.mark.parametrize("name", PRESETS)
def test_planner_count_equals_the_model_built_on_the_meta_device(name: str) -> None:
    config = get_preset(name)
    with torch.device("meta"):
        model = GPT(config)
    assert count_params(config).total == model.num_params()


@pytest.mark.parametrize("name", NOMINAL)
def test_each_preset_has_about_the_parameters_its_name_says(name: str) -> None:
    assert count_params(get_preset(name)).total == pytest.approx(NOMINAL[name], rel=0.05)


def test_1t_is_a_trillion_and_the_seed_article_is_80b_not_1t() -> None:
    assert count_params(get_preset("1t")).total == 1_009_288_038_400
    seed = get_preset("seed-article")
    assert (seed.n_layer, seed.d_model, seed.n_head, seed.vocab_size) == (100, 8192, 128, 50_000)
    assert 75e9 < count_params(seed).total < 85e9


def test_defaults_are_a_50k_vocabulary_and_a_2048_context() -> None:
    for name, config in PRESETS.items():
        if name != "tiny":
            assert (config.vocab_size, config.seq_len) == (50_000, 2048), name


def test_tiny_is_small_enough_for_cpu_tests() -> None:
    assert count_params(get_preset("tiny")).total < 500_000


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_survives_a_json_round_trip(name: str) -> None:
    config = get_preset(name)
    again = GPTConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config


def test_an_unknown_preset_lists_the_valid_ones() -> None:
    with pytest.raises(ModelConfigError, match=r"unknown preset '2t'.*tiny, 125m, .*1t"):
        get_preset("2t")


def test_a_yaml_file_may_name_a_preset_and_override_fields(tmp_path: Path) -> None:
    f = tmp_path / "model.yaml"
    f.write_text("model:\n  preset: tiny\n  n_layer: 6\n  mlp: swiglu\n")
    config = load_config(f)
    assert config.n_layer == 6 and config.d_model == get_preset("tiny").d_model
    assert config.d_ff == default_d_ff(config.d_model, "swiglu")  # re-derived for swiglu


def test_a_json_file_with_all_fields_loads(tmp_path: Path) -> None:
    f = tmp_path / "model.json"
    f.write_text(json.dumps(get_preset("125m").to_dict()))
    assert load_config(f) == get_preset("125m")


def test_a_misspelt_field_is_an_error_that_lists_the_fields(tmp_path: Path) -> None:
    f = tmp_path / "model.yaml"
    f.write_text("n_layers: 12\n")
    with pytest.raises(ModelConfigError, match=r"unknown model config field\(s\) \['n_layers'\]"):
        load_config(f)


def test_bad_files_are_refused_with_the_reason(tmp_path: Path) -> None:
    with pytest.raises(ModelConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("n_layer: [1,\n")
    with pytest.raises(ModelConfigError, match="not valid YAML"):
        load_config(broken)
    huge = tmp_path / "huge.yaml"
    huge.write_text("#" * (2 << 20))
    with pytest.raises(ModelConfigError, match="over the 1048576-byte limit"):
        load_config(huge)
    with pytest.raises(ModelConfigError, match="must be a mapping"):
        config_from_mapping([1, 2])


def test_one_source_of_config_preset_or_file() -> None:
    assert resolve_config("TINY", None) == ("tiny", get_preset("tiny"))
    with pytest.raises(ModelConfigError, match="not both"):
        resolve_config("tiny", "model.yaml")
    with pytest.raises(ModelConfigError, match="give --preset NAME"):
        resolve_config(None, None)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (
            {"d_model": 1000, "n_head": 16},
            r"d_model 1000 is not divisible by n_head 16; choose n_head dividing d_model, "
            r"e.g. 10 or 20",
        ),
        ({"n_layer": 0}, "n_layer must be positive"),
        ({"n_layer": 2.5}, "n_layer must be a whole number"),
        ({"vocab_size": True}, "vocab_size must be a whole number"),
        ({"mlp": "relu"}, r"mlp 'relu' is not one of \['gelu', 'swiglu'\]"),
        ({"dropout": 1.0}, r"dropout 1.0 is outside \[0, 1\)"),
        ({"tied_embeddings": "yes"}, "tied_embeddings must be true or false"),
        ({"d_ff": -4}, "d_ff must be positive"),
    ],
)
def test_bad_fields_name_the_field_and_the_fix(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ModelConfigError, match=message):
        GPTConfig.from_dict(fields)


def test_a_tokenizer_bigger_than_the_model_vocabulary_is_refused() -> None:
    config = get_preset("tiny")
    config.check_tokenizer(512)
    with pytest.raises(ModelConfigError, match=r"tokenizer has 50257 tokens .* vocab_size is 512"):
        config.check_tokenizer(50257)


def test_d_ff_defaults() -> None:
    assert GPTConfig(d_model=768).d_ff == 3072
    swiglu = GPTConfig(d_model=4096, n_head=32, mlp="swiglu")
    assert swiglu.d_ff == 11008  # LLaMA-7B's width
    assert GPTConfig(d_model=768).replace(d_model=1024, n_head=16).d_ff == 4096
