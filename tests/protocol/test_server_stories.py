"""Attack stories against a real gRPC server on loopback with mTLS.

Each story ends in a specific error, and after it an honest node's call still
succeeds: the server keeps serving. The servicer here is a minimal one written
for the test (the coordinator's servicers come later); what is under test is
the real interceptor, real TLS and real envelopes.
"""

from __future__ import annotations

import queue
import time

import grpc
import pytest

from protocol import panal_pb2 as pb
from protocol import panal_pb2_grpc as pb_grpc
from protocol import tls
from protocol.envelope import seal, signed_bytes
from protocol.identity import Identity
from protocol.limits import METHODS, channel_options
from protocol.replay import ReplayGuard
from protocol.server import EnvelopeInterceptor, build_server

JOB, ROUND = "job-1", 3
TIMEOUT = 10
MAX_STREAMS = 2


class EchoNodeService(pb_grpc.NodeServiceServicer):
    """Answers with what it verified, so the test sees the sender and body as the server did."""

    def __init__(self) -> None:
        self.updates: list[tuple[str, str]] = []

    def Heartbeat(self, verified, context):
        return pb.HeartbeatReply(
            server_time_ms=int(time.time() * 1000),
            message=f"{verified.sender_id}:{verified.body.step}",
        )

    def HeartbeatStream(self, verified, context):
        for v in verified:
            yield pb.HeartbeatReply(message=f"{v.sender_id}:{v.body.step}")

    def SubmitUpdate(self, verified, context):
        self.updates.append((verified.sender_id, verified.body.blob_cid))
        return pb.SubmitUpdateReply(status=pb.UPDATE_STATUS_ACCEPTED, update_id=str(len(self.updates)))


def expected_context(spec, env):
    # SubmitUpdate must be for the open round of the current job.
    return (JOB, ROUND) if spec.name == "SubmitUpdate" else (None, None)


@pytest.fixture(scope="module")
def pki():
    ca = tls.make_ca()
    node = Identity.generate()
    return {
        "ca": ca,
        "server": tls.make_server_cert(ca, ["localhost", "127.0.0.1"]),
        "node": node,
        "node_cert": tls.make_client_cert(ca, node.fingerprint),
    }


@pytest.fixture(scope="module")
def server(pki):
    servicer = EchoNodeService()
    interceptor = EnvelopeInterceptor(
        replay=ReplayGuard(window_ms=30_000), expected_context=expected_context, max_streams=MAX_STREAMS
    )
    srv = build_server(interceptor, max_workers=4)
    pb_grpc.add_NodeServiceServicer_to_server(servicer, srv)
    port = srv.add_secure_port("127.0.0.1:0", tls.server_credentials(pki["ca"].cert_pem, pki["server"]))
    srv.start()
    yield f"localhost:{port}", servicer
    srv.stop(grace=None).wait(TIMEOUT)


def channel(target, ca_pem, client):
    return grpc.secure_channel(target, tls.channel_credentials(ca_pem, client), options=channel_options())


@pytest.fixture
def node_stub(server, pki):
    target, _ = server
    with channel(target, pki["ca"].cert_pem, pki["node_cert"]) as ch:
        yield pb_grpc.NodeServiceStub(ch), ch


def raw_call(ch, method):
    """A call that sends bytes as given: how an attacker talks, skipping our serializer."""
    return ch.unary_unary(method, request_serializer=None, response_deserializer=pb.HeartbeatReply.FromString)


def assert_still_serving(stub, node):
    reply = stub.Heartbeat(seal(node, pb.HeartbeatRequest(step=42)), timeout=TIMEOUT)
    assert reply.message == f"{node.fingerprint}:42"


def assert_rejected(call, code, error_name):
    with pytest.raises(grpc.RpcError) as info:
        call()
    assert info.value.code() == code, info.value.details()
    assert info.value.details().startswith(f"{error_name}:"), info.value.details()
    return info.value.details()


def test_honest_node_is_served(node_stub, pki):
    stub, _ = node_stub
    assert_still_serving(stub, pki["node"])
    reply = stub.SubmitUpdate(
        seal(pki["node"], pb.SubmitUpdateRequest(pool="a", blob_cid="Qm1"), job=JOB, round=ROUND),
        timeout=TIMEOUT,
    )
    assert reply.status == pb.UPDATE_STATUS_ACCEPTED


