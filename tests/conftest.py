"""Test-wide settings: one thread per process (2 cores shared by many processes)."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

try:
    import torch

    torch.set_num_threads(1)
except ImportError:  # a test run without torch still runs the protocol tests
    pass

import sysconfig
from pathlib import Path

import pytest
from hypothesis import settings

# Deterministic property tests: the same examples on every run and every machine.
settings.register_profile("panal", derandomize=True, deadline=None, print_blob=True)
settings.load_profile("panal")


# A small real dataset for the runs that train: a few standard-library packages, tokenised.
PACKAGES = ("json", "email", "http", "logging", "xml/dom")


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory) -> tuple[str, str]:
    """(store URL, dataset CID): ~1 MB of real Python source, vocabulary 512, sequences of 64."""
    from corpus.prepare import PrepareOptions, prepare
    from corpus.sources import PathSource
    from protocol.identity import Identity
    from storage.local import LocalStore

    root = Path(sysconfig.get_paths()["stdlib"])
    store_dir = tmp_path_factory.mktemp("e2e-store")
    store = LocalStore(store_dir)
    result = prepare(
        [PathSource(root / p) for p in PACKAGES],
        PrepareOptions(
            name="e2e", vocab_size=512, seq_len=64, sequences_per_shard=512, val_fraction=0.05, seed=0
        ),
        store=store,
        identity=Identity(bytes(range(32))),
    )
    assert sum(1 for s in result.manifest.shards if s.split == "train") >= 4
    return f"local:{store_dir}", result.dataset_cid
