"""The planner and `panal plan`: partition, exact counts, memory, search, and its errors."""

from __future__ import annotations

import json

import pytest
import torch
import typer
from hypothesis import given
from hypothesis import strategies as st
from typer.testing import CliRunner

from model.cli import app, plan_command
from model.config import GPTConfig, ModelConfigError
from model.gpt import GPT, build_layers
from model.partition import PartitionError, partition_layers, pipeline_parts
from model.plan import (
    GiB,
    LayoutRequest,
    Memory,
    PlanError,
    count_params,
    evaluate,
    plan,
    resolve_layout,
)
from model.presets import get_preset

torch.set_num_threads(1)

runner = CliRunner()
ONE_T = get_preset("1t")
TINY = get_preset("tiny")


def run(*args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


# --- partition -------------------------------------------------------------------------


@given(st.integers(1, 300).flatmap(lambda n: st.tuples(st.just(n), st.integers(1, n))))
def test_partition_covers_every_block_once_contiguously_and_balanced(ns: tuple[int, int]) -> None:
    n_layer, n_stages = ns
    ranges = partition_layers(n_layer, n_stages)
    assert len(ranges) == n_stages
    assert [i for r in ranges for i in r] == list(range(n_layer))  # each once, in order
    sizes = [len(r) for r in ranges]
    assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1
    if max(sizes) != min(sizes):  # the extra blocks avoid the first and the last stage
        assert sizes[-1] == min(sizes)
        assert sizes[0] == min(sizes) or sizes.count(max(sizes)) == n_stages - 1
    parts = pipeline_parts(n_layer, n_stages)
    assert parts[0] == 0 and parts[-1] == n_layer + 3  # Embedding … FinalNorm, LMHead
    assert all(b - a >= 1 for a, b in zip(parts, parts[1:], strict=False))
    assert [parts[s + 1] - parts[s] for s in range(n_stages)] == [
        size + (s == 0) + 2 * (s == n_stages - 1) for s, size in enumerate(sizes)
    ]


def test_pipeline_parts_index_the_layer_list() -> None:
    layers = build_layers(TINY)
    parts = pipeline_parts(TINY.n_layer, 2)
    assert parts[-1] == len(layers)
    stage0 = [type(x).__name__ for x in layers[parts[0] : parts[1]]]
    stage1 = [type(x).__name__ for x in layers[parts[1] : parts[2]]]
    assert stage0 == ["Embedding", "Block", "Block"]
    assert stage1 == ["Block", "Block", "FinalNorm", "LMHead"]


def test_more_stages_than_blocks_names_the_fix() -> None:
    with pytest.raises(PartitionError, match=r"every stage needs at least one block; use at most 4"):
        partition_layers(4, 5)
    with pytest.raises(ModelConfigError, match=r"--stages ≤ 128"):
        plan(ONE_T, LayoutRequest(stages=256, dp=4))


# --- parameters and FLOPs --------------------------------------------------------------


@pytest.mark.parametrize(
    "config",
    [TINY, TINY.replace(tied_embeddings=True), TINY.replace(mlp="swiglu", bias=False)],
    ids=["untied", "tied", "swiglu-nobias"],
)
def test_count_equals_the_meta_model_and_the_stages_add_up(config: GPTConfig) -> None:
    counts = count_params(config)
    with torch.device("meta"):
        assert counts.total == GPT(config).num_params()
    layout = resolve_layout(config, LayoutRequest(stages=2, dp=1))
    stages = evaluate(config, layout).stages
    replica = counts.embedding if config.tied_embeddings else 0  # the last stage's copy
    assert sum(s.params for s in stages) == counts.total + replica


def test_flops_per_token_follow_6n_plus_attention() -> None:
    p = plan(TINY, LayoutRequest(gpus=1, checkpointing=False))
    c, n = TINY, count_params(TINY)
    N = n.blocks + n.final_norm + c.vocab_size * c.d_model
    expected = 6 * N + 12 * c.n_layer * c.d_model * c.seq_len
    assert p.compute.model_flops_per_token == expected
    assert p.compute.hardware_flops_per_token == expected  # no recompute without checkpointing
    ckpt = plan(TINY, LayoutRequest(gpus=1))
    assert ckpt.compute.hardware_flops_per_token > expected


def test_bubble_is_s_minus_1_over_m_plus_s_minus_1() -> None:
    tokens = 8 * TINY.seq_len  # M = 8 micro-batches of one sequence
    p = plan(TINY, LayoutRequest(stages=4, dp=1, global_batch_tokens=tokens))
    assert p.layout.micro_batches == 8
    assert p.compute.bubble_fraction == pytest.approx(3 / 11)
    assert p.layout.tokens_per_step == tokens


# --- memory ----------------------------------------------------------------------------


def test_memory_components_respond_to_the_layout_as_they_should() -> None:
    config = get_preset("7b")

    def stage0(**kw: object) -> Memory:
        base: dict[str, object] = {"stages": 4, "dp": 8, "zero": 1, "precision": "fp16"}
        return plan(config, LayoutRequest(**{**base, **kw})).stages[0].memory  # type: ignore[arg-type]

    m = stage0()
    params = count_params(config).embedding + 8 * count_params(config).per_block
    assert m.weights == m.gradients == 2 * params
    assert m.optimizer_states == 12 * params // 8  # FP32 master + m + v, sharded over dp 8
    assert stage0(zero=0).optimizer_states == 12 * params
    assert stage0(precision="fp32").weights == 4 * params
    assert stage0(precision="fp32").fp32_grad_copy == 0
    assert stage0(checkpointing=False).activations > 5 * m.activations
    assert m.total < stage0(zero=0).total
    # the largest new gradient: the V × C embedding on stage 0, a C × 4C matrix inside
    counts = count_params(config)
    assert m.weight_grad_temporary == 2 * config.vocab_size * config.d_model
    middle = plan(config, LayoutRequest(stages=4, dp=8)).stages[1].memory
    assert middle.weight_grad_temporary == 2 * counts.largest_in_block == 2 * 4 * 4096**2


def test_the_first_stage_holds_as_many_micro_batches_in_flight_as_there_are_stages() -> None:
    p = plan(ONE_T, LayoutRequest(stages=128, dp=8))
    assert [s.in_flight for s in p.stages[:3]] == [128, 127, 126]
    assert p.stages[-1].in_flight == 1


# --- the 1T model on 1024 GPUs ---------------------------------------------------------


def test_1t_on_1024_a100s_finds_128_stages_by_8_data_parallel_that_fit() -> None:
    code, out, _ = run("--preset", "1t", "--gpus", "1024", "--json")
    assert code == 0
    doc = json.loads(out)
    assert doc["fits"] is True and isinstance(doc["reason"], str)
    assert doc["params"] == 1_009_288_038_400
    assert isinstance(doc["per_gpu_bytes"], int) and doc["per_gpu_bytes"] <= 80 * GiB
    lay = doc["layout"]
    assert (lay["gpus"], lay["stages"], lay["dp"], lay["zero"]) == (1024, 128, 8, 1)
    assert (lay["precision"], lay["checkpointing"], lay["gpu_type"]) == ("fp16", True, "A100-80GB")
    # Stage 0 keeps 128 micro-batches in flight: their checkpoints go to host memory.
    assert lay["cpu_checkpointing"] is True
    assert doc["memory"]["host_checkpoints"] == 128 * 2048 * 25600 * 2
    components = {"weights", "gradients", "optimizer_states", "activations"}
    assert set(doc["memory"]) >= components | {"weight_grad_temporary", "host_checkpoints"}
    assert len(doc["stages"]) == 128


def test_1t_on_1024_a100s_without_cpu_checkpointing_misses_by_the_activations() -> None:
    p = plan(ONE_T, LayoutRequest(gpus=1024, cpu_checkpointing=False))
    assert not p.fits and p.layout.stages == 128
    assert 80 * GiB < p.per_gpu_bytes < 85 * GiB
    assert "largest part is activations" in p.reason and "use --cpu-checkpointing" in p.reason
    assert plan(ONE_T, LayoutRequest(gpus=1024, gpu_type="h200", cpu_checkpointing=False)).fits


def test_the_search_takes_the_fewest_stages_that_fit() -> None:
    chosen = plan(ONE_T, LayoutRequest(gpus=1024))
    assert chosen.layout.stages == 128
    fewer = plan(ONE_T, LayoutRequest(gpus=1024, stages=64))
    assert not fewer.fits  # so 128 is indeed the fewest
    more_memory = plan(ONE_T, LayoutRequest(gpus=512, gpu_type="h200"))
    assert more_memory.fits and more_memory.layout.stages == 64  # 141 GB: two blocks per GPU
    assert not more_memory.layout.cpu_checkpointing  # not needed, so not used


def test_1t_on_8_gpus_is_rejected_with_the_reason_and_the_fix() -> None:
    p = plan(ONE_T, LayoutRequest(gpus=8, stages=8))
    assert not p.fits
    assert "does not fit" in p.reason and "optimizer states" in p.reason
    assert "fits on 1024 A100-80GB (128 stages × 8 data-parallel" in p.reason
    code, out, err = run("--preset", "1t", "--gpus", "8", "--stages", "8")
    assert code == 1
    assert "DOES NOT FIT" in out and "optimizer states" in out


def test_no_layout_of_too_few_gpus_fits_and_the_search_says_so() -> None:
    p = plan(ONE_T, LayoutRequest(gpus=64))
    assert not p.fits
    assert p.reason.startswith("no layout of 64 A100-80GB fits")


def test_without_a_gpu_count_the_smallest_power_of_two_that_fits_is_found() -> None:
    seed = plan(get_preset("seed-article"), LayoutRequest(), name="seed-article")
    assert seed.fits and seed.layout.gpus == 32
    assert not plan(get_preset("seed-article"), LayoutRequest(gpus=16)).fits
    assert plan(TINY, LayoutRequest()).layout.gpus == 1


# --- bad input -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (LayoutRequest(gpus=8, stages=4, dp=4), r"--stages 4 × --dp 4 = 16; give --gpus 16"),
        (LayoutRequest(gpus=10, stages=4), r"not a multiple of --stages 4"),
        (LayoutRequest(stages=4, dp=2, zero=2), r"ZeRO-2/3 are incompatible with pipeline"),
        (LayoutRequest(gpus=8, seq_len=4096), r"longer than the model's context seq_len 2048"),
        (LayoutRequest(gpus=8, gpu_type="V100"), r"unknown GPU type 'V100'; known types"),
        (LayoutRequest(gpus=8, precision="int8"), r"precision 'int8' is not one of"),
        (LayoutRequest(gpus=8, micro_batch=0), r"micro_batch must be a positive"),
        (
            LayoutRequest(stages=2, dp=2, global_batch_tokens=5000),
            r"not a multiple of dp 2 × micro-batch 1 × seq-len 2048 = 4096; use 4096 or 8192",
        ),
    ],
)
def test_bad_layouts_name_the_fix(request_: LayoutRequest, message: str) -> None:
    with pytest.raises(PlanError if "context" not in message else ModelConfigError, match=message):
        plan(get_preset("7b"), request_)


