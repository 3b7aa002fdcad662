"""Storage throughput on a large file, against baselines measured in the same run.

    python bench/storage.py [--mib 512] [--dir /tmp]

- CID computation (CIDv0 and CIDv1 raw-leaves) relative to plain SHA-256 of the same bytes;
- LocalStore put, and verified get, relative to a plain file copy (shutil.copyfile + fsync).

Targets: CID >= 0.8x SHA-256; put >= 0.5x copy; verified get >= 0.5x copy.
Each figure is the best of 3 runs with the file in the page cache.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

# This file is named after the package it measures: drop bench/ from the path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from storage.cid import cid_of_file  # noqa: E402
from storage.local import LocalStore  # noqa: E402


def best(fn: Callable[[], object], repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def sha256_file(path: Path) -> bytes:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(1 << 20)
        view = memoryview(buf)
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.digest()


def copy_file(src: Path, dst: Path) -> None:
    shutil.copyfile(src, dst)
    with open(dst, "rb") as f:
        os.fsync(f.fileno())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=512)
    parser.add_argument("--dir", default=None, help="scratch directory (default: system temp)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        tmpdir = Path(tmp)
        src = tmpdir / "input.bin"
        with open(src, "wb") as f:
            for _ in range(args.mib):
                f.write(os.urandom(1 << 20))
        gib = args.mib / 1024

        sha_s = best(lambda: sha256_file(src))
        cid0_s = best(lambda: cid_of_file(src))
        cid1_s = best(lambda: cid_of_file(src, cid_version=1))
        copy_s = best(lambda: copy_file(src, tmpdir / "copy.bin"))

        def put() -> None:
            store = LocalStore(tmpdir / "store")
            store.put_file(src)
            shutil.rmtree(tmpdir / "store")

        put_s = best(put)
        store = LocalStore(tmpdir / "store")
        cid = store.put_file(src)
        get_s = best(lambda: store.get_file(cid, tmpdir / "got.bin"))

    rows = [
        ("SHA-256 (baseline)", sha_s, None),
        ("CIDv0", cid0_s, sha_s),
        ("CIDv1 raw leaves", cid1_s, sha_s),
        ("file copy + fsync (baseline)", copy_s, None),
        ("LocalStore put", put_s, copy_s),
        ("LocalStore verified get", get_s, copy_s),
    ]
    print(f"{args.mib} MiB file")
    print(f"{'what':32} {'GiB/s':>7} {'ratio':>7}")
    for name, secs, base in rows:
        ratio = f"{base / secs:7.2f}" if base else "      -"
        print(f"{name:32} {gib / secs:7.2f} {ratio}")
    print(
        f"targets: CID >= 0.80x SHA-256 -> v0 {sha_s / cid0_s:.2f}x, v1 {sha_s / cid1_s:.2f}x; "
        f"put >= 0.50x copy -> {copy_s / put_s:.2f}x; verified get >= 0.50x copy -> {copy_s / get_s:.2f}x"
    )


if __name__ == "__main__":
    main()
