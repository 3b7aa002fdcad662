"""Aggregation rules: hand-computed cases, robustness stories, and bit-for-bit determinism."""

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from pydantic import ValidationError

from coordinator import aggregation
from coordinator.aggregation import (
    RULES,
    AggregationConfig,
    AggregationError,
    ClipConfig,
    TreeSum,
    aggregate,
    clip_norms,
    flatten,
    tree_sum,
    unflatten,
)

ROOT = Path(__file__).resolve().parents[2]


def vecs(*rows):
    return [torch.tensor(r, dtype=torch.float32) for r in rows]


# Four honest pools around (2, 3, 4) and one Byzantine pool at (100, −100, 100).
HONEST = ([1.0, 2.0, 3.0], [2.0, 3.0, 4.0], [3.0, 4.0, 5.0], [2.5, 3.5, 4.5])
FIVE = vecs(*HONEST, [100.0, -100.0, 100.0])


def run(updates, **config):
    return aggregate(updates, AggregationConfig(**config))


# --- hand-computed cases -------------------------------------------------------------------------


def test_mean_by_hand():
    # (1+2+3+2.5+100)/5 = 21.7, (2+3+4+3.5−100)/5 = −17.5, (3+4+5+4.5+100)/5 = 23.3
    r = run(FIVE, rule="mean")
    assert torch.equal(r.vector, torch.tensor([21.7, -17.5, 23.3]))
    assert r.weights == (0.2,) * 5 and r.selected == (0, 1, 2, 3, 4)


def test_median_by_hand():
    # sorted: (1, 2, 2.5, 3, 100), (−100, 2, 3, 3.5, 4), (3, 4, 4.5, 5, 100)
    assert torch.equal(run(FIVE, rule="median").vector, torch.tensor([2.5, 3.0, 4.5]))
    # an even count takes the mean of the two middle values: (2, 2.5, 3, 100) → 2.75
    assert torch.equal(run(FIVE[1:], rule="median").vector, torch.tensor([2.75, 3.25, 4.75]))


def test_trimmed_mean_removes_the_extremes_by_hand():
    # k = 1 from each end: (2, 2.5, 3) → 2.5, (2, 3, 3.5) → 8.5/3, (4, 4.5, 5) → 4.5
    want = torch.tensor([2.5, 8.5 / 3, 4.5])
    r = run(FIVE, rule="trimmed_mean", trim=1)
    assert torch.equal(r.vector, want) and r.info["trimmed_each_end"] == 1
    assert torch.equal(run(FIVE, rule="trimmed_mean", trim=0.2).vector, want)  # ⌊0.2·5⌋ = 1
    # trim 0 is the mean
    assert torch.equal(run(FIVE, rule="trimmed_mean", trim=0).vector, run(FIVE, rule="mean").vector)


def test_krum_scores_and_selection_by_hand():
    """f = 1, R = 5: each score sums the R − f − 2 = 2 smallest squared distances.

    Squared distances among the honest: d01 = 3, d02 = 12, d03 = 6.75, d12 = 3, d13 = 0.75,
    d23 = 0.75; to the outlier: d04 = 29614, d14 = 29429, d24 = 29250, d34 = 29338.75.
    """
    r = run(FIVE, rule="krum", f=1)
    assert r.scores == (9.75, 3.75, 3.75, 1.5, 58588.75)
    assert r.selected == (3,) and r.weights == (0.0, 0.0, 0.0, 1.0, 0.0)
    assert torch.equal(r.vector, FIVE[3])


def test_krum_picks_an_honest_update_despite_an_obvious_outlier():
    g = torch.Generator().manual_seed(0)
    honest = [torch.ones(64) + 0.1 * torch.randn(64, generator=g) for _ in range(6)]
    outlier = [torch.full((64,), -50.0)]
    r = run(honest[:3] + outlier + honest[3:], rule="krum", f=1)
    assert r.selected[0] != 3 and r.scores[3] == max(r.scores)


def test_multi_krum_by_hand():
    # m defaults to R − f = 4: the four honest ones, (1+2+3+2.5)/4 = 2.125 …
    r = run(FIVE, rule="multi_krum", f=1)
    assert torch.equal(r.vector, torch.tensor([2.125, 3.125, 4.125]))
    assert r.selected == (0, 1, 2, 3) and r.weights == (0.25, 0.25, 0.25, 0.25, 0.0)
    # m = 2: u3 (1.5) then u1 and u2 tie at 3.75 — the lower index wins: mean(u1, u3)
    r2 = run(FIVE, rule="multi_krum", f=1, m=2)
    assert r2.selected == (1, 3) and torch.equal(r2.vector, torch.tensor([2.25, 3.25, 4.25]))


