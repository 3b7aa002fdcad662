"""Poisoning defence: attack stories against an honest cluster, thresholds, and reputation over rounds.

Noise model of the honest pools (used throughout): d = 4096 parameters, a shared
descent direction g with ‖g‖ ≈ 1, and pool i sends u_i = s_i·g + ε_i with a
per-pool step scale s_i ~ U(0.7, 1.3) (different data, different progress) and
noise ε_i ~ N(0, σ²/d · I), σ = 1 — noise as large as the signal, harsher than
DiLoCo pseudo-gradients after H inner steps, whose pools agree more.
"""

import json
import math
import statistics

import pytest
import torch

from coordinator.aggregation import AggregationConfig, aggregate
from coordinator.defence import TUNED_DETECTION
from coordinator.detection import (
    DetectionPolicy,
    Reputation,
    RowBlock,
    UpdateScore,
    absent_tokens,
    judge,
    row_blocks,
    score_updates,
)

D = 4096


def honest_pools(n=8, seed=0, sigma=1.0):
    g = torch.Generator().manual_seed(seed)
    direction = torch.randn(D, generator=g) / math.sqrt(D)
    return [
        (0.7 + 0.6 * torch.rand((), generator=g)) * direction
        + sigma * torch.randn(D, generator=g) / math.sqrt(D)
        for _ in range(n)
    ]


def verdicts_for(updates, policy=DetectionPolicy(), rule="centered_clipping"):
    agg = aggregate(updates, AggregationConfig(rule=rule)).vector
    return judge(score_updates(updates, agg), policy)


ATTACKS = {
    # name: (how the Byzantine pool builds its update from an honest one, the reason it must get)
    "sign flip": (lambda u, g: -u, "cosine similarity"),
    "scaled ×100": (lambda u, g: 100 * u, "above the limit 3.0×"),
    "gaussian noise": (lambda u, g: 10 * torch.randn(D, generator=g) / math.sqrt(D), "distance"),
    "zeros (free ride)": (lambda u, g: torch.zeros(D), "update is all zeros"),
}


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_story_one_byzantine_pool_among_eight_honest_is_rejected(attack):
    make, reason = ATTACKS[attack]
    honest = honest_pools()
    bad = make(honest[0], torch.Generator().manual_seed(9))
    updates = honest[:4] + [bad] + honest[4:]
    verdicts = verdicts_for(updates)
    assert not verdicts[4].accepted
    assert any(reason in r for r in verdicts[4].reasons), verdicts[4].reasons
    assert all(v.accepted for i, v in enumerate(verdicts) if i != 4), [v.reasons for v in verdicts]


def test_story_four_different_attackers_at_once():
    honest = honest_pools(seed=1)
    g = torch.Generator().manual_seed(7)
    attackers = [make(honest[i], g) for i, (make, _) in enumerate(ATTACKS.values())]
    for rule in ("centered_clipping", "median", "trimmed_mean"):
        verdicts = verdicts_for(honest + attackers, rule=rule)
        assert [v.accepted for v in verdicts] == [True] * 8 + [False] * 4, rule
        for v, (_, reason) in zip(verdicts[8:], ATTACKS.values(), strict=True):
            assert any(reason in r for r in v.reasons), (rule, v.reasons)


def test_reasons_read_as_sentences():
    honest = honest_pools()
    verdicts = verdicts_for(honest + [-honest[0], 100 * honest[1]])
    flip, scaled = verdicts[8].reasons, verdicts[9].reasons
    assert flip[0].startswith("cosine similarity -0.") and flip[0].endswith(
        "to the robust aggregate is below 0.00"
    )
    assert any(r.endswith("× the median update norm, above the limit 3.0×") and " is 9" in r for r in scaled)


def test_no_honest_pool_is_rejected_in_clean_rounds():
    """30 rounds of 8 honest pools under the noise model: not one false rejection."""
    for seed in range(30):
        verdicts = verdicts_for(honest_pools(seed=100 + seed))
        assert all(v.accepted for v in verdicts), (seed, [v.reasons for v in verdicts])


def test_scores_by_hand():
    # aggregate a = (1, 0); updates: (2, 0), (0, 1), (−1, 0)
    a = torch.tensor([1.0, 0.0])
    ups = [torch.tensor([2.0, 0.0]), torch.tensor([0.0, 1.0]), torch.tensor([-1.0, 0.0])]
    s = score_updates(ups, a)
    assert [x.norm for x in s] == [2.0, 1.0, 1.0]
    assert [x.cosine for x in s] == [1.0, 0.0, -1.0]
    assert [x.distance for x in s] == [1.0, math.sqrt(2), 2.0]
    assert [x.norm_ratio for x in s] == [2.0, 1.0, 1.0]  # median norm 1
    assert [x.distance_ratio for x in s] == [1 / math.sqrt(2), 1.0, 2 / math.sqrt(2)]
    assert all(x.krum_score is None for x in s)


