"""Poisoning defence: score each update against the robust aggregate, judge it, remember who misbehaves.

After a stage's R updates are aggregated (``coordinator.aggregation``), each
update u_i is scored against the robust aggregate a:

- its L2 distance ‖u_i − a‖ and that distance over the median distance;
- its cosine similarity ⟨u_i, a⟩ / (‖u_i‖‖a‖) (0.0 when either is zero);
- its norm over the median update norm;
- its Krum score (sum of squared distances to its R − f − 2 nearest others), when f is given and R > 2f + 2.

Everything is float64 and deterministic: the sums over the parameter dimension
are ``aggregation.TreeSum`` pairwise trees, independent of thread count and chunk size.

:func:`judge` turns scores into verdicts with human-readable reasons under a
:class:`DetectionPolicy`. The attacks each threshold is for: sign flipping
(cosine below ``min_cosine``), scaling (norm ratio above ``max_norm_ratio``),
free riding with zeros or a shrunken update (norm ratio below
``min_norm_ratio``), noise and other far-off updates (distance ratio above
``max_distance_ratio``). The ratios are to medians, so they hold while fewer
than half the updates are Byzantine.

:class:`Reputation` remembers each node's last verdicts across rounds and says
when to quarantine it (by default 2 rejections among its last 3 updates).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from coordinator.aggregation import (
    DEFAULT_CHUNK,
    AggregationError,
    TreeSum,
    UpdateStack,
    krum_scores,
    pairwise_sq_distances,
)


@dataclass(frozen=True)
class UpdateScore:
    index: int  # position in the list of updates given to score_updates
    norm: float  # ‖u‖
    distance: float  # ‖u − a‖ to the robust aggregate a
    cosine: float  # ⟨u, a⟩ / (‖u‖‖a‖) in [−1, 1]; 0.0 when u or a is zero
    norm_ratio: float  # ‖u‖ / median_j ‖u_j‖
    distance_ratio: float  # ‖u − a‖ / median_j ‖u_j − a‖
    krum_score: float | None  # None when not asked for (krum_f None) or R ≤ 2f + 2


def _ratio(x: float, median: float) -> float:
    # A zero median (half the updates zero, or equal to the aggregate): zero is "typical", anything else is not.
    if median > 0:
        return x / median
    return 1.0 if x == 0 else math.inf


def _median(values: Sequence[float]) -> float:
    s = sorted(values)
    k = len(s)
    return s[k // 2] if k % 2 else (s[k // 2 - 1] + s[k // 2]) * 0.5


def score_updates(
    updates: Sequence[torch.Tensor],
    aggregate: torch.Tensor,
    *,
    krum_f: int | None = None,
    chunk: int = DEFAULT_CHUNK,
) -> list[UpdateScore]:
    """Score each of R flat float32 updates (N,) against the (N,) aggregate; one pass (two with Krum)."""
    stack = UpdateStack(updates, chunk=chunk)
    if aggregate.dim() != 1 or aggregate.numel() != stack.size:
        raise AggregationError(
            f"aggregate has shape {list(aggregate.shape)}; the updates need [{stack.size}]"
        )
    agg = aggregate.detach().cpu().to(torch.float64).numpy()  # (N,) float64
    sq, dot, dist = TreeSum(stack.r), TreeSum(stack.r), TreeSum(stack.r)
    agg_sq = TreeSum(1)
    for a, b in stack.spans():
        x = stack.rows(a, b)  # (R, c)
        g = agg[a:b] + 0.0  # (c,), −0.0 normalised like the updates
        agg_sq.add((g * g)[None, :])
        t = x * g  # (R, c): the one scratch buffer besides x
        dot.add(t)
        sq.add(np.multiply(x, x, out=t))
        x -= g
        dist.add(np.square(x, out=x))
    norms = np.sqrt(sq.total())
    distances = np.sqrt(dist.total())
    agg_norm = math.sqrt(float(agg_sq.total()[0]))
    dots = dot.total()
    if not (np.isfinite(norms).all() and np.isfinite(distances).all() and math.isfinite(agg_norm)):
        raise AggregationError("updates or aggregate hold NaN or infinite values; reject them before scoring")

    krum: list[float] | None = None
    if krum_f is not None and stack.r > 2 * krum_f + 2:
        krum = krum_scores(pairwise_sq_distances(stack), krum_f)

    med_norm, med_dist = _median(norms.tolist()), _median(distances.tolist())
    scores = []
    for i in range(stack.r):
        n, d = float(norms[i]), float(distances[i])
        cos = float(dots[i]) / (n * agg_norm) if n > 0 and agg_norm > 0 else 0.0
        scores.append(
            UpdateScore(
                index=i,
                norm=n,
                distance=d,
                cosine=max(-1.0, min(1.0, cos)),
                norm_ratio=_ratio(n, med_norm),
                distance_ratio=_ratio(d, med_dist),
                krum_score=None if krum is None else krum[i],
            )
        )
    return scores


class DetectionPolicy(BaseModel):
    """When an update is rejected (a job's ``detection`` section). Defaults and why:

    - ``min_cosine`` 0.0: an update pointing away from the consensus (sign flip)
      is rejected; honest pools' pseudo-gradients share the descent direction,
      so their cosine to the aggregate stays well above 0 (≈0.7 at a noise norm
      equal to the signal norm, see tests/coordinator/test_detection.py).
    - ``max_norm_ratio`` 3.0 and ``min_norm_ratio`` 0.25: pools run the same H
      steps with the same schedule, so honest norms differ by well under 2×; a
      scaled update (×100) or a zero / shrunken free ride falls outside.
    - ``max_distance_ratio`` 3.0: in high dimension honest distances to the
      aggregate concentrate around their median; noise or a far-off model does not.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    enabled: bool = True
    min_cosine: float = Field(default=0.0, ge=-1, le=1)
    max_norm_ratio: float = Field(default=3.0, gt=1)
    min_norm_ratio: float = Field(default=0.25, ge=0, lt=1)
    max_distance_ratio: float = Field(default=3.0, gt=1)


@dataclass(frozen=True)
class Verdict:
    index: int
    accepted: bool
    reasons: tuple[str, ...]  # why it was rejected; empty when accepted


def judge(scores: Sequence[UpdateScore], policy: DetectionPolicy) -> list[Verdict]:
    """One verdict per score: rejected with every reason that applies, or accepted."""
    verdicts = []
    for s in scores:
        reasons: list[str] = []
        if policy.enabled:
            if s.cosine < policy.min_cosine:
                reasons.append(
                    f"cosine similarity {s.cosine:.2f} to the robust aggregate is below {policy.min_cosine:.2f}"
                )
            if s.norm_ratio > policy.max_norm_ratio:
                reasons.append(
                    f"norm {s.norm:.4g} is {s.norm_ratio:.1f}× the median update norm, "
                    f"above the limit {policy.max_norm_ratio:.1f}×"
                )
            if s.norm_ratio < policy.min_norm_ratio:
                what = "update is all zeros: norm" if s.norm == 0 else "norm"
                reasons.append(
                    f"{what} {s.norm:.4g} is {s.norm_ratio:.2f}× the median update norm, "
                    f"below the limit {policy.min_norm_ratio:.2f}×"
                )
            if s.distance_ratio > policy.max_distance_ratio:
                reasons.append(
                    f"distance {s.distance:.4g} to the robust aggregate is {s.distance_ratio:.1f}× the median "
                    f"distance, above the limit {policy.max_distance_ratio:.1f}×"
                )
        verdicts.append(Verdict(s.index, not reasons, tuple(reasons)))
    return verdicts


@dataclass(frozen=True)
class Reputation:
    """Each node's last ``window`` verdicts; quarantine at ``threshold`` rejections among them.

    Pure: :meth:`record` returns a new Reputation. Verdicts count per update the
    node sent, not per round number, so skipping rounds neither erases nor adds
    rejections. Recovery: a quarantined node whose updates are still scored
    (observe-only) comes back once accepted updates push its rejections out of the
    window — after ``window − threshold + 1`` accepted in a row (2 by default);
    an operator can also :meth:`release` it, which forgets its history.
    """

    window: int = 3
    threshold: int = 2
    # node → its last `window` (round, rejected) verdicts, oldest first
    history: Mapping[str, tuple[tuple[int, bool], ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 1 <= self.threshold <= self.window:
            raise ValueError(
                f"reputation threshold {self.threshold} must lie in [1, window={self.window}]: "
                "quarantine after that many rejections among the last `window` updates"
            )

    def record(self, node: str, round: int, rejected: bool) -> Reputation:
        """Add the verdict on ``node``'s update of ``round``; recording a round again replaces it."""
        past = list(self.history.get(node, ()))
        if past and round < past[-1][0]:
            raise ValueError(f"node {node!r}: round {round} recorded after round {past[-1][0]}")
        if past and past[-1][0] == round:
            past.pop()  # the coordinator re-ran this round (e.g. after a restart)
        past.append((round, bool(rejected)))
        history = dict(self.history)
        history[node] = tuple(past[-self.window :])
        return Reputation(self.window, self.threshold, history)

    def record_round(self, round: int, rejected: Mapping[str, bool]) -> Reputation:
        """Add one round's verdicts, node → rejected."""
        rep = self
        for node in sorted(rejected):
            rep = rep.record(node, round, rejected[node])
        return rep

    def rejections(self, node: str) -> int:
        return sum(r for _, r in self.history.get(node, ()))

    def should_quarantine(self, node: str) -> bool:
        return self.rejections(node) >= self.threshold

    def release(self, node: str) -> Reputation:
        """An operator lifts the quarantine: the node starts with a clean history."""
        return Reputation(self.window, self.threshold, {k: v for k, v in self.history.items() if k != node})

    def to_dict(self) -> dict[str, Any]:
        """A small JSON-ready dict, e.g. for a SQLite column."""
        return {
            "window": self.window,
            "threshold": self.threshold,
            "nodes": {n: [[r, int(x)] for r, x in self.history[n]] for n in sorted(self.history)},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Reputation:
        try:
            window, threshold, nodes = int(data["window"]), int(data["threshold"]), data["nodes"]
            history = {
                str(n): tuple((int(r), bool(x)) for r, x in entries) for n, entries in dict(nodes).items()
            }
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"reputation state is malformed ({e}); expected window, threshold, nodes") from e
        for n, entries in history.items():
            rounds = [r for r, _ in entries]
            if rounds != sorted(set(rounds)) or len(entries) > window:
                raise ValueError(f"reputation state of node {n!r} is not {window} or fewer rounds in order")
        return cls(window, threshold, history)
