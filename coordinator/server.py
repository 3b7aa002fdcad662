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
"""

from __future__ import annotations

import base64
import json
import logging
import signal
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from coordinator.core import Coordinator, Settings
from coordinator.metrics import Metrics
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
        return cls(home=home, **data)

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
        admins=[base64.b64encode(admin.public_key).decode()],
    )
    config.save()
    State(home / "state.db").close()
    return config


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


def setup_logging(fmt: str = "json", level: int = logging.INFO) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter() if fmt == "json" else logging.Formatter("%(asctime)s %(levelname)s %(message)s")
    )
    root = logging.getLogger("panal")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


class RunningCoordinator:
    """A coordinator serving on its ports, with its background loop. `stop()` ends it."""

    def __init__(self, config: CoordinatorConfig, *, tick_s: float = 0.5) -> None:
        home = config.home
        self.config = config
        self.state = State(home / "state.db")
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
        )
        interceptor = EnvelopeInterceptor(
            replay=ReplayGuard(),
            expected_context=self.coordinator.expected_context,
            authorize=self.coordinator.authorize,
        )
        self.server = build_server(interceptor, max_workers=32)
        pb_grpc.add_NodeServiceServicer_to_server(NodeService(self.coordinator), self.server)
        pb_grpc.add_AdminServiceServicer_to_server(AdminService(self.coordinator), self.server)
        server_cert = tls.load(home / "server.pem", home / "server.key")
        self.port = self.server.add_secure_port(
            config.listen, tls.server_credentials(ca.cert_pem, server_cert)
        )
        self.enroll_port = self.server.add_secure_port(
            config.enroll_listen, tls.server_credentials(ca.cert_pem, server_cert, require_client_auth=False)
        )
        if not self.port or not self.enroll_port:
            raise OSError(f"cannot listen on {config.listen} and {config.enroll_listen}: ports in use?")
        self._stop = threading.Event()
        self._tick_s = tick_s
        self._loop = threading.Thread(target=self._run_loop, name="panal-tick", daemon=True)

    def start(self) -> RunningCoordinator:
        self.server.start()
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
        while not self._stop.wait(self._tick_s):
            try:
                self.coordinator.tick()
            except Exception:  # the loop must outlive any one bad tick
                log.exception("tick failed")

    def stop(self, grace: float = 5.0) -> None:
        self._stop.set()
        self.server.stop(grace).wait(grace + 1)
        self._loop.join(timeout=5)
        self.state.close()
        log.info("coordinator stopped")


def serve(home: str | Path) -> None:
    """Run until SIGTERM or SIGINT; then stop cleanly (in-flight calls get a grace period)."""
    running = RunningCoordinator(CoordinatorConfig.load(home)).start()
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    while not done.wait(1.0):
        pass
    running.stop()
