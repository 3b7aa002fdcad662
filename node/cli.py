"""`panal node start`: run the node daemon."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import typer

node_app = typer.Typer(help="Run a node daemon on a GPU (or CPU) host.", no_args_is_help=True)


@node_app.command("start")
def start(
    coordinator: str = typer.Option(..., "--coordinator", help="HOST:PORT of the coordinator's mTLS port."),
    pool: str = typer.Option(..., "--pool", help="The pool this node belongs to."),
    ca: Path = typer.Option(
        ..., "--ca", exists=True, dir_okay=False, help="The coordinator's CA certificate (ca.pem)."
    ),
    token: str | None = typer.Option(
        None, "--token", envvar="PANAL_TOKEN", help="Enrollment token (first start only)."
    ),
    enroll: str | None = typer.Option(
        None, "--enroll", help="HOST:PORT of the enrollment port (default: PORT+1)."
    ),
    home: Path = typer.Option(Path("~/.panal/node"), "--home", help="Identity, certificate, logs."),
    name: str = typer.Option("", "--name", help="A label for this host (default: hostname)."),
    store: str | None = typer.Option(
        None, "--store", envvar="PANAL_STORE", help="Blob store URL shared with the coordinator."
    ),
    data_host: str = typer.Option(
        "127.0.0.1", "--data-host", help="Address the pool's DeepSpeed world reaches this node on."
    ),
    memory_gb: float | None = typer.Option(
        None, "--memory-gb", help="Declared device memory (default: measured)."
    ),
    attack: str | None = typer.Option(
        None, "--attack", hidden=True, help="Byzantine update policy (simulations)."
    ),
    attack_pools: int = typer.Option(0, "--attack-pools", hidden=True),
    attack_byzantine: int = typer.Option(0, "--attack-byzantine", hidden=True),
    fault_die_at_round: int | None = typer.Option(None, "--fault-die-at-round", hidden=True),
    fault_marker: Path | None = typer.Option(None, "--fault-marker", hidden=True),
) -> None:
    """Enroll (first time), heartbeat, and train whatever the coordinator assigns, until SIGTERM."""
    from node.daemon import NodeConfig, NodeDaemon

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr
    )
    host, _, port = coordinator.rpartition(":")
    config = NodeConfig(
        home=home.expanduser(),
        coordinator=coordinator,
        enroll=enroll or f"{host}:{int(port) + 1}",
        ca=ca,
        pool=pool,
        token=token,
        name=name,
        store=store,
        data_host=data_host,
        memory_bytes=int(memory_gb * 2**30) if memory_gb else None,
        attack={"name": attack, "n_pools": attack_pools, "n_byzantine": attack_byzantine} if attack else None,
        fault={"die_at_round": fault_die_at_round, "marker": str(fault_marker)}
        if fault_die_at_round is not None and fault_marker
        else None,
    )
    raise typer.Exit(NodeDaemon(config).run())
