"""KuboStore against real and lying IPFS RPC servers.

What ran against what:

- Kubo's Go daemon cannot be installed on the project's machines (see
  shared/FACTS.md, IPFS), so the "real daemon" here is js-ipfs 0.66.1
  (ipfs-core 0.18.1 + ipfs-http-server 0.15.1), running offline, started by
  tests.storage.ipfsd.running_ipfs: a different implementation of the same
  ``/api/v0``. Round trips, CID equality with storage.cid, the streamed
  100 MiB add, has/unpin/gc/list and the up-front ``max_bytes`` refusal ran
  against it.
- The integrity stories (a daemon that substitutes, truncates or overflows
  what ``cat`` returns, or lies about the CID of an ``add``) ran against a
  deliberately lying fake server in this file (http.server on 127.0.0.1:0):
  it speaks just enough of ``/api/v0`` to pass the version check.
- The dead-port and not-an-IPFS-server checks need no daemon at all.

The shared BlobStore contract runs in test_blobstore_contract.py.
"""

from __future__ import annotations

import enum
import json
import random
import socket
import threading
import time
import tracemalloc
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from storage.cid import CODEC_RAW, CidBuilder, cid_of_bytes
from storage.errors import IntegrityError, MessageTooLarge, NotFound, StoreError, StoreUnavailable
from storage.kubo import KuboStore
from tests.storage.ipfsd import running_ipfs

MiB = 1 << 20
CHUNK = 262_144
ABSENT = "QmNLei78zWmzUdbeRB3CiUfAizWUrbeeZh5K1rhAQKCh51"  # sha2-256 of nothing we ever add


@pytest.fixture(scope="module")
def ipfs_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with running_ipfs(tmp_path_factory.mktemp("ipfs")) as url:
        yield url


@pytest.fixture
def store(ipfs_url: str) -> Iterator[KuboStore]:
    with KuboStore(ipfs_url, timeout=30) as s:
        assert isinstance(s, KuboStore)
        yield s


# ------------------------------------------------------------ no daemon at all


def test_a_dead_port_is_store_unavailable_at_once() -> None:
    with socket.socket() as sock:  # a port nobody listens on: bound, then released
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    start = time.monotonic()
    with pytest.raises(StoreUnavailable, match="is `ipfs daemon` running at http://127.0.0.1"):
        KuboStore(f"kubo:http://127.0.0.1:{port}")
    assert time.monotonic() - start < 5


def test_a_url_without_the_kubo_form_is_refused() -> None:
    with pytest.raises(StoreError, match="kubo:http://"):
        KuboStore("ipfs://127.0.0.1:5001")


# ------------------------------------------------------------- real js-ipfs


@pytest.mark.parametrize("cid_version", [0, 1])
@pytest.mark.parametrize("size", [0, 1, CHUNK, CHUNK + 1, 3_000_000])
def test_round_trip_gives_the_cid_storage_cid_computes(store: KuboStore, cid_version: int, size: int) -> None:
    data = random.Random(size).randbytes(size)
    cid = store.put_bytes(data, cid_version=cid_version)
    assert cid == cid_of_bytes(data, cid_version=cid_version)
    assert str(cid).startswith("Qm" if cid_version == 0 else "baf")
    assert store.get_bytes(cid) == data
    assert store.stat(cid).size == size


def _generated(total: int, seed: int) -> Iterator[bytes]:
    """``total`` pseudo-random bytes in 1 MiB pieces, made on the fly."""
    rng = random.Random(seed)
    for start in range(0, total, MiB):
        yield rng.randbytes(min(MiB, total - start))


