"""The gRPC servicers: decode, call the coordinator, encode. Nothing else.

The interceptor (protocol/server.py) has already verified the envelope and the
sender's rights; it maps trust-layer errors to status codes. The one table
below maps the coordinator's own domain errors.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import grpc

from coordinator import views
from coordinator.core import Coordinator
from coordinator.job import JobSpecError
from model.config import ModelConfigError
from protocol import panal_pb2 as pb
from protocol import panal_pb2_grpc as pb_grpc
from protocol.envelope import Verified

log = logging.getLogger("panal.coordinator")

# Domain errors that are not the trust layer's (those the interceptor maps).
STATUS: tuple[tuple[type[Exception], grpc.StatusCode], ...] = (
    (JobSpecError, grpc.StatusCode.INVALID_ARGUMENT),
    (ModelConfigError, grpc.StatusCode.INVALID_ARGUMENT),
)

F = TypeVar("F", bound=Callable[..., Any])


def mapped(fn: F) -> F:
    @functools.wraps(fn)
    def wrapper(self: Any, verified: Verified, context: grpc.ServicerContext) -> Any:
        try:
            return fn(self, verified, context)
        except tuple(cls for cls, _ in STATUS) as e:
            code = next(code for cls, code in STATUS if isinstance(e, cls))
            context.abort(code, f"{type(e).__name__}: {e}")

    return wrapper  # type: ignore[return-value]


class NodeService(pb_grpc.NodeServiceServicer):  # type: ignore[misc]
    def __init__(self, coordinator: Coordinator) -> None:
        self.c = coordinator

    @mapped
    def Enroll(self, verified: Verified, context: grpc.ServicerContext) -> pb.EnrollReply:
        return self.c.enroll(verified)

    @mapped
    def Heartbeat(self, verified: Verified, context: grpc.ServicerContext) -> pb.HeartbeatReply:
        return self.c.heartbeat(verified)

    def HeartbeatStream(
        self, verified: Iterator[Verified], context: grpc.ServicerContext
    ) -> Iterator[pb.HeartbeatReply]:
        for v in verified:  # each checked by the interceptor as a Heartbeat
            yield self.c.heartbeat(v)

    @mapped
    def GetAssignment(self, verified: Verified, context: grpc.ServicerContext) -> pb.GetAssignmentReply:
        return self.c.assignment(verified.sender_id)

    @mapped
    def SubmitUpdate(self, verified: Verified, context: grpc.ServicerContext) -> pb.SubmitUpdateReply:
        return self.c.submit_update(verified)

    @mapped
    def GetRoundResult(self, verified: Verified, context: grpc.ServicerContext) -> pb.GetRoundResultReply:
        return self.c.round_result(verified)


class AdminService(pb_grpc.AdminServiceServicer):  # type: ignore[misc]
    def __init__(self, coordinator: Coordinator) -> None:
        self.c = coordinator

    @mapped
    def Status(self, verified: Verified, context: grpc.ServicerContext) -> pb.StatusReply:
        return views.status(self.c)

    @mapped
    def ListNodes(self, verified: Verified, context: grpc.ServicerContext) -> pb.ListNodesReply:
        return views.nodes(self.c)

    @mapped
    def CreateEnrollmentToken(
        self, verified: Verified, context: grpc.ServicerContext
    ) -> pb.CreateEnrollmentTokenReply:
        body: pb.CreateEnrollmentTokenRequest = verified.body  # type: ignore[assignment]
        token, expires = self.c.create_token(body.pool, body.ttl_seconds or 3600)
        return pb.CreateEnrollmentTokenReply(token=token, expires_at_ms=expires)

    @mapped
    def SubmitJob(self, verified: Verified, context: grpc.ServicerContext) -> pb.SubmitJobReply:
        body: pb.SubmitJobRequest = verified.body  # type: ignore[assignment]
        return pb.SubmitJobReply(job=self.c.submit_job(body.spec_yaml))

    @mapped
    def GetJob(self, verified: Verified, context: grpc.ServicerContext) -> pb.GetJobReply:
        body: pb.GetJobRequest = verified.body  # type: ignore[assignment]
        return views.job_status(self.c, body.job)

    @mapped
    def ListRounds(self, verified: Verified, context: grpc.ServicerContext) -> pb.ListRoundsReply:
        body: pb.ListRoundsRequest = verified.body  # type: ignore[assignment]
        return views.rounds(self.c, body.job, body.limit or 100)

    @mapped
    def EvictNode(self, verified: Verified, context: grpc.ServicerContext) -> pb.EvictNodeReply:
        body: pb.EvictNodeRequest = verified.body  # type: ignore[assignment]
        return pb.EvictNodeReply(evicted=self.c.evict(body.node_id, body.reason or "no reason given"))

    @mapped
    def ReadmitNode(self, verified: Verified, context: grpc.ServicerContext) -> pb.ReadmitNodeReply:
        body: pb.ReadmitNodeRequest = verified.body  # type: ignore[assignment]
        return pb.ReadmitNodeReply(readmitted=self.c.readmit(body.node_id, body.reason or "no reason given"))
