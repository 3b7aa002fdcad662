"""Start a local DeepSpeed pool (one OS process per rank) and collect what each rank wrote."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_pool(
    scenario: str, out: Path, *, world: int = 2, stages: int = 2, extra: list[str] = (), timeout: float = 240
):
    """Run ``scenario`` on ``world`` ranks; return their results by rank. Kills them all on failure."""
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.model.engine_worker",
                scenario,
                str(r),
                str(world),
                str(stages),
                str(port),
                str(out),
                *extra,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
        )
        for r in range(world)
    ]
    logs = []
    try:
        for p in procs:
            stdout, _ = p.communicate(timeout=timeout)
            logs.append(stdout.decode(errors="replace"))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for r, p in enumerate(procs):
        if p.returncode != 0:
            raise AssertionError(f"rank {r} of {scenario} exited {p.returncode}:\n{logs[r][-4000:]}")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]
