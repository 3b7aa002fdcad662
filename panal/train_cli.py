"""`panal train`: the command; the work is in panal/train.py."""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from model.engine import TrainConfig, default_precision
from model.presets import resolve_config
from panal.train import RunSpec, launch

console = Console()


def train_command(
    preset: str | None = typer.Option("tiny", "--preset", help="Model preset (tiny, 125m, 1.3b, …)."),
    config_file: Path | None = typer.Option(
        None, "--config", help="Model config file (YAML/JSON) instead of a preset."
    ),
    stages: int = typer.Option(2, "--stages", min=1, help="Pipeline stages, one local process each."),
    dp: int = typer.Option(1, "--dp", min=1, help="Data-parallel replicas of the pipeline."),
    steps: int = typer.Option(200, "--steps", min=1, help="Optimizer steps."),
    tokens: Path | None = typer.Option(
        None, "--tokens", exists=True, dir_okay=False, help="Token file (flat uint16/uint32)."
    ),
    token_dtype: str = typer.Option("uint16", "--token-dtype", help="uint16 or uint32, for --tokens."),
    dataset: str | None = typer.Option(None, "--dataset", help="Dataset manifest CID (from `panal corpus`)."),
    micro_batch: int = typer.Option(4, "--micro-batch", min=1),
    grad_accum: int = typer.Option(4, "--grad-accum", min=1, help="Micro-batches per step (pipeline depth)."),
    lr: float = typer.Option(6e-4, "--lr"),
    precision: str = typer.Option(default_precision(), "--precision", help="fp16 (GPU), bf16 or fp32."),
    checkpointing: bool = typer.Option(False, "--activation-checkpointing/--no-activation-checkpointing"),
    seed: int = typer.Option(0, "--seed"),
    eval_every: int = typer.Option(
        50, "--eval-every", min=0, help="Held-out loss every N steps (0: only at the ends)."
    ),
    checkpoint_every: int = typer.Option(
        0, "--checkpoint-every", min=0, help="Checkpoint every N steps (0: at the end)."
    ),
    resume: str | None = typer.Option(None, "--resume", help="Checkpoint CID to resume from."),
    store: str | None = typer.Option(
        None, "--store", envvar="PANAL_STORE", help="Store URL for data and checkpoints."
    ),
    key: Path = typer.Option(
        Path("~/.panal/operator.key"), "--key", help="Identity that signs checkpoints (made if missing)."
    ),
    run_dir: Path | None = typer.Option(
        None, "--run-dir", help="Logs, TensorBoard and summary (default runs/train-TIME)."
    ),
    log_every: int = typer.Option(10, "--log-every", min=1),
) -> None:
    """Train one pool on this machine: a local process per stage, DeepSpeed pipeline, checkpoints to the store."""
    name, config = resolve_config(None if config_file else preset, config_file)
    tc = TrainConfig(
        total_steps=steps,
        micro_batch=micro_batch,
        grad_accum=grad_accum,
        lr=lr,
        precision=precision,  # type: ignore[arg-type]
        activation_checkpointing=checkpointing,
        seed=seed,
    )
    spec = RunSpec(
        model=config.to_dict(),
        train={f: getattr(tc, f) for f in tc.__dataclass_fields__},
        stages=stages,
        dp=dp,
        steps=steps,
        tokens=str(tokens) if tokens else None,
        token_dtype=token_dtype,
        dataset=dataset,
        store=store,
        key=str(key),
        eval_every=eval_every,
        checkpoint_every=checkpoint_every,
        resume=resume,
        log_every=log_every,
    )
    if not tokens and not dataset:
        raise typer.BadParameter(
            "give training data: --tokens FILE or --dataset CID (see `panal corpus demo`)"
        )
    run_dir = run_dir or Path("runs") / f"train-{time.strftime('%Y%m%d-%H%M%S')}"
    summary = launch(spec, run_dir)
    table = Table("", "value", title=f"panal train: {name}")
    for k, v in summary.items():
        table.add_row(k, f"{v:.4f}" if isinstance(v, float) else str(v))
    console.print(table)
    console.print(json.dumps(summary["checkpoint_cid"]).strip('"'), highlight=False)
