"""Tensors the coordinator has already checked or written, kept by CID for the close of the round.

Closing a round reads each stage's start weights and momentum (written by the
previous close) and each accepted update's pseudo-gradient (fetched and checked
when the update was accepted). A CID names its bytes, so a kept entry is exactly
what fetching the blob again and re-parsing it would give; keeping it saves
reading, hashing and parsing every blob a second time. Memory is bounded:
beyond ``max_bytes`` the oldest entries go, and a miss reads the store as before.

Entries are shared, not copied: whoever gets one must not modify its tensors
(aggregation and the outer step only read their inputs).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Mapping

import torch

DEFAULT_MAX_BYTES = 2 << 30

Tensors = Mapping[str, torch.Tensor]


def nbytes(value: Tensors) -> int:
    return sum(t.numel() * t.element_size() for t in value.values())


class TensorCache:
    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple[str, str], Tensors] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, cid: str, kind: str) -> Tensors | None:
        """The tensors kept for blob ``cid`` as ``kind`` (e.g. "weights", "delta/int8"), if any."""
        with self._lock:
            return self._entries.get((cid, kind))

    def put(self, cid: str, kind: str, value: Tensors) -> None:
        size = nbytes(value)
        if size > self.max_bytes:
            return
        with self._lock:
            old = self._entries.pop((cid, kind), None)
            if old is not None:
                self._bytes -= nbytes(old)
            self._entries[(cid, kind)] = value
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, gone = self._entries.popitem(last=False)
                self._bytes -= nbytes(gone)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0
