"""A real IPFS HTTP RPC server for the tests: an offline js-ipfs node (tests/storage/ipfsd/).

Kubo's Go daemon cannot be installed on the project's machines (see
shared/FACTS.md, IPFS); js-ipfs 0.66.1 (ipfs-core 0.18.1 + ipfs-http-server
0.15.1) serves the same ``/api/v0`` over HTTP. Use::

    with running_ipfs(tmp_path) as url:   # url == "kubo:http://127.0.0.1:PORT"
        store = KuboStore(url)

The node runs offline (no libp2p, no bootstrap, no MDNS, no preload), keeps its
repo under ``tmp_path``, and is killed with its whole process group on exit.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import httpx

IPFSD = Path(__file__).with_name("ipfsd")
INSTALL = f"npm ci --prefix {IPFSD.relative_to(Path(__file__).parents[2])}"
START_TIMEOUT = 60.0  # a cold start (repo init, ES module loading) takes ~5-10 s on 2 cores


class IpfsdMissing(RuntimeError):
    """js-ipfs is not installed for the tests."""


def ensure_installed() -> None:
    if shutil.which("node") is None:
        raise IpfsdMissing("the js-ipfs test daemon needs Node.js (v20): install `node` and `npm`")
    if not all((IPFSD / "node_modules" / pkg).is_dir() for pkg in ("ipfs-core", "ipfs-http-server")):
        raise IpfsdMissing(
            f"js-ipfs is not installed for the tests: run `{INSTALL}` "
            "(or `make setup`) in the repository root"
        )


@contextlib.contextmanager
def running_ipfs(tmp_path: Path) -> Iterator[str]:
    """Start an offline js-ipfs daemon; yield its store URL; kill it at the end."""
    ensure_installed()
    repo = Path(tempfile.mkdtemp(prefix="ipfs-repo-", dir=tmp_path))
    log = (tmp_path / f"{repo.name}.log").open("w+b")
    # Port 0: the daemon binds a free port and prints it, so no race over a picked port.
    proc = subprocess.Popen(
        ["node", str(IPFSD / "daemon.mjs"), str(repo), "0"],
        stdin=subprocess.PIPE,  # closed when this process dies: the daemon then exits too
        stdout=subprocess.PIPE,
        stderr=log,
        start_new_session=True,  # its own process group, killed whole at the end
    )
    try:
        api = _wait_ready(proc, log)
        yield f"kubo:{api}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                pipe.close()
        log.close()


def _wait_ready(proc: subprocess.Popen[bytes], log: IO[bytes]) -> str:
    """The API URL once ``/api/v0/version`` answers; RuntimeError with the daemon's log otherwise."""
    deadline = time.monotonic() + START_TIMEOUT
    assert proc.stdout is not None
    # The daemon prints `API http://…` once its server listens; wait for it, but not past the deadline.
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout=START_TIMEOUT):
            raise RuntimeError(f"js-ipfs daemon printed no address in {START_TIMEOUT:.0f} s\n{_tail(log)}")
    line = proc.stdout.readline().decode().strip()
    if not line.startswith("API "):
        raise RuntimeError(f"js-ipfs daemon did not start (exit {proc.poll()}): {line!r}\n{_tail(log)}")
    api = line.removeprefix("API ")
    while True:
        try:
            if httpx.post(f"{api}/api/v0/version", timeout=2.0).status_code == 200:
                return api
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"js-ipfs API at {api} did not answer in {START_TIMEOUT:.0f} s\n{_tail(log)}")
        time.sleep(0.05)


def _tail(log: IO[bytes]) -> str:
    log.flush()
    log.seek(0)
    return log.read().decode(errors="replace")[-4000:]
