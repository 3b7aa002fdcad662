"""The coordinator under N simulated nodes, and the overhead of closing a round, against baselines of the same run.

    python bench/coordinator.py [--nodes 100,1000] [--seconds 20] [--update-period 10] [--frontends 2]
                                [--presets tiny,125m] [--skip-load] [--skip-round]

About six minutes on two cores; --nodes, --seconds, --presets and --skip-* shorten it.

1. Load. A real coordinator (``RunningCoordinator``, mTLS on loopback) runs in
   its own OS process, with ``--frontends`` front-end processes serving its main
   port (coordinator/frontend.py; 0: the coordinator serves it itself); this
   process plays N nodes with grpc.aio, one channel and one client certificate
   per node, each enrolled through the Enroll RPC with its own token (enrollment
   is not timed). The job is a small model cut into S = 50 pipeline stages, N/S
   pools (so each stage aggregates N/S updates, as a deep model over few pools
   would). In every window each node heartbeats once a second on its
   HeartbeatStream call, as the node daemon does, each time an envelope of its
   own (timestamp and nonce). The heartbeats are sealed just before each window
   (they arrive well within the coordinator's 120 s freshness window): signing is
   the nodes' work, done on their own machines, and here it would take the very
   cores the coordinator is measured on. The bare gRPC echo below sends its
   heartbeats sealed ahead the same way.

   - ``heartbeats``: heartbeats alone;
   - ``mixed``: heartbeats, plus every node submitting its stage's update once
     per round, paced (open loop) at N/update_period updates a second, the
     round closing (aggregate, outer step, publish) each time all N are in;
   - ``capacity``: closed loop, 64 calls in flight, no pacing: the most the
     coordinator serves, first heartbeats, then updates.

   A heartbeat is answered OK after the TLS binding, envelope digest, Ed25519
   signature, replay and authorisation checks and the coordinator's heartbeat
   logic. A *verification* is a SubmitUpdate answered ACCEPTED: all of the
   above plus the slot and base-weights checks, the blob fetched from the store
   with its CID verified, its size, SHA-256, safetensors schema and finite
   values checked, and the update (with its signed envelope) committed to
   SQLite (updates arriving together share a commit: coordinator/groupcommit.py);
   front-ends forward it to the coordinator process (coordinator/relay.py).
   Rounds that close in a window are part of it (their envelopes stored as one
   blob). Latencies are client-observed, from the call to its reply (sealing
   excluded). Baseline: the same envelope (and blob) checks in
   this process, one thread, no gRPC and no SQLite; and for heartbeats, a bare
   gRPC echo server (one process, the coordinator's mTLS and thread pool, the
   same streams and request bytes; no envelope checks, no coordinator) under
   the same loads: what gRPC in Python costs per heartbeat on this machine.
   Server CPU is that of every server process; idle, the share of the whole
   machine's CPU time left idle in the window (the load generator runs on the
   same cores). Target: N = 1000 with p99 < 100 ms.

2. Round overhead. A coordinator in this process takes the R = 2 updates of a
   round (one stage per pool) of the ``tiny`` and ``125m`` presets as real
   pseudo-gradients: verify each (interceptor checks + ``submit_update``), then
   close the round (aggregate, outer step, write weights, momentum, checkpoint
   manifest and signed result). Baseline: H = 50 inner steps of the same model
   through ``model.engine.StageEngine`` (one process, fp32, gloo, one thread as
   node/worker.py runs a CPU node), measured over a few steps after warm-up
   steps and scaled to 50. On CPU the batch is cut down so that a 125m step
   takes seconds: tiny uses the job defaults (micro-batch 4 x seq 64 x
   accumulation 2), 125m micro-batch 1 x seq 128. Target: overhead < 5%.

The load average is printed: on a shared machine, read figures next to it.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import gc
import json
import math
import multiprocessing
import os
import random
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# This file is named after the package it measures: drop bench/ from the path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import grpc  # noqa: E402
import nacl.signing  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from coordinator.server import CoordinatorConfig, init  # noqa: E402
from corpus.shards import shard_bytes  # noqa: E402
from protocol import panal_pb2 as pb  # noqa: E402
from protocol import panal_pb2_grpc as pb_grpc  # noqa: E402
from protocol import tls  # noqa: E402
from protocol.envelope import open_envelope, seal  # noqa: E402
from protocol.hashing import sha256  # noqa: E402
from protocol.identity import Identity  # noqa: E402
from protocol.limits import channel_options  # noqa: E402
from protocol.replay import ReplayGuard  # noqa: E402
from storage import manifest, tensors  # noqa: E402
from storage.manifest import DatasetManifest, ShardEntry  # noqa: E402
from storage.stores import open_store  # noqa: E402

STAGES = 50
# A small model cut into STAGES stages: an update blob is 14 KiB (32 KiB for the first stage).
LOAD_MODEL = {"vocab_size": 256, "seq_len": 32, "n_layer": STAGES, "n_head": 2, "d_model": 16}
CAPACITY_IN_FLIGHT = 64
CAPACITY_SECONDS = 6.0
CAPACITY_BEATS = 4000  # heartbeats a second sealed ahead for the capacity window (more are sealed as sent)
H = 50


# ---------------------------------------------------------------------------------------------
# Shared


class Signer:
    """An identity whose signing key is derived once (``Identity`` derives it per call)."""

    def __init__(self, identity: Identity) -> None:
        self._key = nacl.signing.SigningKey(identity.seed)
        self.public_key = identity.public_key
        self.fingerprint = identity.fingerprint

    def sign(self, message: bytes) -> bytes:
        return self._key.sign(message).signature


def dataset(store: Any, shards: int) -> str:
    """A signed dataset manifest with ``shards`` train shards of one sequence each (the simulated
    nodes do not train; the coordinator reads the shards once, for detection's absent-token check)."""
    rng = np.random.default_rng(0)
    cids = [
        str(store.put_bytes(shard_bytes(rng.integers(0, 256, (1, 33), dtype=np.uint16)), pin=True))
        for _ in range(shards)
    ]
    body = DatasetManifest(
        name="bench",
        tokenizer_cid=str(store.put_bytes(b"tokenizer", pin=True)),
        vocab_size=256,
        seq_len=32,
        token_dtype="uint16",
        shards=[ShardEntry(cid=c, split="train", tokens=33, sequences=1) for c in cids],
    )
    return str(store.put_bytes(manifest.sign(body, Identity.generate()), pin=True))


_shapes: dict[str, dict[str, tuple[int, ...]]] = {}  # base weights CID -> tensor shapes


def update_request(store: Any, a: pb.Assignment, base: str, seed: int) -> pb.SubmitUpdateRequest:
    """A real pseudo-gradient for the assignment's stage, put in the store (the node's upload)."""
    if base not in _shapes:
        limits = tensors.TensorLimits(max_bytes=64 << 30)
        _shapes[base] = {
            k: s.shape
            for k, s in tensors.read_header(store.get_bytes(base, max_bytes=64 << 30), limits).items()
        }
    g = torch.Generator().manual_seed(seed)
    delta = {k: 1e-3 * torch.randn(shape, generator=g) for k, shape in _shapes[base].items()}
    blob = tensors.dump(delta)
    cid = store.put_bytes(blob, pin=True)
    return pb.SubmitUpdateRequest(
        pool=a.pool,
        stage=a.stage,
        blob_cid=str(cid),
        blob_sha256=sha256(blob),
        blob_bytes=len(blob),
        base_weights_cid=base,
        compression="none",
        tokens=1000,
        loss=3.0,
        norm=1.0,
    )


def progress(line: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {line}", file=sys.stderr, flush=True)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---------------------------------------------------------------------------------------------
# 1. Load


def serve(home: str, conn: Any) -> None:
    """The coordinator's own process: serve until told to stop."""
    from coordinator.server import RunningCoordinator

    running = RunningCoordinator(CoordinatorConfig.load(home)).start()
    conn.send((running.port, running.enroll_port, running.pids))
    conn.recv()
    running.stop(grace=0)


def serve_echo(conn: Any) -> None:
    """The baseline's own process: gRPC with the coordinator's mTLS and thread pool, answering at once."""
    from concurrent.futures import ThreadPoolExecutor

    from protocol.limits import server_options
    from protocol.server import MAX_STREAMS, SERVER_TUNING

    ca = tls.make_ca()
    client = tls.make_client_cert(ca, "echo")

    class Echo(pb_grpc.NodeServiceServicer):  # type: ignore[misc]
        def Heartbeat(self, request: pb.Envelope, context: Any) -> pb.HeartbeatReply:
            return pb.HeartbeatReply(server_time_ms=1)

        def HeartbeatStream(self, requests: Any, context: Any) -> Any:
            for _ in requests:
                yield pb.HeartbeatReply(server_time_ms=1)

    # The coordinator's thread pool: 32 for unary calls and one per stream it admits.
    workers = 32 + MAX_STREAMS
    server = grpc.server(ThreadPoolExecutor(max_workers=workers), options=server_options() + SERVER_TUNING)
    pb_grpc.add_NodeServiceServicer_to_server(Echo(), server)
    server_cert = tls.make_server_cert(ca, ["localhost", "127.0.0.1"])
    port = server.add_secure_port("127.0.0.1:0", tls.server_credentials(ca.cert_pem, server_cert))
    server.start()
    conn.send((port, ca.cert_pem, client, os.getpid()))
    conn.recv()
    server.stop(0)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_times() -> list[int]:
    """The whole machine's CPU time counters (/proc/stat: user nice system idle iowait irq softirq steal)."""
    return [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]


def idle_share(t0: list[int], t1: list[int]) -> float:
    """The share of the machine's CPU time that was idle between two ``machine_times``."""
    d = [b - a for a, b in zip(t0, t1, strict=True)]
    return (d[3] + d[4]) / max(1, sum(d))


def cpu_of(pids: list[int]) -> float:
    """CPU seconds of the coordinator's processes (its own and its front-ends')."""
    return sum(cpu_seconds(pid) for pid in pids)


@dataclass
class SimNode:
    signer: Signer
    pool: str
    channel: grpc.aio.Channel
    stub: pb_grpc.NodeServiceStub
    stage: int = 0
    epoch: int = 0
    update: pb.SubmitUpdateRequest | None = None
    stream: Any = None  # its HeartbeatStream call, opened at the first heartbeat
    # Its heartbeats, sealed ahead of the window (Load.seal_ahead).
    sealed: collections.deque[pb.Envelope] = field(default_factory=collections.deque)
    beating: asyncio.Lock = field(default_factory=asyncio.Lock)  # one beat at a time on the stream

    def seal(self, body: Any, *, job: str = "", round: int = 0) -> pb.Envelope:
        return seal(self.signer, body, job=job, round=round)  # type: ignore[arg-type]


Record = tuple[str, float, float, bool]  # (kind, start, end, ok)


class Load:
    """N simulated nodes against one coordinator process."""

    def __init__(self, home: Path, port: int, enroll_port: int, n: int) -> None:
        self.home, self.n = home, n
        self.target = f"localhost:{port}"
        self.enroll_target = f"localhost:{enroll_port}"
        self.ca_pem = (home / "ca.pem").read_bytes()
        self.store = open_store(CoordinatorConfig.load(home).store_url)
        admin_id = Identity.load(home / "admin.key")
        self.admin_signer = Signer(admin_id)
        creds = tls.channel_credentials(self.ca_pem, tls.load(home / "admin.pem", home / "admin-tls.key"))
        self.admin_channel = grpc.aio.secure_channel(self.target, creds, options=channel_options())
        self.admin = pb_grpc.AdminServiceStub(self.admin_channel)
        self.nodes: list[SimNode] = []
        self.records: list[Record] = []
        self.lags: list[tuple[float, float]] = []  # (when, how late a 10 ms sleep woke), this event loop
        self.job = "bench"
        self.round = 0
        self.bases: dict[int, str] = {}
        self.pending: list[SimNode] = []

    async def admin_call(self, method: str, body: Any) -> Any:
        return await getattr(self.admin, method)(seal(self.admin_signer, body), timeout=60)  # type: ignore[arg-type]

    async def setup(self) -> None:
        pools = [f"p{i:03d}" for i in range(self.n // STAGES)]
        enroll_channel = grpc.aio.secure_channel(
            self.enroll_target, tls.channel_credentials(self.ca_pem), options=channel_options()
        )
        enroll_stub = pb_grpc.NodeServiceStub(enroll_channel)
        limit = asyncio.Semaphore(16)

        async def enroll(pool: str) -> SimNode:
            identity = Identity.generate()
            signer = Signer(identity)
            csr, key = tls.make_csr(identity.fingerprint)
            async with limit:
                token = (
                    await self.admin_call(
                        "CreateEnrollmentToken", pb.CreateEnrollmentTokenRequest(pool=pool, ttl_seconds=600)
                    )
                ).token
                req = pb.EnrollRequest(
                    token=token,
                    pool=pool,
                    name=identity.fingerprint[:8],
                    csr_pem=csr,
                    data_address="127.0.0.1:29500",
                    capabilities=pb.Capabilities(accelerator="cpu", host_memory_bytes=16 << 30),
                )
                reply = await enroll_stub.Enroll(seal(signer, req), timeout=60)  # type: ignore[arg-type]
                creds = tls.channel_credentials(self.ca_pem, tls.CertKey(reply.certificate_pem, key))
                channel = grpc.aio.secure_channel(self.target, creds, options=channel_options())
                await channel.channel_ready()
            return SimNode(signer, pool, channel, pb_grpc.NodeServiceStub(channel))

        self.nodes = list(await asyncio.gather(*(enroll(p) for p in pools for _ in range(STAGES))))
        await enroll_channel.close()
        spec = {
            "name": self.job,
            "model": LOAD_MODEL,
            "dataset": dataset(self.store, len(pools)),
            "pools": pools,
            "stages": STAGES,
            "rounds": 1_000_000,
            "inner_steps": 1,
            "min_pools": 1,
            "round_timeout_s": 3600,
        }
        await self.admin_call("SubmitJob", pb.SubmitJobRequest(spec_yaml=json.dumps(spec)))
        deadline = time.monotonic() + 60
        while (await self.admin_call("Status", pb.StatusRequest())).job_state != "running":
            if time.monotonic() > deadline:
                raise RuntimeError("the bench job did not start within 60 s")
            await asyncio.sleep(0.2)

        async def assign(node: SimNode, seed: int) -> None:
            async with limit:
                got = await node.stub.GetAssignment(node.seal(pb.GetAssignmentRequest()), timeout=60)
            a = got.assignment
            node.stage, node.epoch = a.stage, a.epoch
            self.round, self.bases[a.stage] = a.round, a.start_weights_cid
            node.update = await asyncio.to_thread(update_request, self.store, a, a.start_weights_cid, seed)

        await asyncio.gather(*(assign(node, i) for i, node in enumerate(self.nodes)))
        self.pending = random.sample(self.nodes, len(self.nodes))

    # ------------------------------------------------------------ traffic

    def heartbeat_body(self, node: SimNode) -> pb.HeartbeatRequest:
        return pb.HeartbeatRequest(
            state=pb.NODE_STATE_TRAINING,
            step=7,
            loss=3.0,
            tokens_per_second=1e3,
            round=self.round,
            epoch=node.epoch,
        )

    def seal_ahead(self, per_node: int) -> None:
        """Seal ``per_node`` heartbeats for each node now, before a window: each its own envelope
        (timestamp and nonce), sent within the receiver's freshness window. Sealing is the nodes'
        work, on their own machines; here it would take the cores the coordinator is measured on."""
        for node in self.nodes:
            node.sealed = collections.deque(node.seal(self.heartbeat_body(node)) for _ in range(per_node))

    async def heartbeat(self, node: SimNode) -> None:
        async with node.beating:  # as the node daemon does: one beat, then its reply, on one stream
            env = node.sealed.popleft() if node.sealed else node.seal(self.heartbeat_body(node))
            t0 = time.perf_counter()
            try:
                if node.stream is None:
                    node.stream = node.stub.HeartbeatStream()
                await node.stream.write(env)
                ok = isinstance(await node.stream.read(), pb.HeartbeatReply)
            except grpc.aio.AioRpcError as e:
                print(f"  heartbeat failed: {e}", file=sys.stderr)
                node.stream.cancel()
                node.stream, ok = None, False
            self.records.append(("heartbeat", t0, time.perf_counter(), ok))

    async def heartbeat_loop(self, node: SimNode, until: float) -> None:
        """Once a second, starting at a random phase; a late heartbeat does not make the next one early."""
        t = time.perf_counter() + random.random()
        while t < until:
            await asyncio.sleep(max(0.0, t - time.perf_counter()))
            await self.heartbeat(node)
            t = max(t + 1.0, time.perf_counter())

    async def submit(self, node: SimNode) -> None:
        assert node.update is not None
        req = pb.SubmitUpdateRequest()
        req.CopyFrom(node.update)
        req.base_weights_cid = self.bases[node.stage]
        env = node.seal(req, job=self.job, round=self.round)
        t0 = time.perf_counter()
        try:
            reply = await node.stub.SubmitUpdate(env, timeout=120)
            ok = reply.status == pb.UPDATE_STATUS_ACCEPTED
            if not ok:
                print(f"  update rejected: {reply.reason}", file=sys.stderr)
        except grpc.aio.AioRpcError as e:
            ok = False
            print(f"  update failed: {e.code().name}: {e.details()}", file=sys.stderr)
        self.records.append(("update", t0, time.perf_counter(), ok))

    async def next_round(self) -> None:
        """The round closed with its last update: the new start weights are in its signed result."""
        node = self.nodes[0]
        deadline = time.monotonic() + 120
        while True:
            env = node.seal(pb.GetRoundResultRequest(), job=self.job, round=self.round)
            got = await node.stub.GetRoundResult(env, timeout=60)
            if got.ready:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"round {self.round} did not close: were updates lost?")
            await asyncio.sleep(0.1)
        result = open_envelope(got.result, pb.RoundResult, replay=None).body
        self.bases = {s.stage: s.weights_cid for s in result.stages}  # type: ignore[attr-defined]
        self.round += 1
        self.pending = random.sample(self.nodes, len(self.nodes))

    async def updates(self, until: float, *, rate: float | None = None, in_flight: int | None = None) -> None:
        """Every node submits once per round: paced at ``rate`` a second, or ``in_flight`` at a time."""
        limit = asyncio.Semaphore(in_flight or len(self.nodes))

        async def one(node: SimNode) -> None:
            try:
                await self.submit(node)
            finally:
                limit.release()

        while time.perf_counter() < until:
            if not self.pending:
                await self.next_round()
            tasks = []
            next_t = time.perf_counter()
            while self.pending and time.perf_counter() < until:
                if rate:
                    next_t += 1 / rate
                    await asyncio.sleep(max(0.0, next_t - time.perf_counter()))
                await limit.acquire()
                tasks.append(asyncio.create_task(one(self.pending.pop())))
            await asyncio.gather(*tasks)

    async def closed_loop(self, until: float, in_flight: int) -> None:
        async def worker(i: int) -> None:
            while time.perf_counter() < until:
                await self.heartbeat(self.nodes[i % len(self.nodes)])
                i += in_flight

        await asyncio.gather(*(worker(i) for i in range(in_flight)))

    async def watch_loop(self, until: float) -> None:
        """How late this process's event loop runs: client-side delay inside every latency figure."""
        while time.perf_counter() < until:
            t = time.perf_counter()
            await asyncio.sleep(0.01)
            self.lags.append((t, time.perf_counter() - t - 0.01))

    async def close(self) -> None:
        for n in self.nodes:
            if n.stream is not None:
                n.stream.cancel()
        await asyncio.gather(*(n.channel.close() for n in self.nodes), self.admin_channel.close())


@dataclass
class Row:
    n: int
    what: str
    offered: float | None
    achieved: float
    p50_ms: float
    p99_ms: float
    errors: int
    server_cpu: float
    client_cpu: float
    client_lag_p99_ms: float
    machine_idle: float = float("nan")  # the share of the machine's CPU left idle in the window


def window(load: Load, kind: str, t0: float, t1: float) -> tuple[float, float, float, int]:
    """(calls/s, p50 ms, p99 ms, errors) of ``kind`` calls started in [t0, t1)."""
    recs = [r for r in load.records if r[0] == kind and t0 <= r[1] < t1]
    lat = [(end - start) * 1e3 for _, start, end, ok in recs if ok]
    return len(lat) / (t1 - t0), percentile(lat, 0.5), percentile(lat, 0.99), sum(1 for r in recs if not r[3])


async def run_load(load: Load, pids: list[int], seconds: float, update_period: float) -> list[Row]:
    n = load.n
    t = time.perf_counter()
    await load.setup()
    progress(f"N={n}: {n} nodes enrolled, connected and assigned in {time.perf_counter() - t:.0f} s")
    gc.freeze()  # the nodes' objects live to the end: keep collections of this client short
    rows: list[Row] = []

    async def measure(
        what: str,
        offered: dict[str, float | None],
        traffic: Callable[[float], list[Coroutine[Any, Any, None]]],
        seconds: float,
        beats: float,
    ) -> None:
        """Run ``traffic`` for a 2 s warm-up and a measured window; a row per kind of call.
        ``beats``: heartbeats a second it sends at most (sealed ahead, spread over the nodes)."""
        progress(f"N={n}: {what}")
        load.seal_ahead(math.ceil(beats * (seconds + 3.0) / n) if beats else 0)
        start = time.perf_counter()
        t0, t1 = start + 2.0, start + 2.0 + seconds
        tasks = [asyncio.create_task(c) for c in [*traffic(t1), load.watch_loop(t1)]]
        await asyncio.sleep(max(0.0, t0 - time.perf_counter()))
        c0, p0, m0 = cpu_of(pids), time.process_time(), machine_times()
        await asyncio.sleep(max(0.0, t1 - time.perf_counter()))
        c1, p1, m1 = cpu_of(pids), time.process_time(), machine_times()
        await asyncio.wait_for(asyncio.gather(*tasks), 300)  # a call that never returns: an error, not a hang
        lag = percentile([late * 1e3 for when, late in load.lags if t0 <= when < t1], 0.99)
        for kind, off in offered.items():
            rate, p50, p99, errors = window(load, kind, t0, t1)
            label = what if len(offered) == 1 else f"{what}: {kind}s"
            cpu = ((c1 - c0) / seconds, (p1 - p0) / seconds)
            rows.append(Row(n, label, off, rate, p50, p99, errors, *cpu, lag, idle_share(m0, m1)))

    def heartbeats(until: float) -> list[Coroutine[Any, Any, None]]:
        return [load.heartbeat_loop(node, until) for node in load.nodes]

    await measure("heartbeats", {"heartbeat": n}, heartbeats, seconds, beats=n)
    await measure(
        "mixed",
        {"heartbeat": n, "update": n / update_period},
        lambda until: [*heartbeats(until), load.updates(until, rate=n / update_period)],
        seconds,
        beats=n,
    )
    await measure(
        f"capacity, heartbeats ({CAPACITY_IN_FLIGHT} in flight)",
        {"heartbeat": None},
        lambda until: [load.closed_loop(until, CAPACITY_IN_FLIGHT)],
        CAPACITY_SECONDS,
        beats=CAPACITY_BEATS,
    )
    await measure(
        f"capacity, updates ({CAPACITY_IN_FLIGHT} in flight)",
        {"update": None},
        lambda until: [load.updates(until, in_flight=CAPACITY_IN_FLIGHT)],
        CAPACITY_SECONDS,
        beats=0,
    )
    return rows


def load_at(n: int, seconds: float, update_period: float, frontends: int) -> tuple[list[Row], int]:
    with tempfile.TemporaryDirectory(prefix="panal-bench-") as tmp:
        home = Path(tmp) / "coord"
        # Enrolling 1000 nodes takes a while: a long node timeout keeps the first ones from being lost meanwhile.
        init(
            home,
            hostnames=["localhost", "127.0.0.1"],
            port=0,
            enroll_port=0,
            metrics_port=0,
            heartbeat_timeout_s=300,
            frontends=frontends,
        )
        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=serve, args=(str(home), child), daemon=True)
        proc.start()
        port, enroll_port, pids = parent.recv()

        async def go() -> tuple[list[Row], int]:
            load = Load(home, port, enroll_port, n)
            try:
                rows = await run_load(load, pids, seconds, update_period)
                return rows, load.round
            finally:
                await load.close()

        try:
            return asyncio.run(go())
        finally:
            t = time.perf_counter()
            parent.send("stop")
            proc.join(60)
            progress(
                f"N={n}: coordinator stopped in {time.perf_counter() - t:.1f} s (alive: {proc.is_alive()})"
            )


@contextlib.contextmanager
def echo_server() -> Iterator[tuple[int, bytes, Any, int]]:
    """The bare gRPC echo server in its own process: (port, CA PEM, client cert, pid) while in use."""
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=serve_echo, args=(child,), daemon=True)
    proc.start()
    try:
        yield parent.recv()
    finally:
        parent.send("stop")
        proc.join(30)


def heartbeat_envelope(signer: Signer) -> pb.Envelope:
    return seal(signer, pb.HeartbeatRequest(state=pb.NODE_STATE_TRAINING, step=7))  # type: ignore[arg-type]


def echo_paced(n: int, seconds: float) -> Row:
    """The heartbeats window against the bare gRPC echo server: n connections, one call a second each.

    The floor of the heartbeat target on this machine: what n nodes heartbeating cost gRPC
    in Python alone (mTLS, one connection per node, the client in this process), with no
    envelope checks and no coordinator.
    """

    async def go(port: int, ca_pem: bytes, client: Any, pid: int) -> Row:
        creds = tls.channel_credentials(ca_pem, client)
        channels = [
            grpc.aio.secure_channel(f"localhost:{port}", creds, options=channel_options()) for _ in range(n)
        ]
        await asyncio.gather(*(c.channel_ready() for c in channels))
        signer = Signer(Identity.generate())
        lat: list[tuple[float, float]] = []  # (start, ms)

        async def node(channel: grpc.aio.Channel, sealed: Iterator[pb.Envelope], until: float) -> None:
            stream = pb_grpc.NodeServiceStub(channel).HeartbeatStream()
            t = time.perf_counter() + random.random()
            while t < until:
                await asyncio.sleep(max(0.0, t - time.perf_counter()))
                env = next(sealed, None) or heartbeat_envelope(signer)
                t0 = time.perf_counter()
                await stream.write(env)
                await stream.read()
                lat.append((t0, (time.perf_counter() - t0) * 1e3))
                t = max(t + 1.0, time.perf_counter())
            stream.cancel()

        sealed = [iter([heartbeat_envelope(signer) for _ in range(math.ceil(seconds) + 3)]) for _ in channels]
        start = time.perf_counter()  # sealed ahead, as Load's heartbeats
        t0, t1 = start + 2.0, start + 2.0 + seconds  # the first 2 s warm up
        c0, p0 = cpu_seconds(pid), time.process_time()
        await asyncio.gather(*(node(c, beats, t1) for c, beats in zip(channels, sealed, strict=True)))
        dt = time.perf_counter() - start
        cpu = ((cpu_seconds(pid) - c0) / dt, (time.process_time() - p0) / dt)
        await asyncio.gather(*(c.close() for c in channels))
        window = [ms for when, ms in lat if t0 <= when < t1]
        return Row(
            n,
            "gRPC echo, heartbeats (1/s per node)",
            float(n),
            len(window) / seconds,
            percentile(window, 0.5),
            percentile(window, 0.99),
            0,
            *cpu,
            float("nan"),
        )

    with echo_server() as server:
        return asyncio.run(go(*server))


def echo_capacity(n: int, seconds: float) -> Row:
    """Heartbeat envelopes against the bare gRPC echo server, closed loop, as in the capacity rows.

    Measured right after the coordinator's run at ``n`` nodes, so that both see the same machine.
    """

    async def go(port: int, ca_pem: bytes, client: Any, pid: int) -> Row:
        creds = tls.channel_credentials(ca_pem, client)
        channels = [
            grpc.aio.secure_channel(f"localhost:{port}", creds, options=channel_options())
            for _ in range(CAPACITY_IN_FLIGHT)
        ]
        await asyncio.gather(*(c.channel_ready() for c in channels))
        signer = Signer(Identity.generate())
        lat: list[float] = []

        def seal_ahead(seconds: float) -> list[Iterator[pb.Envelope]]:  # as Load's heartbeats
            per_worker = math.ceil(CAPACITY_BEATS * seconds / CAPACITY_IN_FLIGHT)
            return [iter([heartbeat_envelope(signer) for _ in range(per_worker)]) for _ in channels]

        async def worker(channel: grpc.aio.Channel, sealed: Iterator[pb.Envelope], until: float) -> None:
            stream = pb_grpc.NodeServiceStub(channel).HeartbeatStream()
            while time.perf_counter() < until:
                env = next(sealed, None) or heartbeat_envelope(signer)
                t = time.perf_counter()
                await stream.write(env)
                await stream.read()
                lat.append((time.perf_counter() - t) * 1e3)
            stream.cancel()

        sealed = seal_ahead(1.0)
        t = time.perf_counter()  # warm-up
        await asyncio.gather(*(worker(c, b, t + 1.0) for c, b in zip(channels, sealed, strict=True)))
        lat.clear()
        sealed = seal_ahead(seconds)
        t0, c0, p0 = time.perf_counter(), cpu_seconds(pid), time.process_time()
        await asyncio.gather(*(worker(c, b, t0 + seconds) for c, b in zip(channels, sealed, strict=True)))
        dt = time.perf_counter() - t0
        cpu = ((cpu_seconds(pid) - c0) / dt, (time.process_time() - p0) / dt)
        await asyncio.gather(*(c.close() for c in channels))
        what = f"gRPC echo, heartbeats ({CAPACITY_IN_FLIGHT} in flight)"
        return Row(
            n, what, None, len(lat) / dt, percentile(lat, 0.5), percentile(lat, 0.99), 0, *cpu, float("nan")
        )

    with echo_server() as server:
        return asyncio.run(go(*server))


def baselines() -> tuple[float, float]:
    """Envelope checks of a heartbeat, and envelope + blob checks of an update, per second in-process."""
    from coordinator.updates import load_update
    from model.presets import config_from_mapping
    from model.stage import initial_stage_weights

    identity = Signer(Identity.generate())
    guard = ReplayGuard(max_entries=10_000_000)
    envs = [seal(identity, pb.HeartbeatRequest(state=pb.NODE_STATE_TRAINING, step=i)) for i in range(3000)]  # type: ignore[arg-type]
    t = time.perf_counter()
    for env in envs:
        open_envelope(env, pb.HeartbeatRequest, replay=guard)
    heartbeat_rate = len(envs) / (time.perf_counter() - t)

    with tempfile.TemporaryDirectory(prefix="panal-bench-") as tmp:
        store = open_store(f"local:{tmp}")
        config = config_from_mapping(LOAD_MODEL)
        reqs = []
        for stage in range(STAGES):
            start = initial_stage_weights(config, STAGES, stage)
            base = str(store.put_bytes(tensors.dump(start)))
            a = pb.Assignment(pool="p", stage=stage)
            reqs.append((update_request(store, a, base, stage), tensors.spec_of(start)))
        envs = [(seal(identity, req, job="j", round=0), spec) for req, spec in reqs * 20]  # type: ignore[arg-type]
        t = time.perf_counter()
        for env, spec in envs:
            v = open_envelope(env, pb.SubmitUpdateRequest, replay=guard, job="j", round=0)
            load_update(store, v.body, weights_spec=spec, method="none")  # type: ignore[arg-type]
        update_rate = len(envs) / (time.perf_counter() - t)
    return heartbeat_rate, update_rate


# ---------------------------------------------------------------------------------------------
# 2. Round overhead


@dataclass
class RoundFigures:
    preset: str
    params: int
    blob_mib: float
    verify_s: float
    close_s: float
    step_s: float
    batch: str


def round_overhead(
    preset: str, micro_batch: int, seq: int, grad_accum: int, *, warmup: int, steps: int
) -> RoundFigures:
    from coordinator.core import Coordinator
    from coordinator.state import State
    from model.plan import count_params
    from model.presets import get_preset
    from protocol.limits import METHODS
    from protocol.server import EnvelopeInterceptor

    pools = ["pool-a", "pool-b"]
    with tempfile.TemporaryDirectory(prefix="panal-bench-") as tmp:
        store = open_store(f"local:{tmp}/store")
        coordinator = Coordinator(
            state=State(Path(tmp) / "state.db"),
            store=store,
            identity=Identity.generate(),
            ca=tls.make_ca(),
            admins=set(),
        )
        # What the interceptor does to each call, minus the TLS binding (there is no TLS here).
        interceptor = EnvelopeInterceptor(
            replay=ReplayGuard(),
            expected_context=coordinator.expected_context,
            authorize=coordinator.authorize,
            require_client_certificate=False,
        )
        nodes = []
        for pool in pools:
            identity = Identity.generate()
            token, _ = coordinator.create_token(pool, 600)
            csr, _ = tls.make_csr(identity.fingerprint)
            req = pb.EnrollRequest(
                token=token,
                pool=pool,
                csr_pem=csr,
                data_address="127.0.0.1:29500",
                capabilities=pb.Capabilities(accelerator="cpu", host_memory_bytes=256 << 30),
            )
            coordinator.enroll(open_envelope(seal(identity, req), pb.EnrollRequest, replay=None))
            nodes.append(identity)
        spec = {
            "name": "bench",
            "model": {"preset": preset},
            "dataset": dataset(store, len(pools)),
            "pools": pools,
            "stages": 1,
            "rounds": 3,
            "inner_steps": H,
            "micro_batch": micro_batch,
            "grad_accum": grad_accum,
            "min_pools": len(pools),
            "round_timeout_s": 3600,
        }
        coordinator.submit_job(json.dumps(spec))
        closes: list[float] = []
        close = coordinator.closer._close

        def timed_close(*args: Any, **kwargs: Any) -> None:
            t = time.perf_counter()
            close(*args, **kwargs)
            closes.append(time.perf_counter() - t)

        coordinator.closer._close = timed_close  # type: ignore[method-assign]
        spec_method = METHODS["/panal.v1.NodeService/SubmitUpdate"]
        totals = []
        for r in range(2):  # round 1 is the steady state: it also loads the outer momentum
            envs = []
            for i, identity in enumerate(nodes):
                a = coordinator.assignment(identity.fingerprint).assignment
                req = update_request(store, a, a.start_weights_cid, seed=10 * r + i)
                envs.append(seal(identity, req, job=a.job, round=a.round).SerializeToString())
            blob_mib = req.blob_bytes / 2**20
            t = time.perf_counter()
            for raw in envs:
                reply = coordinator.submit_update(interceptor.verify(spec_method, raw, None))
                if reply.status != pb.UPDATE_STATUS_ACCEPTED:
                    raise RuntimeError(f"update rejected: {reply.reason}")
            totals.append(time.perf_counter() - t)
        if len(closes) != 2:
            raise RuntimeError("the rounds did not close")
        coordinator.state.close()
    step_s = inner_step_seconds(preset, micro_batch, seq, grad_accum, warmup=warmup, steps=steps)
    return RoundFigures(
        preset,
        count_params(get_preset(preset)).total,
        blob_mib,
        totals[1] - closes[1],
        closes[1],
        step_s,
        f"micro-batch {micro_batch} x seq {seq} x accum {grad_accum}, median of {steps} after {warmup}",
    )


def inner_step_seconds(
    preset: str, micro_batch: int, seq: int, grad_accum: int, *, warmup: int, steps: int
) -> float:
    """Median seconds of one inner step of the real engine, after ``warmup`` steps."""
    import torch.distributed as tdist

    from model.engine import StageEngine, TrainConfig, World
    from model.presets import get_preset

    # One thread, as node/worker.py runs a CPU node (PANAL_THREADS=1); on a shared machine two
    # OpenMP threads also make a tiny model's step many times slower whenever the other core is busy.
    torch.set_num_threads(1)
    config = get_preset(preset)
    tc = TrainConfig(total_steps=1000, micro_batch=micro_batch, grad_accum=grad_accum, precision="fp32")
    engine = StageEngine(
        config, tc, World(rank=0, world_size=1, stages=1, master_port=free_port(), backend="gloo")
    )
    g = torch.Generator().manual_seed(0)

    def batches() -> Any:
        for _ in range(grad_accum):
            x = torch.randint(0, config.vocab_size, (micro_batch, seq + 1), generator=g)
            yield x[:, :-1].contiguous(), x[:, 1:].contiguous()

    for _ in range(warmup):  # the first steps of DeepSpeed on CPU are several times slower
        engine.train_step(batches())
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        engine.train_step(batches())
        times.append(time.perf_counter() - t)
    seconds = statistics.median(times)
    del engine
    if tdist.is_initialized():
        tdist.destroy_process_group()
    return seconds


# ---------------------------------------------------------------------------------------------


# (micro-batch, seq, grad accumulation, warm-up steps, timed steps) of the inner steps per preset
INNER = {"tiny": (4, 64, 2, 3, 10), "125m": (1, 128, 1, 2, 5)}


def print_load(rows: list[Row], hb_base: float, up_base: float, ns: list[int], args: Any) -> None:
    print(
        f"load: {STAGES} stages x N/{STAGES} pools; heartbeats 1/s per node; updates every "
        f"{args.update_period:g} s per node; windows {args.seconds:g} s (capacity {CAPACITY_SECONDS:g} s)"
    )
    print(
        f"{'N':>5} {'what':42} {'offered/s':>9} {'done/s':>8} {'ratio':>6} {'p50 ms':>7} {'p99 ms':>7} "
        f"{'errors':>6} {'server CPU':>10} {'client CPU':>10} {'client lag p99':>14} {'idle':>5}"
    )
    for r in rows:
        ratio = f"{r.achieved / r.offered:6.2f}" if r.offered else "     -"
        off = f"{r.offered:9.0f}" if r.offered else "        -"
        lag = (
            f"{r.client_lag_p99_ms:11.1f} ms"
            if r.client_lag_p99_ms == r.client_lag_p99_ms
            else "             -"
        )
        print(
            f"{r.n or '-':>5} {r.what:42} {off} {r.achieved:8.1f} {ratio} {r.p50_ms:7.1f} {r.p99_ms:7.1f} "
            f"{r.errors:>6} {r.server_cpu:10.0%} {r.client_cpu:10.0%} {lag} "
            + (f"{r.machine_idle:5.0%}" if r.machine_idle == r.machine_idle else "    -")
        )
    print(
        f"in-process (one thread, no gRPC, no SQLite): heartbeat envelope checks {hb_base:,.0f}/s, "
        f"update envelope + blob checks {up_base:,.0f}/s"
    )
    echoes = {r.n: r for r in rows if r.what.startswith("gRPC echo, heartbeats (") and r.offered is None}
    paced = {r.n: r for r in rows if r.what.startswith("gRPC echo") and r.offered}
    for r in rows:
        if r.what.startswith("capacity, heartbeats"):
            print(
                f"  N={r.n} heartbeat capacity: {r.achieved / echoes[r.n].achieved:.2f}x the gRPC echo, "
                f"{r.achieved / hb_base:.2f}x the in-process envelope checks"
            )
        elif r.what.startswith("capacity, updates"):
            print(
                f"  N={r.n} update capacity: {r.achieved / up_base:.2f}x the in-process envelope + blob checks"
            )
    for n in ns:
        hb = next(r for r in rows if r.n == n and r.what == "heartbeats")
        print(
            f"  N={n} heartbeats 1/s: p99 {hb.p99_ms:.1f} ms vs {paced[n].p99_ms:.1f} ms for the bare gRPC echo "
            f"({hb.p99_ms / paced[n].p99_ms:.1f}x); server CPU {hb.server_cpu:.0%} vs {paced[n].server_cpu:.0%}"
        )
    worst = [r for r in rows if r.n == max(ns) and r.offered and not r.what.startswith("gRPC echo")]
    p99 = max(r.p99_ms for r in worst)
    print(f"target: N={max(ns)} p99 < 100 ms -> worst p99 {p99:.1f} ms ({'met' if p99 < 100 else 'MISSED'})")


def print_rounds(figs: list[RoundFigures]) -> None:
    print(f"round overhead: 2 pools x 1 stage; H = {H} inner steps (StageEngine, fp32, this CPU)")
    print(
        f"{'preset':7} {'params':>8} {'update MiB':>10} {'verify s':>8} {'close s':>8} {'step s':>8} "
        f"{'H steps s':>9} {'overhead':>8}  inner step"
    )
    for f in figs:
        overhead = f.verify_s + f.close_s
        print(
            f"{f.preset:7} {f.params / 1e6:7.1f}M {f.blob_mib:10.1f} {f.verify_s:8.3f} {f.close_s:8.3f} "
            f"{f.step_s:8.3f} {H * f.step_s:9.1f} {overhead / (H * f.step_s):8.1%}  {f.batch}"
        )
    print(
        "target: overhead < 5% of H steps -> "
        + ", ".join(f"{f.preset} {(f.verify_s + f.close_s) / (H * f.step_s):.1%}" for f in figs)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", default="100,1000", help=f"comma-separated N (multiples of {STAGES})")
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each measured load window")
    parser.add_argument("--update-period", type=float, default=10.0, help="seconds between a node's updates")
    parser.add_argument("--presets", default="tiny,125m", help=f"comma-separated, of {', '.join(INNER)}")
    parser.add_argument(
        "--frontends",
        type=int,
        default=2,
        help="the coordinator's front-end processes (config.yaml `frontends`; 0: the coordinator serves all)",
    )
    parser.add_argument("--skip-load", action="store_true")
    parser.add_argument("--skip-round", action="store_true")
    args = parser.parse_args()
    ns = [int(x) for x in args.nodes.split(",")]
    if any(n % STAGES for n in ns):
        parser.error(f"--nodes must be multiples of {STAGES} (one pool is {STAGES} stage nodes)")
    presets = args.presets.split(",")
    if unknown := set(presets) - set(INNER):
        parser.error(f"unknown presets {sorted(unknown)}; choose from {', '.join(INNER)}")

    print("load average at start: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
    if not args.skip_load:
        hb_base, up_base = baselines()
        rows: list[Row] = []
        for n in ns:
            got, rounds = load_at(n, args.seconds, args.update_period, args.frontends)
            progress(f"N={n}: done, {rounds} rounds closed; gRPC echo")
            rows += [*got, echo_paced(n, args.seconds), echo_capacity(n, CAPACITY_SECONDS)]
        print_load(rows, hb_base, up_base, ns, args)
    if not args.skip_round:
        figs = []
        for p in presets:
            micro, seq, accum, warmup, steps = INNER[p]
            t = time.perf_counter()
            # Each preset in a fresh process: DeepSpeed's global state (process group, environment)
            # and the load test's leftovers stay out of the figures.
            with multiprocessing.get_context("spawn").Pool(1) as pool:
                kwargs = {"warmup": warmup, "steps": steps}
                figs.append(pool.apply(round_overhead, (p, micro, seq, accum), kwargs))
            progress(f"round overhead of {p} measured in {time.perf_counter() - t:.0f} s")
        print_rounds(figs)
    print("load average at end: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))


if __name__ == "__main__":
    main()
