"""The coordinator's persistent state: one SQLite file in WAL mode.

Everything a restarted coordinator needs is here — nodes, enrollment tokens,
jobs, placement, rounds, every update received (with its signed envelope, so
it can be re-verified later) and an audit log. A write is committed before the
call that caused it is answered: nothing acknowledged is lost.

Heartbeat times are the exception: they change every second per node, so they
live in memory and are written back at most every few seconds (a restarted
coordinator gives every node a fresh grace period instead).

What every call reads (the sender's node, the running job, its pools) is served
from memory: :meth:`State.cached` keeps a query's result until a table it read
is written. SQLite itself reports each write (temporary triggers call back into
Python), so no writer, here or in another module, can leave a cached row stale.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

SCHEMA = """
CREATE TABLE IF NOT EXISTS nodes(
  node_id TEXT PRIMARY KEY, public_key BLOB NOT NULL, name TEXT NOT NULL, pool TEXT NOT NULL,
  state TEXT NOT NULL, capabilities BLOB, data_address TEXT, enrolled_ms INTEGER,
  last_heartbeat_ms INTEGER, status TEXT);
CREATE TABLE IF NOT EXISTS tokens(
  token_hash TEXT PRIMARY KEY, pool TEXT NOT NULL, created_ms INTEGER, expires_ms INTEGER,
  used_by TEXT, used_ms INTEGER);
CREATE TABLE IF NOT EXISTS jobs(
  job TEXT PRIMARY KEY, spec TEXT NOT NULL, state TEXT NOT NULL, created_ms INTEGER,
  round INTEGER NOT NULL DEFAULT 0, detail TEXT);
CREATE TABLE IF NOT EXISTS pools(
  job TEXT, pool TEXT, state TEXT NOT NULL, detail TEXT, epoch INTEGER NOT NULL DEFAULT 0,
  shards TEXT, PRIMARY KEY(job, pool));
CREATE TABLE IF NOT EXISTS placement(
  job TEXT, pool TEXT, stage INTEGER, node_id TEXT, reason TEXT, PRIMARY KEY(job, pool, stage));
CREATE TABLE IF NOT EXISTS rounds(
  job TEXT, round INTEGER, state TEXT NOT NULL, opened_ms INTEGER, deadline_ms INTEGER,
  closed_ms INTEGER, start_weights TEXT, momentum TEXT, result_cid TEXT, checkpoint_cid TEXT,
  mean_loss REAL, tokens INTEGER, detail TEXT, PRIMARY KEY(job, round));
CREATE TABLE IF NOT EXISTS updates(
  update_id TEXT PRIMARY KEY, job TEXT, round INTEGER, pool TEXT, stage INTEGER, node_id TEXT,
  envelope BLOB, envelope_cid TEXT, blob_cid TEXT, status TEXT NOT NULL, reason TEXT, received_ms INTEGER,
  tokens INTEGER, loss REAL, norm REAL);
CREATE INDEX IF NOT EXISTS updates_round ON updates(job, round, stage, status);
CREATE TABLE IF NOT EXISTS audit(
  id INTEGER PRIMARY KEY AUTOINCREMENT, ts_ms INTEGER, kind TEXT, node_id TEXT, job TEXT,
  round INTEGER, detail TEXT);
