"""The front-ends' link to the coordinator process (coordinator/relay.py), on a real Unix socket.

A RelayServer (threads, as in the coordinator) serves gRPC method handlers
built here; a RelayClient (asyncio, as in a front-end) calls it. The
coordinator's own handlers behind the link are exercised by
tests/coordinator/test_frontend.py.
"""

from __future__ import annotations

import asyncio
import os
import socket
import stat
import struct
import threading

import grpc
import pytest

from coordinator.relay import MAX_CALL_FRAME, RelayClient, RelayError, RelayServer

ECHO = "/panal.v1.NodeService/GetAssignment"  # any served path: the handlers are the test's
ABORT = "/panal.v1.NodeService/SubmitUpdate"
CRASH = "/panal.v1.NodeService/GetRoundResult"
BLOCK = "/panal.v1.AdminService/Status"


@pytest.fixture
def relay(tmp_path):
    release = threading.Event()

    def echo(raw, context):
        cn = dict(context.invocation_metadata())["panal-forwarded-cn"]
        return cn.encode() + b":" + raw[::-1]

    def abort(raw, context):
        context.abort(grpc.StatusCode.PERMISSION_DENIED, "NotAuthorized: not yours")

    def crash(raw, context):
        raise RuntimeError("a bug")

    def block(raw, context):
        release.wait(30)
        return b"late"

    handlers = {
        path: grpc.unary_unary_rpc_method_handler(fn)
        for path, fn in [(ECHO, echo), (ABORT, abort), (CRASH, crash), (BLOCK, block)]
    }
    path = str(tmp_path / "coordinator.sock")
    server = RelayServer(path, handlers, max_workers=8).start()
    yield {"path": path, "server": server, "handlers": handlers, "release": release}
    release.set()
    server.stop(grace=0)


def run(coro, timeout=60):
    async def bounded():
        return await asyncio.wait_for(coro, timeout)  # a lost reply fails the test instead of hanging it

    return asyncio.run(bounded())


async def call(client, method, data=b"", timeout=10.0, cn="node-1"):
    return await client.call(method, data, client_cn=cn, peer="ipv4:127.0.0.1:1", timeout=timeout)


def test_every_call_gets_its_own_reply_with_many_in_flight(relay):
    async def go():
        client = RelayClient(relay["path"])
        try:
            replies = await asyncio.gather(
                *(call(client, ECHO, f"call {i}".encode(), cn=f"n{i % 7}") for i in range(2000))
            )
        finally:
            await client.close()
        return replies

    replies = run(go())
    assert replies == [f"n{i % 7}:".encode() + f"call {i}".encode()[::-1] for i in range(2000)]
    assert stat.S_IMODE(os.stat(relay["path"]).st_mode) == 0o600


def test_a_call_ends_with_the_status_its_handler_gave(relay):
    async def go():
        client = RelayClient(relay["path"])
        errors = []
        for method in (ABORT, CRASH, "/panal.v1.NodeService/NoSuchMethod"):
            with pytest.raises(RelayError) as e:
                await call(client, method)
            errors.append((e.value.code, e.value.details))
        assert await call(client, ECHO, b"ab") == b"node-1:ba"  # the link still serves
        await client.close()
        return errors

    (denied, crashed, unknown) = run(go())
    assert denied == (grpc.StatusCode.PERMISSION_DENIED, "NotAuthorized: not yours")
    assert crashed[0] == grpc.StatusCode.UNKNOWN and "a bug" in crashed[1]
    assert unknown[0] == grpc.StatusCode.UNIMPLEMENTED and "NoSuchMethod" in unknown[1]


def test_a_call_past_its_deadline_ends_and_others_go_on(relay):
    async def go():
        client = RelayClient(relay["path"])
        with pytest.raises(RelayError) as e:
            await call(client, BLOCK, timeout=0.2)
        assert e.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert await call(client, ECHO, b"x") == b"node-1:x"
        relay["release"].set()  # the late reply arrives for a call nobody waits on: dropped
        assert await call(client, BLOCK) == b"late"
        await client.close()

    run(go())


def test_a_bad_frame_ends_only_its_own_link(relay):
    """Over the bound, or not a RelayCall: that connection is closed; the server serves the others."""
    for bad in (struct.pack(">I", MAX_CALL_FRAME + 1), struct.pack(">I", 3) + b"\xff\xff\xff"):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as raw:
            raw.settimeout(10)
            raw.connect(relay["path"])
            raw.sendall(bad)
            assert raw.recv(1) == b""  # closed by the server
    client = RelayClient(relay["path"])
    assert run(call(client, ECHO, b"ok")) == b"node-1:ko"


def test_the_client_reports_a_coordinator_away_and_reconnects_when_it_is_back(relay, tmp_path):
    async def go():
        client = RelayClient(relay["path"])
        assert await call(client, ECHO, b"1") == b"node-1:1"
        relay["server"].stop(grace=0)
        with pytest.raises(RelayError) as e:
            await call(client, ECHO, b"2")
        assert e.value.code == grpc.StatusCode.UNAVAILABLE
        restarted = RelayServer(relay["path"], relay["handlers"]).start()
        try:
            assert await call(client, ECHO, b"3") == b"node-1:3"
        finally:
            await client.close()
            restarted.stop(grace=0)

    run(go())