def test_krum_scores_match_the_aggregation_rule():
    ups = honest_pools(n=7, seed=3)
    result = aggregate(ups, AggregationConfig(rule="krum", f=2))
    scores = score_updates(ups, result.vector, krum_f=2)
    assert tuple(s.krum_score for s in scores) == result.scores
    # R = 7 ≤ 2f + 2 = 8 for f = 3: not computable, so left out rather than raised
    assert all(s.krum_score is None for s in score_updates(ups, result.vector, krum_f=3))


def test_scores_do_not_depend_on_the_chunk_size():
    ups = honest_pools(n=5, seed=4)
    agg = aggregate(ups, AggregationConfig(rule="median")).vector
    rows = row_blocks({"a": torch.empty(16, 128), "b": torch.empty(2048)})  # D = 4096
    once = score_updates(ups, agg, krum_f=1, rows=rows)
    assert once == score_updates(ups, agg, krum_f=1, rows=rows, chunk=256)
    assert all(s.row_ratio is not None and s.row.startswith("a[") for s in once)


def test_spread_alignment_by_hand():
    # a = 0, so the residuals are the updates; σ = mean |u| = (2/3, 2/3).
    ups = [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), torch.tensor([1.0, 1.0])]
    s = score_updates(ups, torch.zeros(2))
    assert [x.spread_alignment for x in s] == pytest.approx([1 / math.sqrt(2), 1 / math.sqrt(2), 1.0])
    assert [x.spread_shift for x in s] == pytest.approx([0.0, 0.0, 1 - 1 / math.sqrt(2)])
    # Two of the three shifts are 0, so their robust scale is 0: zero is typical, the third is not.
    assert [x.spread_z for x in s] == [0.0, 0.0, math.inf]
    # With a scale: each shift over 1.4826 × the median absolute shift.
    more = score_updates(honest_pools(n=9, seed=5), torch.zeros(D))
    shifts = [x.spread_shift for x in more]
    sd = 1.4826 * statistics.median(abs(x) for x in shifts)
    assert [x.spread_z for x in more] == pytest.approx([x / sd for x in shifts])
    # Two updates: no majority to differ from, the checks stay neutral.
    two = score_updates(ups[:2], torch.zeros(2), rows=row_blocks({"w": torch.empty(1, 2)}))
    assert [(x.spread_alignment, x.spread_z, x.row_ratio) for x in two] == [(0.0, 0.0, None)] * 2


def test_row_blocks_follow_flatten_order():
    like = {
        "b.weight": torch.empty(3, 4),
        "a.bias": torch.empty(5),
        "c": torch.empty(2, 2, 2),
        "a.w": torch.empty(2, 3),
    }
    assert row_blocks(like) == [RowBlock("a.w", 5, 2, 3), RowBlock("b.weight", 11, 3, 4)]


def test_story_a_little_is_enough_is_caught_by_its_spread_alignment():
    # ALIE as in Baruch et al.: the honest mean minus z times the honest per-coordinate spread.
    honest = honest_pools(n=8, seed=5)
    stack = torch.stack(honest)
    alie = stack.mean(0) - 1.0 * stack.std(0)
    updates = honest + [alie, alie.clone()]
    verdicts = verdicts_for(updates, TUNED_DETECTION, rule="trimmed_mean")
    assert [v.accepted for v in verdicts] == [True] * 8 + [False] * 2, [v.reasons for v in verdicts]
    assert all("a little is enough" in " ".join(v.reasons) for v in verdicts[8:])
    assert all(v.accepted for v in verdicts_for(honest, TUNED_DETECTION, rule="trimmed_mean"))
    # With fewer than min_spread_updates (8) updates the spread check stays quiet.
    few = verdicts_for(honest[:5] + [alie, alie.clone()], TUNED_DETECTION, rule="trimmed_mean")
    assert not any("a little is enough" in " ".join(v.reasons) for v in few)


def test_a_large_shift_in_a_round_of_large_shifts_is_not_alie():
    # Round 1 of `panal simulate --pools 8 --stages 1` on the demo corpus: honest pools' shards
    # differ, and early in training their shifts scatter up to ±0.11; the judge looks at both
    # the shift and how far out it lies among the round's shifts.
    shifts = [-0.108, -0.072, 0.029, -0.015, 0.015, -0.041, 0.033, 0.028]

    def scores(xs):
        sd = 1.4826 * statistics.median(abs(s) for s in xs)
        return [
            UpdateScore(i, 1.0, 1.0, 0.8, 1.0, 1.0, None, spread_shift=s, spread_z=s / sd)
            for i, s in enumerate(xs)
        ]

    assert all(v.accepted for v in judge(scores(shifts), TUNED_DETECTION))
    # The same round with two pools sent ALIE (shifts as measured for it there, about −0.4).
    alie = judge(scores(shifts[:6] + [-0.42, -0.39]), TUNED_DETECTION)
    assert [v.accepted for v in alie] == [True] * 6 + [False] * 2


