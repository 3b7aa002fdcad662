"""`panal coordinator …` (run it) and `panal admin …` (talk to it over gRPC with the admin identity)."""

from __future__ import annotations

import datetime as dt
import json
import time
from pathlib import Path

import grpc
import typer
from rich.console import Console
from rich.live import Live
from rich.table import Table

from protocol import panal_pb2 as pb
from protocol import tls
from protocol.client import Client
from protocol.identity import Identity

console = Console()
err = Console(stderr=True)

coordinator_app = typer.Typer(help="Run a coordinator: create its files, serve it.", no_args_is_help=True)
admin_app = typer.Typer(
    help="Administer a coordinator over gRPC (mTLS, signed requests).", no_args_is_help=True
)
token_app = typer.Typer(help="Enrollment tokens.", no_args_is_help=True)
job_app = typer.Typer(help="Jobs.", no_args_is_help=True)
admin_app.add_typer(token_app, name="token")
admin_app.add_typer(job_app, name="job")

DEFAULT_HOME = Path("~/.panal/coordinator")


# ------------------------------------------------------------------ coordinator


@coordinator_app.command("init")
def init_command(
    home: Path = typer.Argument(DEFAULT_HOME, help="Directory for the coordinator's files."),
    host: list[str] = typer.Option(
        ["localhost", "127.0.0.1"], "--host", help="Names/addresses nodes will dial."
    ),
    bind: str = typer.Option("127.0.0.1", "--bind", help="Address to listen on (0.0.0.0 for all)."),
    port: int = typer.Option(7700, "--port", help="mTLS port for nodes and admins."),
    enroll_port: int = typer.Option(7701, "--enroll-port", help="TLS port for enrollment."),
    metrics_port: int = typer.Option(9700, "--metrics-port", help="Prometheus /metrics (0: off)."),
    store: str = typer.Option(
        "", "--store", help="Blob store URL shared with the nodes (default local:HOME/store)."
    ),
    heartbeat_timeout: float = typer.Option(
        15.0, "--heartbeat-timeout", help="Seconds of silence before a node is lost."
    ),
    frontends: int = typer.Option(
        0,
        "--frontends",
        min=0,
        max=64,
        help="Front-end processes serving the main port (heartbeats on more cores); 0: this process serves it.",
    ),
) -> None:
    """Create the CA, certificates, identities, config and database."""
    from coordinator.server import init

    config = init(
        home,
        hostnames=host,
        port=port,
        enroll_port=enroll_port,
        metrics_port=metrics_port,
        bind=bind,
        store=store,
        heartbeat_timeout_s=heartbeat_timeout,
        frontends=frontends,
    )
    console.print(f"coordinator created in {config.home}")
    console.print(
        f"  nodes dial {host[0]}:{port} (enroll on :{enroll_port}) and trust {config.home / 'ca.pem'}"
    )
    console.print(
        f"  admin identity {config.home / 'admin.key'}; serve with `panal coordinator serve {home}`"
    )


@coordinator_app.command("serve")
def serve_command(
    home: Path = typer.Argument(DEFAULT_HOME, help="The directory made by `panal coordinator init`."),
    log_format: str = typer.Option("json", "--log-format", help="json (structured) or text."),
) -> None:
    """Serve until SIGTERM/SIGINT."""
    from coordinator.logs import setup_logging
    from coordinator.server import serve

    setup_logging(log_format)
    serve(home)


# ------------------------------------------------------------------ admin


class _Admin:
    home: Path = DEFAULT_HOME
    target: str | None = None


@admin_app.callback()
def admin_options(
    home: Path = typer.Option(
        DEFAULT_HOME,
        "--home",
        envvar="PANAL_COORDINATOR_HOME",
        help="Coordinator directory (admin keys, CA).",
    ),
    coordinator: str | None = typer.Option(
        None, "--coordinator", help="HOST:PORT (default: the config's listen address)."
    ),
) -> None:
    """Administer a coordinator over gRPC (mTLS, signed requests)."""
    _Admin.home, _Admin.target = home.expanduser(), coordinator


def _client() -> Client:
    from coordinator.server import CoordinatorConfig

    config = CoordinatorConfig.load(_Admin.home)
    target = _Admin.target or config.listen.replace("0.0.0.0", "127.0.0.1")  # noqa: S104 - dialing, not binding
    home = config.home
    return Client(
        target,
        Identity.load(home / "admin.key"),
        ca_pem=(home / "ca.pem").read_bytes(),
        cert=tls.load(home / "admin.pem", home / "admin-tls.key"),
    )


