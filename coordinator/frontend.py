"""Front-end processes: the nodes' connections served on more than one core.

One Python process serves gRPC on one core at most (the GIL), and at a thousand
nodes heartbeating once a second that core is full (bench/coordinator.py). With
``frontends: K`` in config.yaml the coordinator starts K processes that listen
on its main port in its place (SO_REUSEPORT: the kernel spreads the nodes'
connections over them); the coordinator process keeps the enrollment port and
the round logic. A front-end is an asyncio gRPC server (no thread per call or
stream) that:

- answers heartbeats itself, unary or streamed, for an active node: the same
  envelope checks as the coordinator (TLS binding, digest, Ed25519 signature,
  freshness, replay), the node read from the shared SQLite file, the heartbeat
  kept in memory and written back every second (the coordinator takes it in
  within half a second: ``State.merge_heartbeats``), and the pool's epoch to
  tell the node that its assignment changed;
- forwards every other call unchanged to the coordinator process over a Unix
  socket in a private (0700) directory (coordinator/relay.py), with the name of the TLS client
  certificate the call came on; so are heartbeats from a node that is not
  active or that reports a failure, which the coordinator acts on. The
  coordinator makes every check again, its replay cache included.

Each process keeps its own replay cache, so a heartbeat replayed to another
process is answered again. It changes nothing but the node's last-seen time
within the freshness window, and it has to arrive on a connection holding the
node's own client certificate.

Run by the coordinator (``FrontendProcess``), not by hand:
``python -m coordinator.frontend HOME --listen HOST:PORT --primary unix:PATH``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import IO, Any

import grpc

from coordinator.logs import JsonFormatter, setup_logging
from coordinator.relay import RelayClient, RelayError
from coordinator.state import HEARTBEAT_SQL, State, authorize_node, heartbeat_status, now_ms
from protocol import panal_pb2 as pb
from protocol import tls
from protocol.envelope import Verified
from protocol.errors import ProtocolError, error_name, status_for
from protocol.limits import METHODS, STREAMS, MethodSpec, server_options
from protocol.replay import ReplayGuard
from protocol.server import SERVER_TUNING, EnvelopeInterceptor, client_cn

log = logging.getLogger("panal.coordinator.frontend")

FLUSH_S = 1.0  # how often a front-end writes its heartbeats to the database
FORWARD_TIMEOUT_S = 600.0  # a forwarded call without a deadline of its own
READY_TIMEOUT_S = 60.0  # a front-end must be serving within this long of its start
FRONTEND_MAX_STREAMS = 16384  # no thread per stream here: a bound on memory only
HEARTBEATS_KEY = "frontend_heartbeats"  # kv: heartbeats answered by front-ends, for the metrics
HEARTBEAT = METHODS["/panal.v1.NodeService/Heartbeat"]


class Frontend(grpc.GenericRpcHandler):  # type: ignore[misc]
    """Every NodeService and AdminService method: heartbeats answered here, the rest forwarded.

    Built inside the running event loop (its link to the coordinator belongs to it).
    """

    def __init__(self, db_path: Path, primary: str) -> None:
        # Reads nodes, the running job and its pools, cached; heartbeats are written by flush() on
        # the State's own connection, so that a write (and its wait for the database) holds up no
        # read of the calls answered meanwhile, nor drops the cache.
        self.state = State(db_path, shared=True, checkpoints=False)  # the coordinator checkpoints
        self._beats: dict[str, tuple[int, str]] = {}  # node -> (time, status JSON), since the last flush
        self._beats_lock = threading.Lock()  # flush() runs in a thread of its own
        self._answered = 0  # heartbeats answered since the last flush
        self._streams = 0
        self.checks = EnvelopeInterceptor(replay=ReplayGuard(), authorize=self._authorize)
        if not primary.startswith("unix:"):
            raise ValueError(f"the coordinator's local socket is unix:PATH, not {primary!r}")
        self.relay = RelayClient(primary.removeprefix("unix:"))
        self._handlers = {
            path: grpc.unary_unary_rpc_method_handler(
                self._heartbeat if spec is HEARTBEAT else self._forwarder(spec)
            )
            for path, spec in METHODS.items()
        }
        for path, spec in STREAMS.items():
            if spec is not HEARTBEAT:
                raise ValueError(f"a front-end answers heartbeat streams only, not {path} ({spec.name})")
            self._handlers[path] = grpc.stream_stream_rpc_method_handler(self._heartbeat_stream)

    def service(self, details: grpc.HandlerCallDetails) -> Any:
        return self._handlers.get(details.method)  # None: UNIMPLEMENTED, as the coordinator answers

    def _authorize(self, spec: MethodSpec, verified: Verified) -> None:
        authorize_node(self.state.node(verified.sender_id), verified.sender_id, verified.sender)

    async def _checked(
        self, raw: bytes, context: grpc.aio.ServicerContext, cn: str | None = None
    ) -> Verified:
        try:
            return self.checks.verify(HEARTBEAT, raw, context, cn=cn)
        except ProtocolError as e:
            log.warning("rejected Heartbeat from %s: %s: %s", context.peer(), error_name(e), e)
            await context.abort(status_for(e), f"{error_name(e)}: {e}")
            raise  # abort raises; this line is for the type checker

    async def _heartbeat(self, raw: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return await self._answer(await self._checked(raw, context), context, raw)

    async def _heartbeat_stream(
        self, raws: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        if self._streams >= FRONTEND_MAX_STREAMS:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"this front-end holds {FRONTEND_MAX_STREAMS} streams already; send unary Heartbeat calls",
            )
        self._streams += 1
        try:
            cn = client_cn(context)  # one connection, one certificate: read once per stream
            async for raw in raws:
                yield await self._answer(await self._checked(raw, context, cn), context, raw)
        finally:
            self._streams -= 1

    async def _answer(self, verified: Verified, context: grpc.aio.ServicerContext, raw: bytes) -> bytes:
        req: pb.HeartbeatRequest = verified.body
        node = self.state.node(verified.sender_id)
        if node is None or node.state != "active" or req.state == pb.NODE_STATE_FAILED:
            # The coordinator acts on these: forwarded as a unary Heartbeat, checked there again.
            return await self._forward(HEARTBEAT, raw, context)
        beat = (now_ms(), json.dumps(heartbeat_status(req)))
        with self._beats_lock:
            self._beats[node.node_id] = beat
            self._answered += 1
        job = self.state.running_job()
        pool = self.state.pool(job["job"], node.pool) if job is not None else None
        changed = pool is not None and int(pool["epoch"]) != req.epoch
        reply = pb.HeartbeatReply(server_time_ms=now_ms(), assignment_changed=changed, evicted=False)
        return reply.SerializeToString()  # type: ignore[no-any-return]

    def _forwarder(self, spec: MethodSpec) -> Callable[[bytes, grpc.aio.ServicerContext], Awaitable[bytes]]:
        async def forward(raw: bytes, context: grpc.aio.ServicerContext) -> bytes:
            return await self._forward(spec, raw, context)

        return forward

    async def _forward(self, spec: MethodSpec, raw: bytes, context: grpc.aio.ServicerContext) -> bytes:
        remaining = context.time_remaining()
        timeout = min(remaining, FORWARD_TIMEOUT_S) if remaining is not None else FORWARD_TIMEOUT_S
        try:
            return await self.relay.call(
                spec.path, raw, client_cn=client_cn(context), peer=context.peer(), timeout=timeout
            )
        except RelayError as e:
            if e.code == grpc.StatusCode.UNAVAILABLE:
                log.error("cannot reach the coordinator process for %s: %s", spec.name, e.details)
                await context.abort(
                    grpc.StatusCode.UNAVAILABLE,
                    "the coordinator is restarting or down (its front-end cannot reach it); retry with backoff",
                )
            await context.abort(e.code, e.details)
            raise  # abort raises; this line is for the type checker

    def flush(self) -> None:
        """Write the heartbeats since the last flush (over older ones only), and count them for the metrics."""
        with self._beats_lock:
            beats, self._beats = self._beats, {}
            answered, self._answered = self._answered, 0
        if not beats:
            return
        try:
            with self.state.own_tx() as db:
                db.executemany(HEARTBEAT_SQL, [(ts, st, node_id, ts) for node_id, (ts, st) in beats.items()])
                db.execute(
                    "INSERT INTO kv(key, value) VALUES(?, ?) ON CONFLICT(key)"
                    " DO UPDATE SET value = CAST(value AS INTEGER) + excluded.value",
                    (HEARTBEATS_KEY, answered),
                )
        except BaseException:
            with self._beats_lock:  # kept for the next flush; newer heartbeats meanwhile win
                self._beats = {**beats, **self._beats}
                self._answered += answered
            raise

    async def close(self) -> None:
        self.flush()
        await self.relay.close()
        self.state.close()


# ------------------------------------------------------------------ the process


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m coordinator.frontend", description=__doc__.split("\n")[0]
    )
    parser.add_argument("home", type=Path)
    parser.add_argument(
        "--listen", required=True, help="HOST:PORT, the coordinator's main port (PORT 0: any)"
    )
    parser.add_argument("--primary", required=True, help="unix:PATH of the coordinator's local socket")
    parser.add_argument("--log-format", default="json")
    args = parser.parse_args(argv)

    setup_logging(args.log_format)
    return asyncio.run(serve(args.home, args.listen, args.primary))


async def serve(home: Path, listen: str, primary: str) -> int:
    parent = os.getppid()
    frontend = Frontend(home / "state.db", primary)
    server = grpc.aio.server(options=server_options() + SERVER_TUNING)
    server.add_generic_rpc_handlers((frontend,))
    credentials = tls.server_credentials(
        (home / "ca.pem").read_bytes(), tls.load(home / "server.pem", home / "server.key")
    )
    port = server.add_secure_port(listen, credentials)
    if not port:
        log.error("front-end cannot listen on %s", listen)
        return 2
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, done.set)
    await server.start()

    def flush_loop() -> None:  # a thread: the database's waits stay off the event loop
        while not done.is_set():
            time.sleep(FLUSH_S)
            try:
                frontend.flush()
            except Exception:  # the loop must outlive a busy or failing database
                log.exception("front-end flush failed")
            if os.getppid() != parent:
                log.error("the coordinator process is gone; front-end %d stops", os.getpid())
                loop.call_soon_threadsafe(done.set)
                return

    threading.Thread(target=flush_loop, name="panal-frontend-flush", daemon=True).start()
    # What startup made lives as long as the process: later collections need not scan it (they
    # run in the event loop and hold up every call while they do).
    gc.collect()
    gc.freeze()
    print(f"ready {port}", flush=True)  # FrontendProcess waits for this line
    log.info("front-end %d serving on port %d for %s", os.getpid(), port, primary)
    await done.wait()
    await server.stop(2.0)
    await frontend.close()
    return 0


class FrontendProcess:
    """One front-end, started by the coordinator as its own OS process."""

    def __init__(self, home: Path, listen: str, primary: str) -> None:
        self.home, self.listen, self.primary = home, listen, primary
        self.port = 0  # known once it serves; a restart binds the same
        self.proc: subprocess.Popen[bytes] | None = None
        self.ready = False  # serving (its process said so), until it is stopped or restarted

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def start(self) -> FrontendProcess:
        """Start it and wait until it serves; raises with the reason when it does not."""
        root = str(Path(__file__).resolve().parent.parent)
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
        }
        host = self.listen.rpartition(":")[0]
        listen = f"{host}:{self.port}" if self.port else self.listen
        handlers = logging.getLogger("panal").handlers
        text = handlers and not any(isinstance(h.formatter, JsonFormatter) for h in handlers)
        args = ["-m", "coordinator.frontend", str(self.home), "--listen", listen, "--primary", self.primary]
        args += ["--log-format", "text" if text else "json"]  # as the coordinator logs
        self.ready = False
        self.proc = subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, env=env)
        out: IO[bytes] = self.proc.stdout  # type: ignore[assignment]  # a pipe: stdout=PIPE above
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if select.select([out], [], [], 0.1)[0]:
                line = out.readline()
                if line.startswith(b"ready "):
                    self.port = int(line.split()[1])
                    self.ready = True
                    return self
                if not line:  # it exited: its reason is in its log (stderr)
                    break
        code = self.proc.poll()
        self.stop(grace=0)
        raise RuntimeError(
            f"front-end did not start (exit code {code}); its log above says why — often the main port is "
            "held by another program, or the coordinator directory is incomplete"
        )

    def exited(self) -> int | None:
        return self.proc.poll() if self.proc is not None else None

    def stop(self, grace: float = 5.0) -> None:
        self.ready = False
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(grace + 5.0)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10.0)


if __name__ == "__main__":
    sys.exit(main())
