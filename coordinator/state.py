"""The coordinator's persistent state: one SQLite file in WAL mode.

Everything a restarted coordinator needs is here — nodes, enrollment tokens,
jobs, placement, rounds, every update received (with its signed envelope, so
it can be re-verified later) and an audit log. A write is committed before the
call that caused it is answered: nothing acknowledged is lost.

Heartbeat times are the exception: they change every second per node, so they
live in memory and are written back at most every few seconds (a restarted
coordinator gives every node a fresh grace period instead). Front-end processes
(coordinator/frontend.py) serve heartbeats too and write theirs back the same
way; the coordinator takes them in with :meth:`State.merge_heartbeats`. A
heartbeat is only ever written over an older one, whoever writes it.

What every call reads (the sender's node, the running job, its pools) is served
from memory: :meth:`State.cached` keeps a query's result until a table it read
is written. SQLite itself reports each write (temporary triggers call back into
Python), so no writer, here or in another module, can leave a cached row stale.
Those triggers do not reach other processes, so the same writes also count
themselves in the file (table ``versions``, by persistent triggers). A
``shared`` State (a front-end's) has a thread of its own that polls ``PRAGMA
data_version`` every few milliseconds and, once another process has committed,
reads those counts and drops what it cached from the tables that changed (a
coordinator's thousand update commits a round drop nothing it reads; reads stay
lock-free). It polls on the connection it writes its heartbeats with (``own``),
whose commits SQLite does not count as another's: a front-end's own writes drop
nothing.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from protocol import panal_pb2 as pb
from protocol.errors import NotAuthorized

log = logging.getLogger("panal.coordinator.state")

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
CREATE TABLE IF NOT EXISTS versions(name TEXT PRIMARY KEY, n INTEGER NOT NULL);
"""

# One accepted update per slot and round, whichever call commits first (Coordinator._commit_accepted).
ACCEPTED_SLOT_INDEX = (
    "CREATE UNIQUE INDEX IF NOT EXISTS updates_accepted_slot ON updates(job, round, pool, stage)"
    " WHERE status='accepted'"
)

HEARTBEAT_FLUSH_S = 5.0
FOLLOW_S = 0.005  # how often a shared State looks for other processes' commits
# A heartbeat is written over an older one only: (time, status JSON, node, time).
HEARTBEAT_SQL = (
    "UPDATE nodes SET last_heartbeat_ms=?, status=? WHERE node_id=? AND COALESCE(last_heartbeat_ms, 0) < ?"
)

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


def _watched_triggers(name: str, when: str, action: str, *, temp: bool) -> str:
    """A trigger for every write to a WATCHED table (insert, watched update, delete): ``when``
    ("AFTER" or "BEFORE") it, ``action`` runs, with ``{table}`` standing for the table's name."""
    return "".join(
        f"CREATE {'TEMP ' if temp else ''}TRIGGER IF NOT EXISTS {name}_{table}_{event.split()[0].lower()}"
        f" {when} {event} ON {table} BEGIN {action.format(table=table)}; END;"
        for table, update in WATCHED.items()  # the names are this module's constants
        for event in ("INSERT", update, "DELETE")
    )


