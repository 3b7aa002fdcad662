"""The coordinator's logic, as plain methods over its state: the servicers only call these.

Enrollment (single-use, expiring tokens), heartbeats and node loss, jobs and
placement, the round (open → updates verified and recorded → aggregate →
outer step → signed result → next round), and the admin's views. Every method
that changes something commits it to SQLite before it returns.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import secrets
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from coordinator.detection import Reputation
from coordinator.groupcommit import GroupCommit
from coordinator.job import JobSpec, JobSpecError, parse_job
from coordinator.metrics import Metrics
from coordinator.placement import NodeOffer, Placement, place, stage_memory
from coordinator.rounds import RoundCloser
from coordinator.state import Node, State, authorize_node, heartbeat_status, now_ms
from coordinator.updates import load_update, make_update_id
from model.stage import initial_stage_weights
from protocol import panal_pb2 as pb
from protocol import tls
from protocol.envelope import Verified
from protocol.errors import MalformedMessage, NotAuthorized, ProtocolError, WrongContextError
from protocol.identity import Identity
from protocol.limits import MethodSpec
from storage import manifest, tensors
from storage.blobstore import BlobStore
from storage.cid import cid_of_bytes
from storage.manifest import DatasetManifest

log = logging.getLogger("panal.coordinator")

TOKEN_PREFIX = "pnl_"
Committed = Literal["written", "already", "taken", "closed"]  # what became of an accepted update (_commit_accepted)


@dataclass(frozen=True)
class _Accepted:
    """An update that passed every check, on its way to the database."""

    update_id: str
    job: str
    round: int
    node_id: str
    request: pb.SubmitUpdateRequest
    envelope: bytes
    envelope_cid: str


@dataclass(frozen=True, kw_only=True)
class Settings:
    heartbeat_interval_ms: int = 1000
    heartbeat_timeout_s: float = 15.0
    max_token_ttl_s: int = 7 * 24 * 3600


class Coordinator:
    def __init__(
        self,
        *,
        state: State,
        store: BlobStore,
        identity: Identity,
        ca: tls.CertKey,
        admins: set[bytes],
        settings: Settings = Settings(),
        metrics: Metrics | None = None,
        on_round_closed: Callable[[str, int], None] | None = None,
        close_in_background: bool = False,
    ) -> None:
        self.state = state
        self.store = store
        self.identity = identity
        self.ca = ca
        self.admins = admins
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.lock = threading.RLock()
        self.closer = RoundCloser(self)
        self.on_round_closed = on_round_closed
        # With close_in_background, the update that completes a round is answered once committed,
        # and this event wakes the coordinator's loop to close it (close_if_complete); otherwise the
        # submitting call closes it before it is answered.
        self.close_in_background = close_in_background
        self.round_ready = threading.Event()
        # Accepted updates arriving together are committed in one transaction (one disk wait),
        # on State.commit_tx's connection, outside the lock; a round's close first waits for
        # the commits of its updates in flight (await_commits), and none starts meanwhile.
        self._accepted: GroupCommit[_Accepted, Committed] = GroupCommit(self._commit_accepted)
        self._commits = threading.Condition(self.lock)
        self._committing: Counter[tuple[str, int]] = Counter()  # (job, round) -> commits in flight
        self._closing: Counter[tuple[str, int]] = Counter()  # (job, round) -> closes waiting for them
        # Called as a round starts to close: every update is in and no node submits until the
        # result is out (RunningCoordinator collects garbage then, not inside the next round's calls).
        self.before_close: Callable[[], None] | None = None
        # A restarted coordinator gives every node a fresh grace period.
        for node in state.nodes():
            if node.state == "active":
                state.heartbeat(node.node_id, node.status)

    # ------------------------------------------------------------ authentication

    def authorize(self, spec: MethodSpec, verified: Verified) -> None:
        """Called by the interceptor for every verified envelope: who may call what."""
        if spec.service == "AdminService":
            if verified.sender not in self.admins:
                raise NotAuthorized(f"{verified.sender_id} is not an admin of this coordinator")
            return
        if spec.name == "Enroll":
            return  # the token authorises it
        authorize_node(self.state.node(verified.sender_id), verified.sender_id, verified.sender)

    def expected_context(self, spec: MethodSpec, env: pb.Envelope) -> tuple[str | None, int | None]:
        """SubmitUpdate must be for the open round of the running job."""
        if spec.name != "SubmitUpdate":
            return None, None
        job = self.running_job()
        if job is None:
            raise WrongContextError("no job is running; nothing to submit an update to")
        return job["job"], int(job["round"])

    # ------------------------------------------------------------ enrollment

    def create_token(self, pool: str, ttl_s: int) -> tuple[str, int]:
        if not 1 <= ttl_s <= self.settings.max_token_ttl_s:
            raise MalformedMessage(f"token TTL must be between 1 s and {self.settings.max_token_ttl_s} s")
        if not pool:
            raise MalformedMessage("a token is for one pool: give --pool NAME")
        token = TOKEN_PREFIX + secrets.token_urlsafe(24)
        expires = now_ms() + ttl_s * 1000
        with self.state.tx() as db:
            db.execute(
                "INSERT INTO tokens(token_hash, pool, created_ms, expires_ms) VALUES(?,?,?,?)",
                (_token_hash(token), pool, now_ms(), expires),
            )
            self.state.audit("token_created", db=db, pool=pool, expires_ms=expires)
        return token, expires

    def enroll(self, verified: Verified) -> pb.EnrollReply:
        req: pb.EnrollRequest = verified.body  # type: ignore[assignment]
        node_id = verified.sender_id
        with self.lock, self.state.tx() as db:
            row = db.execute("SELECT * FROM tokens WHERE token_hash=?", (_token_hash(req.token),)).fetchone()
            if row is None:
                raise NotAuthorized(
                    "unknown enrollment token; ask the admin for one (`panal admin token create`)"
                )
            if row["used_by"]:
                raise NotAuthorized(
                    "this enrollment token was already used; tokens are single-use, ask for a new one"
                )
            if row["expires_ms"] < now_ms():
                raise NotAuthorized("this enrollment token has expired; ask the admin for a new one")
            if req.pool and req.pool != row["pool"]:
                raise NotAuthorized(f"this token is for pool {row['pool']!r}, not {req.pool!r}")
            existing = db.execute("SELECT state FROM nodes WHERE node_id=?", (node_id,)).fetchone()
            if existing is not None and existing["state"] in ("evicted", "quarantined"):
                raise NotAuthorized(
                    f"node {node_id} was {existing['state']}; a new token does not re-admit it"
                )
            cert = tls.sign_csr(self.ca, req.csr_pem, node_id)
            db.execute(
                "UPDATE tokens SET used_by=?, used_ms=? WHERE token_hash=?",
                (node_id, now_ms(), row["token_hash"]),
            )
            db.execute(
                "INSERT OR REPLACE INTO nodes(node_id, public_key, name, pool, state, capabilities, data_address,"
                " enrolled_ms, last_heartbeat_ms, status) VALUES(?,?,?,?,?,?,?,?,?,?)",
                (
                    node_id,
                    verified.sender,
                    req.name or node_id[:8],
                    row["pool"],
                    "active",
                    req.capabilities.SerializeToString(),
                    req.data_address,
                    now_ms(),
                    now_ms(),
                    "{}",
                ),
            )
            self.state.audit("enrolled", node_id=node_id, db=db, pool=row["pool"], name=req.name)
        self.state.heartbeat(node_id, {})
        self.metrics.enrolled.inc()
        log.info("node %s (%s) enrolled in pool %s", node_id, req.name, row["pool"])
        return pb.EnrollReply(
            node_id=node_id,
            certificate_pem=cert,
            ca_certificate_pem=self.ca.cert_pem,
            coordinator_public_key=self.identity.public_key,
            heartbeat_interval_ms=self.settings.heartbeat_interval_ms,
        )

    # ------------------------------------------------------------ heartbeats

    def heartbeat(self, verified: Verified) -> pb.HeartbeatReply:
        req: pb.HeartbeatRequest = verified.body  # type: ignore[assignment]
        node_id = verified.sender_id
        self.state.heartbeat(node_id, heartbeat_status(req))
        self.metrics.heartbeats.inc()
        node = self.state.node(node_id)
        if node is not None and node.state == "lost":
            with self.lock:
                self.state.set_node_state(node_id, "active")
                self.state.audit("node_back", node_id=node_id)
        if req.state == pb.NODE_STATE_FAILED:
            with self.lock:  # acting on a failure report: read and act under the lock
                changed = self._assignment_changed(node, req, act_on_failure=True)
        else:
            # Read from memory (State.cached), without the lock: a heartbeat does not wait
            # for a round that is closing.
            changed = self._assignment_changed(node, req)
        return pb.HeartbeatReply(server_time_ms=now_ms(), assignment_changed=changed, evicted=False)

    def _assignment_changed(
        self, node: Node | None, req: pb.HeartbeatRequest, *, act_on_failure: bool = False
    ) -> bool:
        """Whether the node's pool has moved to a new epoch; with ``act_on_failure``, fail the pool."""
        job = self.running_job()
        if job is None or node is None:
            return False
        pool = self.state.pool(job["job"], node.pool)
        if pool is None:
            return False
        if act_on_failure and req.epoch == int(pool["epoch"]):
            self._pool_failed(job, node.pool, f"node {node.node_id[:8]} reports: {req.detail[:300]}")
        return int(pool["epoch"]) != req.epoch

    # ------------------------------------------------------------ jobs

    def submit_job(self, spec_yaml: str) -> str:
        spec = parse_job(spec_yaml)
        dataset = self.dataset(spec)
        config = spec.gpt_config()
        if dataset.vocab_size > config.vocab_size:
            raise JobSpecError(
                f"job spec is invalid:\n  model: the dataset's tokenizer has {dataset.vocab_size} tokens, the model's "
                f"vocab_size is {config.vocab_size}; set model.vocab_size ≥ {dataset.vocab_size}"
            )
        if dataset.seq_len > config.seq_len:
            raise JobSpecError(
                f"job spec is invalid:\n  model: the dataset's sequences are {dataset.seq_len} tokens, longer than "
                f"the model's context {config.seq_len}; set model.seq_len ≥ {dataset.seq_len}"
            )
        with self.lock, self.state.tx() as db:
            if db.execute("SELECT 1 FROM jobs WHERE job=?", (spec.name,)).fetchone():
                raise JobSpecError(
                    f"job spec is invalid:\n  name: a job named {spec.name!r} exists; pick another name"
                )
            running = db.execute("SELECT job FROM jobs WHERE state IN ('waiting','running')").fetchone()
            if running is not None:
                raise JobSpecError(f"job {running['job']!r} is still running; one job runs at a time")
            db.execute(
                "INSERT INTO jobs(job, spec, state, created_ms, round, detail) VALUES(?,?,?,?,0,?)",
                (spec.name, spec.to_json(), "waiting", now_ms(), "waiting for nodes"),
            )
            self.state.audit("job_submitted", job=spec.name, db=db)
        self.tick()
        return spec.name

    def dataset(self, spec: JobSpec) -> DatasetManifest:
        signed = manifest.verify(self.store.get_bytes(spec.dataset, max_bytes=manifest.MAX_MANIFEST_BYTES))
        if not isinstance(signed.body, DatasetManifest):
            raise JobSpecError(
                f"job spec is invalid:\n  dataset: {spec.dataset} is a {signed.kind} manifest, not a dataset"
            )
        return signed.body

    def running_job(self) -> Any:
        return self.state.running_job()

    def job_spec(self, job: Any) -> JobSpec:
        return _parse_spec(job["spec"])

    def _start_job(self, job: Any) -> None:
        """Place the pools and open round 0, once every pool listed has its nodes."""
        spec = self.job_spec(job)
        placement = self._placement(spec, self.state.nodes())
        placed = {s.pool for s in placement.slots}
        if len(placed) < len(spec.pools):
            detail = "; ".join(f"{p}: {why}" for p, why in sorted(placement.unplaced.items())) or "placing"
            if detail != job["detail"]:
                with self.state.tx() as db:
                    db.execute(
                        "UPDATE jobs SET detail=? WHERE job=?", (f"waiting for nodes — {detail}", job["job"])
                    )
            return
        config = spec.gpt_config()
        start = {}
        for stage in range(spec.stages):
            weights = initial_stage_weights(config, spec.stages, stage, seed=spec.seed)
            start[str(stage)] = str(self.store.put_bytes(tensors.dump(weights), pin=True))
        with self.state.tx() as db:
            for pool in spec.pools:
                db.execute(
                    "INSERT OR REPLACE INTO pools(job, pool, state, detail, epoch, shards) VALUES(?,?,?,?,1,?)",
                    (job["job"], pool, "active", "placed", json.dumps(placement.shards[pool])),
                )
            for slot in placement.slots:
                db.execute(
                    "INSERT OR REPLACE INTO placement(job, pool, stage, node_id, reason) VALUES(?,?,?,?,?)",
                    (job["job"], slot.pool, slot.stage, slot.node_id, slot.reason),
                )
            self._open_round(db, job["job"], 0, spec, start, {})
            db.execute(
                "UPDATE jobs SET state='running', round=0, detail=? WHERE job=?", ("round 0", job["job"])
            )
            self.state.audit(
                "job_started", job=job["job"], db=db, placement=[s.__dict__ for s in placement.slots]
            )
        log.info(
            "job %s started: %s",
            job["job"],
            ", ".join(f"{s.pool}/{s.stage}={s.node_id[:8]}" for s in placement.slots),
        )

    def _placement(self, spec: JobSpec, nodes: list[Node]) -> Placement:
        config = spec.gpt_config()
        precision = "fp32" if spec.precision == "auto" else spec.precision
        needs = stage_memory(
            config,
            stages=spec.stages,
            micro_batch=spec.micro_batch,
            grad_accum=spec.grad_accum,
            precision=precision,
        )
        offers = [
            NodeOffer(n.node_id, n.pool, _memory_of(n))
            for n in nodes
            if n.state == "active" and n.pool in spec.pools
        ]
        dataset = self.dataset(spec)
        train = [s.cid for s in dataset.shards if s.split == "train"]
        return place(
            config=config,
            pools=spec.pools,
            stages=spec.stages,
            needs=needs,
            offers=offers,
            train_shards=train,
        )

    def _open_round(
        self, db: Any, job: str, round: int, spec: JobSpec, start: dict[str, str], momentum: dict[str, str]
    ) -> None:
        db.execute(
            "INSERT OR REPLACE INTO rounds(job, round, state, opened_ms, deadline_ms, start_weights, momentum)"
            " VALUES(?,?,?,?,?,?,?)",
            (
                job,
                round,
                "open",
                now_ms(),
                now_ms() + int(spec.round_timeout_s * 1000),
                json.dumps(start),
                json.dumps(momentum),
            ),
        )
        # A pool that failed in the last round gets another try with a fresh world.
        db.execute(
            "UPDATE pools SET state='active', epoch=epoch+1, detail=? WHERE job=? AND state='failed'",
            (f"re-forming for round {round}", job),
        )
        self.metrics.round.set(round)

    # ------------------------------------------------------------ assignment

    def assignment(self, node_id: str) -> pb.GetAssignmentReply:
        job = self.running_job()
        if job is None:
            return pb.GetAssignmentReply(
                has_assignment=False, reason="no job is running", retry_after_ms=2000
            )
        if job["state"] == "waiting":
            return pb.GetAssignmentReply(
                has_assignment=False, reason=job["detail"] or "waiting", retry_after_ms=1000
            )
        spec = self.job_spec(job)
        node = self.state.node(node_id)
        if node is None:  # authorize() lets only enrolled nodes through
            raise NotAuthorized(f"node {node_id} is not enrolled")
        pool = self.state.one("SELECT * FROM pools WHERE job=? AND pool=?", (job["job"], node.pool))
        slot = self.state.one("SELECT * FROM placement WHERE job=? AND node_id=?", (job["job"], node_id))
        if pool is None or slot is None:
            return pb.GetAssignmentReply(
                has_assignment=True,
                assignment=pb.Assignment(
                    job=job["job"], round=int(job["round"]), pool=node.pool, standby=True
                ),
                reason="standby: takes a stage over if a node of the pool is lost",
            )
        if pool["state"] != "active":
            return pb.GetAssignmentReply(
                has_assignment=False,
                reason=f"pool {node.pool} is {pool['state']}: {pool['detail']}",
                retry_after_ms=1000,
            )
        round_row = self.state.one("SELECT * FROM rounds WHERE job=? AND round=?", (job["job"], job["round"]))
        stage = int(slot["stage"])
        master = self.state.one(
            "SELECT n.data_address FROM placement p JOIN nodes n ON n.node_id=p.node_id"
            " WHERE p.job=? AND p.pool=? AND p.stage=0",
            (job["job"], node.pool),
        )
        host, _, port = (master["data_address"] if master else "").rpartition(":")
        config = spec.gpt_config()
        from model.partition import pipeline_parts

        parts = pipeline_parts(config.n_layer, spec.stages)
        return pb.GetAssignmentReply(
            has_assignment=True,
            assignment=pb.Assignment(
                job=job["job"],
                round=int(job["round"]),
                pool=node.pool,
                stage=stage,
                num_stages=spec.stages,
                layer_start=parts[stage],
                layer_end=parts[stage + 1],
                world=pb.DistributedWorld(
                    rank=stage,
                    world_size=spec.stages,
                    master_address=host or "127.0.0.1",
                    master_port=int(port or 0),
                    backend="nccl" if torch.cuda.is_available() and spec.precision == "fp16" else "gloo",
                    timeout_s=int(spec.world_timeout_s),
                ),
                dataset_cid=spec.dataset,
                shard_cids=json.loads(pool["shards"]),
                start_weights_cid=json.loads(round_row["start_weights"])[str(stage)],
                inner_steps=spec.inner_steps,
                compression=spec.compression,
                deadline_ms=int(round_row["deadline_ms"]),
                model_config_json=json.dumps(config.to_dict()),
                seed=spec.seed,
                epoch=int(pool["epoch"]),
                job_spec_json=spec.to_json(),
                coordinator_public_key=self.identity.public_key,
            ),
        )

    # ------------------------------------------------------------ updates

    def submit_update(self, verified: Verified) -> pb.SubmitUpdateReply:
        req: pb.SubmitUpdateRequest = verified.body  # type: ignore[assignment]
        node_id = verified.sender_id
        job, round = verified.job, verified.round
        update_id = make_update_id(job, round, req, node_id)
        with self.lock:
            slot = self.state.one(
                "SELECT * FROM placement WHERE job=? AND pool=? AND stage=?", (job, req.pool, req.stage)
            )
            if slot is None or slot["node_id"] != node_id:
                return self._reject(
                    verified,
                    update_id,
                    f"node {node_id[:8]} does not hold stage {req.stage} of pool {req.pool!r} in this round",
                )
            accepted = self.state.one(
                "SELECT * FROM updates WHERE job=? AND round=? AND pool=? AND stage=? AND status='accepted'",
                (job, round, req.pool, req.stage),
            )
            if accepted is not None:
                if accepted["update_id"] == update_id:
                    return pb.SubmitUpdateReply(
                        status=pb.UPDATE_STATUS_ACCEPTED, update_id=update_id, reason="already accepted"
                    )
                return self._reject(
                    verified,
                    update_id,
                    f"stage {req.stage} of pool {req.pool!r} already has an accepted update this round",
                )
            round_row = self.state.one("SELECT * FROM rounds WHERE job=? AND round=?", (job, round))
            start_cid = json.loads(round_row["start_weights"])[str(req.stage)]
            if req.base_weights_cid != start_cid:
                return self._reject(
                    verified,
                    update_id,
                    f"the update is relative to {req.base_weights_cid}, not this round's start weights {start_cid}",
                )
        spec = self.job_spec(self.running_job())
        try:
            weights_spec = self.closer.weights_spec(job, round, req.stage)
            delta = load_update(self.store, req, weights_spec=weights_spec, method=spec.compression)
        except (ProtocolError, ValueError) as e:
            return self._reject(verified, update_id, f"{type(e).__name__}: {e}")
        self.closer.keep_delta(req.blob_cid, spec.compression, delta)  # the close need not fetch it again
        # The signed envelope is kept (in the database now, committed before the answer) and its
        # CID recorded: the round's close stores the round's envelopes together as one blob, and
        # the result names it and them, so anyone can re-verify the inputs later (`panal admin verify-round`).
        envelope = _envelope_bytes(verified)
        outcome = self._accepted.submit(
            _Accepted(update_id, job, round, node_id, req, envelope, str(cid_of_bytes(envelope)))
        )
        if self.close_in_background:
            self.round_ready.set()
        if outcome == "written":
            return pb.SubmitUpdateReply(status=pb.UPDATE_STATUS_ACCEPTED, update_id=update_id)
        if outcome == "already":  # the same update, committed by a concurrent call
            return pb.SubmitUpdateReply(
                status=pb.UPDATE_STATUS_ACCEPTED, update_id=update_id, reason="already accepted"
            )
        if outcome == "closed":
            return self._reject(verified, update_id, f"round {round} closed while the update was being checked")
        # Another update of this slot was committed while this one was checked.
        return self._reject(
            verified, update_id, f"stage {req.stage} of pool {req.pool!r} already has an accepted update this round"
        )

    def _commit_accepted(self, batch: Sequence[_Accepted]) -> list[Committed]:
        """Commit accepted updates together (``self._accepted``, a GroupCommit); per update,
        "written", "already" (that very update was in), "taken" (its slot holds another: the
        unique index ``updates_accepted_slot`` refused it) or "closed" (its round is no longer open).

        The rounds are checked open under the lock and their commits counted in flight; the
        transaction and its disk wait run outside it (State.commit_tx), and a close of one of
        these rounds waits for them (await_commits): an update answered "written" is in its
        round's close, never after it."""
        rounds = {(u.job, u.round) for u in batch}
        with self.lock:
            while any(self._closing[r] for r in rounds):  # a close is waiting: let it go first
                self._commits.wait()
            open_rounds = {
                (job, round)
                for job, round in rounds
                if self.state.one(
                    "SELECT 1 FROM rounds WHERE job=? AND round=? AND state='open'", (job, round)
                )
            }
            self._committing.update(open_rounds)
        out: list[Committed] = []
        committed = False
        try:
            with self.state.commit_tx() as db:
                for u in batch:
                    out.append(self._insert_accepted(db, u) if (u.job, u.round) in open_rounds else "closed")
            committed = True
        finally:
            with self.lock:
                for u, outcome in zip(batch, out if committed else [], strict=False):
                    if outcome == "written":  # counted before a close waiting for it goes on
                        self.closer.row_written(u.job, u.round)
                self._committing.subtract(open_rounds)
                self._committing = +self._committing  # drop the zeros
                self._commits.notify_all()
        with self.lock:
            self.metrics.updates.labels(status="accepted").inc(out.count("written"))
            if not self.close_in_background:
                for job, round in sorted(open_rounds):
                    self.closer.maybe_close(job, round)
        return out

    def _insert_accepted(self, db: Any, u: _Accepted) -> Committed:
        req = u.request
        written = db.execute(
            "INSERT OR IGNORE INTO updates(update_id, job, round, pool, stage, node_id, envelope,"
            " envelope_cid, blob_cid, status, reason, received_ms, tokens, loss, norm)"
            " VALUES(?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (
                u.update_id,
                u.job,
                u.round,
                req.pool,
                req.stage,
                u.node_id,
                u.envelope,
                u.envelope_cid,
                req.blob_cid,
                "accepted",
                "",
                now_ms(),
                req.tokens,
                req.loss,
                req.norm,
            ),
        ).rowcount
        if not written:
            held = db.execute(
                "SELECT update_id FROM updates WHERE job=? AND round=? AND pool=? AND stage=?"
                " AND status='accepted'",
                (u.job, u.round, req.pool, req.stage),
            ).fetchone()
            return "already" if held is not None and held["update_id"] == u.update_id else "taken"
        self.state.audit(
            "update_accepted", node_id=u.node_id, job=u.job, round=u.round, db=db,
            pool=req.pool, stage=req.stage,
        )  # fmt: skip
        return "written"

    def await_commits(self, job: str, round: int) -> None:
        """Wait (the caller holds the lock, released meanwhile) until no accepted update of the
        round is being committed; none starts while a caller waits."""
        key = (job, round)
        self._closing[key] += 1
        try:
            while self._committing[key]:
                self._commits.wait()
        finally:
            self._closing[key] -= 1
            if not self._closing[key]:
                del self._closing[key]
            self._commits.notify_all()

    def commits_in_flight(self, job: str, round: int) -> bool:
        return self._committing[(job, round)] > 0

    def _reject(self, verified: Verified, update_id: str, reason: str) -> pb.SubmitUpdateReply:
        req: pb.SubmitUpdateRequest = verified.body  # type: ignore[assignment]
        rid = f"{update_id}-r{now_ms()}"
        with self.state.tx() as db:
            db.execute(
                "INSERT INTO updates(update_id, job, round, pool, stage, node_id, envelope, blob_cid, status, reason,"
                " received_ms, tokens, loss, norm) VALUES(?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    rid,
                    verified.job,
                    verified.round,
                    req.pool,
                    req.stage,
                    verified.sender_id,
                    _envelope_bytes(verified),
                    req.blob_cid,
                    "rejected",
                    reason,
                    now_ms(),
                    req.tokens,
                    req.loss,
                    req.norm,
                ),
            )
            self.state.audit(
                "update_rejected",
                node_id=verified.sender_id,
                job=verified.job,
                round=verified.round,
                db=db,
                pool=req.pool,
                stage=req.stage,
                reason=reason,
            )
        self.closer.row_written(verified.job, verified.round)
        self.metrics.updates.labels(status="rejected").inc()
        log.warning(
            "rejected update of %s for %s/%s round %s: %s",
            verified.sender_id[:8],
            req.pool,
            req.stage,
            verified.round,
            reason,
        )
        return pb.SubmitUpdateReply(status=pb.UPDATE_STATUS_REJECTED, update_id=rid, reason=reason)

    def round_result(self, verified: Verified) -> pb.GetRoundResultReply:
        row = self.state.one("SELECT * FROM rounds WHERE job=? AND round=?", (verified.job, verified.round))
        if row is None:
            raise WrongContextError(f"job {verified.job!r} has no round {verified.round}")
        if row["state"] != "closed":
            return pb.GetRoundResultReply(ready=False, retry_after_ms=500)
        data = self.store.get_bytes(row["result_cid"], max_bytes=16 << 20)
        return pb.GetRoundResultReply(
            ready=True, result=pb.Envelope.FromString(data), result_cid=row["result_cid"]
        )

    # ------------------------------------------------------------ faults and time

    def close_if_complete(self) -> None:
        """Close the open round if every expected update is in (the loop's answer to ``round_ready``)."""
        job = self.running_job()
        if job is not None and job["state"] == "running":
            self.closer.maybe_close(job["job"], int(job["round"]))

    def tick(self) -> None:
        """Periodic work: node timeouts, job start, round deadlines. Safe to call at any time."""
        with self.lock:
            self.state.flush_heartbeats_if_due()
            job = self.running_job()
            timeout_ms = int(self.settings.heartbeat_timeout_s * 1000)
            for node in self.state.silent_nodes(timeout_ms):
                self.state.set_node_state(node.node_id, "lost")
                self.state.audit(
                    "node_lost", node_id=node.node_id, silent_ms=now_ms() - node.last_heartbeat_ms
                )
                log.warning("node %s of pool %s lost (no heartbeat)", node.node_id[:8], node.pool)
                if job is not None and job["state"] == "running":
                    self._replace(job, node, "lost: no heartbeat")
            if job is None:
                return
            if job["state"] == "waiting":
                self._start_job(job)
                return
            self.closer.maybe_close(job["job"], int(job["round"]), deadline_check=True)

    def _replace(self, job: Any, node: Node, why: str) -> None:
        """A placed node is gone: a standby of its pool takes the stage, or the pool leaves the round."""
        slot = self.state.one("SELECT * FROM placement WHERE job=? AND node_id=?", (job["job"], node.node_id))
        if slot is None:
            return
        spec = self.job_spec(job)
        placed = {
            r["node_id"] for r in self.state.query("SELECT node_id FROM placement WHERE job=?", (job["job"],))
        }
        needs = self.closer.stage_needs(spec)
        standby = [
            n
            for n in self.state.nodes(pool=node.pool)
            if n.state == "active" and n.node_id not in placed and _memory_of(n) >= needs[int(slot["stage"])]
        ]
        with self.state.tx() as db:
            if standby:
                new = sorted(standby, key=lambda n: (-_memory_of(n), n.node_id))[0]
                db.execute(
                    "UPDATE placement SET node_id=?, reason=? WHERE job=? AND pool=? AND stage=?",
                    (
                        new.node_id,
                        f"standby took over from {node.node_id[:8]} ({why})",
                        job["job"],
                        node.pool,
                        slot["stage"],
                    ),
                )
                db.execute(
                    "UPDATE pools SET epoch=epoch+1, state='active', detail=? WHERE job=? AND pool=?",
                    (
                        f"node {node.node_id[:8]} {why}; standby {new.node_id[:8]} took stage {slot['stage']}",
                        job["job"],
                        node.pool,
                    ),
                )
                self.state.audit(
                    "failover",
                    node_id=new.node_id,
                    job=job["job"],
                    db=db,
                    replaced=node.node_id,
                    stage=slot["stage"],
                )
                log.warning(
                    "pool %s: standby %s takes stage %s from %s",
                    node.pool,
                    new.node_id[:8],
                    slot["stage"],
                    node.node_id[:8],
                )
            else:
                db.execute(
                    "UPDATE pools SET state='degraded', detail=? WHERE job=? AND pool=?",
                    (
                        f"node {node.node_id[:8]} {why}; no standby: the pool sits out until it has one",
                        job["job"],
                        node.pool,
                    ),
                )
                self.state.audit("pool_degraded", node_id=node.node_id, job=job["job"], db=db, pool=node.pool)
                log.warning("pool %s degraded: node %s %s and no standby", node.pool, node.node_id[:8], why)
        self.closer.maybe_close(job["job"], int(job["round"]))

    def _pool_failed(self, job: Any, pool: str, why: str) -> None:
        row = self.state.one("SELECT state FROM pools WHERE job=? AND pool=?", (job["job"], pool))
        if row is None or row["state"] != "active":
            return
        with self.state.tx() as db:
            db.execute(
                "UPDATE pools SET state='failed', detail=? WHERE job=? AND pool=?", (why, job["job"], pool)
            )
            self.state.audit("pool_failed", job=job["job"], db=db, pool=pool, reason=why)
        log.warning("pool %s failed: %s", pool, why)
        self.closer.maybe_close(job["job"], int(job["round"]))

    def quarantine(self, node_id: str, reason: str) -> None:
        """Exclude a node until an admin re-admits it; a standby takes its stage."""
        node = self.state.node(node_id)
        if node is None or node.state in ("quarantined", "evicted"):
            return
        with self.lock:
            self.state.set_node_state(node_id, "quarantined")
            self.state.audit("quarantined", node_id=node_id, reason=reason)
            self.metrics.quarantined.inc()
            log.warning("node %s of pool %s quarantined: %s", node_id[:8], node.pool, reason)
            job = self.running_job()
            if job is not None and job["state"] == "running":
                self._replace(job, node, f"quarantined ({reason})")

    def readmit(self, node_id: str, reason: str) -> bool:
        """Lift a quarantine or an eviction; the node's reputation starts afresh."""
        node = self._find(node_id)
        with self.lock:
            self.state.set_node_state(node.node_id, "active")
            self.state.heartbeat(node.node_id, node.status)
            self.state.audit("readmitted", node_id=node.node_id, reason=reason)
            job = self.running_job()
            if job is not None:
                key = f"reputation/{job['job']}"
                raw = self.state.get_kv(key)
                if raw:
                    rep = Reputation.from_dict(json.loads(raw)).release(node.node_id)
                    self.state.set_kv(key, json.dumps(rep.to_dict()))
        return True

    def _find(self, node_id: str) -> Node:
        node = self.state.node(node_id)
        if node is None:
            matches = [n for n in self.state.nodes() if n.node_id.startswith(node_id)]
            if len(matches) != 1:
                raise MalformedMessage(f"no single node matches {node_id!r}; see `panal admin nodes`")
            node = matches[0]
        return node

    def evict(self, node_id: str, reason: str) -> bool:
        node = self.state.node(node_id) or next(
            (n for n in self.state.nodes() if n.node_id.startswith(node_id)), None
        )
        if node is None:
            raise MalformedMessage(f"no node {node_id!r}; see `panal admin nodes`")
        with self.lock:
            self.state.set_node_state(node.node_id, "evicted")
            self.state.audit("evicted", node_id=node.node_id, reason=reason)
            job = self.running_job()
            if job is not None and job["state"] == "running":
                self._replace(job, node, f"evicted by the admin ({reason})")
        return True


@functools.lru_cache(maxsize=16)
def _parse_spec(text: str) -> JobSpec:
    # A stored spec never changes and JobSpec is frozen: parse each one once, not on every call.
    return JobSpec.model_validate_json(text)


def _token_hash(token: str) -> str:
    # Only a hash is stored: a copy of the database does not hand out valid tokens.
    return hashlib.sha256(token.encode()).hexdigest()


def _memory_of(node: Node) -> int:
    caps = pb.Capabilities.FromString(node.capabilities) if node.capabilities else pb.Capabilities()
    return int(caps.gpu_memory_bytes if caps.gpu_count else caps.host_memory_bytes)


def _envelope_bytes(verified: Verified) -> bytes:
    return verified.envelope.SerializeToString()
