"""LocalStore: the embedded default blob store, a directory of files named by CID.

    ROOT/blobs/<last 2 chars of CID>/<CID>   the bytes, exactly as added
    ROOT/pins/<CID>                          present while pinned
    ROOT/tmp/                                writes in progress
    ROOT/.lock                               flock: shared for writes, exclusive for gc

Writes are atomic (temporary file, fsync, rename, fsync of the directory), so
several processes may add the same or different blobs at once and a reader
never sees half a file. Every read recomputes the CID: a file changed on disk
raises IntegrityError naming the CID and the path.
"""

from __future__ import annotations

import builtins
import contextlib
import fcntl
import itertools
import os
import tempfile
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from storage.blobstore import (
    CHUNK,
    BlobInfo,
    BlobStore,
    Progress,
    as_cid,
    check_size,
    iter_file,
    write_verified,
)
from storage.cid import CID, CidBuilder
from storage.errors import IntegrityError, NotFound

STALE_TMP_SECONDS = 3600
INLINE_HASH_BYTES = 4 << 20  # a lone block up to this size is hashed without a helper thread


def hashed(chunks: Iterable[bytes], builder: CidBuilder) -> Iterator[bytes]:
    """Yield ``chunks`` while a second thread feeds them to ``builder``.

    Hashing block i overlaps with the consumer's use of block i and with
    reading block i+1 (hashlib releases the GIL on large buffers), so a put or
    a verified get costs about max(hash, I/O) rather than their sum. A single
    small block (a small blob) is hashed inline: a thread costs more than that.
    """
    it = iter(chunks)
    first = next(it, None)
    if first is None:
        return
    second = next(it, None)
    if second is None and len(first) <= INLINE_HASH_BYTES:
        builder.update(first)
        yield first
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="panal-cid") as pool:
        pending: Future[None] | None = None
        for block in itertools.chain((first,) if second is None else (first, second), it):
            if pending is not None:
                pending.result()
            pending = pool.submit(builder.update, block)
            yield block
        if pending is not None:
            pending.result()


class LocalStore(BlobStore):
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser()
        self.url = f"local:{self.root}"
        for sub in ("blobs", "pins", "tmp"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._lock_path = self.root / ".lock"
        self._lock_path.touch(exist_ok=True)

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r})"

    # ----------------------------------------------------------------- paths

    def path_of(self, cid: CID | str) -> Path:
        text = str(as_cid(cid))
        return self.root / "blobs" / text[-2:] / text

    @contextlib.contextmanager
    def _locked(self, exclusive: bool) -> Iterator[None]:
        with open(self._lock_path, "rb") as f:
            fcntl.flock(f, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    @staticmethod
    def _fsync_dir(path: Path) -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    # ---------------------------------------------------------------- writes

    def put_chunks(
        self,
        chunks: Iterable[bytes],
        *,
        cid_version: int = 0,
        pin: bool = False,
        progress: Progress | None = None,
    ) -> CID:
        builder = CidBuilder(cid_version=cid_version)  # v1 implies raw leaves, as in Kubo
        with self._locked(exclusive=False):
            fd, tmp = tempfile.mkstemp(dir=self.root / "tmp", prefix="put-")
            try:
                with os.fdopen(fd, "wb") as f:
                    for block in hashed(chunks, builder):
                        f.write(block)
                        if progress:
                            progress(len(block))
                    f.flush()
                    os.fsync(f.fileno())
                cid = builder.finish()
                final = self.path_of(cid)
                final.parent.mkdir(exist_ok=True)
                os.chmod(tmp, 0o444)  # blobs are immutable
                os.replace(tmp, final)
                self._fsync_dir(final.parent)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
                raise
            if pin:
                self._pin_unlocked(cid)
        return cid

    # ----------------------------------------------------------------- reads

    def _verified_pass(self, cid: CID, path: Path, max_bytes: int | None) -> Iterator[bytes]:
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise NotFound(f"blob {cid} is not in {self.url}") from None
        check_size(size, max_bytes, cid)
        builder = CidBuilder(cid_version=cid.version)
        yield from hashed(iter_file(path, CHUNK), builder)
        got = builder.finish()
        if got != cid:
            raise IntegrityError(
                f"blob {cid} at {path} is corrupted (its bytes hash to {got}); "
                "delete the file and add or fetch the blob again"
            )

    def iter_chunks(self, cid: CID | str, *, max_bytes: int | None = None) -> Iterator[bytes]:
        """Verify the whole file first, then stream it (verified again as it goes):
        a consumer never receives a byte of a corrupted blob."""
        cid = as_cid(cid)
        path = self.path_of(cid)
        for _ in self._verified_pass(cid, path, max_bytes):
            pass
        yield from self._verified_pass(cid, path, max_bytes)

    def get_bytes(self, cid: CID | str, *, max_bytes: int = 256 * 1024 * 1024) -> bytes:
        cid = as_cid(cid)
        return b"".join(self._verified_pass(cid, self.path_of(cid), max_bytes))

    def get_file(
        self,
        cid: CID | str,
        path: str | Path,
        *,
        max_bytes: int | None = None,
        progress: Progress | None = None,
    ) -> Path:
        # One pass: written to a temporary file, renamed only once verified.
        cid = as_cid(cid)
        return write_verified(self._verified_pass(cid, self.path_of(cid), max_bytes), path, progress)

    def has(self, cid: CID | str) -> bool:
        return self.path_of(cid).is_file()

    def stat(self, cid: CID | str) -> BlobInfo:
        cid = as_cid(cid)
        try:
            size = self.path_of(cid).stat().st_size
        except FileNotFoundError:
            raise NotFound(f"blob {cid} is not in {self.url}") from None
        return BlobInfo(cid, size, (self.root / "pins" / str(cid)).exists())

    def list(self) -> Iterator[BlobInfo]:
        pins = {p.name for p in (self.root / "pins").iterdir()}
        for shard in sorted((self.root / "blobs").iterdir()):
            for f in sorted(shard.iterdir()):
                with contextlib.suppress(ValueError, FileNotFoundError):
                    yield BlobInfo(CID.parse(f.name), f.stat().st_size, f.name in pins)

    # ------------------------------------------------------------------ pins

    def _pin_unlocked(self, cid: CID) -> None:
        if not self.path_of(cid).is_file():
            raise NotFound(f"cannot pin {cid}: it is not in {self.url}; add it first")
        (self.root / "pins" / str(cid)).touch(exist_ok=True)

    def pin(self, cid: CID | str) -> None:
        with self._locked(exclusive=False):
            self._pin_unlocked(as_cid(cid))

    def unpin(self, cid: CID | str) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.root / "pins" / str(as_cid(cid))).unlink()

    def gc(self) -> builtins.list[CID]:
        removed: builtins.list[CID] = []
        with self._locked(exclusive=True):
            for info in list(self.list()):
                if not info.pinned:
                    self.path_of(info.cid).unlink(missing_ok=True)
                    removed.append(info.cid)
            cutoff = time.time() - STALE_TMP_SECONDS
            for tmp in (self.root / "tmp").iterdir():  # left by a writer that crashed
                with contextlib.suppress(FileNotFoundError):
                    if tmp.stat().st_mtime < cutoff:
                        tmp.unlink()
        return removed
