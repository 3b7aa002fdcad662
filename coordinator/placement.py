"""Placement: which node of each pool runs which stage, and which shards each pool trains on.

A plain, deterministic function of the job and the nodes: the same inputs give
the same placement, and every choice carries a reason an admin can read
(`panal admin job status`).

- Stages are placed by memory: the planner's per-stage need for the job's
  layout (one pool = one pipeline, data-parallel degree 1) against each node's
  declared memory (GPU memory per GPU, or host memory on a CPU node). The
  hungriest stage gets the roomiest node; ties break by node id.
- A node that cannot hold any stage, or is not needed, is a standby of its pool.
- Train shards are dealt round-robin over the placed pools in sorted order,
  so pools train on disjoint data.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from model.config import GPTConfig
from model.partition import pipeline_parts
from model.plan import LayoutRequest, count_params, resolve_layout, stage_plans


@dataclass(frozen=True)
class NodeOffer:
    node_id: str
    pool: str
    memory_bytes: int  # per device: GPU memory, or host memory on a CPU node


@dataclass(frozen=True)
class Slot:
    pool: str
    stage: int
    node_id: str
    layer_start: int  # into the layer list [Embedding, Block × n, FinalNorm, LMHead]
    layer_end: int
    reason: str


@dataclass
class Placement:
    slots: list[Slot] = field(default_factory=list)
    standby: dict[str, list[str]] = field(default_factory=dict)
    unplaced: dict[str, str] = field(default_factory=dict)  # pool -> why it has no placement
    shards: dict[str, list[str]] = field(default_factory=dict)


def stage_memory(
    config: GPTConfig, *, stages: int, micro_batch: int, grad_accum: int, precision: str
) -> list[int]:
    """Bytes one device needs for each stage of a one-pipeline pool (the planner's model)."""
    layout = resolve_layout(
        config,
        LayoutRequest(
            gpus=stages,
            stages=stages,
            dp=1,
            zero=1,
            precision=precision,
            checkpointing=False,
            micro_batch=micro_batch,
            global_batch_tokens=micro_batch * grad_accum * config.seq_len,
        ),
    )
    return [plan.memory.total for plan in stage_plans(config, count_params(config), layout)]


def place(
    *,
    config: GPTConfig,
    pools: list[str],
    stages: int,
    needs: list[int],
    offers: list[NodeOffer],
    train_shards: list[str],
) -> Placement:
    """Place every pool that has enough nodes; explain the others."""
    parts = pipeline_parts(config.n_layer, stages)
    placement = Placement()
    # Hungriest stage first; equal needs keep stage order.
    order = sorted(range(stages), key=lambda s: (-needs[s], s))
    for pool in pools:
        nodes = sorted((o for o in offers if o.pool == pool), key=lambda o: (-o.memory_bytes, o.node_id))
        if len(nodes) < stages:
            placement.unplaced[pool] = f"{len(nodes)} of the {stages} nodes it needs have enrolled"
            continue
        chosen: dict[int, NodeOffer] = {}
        free = list(nodes)
        for stage in order:
            node = next((n for n in free if n.memory_bytes >= needs[stage]), None)
            if node is None:
                best = free[0].memory_bytes if free else 0
                placement.unplaced[pool] = (
                    f"stage {stage} needs {needs[stage] / 2**30:.1f} GiB per device and the roomiest free "
                    f"node of {pool} declares {best / 2**30:.1f} GiB; add a larger node or use more stages"
                )
                break
            free.remove(node)
            chosen[stage] = node
        if pool in placement.unplaced:
            continue
        for stage in range(stages):
            node = chosen[stage]
            placement.slots.append(
                Slot(
                    pool=pool,
                    stage=stage,
                    node_id=node.node_id,
                    layer_start=parts[stage],
                    layer_end=parts[stage + 1],
                    reason=(
                        f"needs {needs[stage] / 2**30:.2f} GiB; node declares {node.memory_bytes / 2**30:.1f} GiB "
                        f"(rank {order.index(stage) + 1} of {stages} by need)"
                    ),
                )
            )
        placement.standby[pool] = [n.node_id for n in free]
    placed = sorted({s.pool for s in placement.slots})
    for i, shard in enumerate(train_shards):
        if placed:
            placement.shards.setdefault(placed[i % len(placed)], []).append(shard)
    for pool in placed:
        if not placement.shards.get(pool):
            placement.unplaced[pool] = (
                f"the dataset has {len(train_shards)} train shards for {len(placed)} pools: every pool needs "
                "at least one; prepare the dataset with more shards or run fewer pools"
            )
    placement.slots = [s for s in placement.slots if s.pool not in placement.unplaced]
    return placement
