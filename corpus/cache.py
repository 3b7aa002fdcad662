"""The rerun cache: small JSON results of expensive stages, keyed by what they were made from.

A key is the SHA-256 of the canonical JSON of everything a stage's result depends
on (input paths, sizes and mtimes, options, library versions). The result names
blobs by CID; a hit counts only if the store still holds them, so a cache entry
can never stand in for data that is gone. Entries live beside a local store
(``ROOT/corpus-cache/``) or, for other stores, under ``~/.panal/cache/corpus/``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from storage.blobstore import BlobStore
from storage.manifest import canonical_json

MAX_ENTRY_BYTES = 16 * 1024 * 1024


def cache_key(*parts: Any) -> str:
    return hashlib.sha256(canonical_json(list(parts))).hexdigest()


def default_cache_dir(store: BlobStore) -> Path:
    root = getattr(store, "root", None)
    if isinstance(root, Path):
        return root / "corpus-cache"
    return Path("~/.panal/cache/corpus").expanduser()


class StageCache:
    """``get``/``put`` of JSON objects by (stage, key); ``directory=None`` caches nothing."""

    def __init__(self, directory: Path | None) -> None:
        self.directory = directory

    def _path(self, stage: str, key: str) -> Path:
        assert self.directory is not None
        return self.directory / f"{stage}-{key}.json"

    def get(self, stage: str, key: str) -> dict[str, Any] | None:
        if self.directory is None:
            return None
        path = self._path(stage, key)
        try:
            if path.stat().st_size > MAX_ENTRY_BYTES:
                return None
            value = json.loads(path.read_bytes())
        except (OSError, ValueError):
            return None  # missing or damaged: recompute
        return value if isinstance(value, dict) else None

    def put(self, stage: str, key: str, value: dict[str, Any]) -> None:
        if self.directory is None:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=f".{stage}-", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(canonical_json(value))
            os.replace(tmp, self._path(stage, key))
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
