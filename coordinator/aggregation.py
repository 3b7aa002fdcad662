"""Robust aggregation of one stage's R updates: pure, deterministic, chunked functions.

Each pool sends a pseudo-gradient per stage. Both node and coordinator turn a
stage's state dict into one flat float32 vector with :func:`flatten` (names
sorted, each tensor row-major); a rule maps the R flat updates, shape (R, N), to
one flat aggregate, shape (N,), and :func:`unflatten` gives the dict back.

Rules (``RULES``, chosen by ``AggregationConfig.rule``):

- ``mean``; ``median`` (coordinate-wise; the mean of the two middle values when R
  is even); ``trimmed_mean`` (per coordinate, drop the k smallest and k largest);
- ``krum`` (Blanchard et al. 2017): score_i = Σ of the squared distances to its
  R − f − 2 nearest other updates, keep the lowest; ``multi_krum``: the mean of
  the m lowest-scored;
- ``centered_clipping`` (Karimireddy, He & Jaggi 2021): from a center v,
  iterate v ← v + mean_i clip(x_i − v, τ) with clip(z, τ) = z·min(1, τ/‖z‖).

Before any rule an update may be norm-clipped (``ClipConfig``: to an absolute
norm or to a multiple of the median norm); the factor is applied as chunks are
read, so clipping makes no copy.

Determinism: the same inputs give bit-identical output on any machine, thread
count or chunk size. All arithmetic is float64 in numpy, elementwise (IEEE
correctly rounded, so independent of SIMD width and threads); nothing calls a
library reduction whose order is unspecified (torch's CPU ``sum`` splits work
by thread count and vector width). The only reductions are:
- over the R updates, per coordinate: sort the R values, then add them in sorted
  order, so the result is also independent of the order the updates arrive in
  (−0.0 is normalised to +0.0 first, so equal values are equal bits);
- over the parameter dimension (norms, distances, dot products): :class:`TreeSum`,
  a pairwise tree over power-of-two-aligned pairs, zero-padded. Chunks are
  powers of two, so a chunk is a subtree and the result does not depend on
  the chunk size.
Krum breaks exact score ties by the lower index, and so depends on input order
only when two different updates tie exactly.

Memory, with C the chunk (default 2^20 elements), N the stage size and R the
number of updates: inputs are read in place (numpy views of the caller's
tensors), the output is (N,) float32. Every rule first makes one pass for the
norms when clipping is asked for (else a float32 finiteness check), then holds one (R, C) float64 block at a
time plus at most as much scratch: peak ≈ 2 · 8·R·C bytes (128 MiB for R = 8).
Per rule: mean, median, trimmed mean: one more pass, the block sorted in place.
Krum, multi-Krum: a distance pass (one (C,) difference at a time, an (R, R)
matrix) and an output pass; time O(R²·N). Centered clipping: the center v,
(N,) float64 = 8·N bytes, and 2·iters passes (plus one for a median center).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple, get_args

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from storage.tensors import TensorSpec

DEFAULT_CHUNK = 1 << 20
Rule = Literal["mean", "median", "trimmed_mean", "krum", "multi_krum", "centered_clipping"]


class AggregationError(ValueError):
    """The updates cannot be aggregated as configured; the message says why and what to change."""


# ---------------------------------------------------------------------------------------------
# Flat views of a stage's state dict


def flatten(state: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """(N,) float32: the stage's float32 tensors, names sorted, each flattened row-major."""
    if not state:
        raise ValueError("cannot flatten an empty state dict")
    for name, t in state.items():
        if t.dtype != torch.float32:
            raise ValueError(f"tensor {name!r} is {t.dtype}; updates are float32 (decompress them first)")
    return torch.cat([state[name].detach().reshape(-1) for name in sorted(state)])


def unflatten(flat: torch.Tensor, like: Mapping[str, torch.Tensor | TensorSpec]) -> dict[str, torch.Tensor]:
    """Cut (N,) ``flat`` back into ``like``'s names and shapes (views into ``flat``, names sorted)."""
    shapes = {name: tuple(like[name].shape) for name in sorted(like)}
    total = sum(math.prod(s) for s in shapes.values())
    if flat.dim() != 1 or flat.numel() != total:
        raise ValueError(f"flat vector has shape {list(flat.shape)}; the state dict needs [{total}]")
    out, at = {}, 0
    for name, shape in shapes.items():
        n = math.prod(shape)
        out[name] = flat[at : at + n].view(shape)
        at += n
    return out


