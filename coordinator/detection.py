"""Poisoning defence: score each update against the robust aggregate, judge it, remember who misbehaves.

After a stage's R updates are aggregated (``coordinator.aggregation``), each
update u_i is scored against the robust aggregate a:

- its L2 distance ‖u_i − a‖ and that distance over the median distance;
- its cosine similarity ⟨u_i, a⟩ / (‖u_i‖‖a‖) (0.0 when either is zero);
- its norm over the median update norm;
- its Krum score (sum of squared distances to its R − f − 2 nearest others), when f is given and R > 2f + 2;
- its *spread alignment*: the cosine between its residual u_i − a and the per-coordinate
  spread σ (σ_j the mean over updates of |u_kj − a_j|), and how far that lies from the
  median update's. An honest residual is noise with no preferred sign, so its alignment
  sits near everyone else's; "a little is enough" (Baruch et al. 2019) and the other
  attacks that shift every coordinate by a multiple of its spread (the "std" perturbation
  of Shejwalkar & Houmansadr 2021) point their residual along σ (or against it);
- its *row ratio*, when the updates' 2-D tensors are given (:func:`row_blocks`): for each
  row (a token's embedding or output row, a neuron's weights) the norm of the update's
  residual there over the median update's, the median floored at a share of the typical
  row; the largest over the rows. A trigger-token backdoor moves the trigger's rows, which
  honest pools barely touch, as far as any frequent token's: ratios of 10–70 where honest
  updates stay under 4 (and under 8 in a first round, when rare tokens are new) — on data all
  pools share. Where pools' data differ, an honest pool moves the rows of its own rare tokens
  as far (up to 15 among 8 pools of the demo corpus), so this check is opt-in;
- its *absent-row ratio*, when the tokens its data holds are known (:func:`absent_tokens`
  of its pool's shards): the same ratio over the embedding and output rows of the tokens
  that data does not hold, nor the data of at least half the stage's pools. Training moves
  such a row only as every pool's does (pushing down an unseen token's logit), so honest
  updates stay near 1 (under 2 in bench/defence.py and on the demo corpus); a pool that
  writes a trigger its shards do not hold into its batches moves the trigger's rows 14–110×
  as far. A trigger made of tokens its own shards, or most pools' shards, do hold is not
  seen by this check (the trimmed mean bounds it, see README).

Everything is float64 and deterministic: the sums over the parameter dimension
are ``aggregation.TreeSum`` pairwise trees, independent of thread count and chunk size.

:func:`judge` turns scores into verdicts with human-readable reasons under a
:class:`DetectionPolicy`. The attacks each threshold is for: sign flipping
(cosine below ``min_cosine``), scaling (norm ratio above ``max_norm_ratio``),
free riding with zeros or a shrunken update (norm ratio below
``min_norm_ratio``), noise and other far-off updates (distance ratio above
``max_distance_ratio``), ALIE-style shifts (spread alignment off the median by
more than ``max_spread_shift``), backdoors through rare rows (row ratio above
``max_row_ratio``, absent-row ratio above ``max_absent_row_ratio``). The ratios
and shifts are to medians, so they hold while fewer than half the updates are
Byzantine.

:class:`Reputation` remembers each node's last verdicts across rounds and says
when to quarantine it (by default 2 rejections among its last 3 updates).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Mapping, Sequence
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
    tree_sum,
)

ROW_FLOOR = 0.25  # a row's median residual is floored at this share of the median row's
MAJORITY = 3  # the fewest updates whose spread and row scores mean anything (a median to differ from)


@dataclass(frozen=True)
class RowBlock:
    """A 2-D tensor inside a flat update: its name, first element, rows and row length."""

    name: str
    offset: int
    rows: int
    cols: int


def row_blocks(like: Mapping[str, Any], names: Collection[str] | None = None) -> list[RowBlock]:
    """The 2-D tensors of a stage (name → tensor or anything with ``.shape``) in ``flatten`` order;
    with ``names``, only those."""
    blocks, at = [], 0
    for name in sorted(like):
        shape = tuple(like[name].shape)
        if len(shape) == 2 and shape[0] > 0 and shape[1] > 0 and (names is None or name in names):
            blocks.append(RowBlock(name, at, shape[0], shape[1]))
        at += math.prod(shape)
    return blocks


def absent_tokens(arrays: Iterable[np.ndarray | torch.Tensor], vocab_size: int) -> np.ndarray:
    """(vocab_size,) bool: True for each token id that none of the integer arrays holds.

    Ids outside [0, vocab_size) (an ignore index such as −100) are not tokens and are skipped.
    """
    seen = np.zeros(vocab_size, dtype=bool)
    for arr in arrays:
        ids = np.asarray(arr).reshape(-1)
        ids = ids[(ids >= 0) & (ids < vocab_size)]
        seen |= np.bincount(ids, minlength=vocab_size).astype(bool)
    return ~seen


@dataclass(frozen=True)
class UpdateScore:
    index: int  # position in the list of updates given to score_updates
    norm: float  # ‖u‖
    distance: float  # ‖u − a‖ to the robust aggregate a
    cosine: float  # ⟨u, a⟩ / (‖u‖‖a‖) in [−1, 1]; 0.0 when u or a is zero
    norm_ratio: float  # ‖u‖ / median_j ‖u_j‖
    distance_ratio: float  # ‖u − a‖ / median_j ‖u_j − a‖
    krum_score: float | None  # None when not asked for (krum_f None) or R ≤ 2f + 2
    spread_alignment: float = 0.0  # cos(u − a, σ); 0.0 when either is zero
    spread_shift: float = 0.0  # spread_alignment minus the median update's
    spread_z: float = 0.0  # spread_shift over the robust spread of the shifts (1.4826 × median |shift|)
    row_ratio: float | None = None  # None when no 2-D tensors were given
    row: str = ""  # where row_ratio peaks: "name[row]"
    absent_row_ratio: float | None = None  # row ratio over rows of tokens its data lacks; None: unknown
    absent_row: str = ""  # where absent_row_ratio peaks: "name[token id]"


def _ratio(x: float, median: float) -> float:
    # A zero median (half the updates zero, or equal to the aggregate): zero is "typical", anything else is not.
    if median > 0:
        return x / median
    return 1.0 if x == 0 else math.inf


def _robust_z(x: float, sd: float) -> float:
    # A zero scale (at least half the shifts are zero): zero is typical, any other shift is not.
    if sd > 0:
        return x / sd
    return 0.0 if x == 0 else math.copysign(math.inf, x)


def _median(values: Sequence[float]) -> float:
    s = sorted(values)
    k = len(s)
    return s[k // 2] if k % 2 else (s[k // 2 - 1] + s[k // 2]) * 0.5


def score_updates(
    updates: Sequence[torch.Tensor],
    aggregate: torch.Tensor,
    *,
    krum_f: int | None = None,
    rows: Sequence[RowBlock] = (),
    tokens: Sequence[RowBlock] = (),
    absent: Sequence[np.ndarray | None] | None = None,
    chunk: int = DEFAULT_CHUNK,
) -> list[UpdateScore]:
    """Score each of R flat float32 updates (N,) against the (N,) aggregate.

    One pass over the updates; one more with Krum and one more over ``rows`` (the
    2-D tensors, :func:`row_blocks`) for the row ratio, and over ``tokens`` (the tensors
    whose row t is token t's) for the absent-row ratio: ``absent[i]``, a boolean array
    over token ids, is True for the tokens update i's data does not contain (None: not known).
    """
    if absent is not None and len(absent) != len(updates):
        raise ValueError(f"absent has {len(absent)} entries for {len(updates)} updates")
    stack = UpdateStack(updates, chunk=chunk)
    if aggregate.dim() != 1 or aggregate.numel() != stack.size:
        raise AggregationError(
            f"aggregate has shape {list(aggregate.shape)}; the updates need [{stack.size}]"
        )
    agg = aggregate.detach().cpu().to(torch.float64).numpy()  # (N,) float64
    sq, dot, dist, sdot = TreeSum(stack.r), TreeSum(stack.r), TreeSum(stack.r), TreeSum(stack.r)
    # Spread alignment and row ratios compare an update with the median one: with two updates
    # (or one) there is no majority to differ from, and both are left at their neutral values.
    majority = stack.r >= MAJORITY
    agg_sq, spread_sq = TreeSum(1), TreeSum(1)
    for a, b in stack.spans():
        x = stack.rows(a, b)  # (R, c)
        g = agg[a:b] + 0.0  # (c,), −0.0 normalised like the updates
        agg_sq.add((g * g)[None, :])
        t = x * g  # (R, c): the one scratch buffer besides x
        dot.add(t)
        sq.add(np.multiply(x, x, out=t))
        x -= g  # residuals
        if majority:
            np.abs(x, out=t)
            spread = t[0].copy()
            for k in range(1, stack.r):  # row by row, in order: the same bits on any machine
                spread += t[k]
            spread /= stack.r  # σ: mean |u_kj − a_j| over the updates
            spread_sq.add((spread * spread)[None, :])
            sdot.add(np.multiply(x, spread, out=t))
        dist.add(np.square(x, out=x))
    norms = np.sqrt(sq.total())
    distances = np.sqrt(dist.total())
    agg_norm = math.sqrt(float(agg_sq.total()[0]))
    spread_norm = math.sqrt(float(spread_sq.total()[0])) if majority else 0.0
    dots, sdots = dot.total(), sdot.total() if majority else np.zeros(stack.r)
    if not (np.isfinite(norms).all() and np.isfinite(distances).all() and math.isfinite(agg_norm)):
        raise AggregationError("updates or aggregate hold NaN or infinite values; reject them before scoring")
    alignment = [
        max(-1.0, min(1.0, float(sdots[i]) / (float(distances[i]) * spread_norm)))
        if distances[i] > 0 and spread_norm > 0
        else 0.0
        for i in range(stack.r)
    ]
    med_alignment = _median(alignment)
    shifts = [a - med_alignment for a in alignment]
    # How far each shift lies out among the stage's shifts, in robust standard deviations
    # (the median absolute shift, scaled to a normal's sd): honest shifts scatter more early
    # in training and on data that differs between pools, and this scale moves with them.
    shift_sd = 1.4826 * _median([abs(s) for s in shifts])
    row_ratio = absent_ratio = None
    row_at: list[str] = [""] * stack.r
    absent_at: list[str] = [""] * stack.r
    if majority and (rows or (tokens and absent is not None)):
        done: dict[int, np.ndarray] = {}  # block offset → its row norms: a block in both lists once

        def norms_of(blocks: Sequence[RowBlock]) -> list[np.ndarray]:
            for blk in blocks:
                if blk.offset not in done:
                    done[blk.offset] = _row_norms(stack, agg, blk)
            return [done[blk.offset] for blk in blocks]

        if rows:
            row_ratio, row_at = _row_ratios(norms_of(rows), rows)
        if tokens and absent is not None:
            absent_ratio, absent_at = _row_ratios(norms_of(tokens), tokens, only=_widely_absent(absent))

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
                spread_alignment=alignment[i],
                spread_shift=shifts[i],
                spread_z=_robust_z(shifts[i], shift_sd) if majority else 0.0,
                row_ratio=None if row_ratio is None else row_ratio[i],
                row=row_at[i],
                absent_row_ratio=None if absent_ratio is None else absent_ratio[i],
                absent_row=absent_at[i],
            )
        )
    return scores


def _widely_absent(absent: Sequence[np.ndarray | None]) -> list[np.ndarray | None]:
    """Each known mask narrowed to the tokens at least half of the known masks lack too.

    Those rows are moved by every pool only as an unseen token's is (its logit pushed down),
    so their median residual is that common move. A token most pools' data hold is moved by
    them from data, and a pool lacking it differs from them more and more as training goes
    on (absent-row ratios rising to 3.6 in six rounds on the demo corpus, against at most 1.7
    over the tokens most pools lack).
    """
    known = [m for m in absent if m is not None]
    if not known:
        return list(absent)
    widely = 2 * np.sum(known, axis=0) >= len(known)
    return [None if m is None else m & widely for m in absent]


def _row_norms(stack: UpdateStack, agg: np.ndarray, blk: RowBlock) -> np.ndarray:
    """(R, rows): ‖u_i − a‖ over each row of one 2-D tensor."""
    if blk.offset + blk.rows * blk.cols > stack.size:
        raise AggregationError(f"tensor {blk.name} runs past the end of the {stack.size}-element updates")
    out = np.empty((stack.r, blk.rows))
    per = max(1, stack.chunk // blk.cols)  # rows per piece
    for r0 in range(0, blk.rows, per):
        r1 = min(blk.rows, r0 + per)
        a, b = blk.offset + r0 * blk.cols, blk.offset + r1 * blk.cols
        x = stack.rows(a, b)
        x -= agg[a:b] + 0.0
        np.square(x, out=x)
        out[:, r0:r1] = np.sqrt(tree_sum(x.reshape(stack.r, r1 - r0, blk.cols)))
    return out


def _row_ratios(
    norms: Sequence[np.ndarray],
    blocks: Sequence[RowBlock],
    only: Sequence[np.ndarray | None] | None = None,
) -> tuple[list[float | None], list[str]]:
    """Per update, the largest row ratio over ``blocks`` and where it is (see the module docstring).

    ``norms[k]`` is :func:`_row_norms` of ``blocks[k]``. With ``only``, update i's ratios count
    only in the rows where ``only[i]`` is True (None: the update gets no ratio).
    """
    r = norms[0].shape[0]
    medians = [np.median(n, axis=0) for n in norms]  # (rows,) per block: order statistics, exact
    floor = ROW_FLOOR * float(np.median(np.concatenate(medians)))
    best: list[float | None] = [0.0 if only is None or only[i] is not None else None for i in range(r)]
    where = [""] * r
    for blk, n, med in zip(blocks, norms, medians, strict=True):
        den = np.maximum(med, floor)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(den > 0, n / np.where(den > 0, den, 1.0), np.where(n > 0, np.inf, 1.0))
        for i in range(r):
            row_ratio = ratio[i]
            if only is not None:
                mask = only[i]
                if mask is None:
                    continue
                if mask.shape != (blk.rows,):
                    raise ValueError(
                        f"{blk.name} has {blk.rows} token rows; the absent-token mask has {mask.shape}"
                    )
                row_ratio = np.where(mask, row_ratio, 0.0)
            top = int(row_ratio.argmax())  # the first row with the largest ratio
            value = float(row_ratio[top])
            if value > (best[i] or 0.0):
                best[i], where[i] = value, f"{blk.name}[{top}]"
    return best, where


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
    - ``max_spread_shift``, ``max_row_ratio`` and ``max_absent_row_ratio``: off (None)
      here; the job default (``coordinator.defence.TUNED_DETECTION``) sets the spread
      and absent-row checks (the row check is opt-in), tuned on bench/defence.py and
      ``panal simulate`` runs on the demo corpus.
      A spread shift is rejected only when it is also ``min_spread_z`` (4) robust
      standard deviations out among the stage's shifts (1.4826 × their median absolute
      value): how far honest alignments scatter depends on the data and the phase of
      training (within ±0.04 on bench/defence.py's stream, ±0.11 in the first rounds
      on the demo corpus, where pools' shards differ), and in these units honest pools
      stayed within ±3.4 (those past ±2.4 with shifts under 0.03) and ALIE beyond ±5.4
      on both. And only among
      ``min_spread_updates`` (8) or more updates: with fewer the aggregate is close to
      a median of them, and the scale of a few shifts means little.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    enabled: bool = True
    min_cosine: float = Field(default=0.0, ge=-1, le=1)
    max_norm_ratio: float = Field(default=3.0, gt=1)
    min_norm_ratio: float = Field(default=0.25, ge=0, lt=1)
    max_distance_ratio: float = Field(default=3.0, gt=1)
    max_spread_shift: float | None = Field(default=None, gt=0, le=2)
    min_spread_z: float = Field(default=4.0, gt=0)
    min_spread_updates: int = Field(default=8, ge=3)
    max_row_ratio: float | None = Field(default=None, gt=1)
    max_absent_row_ratio: float | None = Field(default=None, gt=1)


@dataclass(frozen=True)
class Verdict:
    index: int
    accepted: bool
    reasons: tuple[str, ...]  # why it was rejected; empty when accepted


def judge(scores: Sequence[UpdateScore], policy: DetectionPolicy) -> list[Verdict]:
    """One verdict per score (all the updates of one stage): rejected with every reason that applies, or accepted."""
    spread_check = policy.max_spread_shift is not None and len(scores) >= policy.min_spread_updates
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
            if (
                spread_check
                and policy.max_spread_shift is not None
                and abs(s.spread_shift) > policy.max_spread_shift
                and abs(s.spread_z) > policy.min_spread_z
            ):
                reasons.append(
                    f"residual aligned {s.spread_alignment:+.2f} with the per-coordinate spread of the updates, "
                    f"{s.spread_shift:+.2f} off the median update ({s.spread_z:+.1f} robust standard deviations; "
                    f"limits ±{policy.max_spread_shift:.2f} and ±{policy.min_spread_z:.1f}): every coordinate "
                    "pushed the same way, as 'a little is enough' does"
                )
            if (
                policy.max_row_ratio is not None
                and s.row_ratio is not None
                and s.row_ratio > policy.max_row_ratio
            ):
                reasons.append(
                    f"row {s.row} moved {s.row_ratio:.1f}× as far from the aggregate as the median update "
                    f"moves it (limit {policy.max_row_ratio:.1f}×): a change the other pools do not make, "
                    "as a trigger-token backdoor does"
                )
            if (
                policy.max_absent_row_ratio is not None
                and s.absent_row_ratio is not None
                and s.absent_row_ratio > policy.max_absent_row_ratio
            ):
                reasons.append(
                    f"row {s.absent_row}, of a token its assigned data does not contain, moved "
                    f"{s.absent_row_ratio:.1f}× as far from the aggregate as the median update moves it "
                    f"(limit {policy.max_absent_row_ratio:.1f}×): training on its own data moves such a row "
                    "only as every pool's does; a trigger-token backdoor moves it far more"
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
