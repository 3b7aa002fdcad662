"""`panal plan`: parameters, memory per GPU and FLOPs of a model on a parallel layout.

Thin: parse the options, call :func:`model.plan.plan`, render. Exit status 0 when the
layout fits, 1 when it does not (the reason says why and what to change), 2 on bad input.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from model.config import ModelConfigError
from model.plan import GPU_TYPES, LayoutRequest, Plan, plan
from model.presets import PRESETS, resolve_config

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)

EXIT_DOES_NOT_FIT = 1
EXIT_BAD_INPUT = 2


def _human(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:g}"


def _gib(n: float) -> str:
    return f"{n / (1 << 30):,.1f}"


def _kv_table(title: str) -> Table:
    t = Table(title=title, title_justify="left", show_header=False, box=None, padding=(0, 2))
    t.add_column(style="bold")
    t.add_column()
    return t


def render(p: Plan, console: Console) -> None:
    """The plan as tables an operator reads top to bottom; the verdict last."""
    c, lay, counts = p.config, p.layout, p.counts
    gpu = GPU_TYPES[lay.gpu_type]

    model = _kv_table(f"Model {p.name}")
    model.add_row("parameters", f"{p.params:,} ({_human(p.params)})")
    model.add_row(
        "shape",
        f"{c.n_layer} layers, d_model {c.d_model}, {c.n_head} heads, d_ff {c.d_ff} "
        f"({c.mlp.upper()}), vocab {c.vocab_size:,}, context {c.seq_len}, "
        f"{'tied' if c.tied_embeddings else 'untied'} embeddings",
    )
    model.add_row(
        "by layer",
        f"embedding {counts.embedding:,} · block {counts.per_block:,} × {c.n_layer} · "
        f"final norm {counts.final_norm:,} · lm_head {counts.lm_head:,}",
    )
    console.print(model)

    layout = _kv_table("Layout")
    layout.add_row(
        "GPUs",
        f"{lay.gpus:,} × {gpu.name} ({_gib(gpu.memory_bytes)} GiB, "
        f"{gpu.peak_tflops[lay.precision]:g} TFLOP/s {lay.precision})",
    )
    layout.add_row("parallelism", f"{lay.stages} pipeline stages × {lay.dp} data-parallel")
    master = "" if lay.precision == "fp32" else " with FP32 master weights"
    ckpt = "on" if lay.checkpointing else "off"
    if lay.cpu_checkpointing:
        ckpt += ", checkpoints in host memory"
    layout.add_row("training", f"ZeRO-{lay.zero}, {lay.precision}{master}, checkpointing {ckpt}")
    layout.add_row(
        "batch",
        f"micro-batch {lay.micro_batch} × {lay.seq_len} tokens, {lay.micro_batches:,} "
        f"micro-batches per step → {lay.tokens_per_step:,} tokens per step",
    )
    layout.add_row("chosen by", p.chosen_by)
    console.print(layout)

    worst = p.worst
    n = len(p.stages)
    shown = sorted({i for i in (0, 1, worst.index, n - 2, n - 1) if 0 <= i < n})
    stages = Table(title="Pipeline stages", title_justify="left")
    for col in ("stage", "blocks", "params", "in flight", "GiB per GPU"):
        stages.add_column(col, justify="right")
    previous = -1
    for i in shown:
        if i > previous + 1:
            stages.add_row("…", "", "", "", "")
        s = p.stages[i]
        first, last = s.blocks.start, s.blocks.stop - 1
        blocks = str(first) if first == last else f"{first}–{last}"
        blocks = ("embedding + " if i == 0 else "") + blocks + (" + head" if i == n - 1 else "")
        stages.add_row(
            str(i),
            blocks,
            f"{s.params:,}",
            str(s.in_flight),
            _gib(s.memory.total) + (" ◀ fullest" if i == worst.index else ""),
        )
        previous = i
    console.print(stages)

    m = worst.memory
    mem = Table(title=f"Memory per GPU of stage {worst.index} (the fullest)", title_justify="left")
    mem.add_column("component")
    mem.add_column("GiB", justify="right")
    mem.add_column("how")
    w = "4" if lay.precision == "fp32" else "2"
    shard = f" ÷ {lay.dp} (ZeRO-{lay.zero})" if lay.zero >= 1 and lay.dp > 1 else ""
    opt = "8 B (Adam m, v)" if lay.precision == "fp32" else "12 B (FP32 master + Adam m, v)"
    mem.add_row("weights", _gib(m.weights), f"{worst.params:,} params × {w} B")
    mem.add_row("gradients", _gib(m.gradients), f"params × {w} B")
    mem.add_row("optimizer states", _gib(m.optimizer_states), f"params × {opt}{shard}")
    mem.add_row(
        "activations",
        _gib(m.activations),
        f"{worst.in_flight} micro-batch(es) in flight, checkpointing {ckpt}",
    )
    mem.add_row("fragmentation", _gib(m.fragmentation), "10% of activations")
    mem.add_row(
        "weight-grad temporary",
        _gib(m.weight_grad_temporary),
        "the largest weight's new gradient, before it is added in",
    )
    if m.fp32_grad_copy:
        mem.add_row(
            "FP32 grad copy",
            _gib(m.fp32_grad_copy),
            f"params × 4 B{shard}, at the optimizer step (not alive with activations)",
        )
    mem.add_row("fixed overhead", _gib(m.fixed_overhead), "CUDA context, NCCL, DeepSpeed buckets")
    mem.add_row("total", f"[bold]{_gib(m.total)}[/bold]", f"of {_gib(p.capacity_bytes)} GiB")
    if m.host_checkpoints:
        mem.add_row("host memory", _gib(m.host_checkpoints), "checkpoints (not on the GPU)")
    console.print(mem)

    comp = p.compute
    compute = _kv_table("Compute")
    compute.add_row(
        "FLOPs per token",
        f"{comp.model_flops_per_token:.3e} = 6·N + 12·L·d·T (N = {counts.matmul:,} matmul params)",
    )
    if lay.checkpointing:
        compute.add_row(
            "",
            f"{comp.hardware_flops_per_token:.3e} with the recomputed forward (+2·N_blocks + 4·L·d·T)",
        )
    compute.add_row("FLOPs per step", f"{comp.flops_per_step:.3e}")
    compute.add_row(
        "pipeline bubble",
        f"{comp.bubble_fraction:.1%} = (S−1)/(M+S−1), S = {lay.stages}, M = {lay.micro_batches}",
    )
    compute.add_row(
        "estimate",
        f"{comp.step_seconds:,.1f} s per step, {comp.tokens_per_second:,.0f} tokens/s "
        f"(at 40% of peak while busy)",
    )
    console.print(compute)

    for warning in p.warnings:
        console.print(f"[yellow]note:[/yellow] {warning}")
    verdict = "[bold green]FITS[/bold green]" if p.fits else "[bold red]DOES NOT FIT[/bold red]"
    console.print(f"{verdict}  {p.reason}")


@app.command("plan")
def plan_command(
    preset: str | None = typer.Option(None, "--preset", "-p", help=f"A model preset: {', '.join(PRESETS)}."),
    config: Path | None = typer.Option(
        None, "--config", "-c", help="A model config file (YAML/JSON; may say `preset: NAME`)."
    ),
    gpus: int | None = typer.Option(
        None, "--gpus", help="GPUs in the pool. Alone: the planner picks stages × dp."
    ),
    gpu_type: str = typer.Option("A100-80GB", "--gpu-type", help=f"One of {', '.join(GPU_TYPES)}."),
    stages: int | None = typer.Option(None, "--stages", help="Pipeline stages."),
    dp: int | None = typer.Option(None, "--dp", help="Data-parallel degree (replicas in the pool)."),
    zero: int | None = typer.Option(
        None, "--zero", help="ZeRO stage: 0 or 1 with a pipeline (default 1); 2/3 need --stages 1."
    ),
    fp16: bool = typer.Option(False, "--fp16", help="FP16 with FP32 master weights (default)."),
    bf16: bool = typer.Option(False, "--bf16", help="BF16 with FP32 master weights."),
    fp32: bool = typer.Option(False, "--fp32", help="Plain FP32."),
    checkpointing: bool = typer.Option(
        True, "--checkpointing/--no-checkpointing", help="Recompute each block's activations."
    ),
    cpu_checkpointing: bool | None = typer.Option(
        None,
        "--cpu-checkpointing/--no-cpu-checkpointing",
        help="Keep checkpoints in host memory (default: only where they do not fit on GPU).",
        show_default=False,
    ),
    micro_batch: int = typer.Option(1, "--micro-batch", help="Sequences per micro-batch."),
    seq_len: int | None = typer.Option(
        None, "--seq-len", help="Tokens per sequence (default: the model's context)."
    ),
    global_batch_tokens: int | None = typer.Option(
        None, "--global-batch-tokens", help="Tokens per optimizer step (default ≈ 4 M)."
    ),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object instead."),
) -> None:
    """Count parameters, FLOPs and memory per GPU, and check that a layout fits."""
    err = Console(stderr=True)
    try:
        chosen = [name for name, on in (("fp16", fp16), ("bf16", bf16), ("fp32", fp32)) if on]
        if len(chosen) > 1:
            raise ModelConfigError(f"give one of --fp16/--bf16/--fp32, not {' and '.join(chosen)}")
        name, model_config = resolve_config(preset, config)
        request = LayoutRequest(
            gpus=gpus,
            stages=stages,
            dp=dp,
            zero=zero,
            precision=chosen[0] if chosen else "fp16",
            checkpointing=checkpointing,
            cpu_checkpointing=cpu_checkpointing,
            micro_batch=micro_batch,
            seq_len=seq_len,
            global_batch_tokens=global_batch_tokens,
            gpu_type=gpu_type,
        )
        result = plan(model_config, request, name=name)
    except ModelConfigError as e:
        err.print(f"[red]error:[/red] {e}", highlight=False)
        raise typer.Exit(EXIT_BAD_INPUT) from None
    if json_out:
        typer.echo(json.dumps(result.to_dict()))
    else:
        render(result, Console(highlight=False))
    if not result.fits:
        if json_out:
            err.print(f"[red]{result.reason}[/red]", highlight=False)
        raise typer.Exit(EXIT_DOES_NOT_FIT)


if __name__ == "__main__":
    app()