def test_a_100_mib_add_streams_without_holding_the_blob(store: KuboStore) -> None:
    total = 100 * MiB
    expected = CidBuilder(cid_version=1)
    for piece in _generated(total, seed=7):
        expected.update(piece)

    moved = 0

    def progress(n: int) -> None:
        nonlocal moved
        moved += n

    tracemalloc.start()
    try:
        cid = store.put_chunks(_generated(total, seed=7), cid_version=1, pin=True, progress=progress)
        _, add_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        received = sum(len(piece) for piece in store.iter_chunks(cid, max_bytes=total))
        _, cat_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert cid == expected.finish()
    assert moved == received == total
    # Python allocations stay a few chunks deep, nowhere near the 100 MiB that moved.
    assert add_peak < 16 * MiB, f"add held {add_peak / MiB:.0f} MiB"
    assert cat_peak < 16 * MiB, f"cat held {cat_peak / MiB:.0f} MiB"
    store.unpin(cid)


def test_max_bytes_refuses_a_blob_known_to_be_too_large_before_reading_it(store: KuboStore) -> None:
    cid = store.put_bytes(b"x" * 10_000)
    with pytest.raises(MessageTooLarge, match="10000 bytes, over the 9999-byte limit"):
        store.iter_chunks(cid, max_bytes=9_999)  # raised at the call: nothing is streamed
    assert store.get_bytes(cid, max_bytes=10_000) == b"x" * 10_000


def test_has_answers_at_once_for_a_cid_the_node_lacks(store: KuboStore) -> None:
    start = time.monotonic()
    assert not store.has(ABSENT)
    with pytest.raises(NotFound):
        store.stat(ABSENT)
    with pytest.raises(NotFound):
        store.get_bytes(ABSENT)
    with pytest.raises(NotFound):
        store.pin(ABSENT)
    assert time.monotonic() - start < 5


def test_unpin_of_an_unpinned_or_absent_cid_is_a_no_op(store: KuboStore) -> None:
    cid = store.put_bytes(b"never pinned")
    store.unpin(cid)
    store.unpin(ABSENT)
    assert not store.stat(cid).pinned


def test_pins_list_and_gc(store: KuboStore) -> None:
    kept = store.put_bytes(b"kept" * 100_000, pin=True)  # several chunks: a dag-pb root over leaves
    dropped = store.put_bytes(b"dropped" * 100_000)
    assert store.stat(kept).pinned and not store.stat(dropped).pinned
    assert kept in {info.cid for info in store.list()}
    assert dropped not in {info.cid for info in store.list()}

    removed = store.gc()
    # The daemon names removed blocks by their blockstore key, the multihash: a
    # dag-pb root Qm… comes back as the raw CIDv1 with the same digest.
    assert dropped.digest in {c.digest for c in removed}
    assert all(c.version == 1 and c.codec == CODEC_RAW for c in removed)
    assert kept.digest not in {c.digest for c in removed}
    assert not store.has(dropped) and store.has(kept)

    store.unpin(kept)
    assert kept.digest in {c.digest for c in store.gc()}


# -------------------------------------------------------- a lying daemon


class Lie(enum.Enum):
    SUBSTITUTES = "returns other bytes of the same length"
    TRUNCATES = "stops early"
    OVERFLOWS = "keeps streaming past the size it reported"
    WRONG_CID = "answers an add with the CID of other bytes"


