"""Group commit: the writes that arrive together are committed together.

Every accepted update is committed to SQLite before its node is answered, and a
commit (synchronous=FULL) waits for the disk. One transaction per update puts
that wait, and a hand-over of the coordinator's lock, inside every call: when a
burst of updates arrives, they queue for the lock one commit at a time, and each
commit's holder must win the GIL back from the threads still verifying blobs
(bench/coordinator.py saw the lock held 30 % of the time at 100 updates/s).

:class:`GroupCommit` writes whatever is waiting in one call of ``write``: the
first caller to arrive writes its own item and every item queued behind it
while it waited for the lock, then hands the role to the next waiting caller,
if any. No thread of its own; alone, a caller writes its item at once, as
before. Each caller returns only once its own item is committed, with its own
result, or raises the exception its batch raised: nothing is answered before it
is on disk.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")

MAX_BATCH = 256  # items per transaction: bounds how long one commit holds the lock


class _Waiter(Generic[T, R]):
    __slots__ = ("item", "woken", "done", "result", "error")

    def __init__(self, item: T) -> None:
        self.item = item
        self.woken = threading.Event()  # set when done, or when this caller is to write next
        self.done = False
        self.result: R | None = None
        self.error: BaseException | None = None


class GroupCommit(Generic[T, R]):
    """``submit(item)`` returns ``write(batch)[i]`` for its item, batching the items submitted together.

    ``write`` is called by one thread at a time, with up to ``max_batch`` items in arrival
    order, and returns one result per item (or raises: every item of that batch then raises).
    """

    def __init__(self, write: Callable[[Sequence[T]], Sequence[R]], *, max_batch: int = MAX_BATCH) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self._write = write
        self._max_batch = max_batch
        self._mu = threading.Lock()
        self._queue: list[_Waiter[T, R]] = []
        self._writing = False
        self.batches = 0  # how many times ``write`` was called (for tests and metrics)

    def submit(self, item: T) -> R:
        me: _Waiter[T, R] = _Waiter(item)
        with self._mu:
            self._queue.append(me)
            lead = not self._writing
            self._writing = True
        if not lead:
            me.woken.wait()
            if me.done:
                return self._outcome(me)
            # Woken to write: the previous writer is done and this item heads the queue.
        with self._mu:
            batch, self._queue = self._queue[: self._max_batch], self._queue[self._max_batch :]
        try:
            results = list(self._write([w.item for w in batch]))
            if len(results) != len(batch):
                raise RuntimeError(f"group commit: write returned {len(results)} results for {len(batch)} items")
            for w, r in zip(batch, results, strict=True):
                w.result = r
        except BaseException as e:  # every item of the batch fails with it, its waiters included
            for w in batch:
                w.error = e
        for w in batch:
            w.done = True
            if w is not me:
                w.woken.set()
        with self._mu:
            self.batches += 1
            if self._queue:
                self._queue[0].woken.set()  # the next in line writes what queued meanwhile
            else:
                self._writing = False
        return self._outcome(me)

    @staticmethod
    def _outcome(w: _Waiter[T, R]) -> R:
        if w.error is not None:
            raise w.error
        return w.result  # type: ignore[return-value]
