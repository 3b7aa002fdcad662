"""What the admin sees: status, nodes, a job's placement, rounds — read from the state."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from coordinator.state import now_ms
from protocol import panal_pb2 as pb

if TYPE_CHECKING:
    from coordinator.core import Coordinator


def status(c: Coordinator) -> pb.StatusReply:
    job = c.running_job() or c.state.one("SELECT * FROM jobs ORDER BY created_ms DESC")
    reply = pb.StatusReply(server_time_ms=now_ms())
    if job is None:
        return reply
    reply.job, reply.job_state, reply.round = job["job"], job["state"], int(job["round"])
    nodes = {n.node_id: n for n in c.state.nodes()}
    placement = c.state.query("SELECT * FROM placement WHERE job=? ORDER BY pool, stage", (job["job"],))
    placed = {r["node_id"] for r in placement}
    tps = 0.0
    for pool in c.state.query("SELECT * FROM pools WHERE job=? ORDER BY pool", (job["job"],)):
        ps = pb.PoolStatus(pool=pool["pool"], state=pool["state"], detail=pool["detail"] or "")
        for r in placement:
            if r["pool"] != pool["pool"]:
                continue
            n = nodes.get(r["node_id"])
            st = n.status if n else {}
            state = st.get("state", "NODE_STATE_UNSPECIFIED")
            ps.stages.append(
                pb.StageStatus(
                    stage=int(r["stage"]),
                    node_id=r["node_id"],
                    state=pb.NodeState.Value(state) if state in pb.NodeState.keys() else 0,
                    step=int(st.get("step", 0)),
                    loss=float(st.get("loss", 0.0)),
                    tokens_per_second=float(st.get("tokens_per_second", 0.0)),
                )
            )
            if int(r["stage"]) == 0:
                tps += float(st.get("tokens_per_second", 0.0))
        ps.standby_nodes = sum(
            1
            for n in nodes.values()
            if n.pool == pool["pool"] and n.state == "active" and n.node_id not in placed
        )
        reply.pools.append(ps)
    last = c.state.one(
        "SELECT mean_loss FROM rounds WHERE job=? AND state='closed' ORDER BY round DESC", (job["job"],)
    )
    reply.loss = float(last["mean_loss"]) if last and last["mean_loss"] is not None else 0.0
    reply.tokens_per_second = tps
    counts = {
        r["status"]: int(r["n"])
        for r in c.state.query(
            "SELECT status, COUNT(*) AS n FROM updates WHERE job=? GROUP BY status", (job["job"],)
        )
    }
    reply.updates_accepted = counts.get("accepted", 0)
    reply.updates_rejected = counts.get("rejected", 0)
    return reply


def nodes(c: Coordinator) -> pb.ListNodesReply:
    job = c.running_job()
    slots = {}
    if job is not None:
        slots = {
            r["node_id"]: int(r["stage"])
            for r in c.state.query("SELECT * FROM placement WHERE job=?", (job["job"],))
        }
    reply = pb.ListNodesReply()
    for n in c.state.nodes():
        reply.nodes.append(
            pb.NodeInfo(
                node_id=n.node_id,
                name=n.name,
                pool=n.pool,
                state=n.state,
                last_heartbeat_ms=n.last_heartbeat_ms,
                has_stage=n.node_id in slots,
                stage=slots.get(n.node_id, 0),
                capabilities=pb.Capabilities.FromString(n.capabilities) if n.capabilities else None,
                public_key=n.public_key,
            )
        )
    return reply


def job_status(c: Coordinator, name: str) -> pb.GetJobReply:
    job = (
        c.state.one("SELECT * FROM jobs WHERE job=?", (name,))
        if name
        else c.running_job() or c.state.one("SELECT * FROM jobs ORDER BY created_ms DESC")
    )
    if job is None:
        return pb.GetJobReply()
    spec = c.job_spec(job)
    reply = pb.GetJobReply(
        job=job["job"],
        state=f"{job['state']}: {job['detail'] or ''}".strip(": "),
        spec_yaml=spec.to_json(),
        round=int(job["round"]),
    )
    from model.partition import pipeline_parts

    parts = pipeline_parts(spec.gpt_config().n_layer, spec.stages)
    for r in c.state.query("SELECT * FROM placement WHERE job=? ORDER BY pool, stage", (job["job"],)):
        s = int(r["stage"])
        reply.placement.append(
            pb.PlacementEntry(
                pool=r["pool"],
                stage=s,
                node_id=r["node_id"],
                layer_start=parts[s],
                layer_end=parts[s + 1],
                reason=r["reason"] or "",
            )
        )
    for p in c.state.query("SELECT * FROM pools WHERE job=?", (job["job"],)):
        reply.shards_by_pool[p["pool"]] = ",".join(json.loads(p["shards"] or "[]"))
    return reply


def rounds(c: Coordinator, name: str, limit: int) -> pb.ListRoundsReply:
    job = (
        c.state.one("SELECT * FROM jobs WHERE job=?", (name,))
        if name
        else (c.running_job() or c.state.one("SELECT * FROM jobs ORDER BY created_ms DESC"))
    )
    reply = pb.ListRoundsReply()
    if job is None:
        return reply
    counts: dict[tuple[int, str], int] = {}
    for r in c.state.query(
        "SELECT round, status, COUNT(*) AS n FROM updates WHERE job=? GROUP BY round, status", (job["job"],)
    ):
        counts[(int(r["round"]), r["status"])] = int(r["n"])
    for r in c.state.query(
        "SELECT * FROM rounds WHERE job=? ORDER BY round DESC LIMIT ?", (job["job"], limit)
    ):
        n = int(r["round"])
        reply.rounds.append(
            pb.RoundInfo(
                round=n,
                state=r["state"],
                opened_ms=r["opened_ms"] or 0,
                closed_ms=r["closed_ms"] or 0,
                updates_accepted=counts.get((n, "accepted"), 0),
                updates_rejected=counts.get((n, "rejected"), 0),
                mean_loss=float(r["mean_loss"]) if r["mean_loss"] is not None else 0.0,
                result_cid=r["result_cid"] or "",
                detail=r["detail"] or "",
            )
        )
    return reply
