"""`panal coordinator init` and `serve`: the coordinator's files, and the running server.

A coordinator directory holds::

    config.yaml                 addresses, store, timeouts, admin keys
    ca.pem, ca.key              the CA that signs node and admin certificates (key 0600)
    server.pem, server.key      the coordinator's TLS certificate
    coordinator.key(.pub)       the Ed25519 identity that signs round results
    admin.key(.pub), admin.pem, admin-tls.key   the first admin's identity and client certificate
    state.db                    SQLite (WAL): everything the coordinator knows

`serve` listens on two ports: the main one is mutual TLS (every call but
Enroll needs a client certificate issued by this CA); the enrollment port is
server-authenticated TLS and serves Enroll only in practice, since every other
call there lacks a client certificate and is refused by the interceptor.

With ``frontends: K`` (K > 0) it starts K front-end processes that serve the
main port in this process's place: they answer heartbeats on more cores and
forward every other call here over a Unix socket (coordinator/frontend.py,
coordinator/relay.py).
For fleets of hundreds of nodes; the default, 0, serves everything from one
process.
"""

from __future__ import annotations

import base64
import gc
import logging
import os
import shutil
import signal
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from coordinator.core import Coordinator, Settings
from coordinator.frontend import HEARTBEATS_KEY, FrontendProcess
from coordinator.metrics import Metrics
from coordinator.relay import RelayServer, method_handlers
from coordinator.service import AdminService, NodeService
from coordinator.state import State
from protocol import panal_pb2_grpc as pb_grpc
from protocol import tls
from protocol.identity import Identity, read_public_key
from protocol.replay import ReplayGuard
from protocol.server import EnvelopeInterceptor, build_server
from storage.stores import open_store

log = logging.getLogger("panal.coordinator")


@dataclass
class CoordinatorConfig:
    home: Path
    listen: str = "127.0.0.1:7700"
    enroll_listen: str = "127.0.0.1:7701"
    metrics_listen: str = "127.0.0.1:9700"
    store: str = ""
    heartbeat_interval_ms: int = 1000
    heartbeat_timeout_s: float = 15.0
    frontends: int = 0  # processes serving the main port in this one's place (coordinator/frontend.py)
    admins: list[str] = field(default_factory=list)  # base64 Ed25519 public keys

    @classmethod
    def load(cls, home: str | Path) -> CoordinatorConfig:
        home = Path(home).expanduser()
        path = home / "config.yaml"
        if not path.is_file():
            raise FileNotFoundError(f"no coordinator at {home}: run `panal coordinator init {home}` first")
        data = yaml.safe_load(path.read_text()) or {}
        known = set(cls.__dataclass_fields__) - {"home"}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"{path}: unknown settings {sorted(unknown)}; known: {sorted(known)}")
        config = cls(home=home, **data)
        if not isinstance(config.frontends, int) or not 0 <= config.frontends <= 64:
            raise ValueError(
                f"{path}: frontends must be a whole number from 0 to 64, not {config.frontends!r}"
            )
        return config

    def save(self) -> None:
        data = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "home"}
        (self.home / "config.yaml").write_text(yaml.safe_dump(data, sort_keys=False))

    @property
    def store_url(self) -> str:
        return self.store or f"local:{self.home / 'store'}"


def init(
    home: str | Path,
    *,
    hostnames: list[str],
    port: int = 7700,
    enroll_port: int = 7701,
    metrics_port: int = 9700,
    bind: str = "127.0.0.1",
    store: str = "",
    heartbeat_timeout_s: float = 15.0,
    frontends: int = 0,
) -> CoordinatorConfig:
    """Create a coordinator directory: CA, server certificate, identities, config, database."""
    home = Path(home).expanduser()
    if (home / "config.yaml").exists():
        raise FileExistsError(f"{home} already holds a coordinator; pick another directory")
    home.mkdir(parents=True, exist_ok=True)
    ca = tls.make_ca()
    tls.save(ca, home / "ca.pem", home / "ca.key")
    tls.save(tls.make_server_cert(ca, hostnames), home / "server.pem", home / "server.key")
    Identity.generate().save(home / "coordinator.key")
    admin = Identity.generate()
    admin.save(home / "admin.key")
    tls.save(tls.make_client_cert(ca, admin.fingerprint), home / "admin.pem", home / "admin-tls.key")
    config = CoordinatorConfig(
        home=home,
        listen=f"{bind}:{port}",
        enroll_listen=f"{bind}:{enroll_port}",
        metrics_listen=f"{bind}:{metrics_port}",
        store=store,
        heartbeat_timeout_s=heartbeat_timeout_s,
        frontends=frontends,
        admins=[base64.b64encode(admin.public_key).decode()],
    )
    config.save()
    State(home / "state.db").close()
    return config


