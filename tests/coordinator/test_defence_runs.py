"""Poisoning stories, end to end in one process: 8 pools train the tiny GPT, 2 of them attack.

Each run: 8 pools, 3 rounds of 3 inner steps on a random Markov chain (a 2-layer tiny GPT,
batch 8 × 32), the coordinator defending with panal's default (``DefenceConfig()``:
trimmed mean cutting 25% from each end, tuned detection, quarantine at 2 rejections among
the last 3 updates). A Byzantine pool is an ordinary pool with a ``node.policy`` policy.
The attacks that change the update's direction or size are caught and both attackers are
quarantined after their second update; so is ALIE, by its spread alignment (every coordinate
pushed the same way), and the trigger-token backdoor, by the rows of its trigger tokens, which
its data does not hold. A backdoor whose trigger is made of tokens its data does hold looks
honest to the default and is bounded by the trimmed mean. The opt-in row check (every row,
for pools that share one vocabulary) catches the first backdoor on its own from its second update.
"""

import pytest
import torch

from coordinator.aggregation import AggregationConfig, AggregationError
from coordinator.defence import (
    DefenceConfig,
    SimConfig,
    defence_for,
    defend_stage,
    fit_rule,
    plain_mean_stage,
    record_verdicts,
    simulate,
)
from coordinator.outer import OuterOptimizer
from node.policy import make_policy

SIM = SimConfig(pools=8, rounds=3, inner_steps=3, batch=8, seq_len=32, n_layer=2, timing_repeats=1)
BYZANTINE = (6, 7)
CAUGHT = ("sign_flip", "scale", "gaussian", "zeros", "ipm", "label_flip", "alie", "backdoor")
IN_DATA = {"trigger": (5, 6, 7)}  # tokens of the Markov stream (ids below SIM.symbols): every pool's data holds them


def run(attack: str, defence: DefenceConfig = DefenceConfig(), **params):
    extra = {"vocab_size": 512} if attack in ("label_flip", "backdoor") else {}
    policies = {
        p: make_policy(attack, seed=p, n_pools=SIM.pools, n_byzantine=len(BYZANTINE), **extra, **params)
        for p in BYZANTINE
    }
    return simulate(SIM, defence, policies)


@pytest.fixture(scope="module")
def clean():
    return run("honest")


def test_story_an_honest_only_run_rejects_nothing_and_learns(clean):
    assert clean.fp == 0 and clean.tp == clean.fn == 0
    assert clean.tn == SIM.pools * SIM.rounds
    assert not clean.quarantined and not any(r.rejected for r in clean.rounds)
    assert clean.final_val_loss < clean.initial_val_loss - 1.0  # from ln 512 ≈ 6.2 towards the chain's ≈ 1


@pytest.mark.parametrize("attack", CAUGHT)
def test_story_two_attackers_of_eight_are_rejected_then_quarantined(attack, clean):
    res = run(attack)
    assert res.byzantine == ("pool-6", "pool-7")
    # Rejected in both rounds they sent, quarantined after the second, absent from the third.
    assert res.tp == 4 and res.fn == 0, [r.rejected for r in res.rounds]
    assert dict(res.quarantined) == {"pool-6": 1, "pool-7": 1}
    assert res.rounds[2].pools == tuple(f"pool-{p}" for p in range(6))
    assert res.fp == 0  # no honest pool pays for it
    assert res.final_val_loss <= 1.01 * clean.final_val_loss


def test_story_a_backdoor_is_rejected_for_rows_of_tokens_its_data_does_not_hold():
    res = run("backdoor")
    for reasons in res.rounds[0].rejected.values():
        assert any("layers.0.wte.weight[5" in why and "its assigned data does not contain" in why for why in reasons)
    assert set(res.rounds[0].rejected) == {"pool-6", "pool-7"}


def test_story_a_backdoor_of_tokens_its_data_holds_is_not_caught_by_default_but_bounded(clean):
    res = run("backdoor", **IN_DATA)
    assert res.tp == 0 and res.fp == 0 and not res.quarantined
    assert res.final_val_loss <= 1.01 * clean.final_val_loss