# ---------------------------------------------------------------------------------------------
# Deterministic building blocks


def tree_sum(x: np.ndarray) -> np.ndarray:
    """Sum the last axis of float64 ``x`` (..., c) as a pairwise tree, zero-padded to a power of two."""
    # Without the padding: an odd element out is carried up a level instead of added to a
    # zero, which is the same number (up to the sign of a zero, made + at the end).
    if x.shape[-1] == 0:
        return np.zeros(x.shape[:-1])
    while x.shape[-1] > 1:
        c = x.shape[-1]
        pairs = x[..., 0 : c - 1 : 2] + x[..., 1:c:2]  # elementwise: the same bits on any machine
        x = np.concatenate([pairs, x[..., c - 1 :]], axis=-1) if c % 2 else pairs
    return x[..., 0] + 0.0  # (...,); + 0.0 turns a −0.0 total into +0.0


class TreeSum:
    """Sums of K float64 series fed one power-of-two chunk at a time, as one pairwise tree.

    Each chunk's :func:`tree_sum` is a leaf; leaves merge like a binary counter
    (two subtrees of equal size make one of twice the size). :meth:`total` folds
    what is left from the right, which is exactly the tree over the whole series
    zero-padded to a power of two, so the result does not depend on the chunk size.
    """

    def __init__(self, k: int) -> None:
        self._k = k
        self._stack: list[tuple[int, np.ndarray]] = []  # (level, (K,) subtree sums), levels decreasing

    def add(self, chunk: np.ndarray) -> None:
        """Add one chunk, (K, c) float64; every chunk but the last must have the same power-of-two c."""
        self.add_leaf(tree_sum(chunk))

    def add_leaf(self, node: np.ndarray) -> None:
        """Add one chunk's (K,) tree sums, already computed."""
        level = 0
        while self._stack and self._stack[-1][0] == level:
            node = self._stack.pop()[1] + node  # left subtree + right subtree
            level += 1
        self._stack.append((level, node))

    def total(self) -> np.ndarray:
        acc = np.zeros(self._k)
        for i, (_, node) in enumerate(reversed(self._stack)):
            acc = node if i == 0 else node + acc
        return acc + 0.0


class UpdateStack:
    """R flat float32 updates, read chunk by chunk as float64 (R, c), each times its clip factor.

    Holds numpy views of the caller's tensors (no copy for contiguous CPU tensors).
    """

    def __init__(
        self, updates: Sequence[torch.Tensor], *, chunk: int, factors: Sequence[float] | None = None
    ) -> None:
        _check_chunk(chunk)
        if len(updates) < 1:
            raise AggregationError("no updates to aggregate: a round needs at least one accepted update")
        for i, u in enumerate(updates):
            if not isinstance(u, torch.Tensor) or u.dtype != torch.float32 or u.dim() != 1:
                what = f"{u.dtype} {list(u.shape)}" if isinstance(u, torch.Tensor) else type(u).__name__
                raise AggregationError(f"update {i} is {what}; expected a flat float32 vector (flatten())")
            if u.numel() != updates[0].numel():
                raise AggregationError(
                    f"update {i} has {u.numel()} elements, update 0 has {updates[0].numel()}: "
                    "updates of one stage must have the same tensors"
                )
        self.arrays = [u.detach().cpu().contiguous().numpy() for u in updates]  # R × (N,) float32
        self.factors = tuple(float(f) for f in factors) if factors is not None else (1.0,) * len(updates)
        self.r, self.size, self.chunk = len(updates), int(updates[0].numel()), chunk

    def spans(self) -> Iterator[tuple[int, int]]:
        for a in range(0, self.size, self.chunk):
            yield a, min(a + self.chunk, self.size)

    def rows(self, a: int, b: int, idx: Sequence[int] | None = None) -> np.ndarray:
        """(len(idx), b − a) float64: elements [a, b) of the chosen updates, clipped."""
        idx = range(self.r) if idx is None else idx
        out = np.empty((len(idx), b - a))
        for j, i in enumerate(idx):
            out[j] = self.arrays[i][a:b]  # float32 → float64 is exact
            if self.factors[i] != 1.0:
                out[j] *= self.factors[i]
        out += 0.0  # −0.0 → +0.0, so a sort never orders equal values differently
        return out


