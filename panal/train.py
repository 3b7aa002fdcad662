"""`panal train`: one pool on one machine — a local process per pipeline stage (× data parallel).

The launcher (:func:`launch`) writes the run's spec, starts one OS process per
rank (``python -m panal.train RUN_DIR RANK``), waits, and stops them all if one
fails. Rank 0 reports: loss, learning rate, tokens/s and MFU to the console
and to TensorBoard (RUN_DIR/tb), held-out loss at intervals, and the
checkpoints it writes to the store. The run's summary lands in
RUN_DIR/summary.json.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from model.config import ModelConfigError

PEAK_PROBE_SECONDS = 0.3


@dataclass(frozen=True, kw_only=True)
class RunSpec:
    """Everything a rank needs, written to RUN_DIR/spec.json by the launcher."""

    model: dict[str, Any]  # GPTConfig.to_dict()
    train: dict[str, Any]  # TrainConfig fields
    stages: int
    dp: int = 1
    steps: int
    tokens: str | None = None  # token file
    token_dtype: str = "uint16"
    dataset: str | None = None  # dataset manifest CID
    store: str | None = None
    key: str = "~/.panal/operator.key"
    eval_every: int = 50
    eval_batches: int = 4
    checkpoint_every: int = 0  # 0: only at the end
    resume: str | None = None
    log_every: int = 1
    master_port: int = 0
    timeout_s: float = 120.0

    @property
    def world_size(self) -> int:
        return self.stages * self.dp


# ------------------------------------------------------------------ launcher


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class TrainError(ModelConfigError):
    """A rank of the local pool failed; the message names it and ends with its log."""


def launch(spec: RunSpec, run_dir: Path, *, threads_per_rank: int = 1) -> dict[str, Any]:
    """Run the pool to completion; return the summary. Raises TrainError naming a failed rank."""
    from model.config import GPTConfig

    # Check the data here, once, so that bad input is one clear error, not a crash per rank.
    train = spec.train
    _source(spec, GPTConfig.from_dict(spec.model), train["micro_batch"], train["seed"])
    run_dir.mkdir(parents=True, exist_ok=True)
    spec = dataclasses.replace(spec, master_port=spec.master_port or _free_port())
    (run_dir / "spec.json").write_text(json.dumps(dataclasses.asdict(spec), indent=2))
    (run_dir / "summary.json").unlink(missing_ok=True)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(threads_per_rank),
        "PANAL_THREADS": str(threads_per_rank),
    }
    if "cuda" not in os.environ.get("DS_ACCELERATOR", "") and not _has_cuda():
        env["DS_ACCELERATOR"] = "cpu"
    procs: list[subprocess.Popen[bytes]] = []
    logs = []
    try:
        for rank in range(spec.world_size):
            log = open(run_dir / f"rank{rank}.log", "wb")  # noqa: SIM115 - closed below
            logs.append(log)
            # Rank 0 reports to this terminal; the others to their log files.
            out = None if rank == 0 else log
            env_r = {**env, "PANAL_LOCAL_RANK": str(rank if _has_cuda() else 0)}
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "panal.train", str(run_dir), str(rank)],
                    stdout=out,
                    stderr=log if rank else None,
                    env=env_r,
                )
            )
        failed = _wait(procs)
        if failed is not None:
            rank, code = failed
            tail = (run_dir / f"rank{rank}.log").read_text(errors="replace")[-3000:] if rank else ""
            raise TrainError(
                f"rank {rank} exited with status {code}; the others were stopped "
                f"(logs in {run_dir}).\n{tail}".rstrip()
            )
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        for p in procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for log in logs:
            log.close()
    summary: dict[str, Any] = json.loads((run_dir / "summary.json").read_text())
    return summary


def _wait(procs: list[subprocess.Popen[bytes]]) -> tuple[int, int] | None:
    """Wait for every rank; at the first failure return (rank, status) at once."""
    while True:
        codes = [p.poll() for p in procs]
        for rank, code in enumerate(codes):
            if code not in (None, 0):
                return rank, code
        if all(code == 0 for code in codes):
            return None
        time.sleep(0.2)


def _has_cuda() -> bool:
    import torch

    return bool(torch.cuda.is_available())


# ------------------------------------------------------------------ one rank


def measured_peak_flops(threads: int) -> float:
    """This process's dense matmul peak (FLOP/s), for MFU on a CPU with no published peak."""
    import torch

    n = 512
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    count, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < PEAK_PROBE_SECONDS:
        torch.mm(a, b)
        count += 1
    return 2 * n**3 * count / (time.perf_counter() - t0)