def test_zero_2_is_fine_without_a_pipeline() -> None:
    zero2 = plan(get_preset("1.3b"), LayoutRequest(gpus=8, zero=2))
    zero1 = plan(get_preset("1.3b"), LayoutRequest(gpus=8, zero=1))
    assert zero2.fits and zero2.layout.stages == 1
    assert zero2.stages[0].memory.gradients == -(-zero1.stages[0].memory.gradients // 8)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--preset", "2t"], "unknown preset '2t'; valid presets are: tiny"),
        (["--preset", "1t", "--stages", "200"], "use at most 128 stages"),
        (["--preset", "1t", "--gpus", "8", "--stages", "4", "--dp", "4"], "give --gpus 16"),
        (["--preset", "tiny", "--seq-len", "128"], "cut sequences to at most 64 tokens"),
        (["--preset", "tiny", "--fp16", "--bf16"], "give one of --fp16/--bf16/--fp32"),
        (["--preset", "tiny", "--no-checkpointing", "--cpu-checkpointing"], "needs --checkpointing"),
        ([], "give --preset NAME"),
    ],
)
def test_cli_bad_input_exits_2_with_the_fix(args: list[str], message: str) -> None:
    code, out, err = run(*args)
    assert code == 2
    assert message in " ".join(err.split())  # rich may wrap long lines
    assert out == ""


def test_cli_table_is_readable() -> None:
    code, out, _ = run("--preset", "seed-article", "--bf16")
    assert code == 0
    for text in ("81,377,280,000", "16 pipeline stages × 2 data-parallel", "bf16", "FITS"):
        assert text in out


def test_the_command_mounts_as_panal_plan() -> None:
    """How the lead registers it: app.command("plan")(plan_command) on the root Typer."""
    root = typer.Typer()

    @root.callback()
    def _root() -> None: ...

    root.command("plan")(plan_command)
    result = runner.invoke(root, ["plan", "--preset", "tiny", "--gpus", "2", "--json"])
    assert result.exit_code == 0
    assert json.loads(result.stdout)["layout"]["dp"] == 2
