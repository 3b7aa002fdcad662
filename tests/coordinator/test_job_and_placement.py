"""Job specs (errors name the field and the fix) and placement (deterministic, explained)."""

import pytest

from coordinator.job import JobSpecError, parse_job
from coordinator.placement import NodeOffer, place, stage_memory
from model.presets import get_preset

CID = "QmZULkCELmmk5XNfCgTnCyFgAVxBRBXyDHGGMVoLFLiXEN"
GiB = 1 << 30


def spec(**over):
    base = {"name": "j", "dataset": CID, "pools": ["a", "b"], "stages": 2}
    base.update(over)
    import json

    return json.dumps(base)


def test_a_good_spec_parses_with_defaults():
    job = parse_job(spec())
    assert job.rounds == 5 and job.outer.lr == 0.7 and job.aggregation.rule == "trimmed_mean"
    assert job.detection.min_cosine > 0 and job.quarantine_threshold == 2
    assert job.gpt_config().n_layer == 4


@pytest.mark.parametrize(
    ("over", "field", "fix"),
    [
        ({"stages": 9}, "spec", "use at most 4"),
        ({"min_pools": 3}, "spec", "lower min_pools"),
        ({"dataset": "not-a-cid"}, "dataset", "panal corpus prepare"),
        ({"pools": ["a", "a"]}, "pools", "unique"),
        ({"compression": "zip"}, "compression", "'none', 'fp16' or 'int8'"),
        ({"lr": -1}, "lr", "greater than 0"),
        ({"model": {"preset": "huge"}}, "spec", "tiny"),
        ({"unknown_field": 1}, "unknown_field", "unknown field; remove it"),
    ],
)
def test_bad_specs_name_the_field_and_the_fix(over, field, fix):
    with pytest.raises(JobSpecError) as info:
        parse_job(spec(**over))
    text = str(info.value)
    assert f"  {field}" in text and fix in text, text


def test_missing_fields_and_bad_yaml():
    with pytest.raises(JobSpecError, match="pools: required; add it"):
        parse_job(f'{{"name": "j", "dataset": "{CID}"}}')
    with pytest.raises(JobSpecError, match="not valid YAML"):
        parse_job("name: [unclosed")


def test_placement_is_by_memory_deterministic_and_explained():
    config = get_preset("tiny")
    needs = stage_memory(config, stages=2, micro_batch=4, grad_accum=2, precision="fp32")
    offers = [NodeOffer("n3", "a", 16 * GiB), NodeOffer("n1", "a", 32 * GiB), NodeOffer("n2", "a", 8 * GiB),
              NodeOffer("m1", "b", 16 * GiB), NodeOffer("m2", "b", 16 * GiB)]
    shards = [f"s{i}" for i in range(5)]
    p1 = place(config=config, pools=["a", "b"], stages=2, needs=needs, offers=offers, train_shards=shards)
    p2 = place(config=config, pools=["a", "b"], stages=2, needs=list(needs), offers=list(reversed(offers)), train_shards=shards)
    assert p1.slots == p2.slots
    hungriest = max(range(2), key=lambda s: (needs[s], -s))
    assert next(s for s in p1.slots if s.pool == "a" and s.stage == hungriest).node_id == "n1"
    assert p1.standby["a"] == ["n2"]
    assert p1.shards == {"a": ["s0", "s2", "s4"], "b": ["s1", "s3"]}
    assert all("GiB" in s.reason for s in p1.slots)


def test_pools_without_enough_nodes_or_memory_are_explained():
    config = get_preset("tiny")
    needs = stage_memory(config, stages=2, micro_batch=4, grad_accum=2, precision="fp32")
    offers = [NodeOffer("n1", "a", 64 * GiB), NodeOffer("m1", "b", 64 * GiB), NodeOffer("m2", "b", 1 << 20)]
    p = place(config=config, pools=["a", "b"], stages=2, needs=needs, offers=offers, train_shards=["s"])
    assert p.unplaced["a"] == "1 of the 2 nodes it needs have enrolled"
    assert "add a larger node" in p.unplaced["b"]
    assert p.slots == []