def _check_chunk(chunk: int) -> None:
    if not isinstance(chunk, int) or chunk < 1 or chunk & (chunk - 1):
        raise AggregationError(f"chunk must be a positive power of two, got {chunk!r}")


def _all_finite(arr: np.ndarray, chunk: int) -> bool:
    return all(bool(np.isfinite(arr[a : a + chunk]).all()) for a in range(0, arr.size, chunk))


def sq_norms(stack: UpdateStack) -> np.ndarray:
    """(R,) float64 ‖u_i‖², clip factors applied."""
    acc = TreeSum(stack.r)
    for a, b in stack.spans():
        x = stack.rows(a, b)
        acc.add(np.square(x, out=x))
    return acc.total()


def pairwise_sq_distances(stack: UpdateStack) -> np.ndarray:
    """(R, R) float64 ‖u_i − u_j‖², computed from the differences (no cancellation from norms)."""
    pairs = [(i, j) for i in range(stack.r) for j in range(i + 1, stack.r)]
    acc = TreeSum(len(pairs))
    for a, b in stack.spans():
        x = stack.rows(a, b)
        leaf = np.empty(len(pairs))
        for p, (i, j) in enumerate(pairs):
            d = x[i] - x[j]
            leaf[p] = tree_sum(np.square(d, out=d))
        acc.add_leaf(leaf)
    totals = acc.total()
    d2 = np.zeros((stack.r, stack.r))
    for p, (i, j) in enumerate(pairs):
        d2[i, j] = d2[j, i] = totals[p]
    return d2


def krum_scores(d2: np.ndarray, f: int) -> list[float]:
    """Krum score of each update: the sum of its R − f − 2 smallest squared distances to the others."""
    r = d2.shape[0]
    nearest = r - f - 2
    if nearest < 1 or r <= 2 * f + 2:
        raise AggregationError(
            f"krum with f={f} needs more than 2f+2 = {2 * f + 2} updates, got {r}: lower aggregation.f "
            "or require more pools per round"
        )
    return [math.fsum(sorted(float(d2[i, j]) for j in range(r) if j != i)[:nearest]) for i in range(r)]