class RunningCoordinator:
    """A coordinator serving on its ports, with its background loop. `stop()` ends it."""

    def __init__(self, config: CoordinatorConfig, *, tick_s: float = 0.5) -> None:
        home = config.home
        self.config = config
        self.state = State(home / "state.db", checkpoints=False)  # the loop checkpoints
        self.metrics = Metrics()
        ca = tls.load(home / "ca.pem", home / "ca.key")
        admins = {base64.b64decode(k) for k in config.admins}
        if (home / "admin.key.pub").exists():
            admins.add(read_public_key(home / "admin.key.pub"))
        self.coordinator = Coordinator(
            state=self.state,
            store=open_store(config.store_url),
            identity=Identity.load(home / "coordinator.key"),
            ca=ca,
            admins=admins,
            settings=Settings(
                heartbeat_interval_ms=config.heartbeat_interval_ms,
                heartbeat_timeout_s=config.heartbeat_timeout_s,
            ),
            metrics=self.metrics,
            close_in_background=True,
        )
        self.coordinator.before_close = GarbageCollection()
        if config.frontends:
            # Round work (aggregation) leaves the front-ends the cores they were given.
            torch.set_num_threads(max(1, (os.cpu_count() or 1) - config.frontends))
        interceptor = EnvelopeInterceptor(
            replay=ReplayGuard(),
            expected_context=self.coordinator.expected_context,
            authorize=self.coordinator.authorize,
        )
        self.server = build_server(interceptor, max_workers=32)
        pb_grpc.add_NodeServiceServicer_to_server(NodeService(self.coordinator), self.server)
        pb_grpc.add_AdminServiceServicer_to_server(AdminService(self.coordinator), self.server)
        server_cert = tls.load(home / "server.pem", home / "server.key")
        # With front-ends, they listen on the main port (start() learns it) and this process does not.
        self.port = 0
        if not config.frontends:
            self.port = self.server.add_secure_port(
                config.listen, tls.server_credentials(ca.cert_pem, server_cert)
            )
            if not self.port:
                raise OSError(f"cannot listen on {config.listen}: port in use?")
        self.enroll_port = self.server.add_secure_port(
            config.enroll_listen, tls.server_credentials(ca.cert_pem, server_cert, require_client_auth=False)
        )
        if not self.enroll_port:
            raise OSError(f"cannot listen on {config.enroll_listen}: port in use?")
        # Front-ends forward calls here over a Unix socket in a directory only this user can enter.
        self.frontends: list[FrontendProcess] = []
        self._run_dir: str | None = None
        self.relay: RelayServer | None = None
        self.primary_address = ""
        if config.frontends:
            self._run_dir = tempfile.mkdtemp(prefix="panal-coordinator-")
            path = f"{self._run_dir}/coordinator.sock"
            self.primary_address = f"unix:{path}"
            forwarded = EnvelopeInterceptor(
                replay=interceptor.replay,
                expected_context=self.coordinator.expected_context,
                authorize=self.coordinator.authorize,
                forwarded=True,
            )
            handlers = method_handlers(
                forwarded,
                [
                    lambda s: pb_grpc.add_NodeServiceServicer_to_server(NodeService(self.coordinator), s),
                    lambda s: pb_grpc.add_AdminServiceServicer_to_server(AdminService(self.coordinator), s),
                ],
            )
            try:
                self.relay = RelayServer(path, handlers, max_workers=32)
            except OSError as e:
                raise OSError(f"cannot listen on {path} for the front-ends: {e}") from e
            self.frontends = [
                FrontendProcess(home, config.listen, self.primary_address) for _ in range(config.frontends)
            ]
        self._frontend_heartbeats = int(self.state.get_kv(HEARTBEATS_KEY) or 0)
        self._stop = threading.Event()
        self._stopped = False
        self._tick_s = tick_s
        self._loop = threading.Thread(target=self._run_loop, name="panal-tick", daemon=True)

    def start(self) -> RunningCoordinator:
        self.server.start()
        if self.relay is not None:
            self.relay.start()
        try:
            for frontend in self.frontends:
                frontend.port = self.port  # 0 for the first when the config says port 0: it picks one
                self.port = frontend.start().port
        except Exception:
            self.stop(grace=0)
            raise
        host, _, port = self.config.metrics_listen.rpartition(":")
        if int(port):
            self.metrics.serve(int(port), host)
        self._loop.start()
        log.info(
            "coordinator serving: mTLS %s, enrollment %s, metrics %s, store %s",
            self.config.listen,
            self.config.enroll_listen,
            self.config.metrics_listen,
            self.config.store_url,
        )
        return self

    def _run_loop(self) -> None:
        """Every tick: node timeouts, job start, round deadlines; at once: a round whose updates are all in."""
        ready = self.coordinator.round_ready
        next_tick = time.monotonic() + self._tick_s
        collect_garbage(full=True)
        while not self._stop.is_set():
            woke = ready.wait(max(0.0, next_tick - time.monotonic()))
            if self._stop.is_set():
                break
            try:
                if woke:
                    ready.clear()
                    self.coordinator.close_if_complete()
                if time.monotonic() >= next_tick:
                    next_tick = time.monotonic() + self._tick_s
                    if self.frontends:
                        self._watch_frontends()
                    self.coordinator.tick()
                    self.state.checkpoint()
            except Exception:  # the loop must outlive any one bad tick
                log.exception("tick failed")

    def _watch_frontends(self) -> None:
        """Take in the front-ends' heartbeats (before the tick looks for silent nodes); restart one that died."""
        self.state.merge_heartbeats()
        count = int(self.state.get_kv(HEARTBEATS_KEY) or 0)
        if count > self._frontend_heartbeats:
            self.metrics.heartbeats.inc(count - self._frontend_heartbeats)
        self._frontend_heartbeats = count
        for frontend in self.frontends:
            code = frontend.exited()
            if code is not None and not self._stop.is_set():
                log.error("front-end %s exited with code %s; starting it again", frontend.pid, code)
                try:
                    frontend.start()
                except RuntimeError:
                    if self._stop.is_set():  # stopped while it started: nothing to restart
                        return
                    raise

    @property
    def pids(self) -> list[int]:
        """This process and its front-ends."""
        return [os.getpid(), *(f.pid for f in self.frontends if f.pid is not None)]

    def stop(self, grace: float = 5.0) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._stop.set()
        self.coordinator.round_ready.set()  # wakes the loop
        for frontend in self.frontends:
            frontend.stop(grace)
        self.server.stop(grace).wait(grace + 1)
        if self.relay is not None:
            self.relay.stop(grace)
        if self._loop.is_alive():
            self._loop.join(timeout=5)
        if self.frontends:
            self.state.merge_heartbeats()  # their last flush, so that nodes.status keeps it
        self.state.close()
        gc.unfreeze()  # a process that goes on (one that embeds a coordinator, a test) collects as before
        if self._run_dir is not None:
            shutil.rmtree(self._run_dir, ignore_errors=True)
        log.info("coordinator stopped")


