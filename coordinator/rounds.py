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
import threading
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from coordinator.aggregation import AggregationError
from coordinator.defence import StageDefence, defend_stage
from coordinator.detection import MAJORITY, Reputation
from coordinator.job import JobSpec
from coordinator.placement import stage_memory
from coordinator.state import now_ms
from coordinator.tensor_cache import TensorCache, Tensors
from coordinator.tokens import ShardTokens
from protocol import panal_pb2 as pb
from protocol.envelope import seal
from protocol.errors import ProtocolError
from storage import compression, manifest, tensors
from storage.cid import cid_of_bytes
from storage.errors import IntegrityError
from storage.manifest import CheckpointManifest, StageEntry
from storage.tensors import TensorLimits, TensorSpec

if TYPE_CHECKING:
    from coordinator.core import Coordinator

log = logging.getLogger("panal.coordinator")

WEIGHT_LIMITS = TensorLimits(max_bytes=64 << 30)
MAX_SPECS = 4096  # weights specs remembered (RoundCloser.weights_spec): many rounds of a deep job
MAX_COUNTED = 64  # rounds whose update rows RoundCloser counts in memory, newest kept


class RoundCloser:
    def __init__(self, coordinator: Coordinator) -> None:
        self.c = coordinator
        # Weights CID -> its tensors' names, shapes and dtypes: a round's stages, newest last
        # (a new entry per stage every round, so the oldest are dropped past MAX_SPECS).
        self._specs: OrderedDict[str, dict[str, TensorSpec]] = OrderedDict()
        self._specs_lock = threading.Lock()
        self._needs: dict[str, list[int]] = {}
        self.kept = TensorCache()  # deltas checked at submission, weights and momentum this closer wrote
        self._tokens: dict[str, ShardTokens] = {}  # dataset CID → its shards' token presence
        # (job, round) -> its update rows, accepted or rejected: counted in the database once, then
        # as the coordinator commits them (row_written). The completeness check's quick bound, on
        # every accepted update: an SQL count of a thousand rows each time cost more than the rest.
        self._rows: OrderedDict[tuple[str, int], int] = OrderedDict()
        self._rows_lock = threading.Lock()

    # ------------------------------------------------------------ lookups

    def weights_spec(self, job: str, round: int, stage: int) -> dict[str, TensorSpec]:
        """Names, shapes and dtypes of a stage's weights (from its start-weights blob, cached)."""
        row = self.c.state.one("SELECT start_weights FROM rounds WHERE job=? AND round=?", (job, round))
        if row is None:
            raise ValueError(f"job {job!r} has no round {round}")
        cid = json.loads(row["start_weights"])[str(stage)]
        with self._specs_lock:
            spec = self._specs.get(cid)
            if spec is not None:
                self._specs.move_to_end(cid)
                return spec
        spec = tensors.read_header(self.c.store.get_bytes(cid, max_bytes=WEIGHT_LIMITS.max_bytes), WEIGHT_LIMITS)
        with self._specs_lock:
            self._specs[cid] = spec
            while len(self._specs) > MAX_SPECS:
                self._specs.popitem(last=False)
        return spec

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

    def _absent_tokens(self, spec: JobSpec) -> Callable[[str, Sequence[str]], np.ndarray | None]:
        """(pool, its shard CIDs) → the token ids none of them holds; None (the check skipped for
        that pool, logged) when a shard cannot be read."""
        if spec.dataset not in self._tokens:
            self._tokens[spec.dataset] = ShardTokens(
                self.c.store, self.c.dataset(spec), spec.gpt_config().vocab_size
            )
        tokens = self._tokens[spec.dataset]

        def absent(pool: str, cids: Sequence[str]) -> np.ndarray | None:
            try:
                return tokens.absent(cids) if cids else None
            except (ProtocolError, ValueError) as e:
                log.warning(
                    "absent-token check skipped for pool %s: its shards could not be read: %s", pool, e
                )
                return None

        return absent

    def _load(self, cid: str) -> Tensors:
        kept = self.kept.get(cid, "tensors")
        if kept is not None:
            return kept
        return tensors.load(self.c.store.get_bytes(cid, max_bytes=WEIGHT_LIMITS.max_bytes), WEIGHT_LIMITS)

    def _put_all(self, values: list[dict[str, torch.Tensor]]) -> list[str]:
        """Store new weights and momenta, two at a time (hashing and file I/O let go of the GIL);
        keep them (and their specs) for the next round."""
        with ThreadPoolExecutor(max_workers=2, thread_name_prefix="panal-put") as pool:
            cids = list(
                pool.map(lambda v: str(self.c.store.put_chunks(tensors.dump_parts(v), pin=True)), values)
            )
        for cid, value in zip(cids, values, strict=True):
            self.kept.put(cid, "tensors", value)
            self._specs[cid] = tensors.spec_of(value)
        return cids

    def _store_envelopes(self, verified: list[Any]) -> str:
        """The signed envelopes of the round's inputs, from the database, as one blob (the result names it).

        Stage by stage, each stage's in input order (as its ``input_envelope_cids``); "" without inputs.
        """
        if not verified:
            return ""
        ordered = sorted(verified, key=lambda u: int(u["stage"]))  # stable: input order within a stage
        for u in ordered:
            cid = str(cid_of_bytes(bytes(u["envelope"])))
            if cid != u["envelope_cid"]:
                raise IntegrityError(
                    f"the envelope of update {u['update_id']} hashes to {cid}, not {u['envelope_cid']} as recorded"
                )
        bundle = pb.EnvelopeBundle(envelopes=[bytes(u["envelope"]) for u in ordered])
        return str(self.c.store.put_bytes(bundle.SerializeToString(), pin=True))

    def keep_delta(self, cid: str, method: str, delta: Tensors) -> None:
        """An accepted update's pseudo-gradient, as ``load_update`` checked and decompressed it."""
        self.kept.put(cid, f"delta/{method}", delta)

    def _delta(self, cid: str, method: str) -> Tensors:
        kept = self.kept.get(cid, f"delta/{method}")
        return kept if kept is not None else compression.decompress(self._load(cid), method)

    # ------------------------------------------------------------ closing

    def maybe_close(self, job: str, round: int, *, deadline_check: bool = False) -> None:
        with self.c.lock:
            while True:
                due = self._due(job, round, deadline_check=deadline_check)
                if due is None:
                    return
                if not self.c.commits_in_flight(job, round):
                    break
                # Updates of this round answered "written" are being committed: wait for them
                # (the lock is let go meanwhile), then decide again on what is in.
                self.c.await_commits(job, round)
            spec, row, late = due
            if self.c.before_close is not None:
                self.c.before_close()
            self._close(job, round, spec, row, late=late)

    def row_written(self, job: str, round: int) -> None:
        """An update row of the round (accepted or rejected) was committed. Called without the
        state lock held (_update_rows reads the database under ``_rows_lock``)."""
        with self._rows_lock:
            if (job, round) in self._rows:
                self._rows[(job, round)] += 1

    def _update_rows(self, job: str, round: int) -> int:
        """The round's update rows: at least as many as are committed (one in flight may be
        counted already; the exact check in _due is in SQL)."""
        key = (job, round)
        with self._rows_lock:
            if key not in self._rows:
                row = self.c.state.one("SELECT COUNT(*) AS n FROM updates WHERE job=? AND round=?", key)
                self._rows[key] = int(row["n"]) if row is not None else 0
                while len(self._rows) > MAX_COUNTED:
                    self._rows.popitem(last=False)
            return self._rows[key]

    def _due(self, job: str, round: int, *, deadline_check: bool) -> tuple[JobSpec, Any, bool] | None:
        """(spec, round row, closed late with slots unanswered) if the round is to close now, else None."""
        state = self.c.state
        row = state.one("SELECT * FROM rounds WHERE job=? AND round=?", (job, round))
        if row is None or row["state"] != "open":
            return None
        spec = self.c.job_spec(
            state.cached(("job", job), ("jobs",), lambda: state.one("SELECT * FROM jobs WHERE job=?", (job,)))
        )
        active = state.cached(
            ("active pools", job),
            ("pools",),
            lambda: state.query("SELECT pool FROM pools WHERE job=? AND state='active'", (job,)),
        )
        expected = len(active) * spec.stages
        late = deadline_check and now_ms() > int(row["deadline_ms"])
        # A quick bound first: fewer update rows than slots cannot answer every slot. (The exact
        # count below joins every row of the round: milliseconds, when a round has a thousand.)
        if not late and self._update_rows(job, round) < expected:
            return None
        # The (pool, stage) pairs expected that have answered, counted in SQL.
        answered = self.c.state.one(
            "SELECT COUNT(*) AS n FROM (SELECT DISTINCT u.pool, u.stage FROM updates u"
            " JOIN placement p ON p.job=u.job AND p.pool=u.pool AND p.stage=u.stage AND p.node_id=u.node_id"
            " JOIN pools o ON o.job=u.job AND o.pool=u.pool AND o.state='active'"
            " WHERE u.job=? AND u.round=? AND u.stage < ?)",
            (job, round, spec.stages),
        )
        missing = expected - (answered["n"] if answered else 0)
        if missing and not late:
            return None
        return spec, row, late and bool(missing)

    def _close(self, job: str, round: int, spec: JobSpec, row: Any, *, late: bool) -> None:
        t0 = now_ms()
        start_cids: dict[str, str] = json.loads(row["start_weights"])
        momentum_cids: dict[str, str] = json.loads(row["momentum"] or "{}")
        updates = self.c.state.query(
            "SELECT * FROM updates WHERE job=? AND round=? ORDER BY pool, stage, received_ms", (job, round)
        )
        verified = [u for u in updates if u["status"] == "accepted"]  # passed every check at submission
        inputs_cid = self._store_envelopes(verified)
        outcomes: dict[int, StageDefence] = {}
        failures: list[str] = []
        detected: dict[str, str] = {}  # update_id -> why detection rejected it
        defence = spec.defence()
        shards = {
            r["pool"]: json.loads(r["shards"] or "[]")
            for r in self.c.state.query("SELECT pool, shards FROM pools WHERE job=?", (job,))
        }
        absent_of = self._absent_tokens(spec) if defence.detection.max_absent_row_ratio is not None else None
        verified_of = _by_stage(verified)
        for s in range(spec.stages):
            inputs = verified_of[s]
            if not inputs:
                failures.append(f"stage {s} has no update")
                continue
            start = self._load(start_cids[str(s)])
            deltas = [self._delta(u["blob_cid"], spec.compression) for u in inputs]
            mom = self._load(momentum_cids[str(s)]) if str(s) in momentum_cids else None
            try:
                # With fewer updates than MAJORITY detection has no row scores: no shard need be read.
                absent = None
                if absent_of is not None and len(inputs) >= MAJORITY:
                    absent = [absent_of(u["pool"], shards.get(u["pool"], [])) for u in inputs]
                out = defend_stage(
                    start,
                    deltas,
                    mom,
                    defence,
                    [u["update_id"] for u in inputs],
                    outer=spec.outer,
                    absent=absent,
                )
            except AggregationError as e:
                failures.append(f"stage {s}: {e}")
                continue
            outcomes[s] = out
            for v in out.verdicts:
                if not v.accepted:
                    detected[v.id] = "rejected by detection: " + "; ".join(v.reasons)
        accepted = [u for u in verified if u["update_id"] not in detected]
        accepted_of = _by_stage(accepted)
        for s in range(spec.stages):
            pools = {u["pool"] for u in accepted_of[s]}
            if len(pools) < spec.min_pools:
                failures.append(
                    f"stage {s} has accepted updates from {len(pools)} pool(s), fewer than min_pools {spec.min_pools}"
                )
        ok = not failures
        new_cids, new_momentum = dict(start_cids), dict(momentum_cids)
        if ok:
            self.kept.clear()  # this round's deltas and start weights are done with
            stages = sorted(outcomes)
            cids = self._put_all([v for s in stages for v in (outcomes[s].weights, outcomes[s].momentum)])
            for i, s in enumerate(stages):
                new_cids[str(s)], new_momentum[str(s)] = cids[2 * i], cids[2 * i + 1]
        reasons = {u["update_id"]: u["reason"] for u in updates if u["status"] == "rejected"} | detected
        rejected_of = _by_stage(u for u in updates if u["update_id"] in reasons)
        stage_results = [
            pb.StageResult(
                stage=s,
                weights_cid=new_cids[str(s)],
                accepted_update_ids=[u["update_id"] for u in accepted_of[s]],
                rejected=[
                    pb.RejectedUpdate(
                        update_id=u["update_id"],
                        node_id=u["node_id"],
                        pool=u["pool"],
                        stage=s,
                        reason=reasons[u["update_id"]],
                    )
                    for u in rejected_of[s]
                ],
                start_weights_cid=start_cids[str(s)],
                start_momentum_cid=momentum_cids.get(str(s), ""),
                momentum_cid=new_momentum.get(str(s), ""),
                input_envelope_cids=[u["envelope_cid"] for u in verified_of[s]],
                notes=list(outcomes[s].notes) if s in outcomes else [],
                scores=_scores(outcomes[s], verified_of[s]) if s in outcomes else [],
            )
            for s in range(spec.stages)
        ]
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
            input_envelopes_cid=inputs_cid,
            mean_loss=mean_loss,
            tokens=tokens,
            pool_shards=[
                pb.PoolShards(pool=p, shard_cids=shards.get(p, []))
                for p in sorted({u["pool"] for u in verified})
            ],
        )
        envelope = seal(self.c.identity, result, job=job, round=round)
        result_cid = str(self.c.store.put_bytes(envelope.SerializeToString(), pin=True))
        outcome = "closed" if ok else "failed"
        detail = (
            "; ".join(failures)
            + ("; weights unchanged" if failures else "")
            + ("; deadline passed" if late else "")
        )
        quarantine = self._reputation(job, round, verified, detected)
        with self.c.state.tx() as db:
            for stage in stage_results:
                for sc in stage.scores:
                    fields = {k: getattr(sc, k) for k in SCORE_FIELDS}
                    self.c.state.audit(
                        "update_scored", node_id=sc.node_id, job=job, round=round, db=db, stage=stage.stage,
                        pool=sc.pool, accepted=sc.accepted, row=sc.row, absent_row=sc.absent_row, **fields,
                    )  # fmt: skip
            for update_id, why in detected.items():
                db.execute(
                    "UPDATE updates SET status='rejected', reason=? WHERE update_id=?", (why, update_id)
                )
                u = next(x for x in verified if x["update_id"] == update_id)
                self.c.state.audit(
                    "update_rejected",
                    node_id=u["node_id"],
                    job=job,
                    round=round,
                    db=db,
                    pool=u["pool"],
                    stage=u["stage"],
                    reason=why,
                )
            db.execute(
                "UPDATE rounds SET state='closed', closed_ms=?, result_cid=?, checkpoint_cid=?, mean_loss=?, tokens=?,"
                " detail=? WHERE job=? AND round=?",
                (
                    now_ms(),
                    result_cid,
                    checkpoint,
                    mean_loss,
                    tokens,
                    f"{outcome}: {detail}".rstrip(": "),
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
        for _ in detected:
            self.c.metrics.updates.labels(status="rejected_by_detection").inc()
        for stage in stage_results:
            for sc in stage.scores:
                for k in SCORE_FIELDS:
                    self.c.metrics.update_score.labels(pool=sc.pool, stage=str(stage.stage), score=k).set(
                        getattr(sc, k)
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
        for node_id in quarantine:
            self.c.quarantine(node_id, f"rejected repeatedly (last in round {round})")
        if self.c.on_round_closed:
            self.c.on_round_closed(job, round)

    def _reputation(self, job: str, round: int, verified: list[Any], detected: dict[str, str]) -> list[str]:
        """Record this round's verdicts per node; return the nodes now due for quarantine."""
        spec = self.c.job_spec(self.c.state.one("SELECT * FROM jobs WHERE job=?", (job,)))
        key = f"reputation/{job}"
        raw = self.c.state.get_kv(key)
        rep = (
            Reputation.from_dict(json.loads(raw))
            if raw
            else Reputation(spec.quarantine_window, spec.quarantine_threshold)
        )
        rejected_at_submit = self.c.state.query(
            "SELECT DISTINCT node_id FROM updates WHERE job=? AND round=? AND status='rejected'", (job, round)
        )
        verdicts = {u["node_id"]: u["update_id"] in detected for u in verified}
        for r in rejected_at_submit:
            verdicts[r["node_id"]] = True
        rep = rep.record_round(round, verdicts)
        self.c.state.set_kv(key, json.dumps(rep.to_dict()))
        return sorted(n for n in verdicts if rep.should_quarantine(n))

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


# The numeric scores a round result, the audit log and the metrics carry for every update.
SCORE_FIELDS = (
    "norm",
    "distance",
    "cosine",
    "norm_ratio",
    "distance_ratio",
    "spread_alignment",
    "spread_shift",
    "spread_z",
    "row_ratio",
    "krum_score",
    "absent_row_ratio",
)


def finite_score(x: float | None) -> float:
    # A ratio to a zero median is inf; protobuf doubles carry it, JSON audit fields would not.
    return 0.0 if x is None else (x if abs(x) != float("inf") else (1e308 if x > 0 else -1e308))


def _by_stage(rows: Iterable[Any]) -> defaultdict[int, list[Any]]:
    """Update rows by stage, each stage's in their order (a stage without any: [])."""
    out: defaultdict[int, list[Any]] = defaultdict(list)
    for u in rows:
        out[int(u["stage"])].append(u)
    return out


def _scores(out: StageDefence, verified: list[Any]) -> list[pb.UpdateScore]:
    """Detection's scores of each update of one stage (``verified``: the stage's inputs), in the
    order the rule saw them."""
    rows = {u["update_id"]: u for u in verified}
    return [
        pb.UpdateScore(
            update_id=v.id,
            node_id=rows[v.id]["node_id"],
            pool=rows[v.id]["pool"],
            accepted=v.accepted,
            row=v.score.row,
            absent_row=v.score.absent_row,
            **{k: finite_score(getattr(v.score, k)) for k in SCORE_FIELDS},
        )
        for v in out.verdicts
    ]
