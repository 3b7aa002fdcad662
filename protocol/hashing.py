"""SHA-256 of bytes, streams and files, in bounded memory."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

CHUNK = 1 << 20


def sha256(data: bytes | bytearray | memoryview) -> bytes:
    return hashlib.sha256(data).digest()


def sha256_stream(stream: BinaryIO, chunk: int = CHUNK) -> bytes:
    h = hashlib.sha256()
    while block := stream.read(chunk):
        h.update(block)
    return h.digest()


def sha256_chunks(chunks: Iterable[bytes]) -> bytes:
    h = hashlib.sha256()
    for block in chunks:
        h.update(block)
    return h.digest()


def sha256_file(path: str | Path, chunk: int = CHUNK) -> bytes:
    with open(path, "rb") as f:
        return sha256_stream(f, chunk)
