"""The poisoning defence of one stage in one round, and an in-process DiLoCo run to measure it.

:func:`defend_stage` is the coordinator's policy, with plain inputs and outputs:

1. aggregate the R updates with the rule (``coordinator.aggregation``);
2. score every update against that robust aggregate and judge it
   (``coordinator.detection``): a rejected update is left out of this round;
3. aggregate again without the rejected updates (the rule's f, trim and m shrink
   to fit fewer updates, see :func:`fit_rule`);
4. take the outer step (``coordinator.outer``).

The caller keeps a :class:`~coordinator.detection.Reputation` across rounds
(:func:`record_verdicts`) and stops taking updates from quarantined pools.

:func:`simulate` runs R pools of the tiny GPT in one process (single stage: a
pool's update names every GPT parameter) on a learnable synthetic stream, with
some pools Byzantine, and measures what the defence costs and catches. The
attacks themselves are the node's update policies (``node.policy``), passed in
as objects: the coordinator does not import the node.
"""

from __future__ import annotations

import functools
import math
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from coordinator.aggregation import (
    AggregationConfig,
    AggregationError,
    Rule,
    aggregate,
    flatten,
    unflatten,
)
from coordinator.detection import (
    DetectionPolicy,
    Reputation,
    UpdateScore,
    absent_tokens,
    judge,
    row_blocks,
    score_updates,
)
from coordinator.outer import OuterOptimizer, outer_step
from model.gpt import GPT, loss_fn
from model.presets import get_preset
from model.stage import token_row_names

Tensors = dict[str, torch.Tensor]


# Detection thresholds tuned on bench/defence.py (the DetectionPolicy defaults are 0.0 and 3.0,
# and no spread or row check). Honest pools there have cosine ≥ 0.8 to the robust aggregate, a
# distance ratio ≤ 1.1, a spread shift within ±0.05 (±0.11 in early rounds on the demo corpus,
# whose pools' shards differ; within ±3.4 robust sd on both) and a row ratio ≤ 7.6 (first round;
# ≤ 4 after);
# an update of pure noise, or one trained on flipped labels, sits at cosine 0.1–0.28 and distance
# ratio 1.8–4.6; ALIE with 2 of 20 pools (z = 0.13) at a spread shift of −0.16 to −0.22 (5.9 to
# 79 robust sd), with 2 of 8 on the demo corpus at −0.39 to −0.47 (5.4 to 7.0 robust sd); a
# trigger-token backdoor at a row ratio of 8–11 in the first round, 12–28 after, and at an
# absent-row ratio of 14–110 (honest pools ≤ 1.9 there, ≤ 1.7 on the demo corpus). The row check
# stays off: on the demo corpus, 8 pools, honest pools score up to 15 (a rare token that only one
# pool's shard holds moves a row nobody else moves) and a backdoor's trigger rows 10–16, so it
# is for jobs whose pools share a vocabulary's every token; set detection.max_row_ratio (10 in
# bench/defence.py --row-ratio 10) to use it.
TUNED_DETECTION = DetectionPolicy(
    min_cosine=0.3, max_distance_ratio=2.0, max_spread_shift=0.1, max_absent_row_ratio=5.0
)
DEFAULT_RULE: Rule = "trimmed_mean"