CREATE TABLE IF NOT EXISTS kv(key TEXT PRIMARY KEY, value TEXT);
"""

HEARTBEAT_FLUSH_S = 5.0

# The tables State.cached may read, and the writes that invalidate what it read.
# A node's heartbeat columns are left out: flush_heartbeats copies them from
# memory, which always wins over the database copy (see State._node).
WATCHED = {
    "nodes": "UPDATE OF node_id, public_key, name, pool, state, capabilities, data_address, enrolled_ms",
    "jobs": "UPDATE",
    "pools": "UPDATE",
    "placement": "UPDATE",
    "rounds": "UPDATE",
}

T = TypeVar("T")


def now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(frozen=True)
class Node:
    node_id: str
    public_key: bytes
    name: str
    pool: str
    state: str  # active | lost | evicted | quarantined
    capabilities: bytes
    data_address: str
    enrolled_ms: int
    last_heartbeat_ms: int
    status: dict[str, Any]


class State:
    """Thread-safe access to the coordinator's SQLite file."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(SCHEMA)
        self.lock = threading.RLock()
        self._heartbeats: dict[str, tuple[int, dict[str, Any]]] = {}
        self._flushed = time.monotonic()
        self._versions = dict.fromkeys(WATCHED, 0)  # writes seen per table
        self._cache: dict[Hashable, tuple[tuple[int, ...], Any]] = {}
        self._db.create_function("panal_changed", 1, self._changed)
        for table, update in WATCHED.items():
            for event in ("INSERT", update, "DELETE"):
                self._db.execute(
                    f"CREATE TEMP TRIGGER panal_{table}_{event.split()[0].lower()} AFTER {event} ON {table}"
                    f" BEGIN SELECT panal_changed('{table}'); END"
                )

    def close(self) -> None:
        with self.lock:
            self.flush_heartbeats()
            self._db.close()

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        """One transaction, committed on success (under the state lock)."""
        with self.lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                for table in self._versions:  # a cached read inside the transaction may be undone
                    self._changed(table)
                raise
            self._db.execute("COMMIT")

    def query(self, sql: str, args: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        with self.lock:
            return list(self._db.execute(sql, args))

    def one(self, sql: str, args: tuple[Any, ...] = ()) -> sqlite3.Row | None:
        rows = self.query(sql, args)
        return rows[0] if rows else None

    # ---------------------------------------------------------------- cache

    def cached(self, key: Hashable, tables: tuple[str, ...], load: Callable[[], T]) -> T:
        """``load()``, remembered until one of ``tables`` (all that ``load`` reads) is written.

        A hit takes no lock. A write bumps its table's count inside the writer's
        transaction, under the state lock: a reader either sees the old count and
        the value from before the write, or misses and waits for the commit.
        """
        hit = self._cache.get(key)
        if hit is not None and hit[0] == tuple(self._versions[t] for t in tables):
            return hit[1]  # type: ignore[no-any-return]
        with self.lock:
            stamp = tuple(self._versions[t] for t in tables)
            value = load()
            self._cache[key] = (stamp, value)
        return value

    def _changed(self, table: str) -> None:
        self._versions[table] += 1

    # ---------------------------------------------------------------- kv

    def get_kv(self, key: str, default: str | None = None) -> str | None:
        row = self.one("SELECT value FROM kv WHERE key=?", (key,))
        return row["value"] if row else default

    def set_kv(self, key: str, value: str) -> None:
        with self.tx() as db:
            db.execute("INSERT OR REPLACE INTO kv(key, value) VALUES(?, ?)", (key, value))

    # ---------------------------------------------------------------- audit

    def audit(
        self,
        kind: str,
        *,
        node_id: str = "",
        job: str = "",
        round: int | None = None,
        db: sqlite3.Connection | None = None,
        **detail: Any,
    ) -> None:
        args = (now_ms(), kind, node_id, job, round, json.dumps(detail, sort_keys=True, default=str))
        sql = "INSERT INTO audit(ts_ms, kind, node_id, job, round, detail) VALUES(?,?,?,?,?,?)"
        if db is not None:
            db.execute(sql, args)
        else:
            with self.tx() as conn:
                conn.execute(sql, args)

    # ---------------------------------------------------------------- nodes

    def node(self, node_id: str) -> Node | None:
        row = self.cached(
            ("node", node_id), ("nodes",), lambda: self.one("SELECT * FROM nodes WHERE node_id=?", (node_id,))
        )
        return self._node(row) if row else None

    def nodes(self, *, pool: str | None = None) -> list[Node]:
        return [self._node(r) for r in self._node_rows(pool)]

    def _node_rows(self, pool: str | None) -> list[sqlite3.Row]:
        def load() -> list[sqlite3.Row]:
            if pool is None:
                return self.query("SELECT * FROM nodes ORDER BY pool, node_id")
            return self.query("SELECT * FROM nodes WHERE pool=? ORDER BY node_id", (pool,))

        return self.cached(("nodes", pool), ("nodes",), load)

    def _node(self, row: sqlite3.Row) -> Node:
        beat, status = self._heartbeats.get(row["node_id"], (row["last_heartbeat_ms"] or 0, None))
        return Node(
            node_id=row["node_id"],
            public_key=bytes(row["public_key"]),
            name=row["name"],
            pool=row["pool"],
            state=row["state"],
            capabilities=bytes(row["capabilities"] or b""),
            data_address=row["data_address"] or "",
            enrolled_ms=row["enrolled_ms"] or 0,
            last_heartbeat_ms=beat,
            status=status if status is not None else json.loads(row["status"] or "{}"),
        )

    def silent_nodes(self, older_than_ms: int) -> list[Node]:
        """Active nodes whose last heartbeat is older than ``older_than_ms`` (a tick, every half second)."""
        now = now_ms()
        beats = self._heartbeats
        return [
            self._node(r)
            for r in self._node_rows(None)
            if r["state"] == "active"
            and now - beats.get(r["node_id"], (r["last_heartbeat_ms"] or 0, None))[0] > older_than_ms
        ]

    def heartbeat(self, node_id: str, status: dict[str, Any]) -> None:
        """Record a heartbeat in memory; written to disk every few seconds."""
        self._heartbeats[node_id] = (now_ms(), status)  # one dict store: atomic, no lock needed
        self.flush_heartbeats_if_due()

    def flush_heartbeats_if_due(self) -> None:
        if time.monotonic() - self._flushed > HEARTBEAT_FLUSH_S:
            with self.lock:
                if time.monotonic() - self._flushed > HEARTBEAT_FLUSH_S:  # not just done by another thread
                    self.flush_heartbeats()

    def flush_heartbeats(self) -> None:
        with self.lock:
            rows = [(ts, json.dumps(st), nid) for nid, (ts, st) in list(self._heartbeats.items())]
            if rows:
                with self.tx() as db:
                    db.executemany("UPDATE nodes SET last_heartbeat_ms=?, status=? WHERE node_id=?", rows)
            self._flushed = time.monotonic()

    def set_node_state(self, node_id: str, state: str, db: sqlite3.Connection | None = None) -> None:
        if db is not None:
            db.execute("UPDATE nodes SET state=? WHERE node_id=?", (state, node_id))
        else:
            with self.tx() as conn:
                conn.execute("UPDATE nodes SET state=? WHERE node_id=?", (state, node_id))
