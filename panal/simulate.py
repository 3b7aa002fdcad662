"""`panal simulate`: the whole system on one machine, every part its own OS process.

It prepares (or reuses) the demo corpus, makes a coordinator (CA, keys,
database) in a work directory, starts it and one node daemon per (pool, stage)
— plus standbys if asked — on loopback, submits a job, drives the fault drills
(`--kill-node-at`, `--restart-coordinator-at`), waits for the last round, and
ends with a summary: loss and held-out perplexity before and after, tokens,
updates accepted and rejected (with reasons), the final checkpoint CID.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from rich.console import Console
from rich.table import Table

from protocol import panal_pb2 as pb
from protocol import tls
from protocol.client import Client
from protocol.identity import Identity

console = Console(stderr=True)


@dataclass(frozen=True, kw_only=True)
class SimulateOptions:
    pools: int = 2
    stages: int = 2
    rounds: int = 4
    inner_steps: int = 20
    standby: int = 0  # extra nodes per pool
    byzantine: int = 0  # the last K pools run `attack` on every node
    attack: str = "ipm"
    kill_node_at: int | None = None
    restart_coordinator_at: int | None = None
    preset: str = "tiny"
    micro_batch: int = 4
    grad_accum: int = 2
    lr: float = 1e-3
    store: str | None = None
    work_dir: Path = field(
        default_factory=lambda: Path("runs") / f"simulate-{time.strftime('%Y%m%d-%H%M%S')}"
    )
    dataset: str | None = None  # default: the demo corpus
    round_timeout_s: float = 240.0
    heartbeat_timeout_s: float = 6.0
    eval_batches: int = 8
    timeout_s: float = 1800.0
    extra_job: dict[str, Any] = field(default_factory=dict)
    frontends: int = 0  # the coordinator's front-end processes (coordinator/frontend.py)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Simulation:
    def __init__(self, opts: SimulateOptions) -> None:
        self.opts = opts
        self.work = opts.work_dir.resolve()
        self.work.mkdir(parents=True, exist_ok=True)
        self.home = self.work / "coordinator"
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.env = {**os.environ, "OMP_NUM_THREADS": "1", "PANAL_THREADS": "1"}
        if "DS_ACCELERATOR" not in self.env:
            self.env["DS_ACCELERATOR"] = "cpu"
        self.events: list[str] = []
        self.marker = self.work / "fault-kill.json"

    # ------------------------------------------------------------ processes

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        log = open(self.work / f"{name}.log", "ab")  # noqa: SIM115 - owned by the child
        proc = subprocess.Popen(
            [sys.executable, "-m", "panal.cli", *args], stdout=log, stderr=subprocess.STDOUT, env=self.env
        )
        log.close()
        self.procs[name] = proc
        return proc

    def _stop(self, name: str, sig: int = signal.SIGTERM, timeout: float = 15.0) -> None:
        proc = self.procs.get(name)
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def stop_all(self) -> None:
        for name in [n for n in self.procs if n != "coordinator"]:
            self.procs[name].send_signal(signal.SIGTERM)
        for name in [n for n in self.procs if n != "coordinator"]:
            self._stop(name)
        self._stop("coordinator")

    # ------------------------------------------------------------ set-up

    def start_coordinator(self) -> None:
        self._spawn("coordinator", ["coordinator", "serve", str(self.home), "--log-format", "text"])
        self._wait_serving()

    def _wait_serving(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.procs["coordinator"].poll() is not None:
                raise RuntimeError(f"the coordinator exited; see {self.work / 'coordinator.log'}")
            try:
                self.admin("Status", pb.StatusRequest(), timeout_s=2)
                return
            except grpc.RpcError:
                time.sleep(0.2)
        raise RuntimeError(
            f"the coordinator did not come up in {timeout:.0f} s; see {self.work / 'coordinator.log'}"
        )

    def admin(self, method: str, body: Any, timeout_s: float = 60.0) -> Any:
        return self._admin.call(self._admin.admin, method, body, timeout_s=timeout_s)

    def setup(self, dataset: str, model: dict[str, Any]) -> None:
        from coordinator.server import CoordinatorConfig, init

        o = self.opts
        self.model = model
        if not (self.home / "config.yaml").exists():
            init(
                self.home,
                hostnames=["localhost", "127.0.0.1"],
                port=_free_port(),
                enroll_port=_free_port(),
                metrics_port=_free_port(),
                store=o.store or "",
                heartbeat_timeout_s=o.heartbeat_timeout_s,
                frontends=o.frontends,
            )
        self.config = CoordinatorConfig.load(self.home)
        self._admin = Client(
            self.config.listen,
            Identity.load(self.home / "admin.key"),
            ca_pem=(self.home / "ca.pem").read_bytes(),
            cert=tls.load(self.home / "admin.pem", self.home / "admin-tls.key"),
        )
        self.start_coordinator()
        for p in range(o.pools):
            pool = f"pool-{chr(ord('a') + p)}"
            for i in range(o.stages + o.standby):
                token = self.admin(
                    "CreateEnrollmentToken", pb.CreateEnrollmentTokenRequest(pool=pool, ttl_seconds=600)
                ).token
                name = f"{pool}-n{i}"
                self._spawn(
                    name,
                    [
                        "node",
                        "start",
                        "--coordinator",
                        self.config.listen,
                        "--enroll",
                        self.config.enroll_listen,
                        "--ca",
                        str(self.home / "ca.pem"),
                        "--pool",
                        pool,
                        "--token",
                        token,
                        "--home",
                        str(self.work / name),
                        "--name",
                        name,
                        "--store",
                        o.store or self.config.store_url,
                        *self._attack_args(p),
                        *self._fault_args(p),
                    ],
                )
        spec = {
            "name": f"sim-{int(time.time())}",
            "model": self.model,
            "dataset": dataset,
            "pools": [f"pool-{chr(ord('a') + p)}" for p in range(o.pools)],
            "stages": o.stages,
            "rounds": o.rounds,
            "inner_steps": o.inner_steps,
            "micro_batch": o.micro_batch,
            "grad_accum": o.grad_accum,
            "lr": o.lr,
            "precision": "auto",
            "min_pools": 1,
            "round_timeout_s": o.round_timeout_s,
            "world_timeout_s": 60,
            **o.extra_job,
        }
        (self.work / "job.json").write_text(json.dumps(spec, indent=2))
        # Not retried (a second submit would be refused as a duplicate): a generous deadline instead.
        self.job = self.admin("SubmitJob", pb.SubmitJobRequest(spec_yaml=json.dumps(spec)), timeout_s=180).job

    def _fault_args(self, pool_index: int) -> list[str]:
        """--kill-node-at: every node of pool-a carries the fault; the first to reach the middle of
        that round SIGKILLs itself (a seam in the worker, so the drill is deterministic)."""
        if self.opts.kill_node_at is None or pool_index != 0:
            return []
        return ["--fault-die-at-round", str(self.opts.kill_node_at), "--fault-marker", str(self.marker)]

    def _attack_args(self, pool_index: int) -> list[str]:
        """The last ``byzantine`` pools are attackers: every node of theirs runs the attack policy."""
        o = self.opts
        if pool_index < o.pools - o.byzantine:
            return []
        return ["--attack", o.attack, "--attack-pools", str(o.pools), "--attack-byzantine", str(o.byzantine)]

    def byzantine_pools(self) -> set[str]:
        o = self.opts
        return {f"pool-{chr(ord('a') + p)}" for p in range(o.pools - o.byzantine, o.pools)}

    # ------------------------------------------------------------ the run

    def run(self) -> None:
        o = self.opts
        deadline = time.monotonic() + o.timeout_s
        killed = restarted = False
        shown = -1
        while time.monotonic() < deadline:
            try:
                status = self.admin("Status", pb.StatusRequest(), timeout_s=5)
            except grpc.RpcError:
                time.sleep(0.5)
                continue
            if o.kill_node_at is not None and not killed and self.marker.exists():
                died = json.loads(self.marker.read_text())
                name = Path(died["home"]).name
                console.print(
                    f"[yellow]fault drill:[/yellow] node {name} (pool-a, stage {died['stage']}) "
                    f"was SIGKILLed mid-way through round {died['round']}"
                )
                self.events.append(f"killed {name} (stage {died['stage']}) mid-round {died['round']}")
                killed = True
            if status.job_state == "finished":
                missed = [
                    f"{what} at round {at}"
                    for what, at, done in (
                        ("--kill-node-at", o.kill_node_at, killed),
                        ("--restart-coordinator-at", o.restart_coordinator_at, restarted),
                    )
                    if at is not None and not done
                ]
                if missed:  # a drill that never happened must not pass for one that was survived
                    raise RuntimeError(
                        f"the job finished before the fault drill ({', '.join(missed)}) could run; "
                        "use more --inner-steps or an earlier round"
                    )
                return
            rnd = int(status.round) if status.job_state == "running" else -1
            if rnd != shown and rnd >= 0:
                console.print(
                    f"round {rnd}/{o.rounds} open — last loss {status.loss:.4f}, "
                    f"{status.updates_accepted} accepted, {status.updates_rejected} rejected"
                )
                shown = rnd
            if (
                o.restart_coordinator_at is not None
                and not restarted
                and rnd >= o.restart_coordinator_at
                and status.updates_accepted > 0
            ):
                console.print(
                    f"[yellow]fault drill:[/yellow] killing the coordinator (SIGKILL) in round {rnd}, restarting it"
                )
                self.events.append(f"restarted the coordinator in round {rnd}")
                self._stop("coordinator", signal.SIGKILL)
                self.start_coordinator()
                restarted = True
            for name, proc in self.procs.items():
                if name == "coordinator" and proc.poll() is not None:
                    raise RuntimeError(
                        f"the coordinator exited ({proc.returncode}); see {self.work / 'coordinator.log'}"
                    )
            pending = (o.kill_node_at is not None and not killed) or (
                o.restart_coordinator_at is not None and not restarted
            )
            time.sleep(0.1 if pending else 0.5)
        raise RuntimeError(f"the simulation did not finish in {o.timeout_s:.0f} s; logs in {self.work}")

    # ------------------------------------------------------------ the summary

    def summary(self, dataset: str) -> dict[str, Any]:
        db = sqlite3.connect(self.home / "state.db")
        db.row_factory = sqlite3.Row
        rounds = list(db.execute("SELECT * FROM rounds WHERE job=? ORDER BY round", (self.job,)))
        updates = list(
            db.execute("SELECT * FROM updates WHERE job=? ORDER BY round, pool, stage", (self.job,))
        )
        db.close()
        first, last = rounds[0], rounds[-1]
        start = json.loads(first["start_weights"])
        final = json.loads(last["start_weights"]) if last["state"] == "open" else None
        if final is None:
            from storage.stores import open_store

            store = open_store(self.opts.store or self.config.store_url)
            result = pb.Envelope.FromString(store.get_bytes(last["result_cid"]))
            body = pb.RoundResult.FromString(result.payload)
            final = {str(s.stage): s.weights_cid for s in body.stages}
        val_before = self._val_loss(dataset, start)
        val_after = self._val_loss(dataset, final)
        closed = [r for r in rounds if r["state"] == "closed" and r["mean_loss"] is not None]
        byzantine = self.byzantine_pools()
        db = sqlite3.connect(self.home / "state.db")
        quarantined = [
            n for (n,) in db.execute("SELECT node_id FROM nodes WHERE state='quarantined' ORDER BY node_id")
        ]
        db.close()
        rejected = [u for u in updates if u["status"] == "rejected"]
        return {
            "job": self.job,
            "pools": self.opts.pools,
            "stages": self.opts.stages,
            "rounds": len(closed),
            "loss_before": float(closed[0]["mean_loss"]) if closed else math.nan,
            "loss_after": float(closed[-1]["mean_loss"]) if closed else math.nan,
            "val_loss_before": val_before,
            "val_loss_after": val_after,
            "val_ppl_before": math.exp(val_before),
            "val_ppl_after": math.exp(val_after),
            "tokens": sum(int(r["tokens"] or 0) for r in rounds),
            "updates_accepted": sum(1 for u in updates if u["status"] == "accepted"),
            "updates_rejected": [
                {
                    "node": u["node_id"],
                    "round": int(u["round"]),
                    "stage": int(u["stage"]),
                    "pool": u["pool"],
                    "reason": u["reason"],
                }
                for u in updates
                if u["status"] == "rejected"
            ],
            "quarantined": quarantined,
            "byzantine_pools": sorted(byzantine),
            "detection": {
                "true_positives": sum(1 for u in rejected if u["pool"] in byzantine),
                "false_positives": sum(1 for u in rejected if u["pool"] not in byzantine),
                "false_negatives": sum(
                    1 for u in updates if u["status"] == "accepted" and u["pool"] in byzantine
                ),
            },
            "checkpoint_cid": last["checkpoint_cid"]
            or (rounds[-2]["checkpoint_cid"] if len(rounds) > 1 else ""),
            "round_details": [
                {
                    "round": int(r["round"]),
                    "state": r["state"],
                    "detail": r["detail"] or "",
                    "mean_loss": r["mean_loss"],
                }
                for r in rounds
            ],
            "events": self.events,
            "work_dir": str(self.work),
        }

    def _val_loss(self, dataset: str, weights: dict[str, str]) -> float:
        import torch

        from corpus.training import dataset_source
        from model.gpt import loss_fn
        from model.presets import config_from_mapping
        from model.stage import assemble_gpt
        from storage import tensors
        from storage.stores import open_store

        store = open_store(self.opts.store or self.config.store_url)
        config = config_from_mapping(self.model)
        stage_weights = [tensors.load(store.get_bytes(weights[str(s)])) for s in range(self.opts.stages)]
        model = assemble_gpt(config, stage_weights).eval()
        source = dataset_source(store, dataset, config=config, micro_batch=self.opts.micro_batch, seed=0)
        with torch.no_grad():
            losses = [
                float(loss_fn(model(x), y))
                for x, y in (source.val_batch(i) for i in range(self.opts.eval_batches))
            ]
        return sum(losses) / len(losses)


def simulate(opts: SimulateOptions) -> dict[str, Any]:
    from storage.stores import default_url, open_store

    # One store for everything: the corpus is prepared into it, and the coordinator and the
    # nodes must read it from the same place ($PANAL_STORE or local:~/.panal/store by default).
    opts = dataclasses.replace(opts, store=opts.store or default_url())
    sim = Simulation(opts)
    store = open_store(opts.store)
    dataset = opts.dataset or _demo_dataset(store)
    try:
        sim.setup(dataset, model_for(opts.preset, store, dataset))
        sim.run()
    finally:
        sim.stop_all()
    summary = sim.summary(dataset)
    (sim.work / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _demo_dataset(store: Any) -> str:
    """The demo corpus's CID: prepared on first use, then reused from the store's cache."""
    from corpus.cache import StageCache, default_cache_dir
    from corpus.demo import StdlibSource, demo_options
    from corpus.prepare import prepare
    from protocol.identity import load_or_create

    console.print("preparing the demo corpus (the Python standard library; reused once in the store) …")
    options = demo_options()  # the same dataset as `panal corpus demo`
    identity, _ = load_or_create(Path("~/.panal/operator.key").expanduser())
    result = prepare(
        [StdlibSource()], options, store=store, identity=identity, cache=StageCache(default_cache_dir(store))
    )
    console.print(f"demo corpus: {result.dataset_cid}")
    return result.dataset_cid


def model_for(preset: str, store: Any, dataset: str) -> dict[str, Any]:
    """The preset, with the vocabulary and context of the dataset it will train on."""
    from storage import manifest

    body = manifest.verify(store.get_bytes(dataset, max_bytes=manifest.MAX_MANIFEST_BYTES)).body
    return {"preset": preset, "vocab_size": body.vocab_size, "seq_len": body.seq_len}  # type: ignore[attr-defined]


def render(summary: dict[str, Any]) -> Table:
    table = Table(
        "", "value", title=f"panal simulate — {summary['pools']} pools × {summary['stages']} stages"
    )
    rows = [
        ("rounds", summary["rounds"]),
        ("loss (first round → last)", f"{summary['loss_before']:.4f} → {summary['loss_after']:.4f}"),
        ("held-out perplexity", f"{summary['val_ppl_before']:.1f} → {summary['val_ppl_after']:.1f}"),
        ("tokens trained", f"{summary['tokens']:,}"),
        ("updates accepted", summary["updates_accepted"]),
        ("updates rejected", len(summary["updates_rejected"])),
        ("final checkpoint", summary["checkpoint_cid"]),
        ("quarantined", ", ".join(q[:12] for q in summary["quarantined"]) or "none"),
        (
            "detection (TP / FP / FN)",
            "{true_positives} / {false_positives} / {false_negatives}".format(**summary["detection"]),
        ),
    ]
    for r in summary["updates_rejected"][:10]:
        rows.append((f"  rejected r{r['round']} {r['pool']}/{r['stage']}", r["reason"][:90]))
    for e in summary["events"]:
        rows.append(("fault drill", e))
    for k, v in rows:
        table.add_row(k, str(v))
    return table