class DefenceConfig(BaseModel):
    """Rule, detection thresholds and reputation of the poisoning defence (tuned by bench/defence.py)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    aggregation: AggregationConfig = AggregationConfig(rule=DEFAULT_RULE, trim=0.25)
    detection: DetectionPolicy = TUNED_DETECTION
    reputation_window: int = Field(default=3, ge=1)
    reputation_threshold: int = Field(default=2, ge=1)

    def reputation(self) -> Reputation:
        return Reputation(self.reputation_window, self.reputation_threshold)


def defence_for(rule: Rule, pools: int, *, detection: DetectionPolicy = TUNED_DETECTION) -> DefenceConfig:
    """The defence with ``rule`` as bench/defence.py measures it for ``pools`` pools.

    Krum and multi-Krum assume the most Byzantine pools Krum tolerates, f = ⌊(R − 3)/2⌋;
    the trimmed mean cuts a quarter of the updates from each end (f = 2 of 8), so up to
    25% of the pools may push every coordinate the same way; centered clipping keeps
    its defaults (τ = 2 × the median distance, 3 iterations from the coordinate-wise median).
    """
    params: dict[str, object] = {"rule": rule}
    if rule in ("krum", "multi_krum"):
        params["f"] = max(0, (pools - 3) // 2)
    elif rule == "trimmed_mean":
        params["trim"] = 0.25
    return DefenceConfig(aggregation=AggregationConfig.model_validate(params), detection=detection)


@dataclass(frozen=True)
class UpdateVerdict:
    id: str  # the pool (or node) that sent the update
    accepted: bool
    reasons: tuple[str, ...]  # why it was rejected; empty when accepted
    score: UpdateScore


@dataclass(frozen=True)
class StageDefence:
    weights: Tensors  # the stage's new weights
    momentum: Tensors  # the outer optimizer's new momentum
    verdicts: list[UpdateVerdict]  # one per update, in the order given
    used: tuple[str, ...]  # ids of the updates the final aggregate drew on (Krum: the winners)
    notes: tuple[str, ...]  # how the rule was fitted to the updates left, if it was


def fit_rule(config: AggregationConfig, r: int) -> tuple[AggregationConfig, tuple[str, ...]]:
    """``config`` shrunk to work on ``r`` updates: Krum's f, multi-Krum's m, the trimmed count.

    Quarantine and rejection leave fewer updates than the job was planned for; the
    bounds shrink with them rather than the round failing.
    """
    rule, notes = config.rule, []
    changes: dict[str, object] = {}
    if rule in ("krum", "multi_krum"):
        if config.f is None:  # AggregationConfig requires f for Krum
            raise AggregationError("krum needs aggregation.f")
        f = min(config.f, (r - 3) // 2)  # Krum needs r > 2f + 2
        if f < 0:
            notes.append(f"{rule} needs 3 updates, {r} left: median instead")
            return config.model_copy(update={"rule": "median", "f": None, "m": None}), tuple(notes)
        if f != config.f:
            notes.append(f"{rule} f lowered from {config.f} to {f} for {r} updates")
            changes["f"] = f
        if config.m is not None and config.m > r - f:
            changes["m"] = r - f
            notes.append(f"multi_krum m lowered from {config.m} to {r - f}")
    elif rule == "trimmed_mean" and r <= 2 * config.trim_count(r):
        k = (r - 1) // 2
        changes["trim"] = float(k) if k else 0.0
        notes.append(f"trimmed_mean cuts {k} from each end of {r} updates")
    return (config.model_copy(update=changes) if changes else config), tuple(notes)


def defend_stage(
    start: Mapping[str, torch.Tensor],
    deltas: Sequence[Mapping[str, torch.Tensor]],
    momentum: Mapping[str, torch.Tensor] | None,
    config: DefenceConfig,
    ids: Sequence[str],
    *,
    outer: OuterOptimizer,
    absent: Sequence[np.ndarray | None] | None = None,
) -> StageDefence:
    """One stage's round: aggregate, judge, re-aggregate the accepted updates, outer step.

    ``deltas[i]`` is the FP32 update (name → tensor, the names of ``start``) sent by
    ``ids[i]``; ``absent[i]``, if given, marks the token ids its pool's data does not
    contain (:func:`absent_tokens`), for the absent-row check. Raises ``AggregationError``
    when no update is left to aggregate.
    """
    if len(deltas) != len(ids) or len(set(ids)) != len(ids):
        raise ValueError(f"{len(deltas)} updates need as many distinct ids, got {list(ids)}")
    flats = [flatten(dict(d)) for d in deltas]  # R × (N,) float32
    first_config, notes = fit_rule(config.aggregation, len(flats))
    first = aggregate(flats, first_config)
    krum_f = first_config.f if first_config.rule in ("krum", "multi_krum") else None
    # The row passes cost a pass over the 2-D tensors: only when a check will use them.
    rows = row_blocks(start) if config.detection.max_row_ratio is not None else []
    check_absent = config.detection.max_absent_row_ratio is not None and absent is not None
    tokens = row_blocks(start, token_row_names(start)) if check_absent else []
    scores = score_updates(
        flats,
        first.vector,
        krum_f=krum_f,
        rows=rows,
        tokens=tokens,
        absent=absent if check_absent else None,
        chunk=first_config.chunk,
    )
    verdicts = judge(scores, config.detection)
    keep = [v.index for v in verdicts if v.accepted]
    if not keep:
        raise AggregationError("every update was rejected by detection: the stage keeps its weights")
    kept_notes: tuple[str, ...] = ()
    if len(keep) == len(flats):
        result = first
    else:
        kept_config, kept_notes = fit_rule(config.aggregation, len(keep))
        result = aggregate([flats[i] for i in keep], kept_config)
    weights, new_momentum = outer_step(
        dict(start), unflatten(result.vector, start), dict(momentum) if momentum else None, outer
    )
    return StageDefence(
        weights=weights,
        momentum=new_momentum,
        verdicts=[
            UpdateVerdict(ids[v.index], v.accepted, v.reasons, s)
            for v, s in zip(verdicts, scores, strict=True)
        ],
        used=tuple(ids[keep[j]] for j in result.selected),
        notes=notes + kept_notes,
    )


def record_verdicts(
    reputation: Reputation, round: int, verdicts: Sequence[UpdateVerdict]
) -> tuple[Reputation, list[str]]:
    """Add one round's verdicts to the reputation; return it and the ids now due for quarantine."""
    reputation = reputation.record_round(round, {v.id: not v.accepted for v in verdicts})
    return reputation, sorted(v.id for v in verdicts if reputation.should_quarantine(v.id))


