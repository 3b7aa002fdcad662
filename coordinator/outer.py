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

PIECE = 1 << 18  # elements per piece of the float64 computation


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
        shape, n = start[name].shape, start[name].numel()
        s_all, d_all = start[name].reshape(-1), delta[name].reshape(-1)
        m_all = momentum[name].reshape(-1) if momentum is not None else None
        w_out, m_out = torch.empty(n, dtype=torch.float32), torch.empty(n, dtype=torch.float32)
        # Piece by piece (float64 scratch stays in cache), one rounding per operation as in the docstring.
        for a in range(0, n, PIECE):
            b = min(n, a + PIECE)
            d = d_all[a:b].to(torch.float64)
            m = d.clone() if m_all is None else m_all[a:b].to(torch.float64).mul_(opt.momentum).add_(d)
            step = m.mul(opt.momentum).add_(d) if opt.nesterov else m.clone()  # μ·m + Δ̄, or m
            m_out[a:b] = m  # rounds to float32 as .to() does
            w_out[a:b] = s_all[a:b].to(torch.float64).sub_(step.mul_(opt.lr))
        weights[name], new_momentum[name] = w_out.view(shape), m_out.view(shape)
    return weights, new_momentum
