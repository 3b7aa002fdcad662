"""A size limit for every message kind, and the table of RPC methods that carry them.

The server refuses a request over its method's limit before parsing it
(``MessageTooLarge``); gRPC's own cap (``server_options``) sits just above
the largest limit so nothing bigger is even buffered.
"""

from __future__ import annotations

from dataclasses import dataclass

from google.protobuf.message import Message

from protocol import panal_pb2 as pb

KiB = 1024
MiB = 1024 * KiB

# Room for the envelope's own fields around the body: kind and job (256 B
# each at most), sender, timestamp, nonce, digest, signature, tags.
ENVELOPE_OVERHEAD = 2 * KiB

# The most a reply may be; a status table of 10k nodes fits well inside.
MAX_REPLY_BYTES = 32 * MiB


@dataclass(frozen=True)
class MethodSpec:
    service: str
    name: str
    body: type[Message]
    max_body_bytes: int
    # Enroll is the only call made before the node holds a client certificate.
    needs_client_certificate: bool = True

    @property
    def path(self) -> str:
        return f"/panal.v1.{self.service}/{self.name}"

    @property
    def max_request_bytes(self) -> int:
        return self.max_body_bytes + ENVELOPE_OVERHEAD


_SPECS = (
    MethodSpec("NodeService", "Enroll", pb.EnrollRequest, 64 * KiB, needs_client_certificate=False),
    MethodSpec("NodeService", "Heartbeat", pb.HeartbeatRequest, 16 * KiB),
    MethodSpec("NodeService", "GetAssignment", pb.GetAssignmentRequest, 1 * KiB),
    MethodSpec("NodeService", "SubmitUpdate", pb.SubmitUpdateRequest, 16 * KiB),
    MethodSpec("NodeService", "GetRoundResult", pb.GetRoundResultRequest, 1 * KiB),
    MethodSpec("AdminService", "Status", pb.StatusRequest, 1 * KiB),
    MethodSpec("AdminService", "ListNodes", pb.ListNodesRequest, 1 * KiB),
    MethodSpec("AdminService", "CreateEnrollmentToken", pb.CreateEnrollmentTokenRequest, 4 * KiB),
    MethodSpec("AdminService", "SubmitJob", pb.SubmitJobRequest, 1 * MiB),
    MethodSpec("AdminService", "GetJob", pb.GetJobRequest, 4 * KiB),
    MethodSpec("AdminService", "ListRounds", pb.ListRoundsRequest, 4 * KiB),
    MethodSpec("AdminService", "EvictNode", pb.EvictNodeRequest, 4 * KiB),
    MethodSpec("AdminService", "ReadmitNode", pb.ReadmitNodeRequest, 4 * KiB),
)

METHODS: dict[str, MethodSpec] = {spec.path: spec for spec in _SPECS}
# Streaming methods -> the unary method whose checks and limit each of their messages gets.
STREAMS: dict[str, MethodSpec] = {
    "/panal.v1.NodeService/HeartbeatStream": METHODS["/panal.v1.NodeService/Heartbeat"],
}
MAX_REQUEST_BYTES = max(spec.max_request_bytes for spec in _SPECS)


def server_options() -> list[tuple[str, int]]:
    """gRPC server options: buffer nothing larger than the largest method allows."""
    return [
        ("grpc.max_receive_message_length", MAX_REQUEST_BYTES),
        ("grpc.max_send_message_length", MAX_REPLY_BYTES),
    ]


def channel_options() -> list[tuple[str, int]]:
    """gRPC channel options for clients: replies are capped too.

    HTTP/2 BDP probing is off, as on the server (protocol.server.SERVER_TUNING): it
    pings after received data to grow a receive window for bulk transfers, which
    panal's calls are not (blobs travel through the store). A node's heartbeat
    stream then costs it and the coordinator's front-end about a quarter less CPU
    (one comparison under bench/coordinator.py's load, probing on and off).
    """
    return [
        ("grpc.max_receive_message_length", MAX_REPLY_BYTES),
        ("grpc.max_send_message_length", MAX_REQUEST_BYTES),
        ("grpc.http2.bdp_probe", 0),
    ]