def test_story_a_man_in_the_middle_flips_a_bit_in_the_payload(node_stub, pki):
    stub, _ = node_stub
    env = seal(pki["node"], pb.HeartbeatRequest(step=1))
    env.payload = bytes([env.payload[0] ^ 0x04]) + env.payload[1:]
    assert_rejected(lambda: stub.Heartbeat(env, timeout=TIMEOUT), grpc.StatusCode.DATA_LOSS, "IntegrityError")
    assert_still_serving(stub, pki["node"])


def test_story_an_envelope_signed_by_another_key(node_stub, pki):
    """Mallory rewrites an honest node's update and signs it with her own key."""
    stub, _ = node_stub
    env = seal(pki["node"], pb.SubmitUpdateRequest(blob_cid="QmEvil"), job=JOB, round=ROUND)
    env.signature = Identity.generate().sign(signed_bytes(env))
    assert_rejected(
        lambda: stub.SubmitUpdate(env, timeout=TIMEOUT), grpc.StatusCode.UNAUTHENTICATED, "SignatureError"
    )
    assert_still_serving(stub, pki["node"])


def test_story_a_recorded_update_is_replayed(node_stub, server, pki):
    stub, _ = node_stub
    _, servicer = server
    env = seal(pki["node"], pb.SubmitUpdateRequest(blob_cid="QmOnce"), job=JOB, round=ROUND)
    stub.SubmitUpdate(env, timeout=TIMEOUT)
    assert_rejected(
        lambda: stub.SubmitUpdate(env, timeout=TIMEOUT), grpc.StatusCode.ALREADY_EXISTS, "ReplayError"
    )
    assert [cid for _, cid in servicer.updates].count("QmOnce") == 1
    assert_still_serving(stub, pki["node"])


def test_story_an_envelope_from_outside_the_time_window(node_stub, pki):
    stub, _ = node_stub
    stale = seal(pki["node"], pb.HeartbeatRequest(step=1), timestamp_ms=int(time.time() * 1000) - 3_600_000)
    details = assert_rejected(
        lambda: stub.Heartbeat(stale, timeout=TIMEOUT), grpc.StatusCode.FAILED_PRECONDITION, "ClockSkewError"
    )
    assert "NTP" in details
    assert_still_serving(stub, pki["node"])


@pytest.mark.parametrize(("job", "round", "what"), [("job-1", 2, "round 2"), ("job-0", 3, "job 'job-0'")])
def test_story_an_update_for_another_round_or_job(node_stub, pki, job, round, what):
    stub, _ = node_stub
    env = seal(pki["node"], pb.SubmitUpdateRequest(blob_cid="QmOld"), job=job, round=round)
    details = assert_rejected(
        lambda: stub.SubmitUpdate(env, timeout=TIMEOUT),
        grpc.StatusCode.FAILED_PRECONDITION,
        "WrongContextError",
    )
    assert what in details
    assert_still_serving(stub, pki["node"])


