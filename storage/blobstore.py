"""The blob store interface: put bytes, get them back verified against their CID.

Every backend honours the same contract (one test suite runs against all of
them, tests/storage/test_blobstore_contract.py):

- ``put_*`` returns the CID Kubo's ``ipfs add`` would print for the same bytes
  (CIDv0 by default, or CIDv1 with raw leaves);
- every read is verified against the CID it was asked for: corrupted data
  raises ``IntegrityError`` and is never returned (``get_file`` writes to a
  temporary file and renames only after the check; ``get_bytes`` checks before
  returning; ``iter_chunks`` raises at the end of the stream, so a consumer
  must treat the chunks as untrusted until it finishes);
- reads of data from outside take a size limit.
"""

from __future__ import annotations

import builtins
import contextlib
import os
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from storage.cid import CID
from storage.errors import MessageTooLarge

CHUNK = 1 << 20
Progress = Callable[[int], None]  # called with the number of bytes just moved

# The most a single get_bytes may return unless the caller says otherwise.
DEFAULT_MAX_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class BlobInfo:
    cid: CID
    size: int
    pinned: bool


def iter_stream(stream: BinaryIO, chunk: int = CHUNK) -> Iterator[bytes]:
    while block := stream.read(chunk):
        yield block


def iter_file(path: str | Path, chunk: int = CHUNK) -> Iterator[bytes]:
    with open(path, "rb") as f:
        yield from iter_stream(f, chunk)


class BlobStore(ABC):
    """A content-addressed store of immutable blobs."""

    url: str

    # ---------------------------------------------------------------- writes

    @abstractmethod
    def put_chunks(
        self,
        chunks: Iterable[bytes],
        *,
        cid_version: int = 0,
        pin: bool = False,
        progress: Progress | None = None,
    ) -> CID:
        """Store the concatenation of ``chunks`` and return its CID."""

    def put_bytes(self, data: bytes, *, cid_version: int = 0, pin: bool = False) -> CID:
        return self.put_chunks([data], cid_version=cid_version, pin=pin)

    def put_stream(
        self, stream: BinaryIO, *, cid_version: int = 0, pin: bool = False, progress: Progress | None = None
    ) -> CID:
        return self.put_chunks(iter_stream(stream), cid_version=cid_version, pin=pin, progress=progress)

    def put_file(
        self, path: str | Path, *, cid_version: int = 0, pin: bool = False, progress: Progress | None = None
    ) -> CID:
        return self.put_chunks(iter_file(path), cid_version=cid_version, pin=pin, progress=progress)

    # ----------------------------------------------------------------- reads

    @abstractmethod
    def iter_chunks(self, cid: CID | str, *, max_bytes: int | None = None) -> Iterator[bytes]:
        """The blob's bytes in chunks; raises IntegrityError at the end if they do not match ``cid``."""

    def get_bytes(self, cid: CID | str, *, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
        """The whole blob, verified, refused if larger than ``max_bytes``."""
        return b"".join(self.iter_chunks(cid, max_bytes=max_bytes))

    def get_file(
        self,
        cid: CID | str,
        path: str | Path,
        *,
        max_bytes: int | None = None,
        progress: Progress | None = None,
    ) -> Path:
        """Write the blob to ``path`` atomically; nothing appears there unless it verified."""
        return write_verified(self.iter_chunks(cid, max_bytes=max_bytes), path, progress)

    @abstractmethod
    def has(self, cid: CID | str) -> bool: ...

    @abstractmethod
    def stat(self, cid: CID | str) -> BlobInfo:
        """Size and pin state; NotFound if absent."""

    @abstractmethod
    def list(self) -> Iterator[BlobInfo]:
        """Every blob the store holds (for Kubo: every pinned root)."""

    # ------------------------------------------------------------------ pins

    @abstractmethod
    def pin(self, cid: CID | str) -> None: ...

    @abstractmethod
    def unpin(self, cid: CID | str) -> None: ...

    @abstractmethod
    def gc(self) -> builtins.list[CID]:
        """Remove every unpinned blob; return what was removed."""

    def close(self) -> None:  # noqa: B027 - optional for backends holding connections
        """Release connections; the default has none."""

    def __enter__(self) -> BlobStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def write_verified(chunks: Iterable[bytes], path: str | Path, progress: Progress | None = None) -> Path:
    """Write a verifying stream to a temporary file beside ``path`` and rename it only
    when the stream ends without an IntegrityError."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            for block in chunks:
                f.write(block)
                if progress:
                    progress(len(block))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def check_size(size: int, max_bytes: int | None, cid: CID | str) -> None:
    if max_bytes is not None and size > max_bytes:
        raise MessageTooLarge(f"blob {cid} is {size} bytes, over the {max_bytes}-byte limit for this read")


def as_cid(cid: CID | str) -> CID:
    return cid if isinstance(cid, CID) else CID.parse(cid)
