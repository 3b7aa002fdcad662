"""What the coordinator serves from memory is never staler than the database.

State.cached keeps the rows every call reads (the sender's node, the running
job, its pools); SQLite reports each write through temporary triggers. These
stories write the tables every way a module might — State's own methods, raw
SQL in a transaction, a transaction that rolls back — and read back through
the cache. TensorCache keeps checked tensors for a round's close within a byte
budget.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time

import pytest
import torch

from coordinator.state import HEARTBEAT_SQL, State, now_ms
from coordinator.tensor_cache import TensorCache


def make_state(tmp_path):
    state = State(tmp_path / "state.db")
    with state.tx() as db:
        db.execute(
            "INSERT INTO nodes(node_id, public_key, name, pool, state, last_heartbeat_ms, status)"
            " VALUES('n1', x'00', 'one', 'pool-a', 'active', 0, '{}')"
        )
    return state


def test_a_cached_node_follows_every_kind_of_write(tmp_path):
    state = make_state(tmp_path)
    assert state.node("n1").state == "active"  # now cached
    state.set_node_state("n1", "lost")
    assert state.node("n1").state == "lost"
    with state.tx() as db:  # raw SQL, as another module might write it
        db.execute("UPDATE nodes SET pool='pool-b', state='quarantined' WHERE node_id='n1'")
    node = state.node("n1")
    assert (node.pool, node.state) == ("pool-b", "quarantined")
    assert [n.node_id for n in state.nodes(pool="pool-b")] == ["n1"]
    with state.tx() as db:
        db.execute("DELETE FROM nodes WHERE node_id='n1'")
    assert state.node("n1") is None and state.nodes() == []
    state.close()


def test_a_read_inside_a_transaction_that_rolls_back_is_not_kept(tmp_path):
    state = make_state(tmp_path)
    try:
        with state.tx() as db:
            db.execute("UPDATE nodes SET state='evicted' WHERE node_id='n1'")
            assert state.node("n1").state == "evicted"  # the transaction sees its own write
            raise RuntimeError("the caller fails after the write")
    except RuntimeError:
        pass
    assert state.node("n1").state == "active"
    state.close()


def test_heartbeats_live_in_memory_and_reach_the_cached_node(tmp_path):
    state = make_state(tmp_path)
    state.node("n1")
    state.heartbeat("n1", {"step": 7})
    node = state.node("n1")
    assert node.status == {"step": 7} and node.last_heartbeat_ms > 0
    state.flush_heartbeats()
    assert state.one("SELECT status FROM nodes WHERE node_id='n1'")["status"] == '{"step": 7}'
    state.close()


def test_cached_queries_of_other_tables_follow_their_writes(tmp_path):
    state = make_state(tmp_path)
    read = lambda: state.cached(  # noqa: E731
        ("job",), ("jobs",), lambda: state.one("SELECT round FROM jobs WHERE job='j'")
    )
    assert read() is None
    with state.tx() as db:
        db.execute("INSERT INTO jobs(job, spec, state, round) VALUES('j', '{}', 'running', 0)")
    assert read()["round"] == 0
    with state.tx() as db:
        db.execute("UPDATE jobs SET round=1 WHERE job='j'")
    assert read()["round"] == 1
    state.close()


def wait_until(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met within the deadline")
        time.sleep(0.005)


def test_a_shared_state_drops_only_what_another_process_wrote(tmp_path):
    """A front-end's State (shared) sees the coordinator's writes through the file, table by table."""
    coordinator = make_state(tmp_path)
    frontend = State(tmp_path / "state.db", shared=True)  # its own connections: as another process's
    loads = []

    def node_state():
        def load():
            loads.append(1)
            return frontend.one("SELECT state FROM nodes WHERE node_id='n1'")["state"]

        return frontend.cached(("state", "n1"), ("nodes",), load)

    assert node_state() == "active" and len(loads) == 1
    # What the coordinator writes all the time, no cached read of nodes depends on: updates,
    # heartbeat times, the audit log. Each commit is seen (data_version), none drops the node.
    for i in range(3):
        with coordinator.tx() as db:
            db.execute(
                "INSERT INTO updates(update_id, job, round, pool, stage, node_id, status) VALUES(?,?,?,?,?,?,?)",
                (f"u{i}", "j", 0, "pool-a", i, "n1", "accepted"),
            )
        coordinator.heartbeat("n1", {"step": i})
        coordinator.flush_heartbeats()
    frontend._follow_other_writers()  # as its thread does every few milliseconds: it has seen them all
    assert node_state() == "active" and len(loads) == 1
    coordinator.set_node_state("n1", "evicted")  # a write to what it cached: dropped within a poll
    wait_until(lambda: node_state() == "evicted")
    assert len(loads) == 2
    frontend.close()
    coordinator.close()


def test_the_tensor_cache_keeps_the_newest_entries_within_its_budget():
    cache = TensorCache(max_bytes=3 * 400)
    for i in range(4):
        cache.put(f"cid{i}", "tensors", {"w": torch.zeros(100)})  # 400 bytes each
    assert cache.get("cid0", "tensors") is None  # the oldest went first
    assert all(cache.get(f"cid{i}", "tensors") is not None for i in (1, 2, 3))
    assert cache.get("cid3", "delta/none") is None  # the kind is part of the key
    cache.put("big", "tensors", {"w": torch.zeros(1000)})  # over the whole budget: not kept
    assert cache.get("big", "tensors") is None and cache.get("cid3", "tensors") is not None


def test_a_coordinator_s_state_checkpoints_only_when_told(tmp_path):
    """checkpoints=False: no commit copies the write-ahead log into the database (SQLite's
    default does, inside whichever commit passes 1,000 pages); checkpoint() does."""
    state = State(tmp_path / "state.db", checkpoints=False)
    db_file = tmp_path / "state.db"
    before = db_file.stat().st_size
    for i in range(300):  # ~1,200 pages of 4 KiB: past SQLite's automatic checkpoint
        state.set_kv(f"k{i}", "x" * 16_000)
    assert db_file.stat().st_size == before  # all of it still in the log
    state.checkpoint()
    assert db_file.stat().st_size > 300 * 16_000
    assert len(state.get_kv("k299")) == 16_000
    state.close()


def test_one_accepted_update_per_slot_and_an_older_file_that_broke_it_still_opens(tmp_path, caplog):
    state = make_state(tmp_path)
    insert = "INSERT OR IGNORE INTO updates(update_id, job, round, pool, stage, node_id, status) VALUES(?,?,?,?,?,?,?)"
    with state.tx() as db:
        assert db.execute(insert, ("u1", "j", 0, "pool-a", 0, "n1", "accepted")).rowcount == 1
        assert db.execute(insert, ("u2", "j", 0, "pool-a", 0, "n1", "accepted")).rowcount == 0  # slot taken
        assert db.execute(insert, ("u3", "j", 0, "pool-a", 0, "n1", "rejected")).rowcount == 1  # any number
        # A file from before the index, holding a slot twice: it opens, with a warning naming the slot.
        db.execute("DROP INDEX updates_accepted_slot")
        db.execute(insert, ("u4", "j", 0, "pool-a", 0, "n1", "accepted"))
    state.close()
    with caplog.at_level(logging.WARNING, logger="panal.coordinator.state"):
        reopened = State(tmp_path / "state.db")
    assert "j/0/pool-a/0" in caplog.text and "mark all but one" in caplog.text
    assert len(reopened.query("SELECT * FROM updates WHERE status='accepted'")) == 2
    reopened.close()


def test_the_coordinator_writes_back_only_the_heartbeats_it_received(tmp_path):
    """Front-ends write the heartbeats they answer; the coordinator merges them into memory and
    writes back only those it received itself (not a thousand no-op updates every few seconds)."""
    state = make_state(tmp_path)
    with state.tx() as db:
        db.execute(
            "INSERT INTO nodes(node_id, public_key, name, pool, state, last_heartbeat_ms, status)"
            " VALUES('n2', x'01', 'two', 'pool-a', 'active', 0, '{}')"
        )
    frontend = State(tmp_path / "state.db", shared=True)
    with frontend.own_tx() as db:  # as a front-end's flush writes what it answered
        db.execute(HEARTBEAT_SQL, (now_ms(), '{"step": 3}', "n1", now_ms()))
    state.merge_heartbeats()
    assert state.node("n1").status == {"step": 3}
    state.heartbeat("n2", {"step": 9})
    written = []
    state._db.set_trace_callback(lambda sql: written.append(sql) if sql.startswith("UPDATE nodes") else None)
    state.flush_heartbeats()
    state._db.set_trace_callback(None)
    assert len(written) == 1 and "'n2'" in written[0]
    assert json.loads(state.one("SELECT status FROM nodes WHERE node_id='n2'")["status"]) == {"step": 9}
    state.flush_heartbeats()  # nothing new since: nothing written
    frontend.close()
    state.close()


def test_an_update_commit_waits_for_the_disk_without_holding_up_reads(tmp_path):
    """Accepted updates commit on a connection of their own (State.commit_tx): while one is
    open, as during its disk wait, reads and cached reads go on; once it returns, they see it.
    It writes only tables no cached read depends on: a write to a cached one is refused."""
    state = make_state(tmp_path)
    assert state.node("n1").state == "active"  # cached
    inside, go_on = threading.Event(), threading.Event()
    insert = "INSERT INTO updates(update_id, job, round, pool, stage, node_id, status) VALUES(?,?,?,?,?,?,?)"

    def commit():
        with state.commit_tx() as db:
            db.execute(insert, ("u1", "j", 0, "pool-a", 0, "n1", "accepted"))
            state.audit("update_accepted", node_id="n1", job="j", round=0, db=db)
            inside.set()
            assert go_on.wait(20)

    t = threading.Thread(target=commit)
    t.start()
    try:
        assert inside.wait(20)
        # The state lock is free: a read answers now, and sees nothing uncommitted.
        assert state.one("SELECT COUNT(*) AS n FROM updates")["n"] == 0
        assert state.node("n1").state == "active"
    finally:
        go_on.set()
        t.join(20)
    assert state.one("SELECT update_id FROM updates")["update_id"] == "u1"
    assert state.one("SELECT kind FROM audit WHERE node_id='n1'")["kind"] == "update_accepted"
    with pytest.raises(sqlite3.IntegrityError, match="writes no cached table \\(nodes\\)"):
        with state.commit_tx() as db:
            db.execute("UPDATE nodes SET state='lost' WHERE node_id='n1'")
    assert state.node("n1").state == "active"
    assert state.one("SELECT state FROM nodes WHERE node_id='n1'")["state"] == "active"
    state.close()