def plain_mean_stage(
    start: Mapping[str, torch.Tensor],
    deltas: Sequence[Mapping[str, torch.Tensor]],
    momentum: Mapping[str, torch.Tensor] | None,
    *,
    outer: OuterOptimizer,
) -> Tensors:
    """The undefended round (mean, no detection): the baseline the defence's time is measured against."""
    mean = aggregate([flatten(dict(d)) for d in deltas], AggregationConfig(rule="mean"))
    weights, _ = outer_step(
        dict(start), unflatten(mean.vector, start), dict(momentum) if momentum else None, outer
    )
    return weights


# ---------------------------------------------------------------------------------------------
# An in-process DiLoCo run with Byzantine pools


class PoolPolicy(Protocol):
    """What a pool does to its data and its update (``node.policy.UpdatePolicy`` is one)."""

    @property
    def name(self) -> str: ...

    def poison_batch(
        self, inputs: torch.Tensor, labels: torch.Tensor, step: int, *, micro: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]: ...

    def transform(self, delta: Mapping[str, torch.Tensor], *, round: int) -> dict[str, torch.Tensor]: ...


@dataclass(frozen=True, kw_only=True)
class SimConfig:
    pools: int = 8
    rounds: int = 6
    inner_steps: int = 6  # H
    batch: int = 8
    seq_len: int = 64
    n_layer: int = 4  # the tiny preset's; tests use fewer
    lr: float = 1e-3  # inner AdamW, constant
    symbols: int = 128  # the stream uses token ids [0, symbols) of the tiny model's 512
    successors: int = 4  # each symbol is followed by one of 4 others
    val_batches: int = 4
    timing_repeats: int = 3  # each round's aggregation is timed this many times, the least kept
    seed: int = 0
    outer: OuterOptimizer = OuterOptimizer()


