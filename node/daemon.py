"""The node daemon (`panal node start`): identity, enrollment, heartbeats, and the worker it supervises.

The daemon is small and long-lived. It holds the node's identity
(HOME/node.key, 0600), enrolls once with a single-use token (receiving its
mTLS client certificate), heartbeats, and asks for its assignment. Training
runs in a separate worker process (node/worker.py), one per assignment epoch:
when the coordinator changes the pool's DeepSpeed world (a node lost, a
standby taking over, a pool re-forming) the daemon stops the worker and starts
a new one; a process group cannot be re-formed in place.

When the coordinator goes away the daemon retries with exponential backoff;
SIGTERM stops the worker and then the daemon, cleanly.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.json_format import MessageToJson

from protocol import panal_pb2 as pb
from protocol import tls
from protocol.client import Client, HeartbeatStream
from protocol.identity import load_or_create

log = logging.getLogger("panal.node")

BACKOFF_MIN_S, BACKOFF_MAX_S = 0.5, 10.0
WORKER_GRACE_S = 3.0
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED)
# A coordinator that serves no heartbeat streams (older) or holds too many: unary calls for a while.
STREAM_REFUSED = (grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.RESOURCE_EXHAUSTED)
UNARY_FALLBACK_S = 600.0


@dataclass(frozen=True, kw_only=True)
class NodeConfig:
    home: Path
    coordinator: str  # HOST:PORT of the mTLS port
    enroll: str  # HOST:PORT of the enrollment port
    ca: Path  # the coordinator's CA certificate (the trust anchor, given out of band)
    pool: str
    token: str | None = None
    name: str = ""
    store: str | None = None
    data_host: str = "127.0.0.1"
    memory_bytes: int | None = None  # declared device memory; default: measured
    # An update policy other than honest (node/policy.py): for simulations and tests of the
    # defence. The daemon is otherwise the ordinary one.
    attack: dict[str, Any] | None = None
    # A fault to inject (simulations and tests): {"die_at_round": K, "marker": PATH} makes the
    # first node to reach the middle of round K SIGKILL itself, daemon and worker, as a crash would.
    fault: dict[str, Any] | None = None


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def capabilities(memory_bytes: int | None) -> pb.Capabilities:
    import torch

    from panal import __version__

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return pb.Capabilities(
            accelerator="cuda",
            gpu_type=props.name,
            gpu_count=torch.cuda.device_count(),
            gpu_memory_bytes=memory_bytes or props.total_memory,
            host_memory_bytes=_host_memory(),
            cpu_count=os.cpu_count() or 1,
            software_version=__version__,
        )
    return pb.Capabilities(
        accelerator="cpu",
        host_memory_bytes=memory_bytes or _host_memory(),
        cpu_count=os.cpu_count() or 1,
        software_version=__version__,
    )


def _host_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


class NodeDaemon:
    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.home = config.home.expanduser()
        self.home.mkdir(parents=True, exist_ok=True)
        self.identity, created = load_or_create(self.home / "node.key")
        if created:
            log.info("created identity %s at %s", self.identity.fingerprint, self.home / "node.key")
        self.stopping = threading.Event()
        self.worker: subprocess.Popen[bytes] | None = None
        self.worker_epoch: tuple[str, int] | None = None
        self.backoff = BACKOFF_MIN_S
        self.stream: HeartbeatStream | None = None  # heartbeats on one long-lived call
        self.unary_until = 0.0  # monotonic time before which heartbeats are unary calls

    # ------------------------------------------------------------ enrollment

    def enrolled(self) -> bool:
        return (self.home / "node.pem").exists() and (self.home / "node-tls.key").exists()

    def enroll(self) -> None:
        """Enroll with the token (once); keep the certificate and the coordinator's key."""
        if not self.config.token:
            raise SystemExit(
                f"{self.home} has no certificate yet: give --token (from `panal admin token create`)"
            )
        csr, key = tls.make_csr(self.identity.fingerprint)
        port = free_port(self.config.data_host)
        request = pb.EnrollRequest(
            token=self.config.token,
            pool=self.config.pool,
            name=self.config.name or socket.gethostname(),
            capabilities=capabilities(self.config.memory_bytes),
            csr_pem=csr,
            data_address=f"{self.config.data_host}:{port}",
        )
        with Client(self.config.enroll, self.identity, ca_pem=self.config.ca.read_bytes()) as c:
            reply = self._retrying(lambda: c.call(c.node, "Enroll", request))
        tls.save(tls.CertKey(reply.certificate_pem, key), self.home / "node.pem", self.home / "node-tls.key")
        (self.home / "coordinator.pub").write_bytes(reply.coordinator_public_key)
        log.info("enrolled as %s in pool %s", reply.node_id, self.config.pool)

    # ------------------------------------------------------------ main loop

    def client(self) -> Client:
        return Client(
            self.config.coordinator,
            self.identity,
            ca_pem=self.config.ca.read_bytes(),
            cert=tls.load(self.home / "node.pem", self.home / "node-tls.key"),
        )

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stopping.set())
        if not self.enrolled():
            try:
                self.enroll()
            except grpc.RpcError as e:
                log.error("enrollment refused: %s", e.details())  # type: ignore[attr-defined]
                return 2
        with self.client() as c:
            while not self.stopping.is_set():
                try:
                    self._beat(c)
                    self.backoff = BACKOFF_MIN_S
                    self.stopping.wait(1.0)
                except grpc.RpcError as e:
                    if e.code() not in RETRYABLE:  # type: ignore[attr-defined]
                        log.error("coordinator refused: %s", e.details())  # type: ignore[attr-defined]
                        if e.code() == grpc.StatusCode.PERMISSION_DENIED:  # type: ignore[attr-defined]
                            self._stop_worker()
                            return 3
                    log.warning(
                        "coordinator unreachable (%s); retrying in %.1f s", e.code().name, self.backoff
                    )  # type: ignore[attr-defined]
                    self.stopping.wait(self.backoff)
                    self.backoff = min(BACKOFF_MAX_S, self.backoff * 2)
            if self.stream is not None:
                self.stream.close()
        self._stop_worker()
        log.info("node stopped")
        return 0

    def _beat(self, c: Client) -> None:
        status = self._worker_status()
        worker_alive = self.worker is not None and self.worker.poll() is None
        state = status.get("state", "NODE_STATE_IDLE")
        if self.worker is not None and not worker_alive and self.worker.returncode not in (0, None):
            state = "NODE_STATE_FAILED"
        reply = self._heartbeat(
            c,
            pb.HeartbeatRequest(
                state=pb.NodeState.Value(state),
                step=int(status.get("step", 0)),
                loss=float(status.get("loss", 0.0)),
                tokens_per_second=float(status.get("tokens_per_second", 0.0)),
                detail=str(status.get("detail", ""))[:1000],
                round=int(status.get("round", 0)),
                weights_digest=str(status.get("weights_digest", "")),
                epoch=self.worker_epoch[1] if self.worker_epoch and worker_alive else 0,
            ),
        )
        if worker_alive and not reply.assignment_changed:
            return
        got = c.call(c.node, "GetAssignment", pb.GetAssignmentRequest())
        a = got.assignment
        if not got.has_assignment or a.standby:
            if worker_alive:
                log.info("no assignment for this node now (%s): stopping the worker", got.reason or "standby")
                self._stop_worker()
            return
        key = (a.job, a.epoch)
        if worker_alive and self.worker_epoch == key:
            return
        if worker_alive:
            log.info("the pool's world changed (epoch %s): restarting the worker", a.epoch)
            self._stop_worker()
        if self.worker is not None and self.worker.returncode not in (0, None) and self.worker_epoch == key:
            return  # it failed in this epoch; the coordinator knows (FAILED) and will move the pool on
        self._start_worker(a)

    def _heartbeat(self, c: Client, request: pb.HeartbeatRequest) -> pb.HeartbeatReply:
        """One heartbeat on the stream (opened as needed), or a unary call where streams are not served."""
        if time.monotonic() >= self.unary_until:
            if self.stream is None:
                self.stream = HeartbeatStream(c)
            try:
                return self.stream.beat(request)
            except grpc.RpcError as e:
                self.stream.close()
                self.stream = None
                if e.code() not in STREAM_REFUSED:  # type: ignore[attr-defined]
                    raise
                log.info(
                    "coordinator takes no heartbeat stream now (%s); unary heartbeats for %.0f s",
                    e.code().name,  # type: ignore[attr-defined]
                    UNARY_FALLBACK_S,
                )
                self.unary_until = time.monotonic() + UNARY_FALLBACK_S
        return c.call(c.node, "Heartbeat", request)  # type: ignore[no-any-return]

    # ------------------------------------------------------------ the worker

    def _worker_status(self) -> dict[str, Any]:
        try:
            data: dict[str, Any] = json.loads((self.home / "status.json").read_text())
            return data
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def _start_worker(self, a: pb.Assignment) -> None:
        (self.home / "assignment.json").write_text(MessageToJson(a))
        (self.home / "status.json").unlink(missing_ok=True)
        settings = {
            "coordinator": self.config.coordinator,
            "ca": str(self.config.ca),
            "store": self.config.store,
            "attack": self.config.attack,
            "fault": self.config.fault,
        }
        (self.home / "worker.json").write_text(json.dumps(settings))
        log.info(
            "starting worker: job %s round %s pool %s stage %s/%s, epoch %s",
            a.job,
            a.round,
            a.pool,
            a.stage,
            a.num_stages,
            a.epoch,
        )
        log_file = open(self.home / f"worker-{a.job}-e{a.epoch}.log", "ab")  # noqa: SIM115 - owned by the child
        self.worker = subprocess.Popen(
            [sys.executable, "-m", "node.worker", str(self.home)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PANAL_LOCAL_RANK": "0"},
        )
        log_file.close()
        self.worker_epoch = (a.job, a.epoch)

    def _stop_worker(self) -> None:
        w = self.worker
        if w is None or w.poll() is not None:
            return
        w.send_signal(signal.SIGTERM)
        # Short grace: a worker blocked in a collective of a broken world cannot run its handler,
        # and the daemon must not stop heartbeating for long (the coordinator would lose it).
        try:
            w.wait(timeout=WORKER_GRACE_S)
        except subprocess.TimeoutExpired:
            w.kill()
            w.wait()

    def _retrying(self, fn: Any) -> Any:
        delay = BACKOFF_MIN_S
        while True:
            try:
                return fn()
            except grpc.RpcError as e:
                if e.code() not in RETRYABLE or self.stopping.is_set():  # type: ignore[attr-defined]
                    raise
                log.warning("coordinator unreachable; retrying in %.1f s", delay)
                self.stopping.wait(delay)
                delay = min(BACKOFF_MAX_S, delay * 2)