FULL_COLLECTION_EVERY = 10  # rounds


class GarbageCollection:
    """Python's collections done as each round starts to close, not inside the calls answered.

    The collector runs in whichever thread allocates, holding the GIL for as long as it takes
    to scan every object it tracks: ~0.2-0.4 s in a coordinator with torch, gRPC and a job
    loaded, inside whatever call was being answered (bench/coordinator.py saw updates wait for
    it). At ``Coordinator.before_close`` every update is in and no node submits until the
    result is out: there the round's objects are collected and the survivors set aside
    (``gc.freeze``), so that collections during the next round scan only what it makes
    (milliseconds). Every FULL_COLLECTION_EVERY rounds, everything is unfrozen and scanned
    again, so that frozen objects that became garbage since are freed too.
    """

    def __init__(self) -> None:
        self.closes = 0

    def __call__(self) -> None:
        self.closes += 1
        collect_garbage(full=self.closes % FULL_COLLECTION_EVERY == 0)


def collect_garbage(*, full: bool) -> None:
    """Collect, then freeze what survives; ``full``: everything, the frozen objects included."""
    if full:
        gc.unfreeze()
    gc.collect()
    gc.freeze()


def serve(home: str | Path) -> None:
    """Run until SIGTERM or SIGINT; then stop cleanly (in-flight calls get a grace period)."""
    running = RunningCoordinator(CoordinatorConfig.load(home)).start()
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    while not done.wait(1.0):
        pass
    running.stop()
