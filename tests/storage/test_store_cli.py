"""`panal store` as a newcomer uses it: the real command in a subprocess, a local store."""

import os
import subprocess
import sys

import pytest

from storage.cid import cid_of_file
from storage.errors import StoreError
from storage.local import LocalStore
from storage.stores import open_store


def panal(*args, store, check=True, input=None):
    env = {**os.environ, "PANAL_STORE": f"local:{store}", "COLUMNS": "200"}
    proc = subprocess.run(
        [sys.executable, "-m", "panal.cli", "store", *args],
        capture_output=True,
        env=env,
        timeout=120,
        input=input,
    )
    if check and proc.returncode != 0:
        raise AssertionError(proc.stderr.decode() + proc.stdout.decode())
    return proc


def test_add_cat_get_verify_pin_gc(tmp_path):
    store = tmp_path / "store"
    f = tmp_path / "hello.txt"
    f.write_bytes(b"hello\n")
    added = panal("add", str(f), store=store).stdout.decode().strip().splitlines()[-1]
    assert added == "QmZULkCELmmk5XNfCgTnCyFgAVxBRBXyDHGGMVoLFLiXEN"  # what `ipfs add` prints
    assert panal("cid", str(f), store=store).stdout.decode() == added + "\n"
    assert panal("cid", str(f), "--cid-version", "1", store=store).stdout.decode().startswith("bafk")
    assert panal("cat", added, store=store).stdout == b"hello\n"
    panal("get", added, "-o", str(tmp_path / "back.txt"), store=store)
    assert (tmp_path / "back.txt").read_bytes() == b"hello\n"
    assert "all 1 blobs verified" in panal("verify", added, store=store).stdout.decode()
    assert added in panal("ls", store=store).stdout.decode()
    panal("unpin", added, store=store)
    assert added in panal("gc", store=store).stdout.decode()
    missing = panal("cat", added, store=store, check=False)
    assert missing.returncode == 1 and b"not in local:" in missing.stderr


def test_verify_fails_with_exit_1_on_corruption(tmp_path):
    store = tmp_path / "store"
    f = tmp_path / "data.bin"
    f.write_bytes(os.urandom(5000))
    cid = panal("add", str(f), store=store).stdout.decode().split()[-1]
    path = LocalStore(store).path_of(cid)
    path.chmod(0o644)
    path.write_bytes(b"tampered")
    proc = panal("verify", cid, store=store, check=False)
    assert proc.returncode == 1 and "FAIL" in proc.stdout.decode()
    cat = panal("cat", cid, store=store, check=False)
    assert cat.returncode == 1 and cat.stdout == b"" and b"corrupted" in cat.stderr


def test_bad_cid_and_bad_store_url(tmp_path):
    proc = panal("cat", "QmNope", store=tmp_path / "s", check=False)
    assert proc.returncode == 2 and b"is not a CID" in proc.stderr
    with pytest.raises(StoreError, match="unknown store scheme"):
        open_store("s3:bucket")
    with pytest.raises(StoreError, match="no scheme"):
        open_store("/just/a/path")


def test_cid_command_matches_library_on_multi_chunk_file(tmp_path):
    f = tmp_path / "big.bin"
    f.write_bytes(os.urandom(3 * 262_144 + 5))
    out = panal("cid", str(f), store=tmp_path / "s").stdout.decode().strip()
    assert out == str(cid_of_file(f))