def test_story_the_opt_in_row_check_catches_a_backdoor_by_its_trigger_rows(clean):
    # The absent-token check off, to see the row check alone.
    rows = DefenceConfig().detection.model_copy(update={"max_row_ratio": 10.0, "max_absent_row_ratio": None})
    res = run("backdoor", DefenceConfig(detection=rows))
    first, later = res.rounds[0], res.rounds[1:]
    assert not first.rejected  # one round of training on the trigger is not yet telling
    for r in later:  # from then on both attackers, and only they, are rejected for the trigger's rows
        assert set(r.rejected) == {"pool-6", "pool-7"} - {
            p for p, q in res.quarantined.items() if q < r.round
        }
        for reasons in r.rejected.values():
            assert any("layers.0.wte.weight[5" in why and "do not make" in why for why in reasons), reasons
    assert set(res.quarantined) == {"pool-6", "pool-7"}
    assert res.fp == 0
    assert res.final_val_loss <= 1.01 * clean.final_val_loss


def test_a_second_run_is_bit_identical(clean):
    again = run("honest")
    assert [r.val_loss for r in again.rounds] == [r.val_loss for r in clean.rounds]


# ---------------------------------------------------------------------------------------------
# defend_stage, the coordinator's policy, on hand-made updates


def honest_updates(n=8, d=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    direction = torch.randn(d, generator=g)
    return [{"w": direction + 0.3 * torch.randn(d, generator=g)} for _ in range(n)]


def test_story_a_scaled_update_is_rejected_with_its_reason_and_left_out_of_the_step():
    updates = honest_updates()
    updates[3] = {"w": 100 * updates[3]["w"]}
    ids = [f"pool-{i}" for i in range(8)]
    start = {"w": torch.zeros(512)}
    outer = OuterOptimizer()
    out = defend_stage(start, updates, None, DefenceConfig(), ids, outer=outer)
    rejected = [v for v in out.verdicts if not v.accepted]
    assert [v.id for v in rejected] == ["pool-3"]
    assert any("median update norm" in r for r in rejected[0].reasons)
    # The step is the rule over the seven others, exactly.
    others = [u for i, u in enumerate(updates) if i != 3]
    alone = defend_stage(start, others, None, DefenceConfig(), ids[:3] + ids[4:], outer=outer)
    assert torch.equal(out.weights["w"], alone.weights["w"])
    assert "pool-3" not in out.used


def test_every_update_rejected_is_an_aggregation_error():
    updates = honest_updates(n=4)
    config = DefenceConfig().model_copy(
        update={"detection": DefenceConfig().detection.model_copy(update={"min_cosine": 1.0})}
    )
    with pytest.raises(AggregationError, match="every update was rejected"):
        defend_stage({"w": torch.zeros(512)}, updates, None, config, list("abcd"), outer=OuterOptimizer())


def test_the_rule_shrinks_to_the_updates_left():
    krum = AggregationConfig(rule="multi_krum", f=3, m=7)
    fitted, notes = fit_rule(krum, 6)
    assert (fitted.f, fitted.m) == (1, 5) and len(notes) == 2
    assert fit_rule(krum, 2)[0].rule == "median"
    assert fit_rule(AggregationConfig(rule="trimmed_mean", trim=2), 4)[0].trim == 1.0
    assert fit_rule(AggregationConfig(rule="trimmed_mean", trim=0.25), 8) == (
        AggregationConfig(rule="trimmed_mean", trim=0.25),
        (),
    )
    assert defence_for("krum", 8).aggregation.f == 2 and defence_for("krum", 10).aggregation.f == 3


def test_reputation_quarantines_at_two_rejections_of_three():
    updates = honest_updates()
    updates[0] = {"w": -updates[0]["w"]}
    ids = [f"pool-{i}" for i in range(8)]
    start, outer = {"w": torch.zeros(512)}, OuterOptimizer()
    rep = DefenceConfig().reputation()
    out = defend_stage(start, updates, None, DefenceConfig(), ids, outer=outer)
    rep, due = record_verdicts(rep, 0, out.verdicts)
    assert due == []
    rep, due = record_verdicts(rep, 1, out.verdicts)
    assert due == ["pool-0"]


def test_plain_mean_stage_is_the_undefended_round():
    updates = honest_updates(n=3)
    w = plain_mean_stage({"w": torch.zeros(512)}, updates, None, outer=OuterOptimizer(lr=1.0, momentum=0.0))
    expected = -(updates[0]["w"].double() + updates[1]["w"].double() + updates[2]["w"].double()) / 3
    assert torch.allclose(w["w"].double(), expected, atol=1e-6)
