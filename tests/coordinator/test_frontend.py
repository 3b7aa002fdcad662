"""Front-end processes: heartbeats answered in another OS process, every other call forwarded.

A real coordinator (``frontends: 1``) runs in this process; its front-end, a
separate OS process, serves the coordinator's main port in its place. The
stories talk to one more front-end of their own, on a port of its own and
pointed at the same coordinator, so that they can stop or kill the
coordinator's front-end without losing theirs.
"""

from __future__ import annotations

import os
import signal
import socket

import grpc
import pytest

from coordinator.frontend import FrontendProcess
from coordinator.server import CoordinatorConfig, RunningCoordinator, init
from protocol import panal_pb2 as pb
from protocol import tls
from protocol.client import Client, HeartbeatStream
from protocol.envelope import seal
from protocol.identity import Identity
from tests.coordinator.test_rounds_stories import FakeNode, wait_for


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def fleet(tmp_path):
    home = tmp_path / "coord"
    init(
        home,
        hostnames=["localhost", "127.0.0.1"],
        port=0,
        enroll_port=0,
        metrics_port=0,
        heartbeat_timeout_s=3,
        frontends=1,
    )
    running = RunningCoordinator(CoordinatorConfig.load(home), tick_s=0.1).start()
    port = free_port()
    own = FrontendProcess(home, f"127.0.0.1:{port}", running.primary_address).start()
    ca_pem = (home / "ca.pem").read_bytes()
    admin_cert = tls.load(home / "admin.pem", home / "admin-tls.key")
    ctx = {"home": home, "running": running, "port": port, "own": own, "ca_pem": ca_pem, "clients": []}
    # The admin speaks to the front-end: its calls are forwarded.
    ctx["admin"] = client(ctx, Identity.load(home / "admin.key"), admin_cert)
    yield ctx
    for c in ctx["clients"]:
        c.close()
    own.stop(grace=0)
    running.stop(grace=0)


def client(ctx, identity, cert, port=None):
    c = Client(f"localhost:{port or ctx['port']}", identity, ca_pem=ctx["ca_pem"], cert=cert)
    ctx["clients"].append(c)
    return c


def admin(ctx, method, body):
    return ctx["admin"].call(ctx["admin"].admin, method, body)


def enroll(ctx, pool="pool-a"):
    """Enroll (on the coordinator's enrollment port) and connect to the test's own front-end."""
    token = admin(
        ctx, "CreateEnrollmentToken", pb.CreateEnrollmentTokenRequest(pool=pool, ttl_seconds=600)
    ).token
    ident = Identity.generate()
    csr, key = tls.make_csr(ident.fingerprint)
    with Client(f"localhost:{ctx['running'].enroll_port}", ident, ca_pem=ctx["ca_pem"]) as c:
        reply = c.call(c.node, "Enroll", pb.EnrollRequest(token=token, pool=pool, name="n", csr_pem=csr))
    node = FakeNode(ident, pool, tls.CertKey(reply.certificate_pem, key), ctx["ca_pem"])
    node.client = client(ctx, ident, node.cert)
    return node


def listed(ctx, node):
    rows = {n.node_id: n for n in admin(ctx, "ListNodes", pb.ListNodesRequest()).nodes}
    return rows[node.identity.fingerprint]


def heartbeats_counted(ctx):
    return ctx["running"].metrics.heartbeats._value.get()


def test_a_front_end_answers_heartbeats_and_the_coordinator_sees_them(fleet):
    node = enroll(fleet)
    before = heartbeats_counted(fleet)
    reply = node.call("Heartbeat", pb.HeartbeatRequest(state=pb.NODE_STATE_TRAINING, step=41, loss=3.5))
    assert reply.server_time_ms > 0 and not reply.assignment_changed
    # Written back within a second, taken in by the coordinator's next tick.
    state = fleet["running"].coordinator.state
    wait_for(
        lambda: state.node(node.identity.fingerprint).status.get("step") == 41,
        what="the front-end's heartbeat at the coordinator",
    )
    assert state.node(node.identity.fingerprint).status["loss"] == 3.5
    assert listed(fleet, node).last_heartbeat_ms >= reply.server_time_ms - 1000  # `panal admin nodes`
    wait_for(lambda: heartbeats_counted(fleet) >= before + 1, what="the heartbeat counted in the metrics")
    # The daemon's way: heartbeats on one long-lived stream, answered here as well.
    stream = HeartbeatStream(node.client)
    for step in (42, 43):
        assert not stream.beat(
            pb.HeartbeatRequest(state=pb.NODE_STATE_TRAINING, step=step)
        ).assignment_changed
    stream.close()
    wait_for(lambda: state.node(node.identity.fingerprint).status.get("step") == 43, what="the streamed beat")
    # Forwarded calls answer as the coordinator does.
    got = node.call("GetAssignment", pb.GetAssignmentRequest())
    assert not got.has_assignment and got.reason
    assert admin(fleet, "Status", pb.StatusRequest()).job_state == ""


