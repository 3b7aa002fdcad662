"""The training worker: one process per assignment epoch, started by the node daemon.

    python -m node.worker HOME

It joins its pool's DeepSpeed world (rank, world size and master address from
the assignment), then for each round: loads the round's start weights (checked
against their CID) into the module and the FP32 master copy, trains H inner
steps, computes the pseudo-gradient Δ = θ_start − θ_now, compresses it, puts
it in the store, submits the signed update, waits for the coordinator's
signed round result, verifies it, and goes on with the new weights.

It reports progress to HOME/status.json, which the daemon heartbeats. It exits
0 when the assignment changes (the daemon starts a new one), and non-zero with
the reason in the status when it cannot go on (e.g. the world cannot form).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import torch
from google.protobuf.json_format import Parse

from coordinator.job import JobSpec
from model.config import GPTConfig
from model.engine import StageEngine, TrainConfig, World, default_precision, micro_batch_iter
from node.policy import make_policy
from protocol import panal_pb2 as pb
from protocol import tls
from protocol.client import Client
from protocol.envelope import open_envelope
from protocol.errors import SignatureError
from protocol.hashing import sha256
from protocol.identity import Identity
from storage import compression, tensors
from storage.stores import open_store

log = logging.getLogger("panal.worker")
POLL_S = 0.3


class AssignmentChanged(Exception):
    """The coordinator moved this node on: exit and let the daemon start the next worker."""


def weights_digest(weights: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(weights):
        h.update(name.encode())
        h.update(weights[name].contiguous().numpy().tobytes())
    return h.hexdigest()


class Worker:
    def __init__(self, home: Path) -> None:
        self.home = home
        settings = json.loads((home / "worker.json").read_text())
        self.a = Parse((home / "assignment.json").read_text(), pb.Assignment())
        self.spec = JobSpec.model_validate_json(self.a.job_spec_json)
        self.config = GPTConfig.from_dict(json.loads(self.a.model_config_json))
        self.identity = Identity.load(home / "node.key")
        self.coordinator_key = bytes(self.a.coordinator_public_key)
        self.store = open_store(settings.get("store"))
        self.client = Client(
            settings["coordinator"],
            self.identity,
            ca_pem=Path(settings["ca"]).read_bytes(),
            cert=tls.load(home / "node.pem", home / "node-tls.key"),
        )
        self.status: dict[str, Any] = {"state": "NODE_STATE_IDLE", "epoch": self.a.epoch}
        # What this node does to its data and its update: honest, unless the operator (a test,
        # a simulation) made it an attacker. The coordinator cannot tell; it must catch it.
        attack = settings.get("attack") or {"name": "honest"}
        params = (
            {"vocab_size": self.config.vocab_size} if attack["name"] in ("label_flip", "backdoor") else {}
        )
        self.policy = make_policy(
            attack["name"],
            seed=_pool_seed(self.spec.seed, self.a.pool),
            n_pools=int(attack.get("n_pools", 0)),
            n_byzantine=int(attack.get("n_byzantine", 0)),
            **params,
        )
        self.tokens_per_step = self.spec.micro_batch * self.spec.grad_accum * self.config.seq_len
        self.fault = settings.get("fault")

    # ------------------------------------------------------------ status

    def report(self, **fields: Any) -> None:
        self.status.update(fields)
        tmp = self.home / "status.json.tmp"
        tmp.write_text(json.dumps(self.status))
        os.replace(tmp, self.home / "status.json")

    # ------------------------------------------------------------ calls

    def call(self, method: str, body: Any, *, round: int = 0) -> Any:
        """A coordinator call, retried with backoff while the coordinator is away."""
        delay = 0.5
        while True:
            try:
                return self.client.call(self.client.node, method, body, job=self.a.job, round=round)
            except grpc.RpcError as e:
                if e.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):  # type: ignore[attr-defined]
                    raise
                log.warning("coordinator unreachable during %s; retrying in %.1f s", method, delay)
                time.sleep(delay)
                delay = min(10.0, delay * 2)

    def current(self) -> pb.Assignment:
        got = self.call("GetAssignment", pb.GetAssignmentRequest())
        a = got.assignment
        if not got.has_assignment or a.standby or a.epoch != self.a.epoch or a.job != self.a.job:
            raise AssignmentChanged(got.reason or "assignment changed")
        return a

    # ------------------------------------------------------------ the work

    def run(self) -> None:
        a, spec = self.a, self.spec
        precision = default_precision() if spec.precision == "auto" else spec.precision
        tc = TrainConfig(
            total_steps=spec.total_inner_steps,
            micro_batch=spec.micro_batch,
            grad_accum=spec.grad_accum,
            lr=spec.lr,
            warmup_frac=spec.warmup_frac,
            precision=precision,  # type: ignore[arg-type]
            seed=spec.seed,
        )
        from corpus.training import dataset_source

        source = dataset_source(
            self.store,
            a.dataset_cid,
            config=self.config,
            micro_batch=spec.micro_batch,
            seed=_pool_seed(spec.seed, a.pool),
            shard_cids=list(a.shard_cids),
        )
        self.report(state="NODE_STATE_IDLE", detail=f"joining the DeepSpeed world of pool {a.pool}")
        world = World(
            rank=a.world.rank,
            world_size=a.world.world_size,
            stages=a.num_stages,
            master_addr=a.world.master_address,
            master_port=a.world.master_port,
            backend=a.world.backend,
            timeout_s=float(a.world.timeout_s or 60),
        )
        try:
            engine = StageEngine(self.config, tc, world)
        except Exception as e:  # a peer missing or gone: gloo/NCCL raise RuntimeError and friends
            reason = f"the DeepSpeed world of pool {a.pool} could not form: {type(e).__name__}: {e}"
            self.report(state="NODE_STATE_FAILED", detail=reason[:900])
            raise SystemExit(reason) from e
        while True:
            a = self.current()
            # Every round starts from the weights the coordinator published (checked against their
            # CID on read), written into the module and the FP32 master copy.
            engine.set_weights(tensors.load(self.store.get_bytes(a.start_weights_cid, max_bytes=64 << 30)))
            start = engine.get_weights()
            digest = weights_digest(start)
            self.report(round=a.round, weights_digest=digest, state="NODE_STATE_TRAINING")
            self.record_round(a, digest)
            losses = self.train(engine, source, a)
            self.submit(engine, start, a, sum(losses) / len(losses))
            self.await_result(a)

    def record_round(self, a: pb.Assignment, digest: str) -> None:
        """Append what this node holds at the start of a round: an audit trail for the operator
        (and for the end-to-end test that checks every pool holds bit-identical weights)."""
        line = {
            "job": a.job,
            "round": a.round,
            "pool": a.pool,
            "stage": a.stage,
            "epoch": a.epoch,
            "start_weights_cid": a.start_weights_cid,
            "weights_digest": digest,
        }
        with open(self.home / "rounds.jsonl", "a") as f:
            f.write(json.dumps(line) + "\n")

    def train(self, engine: StageEngine, source: Any, a: pb.Assignment) -> list[float]:
        losses = []
        for i in range(a.inner_steps):
            step = a.round * a.inner_steps + i
            t0 = time.perf_counter()
            loss = engine.train_step(
                micro_batch_iter(
                    lambda s, k: self.policy.poison_batch(*source.micro_batch(s, k), s, micro=k),
                    step,
                    self.spec.grad_accum,
                )
            )
            losses.append(loss)
            self.report(
                step=step + 1, loss=loss, tokens_per_second=self.tokens_per_step / (time.perf_counter() - t0)
            )
            if self.fault and a.round == self.fault["die_at_round"] and i + 1 == max(1, a.inner_steps // 2):
                self.crash(a)
        return losses

    def crash(self, a: pb.Assignment) -> None:
        """The injected fault: the first node here dies mid-round, daemon and worker, with SIGKILL."""
        assert self.fault is not None
        try:
            fd = os.open(self.fault["marker"], os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return  # another node took the fall
        os.write(fd, json.dumps({"home": str(self.home), "round": a.round, "stage": a.stage}).encode())
        os.close(fd)
        log.warning("injected fault: killing this node (daemon and worker) mid-round")
        os.kill(os.getppid(), signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)

    def submit(
        self, engine: StageEngine, start: dict[str, torch.Tensor], a: pb.Assignment, loss: float
    ) -> None:
        now = engine.get_weights()
        delta = {k: start[k] - now[k] for k in sorted(start)}  # the pseudo-gradient, FP32
        delta = self.policy.transform(delta, round=a.round)
        norm = float(torch.sqrt(sum((d.double() ** 2).sum() for d in delta.values())))
        blob = tensors.dump(compression.compress(delta, self.spec.compression))
        cid = self.store.put_bytes(blob, pin=True)
        self.report(state="NODE_STATE_UPLOADING")
        reply = self.call(
            "SubmitUpdate",
            pb.SubmitUpdateRequest(
                pool=a.pool,
                stage=a.stage,
                blob_cid=str(cid),
                blob_sha256=sha256(blob),
                blob_bytes=len(blob),
                base_weights_cid=a.start_weights_cid,
                compression=self.spec.compression,
                tokens=a.inner_steps * self.tokens_per_step,
                loss=loss,
                norm=norm,
            ),
            round=a.round,
        )
        verdict = pb.UpdateStatus.Name(reply.status).removeprefix("UPDATE_STATUS_").lower()
        log.info(
            "round %s: update %s %s%s", a.round, cid, verdict, f" ({reply.reason})" if reply.reason else ""
        )
        self.report(
            state="NODE_STATE_WAITING", detail=f"round {a.round} update {verdict}: {reply.reason}"[:900]
        )

    def await_result(self, a: pb.Assignment) -> str:
        """Wait for the round's signed result; verify it; return this stage's new weights CID."""
        while True:
            got = self.call("GetRoundResult", pb.GetRoundResultRequest(), round=a.round)
            if got.ready:
                break
            self.current()  # raises AssignmentChanged if the pool was re-formed meanwhile
            time.sleep(POLL_S)
        if bytes(got.result.sender) != self.coordinator_key:
            raise SignatureError("round result is not signed by the coordinator this node enrolled with")
        result = open_envelope(got.result, pb.RoundResult, replay=None, job=a.job, round=a.round).body
        mismatch = shards_mismatch(result, a)  # type: ignore[arg-type]
        if mismatch:
            log.error("round %s: %s", a.round, mismatch)
        stage = next(s for s in result.stages if s.stage == a.stage)  # type: ignore[attr-defined]
        log.info(
            "round %s closed: %s pools, mean loss %.4f, new weights %s",
            a.round,
            len(result.pools),
            result.mean_loss,
            stage.weights_cid,
        )  # type: ignore[attr-defined]
        return str(stage.weights_cid)


def shards_mismatch(result: pb.RoundResult, a: pb.Assignment) -> str | None:
    """Why the signed result's shards for this node's pool are not the ones it was assigned, or None.

    Detection judged the pool's update against the tokens of the shards the result names; a
    coordinator naming others could reject an honest pool with a story anyone re-verifying
    (`panal admin verify-round`) would accept. The node is the one that can tell.
    """
    named = next((list(p.shard_cids) for p in result.pool_shards if p.pool == a.pool), None)
    if named is None or named == list(a.shard_cids):
        return None
    return (
        f"the signed round result names shards {named} for pool {a.pool!r}, but this node was "
        f"assigned {list(a.shard_cids)}: the coordinator judged its update against other data"
    )


def _pool_seed(seed: int, pool: str) -> int:
    # Each pool draws its own batch order from its own shards.
    return int.from_bytes(hashlib.sha256(f"{seed}:{pool}".encode()).digest()[:7], "big")


def main() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stdout
    )
    torch.set_num_threads(int(os.environ.get("PANAL_THREADS", "1")))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    worker = Worker(Path(sys.argv[1]))
    try:
        worker.run()
    except AssignmentChanged as e:
        log.info("assignment changed (%s): exiting for the daemon to restart", e)
        worker.report(state="NODE_STATE_IDLE", detail=str(e)[:900])
    except SystemExit:
        raise  # the reason is already in the status
    except Exception as e:  # whatever it was, the daemon and the coordinator hear why
        worker.report(state="NODE_STATE_FAILED", detail=f"{type(e).__name__}: {e}"[:900])
        raise


if __name__ == "__main__":
    main()