CC = vecs([3.0, 4.0], [0.0, 1.0], [0.0, -1.0], [6.0, 8.0])


def test_centered_clipping_by_hand():
    """τ = 5 from 0. Iteration 1: (6, 8) has norm 10 → (3, 4); v = (3+0+0+3, 4+1−1+4)/4 = (1.5, 2).

    Iteration 2, z_i = x_i − v: (1.5, 2) ‖2.5‖, (−1.5, −1) ‖1.80‖, (−1.5, −3) ‖3.35‖,
    (4.5, 6) ‖7.5‖ → (3, 4); v += (1.5, 2)/4 → (1.875, 2.5).
    """
    one = run(CC, rule="centered_clipping", tau=5, iters=1, center="zero")
    assert torch.equal(one.vector, torch.tensor([1.5, 2.0]))
    assert one.info["last_factors"] == (1.0, 1.0, 1.0, 0.5) and one.info["tau"] == (5.0,)
    two = run(CC, rule="centered_clipping", tau=5, iters=2, center="zero")
    assert torch.equal(two.vector, torch.tensor([1.875, 2.5]))
    # The same second step, started from a given center (e.g. last round's aggregate):
    given_center = aggregate(
        CC, AggregationConfig(rule="centered_clipping", tau=5, iters=1), center=torch.tensor([1.5, 2.0])
    )
    assert torch.equal(given_center.vector, torch.tensor([1.875, 2.5]))


def test_centered_clipping_converges_toward_the_honest_mean():
    """8 honest pools around a common direction, 2 Byzantine pools far off in one direction."""
    g = torch.Generator().manual_seed(1)
    d = 256
    direction = torch.randn(d, generator=g)
    honest = [direction + 0.3 * torch.randn(d, generator=g) for _ in range(8)]
    byzantine = [direction + 1000.0, direction + 1000.0]
    honest_mean = torch.stack(honest).double().mean(0)  # norm ≈ 16.9; honest spread ≈ 4.6

    def error(**config):
        v = run(honest + byzantine, rule="centered_clipping", **config).vector.double()
        return float((v - honest_mean).norm())

    assert error(iters=1, tau=1e9) > 300  # τ = ∞ from the median center: one step of the plain mean
    # A fixed τ = 2 from zero walks toward the honest cluster, each iteration closer.
    walk = [error(iters=k, tau=2.0, center="zero") for k in (1, 3, 10, 30)]
    assert walk == sorted(walk, reverse=True) and walk[0] > 15 and walk[-1] < 1.5
    # The default (median center, τ = 2 × the median distance, 3 iterations) is close at once.
    assert error() < 3


def test_clipping_absolute_and_median_multiple_by_hand():
    # norms: 5, 1, 1, 10
    r = run(CC, rule="mean", clip={"mode": "absolute", "max_norm": 5})
    assert r.clip_factors == (1.0, 1.0, 1.0, 0.5) and r.norms == (5.0, 1.0, 1.0, 10.0)
    assert torch.equal(r.vector, torch.tensor([1.5, 2.0]))  # mean of (3,4),(0,1),(0,−1),(3,4)
    # median norm (1 + 5)/2 = 3, × 2 → 6: only (6, 8) is scaled, by 0.6
    r = run(CC, rule="mean", clip={"mode": "median", "multiple": 2})
    assert r.clip_factors == (1.0, 1.0, 1.0, 0.6)
    assert torch.allclose(r.vector, torch.tensor([(3 + 3.6) / 4, (4 + 4.8) / 4]))
    clipped = clip_norms(CC, ClipConfig(mode="absolute", max_norm=5))
    assert torch.equal(clipped[3], torch.tensor([3.0, 4.0])) and clipped[0] is not CC[0]


# --- determinism ---------------------------------------------------------------------------------

CONFIGS = [
    {"rule": "mean"},
    {"rule": "median"},
    {"rule": "trimmed_mean", "trim": 2},
    {"rule": "krum", "f": 2},
    {"rule": "multi_krum", "f": 2},
    {"rule": "centered_clipping"},
    {"rule": "mean", "clip": {"mode": "median", "multiple": 1.5}},
]