def test_a_front_end_refuses_what_the_coordinator_refuses(fleet):
    node, other = enroll(fleet), enroll(fleet)
    env = seal(node.identity, pb.HeartbeatRequest(step=1))
    node.client.node.Heartbeat(env, timeout=10)
    with pytest.raises(grpc.RpcError) as info:  # the same envelope again
        node.client.node.Heartbeat(env, timeout=10)
    assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS and "ReplayError" in info.value.details()

    tampered = seal(node.identity, pb.HeartbeatRequest(step=2))
    tampered.signature = bytes(64)
    with pytest.raises(grpc.RpcError) as info:
        node.client.node.Heartbeat(tampered, timeout=10)
    assert "SignatureError" in info.value.details() or "IntegrityError" in info.value.details()

    # Another node's envelope on this node's connection: refused here for a heartbeat, and by the
    # coordinator (from the forwarded certificate name) for a forwarded call.
    for method, body in (("Heartbeat", pb.HeartbeatRequest()), ("GetAssignment", pb.GetAssignmentRequest())):
        with pytest.raises(grpc.RpcError) as info:
            getattr(node.client.node, method)(seal(other.identity, body), timeout=10)
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED, method
        assert "client certificate is for" in info.value.details()
    # On a stream (other's key, node's certificate): the stream ends with the same refusal.
    stream = HeartbeatStream(client(fleet, other.identity, node.cert))
    with pytest.raises(grpc.RpcError) as info:
        stream.beat(pb.HeartbeatRequest())
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    stream.close()
    node.call("Heartbeat", pb.HeartbeatRequest())  # the front-end goes on serving


def test_a_front_end_follows_the_coordinator_s_evictions_and_lost_nodes(fleet):
    lost, evicted = enroll(fleet), enroll(fleet)
    evicted.call("Heartbeat", pb.HeartbeatRequest())  # its row is now cached in the front-end
    assert admin(
        fleet, "EvictNode", pb.EvictNodeRequest(node_id=evicted.identity.fingerprint, reason="test")
    ).evicted

    def refused():
        try:
            evicted.call("Heartbeat", pb.HeartbeatRequest())
        except grpc.RpcError as e:
            return e

    # The front-end sees the coordinator's writes within milliseconds (State's data_version poll).
    error = wait_for(refused, timeout=5, what="the evicted node's heartbeat refused")
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED and "evicted" in error.details()

    # Silent past the 3 s timeout: lost. Its next heartbeat goes to the coordinator, which takes it back.
    state = fleet["running"].coordinator.state
    wait_for(lambda: state.node(lost.identity.fingerprint).state == "lost", timeout=30, what="the node lost")
    stream = HeartbeatStream(lost.client)  # forwarded from a stream as a unary Heartbeat
    stream.beat(pb.HeartbeatRequest())
    stream.close()
    assert state.node(lost.identity.fingerprint).state == "active"


def test_the_coordinator_starts_watches_and_stops_its_front_ends(fleet):
    running = fleet["running"]
    (frontend,) = running.frontends
    first = frontend.pid
    assert frontend.exited() is None and first in running.pids
    # The front-end serves the coordinator's main port; the coordinator process itself does not.
    node = enroll(fleet)
    for _ in range(8):
        c = client(fleet, node.identity, node.cert, port=running.port)
        c.call(c.node, "Heartbeat", pb.HeartbeatRequest())
    os.kill(first, signal.SIGKILL)
    wait_for(
        lambda: frontend.pid != first and frontend.ready, timeout=30, what="a restarted front-end serving"
    )
    c = client(fleet, node.identity, node.cert, port=running.port)  # the same port, served again
    assert c.call(c.node, "Heartbeat", pb.HeartbeatRequest()).server_time_ms > 0
    running.stop(grace=0)
    assert frontend.exited() is not None
    assert not os.path.exists(running.primary_address.removeprefix("unix:"))


def test_frontends_must_be_a_small_whole_number(tmp_path):
    home = tmp_path / "coord"
    init(home, hostnames=["localhost"], port=0, enroll_port=0, metrics_port=0)
    config = CoordinatorConfig.load(home)
    config.frontends = -1
    config.save()
    with pytest.raises(ValueError, match="frontends must be a whole number from 0 to 64"):
        CoordinatorConfig.load(home)
