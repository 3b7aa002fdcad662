"""One contract, every backend: the same tests run against LocalStore and KuboStore.

Which backend ran what: `local` is the embedded LocalStore on a temporary
directory; `kubo` is KuboStore against a real IPFS RPC server (js-ipfs, see
tests/storage/ipfsd.py) — Kubo's Go daemon cannot be installed on these
machines. Tests that corrupt bytes at rest need access to the backend's files
and run against LocalStore only (marked below); KuboStore's verification of
bytes in transit is tested against a lying server in test_kubo.py.
"""

from __future__ import annotations

import io
import os

import pytest

from storage.blobstore import BlobStore
from storage.cid import cid_of_bytes
from storage.errors import IntegrityError, MessageTooLarge, NotFound
from storage.local import LocalStore

CHUNK = 262_144
SIZES = [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 17]


def payload(n: int, seed: int = 0) -> bytes:
    import random

    return random.Random(seed * 1_000_003 + n).randbytes(n)


@pytest.fixture(scope="module")
def ipfs_url(tmp_path_factory):
    from tests.storage.ipfsd import running_ipfs

    with running_ipfs(tmp_path_factory.mktemp("ipfs")) as url:
        yield url.removeprefix("kubo:")


@pytest.fixture(params=["local", "kubo"])
def store(request, tmp_path) -> BlobStore:
    if request.param == "local":
        s: BlobStore = LocalStore(tmp_path / "store")
    else:
        from storage.kubo import KuboStore

        s = KuboStore(request.getfixturevalue("ipfs_url"))
        s.gc()  # every test starts from an empty store (the daemon is shared by the module)
    yield s
    s.close()


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("cid_version", [0, 1])
def test_put_returns_kubo_cid_and_get_returns_the_bytes(store, size, cid_version):
    data = payload(size)
    cid = store.put_bytes(data, cid_version=cid_version, pin=True)
    assert cid == cid_of_bytes(data, cid_version=cid_version)
    assert store.has(cid)
    assert store.get_bytes(cid) == data
    assert b"".join(store.iter_chunks(cid)) == data
    assert store.stat(cid).size == size


def test_put_stream_file_and_chunks_agree(store, tmp_path):
    data = payload(2 * CHUNK + 5)
    f = tmp_path / "f.bin"
    f.write_bytes(data)
    pieces = [data[i : i + 1000] for i in range(0, len(data), 1000)]
    a = store.put_file(f)
    b = store.put_stream(io.BytesIO(data))
    c = store.put_chunks(pieces)
    assert a == b == c == cid_of_bytes(data)


def test_get_file_writes_the_blob(store, tmp_path):
    data = payload(CHUNK + 3)
    cid = store.put_bytes(data, pin=True)
    out = store.get_file(cid, tmp_path / "out" / "x.bin")
    assert out.read_bytes() == data
    assert [p.name for p in out.parent.iterdir()] == ["x.bin"]  # no temporary left behind


def test_missing_blob_is_not_found(store):
    cid = cid_of_bytes(b"never added to any store " + os.urandom(8))
    assert not store.has(cid)
    with pytest.raises(NotFound):
        store.stat(cid)


def test_read_size_limit(store):
    cid = store.put_bytes(payload(10_000), pin=True)
    with pytest.raises(MessageTooLarge, match="limit"):
        store.get_bytes(cid, max_bytes=9_999)
    assert len(store.get_bytes(cid, max_bytes=10_000)) == 10_000


def test_pin_unpin_gc_list(store):
    keep = store.put_bytes(b"keep me", pin=True)
    drop = store.put_bytes(b"drop me", pin=False)
    listed = {info.cid: info for info in store.list()}
    assert listed[keep].pinned
    # Kubo reports removed blocks by their multihash (as raw CIDv1): compare digests.
    removed = {c.digest for c in store.gc()}
    assert drop.digest in removed and keep.digest not in removed
    assert store.has(keep) and not store.has(drop)
    store.unpin(keep)
    store.unpin(keep)  # unpinning twice is a no-op
    assert not store.stat(keep).pinned
    store.gc()
    assert not store.has(keep)


def test_pin_of_absent_blob_is_not_found(store):
    with pytest.raises(NotFound):
        store.pin(cid_of_bytes(b"absent " + os.urandom(8)))


# ------------------------------------------------ LocalStore only: bytes at rest


def corrupt(store: LocalStore, cid) -> None:
    path = store.path_of(cid)
    path.chmod(0o644)
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("size", [10, 3 * CHUNK])
def test_local_story_a_bit_rots_on_disk(tmp_path, size):
    """A disk flips one bit of a stored blob: every read path refuses it, naming CID and path."""
    store = LocalStore(tmp_path / "store")
    cid = store.put_bytes(payload(size), pin=True)
    corrupt(store, cid)
    for read in (
        lambda: store.get_bytes(cid),
        lambda: list(store.iter_chunks(cid)),
        lambda: store.get_file(cid, tmp_path / "out.bin"),
    ):
        with pytest.raises(IntegrityError) as info:
            read()
        assert str(cid) in str(info.value) and str(store.path_of(cid)) in str(info.value)
    assert not (tmp_path / "out.bin").exists()


def test_local_stream_of_a_corrupted_blob_yields_nothing(tmp_path):
    store = LocalStore(tmp_path / "store")
    cid = store.put_bytes(payload(3 * CHUNK), pin=True)
    corrupt(store, cid)
    got = []
    with pytest.raises(IntegrityError):
        for block in store.iter_chunks(cid):
            got.append(block)
    assert got == []


def test_local_failed_put_leaves_nothing(tmp_path):
    store = LocalStore(tmp_path / "store")

    def chunks():
        yield b"x" * 1000
        raise OSError("source went away")

    with pytest.raises(OSError):
        store.put_chunks(chunks())
    assert list(store.list()) == []
    assert list((tmp_path / "store" / "tmp").iterdir()) == []
