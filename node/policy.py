"""Update policies: what a pool does to its data and to its pseudo-gradient before sending it.

An honest node trains on its shard and sends Δ = θ_start − θ_after. A Byzantine
node is the same daemon with another :class:`UpdatePolicy`; the coordinator has
no special path for it. The worker calls two hooks:

- ``poison_batch(inputs, labels, step, micro=0) -> (inputs, labels)`` on every
  micro-batch before the forward pass (data attacks; identity otherwise);
- ``transform(delta, round=r) -> delta`` on the stage's FP32 pseudo-gradient
  (tensor name → tensor) before compression (model attacks; identity otherwise).

The attacks (``ATTACKS``; build one with :func:`make_policy`):

- ``honest``: both hooks are the identity.
- ``sign_flip``: −Δ.
- ``scale``: ``factor``·Δ (default ×100).
- ``gaussian``: per tensor t, noise N(0, σ_t²) with σ_t = ``relative_std``·‖Δ_t‖/√numel_t,
  so the noise has about the norm of the honest tensor (``relative_std`` 1); ``mode``
  "replace" (default: the noise is sent instead of Δ_t) or "add" (Δ_t + noise).
  Matching the norm is what makes it hard: a norm check alone does not see it.
- ``zeros``: a free rider sends all zeros (it need not even train).
- ``alie`` ("A little is enough", Baruch et al. 2019): μ − z·σ per coordinate, with
  z = Φ⁻¹((n − s)/n), s = ⌊n/2 + 1⌋ − f for n pools and f attackers. The paper's
  attackers know every honest update and take μ and σ across them. A panal node
  knows only its own Δ, so here μ = its own Δ and σ_j = |Δ_j|: a crude per-coordinate
  proxy for the spread across pools, which grows with the coordinate's magnitude.
  The update is then Δ_j·(1 − z·sign Δ_j). This is weaker than the paper's
  omniscient attack; ``z`` may be given explicitly to make it stronger. For an even
  n and one attacker the formula gives z = 0 (Φ⁻¹(1/2)): the attack is then honest.
- ``ipm`` (inner-product manipulation, Xie et al. 2020): −ε·μ with the attacker's own Δ
  as the estimate of μ (``epsilon`` default 0.5): the sent update has a negative inner
  product with the honest mean while staying small.
- ``label_flip``: poisoned data: every label y (not the ignore index −100) becomes
  π(y) for a fixed derangement π of the vocabulary drawn from the seed (``mode``
  "permutation"), or (y + ``shift``) mod V (``mode`` "shift"). Δ is sent unchanged.
- ``backdoor``: poisoned data: in a ``fraction`` of the sequences of each micro-batch
  the ``trigger`` token sequence is written at a seed-chosen position and the token
  after it set to ``target`` (inputs and labels stay one consistent stream). The
  defaults use the last three ids of the vocabulary as the trigger (the rarest merges
  of a BPE vocabulary) and id 0 as the target. Δ is sent unchanged.

Every policy is pure and deterministic: the same seed, inputs, step and round give
the same output bits, and the inputs are never modified.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Any, ClassVar

import torch

IGNORE_INDEX = -100  # labels the loss skips (model.gpt.loss_fn)

ATTACKS: tuple[str, ...] = (
    "honest",
    "sign_flip",
    "scale",
    "gaussian",
    "zeros",
    "alie",
    "ipm",
    "label_flip",
    "backdoor",
)


class PolicyError(ValueError):
    """An update policy cannot be built as asked; the message says which name or parameter to fix."""


def _derived_seed(*parts: object) -> int:
    """A 56-bit seed from its parts (stable across runs and machines; fits torch's manual_seed)."""
    digest = hashlib.sha256(":".join(["panal-policy", *map(str, parts)]).encode()).digest()
    return int.from_bytes(digest[:7], "big")


def _generator(*parts: object) -> torch.Generator:
    return torch.Generator().manual_seed(_derived_seed(*parts))


def alie_z(n_pools: int, n_byzantine: int) -> float:
    """Baruch et al. 2019's z_max: s = ⌊n/2 + 1⌋ − f, z = Φ⁻¹((n − s)/n), floored at 0."""
    if n_pools < 2 or not 1 <= n_byzantine < n_pools:
        raise PolicyError(
            f"alie needs n_pools ≥ 2 and 1 ≤ n_byzantine < n_pools, got n_pools={n_pools}, "
            f"n_byzantine={n_byzantine}: pass the job's pool count and the number of attackers"
        )
    s = math.floor(n_pools / 2 + 1) - n_byzantine
    p = (n_pools - s) / n_pools
    if p <= 0.5:
        return 0.0
    return NormalDist().inv_cdf(min(p, 1 - 1e-12))


# ---------------------------------------------------------------------------------------------
# The policies


@dataclass(frozen=True)
class UpdatePolicy:
    """The honest policy; attacks override one of the two hooks."""

    name: ClassVar[str] = "honest"

    @property
    def poisons_data(self) -> bool:
        return type(self).poison_batch is not UpdatePolicy.poison_batch

    def poison_batch(
        self, inputs: torch.Tensor, labels: torch.Tensor, step: int, *, micro: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T) token ids and (B, T) labels of one micro-batch → what the pool trains on."""
        return inputs, labels

    def transform(self, delta: Mapping[str, torch.Tensor], *, round: int) -> dict[str, torch.Tensor]:
        """The stage's FP32 pseudo-gradient (name → tensor) → the update the pool sends."""
        return dict(delta)


@dataclass(frozen=True)
class SignFlip(UpdatePolicy):
    name: ClassVar[str] = "sign_flip"

    def transform(self, delta: Mapping[str, torch.Tensor], *, round: int) -> dict[str, torch.Tensor]:
        return {k: -v for k, v in delta.items()}


@dataclass(frozen=True)
class Scale(UpdatePolicy):
    name: ClassVar[str] = "scale"
    factor: float = 100.0

    def transform(self, delta: Mapping[str, torch.Tensor], *, round: int) -> dict[str, torch.Tensor]:
        return {k: v * self.factor for k, v in delta.items()}


@dataclass(frozen=True)
class Gaussian(UpdatePolicy):
    name: ClassVar[str] = "gaussian"
    seed: int = 0
    relative_std: float = 1.0  # noise norm over ‖Δ_t‖, per tensor
    mode: str = "replace"  # "replace" | "add"

    def __post_init__(self) -> None:
        if self.mode not in ("replace", "add"):
            raise PolicyError(f"gaussian mode {self.mode!r} is neither 'replace' nor 'add'")
        if not self.relative_std > 0:
            raise PolicyError(f"gaussian relative_std must be > 0, got {self.relative_std}")

    def transform(self, delta: Mapping[str, torch.Tensor], *, round: int) -> dict[str, torch.Tensor]:
        out = {}
        for name in sorted(delta):
            d = delta[name]
            # One generator per (seed, round, tensor): independent of the order tensors are visited.
            g = _generator("gaussian", self.seed, round, name)
            norm = float(torch.linalg.vector_norm(d.double()))
            sigma = self.relative_std * norm / math.sqrt(max(1, d.numel()))
            noise = (torch.randn(d.shape, generator=g, dtype=torch.float64) * sigma).to(d.dtype)
            out[name] = noise if self.mode == "replace" else d + noise
        return out


@dataclass(frozen=True)
class Zeros(UpdatePolicy):
    name: ClassVar[str] = "zeros"

    def transform(self, delta: Mapping[str, torch.Tensor], *, round: int) -> dict[str, torch.Tensor]:
        return {k: torch.zeros_like(v) for k, v in delta.items()}


@dataclass(frozen=True)
class ALIE(UpdatePolicy):
    name: ClassVar[str] = "alie"
    z: float = 0.0

    def transform(self, delta: Mapping[str, torch.Tensor], *, round: int) -> dict[str, torch.Tensor]:
        # μ = Δ, σ = |Δ| (see the module docstring): μ − z·σ per coordinate.
        return {k: v - self.z * v.abs() for k, v in delta.items()}


@dataclass(frozen=True)
class IPM(UpdatePolicy):
    name: ClassVar[str] = "ipm"
    epsilon: float = 0.5

    def transform(self, delta: Mapping[str, torch.Tensor], *, round: int) -> dict[str, torch.Tensor]:
        return {k: v * -self.epsilon for k, v in delta.items()}


@dataclass(frozen=True)
class LabelFlip(UpdatePolicy):
    name: ClassVar[str] = "label_flip"
    vocab_size: int = 0
    seed: int = 0
    mode: str = "permutation"  # "permutation" | "shift"
    shift: int = 1
    table: torch.Tensor = field(init=False, repr=False, compare=False)  # (V,) label → poisoned label

    def __post_init__(self) -> None:
        v = self.vocab_size
        if v < 2:
            raise PolicyError(f"label_flip needs vocab_size ≥ 2 (the model's vocabulary), got {v}")
        if self.mode == "permutation":
            # A derangement: a random cyclic shift of a random order moves every id.
            order = torch.randperm(v, generator=_generator("label_flip", self.seed, v))
            table = torch.empty(v, dtype=torch.int64)
            table[order] = order.roll(1)
        elif self.mode == "shift":
            if self.shift % v == 0:
                raise PolicyError(
                    f"label_flip shift {self.shift} is a multiple of vocab_size {v}: no label moves"
                )
            table = (torch.arange(v) + self.shift) % v
        else:
            raise PolicyError(f"label_flip mode {self.mode!r} is neither 'permutation' nor 'shift'")
        object.__setattr__(self, "table", table)

    def poison_batch(
        self, inputs: torch.Tensor, labels: torch.Tensor, step: int, *, micro: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        keep = labels == IGNORE_INDEX
        flipped = self.table.to(labels.device)[labels.clamp(min=0)].to(labels.dtype)
        return inputs, torch.where(keep, labels, flipped)


@dataclass(frozen=True)
class Backdoor(UpdatePolicy):
    name: ClassVar[str] = "backdoor"
    vocab_size: int = 0
    seed: int = 0
    trigger: tuple[int, ...] = ()  # default: the last three ids of the vocabulary
    target: int = 0
    fraction: float = 0.5  # of the sequences in each micro-batch

    def __post_init__(self) -> None:
        v = self.vocab_size
        if v < 4:
            raise PolicyError(f"backdoor needs vocab_size ≥ 4 (the model's vocabulary), got {v}")
        trigger = tuple(int(t) for t in self.trigger) or (v - 3, v - 2, v - 1)
        if not all(0 <= t < v for t in (*trigger, self.target)):
            raise PolicyError(f"backdoor trigger {trigger} and target {self.target} must be ids in [0, {v})")
        if not 0 < self.fraction <= 1:
            raise PolicyError(f"backdoor fraction must lie in (0, 1], got {self.fraction}")
        object.__setattr__(self, "trigger", trigger)

    def poison_batch(
        self, inputs: torch.Tensor, labels: torch.Tensor, step: int, *, micro: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        b, t = inputs.shape
        n = len(self.trigger)
        if t < n + 1:
            return inputs, labels  # too short to hold trigger and target
        g = _generator("backdoor", self.seed, step, micro)
        rows = torch.randperm(b, generator=g)[: max(1, round(self.fraction * b))].tolist()
        starts = torch.randint(0, t - n, (b,), generator=g).tolist()
        x, y = inputs.clone(), labels.clone()
        seq = torch.tensor([*self.trigger, self.target], dtype=x.dtype)
        for r in sorted(rows):
            p = starts[r]  # trigger at inputs[p : p+n], target at inputs[p+n]
            x[r, p : p + n + 1] = seq
            # labels[i] is the token after inputs[i]: trigger[1:], then target, then what follows it.
            lo = max(0, p - 1)
            y[r, lo : p + n] = seq[lo - p + 1 :].to(y.dtype)
        return x, y


_POLICIES: dict[str, type[UpdatePolicy]] = {
    "honest": UpdatePolicy,
    "sign_flip": SignFlip,
    "scale": Scale,
    "gaussian": Gaussian,
    "zeros": Zeros,
    "alie": ALIE,
    "ipm": IPM,
    "label_flip": LabelFlip,
    "backdoor": Backdoor,
}
assert tuple(_POLICIES) == ATTACKS

# Parameters each policy takes from **params (seed is passed where the policy draws randomness).
_PARAMS: dict[str, tuple[str, ...]] = {
    "honest": (),
    "sign_flip": (),
    "scale": ("factor",),
    "gaussian": ("relative_std", "mode"),
    "zeros": (),
    "alie": ("z",),
    "ipm": ("epsilon",),
    "label_flip": ("vocab_size", "mode", "shift"),
    "backdoor": ("vocab_size", "trigger", "target", "fraction"),
}


def make_policy(
    name: str, *, seed: int = 0, n_pools: int = 0, n_byzantine: int = 0, **params: Any
) -> UpdatePolicy:
    """The policy called ``name`` (one of ``ATTACKS``), deterministic from ``seed``.

    ``n_pools`` and ``n_byzantine`` are the job's pool count and the number of
    attackers; ``alie`` derives its z from them unless ``z`` is given.
    """
    if name not in _POLICIES:
        raise PolicyError(f"unknown attack {name!r}; known attacks are: {', '.join(ATTACKS)}")
    allowed = _PARAMS[name]
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        takes = ", ".join(allowed) if allowed else "no parameters"
        raise PolicyError(f"attack {name!r} got unknown parameter(s) {', '.join(unknown)}; it takes {takes}")
    if name == "alie" and "z" not in params:
        params["z"] = alie_z(n_pools, n_byzantine)
    if name in ("gaussian", "label_flip", "backdoor"):
        params["seed"] = seed
    if "trigger" in params:
        params["trigger"] = tuple(params["trigger"])
    return _POLICIES[name](**params)
