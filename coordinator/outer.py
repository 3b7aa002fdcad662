"""The outer optimizer of a round (DiLoCo): Nesterov momentum over the aggregated pseudo-gradient.

A pseudo-gradient is Δ = θ_start − θ_after_inner_steps, so it points the way a
gradient does. With momentum μ, outer learning rate η and the aggregate Δ̄:

    m ← μ·m + Δ̄
    θ ← θ_start − η·(Δ̄ + μ·m)     (Nesterov; plain momentum: θ_start − η·m)

Computed in float64 and stored in float32, tensor by tensor in sorted name
order: the same inputs give bit-identical weights on any machine.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field


class OuterOptimizer(BaseModel):
    """The outer step (DiLoCo): Nesterov momentum over the aggregated pseudo-gradient."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    lr: float = Field(0.7, gt=0, le=10)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = True


def outer_step(
    start: dict[str, torch.Tensor],
    delta: dict[str, torch.Tensor],
    momentum: dict[str, torch.Tensor] | None,
    opt: OuterOptimizer,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(new weights, new momentum) for one stage."""
    if set(start) != set(delta):
        raise ValueError("the aggregate and the start weights name different tensors")
    weights: dict[str, torch.Tensor] = {}
    new_momentum: dict[str, torch.Tensor] = {}
    for name in sorted(start):
        d = delta[name].to(torch.float64)
        m = d.clone() if momentum is None else opt.momentum * momentum[name].to(torch.float64) + d
        step = d + opt.momentum * m if opt.nesterov else m
        weights[name] = (start[name].to(torch.float64) - opt.lr * step).to(torch.float32)
        new_momentum[name] = m.to(torch.float32)
    return weights, new_momentum