def gpu_peak_flops(precision: str) -> float | None:
    """The published dense peak of this GPU, if it is a type the planner knows."""
    import torch

    from model.plan import GPU_TYPES

    name = torch.cuda.get_device_name().upper()
    for key, gpu in GPU_TYPES.items():
        if key.split("-")[0] in name:
            return gpu.peak_tflops[precision] * 1e12
    return None


def _source(spec: RunSpec, config: Any, micro_batch: int, seed: int) -> Any:
    from model.data import DataError, TokenFile

    if spec.tokens:
        return TokenFile(
            spec.tokens,
            seq_len=config.seq_len,
            micro_batch=micro_batch,
            vocab_size=config.vocab_size,
            dtype=spec.token_dtype,
            seed=seed,
        )
    if spec.dataset:
        from corpus.training import dataset_source
        from storage.stores import open_store

        return dataset_source(
            open_store(spec.store),
            spec.dataset,
            config=config,
            micro_batch=micro_batch,
            seed=seed,
            grad_accum=spec.train["grad_accum"],
        )
    raise DataError("give training data: --tokens FILE or --dataset CID")


def run_rank(run_dir: Path, rank: int) -> None:
    import torch

    threads = int(os.environ.get("PANAL_THREADS", "1"))
    torch.set_num_threads(threads)
    from model.checkpoint import load_checkpoint, save_checkpoint
    from model.config import GPTConfig
    from model.engine import StageEngine, TrainConfig, World, micro_batch_iter
    from model.plan import count_params
    from protocol.identity import load_or_create
    from storage.stores import open_store

    spec = RunSpec(**json.loads((run_dir / "spec.json").read_text()))
    config = GPTConfig.from_dict(spec.model)
    train = dict(spec.train)
    train["betas"] = tuple(train["betas"])
    tc = TrainConfig(**train)
    world = World(
        rank=rank,
        world_size=spec.world_size,
        stages=spec.stages,
        master_port=spec.master_port,
        timeout_s=spec.timeout_s,
    )
    source = _source(spec, config, tc.micro_batch, tc.seed)
    engine = StageEngine(config, tc, world)
    store = open_store(spec.store)
    reporter = Reporter(run_dir, spec, config, tc) if rank == 0 else None
    identity = load_or_create(Path(spec.key).expanduser())[0] if rank == 0 else None
    start = 0
    if spec.resume:
        start = load_checkpoint(engine, store, spec.resume).step
    counts = count_params(config)
    flops_per_token = 6 * counts.matmul + 12 * config.n_layer * config.d_model * config.seq_len
    if torch.cuda.is_available():
        peak = (gpu_peak_flops(tc.precision) or float("nan")) * world.world_size
    else:
        peak = measured_peak_flops(threads) * world.world_size
    tokens_per_step = tc.micro_batch * tc.grad_accum * world.dp * config.seq_len

    def batches(step: int) -> Any:
        return micro_batch_iter(
            lambda s, i: source.micro_batch(s, i, dp_rank=engine.dp_rank, dp=world.dp), step, tc.grad_accum
        )

    def evaluate() -> float:
        n = spec.eval_batches
        return engine.eval_step(iter([source.val_batch(i) for i in range(n)]), n)

    val_before = evaluate()
    if reporter:
        reporter.start(start, val_before)
    checkpoint = spec.resume
    loss = float("nan")
    for step in range(start, spec.steps):
        t0 = time.perf_counter()
        lr = engine.lr
        loss = engine.train_step(batches(step))
        seconds = time.perf_counter() - t0
        tps = tokens_per_step / seconds
        if reporter:
            reporter.step(step, loss, lr, tps, tps * flops_per_token / peak)
        if spec.eval_every and (step + 1) % spec.eval_every == 0 and step + 1 < spec.steps:
            val = evaluate()
            if reporter:
                reporter.val(step, val)
        if spec.checkpoint_every and (step + 1) % spec.checkpoint_every == 0 and step + 1 < spec.steps:
            checkpoint = _save(engine, store, identity, spec, checkpoint, save_checkpoint)
            if reporter:
                reporter.note(f"checkpoint at step {step + 1}: {checkpoint}")
    val_after = evaluate()
    checkpoint = _save(engine, store, identity, spec, checkpoint, save_checkpoint)
    if reporter:
        reporter.finish(loss=loss, val_before=val_before, val_after=val_after, checkpoint=checkpoint)