def test_story_a_row_no_other_pool_moves_is_caught():
    # 8 pools update a (64 × 64) embedding; pool 8 also moves row 60, which the others leave alone.
    g = torch.Generator().manual_seed(6)
    common = torch.randn(64, 64, generator=g)
    common[56:] = 0.0  # rows no honest pool's data touches
    honest = [(common + 0.3 * torch.randn(64, 64, generator=g)) * (common != 0) for _ in range(8)]
    bad = honest[0].clone()
    bad[60] = common[0]  # moved as far as an ordinary row
    rows = row_blocks({"wte": common})
    ups = [u.reshape(-1) for u in [*honest, bad]]
    agg = aggregate(ups, AggregationConfig(rule="trimmed_mean")).vector
    scores = score_updates(ups, agg, rows=rows)
    # Row 60's median residual is 0, floored at a quarter of the typical row's: ≈ 14.
    assert scores[8].row == "wte[60]" and scores[8].row_ratio > 12
    assert max(s.row_ratio for s in scores[:8]) < 3
    assert all(v.accepted for v in judge(scores, TUNED_DETECTION))  # the row check is opt-in
    verdicts = judge(scores, TUNED_DETECTION.model_copy(update={"max_row_ratio": 10.0}))
    assert [v.accepted for v in verdicts] == [True] * 8 + [False]
    assert "row wte[60] moved 14." in verdicts[8].reasons[0] and "backdoor" in verdicts[8].reasons[0]


def test_story_a_row_of_a_token_its_data_does_not_hold_is_caught():
    # The same 8 pools and embedding; each pool's data holds tokens 0..55. Pool 8 moves row 60.
    g = torch.Generator().manual_seed(6)
    common = torch.randn(64, 64, generator=g)
    common[56:] = 0.0
    honest = [(common + 0.3 * torch.randn(64, 64, generator=g)) * (common != 0) for _ in range(8)]
    bad = honest[0].clone()
    bad[60] = common[0]
    tokens = row_blocks({"wte": common, "x": torch.empty(8, 64)}, names={"wte"})
    assert [b.name for b in tokens] == ["wte"]
    ups = [u.reshape(-1) for u in [*honest, bad]]
    agg = aggregate(ups, AggregationConfig(rule="trimmed_mean")).vector
    absent = absent_tokens([torch.arange(56)], 64)
    assert absent.tolist() == [False] * 56 + [True] * 8
    scores = score_updates(ups, agg, tokens=tokens, absent=[absent] * 9)
    assert scores[8].absent_row == "wte[60]" and scores[8].absent_row_ratio > 12
    assert max(s.absent_row_ratio for s in scores[:8]) < 3
    verdicts = judge(scores, TUNED_DETECTION)
    assert [v.accepted for v in verdicts] == [True] * 8 + [False]
    assert "row wte[60], of a token its assigned data does not contain" in verdicts[8].reasons[0]
    # Had its data held token 60, the move would be its own to make: accepted.
    present = absent.copy()
    present[60] = False
    scores = score_updates(ups, agg, tokens=tokens, absent=[absent] * 8 + [present])
    assert scores[8].absent_row_ratio < 3 and all(v.accepted for v in judge(scores, TUNED_DETECTION))
    # A token most pools' data hold is not scored for the one that lacks it: they move its
    # row from data, so a pool without it differs from them anyway.
    held = absent_tokens([torch.arange(64)], 64)
    scores = score_updates(ups, agg, tokens=tokens, absent=[held] * 8 + [absent])
    assert scores[8].absent_row_ratio == 0.0 and all(v.accepted for v in judge(scores, TUNED_DETECTION))
    # Unknown data (None): no ratio and no verdict from it.
    scores = score_updates(ups, agg, tokens=tokens, absent=[None] * 9)
    assert all(s.absent_row_ratio is None and s.absent_row == "" for s in scores)
    with pytest.raises(ValueError, match="token rows"):
        score_updates(ups, agg, tokens=tokens, absent=[absent[:10]] * 9)


def test_zero_medians_and_zero_aggregate():
    zeros = [torch.zeros(3)] * 3
    s = score_updates(zeros + [torch.ones(3)], torch.zeros(3))
    assert [x.norm_ratio for x in s] == [1.0, 1.0, 1.0, math.inf]
    assert [x.cosine for x in s] == [0.0] * 4  # undefined against a zero aggregate: neutral
    assert [v.accepted for v in judge(s, DetectionPolicy())] == [True, True, True, False]


