"""The coordinator's garbage collection as rounds close (coordinator/server.py).

Each round's survivors are frozen, so that collections during the next round
skip them; every FULL_COLLECTION_EVERY rounds everything is scanned again, so
that what became garbage after being frozen is freed all the same.
"""

from __future__ import annotations

import gc
import weakref

from coordinator.server import FULL_COLLECTION_EVERY, GarbageCollection


class Cyclic:
    def __init__(self) -> None:
        self.me = self  # freed only by the cyclic collector, never by reference counts


def test_frozen_garbage_is_freed_by_the_next_full_collection():
    collect = GarbageCollection()
    try:
        alive = Cyclic()
        ref = weakref.ref(alive)
        collect()  # round 1 closes: alive, so frozen
        assert gc.get_freeze_count() > 0
        del alive
        for _ in range(FULL_COLLECTION_EVERY - 2):  # rounds 2..9: frozen objects are not scanned
            collect()
            gc.collect()  # nor by the collections made in between
            assert ref() is not None
        collect()  # round 10: a full collection
        assert ref() is None
    finally:
        gc.unfreeze()  # the test process as it was