def test_story_a_truncated_protobuf(node_stub, pki):
    stub, ch = node_stub
    raw = seal(pki["node"], pb.HeartbeatRequest(step=1, detail="x" * 100)).SerializeToString()
    call = raw_call(ch, METHODS["/panal.v1.NodeService/Heartbeat"].path)
    for cut in (len(raw) - 1, len(raw) // 2, 3):
        assert_rejected(
            lambda cut=cut: call(raw[:cut], timeout=TIMEOUT),
            grpc.StatusCode.INVALID_ARGUMENT,
            "MalformedMessage",
        )
    assert_still_serving(stub, pki["node"])


def test_story_an_oversized_message(node_stub, pki):
    stub, ch = node_stub
    # Over the Heartbeat limit (16 KiB) but under gRPC's cap: refused by the interceptor, unparsed.
    big = seal(pki["node"], pb.HeartbeatRequest(detail="x" * 40_000))
    assert_rejected(
        lambda: stub.Heartbeat(big, timeout=TIMEOUT), grpc.StatusCode.RESOURCE_EXHAUSTED, "MessageTooLarge"
    )
    # Over every limit: gRPC itself refuses to buffer it.
    call = raw_call(ch, "/panal.v1.NodeService/Heartbeat")
    with pytest.raises(grpc.RpcError) as info:
        call(b"\x00" * (8 * 1024 * 1024), timeout=TIMEOUT)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert_still_serving(stub, pki["node"])


def test_story_a_client_certificate_from_another_ca(server, pki, node_stub):
    """A node presents a certificate from its own CA: the TLS handshake fails, nothing is served."""
    target, _ = server
    rogue_ca = tls.make_ca("rogue CA")
    rogue = tls.make_client_cert(rogue_ca, pki["node"].fingerprint)
    with channel(target, pki["ca"].cert_pem, rogue) as ch:
        stub = pb_grpc.NodeServiceStub(ch)
        with pytest.raises(grpc.RpcError) as info:
            stub.Heartbeat(seal(pki["node"], pb.HeartbeatRequest(step=1)), timeout=TIMEOUT)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert_still_serving(node_stub[0], pki["node"])


def test_story_no_client_certificate(server, pki, node_stub):
    target, _ = server
    with channel(target, pki["ca"].cert_pem, None) as ch:
        with pytest.raises(grpc.RpcError) as info:
            pb_grpc.NodeServiceStub(ch).Heartbeat(seal(pki["node"], pb.HeartbeatRequest()), timeout=TIMEOUT)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert_still_serving(node_stub[0], pki["node"])


def test_story_a_stolen_certificate_with_another_signing_key(node_stub, pki):
    """Mallory holds the node's TLS certificate but not its Ed25519 key: envelopes she signs are refused."""
    stub, _ = node_stub
    mallory = Identity.generate()
    details = assert_rejected(
        lambda: stub.Heartbeat(seal(mallory, pb.HeartbeatRequest(step=1)), timeout=TIMEOUT),
        grpc.StatusCode.PERMISSION_DENIED,
        "NotAuthorized",
    )
    assert mallory.fingerprint in details
    assert_still_serving(stub, pki["node"])


def test_story_a_server_certificate_from_another_ca(server, pki):
    """A node refuses to talk to an impostor coordinator: its CA is pinned."""
    target, _ = server
    other_ca = tls.make_ca("impostor")
    with channel(target, other_ca.cert_pem, pki["node_cert"]) as ch:
        with pytest.raises(grpc.RpcError) as info:
            pb_grpc.NodeServiceStub(ch).Heartbeat(seal(pki["node"], pb.HeartbeatRequest()), timeout=TIMEOUT)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE


class OpenStream:
    """A heartbeat stream held open: send() one envelope, read its reply."""

    def __init__(self, stub):
        self.requests = queue.SimpleQueue()
        self.call = stub.HeartbeatStream(iter(self.requests.get, None), timeout=TIMEOUT)
        self.replies = iter(self.call)

    def send(self, env):
        self.requests.put(env)
        return next(self.replies)

    def close(self):
        self.requests.put(None)
        self.call.cancel()


def test_a_heartbeat_stream_checks_every_message_and_ends_at_the_first_bad_one(node_stub, pki):
    stub, _ = node_stub
    stream = OpenStream(stub)
    for step in (1, 2):
        assert stream.send(seal(pki["node"], pb.HeartbeatRequest(step=step))).message.endswith(f":{step}")
    env = seal(pki["node"], pb.HeartbeatRequest(step=3))
    env.payload = bytes([env.payload[0] ^ 0x04]) + env.payload[1:]
    assert_rejected(lambda: stream.send(env), grpc.StatusCode.DATA_LOSS, "IntegrityError")
    stream.close()
    # A replayed beat ends a stream too; a new stream is served.
    replayed = seal(pki["node"], pb.HeartbeatRequest(step=4))
    stream = OpenStream(stub)
    stream.send(replayed)
    assert_rejected(lambda: stream.send(replayed), grpc.StatusCode.ALREADY_EXISTS, "ReplayError")
    stream.close()
    assert OpenStream(stub).send(seal(pki["node"], pb.HeartbeatRequest(step=5))).message.endswith(":5")


def test_a_server_holds_at_most_max_streams_and_unary_calls_go_on(node_stub, pki):
    stub, _ = node_stub
    held = [OpenStream(stub) for _ in range(MAX_STREAMS)]
    for s in held:  # each now holds one of the server's threads
        s.send(seal(pki["node"], pb.HeartbeatRequest(step=1)))
    extra = OpenStream(stub)
    with pytest.raises(grpc.RpcError) as info:
        extra.send(seal(pki["node"], pb.HeartbeatRequest(step=1)))
    assert (
        info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "unary Heartbeat" in info.value.details()
    )
    assert_still_serving(stub, pki["node"])  # unary calls have threads of their own
    held.pop().close()

    def admitted():
        s = OpenStream(stub)
        try:
            return s.send(seal(pki["node"], pb.HeartbeatRequest(step=9))).message.endswith(":9")
        except grpc.RpcError:
            return False
        finally:
            s.close()

    deadline = time.monotonic() + TIMEOUT  # the closed stream's thread is released when its call ends
    while not admitted():
        assert time.monotonic() < deadline, "a closed stream's place was not given back"
    for s in held:
        s.close()