def random_updates(r=9, n=5000, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=g)
    return [base + torch.randn(n, generator=g) * (1 + i) for i in range(r)]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c["rule"] + ("+clip" if "clip" in c else ""))
def test_chunking_never_changes_a_bit(config):
    """5000 elements in chunks of 1024 (four full and a short one) or of 2: the same bytes as one chunk."""
    ups = random_updates()
    whole = run(ups, **config, chunk=1 << 20)
    for chunk in (1024, 2):
        part = run(ups, **config, chunk=chunk)
        assert part.vector.numpy().tobytes() == whole.vector.numpy().tobytes()
        assert part.norms == whole.norms and part.scores == whole.scores


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c["rule"] + ("+clip" if "clip" in c else ""))
def test_thread_count_and_repeats_never_change_a_bit(config):
    ups = random_updates(seed=1)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run(ups, **config, chunk=1024).vector.numpy().tobytes()
        torch.set_num_threads(2)
        two = run(ups, **config, chunk=1024).vector.numpy().tobytes()
    finally:
        torch.set_num_threads(before)
    assert one == two == run(ups, **config, chunk=1024).vector.numpy().tobytes()


DIGEST_SCRIPT = """
import hashlib, torch
from tests.coordinator.test_aggregation import CONFIGS, random_updates, run
h = hashlib.sha256()
for c in CONFIGS:
    h.update(run(random_updates(seed=2), **c, chunk=1024).vector.numpy().tobytes())
print(h.hexdigest())
"""


def test_another_process_with_more_threads_gets_the_same_bytes():
    h = hashlib.sha256()
    for c in CONFIGS:
        h.update(run(random_updates(seed=2), **c, chunk=1024).vector.numpy().tobytes())
    env = dict(os.environ, OMP_NUM_THREADS="2", MKL_NUM_THREADS="2", OPENBLAS_NUM_THREADS="2")
    script = "import torch; torch.set_num_threads(2)\n" + DIGEST_SCRIPT
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == h.hexdigest()


@pytest.mark.parametrize("rule", ["mean", "median", "trimmed_mean", "multi_krum", "centered_clipping"])
def test_update_order_never_changes_a_bit(rule):
    """Per coordinate the values are sorted before they are added, so arrival order does not matter."""
    ups = random_updates(r=7, n=3000, seed=3)
    config = {"rule": rule, "f": 1} if "krum" in rule else {"rule": rule}
    want = run(ups, **config, chunk=512).vector.numpy().tobytes()
    perm = [4, 0, 6, 2, 1, 5, 3]
    assert run([ups[i] for i in perm], **config, chunk=512).vector.numpy().tobytes() == want


@given(
    values=st.lists(st.floats(-1e30, 1e30, allow_nan=False, width=64), min_size=1, max_size=70),
    chunk_log=st.integers(0, 6),
)
def test_property_tree_sum_ignores_the_chunk_size(values, chunk_log):
    x = np.array([values, [v * 0.5 for v in values]])  # (2, n)
    chunk = 1 << chunk_log
    acc = TreeSum(2)
    for a in range(0, x.shape[1], chunk):
        acc.add(x[:, a : a + chunk])
    assert acc.total().tobytes() == tree_sum(x).tobytes()


# --- properties ----------------------------------------------------------------------------------

finite32 = st.floats(-1e6, 1e6, allow_nan=False, width=32)


@st.composite
def update_sets(draw, min_r=1, max_r=7):
    n = draw(st.integers(1, 6))
    r = draw(st.integers(min_r, max_r))
    return [torch.tensor(draw(st.lists(finite32, min_size=n, max_size=n))) for _ in range(r)]


@given(x=st.lists(finite32, min_size=1, max_size=8), r=st.integers(1, 9))
def test_property_identical_updates_aggregate_to_themselves(x, r):
    v = torch.tensor(x)
    for config in ({"rule": "mean"}, {"rule": "median"}, {"rule": "trimmed_mean", "trim": 0.2}):
        assert torch.equal(run([v.clone() for _ in range(r)], **config).vector, v)
    if r >= 3:
        assert torch.equal(run([v.clone() for _ in range(r)], rule="krum", f=0).vector, v)


