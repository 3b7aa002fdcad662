"""Closing a round: aggregate each stage's updates, take the outer step, publish a signed result.

A round closes when every (pool, stage) expected has answered — an accepted
update, or a rejected one — or when its deadline passes. It succeeds when every
stage has accepted updates from at least ``min_pools`` pools; otherwise the
weights stay as they were and the round is recorded as failed. Either way a
result signed by the coordinator is written to the store, listing what was
accepted and what was rejected and why, so the nodes can go on.

Everything here is deterministic given the blobs: anyone holding the CIDs and
the public keys can recompute a round (`panal admin verify-round`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from coordinator import aggregation
from coordinator.job import JobSpec
from coordinator.outer import outer_step
from coordinator.placement import stage_memory
from coordinator.state import now_ms
from protocol import panal_pb2 as pb
from protocol.envelope import seal
from storage import compression, manifest, tensors
from storage.manifest import CheckpointManifest, StageEntry
from storage.tensors import TensorLimits, TensorSpec

if TYPE_CHECKING:
    from coordinator.core import Coordinator

log = logging.getLogger("panal.coordinator")

WEIGHT_LIMITS = TensorLimits(max_bytes=64 << 30)


@dataclass(frozen=True)
class StageOutcome:
    weights: dict[str, torch.Tensor]
    momentum: dict[str, torch.Tensor]
    used: list[int]  # indices (into the sorted accepted updates) the rule used


def aggregate_stage(
    start: dict[str, torch.Tensor],
    deltas: list[dict[str, torch.Tensor]],
    momentum: dict[str, torch.Tensor] | None,
    spec: JobSpec,
) -> StageOutcome:
    """The pure part of a round for one stage: robust aggregate, then the outer step."""
    flats = [aggregation.flatten(d) for d in deltas]
    result = aggregation.aggregate(
        flats, aggregation.AggregationConfig.model_validate(spec.aggregation.model_dump())
    )
    delta = aggregation.unflatten(result.vector, start)
    weights, new_momentum = outer_step(start, delta, momentum, spec.outer)
    return StageOutcome(weights, new_momentum, list(result.selected))


class RoundCloser:
    def __init__(self, coordinator: Coordinator) -> None:
        self.c = coordinator
        self._specs: dict[str, dict[str, TensorSpec]] = {}
        self._needs: dict[str, list[int]] = {}

    # ------------------------------------------------------------ lookups

    def weights_spec(self, job: str, round: int, stage: int) -> dict[str, TensorSpec]:
        """Names, shapes and dtypes of a stage's weights (from its start-weights blob, cached)."""
        row = self.c.state.one("SELECT start_weights FROM rounds WHERE job=? AND round=?", (job, round))
        if row is None:
            raise ValueError(f"job {job!r} has no round {round}")
        cid = json.loads(row["start_weights"])[str(stage)]
        if cid not in self._specs:
            self._specs[cid] = tensors.read_header(
                self.c.store.get_bytes(cid, max_bytes=WEIGHT_LIMITS.max_bytes), WEIGHT_LIMITS
            )
        return self._specs[cid]

    def stage_needs(self, spec: JobSpec) -> list[int]:
        key = spec.to_json()
        if key not in self._needs:
            precision = "fp32" if spec.precision == "auto" else spec.precision
            self._needs[key] = stage_memory(
                spec.gpt_config(),
                stages=spec.stages,
                micro_batch=spec.micro_batch,
                grad_accum=spec.grad_accum,
                precision=precision,
            )
        return self._needs[key]

    def _load(self, cid: str) -> dict[str, torch.Tensor]:
        return tensors.load(self.c.store.get_bytes(cid, max_bytes=WEIGHT_LIMITS.max_bytes), WEIGHT_LIMITS)

    # ------------------------------------------------------------ closing

    def maybe_close(self, job: str, round: int, *, deadline_check: bool = False) -> None:
        with self.c.lock:
            row = self.c.state.one("SELECT * FROM rounds WHERE job=? AND round=?", (job, round))
            if row is None or row["state"] != "open":
                return
            spec = self.c.job_spec(self.c.state.one("SELECT * FROM jobs WHERE job=?", (job,)))
            active = [
                r["pool"]
                for r in self.c.state.query("SELECT pool FROM pools WHERE job=? AND state='active'", (job,))
            ]
            answered = {
                (r["pool"], int(r["stage"]))
                for r in self.c.state.query(
                    "SELECT u.pool, u.stage FROM updates u JOIN placement p ON p.job=u.job AND p.pool=u.pool"
                    " AND p.stage=u.stage AND p.node_id=u.node_id WHERE u.job=? AND u.round=?",
                    (job, round),
                )
            }
            expected = {(p, s) for p in active for s in range(spec.stages)}
            late = deadline_check and now_ms() > int(row["deadline_ms"])
            if expected - answered and not late:
                return
            self._close(job, round, spec, row, late=late and bool(expected - answered))

    def _close(self, job: str, round: int, spec: JobSpec, row: Any, *, late: bool) -> None:
        t0 = now_ms()
        start_cids: dict[str, str] = json.loads(row["start_weights"])
        momentum_cids: dict[str, str] = json.loads(row["momentum"] or "{}")
        updates = self.c.state.query(
            "SELECT * FROM updates WHERE job=? AND round=? ORDER BY pool, stage, received_ms", (job, round)
        )
        accepted = [u for u in updates if u["status"] == "accepted"]
        by_stage = {s: [u for u in accepted if int(u["stage"]) == s] for s in range(spec.stages)}
        quorum = all(len({u["pool"] for u in by_stage[s]}) >= spec.min_pools for s in range(spec.stages))
        new_cids, new_momentum = dict(start_cids), dict(momentum_cids)
        stage_results = []
        for s in range(spec.stages):
            used = by_stage[s]
            if quorum:
                start = self._load(start_cids[str(s)])
                deltas = [compression.decompress(self._load(u["blob_cid"]), spec.compression) for u in used]
                mom = self._load(momentum_cids[str(s)]) if str(s) in momentum_cids else None
                outcome = aggregate_stage(start, deltas, mom, spec)
                new_cids[str(s)] = str(self.c.store.put_bytes(tensors.dump(outcome.weights), pin=True))
                new_momentum[str(s)] = str(self.c.store.put_bytes(tensors.dump(outcome.momentum), pin=True))
            stage_results.append(
                pb.StageResult(
                    stage=s,
                    weights_cid=new_cids[str(s)],
                    accepted_update_ids=[u["update_id"] for u in used],
                    rejected=[
                        pb.RejectedUpdate(
                            update_id=u["update_id"],
                            node_id=u["node_id"],
                            pool=u["pool"],
                            stage=s,
                            reason=u["reason"],
                        )
                        for u in updates
                        if u["status"] == "rejected" and int(u["stage"]) == s
                    ],
                )
            )
        losses = [float(u["loss"]) for u in accepted]
        mean_loss = sum(losses) / len(losses) if losses else float("nan")
        tokens = sum(int(u["tokens"] or 0) for u in accepted if int(u["stage"]) == 0)
        checkpoint = self._checkpoint(job, round, spec, new_cids, new_momentum)
        result = pb.RoundResult(
            job=job,
            round=round,
            aggregation_rule=spec.aggregation.rule,
            stages=stage_results,
            pools=sorted({u["pool"] for u in accepted}),
            checkpoint_cid=checkpoint,
            mean_loss=mean_loss,
            tokens=tokens,
        )
        envelope = seal(self.c.identity, result, job=job, round=round)
        result_cid = str(self.c.store.put_bytes(envelope.SerializeToString(), pin=True))
        outcome = "closed" if quorum else "failed"
        detail = ("" if quorum else f"no quorum of {spec.min_pools} pool(s) per stage; weights unchanged") + (
            "; deadline passed" if late else ""
        )
        with self.c.state.tx() as db:
            db.execute(
                "UPDATE rounds SET state='closed', closed_ms=?, result_cid=?, checkpoint_cid=?, mean_loss=?, tokens=?,"
                " detail=? WHERE job=? AND round=?",
                (
                    now_ms(),
                    result_cid,
                    checkpoint,
                    mean_loss,
                    tokens,
                    f"{outcome}{': ' + detail.strip('; ') if detail else ''}",
                    job,
                    round,
                ),
            )
            self.c.state.audit(
                "round_closed",
                job=job,
                round=round,
                db=db,
                outcome=outcome,
                result_cid=result_cid,
                accepted=len(accepted),
                rejected=len(updates) - len(accepted),
            )
            if round + 1 < spec.rounds:
                self.c._open_round(db, job, round + 1, spec, new_cids, new_momentum)
                db.execute(
                    "UPDATE jobs SET round=?, detail=? WHERE job=?", (round + 1, f"round {round + 1}", job)
                )
            else:
                db.execute(
                    "UPDATE jobs SET state='finished', detail=? WHERE job=?",
                    (f"finished after {spec.rounds} rounds", job),
                )
        self.c.metrics.round_seconds.observe((now_ms() - t0) / 1000)
        log.info(
            "round %s of %s %s: %d accepted, %d rejected, mean loss %.4f, result %s",
            round,
            job,
            outcome,
            len(accepted),
            len(updates) - len(accepted),
            mean_loss,
            result_cid,
        )
        if self.c.on_round_closed:
            self.c.on_round_closed(job, round)

    def _checkpoint(
        self, job: str, round: int, spec: JobSpec, weights: dict[str, str], momentum: dict[str, str]
    ) -> str:
        from model.partition import pipeline_parts

        parts = pipeline_parts(spec.gpt_config().n_layer, spec.stages)
        prev = self.c.state.one("SELECT checkpoint_cid FROM rounds WHERE job=? AND round=?", (job, round - 1))
        body = CheckpointManifest(
            job=job,
            round=round,
            step=(round + 1) * spec.inner_steps,
            model_config_json=spec.gpt_config().to_dict(),
            stages=[
                StageEntry(
                    stage=s,
                    cid=weights[str(s)],
                    layer_start=parts[s],
                    layer_end=parts[s + 1],
                    optimizer=[momentum[str(s)]] if str(s) in momentum else [],
                )
                for s in range(spec.stages)
            ],
            parent=prev["checkpoint_cid"] if prev is not None and prev["checkpoint_cid"] else None,
            dataset_cid=spec.dataset,
        )
        return str(self.c.store.put_bytes(manifest.sign(body, self.c.identity), pin=True))