def _save(engine: Any, store: Any, identity: Any, spec: RunSpec, parent: str | None, save: Any) -> str:
    from protocol.identity import Identity

    # Only rank 0 signs; the others pass a throwaway key the call never uses.
    return str(
        save(
            engine,
            store,
            identity or Identity(bytes(32)),
            job="train",
            dataset_cid=spec.dataset,
            parent=parent,
        )
    )


class Reporter:
    """Rank 0's console (rich) and TensorBoard output."""

    def __init__(self, run_dir: Path, spec: RunSpec, config: Any, tc: Any) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn
        from torch.utils.tensorboard import SummaryWriter

        self.run_dir, self.spec = run_dir, spec
        self.console = Console()
        self.progress = Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            console=self.console,
            transient=True,
        )
        self.task = self.progress.add_task("training", total=spec.steps)
        self.tb = SummaryWriter(str(run_dir / "tb"))
        self.first_loss: float | None = None
        self.tokens = 0
        self.tokens_per_step = tc.micro_batch * tc.grad_accum * spec.dp * config.seq_len
        self.t0 = time.perf_counter()
        self.console.print(
            f"[bold]panal train[/bold]: {spec.stages} stage(s) × {spec.dp} data-parallel, "
            f"{config.n_layer} layers, d_model {config.d_model}, seq {config.seq_len}, "
            f"{tc.precision}, {spec.steps} steps of {self.tokens_per_step} tokens; logs in {run_dir}"
        )

    def start(self, step: int, val: float) -> None:
        self.console.print(
            f"step {step:>6}  held-out loss {val:.4f}  (perplexity {math.exp(min(val, 50)):.1f})"
        )
        self.tb.add_scalar("val/loss", val, step)
        self.progress.start()
        self.progress.update(self.task, completed=step)

    def step(self, step: int, loss: float, lr: float, tps: float, mfu: float) -> None:
        self.tokens += self.tokens_per_step
        if self.first_loss is None:
            self.first_loss = loss
        for name, value in (
            ("train/loss", loss),
            ("train/lr", lr),
            ("perf/tokens_per_s", tps),
            ("perf/mfu", mfu),
        ):
            self.tb.add_scalar(name, value, step + 1)
        self.progress.update(
            self.task, completed=step + 1, description=f"loss {loss:.3f}  {tps:,.0f} tok/s  MFU {mfu:.1%}"
        )
        if (step + 1) % self.spec.log_every == 0 or step + 1 == self.spec.steps:
            self.console.print(
                f"step {step + 1:>6}/{self.spec.steps}  loss {loss:.4f}  lr {lr:.2e}  "
                f"{tps:,.0f} tok/s  MFU {mfu:.1%}"
            )

    def val(self, step: int, val: float) -> None:
        self.tb.add_scalar("val/loss", val, step + 1)
        self.console.print(f"step {step + 1:>6}  held-out loss {val:.4f}")

    def note(self, text: str) -> None:
        self.console.print(text)

    def finish(self, *, loss: float, val_before: float, val_after: float, checkpoint: str) -> None:
        self.progress.stop()
        self.tb.add_scalar("val/loss", val_after, self.spec.steps)
        self.tb.close()
        summary = {
            "steps": self.spec.steps,
            "tokens": self.tokens,
            "loss_first": self.first_loss,
            "loss_last": loss,
            "val_loss_before": val_before,
            "val_loss_after": val_after,
            "val_ppl_before": math.exp(min(val_before, 50)),
            "val_ppl_after": math.exp(min(val_after, 50)),
            "seconds": time.perf_counter() - self.t0,
            "checkpoint_cid": checkpoint,
        }
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    from protocol.errors import ProtocolError

    try:
        run_rank(Path(sys.argv[1]), int(sys.argv[2]))
    except (ModelConfigError, ProtocolError) as e:
        print(f"error: rank {sys.argv[2]}: {e}", file=sys.stderr)
        sys.exit(2)
