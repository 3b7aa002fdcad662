"""`panal train` end to end: two stage processes, a token file, checkpoints in the store."""

import json
import os
import subprocess
import sys

import numpy as np

from storage.local import LocalStore
from storage.verify import verify_tree


def token_file(path, vocab=512, seq=65, rows=2000):
    """Arithmetic progressions mod vocab: a stream whose next token is learnable."""
    rng = np.random.default_rng(0)
    out = [(rng.integers(0, vocab) + rng.integers(1, 7) * np.arange(seq)) % vocab for _ in range(rows)]
    np.concatenate(out).astype("<u2").tofile(path)


def test_panal_train_two_stages_loss_falls_and_checkpoint_verifies(tmp_path):
    tokens = tmp_path / "tokens.bin"
    token_file(tokens)
    run = tmp_path / "run"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "panal.cli",
            "train",
            "--preset",
            "tiny",
            "--stages",
            "2",
            "--steps",
            "40",
            "--tokens",
            str(tokens),
            "--store",
            f"local:{tmp_path / 'store'}",
            "--key",
            str(tmp_path / "op.key"),
            "--run-dir",
            str(run),
            "--eval-every",
            "20",
            "--lr",
            "3e-3",
            "--precision",
            "fp32",
        ],
        capture_output=True,
        timeout=300,
        env={**os.environ, "COLUMNS": "200"},
    )
    out = proc.stdout.decode()
    assert proc.returncode == 0, out + proc.stderr.decode()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["val_loss_after"] < summary["val_loss_before"] - 0.3, summary
    assert summary["loss_last"] < summary["loss_first"]
    assert out.strip().splitlines()[-1] == summary["checkpoint_cid"]
    checks = verify_tree(LocalStore(tmp_path / "store"), summary["checkpoint_cid"])
    assert all(c.ok for c in checks) and len(checks) == 5  # manifest, 2 stages, 2 optimizer states
    assert list((run / "tb").iterdir()), "TensorBoard events written"


def test_panal_train_refuses_bad_input(tmp_path):
    tokens = tmp_path / "tokens.bin"
    np.full(10_000, 600, dtype="<u2").tofile(tokens)  # ids beyond the tiny preset's 512
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "panal.cli",
            "train",
            "--stages",
            "2",
            "--steps",
            "2",
            "--tokens",
            str(tokens),
            "--run-dir",
            str(tmp_path / "run"),
            "--store",
            f"local:{tmp_path / 's'}",
            "--key",
            str(tmp_path / "k"),
        ],
        capture_output=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert b"outside the model's vocabulary" in proc.stdout + proc.stderr