def _call(method: str, body: object) -> object:
    with _client() as c:
        try:
            return c.call(c.admin, method, body)  # type: ignore[arg-type]
        except grpc.RpcError as e:
            err.print(f"[red]error:[/red] {e.details() or e.code().name}", highlight=False)  # type: ignore[attr-defined]
            raise typer.Exit(1) from None


def _ago(ms: int) -> str:
    if not ms:
        return "never"
    return f"{max(0.0, time.time() - ms / 1000):.0f}s ago"


@token_app.command("create")
def token_create(
    pool: str = typer.Option(..., "--pool", help="The pool the node will join."),
    ttl: int = typer.Option(3600, "--ttl", help="Seconds until the token expires."),
) -> None:
    """Create a single-use enrollment token; print it (the last line)."""
    reply = _call("CreateEnrollmentToken", pb.CreateEnrollmentTokenRequest(pool=pool, ttl_seconds=ttl))
    expires = dt.datetime.fromtimestamp(reply.expires_at_ms / 1000, dt.UTC)  # type: ignore[attr-defined]
    err.print(f"token for pool {pool}, single use, expires {expires:%Y-%m-%d %H:%M:%S} UTC")
    print(reply.token)  # type: ignore[attr-defined]


@admin_app.command("nodes")
def nodes_command() -> None:
    """List the enrolled nodes."""
    reply = _call("ListNodes", pb.ListNodesRequest())
    table = Table("node", "name", "pool", "state", "stage", "memory", "heartbeat")
    for n in reply.nodes:  # type: ignore[attr-defined]
        mem = (
            n.capabilities.gpu_memory_bytes if n.capabilities.gpu_count else n.capabilities.host_memory_bytes
        )
        table.add_row(
            n.node_id[:12],
            n.name,
            n.pool,
            n.state,
            str(n.stage) if n.has_stage else "standby" if n.state == "active" else "",
            f"{mem / 2**30:.1f} GiB",
            _ago(n.last_heartbeat_ms),
        )
    console.print(table)


@job_app.command("submit")
def job_submit(
    spec: Path = typer.Argument(..., exists=True, dir_okay=False, help="Job spec (YAML)."),
) -> None:
    """Submit a job (validated: errors name the field and the fix)."""
    reply = _call("SubmitJob", pb.SubmitJobRequest(spec_yaml=spec.read_text()))
    console.print(f"job {reply.job} submitted")  # type: ignore[attr-defined]


@job_app.command("status")
def job_status(job: str = typer.Argument("", help="Job name (default: the current job).")) -> None:
    """A job's state and placement: which node runs which stage, and why."""
    reply = _call("GetJob", pb.GetJobRequest(job=job))
    if not reply.job:  # type: ignore[attr-defined]
        console.print("no job")
        return
    console.print(f"[bold]{reply.job}[/bold]: {reply.state}, round {reply.round}")  # type: ignore[attr-defined]
    table = Table("pool", "stage", "layers", "node", "why")
    for p in reply.placement:  # type: ignore[attr-defined]
        table.add_row(p.pool, str(p.stage), f"{p.layer_start}–{p.layer_end - 1}", p.node_id[:12], p.reason)
    console.print(table)
    for pool, shards in sorted(reply.shards_by_pool.items()):  # type: ignore[attr-defined]
        console.print(
            f"{pool} trains on {len(shards.split(','))} shard(s): {shards[:80]}{'…' if len(shards) > 80 else ''}"
        )


@admin_app.command("rounds")
def rounds_command(job: str = typer.Option("", "--job"), limit: int = typer.Option(20, "--limit")) -> None:
    """The job's rounds, newest first."""
    reply = _call("ListRounds", pb.ListRoundsRequest(job=job, limit=limit))
    table = Table("round", "state", "accepted", "rejected", "loss", "result", "detail")
    for r in reply.rounds:  # type: ignore[attr-defined]
        table.add_row(
            str(r.round),
            r.state,
            str(r.updates_accepted),
            str(r.updates_rejected),
            f"{r.mean_loss:.4f}" if r.mean_loss else "",
            r.result_cid,
            r.detail,
        )
    console.print(table)


