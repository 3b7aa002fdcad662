"""Test-wide settings: one thread per process (2 cores shared by many processes)."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

try:
    import torch

    torch.set_num_threads(1)
except ImportError:  # a test run without torch still runs the protocol tests
    pass

from hypothesis import settings

# Deterministic property tests: the same examples on every run and every machine.
settings.register_profile("panal", derandomize=True, deadline=None, print_blob=True)
settings.load_profile("panal")