class LyingDaemon:
    """Just enough of /api/v0 to pass KuboStore's version check, then lies as told."""

    def __init__(self, lie: Lie, blob: bytes) -> None:
        self.lie, self.blob = lie, blob
        self.calls: Counter[str] = Counter()
        daemon = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:
                endpoint = self.path.split("?")[0].removeprefix("/api/v0/")
                daemon.calls[endpoint] += 1
                if endpoint == "version":
                    self._json({"Version": "0.0.0-liar"})
                elif endpoint == "files/stat":
                    self._json({"Type": "file", "Size": len(daemon.blob)})
                elif endpoint == "cat":
                    self._cat()
                elif endpoint == "add":
                    self._drain()
                    self._json({"Name": "blob", "Hash": str(cid_of_bytes(b"something else"))})
                else:
                    self.send_error(404)

            def _json(self, obj: object) -> None:
                body = json.dumps(obj).encode() + b"\n"
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _drain(self) -> None:
                # The add body is chunked; read it to the end like a daemon would.
                while (size := int(self.rfile.readline().strip(), 16)) > 0:
                    self.rfile.read(size + 2)
                self.rfile.readline()

            def _cat(self) -> None:
                self.send_response(200)
                self.end_headers()  # HTTP/1.0, no length: the body ends when we close
                blob = daemon.blob
                try:
                    if daemon.lie is Lie.SUBSTITUTES:
                        self.wfile.write(blob[:-1] + bytes([blob[-1] ^ 1]))
                    elif daemon.lie is Lie.TRUNCATES:
                        self.wfile.write(blob[: len(blob) // 2])
                    elif daemon.lie is Lie.OVERFLOWS:
                        while True:  # until the client hangs up
                            self.wfile.write(blob)
                    else:
                        self.wfile.write(blob)
                except OSError:
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"kubo:http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> LyingDaemon:
        threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


BLOB = random.Random(1).randbytes(300_000)


@pytest.mark.parametrize(
    "lie", [Lie.SUBSTITUTES, Lie.TRUNCATES, Lie.OVERFLOWS], ids=lambda lie: lie.name.lower()
)
def test_a_daemon_that_lies_in_cat_is_caught(lie: Lie, tmp_path: Path) -> None:
    cid = cid_of_bytes(BLOB)
    with LyingDaemon(lie, BLOB) as liar, KuboStore(liar.url, timeout=10) as store:
        with pytest.raises(IntegrityError, match=str(cid)):
            store.get_bytes(cid)
        # get_file leaves nothing behind when the check fails.
        with pytest.raises(IntegrityError):
            store.get_file(cid, tmp_path / "blob")
    assert liar.calls["cat"] == 2
    assert list(tmp_path.iterdir()) == []


def test_a_daemon_that_streams_past_max_bytes_is_cut_off_as_bytes_arrive() -> None:
    cid = cid_of_bytes(BLOB)
    with LyingDaemon(Lie.OVERFLOWS, BLOB) as liar, KuboStore(liar.url, timeout=10) as store:
        with pytest.raises(MessageTooLarge, match="sent more than the 300000-byte limit"):
            store.get_bytes(cid, max_bytes=len(BLOB))


def test_max_bytes_refuses_up_front_without_asking_for_the_bytes() -> None:
    with LyingDaemon(Lie.SUBSTITUTES, BLOB) as liar, KuboStore(liar.url, timeout=10) as store:
        with pytest.raises(MessageTooLarge):
            store.get_bytes(cid_of_bytes(BLOB), max_bytes=1000)
    assert liar.calls["cat"] == 0


def test_a_daemon_that_lies_about_the_cid_of_an_add_is_caught() -> None:
    with LyingDaemon(Lie.WRONG_CID, BLOB) as liar, KuboStore(liar.url, timeout=10) as store:
        with pytest.raises(IntegrityError) as caught:
            store.put_bytes(BLOB)
    assert str(cid_of_bytes(BLOB)) in str(caught.value)
    assert str(cid_of_bytes(b"something else")) in str(caught.value)


def test_a_web_server_that_is_not_ipfs_is_store_unavailable() -> None:
    class NotIpfs(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_POST(self) -> None:
            self.send_error(404)

    server = ThreadingHTTPServer(("127.0.0.1", 0), NotIpfs)
    threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True).start()
    try:
        with pytest.raises(StoreUnavailable, match="not an IPFS RPC API"):
            KuboStore(f"kubo:http://127.0.0.1:{server.server_address[1]}")
    finally:
        server.shutdown()
        server.server_close()


def test_without_the_npm_install_the_fixture_says_what_to_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tests.storage.ipfsd as ipfsd

    monkeypatch.setattr(ipfsd, "IPFSD", tmp_path / "ipfsd")  # a checkout where npm ci never ran
    with pytest.raises(ipfsd.IpfsdMissing, match="run `npm ci --prefix tests/storage/ipfsd`"):
        with running_ipfs(tmp_path):
            pass