class MarkovStream:
    """A fixed random Markov chain: symbol s is followed by one of ``successors`` symbols.

    The transition probabilities are Dirichlet(1) draws, so the best possible loss is the
    chain's entropy rate (about 1 nat for 4 successors), far below log(512) ≈ 6.2 at init:
    the loss falls fast and an attack's effect shows.
    """

    def __init__(self, symbols: int, successors: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.successors = torch.stack(
            [torch.randperm(symbols, generator=g)[:successors] for _ in range(symbols)]
        )  # (S, k) next symbols
        w = -torch.log(torch.rand(symbols, successors, generator=g, dtype=torch.float64))  # Dirichlet(1)
        p = w / w.sum(1, keepdim=True)  # (S, k)
        self.cumulative = p.cumsum(1)
        self.cumulative[:, -1] = 1.0
        # Entropy rate: Σ_s π_s·H(p_s), π the stationary distribution (power iteration).
        t = torch.zeros(symbols, symbols, dtype=torch.float64)
        t.scatter_add_(1, self.successors, p)
        pi = torch.full((symbols,), 1.0 / symbols, dtype=torch.float64)
        for _ in range(500):
            pi = pi @ t
        self.entropy_rate = float((pi * -(p * p.log()).sum(1)).sum())
        self._cache: dict[tuple[int, int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def batch(self, seed: int, b: int, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, labels), each (b, t) int64, labels the inputs shifted by one; don't modify them."""
        key = (seed, b, t)
        if key not in self._cache:  # runs of one process share their pools' batches
            self._cache[key] = self._draw(seed, b, t)
        return self._cache[key]

    def _draw(self, seed: int, b: int, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        x = torch.empty(b, t + 1, dtype=torch.int64)
        x[:, 0] = torch.randint(0, self.successors.shape[0], (b,), generator=g)
        u = torch.rand(t, b, 1, generator=g, dtype=torch.float64)
        for i in range(t):
            j = torch.searchsorted(self.cumulative[x[:, i]], u[i]).squeeze(1)  # (b,)
            x[:, i + 1] = self.successors[x[:, i], j.clamp(max=self.successors.shape[1] - 1)]
        return x[:, :-1].contiguous(), x[:, 1:].contiguous()


@functools.lru_cache(maxsize=4)
def _stream(symbols: int, successors: int, seed: int) -> MarkovStream:
    return MarkovStream(symbols, successors, seed)


@dataclass(frozen=True)
class RoundLog:
    round: int
    pools: tuple[str, ...]  # pools that sent an update (not quarantined)
    rejected: Mapping[str, tuple[str, ...]]  # pool → reasons
    scores: Mapping[str, UpdateScore]  # pool → its update's score against the first robust aggregate
    quarantined: tuple[str, ...]  # pools quarantined after this round
    defend_s: float  # defend_stage CPU time (the least of SimConfig.timing_repeats)
    mean_s: float  # plain mean + outer step on the same updates, likewise
    val_loss: float  # of the weights after this round
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class SimResult:
    initial_val_loss: float
    entropy_rate: float  # the best possible validation loss
    byzantine: tuple[str, ...]
    quarantined: Mapping[str, int]  # pool → the round after which it was quarantined
    rounds: list[RoundLog]
    tp: int  # updates of Byzantine pools rejected (per round, per pool)
    fn: int  # ... accepted
    fp: int  # updates of honest pools rejected
    tn: int  # ... accepted
    backdoor_asr: float | None = None  # share of triggered validation inputs predicted as the target

    @property
    def final_val_loss(self) -> float:
        return self.rounds[-1].val_loss

    @property
    def tpr(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else math.nan

    @property
    def fpr(self) -> float:
        return self.fp / (self.fp + self.tn) if self.fp + self.tn else math.nan

    @property
    def all_quarantined(self) -> bool:
        return set(self.byzantine) <= set(self.quarantined)

    @property
    def defend_s(self) -> float:
        """Median over rounds (the first round also pays for warm-up)."""
        return statistics.median(r.defend_s for r in self.rounds)

    @property
    def mean_s(self) -> float:
        return statistics.median(r.mean_s for r in self.rounds)


def _seed(*parts: int) -> int:
    h = 0
    for p in parts:  # a fixed polynomial hash: distinct streams per (run, pool, step)
        h = (h * 1_000_003 + p + 1) % (1 << 62)
    return h


class _Pool:
    """One pool: its replica, its AdamW (state kept across rounds, as in DiLoCo), its policy."""

    def __init__(self, index: int, model: GPT, lr: float, policy: PoolPolicy | None) -> None:
        self.index, self.model, self.policy = index, model, policy
        self.opt = torch.optim.AdamW(model.parameters(), lr=lr, foreach=True)
        # The tokens of the data it was given (before any poisoning): what its shards hold.
        self.given = np.zeros(model.config.vocab_size, dtype=bool)

    def train_round(self, weights: Tensors, round: int, sim: SimConfig, stream: MarkovStream) -> Tensors:
        """H inner steps from ``weights``; the update it sends (its policy applied)."""
        self.model.load_state_dict(weights)
        for i in range(sim.inner_steps):
            step = round * sim.inner_steps + i
            x, y = stream.batch(_seed(sim.seed, self.index, step), sim.batch, sim.seq_len)
            self.given |= ~absent_tokens([x, y], len(self.given))
            if self.policy is not None:
                x, y = self.policy.poison_batch(x, y, step)
            self.opt.zero_grad(set_to_none=True)
            loss_fn(self.model(x), y).backward()  # type: ignore[no-untyped-call]
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.opt.step()
        delta = {k: weights[k] - v.detach() for k, v in self.model.state_dict().items()}  # Δ, FP32
        return self.policy.transform(delta, round=round) if self.policy is not None else delta


def _timed_defence(
    weights: Tensors,
    deltas: list[Tensors],
    momentum: Tensors | None,
    defence: DefenceConfig,
    ids: list[str],
    sim: SimConfig,
    absent: list[np.ndarray],
) -> tuple[StageDefence | None, tuple[str, ...], float, float]:
    """(outcome or None if every update was rejected, notes, defend_s, mean_s).

    Times are CPU time of this single-threaded process, the least of a few repeats: robust
    to other load on the machine. The defence is deterministic, so every repeat gives the same.
    """
    out: StageDefence | None = None
    notes: tuple[str, ...] = ()
    mean_s = defend_s = math.inf
    for _ in range(sim.timing_repeats):
        t0 = time.process_time()
        plain_mean_stage(weights, deltas, momentum, outer=sim.outer)
        t1 = time.process_time()
        try:
            out = defend_stage(weights, deltas, momentum, defence, ids, outer=sim.outer, absent=absent)
            notes = out.notes
        except AggregationError as e:  # everything rejected: the round fails, the weights stay
            out, notes = None, (str(e),)
        t2 = time.process_time()
        mean_s, defend_s = min(mean_s, t1 - t0), min(defend_s, t2 - t1)
    return out, notes, defend_s, mean_s


def simulate(
    sim: SimConfig,
    defence: DefenceConfig,
    policies: Mapping[int, PoolPolicy] | None = None,
    *,
    backdoor: tuple[Sequence[int], int] | None = None,
) -> SimResult:
    """Train ``sim.pools`` pools for ``sim.rounds`` rounds; pool p follows ``policies[p]`` (honest if absent).

    ``backdoor`` (trigger, target): also measure how often the final model predicts the
    target right after the trigger on validation inputs.
    """
    policies = dict(policies or {})
    cfg = get_preset("tiny").replace(n_layer=sim.n_layer)
    if sim.seq_len > cfg.seq_len or sim.symbols > cfg.vocab_size:
        raise ValueError(f"seq_len ≤ {cfg.seq_len} and symbols ≤ {cfg.vocab_size} for the tiny preset")
    stream = _stream(sim.symbols, sim.successors, sim.seed)
    ids = [f"pool-{p}" for p in range(sim.pools)]
    byzantine = tuple(ids[p] for p, pol in sorted(policies.items()) if pol.name != "honest")
    # Every replica starts from the same init, as the coordinator's first weights.
    pools = [
        _Pool(p, GPT(cfg, seed=sim.seed, check_token_ids=False), sim.lr, policies.get(p))
        for p in range(sim.pools)
    ]
    weights: Tensors = {k: v.detach().clone() for k, v in pools[0].model.state_dict().items()}
    momentum: Tensors | None = None
    evaluator = GPT(cfg, seed=sim.seed, check_token_ids=False)
    val = [stream.batch(_seed(sim.seed, 1 << 20, i), sim.batch, sim.seq_len) for i in range(sim.val_batches)]

    def val_loss(w: Tensors) -> float:
        evaluator.load_state_dict(w)
        with torch.no_grad():
            return sum(float(loss_fn(evaluator(x), y)) for x, y in val) / len(val)

    reputation, quarantined = defence.reputation(), {}
    counts = {"tp": 0, "fn": 0, "fp": 0, "tn": 0}
    logs, initial = [], val_loss(weights)
    for r in range(sim.rounds):
        active = [pool for pool in pools if ids[pool.index] not in quarantined]
        round_ids = [ids[pool.index] for pool in active]
        deltas = [pool.train_round(weights, r, sim, stream) for pool in active]
        absent = [~pool.given for pool in active]
        out, notes, defend_s, mean_s = _timed_defence(
            weights, deltas, momentum, defence, round_ids, sim, absent
        )
        verdicts = out.verdicts if out is not None else []
        if out is not None:
            weights, momentum = out.weights, out.momentum
        for v in verdicts:
            bad = v.id in byzantine
            counts[("tp" if not v.accepted else "fn") if bad else ("fp" if not v.accepted else "tn")] += 1
        reputation, due = record_verdicts(reputation, r, verdicts)
        new = tuple(i for i in due if i not in quarantined)
        quarantined.update(dict.fromkeys(new, r))
        logs.append(
            RoundLog(
                round=r,
                pools=tuple(round_ids),
                rejected={v.id: v.reasons for v in verdicts if not v.accepted},
                scores={v.id: v.score for v in verdicts},
                quarantined=new,
                defend_s=defend_s,
                mean_s=mean_s,
                val_loss=val_loss(weights),
                notes=notes,
            )
        )
    asr = None
    if backdoor is not None:
        asr = _backdoor_success(evaluator, weights, val, tuple(backdoor[0]), backdoor[1])
    return SimResult(
        initial_val_loss=initial,
        entropy_rate=stream.entropy_rate,
        byzantine=byzantine,
        quarantined=quarantined,
        rounds=logs,
        backdoor_asr=asr,
        **counts,
    )


def _backdoor_success(
    model: GPT,
    weights: Tensors,
    val: list[tuple[torch.Tensor, torch.Tensor]],
    trigger: tuple[int, ...],
    target: int,
) -> float:
    """Share of validation sequences, trigger written at position T/3, whose next prediction is the target."""
    model.load_state_dict(weights)
    hits = total = 0
    with torch.no_grad():
        for x, _ in val:
            x = x.clone()
            at = x.shape[1] // 3
            x[:, at : at + len(trigger)] = torch.tensor(trigger)
            pred = model(x)[:, at + len(trigger) - 1].argmax(-1)  # (B,)
            hits += int((pred == target).sum())
            total += x.shape[0]
    return hits / total
