"""Work files: length-prefixed records on local disk, written once and read in order.

The pipeline streams documents through these instead of holding them in memory:
the cleaned text after the scan, and the token arrays of each shuffle bucket.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

_LEN = struct.Struct("<I")
BUFFER = 1 << 20
MAX_RECORD = (1 << 32) - 1


class RecordWriter:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._f: BinaryIO = open(path, "wb", buffering=BUFFER)  # noqa: SIM115 - closed in close()
        self.records = 0
        self.bytes = 0

    def write(self, data: bytes) -> None:
        if len(data) > MAX_RECORD:
            raise ValueError(f"a work record is {len(data)} bytes, over {MAX_RECORD}")
        self._f.write(_LEN.pack(len(data)))
        self._f.write(data)
        self.records += 1
        self.bytes += len(data)

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> RecordWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def iter_records(path: Path) -> Iterator[bytes]:
    with open(path, "rb", buffering=BUFFER) as f:
        while head := f.read(_LEN.size):
            (n,) = _LEN.unpack(head)
            data = f.read(n)
            if len(data) != n:
                raise OSError(f"work file {path} is truncated")
            yield data