# Every write to a WATCHED table counts itself in ``versions``, in its own transaction, whichever
# process makes it: how a shared State (another process) knows what its cache must drop.
VERSION_TRIGGERS = "".join(
    f"INSERT OR IGNORE INTO versions(name, n) VALUES('{table}', 0);" for table in WATCHED  # noqa: S608
) + _watched_triggers("panal_version", "AFTER", "UPDATE versions SET n = n + 1 WHERE name = '{table}'", temp=False)

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

    def __init__(self, path: str | Path, *, shared: bool = False, checkpoints: bool = True) -> None:
        """``checkpoints=False``: no commit on this State's connections copies the write-ahead log
        into the database file (SQLite does it every 1,000 pages by default, inside whichever
        commit crosses the mark, so inside a call being answered); the running coordinator's
        loop does it instead (:meth:`checkpoint`), for every process on the file."""
        self.path = Path(path)
        self.shared = shared
        self._checkpoints = checkpoints
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._no_autocheckpoint(self._db)
        self._db.executescript(SCHEMA + VERSION_TRIGGERS)
        try:
            self._db.execute(ACCEPTED_SLOT_INDEX)
        except sqlite3.IntegrityError:  # a file written before the index, by a version without it
            rows = self._db.execute(
                "SELECT job, round, pool, stage, COUNT(*) AS n FROM updates WHERE status='accepted'"
                " GROUP BY job, round, pool, stage HAVING n > 1 LIMIT 5"
            ).fetchall()
            log.warning(
                "%s: some slots hold two accepted updates (%s); without the index on accepted slots, "
                "only the checks before a commit keep a slot to one update. To restore it, mark all but "
                "one update of each such slot rejected (table updates) and restart.",
                self.path,
                ", ".join(f"{r['job']}/{r['round']}/{r['pool']}/{r['stage']}" for r in rows),
            )
        self.lock = threading.RLock()
        # One writer at a time across this State's connections (no busy-waiting on SQLite's lock).
        self._write_lock = threading.Lock()
        self._commit_db: sqlite3.Connection | None = None  # commit_tx's, opened at its first use
        self._heartbeats: dict[str, tuple[int, dict[str, Any]]] = {}  # node -> newest known (time, status)
        self._unflushed: dict[str, tuple[int, dict[str, Any]]] = {}  # received here since the last flush
        self._beats_lock = threading.Lock()
        self._flushed = time.monotonic()
        self._data_version = -1  # another connection's last commit, as SQLite counts them
        self._file_versions: dict[str, int] = {}  # table -> its count in ``versions``, as last read
        # shared: heartbeats (and nothing the cache reads) are written on this connection.
        self.own: sqlite3.Connection | None = None
        self.own_lock = threading.Lock()
        self._side_db: sqlite3.Connection | None = None  # merge_heartbeats' and checkpoint's (_side)
        self._versions = dict.fromkeys(WATCHED, 0)  # writes seen per table
        self._cache: dict[Hashable, tuple[tuple[int, ...], Any]] = {}
        self._db.create_function("panal_changed", 1, self._changed)
        self._db.executescript(_watched_triggers("panal", "AFTER", "SELECT panal_changed('{table}')", temp=True))
        self._closed = threading.Event()
        if shared:
            self.own = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
            self.own.execute("PRAGMA synchronous=NORMAL")  # heartbeat times may be lost; nothing else is here
            self._no_autocheckpoint(self.own)
            self._follow_other_writers()
            threading.Thread(target=self._follow_loop, name="panal-state-follow", daemon=True).start()

    def close(self) -> None:
        self._closed.set()
        with self.lock:
            self.flush_heartbeats()
            self._db.close()
            with self._write_lock:
                if self._commit_db is not None:
                    self._commit_db.close()
            if self._side_db is not None:
                self._side_db.close()
        if self.own is not None:
            with self.own_lock:
                self.own.close()

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        """One transaction, committed on success (under the state lock, and the write lock that
        commit_tx shares)."""
        with self.lock, self._write_lock:
            try:
                with _transaction(self._db) as db:
                    yield db
            except BaseException:
                for table in self._versions:  # a cached read inside the transaction may be undone
                    self._changed(table)
                raise

    @contextmanager
    def commit_tx(self) -> Iterator[sqlite3.Connection]:
        """One transaction on a connection of its own, for rows no cached read depends on
        (``updates``, ``audit``): its commit's disk wait (synchronous=FULL) holds neither the
        state lock nor the reads waiting for it. Once it returns, every read sees its rows.

        A write to a table that :meth:`cached` reads is refused here (SQLite aborts it):
        this connection's writes do not drop cached reads.
        """
        with self._write_lock:
            if self._commit_db is None:
                self._commit_db = self._commit_connection()
            with _transaction(self._commit_db) as db:
                yield db

    def _commit_connection(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA synchronous=FULL")
        db.execute("PRAGMA foreign_keys=ON")
        self._no_autocheckpoint(db)
        refuse = "SELECT RAISE(ABORT, 'State.commit_tx writes no cached table ({table}): use State.tx')"
        db.executescript(_watched_triggers("panal_commit", "BEFORE", refuse, temp=True))
        return db

    @contextmanager
    def own_tx(self) -> Iterator[sqlite3.Connection]:
        """A shared State's transaction on ``own``: heartbeat columns and kv only (it drops no cache)."""
        own = self._own()
        with self.own_lock, _transaction(own) as db:
            yield db

    def _own(self) -> sqlite3.Connection:
        if self.own is None:
            raise RuntimeError("only a shared State (State(path, shared=True)) has a connection of its own")
        return self.own

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

    def _follow_loop(self) -> None:
        while not self._closed.wait(FOLLOW_S):
            try:
                self._follow_other_writers()
            except sqlite3.Error:  # closed meanwhile, or busy: the next poll tries again
                if self._closed.is_set():
                    return

    def _follow_other_writers(self) -> None:
        """Once another connection (process) has committed, forget the cached reads of the tables it wrote."""
        own = self._own()
        with self.own_lock:
            version = own.execute("PRAGMA data_version").fetchone()[0]
            if version == self._data_version:
                return
            counts = dict(own.execute("SELECT name, n FROM versions").fetchall())
        with self.lock:
            self._data_version = version
            for table in self._versions:
                if counts.get(table) != self._file_versions.get(table):
                    self._changed(table)
            self._file_versions = counts

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

    # ---------------------------------------------------------------- jobs

    def running_job(self) -> sqlite3.Row | None:
        """The job waiting for its pools or running, the newest if several."""
        return self.cached(
            ("running_job",),
            ("jobs",),
            lambda: self.one(
                "SELECT * FROM jobs WHERE state IN ('waiting','running') ORDER BY created_ms DESC"
            ),
        )

    def pool(self, job: str, pool: str) -> sqlite3.Row | None:
        return self.cached(
            ("pool", job, pool),
            ("pools",),
            lambda: self.one("SELECT * FROM pools WHERE job=? AND pool=?", (job, pool)),
        )

    # ---------------------------------------------------------------- nodes

    def node(self, node_id: str) -> Node | None:
        def load() -> Node | None:
            row = self.one("SELECT * FROM nodes WHERE node_id=?", (node_id,))
            return self._node(row, heartbeats={}) if row else None

        node = self.cached(("node", node_id), ("nodes",), load)
        held = self._heartbeats.get(node_id)
        if node is None or held is None:
            return node
        return dataclasses.replace(node, last_heartbeat_ms=held[0], status=held[1])

    def nodes(self, *, pool: str | None = None) -> list[Node]:
        return [self._node(r) for r in self._node_rows(pool)]

    def _node_rows(self, pool: str | None) -> list[sqlite3.Row]:
        def load() -> list[sqlite3.Row]:
            if pool is None:
                return self.query("SELECT * FROM nodes ORDER BY pool, node_id")
            return self.query("SELECT * FROM nodes WHERE pool=? ORDER BY node_id", (pool,))

        return self.cached(("nodes", pool), ("nodes",), load)

    def _node(
        self, row: sqlite3.Row, heartbeats: dict[str, tuple[int, dict[str, Any]]] | None = None
    ) -> Node:
        """The node of ``row``, with its heartbeat held in memory (``heartbeats``, this State's by default) if any."""
        held = self._heartbeats if heartbeats is None else heartbeats
        beat, status = held.get(row["node_id"], (row["last_heartbeat_ms"] or 0, None))
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
        """Record a heartbeat in memory; written to disk every few seconds (by the coordinator's tick)."""
        beat = (now_ms(), status)
        with self._beats_lock:
            self._heartbeats[node_id] = beat
            self._unflushed[node_id] = beat

    def flush_heartbeats_if_due(self) -> None:
        if time.monotonic() - self._flushed > HEARTBEAT_FLUSH_S:
            with self.lock:
                if time.monotonic() - self._flushed > HEARTBEAT_FLUSH_S:  # not just done by another thread
                    self.flush_heartbeats()

    def flush_heartbeats(self) -> None:
        """Write the heartbeats received here since the last flush over older ones on disk (never
        over newer ones). Those merged from disk (front-ends') are there already."""
        with self.lock:
            with self._beats_lock:
                beats, self._unflushed = self._unflushed, {}
            rows = [(ts, json.dumps(st), nid, ts) for nid, (ts, st) in beats.items()]
            try:
                if rows:
                    with self.tx() as db:
                        db.executemany(HEARTBEAT_SQL, rows)
            except BaseException:
                with self._beats_lock:  # kept for the next flush; newer heartbeats meanwhile win
                    self._unflushed = {**beats, **self._unflushed}
                raise
            self._flushed = time.monotonic()

    def merge_heartbeats(self) -> None:
        """Take in the heartbeats other processes (front-ends) wrote: on disk, newer than in memory.

        Read on a connection of its own, without the state lock: the calls being answered
        meanwhile do not wait for it. One caller at a time (the coordinator's tick).
        """
        rows = (
            self._side()
            .execute("SELECT node_id, last_heartbeat_ms, status FROM nodes WHERE state IN ('active', 'lost')")
            .fetchall()
        )
        newer = []
        for node_id, ts, status in rows:
            held = self._heartbeats.get(node_id)
            if ts and (held is None or ts > held[0]):
                newer.append((node_id, ts, status))
        with self._beats_lock:  # compared again: a heartbeat received meanwhile is newer still
            for node_id, ts, status in newer:
                held = self._heartbeats.get(node_id)
                if held is None or ts > held[0]:
                    self._heartbeats[node_id] = (ts, json.loads(status or "{}"))

    def checkpoint(self) -> None:
        """Copy what the write-ahead log holds into the database file, as far as no reader needs it.

        PASSIVE: it waits for no one, and no one waits for it. On its own connection, without the
        state lock; one caller at a time (the coordinator's loop, every tick).
        """
        self._side().execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()

    def _side(self) -> sqlite3.Connection:
        """The connection of merge_heartbeats and checkpoint (the loop's: one caller at a time)."""
        if self._side_db is None:
            self._side_db = sqlite3.connect(self.path, check_same_thread=False, timeout=30)
            self._no_autocheckpoint(self._side_db)
        return self._side_db

    def _no_autocheckpoint(self, db: sqlite3.Connection) -> None:
        if not self._checkpoints:
            db.execute("PRAGMA wal_autocheckpoint=0")

    def set_node_state(self, node_id: str, state: str, db: sqlite3.Connection | None = None) -> None:
        if db is not None:
            db.execute("UPDATE nodes SET state=? WHERE node_id=?", (state, node_id))
        else:
            with self.tx() as conn:
                conn.execute("UPDATE nodes SET state=? WHERE node_id=?", (state, node_id))


def heartbeat_status(req: pb.HeartbeatRequest) -> dict[str, Any]:
    """What a heartbeat reports, as kept for `panal admin status` and `nodes`."""
    return {
        "state": pb.NodeState.Name(req.state),
        "step": req.step,
        "loss": req.loss,
        "tokens_per_second": req.tokens_per_second,
        "detail": req.detail[:500],
        "round": req.round,
        "weights_digest": req.weights_digest,
        "epoch": req.epoch,
    }


def authorize_node(node: Node | None, node_id: str, public_key: bytes) -> Node:
    """The sender is an enrolled node, signing with its enrolled key, not evicted or quarantined."""
    if node is None or node.public_key != public_key:
        raise NotAuthorized(f"node {node_id} is not enrolled; enroll with a token first")
    if node.state in ("evicted", "quarantined"):
        raise NotAuthorized(f"node {node_id} was {node.state} by the admin")
    return node


@contextmanager
def _transaction(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """BEGIN IMMEDIATE … COMMIT, or ROLLBACK on any exception (the caller holds the connection's lock)."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")