@given(ups=update_sets())
def test_property_median_and_trimmed_mean_stay_within_the_coordinate_range(ups):
    lo, hi = torch.stack(ups).min(0).values, torch.stack(ups).max(0).values
    for config in ({"rule": "median"}, {"rule": "trimmed_mean", "trim": 0.2}, {"rule": "mean"}):
        v = run(ups, **config).vector
        assert bool(((lo <= v) & (v <= hi)).all())


@given(ups=update_sets(min_r=2), seed=st.integers(0, 1000))
def test_property_permutation_invariance(ups, seed):
    perm = np.random.default_rng(seed).permutation(len(ups)).tolist()
    assume(perm != sorted(perm))
    for rule in ("mean", "median", "trimmed_mean", "centered_clipping"):
        a = run(ups, rule=rule).vector.numpy().tobytes()
        b = run([ups[i] for i in perm], rule=rule).vector.numpy().tobytes()
        assert a == b, rule


# --- inputs and configuration --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("updates", "match"),
    [
        ([], "no updates"),
        (vecs([1.0, 2.0], [1.0]), "update 1 has 1 elements"),
        ([torch.zeros(2, 2)], r"expected a flat float32 vector"),
        ([torch.zeros(3, dtype=torch.float64)], "torch.float64"),
        (vecs([1.0, float("nan")], [1.0, 2.0]), r"updates \[0\] hold NaN"),
        (vecs([1.0, 2.0], [float("inf"), 2.0]), r"updates \[1\] hold NaN or infinite"),
    ],
)
def test_bad_inputs_are_refused_with_a_clear_error(updates, match):
    with pytest.raises(AggregationError, match=match):
        run(updates, rule="mean")


def test_too_few_updates_for_the_rule_say_what_to_change():
    with pytest.raises(AggregationError, match=r"krum with f=1 needs more than 2f\+2 = 4 updates, got 4"):
        run(FIVE[:4], rule="krum", f=1)
    with pytest.raises(AggregationError, match=r"k=2 .* more than 4 updates, got 4: lower aggregation.trim"):
        run(FIVE[:4], rule="trimmed_mean", trim=2)
    with pytest.raises(AggregationError, match=r"m must lie in \[1, 4\]"):
        run(FIVE, rule="multi_krum", f=1, m=5)
    with pytest.raises(AggregationError, match="center has shape"):
        aggregate(FIVE, AggregationConfig(rule="centered_clipping"), center=torch.zeros(4))


@pytest.mark.parametrize(
    ("config", "match"),
    [
        ({"rule": "krum"}, "aggregation.f is required for rule 'krum'"),
        ({"rule": "multi_krum"}, r"2f\+2"),
        ({"rule": "mean", "m": 2}, "only applies to rule 'multi_krum'"),
        ({"rule": "trimmed_mean", "trim": 0.6}, "neither a fraction below 0.5"),
        ({"rule": "trimmed_mean", "trim": 1.5}, "whole count"),
        ({"rule": "mean", "chunk": 1000}, r"power of two \(e.g. 512\)"),
        ({"rule": "mean", "clip": {"mode": "absolute"}}, "clip.max_norm is required"),
        ({"rule": "mean", "rules": "median"}, "rules"),
        ({"rule": "bulyan"}, "rule"),
        ({"rule": "krum", "f": -1}, "f"),
    ],
)
def test_config_errors_name_the_field_and_the_fix(config, match):
    with pytest.raises(ValidationError, match=match):
        AggregationConfig(**config)


def test_every_rule_is_registered():
    from typing import get_args

    assert set(RULES) == set(get_args(aggregation.Rule))


def test_flatten_sorts_names_and_unflatten_gives_views_back():
    state = {"b": torch.tensor([[1.0, 2.0], [3.0, 4.0]]), "a": torch.tensor([5.0]), "c": torch.tensor(6.0)}
    flat = flatten(state)
    assert flat.tolist() == [5.0, 1.0, 2.0, 3.0, 4.0, 6.0]
    back = unflatten(flat, state)
    assert list(back) == ["a", "b", "c"] and all(torch.equal(back[k], state[k]) for k in state)
    with pytest.raises(ValueError, match=r"needs \[6\]"):
        unflatten(flat[:5], state)
    with pytest.raises(ValueError, match="float32"):
        flatten({"w": torch.zeros(2, dtype=torch.float16)})