def _sorted_mean(x: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """(c,) mean over rows lo..hi−1 of (k, c) ``x`` already sorted along axis 0, added in that order."""
    acc: np.ndarray = x[lo].copy()
    for j in range(lo + 1, hi):
        acc += x[j]
    acc /= hi - lo
    return acc


def _coordinatewise(
    stack: UpdateStack,
    reduce: Callable[[np.ndarray], np.ndarray],
    idx: Sequence[int] | None = None,
    dtype: type[np.floating[Any]] = np.float32,
) -> np.ndarray:
    """(N,) ``reduce`` of each chunk's values sorted per coordinate (k, c) → (c,)."""
    out = np.empty(stack.size, dtype=dtype)
    for a, b in stack.spans():
        x = stack.rows(a, b, idx)
        _sort_rows(x)  # in place: (k, c) sorted per coordinate
        out[a:b] = reduce(x)  # float64 → float32 rounds to nearest even
    return out


def _sort_rows(x: np.ndarray) -> None:
    """Sort (k, c) ``x`` along axis 0 in place; the same values as ``x.sort(axis=0)``.

    Two rows (two pools, the common small job) take one elementwise min/max, about
    six times faster than numpy's strided sort along axis 0.
    """
    if x.shape[0] == 2:
        low = np.minimum(x[0], x[1])
        np.maximum(x[0], x[1], out=x[1])
        x[0] = low
    elif x.shape[0] > 2:
        x.sort(axis=0)


def _median(x: np.ndarray) -> np.ndarray:
    k = x.shape[0]
    mid: np.ndarray = x[k // 2].copy() if k % 2 else (x[k // 2 - 1] + x[k // 2]) * 0.5
    return mid


# ---------------------------------------------------------------------------------------------
# Configuration and result


class ClipConfig(BaseModel):
    """Norm clipping of each update before the rule: u ← u · min(1, c / ‖u‖)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    mode: Literal["none", "absolute", "median"] = "none"
    max_norm: float | None = Field(default=None, gt=0)  # mode "absolute": c = max_norm
    multiple: float = Field(default=3.0, gt=0)  # mode "median": c = multiple × the median norm

    @model_validator(mode="after")
    def _needs_max_norm(self) -> ClipConfig:
        if self.mode == "absolute" and self.max_norm is None:
            raise ValueError(
                "aggregation.clip.max_norm is required with clip.mode 'absolute': set it to the largest "
                "pseudo-gradient L2 norm to let through, or use clip.mode 'median'"
            )
        return self


class AggregationConfig(BaseModel):
    """How one stage's updates are aggregated each round (a job's ``aggregation`` section)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    rule: Rule = "centered_clipping"
    f: int | None = Field(default=None, ge=0)  # krum / multi_krum: pools that may be Byzantine
    m: int | None = Field(default=None, ge=1)  # multi_krum: how many to average (default R − f)
    trim: float = Field(default=0.2, ge=0)  # trimmed_mean: fraction < 0.5 cut from each end, or a count ≥ 1
    clip: ClipConfig = ClipConfig()
    tau: float | None = Field(
        default=None, gt=0
    )  # centered_clipping radius; None: tau_multiple × median dist
    tau_multiple: float = Field(default=2.0, gt=0)
    iters: int = Field(default=3, ge=1, le=100)  # centered_clipping iterations
    center: Literal["median", "zero"] = "median"  # centered_clipping start when no center is passed
    chunk: int = Field(default=DEFAULT_CHUNK, ge=1, le=1 << 30)

    @field_validator("trim")
    @classmethod
    def _trim(cls, v: float) -> float:
        if 0.5 <= v < 1 or (v >= 1 and v != int(v)):
            raise ValueError(
                f"aggregation.trim {v} is neither a fraction below 0.5 (cut from each end) nor a whole "
                "count of updates ≥ 1: use e.g. 0.2 or 2"
            )
        return v

    @field_validator("chunk")
    @classmethod
    def _chunk(cls, v: int) -> int:
        if v & (v - 1):
            raise ValueError(
                f"aggregation.chunk {v} must be a power of two (e.g. {1 << (v.bit_length() - 1)})"
            )
        return v

    @model_validator(mode="after")
    def _rule_needs(self) -> AggregationConfig:
        if self.rule in ("krum", "multi_krum") and self.f is None:
            raise ValueError(
                f"aggregation.f is required for rule '{self.rule}': set it to the number of pools that "
                "may be Byzantine (Krum needs more than 2f+2 pools per round)"
            )
        if self.m is not None and self.rule != "multi_krum":
            raise ValueError(f"aggregation.m only applies to rule 'multi_krum', not '{self.rule}': remove it")
        return self

    def trim_count(self, r: int) -> int:
        """Updates cut from each end for R = ``r``: ⌊trim·R⌋ for a fraction, else the count."""
        return int(self.trim) if self.trim >= 1 else math.floor(self.trim * r)


@dataclass(frozen=True)
class AggregateResult:
    vector: torch.Tensor  # (N,) float32: the stage's aggregated pseudo-gradient
    rule: str
    selected: tuple[int, ...]  # updates the rule drew on: Krum's winner(s); every update otherwise
    # Weight of each update when the aggregate is a weighted mean of (clipped) updates
    # (mean, krum, multi_krum); None for coordinate-wise rules and centered clipping.
    weights: tuple[float, ...] | None
    norms: tuple[float, ...]  # ‖u_i‖ as sent, before clipping; () when no clipping was asked for
    clip_factors: tuple[float, ...]  # factor each update was scaled by before the rule (1.0: untouched)
    scores: tuple[float, ...] | None = None  # Krum scores, lower is more central
    info: Mapping[str, float | tuple[float, ...]] = field(default_factory=dict)


class _Outcome(NamedTuple):
    vector: np.ndarray  # (N,) float32
    selected: tuple[int, ...]
    weights: tuple[float, ...] | None
    scores: tuple[float, ...] | None = None
    info: Mapping[str, float | tuple[float, ...]] = {}


RuleFn = Callable[[UpdateStack, AggregationConfig, "torch.Tensor | None"], _Outcome]


# ---------------------------------------------------------------------------------------------
# The rules


def _mean(stack: UpdateStack, config: AggregationConfig, center: torch.Tensor | None) -> _Outcome:
    v = _coordinatewise(stack, lambda x: _sorted_mean(x, 0, stack.r))
    return _Outcome(v, tuple(range(stack.r)), (1.0 / stack.r,) * stack.r)


def _median_rule(stack: UpdateStack, config: AggregationConfig, center: torch.Tensor | None) -> _Outcome:
    return _Outcome(_coordinatewise(stack, _median), tuple(range(stack.r)), None)


def _trimmed_mean(stack: UpdateStack, config: AggregationConfig, center: torch.Tensor | None) -> _Outcome:
    k = config.trim_count(stack.r)
    if stack.r <= 2 * k:
        raise AggregationError(
            f"trimmed_mean cuts k={k} updates from each end, which needs more than {2 * k} updates, "
            f"got {stack.r}: lower aggregation.trim"
        )
    v = _coordinatewise(stack, lambda x: _sorted_mean(x, k, stack.r - k))
    return _Outcome(v, tuple(range(stack.r)), None, info={"trimmed_each_end": float(k)})


def _krum_order(stack: UpdateStack, f: int) -> tuple[list[int], list[float]]:
    scores = krum_scores(pairwise_sq_distances(stack), f)
    return sorted(range(stack.r), key=lambda i: (scores[i], i)), scores


def _krum(stack: UpdateStack, config: AggregationConfig, center: torch.Tensor | None) -> _Outcome:
    if config.f is None:  # AggregationConfig requires f for Krum
        raise AggregationError("krum needs aggregation.f")
    order, scores = _krum_order(stack, config.f)
    best = order[0]
    v = _coordinatewise(stack, lambda x: x[0].copy(), idx=[best])
    weights = tuple(1.0 if i == best else 0.0 for i in range(stack.r))
    return _Outcome(v, (best,), weights, tuple(scores))


def _multi_krum(stack: UpdateStack, config: AggregationConfig, center: torch.Tensor | None) -> _Outcome:
    if config.f is None:  # AggregationConfig requires f for Krum
        raise AggregationError("krum needs aggregation.f")
    m = config.m if config.m is not None else stack.r - config.f
    if not 1 <= m <= stack.r - config.f:
        raise AggregationError(
            f"multi_krum averages m={m} updates, but with f={config.f} of {stack.r} possibly Byzantine "
            f"m must lie in [1, {stack.r - config.f}]: lower aggregation.m"
        )
    order, scores = _krum_order(stack, config.f)
    chosen = sorted(order[:m])  # index order: the sorted per-coordinate sum ignores it anyway
    v = _coordinatewise(stack, lambda x: _sorted_mean(x, 0, m), idx=chosen)
    weights = tuple(1.0 / m if i in chosen else 0.0 for i in range(stack.r))
    return _Outcome(v, tuple(chosen), weights, tuple(scores))


def _sq_distances_to(stack: UpdateStack, v: np.ndarray) -> np.ndarray:
    """(R,) ‖u_i − v‖² for a (N,) float64 v."""
    acc = TreeSum(stack.r)
    for a, b in stack.spans():
        x = stack.rows(a, b)
        x -= v[a:b]
        acc.add(np.square(x, out=x))
    return acc.total()


def _centered_clipping(
    stack: UpdateStack, config: AggregationConfig, center: torch.Tensor | None
) -> _Outcome:
    if center is not None:
        if center.dim() != 1 or center.numel() != stack.size:
            raise AggregationError(f"center has shape {list(center.shape)}; the updates need [{stack.size}]")
        v = center.detach().cpu().to(torch.float64, copy=True).numpy()  # (N,) float64, our own copy
        v += 0.0
        if not np.isfinite(v).all():
            raise AggregationError("center holds NaN or infinite values")
    elif config.center == "median":
        v = _coordinatewise(stack, _median, dtype=np.float64)
    else:
        v = np.zeros(stack.size)
    taus: list[float] = []
    factors = np.ones(stack.r)
    dist = np.sqrt(_sq_distances_to(stack, v))  # (R,)
    for _ in range(config.iters):
        tau = config.tau if config.tau is not None else config.tau_multiple * _median(np.sort(dist))
        # clip(z, τ) = z·min(1, τ/‖z‖); a zero distance (or τ = 0) leaves z as it is.
        factors = np.array([min(1.0, tau / d) if d > 0 and tau > 0 else 1.0 for d in dist])
        taus.append(float(tau))
        for a, b in stack.spans():
            x = stack.rows(a, b)
            x -= v[a:b]
            x *= factors[:, None]
            x += 0.0
            x.sort(axis=0)  # (R, c): add per coordinate in sorted order → independent of update order
            v[a:b] += _sorted_mean(x, 0, stack.r)
        if len(taus) < config.iters:
            dist = np.sqrt(_sq_distances_to(stack, v))
    info: dict[str, float | tuple[float, ...]] = {
        "tau": tuple(taus),
        "last_factors": tuple(float(f) for f in factors),
    }
    return _Outcome(v.astype(np.float32), tuple(range(stack.r)), None, info=info)


RULES: dict[str, RuleFn] = {
    "mean": _mean,
    "median": _median_rule,
    "trimmed_mean": _trimmed_mean,
    "krum": _krum,
    "multi_krum": _multi_krum,
    "centered_clipping": _centered_clipping,
}
if set(RULES) != set(get_args(Rule)):  # a rule named but not implemented, or the reverse
    raise ImportError("coordinator.aggregation: RULES and Rule disagree")


# ---------------------------------------------------------------------------------------------
# Entry points


def clip_factors(norms: Sequence[float], clip: ClipConfig) -> list[float]:
    """Per update factor min(1, c / ‖u‖), c absolute or a multiple of the median norm."""
    if clip.mode == "none":
        return [1.0] * len(norms)
    if clip.mode == "absolute":
        if clip.max_norm is None:  # ClipConfig requires it
            raise AggregationError("clip mode absolute needs clip.max_norm")
        limit = clip.max_norm
    else:
        limit = clip.multiple * float(_median(np.sort(np.asarray(norms, dtype=np.float64))))
    return [limit / n if n > limit else 1.0 for n in norms]


def clip_norms(
    updates: Sequence[torch.Tensor], clip: ClipConfig, *, chunk: int = DEFAULT_CHUNK
) -> list[torch.Tensor]:
    """Clipped copies of the updates (``aggregate`` clips on the fly; this is for callers who need them)."""
    stack = UpdateStack(updates, chunk=chunk)
    factors = clip_factors([math.sqrt(s) for s in sq_norms(stack)], clip)
    return [
        (u.to(torch.float64) * f).to(torch.float32) if f != 1.0 else u.clone()
        for u, f in zip(updates, factors, strict=True)
    ]


def aggregate(
    updates: Sequence[torch.Tensor], config: AggregationConfig, *, center: torch.Tensor | None = None
) -> AggregateResult:
    """Aggregate one stage's R flat float32 updates with ``config``'s rule.

    ``center``: (N,) start of centered clipping, typically the previous round's
    aggregate; ignored by the other rules. Raises ``AggregationError`` for
    non-finite updates, mismatched sizes or too few updates for the rule.
    """
    raw = UpdateStack(updates, chunk=config.chunk)
    if config.clip.mode == "none":  # no norms needed: a float32 finiteness check is enough, and cheaper
        bad = [i for i, arr in enumerate(raw.arrays) if not _all_finite(arr, raw.chunk)]
        norms: list[float] = []
    else:  # one pass; finite iff every value is (float32² summed cannot overflow float64)
        sq = sq_norms(raw)
        bad = [i for i, s in enumerate(sq) if not math.isfinite(s)]
        norms = [math.sqrt(s) if math.isfinite(s) else math.inf for s in sq]
    if bad:
        raise AggregationError(f"updates {bad} hold NaN or infinite values; reject them before aggregating")
    factors = clip_factors(norms, config.clip) if norms else [1.0] * raw.r
    stack = UpdateStack(updates, chunk=config.chunk, factors=factors)
    out = RULES[config.rule](stack, config, center)
    return AggregateResult(
        vector=torch.from_numpy(out.vector),
        rule=config.rule,
        selected=out.selected,
        weights=out.weights,
        norms=tuple(norms),
        clip_factors=tuple(factors),
        scores=out.scores,
        info=dict(out.info),
    )
