"""Several OS processes write to one LocalStore at once: every blob lands whole, once."""

import subprocess
import sys
import textwrap

from storage.cid import cid_of_bytes
from storage.local import LocalStore

WRITER = textwrap.dedent(
    """
    import random, sys
    from storage.local import LocalStore
    store = LocalStore(sys.argv[1])
    me = int(sys.argv[2])
    for i in range(20):
        shared = random.Random(i).randbytes(300_000)          # every writer adds these
        own = random.Random(1000 * me + i).randbytes(5_000)   # only this writer
        store.put_bytes(shared, pin=True)
        store.put_bytes(own, pin=(i % 2 == 0))
    """
)


def test_concurrent_writers_from_separate_processes(tmp_path):
    root = tmp_path / "store"
    LocalStore(root)
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(root), str(w)]) for w in range(4)]
    try:
        for p in procs:
            assert p.wait(timeout=120) == 0
    finally:
        for p in procs:
            p.kill()
    import random

    store = LocalStore(root)
    expected = {cid_of_bytes(random.Random(i).randbytes(300_000)) for i in range(20)}
    expected |= {
        cid_of_bytes(random.Random(1000 * w + i).randbytes(5_000)) for w in range(4) for i in range(20)
    }
    held = {info.cid for info in store.list()}
    assert held == expected
    for cid in held:
        store.get_bytes(cid)  # verifies
    assert list((root / "tmp").iterdir()) == []