@admin_app.command("evict")
def evict_command(
    node: str = typer.Argument(..., help="Node id (or a unique prefix)."),
    reason: str = typer.Option("", "--reason"),
) -> None:
    """Evict a node: its calls are refused; a standby takes its stage."""
    _call("EvictNode", pb.EvictNodeRequest(node_id=node, reason=reason))
    console.print(f"evicted {node}")


@admin_app.command("verify-round")
def verify_round_command(
    round: int = typer.Argument(..., help="The round to recompute."),
    job: str = typer.Option("", "--job", help="Job name (default: the current job)."),
    store: str | None = typer.Option(
        None, "--store", envvar="PANAL_STORE", help="Store holding the round's blobs."
    ),
) -> None:
    """Recompute a round from the store and check the coordinator's signed result (exit 0 only if all holds)."""
    from coordinator.job import JobSpec
    from coordinator.server import CoordinatorConfig
    from coordinator.verify_round import verify_round
    from protocol.identity import read_public_key
    from storage.stores import open_store

    spec_reply = _call("GetJob", pb.GetJobRequest(job=job))
    spec = JobSpec.model_validate_json(spec_reply.spec_yaml)  # type: ignore[attr-defined]
    results = {
        r.round: r.result_cid
        for r in _call("ListRounds", pb.ListRoundsRequest(job=spec.name, limit=1_000_000)).rounds
    }  # type: ignore[attr-defined]
    if not results.get(round):
        err.print(f"[red]error:[/red] round {round} of {spec.name} has no result yet")
        raise typer.Exit(1)
    config = CoordinatorConfig.load(_Admin.home)
    key = read_public_key(config.home / "coordinator.key.pub")
    checks = verify_round(
        open_store(store or config.store_url),
        spec,
        results[round],
        round=round,
        coordinator_key=key,
        previous_cid=results.get(round - 1) or None,
    )
    table = Table("", "check", "detail", title=f"{spec.name} round {round}: {results[round]}")
    for c in checks:
        table.add_row("[green]ok[/green]" if c.ok else "[red]FAIL[/red]", c.what, c.detail)
    console.print(table)
    if not all(c.ok for c in checks):
        raise typer.Exit(1)


@admin_app.command("readmit")
def readmit_command(
    node: str = typer.Argument(..., help="Node id (or a unique prefix)."),
    reason: str = typer.Option("", "--reason"),
) -> None:
    """Lift a quarantine (or an eviction): the node may take work again."""
    _call("ReadmitNode", pb.ReadmitNodeRequest(node_id=node, reason=reason))
    console.print(f"readmitted {node}")


def status_table(reply: pb.StatusReply) -> Table:
    title = (
        f"{reply.job or 'no job'} — {reply.job_state} — round {reply.round} — loss {reply.loss:.4f} — "
        f"{reply.tokens_per_second:,.0f} tok/s — updates {reply.updates_accepted} accepted, {reply.updates_rejected} rejected"
    )
    table = Table(
        "pool", "state", "stage", "node", "node state", "step", "loss", "tok/s", "detail", title=title
    )
    for p in reply.pools:
        for i, s in enumerate(p.stages or [pb.StageStatus()]):
            table.add_row(
                p.pool if i == 0 else "",
                p.state if i == 0 else "",
                str(s.stage),
                s.node_id[:12],
                pb.NodeState.Name(s.state).removeprefix("NODE_STATE_").lower(),
                str(s.step),
                f"{s.loss:.4f}",
                f"{s.tokens_per_second:,.0f}",
                p.detail if i == 0 else "",
            )
    return table


@admin_app.command("status")
def status_command(
    watch: bool = typer.Option(False, "--watch", help="Refresh every second until Ctrl-C."),
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """Pools, stages, nodes, round, loss, tokens/s, rejected updates."""
    if json_out:
        from google.protobuf.json_format import MessageToDict

        print(json.dumps(MessageToDict(_call("Status", pb.StatusRequest()))))  # type: ignore[arg-type]
        return
    if not watch:
        console.print(status_table(_call("Status", pb.StatusRequest())))  # type: ignore[arg-type]
        return
    with Live(console=console, refresh_per_second=2) as live:
        try:
            while True:
                live.update(status_table(_call("Status", pb.StatusRequest())))  # type: ignore[arg-type]
                time.sleep(1)
        except KeyboardInterrupt:
            pass