def test_disabled_policy_accepts_everything():
    honest = honest_pools()
    verdicts = verdicts_for(honest + [-100 * honest[0]], DetectionPolicy(enabled=False))
    assert all(v.accepted and not v.reasons for v in verdicts)


def test_policy_thresholds_are_validated():
    with pytest.raises(ValueError, match="min_cosine"):
        DetectionPolicy(min_cosine=2)
    with pytest.raises(ValueError, match="max_norm_ratio"):
        DetectionPolicy(max_norm_ratio=0.5)


def test_a_hand_made_score_meets_each_threshold():
    base = {"index": 0, "norm": 1.0, "distance": 1.0, "krum_score": None}
    policy = DetectionPolicy(min_cosine=0.1)
    cases = [
        ({"cosine": 0.05, "norm_ratio": 1.0, "distance_ratio": 1.0}, "cosine similarity 0.05"),
        ({"cosine": 0.5, "norm_ratio": 3.5, "distance_ratio": 1.0}, "3.5× the median update norm"),
        ({"cosine": 0.5, "norm_ratio": 0.1, "distance_ratio": 1.0}, "below the limit 0.25×"),
        ({"cosine": 0.5, "norm_ratio": 1.0, "distance_ratio": 4.0}, "4.0× the median distance"),
    ]
    for fields, reason in cases:
        (v,) = judge([UpdateScore(**base, **fields)], policy)
        assert not v.accepted and len(v.reasons) == 1 and reason in v.reasons[0]
    (v,) = judge([UpdateScore(**base, cosine=0.1, norm_ratio=3.0, distance_ratio=3.0)], policy)
    assert v.accepted  # the limits themselves pass


# --- reputation across rounds --------------------------------------------------------------------


def history(rep, node, verdicts, start=0):
    for k, rejected in enumerate(verdicts):
        rep = rep.record(node, start + k, rejected)
    return rep


def test_story_a_node_rejected_twice_in_three_rounds_is_quarantined():
    rep = history(Reputation(), "mallory", [True, False, True])
    assert rep.should_quarantine("mallory") and rep.rejections("mallory") == 2
    assert not history(Reputation(), "alice", [True, False, False]).should_quarantine("alice")
    assert not Reputation().should_quarantine("never-seen")


def test_old_rejections_slide_out_of_the_window():
    rep = history(Reputation(), "bob", [True, False, False, True])  # last three: A, A, R
    assert rep.rejections("bob") == 1 and not rep.should_quarantine("bob")


def test_recovery_after_window_minus_threshold_plus_one_accepted_updates():
    rep = history(Reputation(), "carol", [True, True])
    assert rep.should_quarantine("carol")
    rep = rep.record("carol", 2, False)  # R, R, A: still 2
    assert rep.should_quarantine("carol")
    rep = rep.record("carol", 3, False)  # R, A, A: released
    assert not rep.should_quarantine("carol")
    # or an operator releases at once
    assert not history(Reputation(), "dave", [True, True]).release("dave").should_quarantine("dave")


def test_recording_is_pure_idempotent_per_round_and_in_order():
    empty = Reputation()
    once = empty.record("n", 5, True)
    assert empty.rejections("n") == 0  # the original is untouched
    again = once.record("n", 5, False)  # the coordinator re-ran round 5 after a restart
    assert again.history["n"] == ((5, False),)
    with pytest.raises(ValueError, match="round 4 recorded after round 5"):
        once.record("n", 4, True)


def test_record_round_and_round_trip_through_json():
    rep = Reputation(window=4, threshold=3).record_round(0, {"a": True, "b": False})
    rep = rep.record_round(1, {"a": True}).record_round(2, {"a": True, "b": True})
    assert rep.should_quarantine("a") and not rep.should_quarantine("b")
    back = Reputation.from_dict(json.loads(json.dumps(rep.to_dict())))
    assert back == rep
    assert rep.to_dict() == {
        "window": 4,
        "threshold": 3,
        "nodes": {"a": [[0, 1], [1, 1], [2, 1]], "b": [[0, 0], [2, 1]]},
    }


@pytest.mark.parametrize(
    "state",
    [
        {},
        {"window": 3, "threshold": 2},
        {"window": 3, "threshold": 2, "nodes": {"a": [[1, 1], [0, 0]]}},
        {"window": 3, "threshold": 2, "nodes": {"a": [[0, 1], [1, 1], [2, 1], [3, 1]]}},
        {"window": 3, "threshold": 2, "nodes": {"a": [["x", 1]]}},
        {"window": 2, "threshold": 3, "nodes": {}},
    ],
)
def test_malformed_reputation_state_is_refused(state):
    with pytest.raises(ValueError):
        Reputation.from_dict(state)
