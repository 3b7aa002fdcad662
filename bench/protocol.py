"""Trust-layer throughput: envelopes signed+verified per second, and SHA-256 vs a memory copy.

    python bench/protocol.py [--seconds 3] [--mib 256]

Ratios are what to read; absolute figures are context for this machine.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from pathlib import Path

# This file is named after the package it measures: drop bench/ from the path
# so `import protocol` finds the package, not this script.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402

from protocol import panal_pb2 as pb  # noqa: E402
from protocol.envelope import open_envelope, seal  # noqa: E402
from protocol.identity import Identity  # noqa: E402
from protocol.replay import ReplayGuard  # noqa: E402


def envelopes_per_second(seconds: float) -> tuple[float, float, float]:
    ident = Identity.generate()
    guard = ReplayGuard(max_entries=10_000_000)
    body = pb.SubmitUpdateRequest(pool="pool-a", stage=3, blob_cid="Qm" + "x" * 44, blob_sha256=bytes(32))
    n, t0 = 0, time.perf_counter()
    sign_s = verify_s = 0.0
    while time.perf_counter() - t0 < seconds:
        a = time.perf_counter()
        env = seal(ident, body, job="job", round=n)
        b = time.perf_counter()
        open_envelope(env, pb.SubmitUpdateRequest, replay=guard, job="job", round=n)
        c = time.perf_counter()
        sign_s += b - a
        verify_s += c - b
        n += 1
    return n / (sign_s + verify_s), n / sign_s, n / verify_s


def best_of(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def sha256_vs_copy(mib: int) -> tuple[float, float]:
    torch.manual_seed(0)
    tensor = torch.randn(mib * 1024 * 1024 // 4)  # float32, `mib` MiB
    src = tensor.numpy().view("uint8")
    dst = src.copy()
    copy_s = best_of(lambda: dst.__setitem__(slice(None), src))
    sha_s = best_of(lambda: hashlib.sha256(memoryview(src)).digest())
    nbytes = src.nbytes / 2**30
    return nbytes / sha_s, nbytes / copy_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--mib", type=int, default=256)
    args = parser.parse_args()

    both, sign, verify = envelopes_per_second(args.seconds)
    print(f"envelopes signed+verified: {both:,.0f}/s  (sign {sign:,.0f}/s, verify {verify:,.0f}/s)")
    sha, copy = sha256_vs_copy(args.mib)
    print(f"SHA-256 over a {args.mib} MiB tensor: {sha:.2f} GiB/s; memory copy: {copy:.2f} GiB/s")
    print(f"ratio SHA-256 / memory copy: {sha / copy:.3f}")


if __name__ == "__main__":
    main()
