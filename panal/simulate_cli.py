"""`panal simulate`: the command; the work is in panal/simulate.py."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console

from panal.simulate import SimulateOptions, render, simulate

console = Console()


def simulate_command(
    pools: int = typer.Option(2, "--pools", min=1, help="Pools (DeepSpeed worlds), each a full replica."),
    stages: int = typer.Option(
        2, "--stages", min=1, help="Pipeline stages per pool (one node process each)."
    ),
    rounds: int = typer.Option(4, "--rounds", min=1),
    inner_steps: int = typer.Option(20, "--inner-steps", min=1, help="Inner steps per round (H)."),
    standby: int = typer.Option(
        0, "--standby", min=0, help="Standby nodes per pool (take over a lost stage)."
    ),
    byzantine: int = typer.Option(
        0, "--byzantine", min=0, help="The last K pools attack (every node of theirs)."
    ),
    attack: str = typer.Option(
        "ipm", "--attack", help="sign_flip, scale, gaussian, zeros, alie, ipm, label_flip or backdoor."
    ),
    kill_node_at: int | None = typer.Option(
        None, "--kill-node-at", help="SIGKILL a node of pool-a in this round."
    ),
    restart_coordinator_at: int | None = typer.Option(
        None, "--restart-coordinator-at", help="SIGKILL and restart the coordinator in this round."
    ),
    preset: str = typer.Option("tiny", "--preset"),
    dataset: str | None = typer.Option(None, "--dataset", help="Dataset CID (default: the demo corpus)."),
    store: str | None = typer.Option(
        None, "--store", envvar="PANAL_STORE", help="Blob store URL (default local:~/.panal/store)."
    ),
    work_dir: Path | None = typer.Option(
        None, "--work-dir", help="Coordinator, node homes and logs (default runs/simulate-TIME)."
    ),
    summary_json: Path | None = typer.Option(
        None, "--summary-json", help="Write the summary here as one JSON object."
    ),
    frontends: int = typer.Option(
        0, "--frontends", min=0, max=64, help="Front-end processes serving the coordinator's main port."
    ),
) -> None:
    """Run the main job on one machine: demo corpus, a coordinator and node daemons as separate processes."""
    opts = SimulateOptions(
        pools=pools,
        stages=stages,
        rounds=rounds,
        inner_steps=inner_steps,
        standby=standby,
        byzantine=byzantine,
        attack=attack,
        kill_node_at=kill_node_at,
        restart_coordinator_at=restart_coordinator_at,
        preset=preset,
        dataset=dataset,
        store=store,
        frontends=frontends,
        **({"work_dir": work_dir} if work_dir else {}),
    )
    summary = simulate(opts)
    console.print(render(summary))
    if summary_json:
        summary_json.write_text(json.dumps(summary, indent=2))
        console.print(f"summary written to {summary_json}")
