"""Group commit (coordinator/groupcommit.py): items submitted together are written together,
each caller gets its own result only after its batch is written, and a failed batch fails
every caller in it."""

import threading

import pytest

from coordinator.groupcommit import GroupCommit


class GatedWriter:
    """A ``write`` that records its batches; the first call waits until the test opens the gate."""

    def __init__(self):
        self.batches = []
        self.entered = threading.Event()
        self.gate = threading.Event()
        self.fail_with = None

    def __call__(self, items):
        self.batches.append(list(items))
        if len(self.batches) == 1:
            self.entered.set()
            assert self.gate.wait(20), "the test never opened the gate"
        if self.fail_with is not None and len(self.batches) > 1:
            raise self.fail_with
        return [f"wrote {x}" for x in items]


def submit_in_thread(gc, item, out):
    def run():
        try:
            out[item] = gc.submit(item)
        except Exception as e:
            out[item] = e

    t = threading.Thread(target=run)
    t.start()
    return t


def wait_queued(gc, n):
    """Until n callers are queued behind the writer (a bounded wait on a condition)."""
    pause = threading.Event()  # never set: a bounded sleep between looks
    for _ in range(2000):
        with gc._mu:
            if len(gc._queue) >= n:
                return
        pause.wait(0.005)
    raise AssertionError(f"{n} callers never queued")


def test_a_caller_alone_writes_its_own_item_at_once():
    w = GatedWriter()
    w.gate.set()
    gc = GroupCommit(w)
    assert gc.submit(1) == "wrote 1"
    assert gc.submit(2) == "wrote 2"
    assert w.batches == [[1], [2]] and gc.batches == 2


def test_callers_that_arrive_while_a_batch_is_written_are_written_together():
    w = GatedWriter()
    gc = GroupCommit(w)
    out = {}
    first = submit_in_thread(gc, 0, out)
    assert w.entered.wait(20)
    others = [submit_in_thread(gc, i, out) for i in range(1, 6)]
    wait_queued(gc, 5)
    assert all(i not in out for i in range(1, 6)), "answered before its item was written"
    w.gate.set()
    for t in [first, *others]:
        t.join(20)
    assert out == {i: f"wrote {i}" for i in range(6)}
    assert w.batches[0] == [0] and sorted(w.batches[1]) == [1, 2, 3, 4, 5] and len(w.batches) == 2


def test_batches_are_bounded():
    w = GatedWriter()
    gc = GroupCommit(w, max_batch=2)
    out = {}
    threads = [submit_in_thread(gc, 0, out)]
    assert w.entered.wait(20)
    threads += [submit_in_thread(gc, i, out) for i in range(1, 6)]
    wait_queued(gc, 5)
    w.gate.set()
    for t in threads:
        t.join(20)
    assert out == {i: f"wrote {i}" for i in range(6)}
    assert [len(b) for b in w.batches] == [1, 2, 2, 1]


def test_a_failed_batch_fails_each_of_its_callers_and_the_next_batch_is_written():
    w = GatedWriter()
    w.fail_with = OSError("disk full")
    gc = GroupCommit(w)
    out = {}
    first = submit_in_thread(gc, 0, out)
    assert w.entered.wait(20)
    others = [submit_in_thread(gc, i, out) for i in (1, 2)]
    wait_queued(gc, 2)
    w.gate.set()
    for t in [first, *others]:
        t.join(20)
    assert out[0] == "wrote 0"
    assert all(isinstance(out[i], OSError) and "disk full" in str(out[i]) for i in (1, 2))
    w.fail_with = None
    assert gc.submit(3) == "wrote 3"  # the writer role was handed back: nothing is stuck


def test_a_write_returning_the_wrong_number_of_results_is_an_error():
    gc = GroupCommit(lambda items: [])
    with pytest.raises(RuntimeError, match="0 results for 1 items"):
        gc.submit(1)
    with pytest.raises(ValueError, match="at least 1"):
        GroupCommit(lambda items: items, max_batch=0)
