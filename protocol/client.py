"""A client of the coordinator: every call sealed in a signed envelope, over (m)TLS."""

from __future__ import annotations

import queue
import threading
from typing import Any

import grpc
from google.protobuf.message import Message

from protocol import panal_pb2 as pb
from protocol import panal_pb2_grpc as pb_grpc
from protocol import tls
from protocol.envelope import seal
from protocol.identity import Identity
from protocol.limits import channel_options

DEFAULT_TIMEOUT_S = 30.0


class Client:
    """One channel to the coordinator. Without a client certificate only Enroll can succeed."""

    def __init__(
        self,
        target: str,
        identity: Identity,
        *,
        ca_pem: bytes,
        cert: tls.CertKey | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        self.target = target
        self.identity = identity
        self.timeout_s = timeout_s
        self.channel = grpc.secure_channel(
            target, tls.channel_credentials(ca_pem, cert), options=channel_options()
        )
        self.node = pb_grpc.NodeServiceStub(self.channel)
        self.admin = pb_grpc.AdminServiceStub(self.channel)

    def call(
        self,
        stub: Any,
        method: str,
        body: Message,
        *,
        job: str = "",
        round: int = 0,
        timeout_s: float | None = None,
    ) -> Any:
        """Seal ``body`` (fresh timestamp and nonce every time) and call ``stub.method``."""
        envelope = seal(self.identity, body, job=job, round=round)
        return getattr(stub, method)(envelope, timeout=timeout_s or self.timeout_s)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class HeartbeatStream:
    """A node's heartbeats on one long-lived HeartbeatStream call: ``beat()`` sends one, returns its reply.

    A reply that does not come within ``timeout_s`` cancels the call (``grpc.RpcError``,
    CANCELLED); after any error the stream is done: open a new one, or fall back to unary
    Heartbeat calls where the coordinator does not serve streams (UNIMPLEMENTED) or holds
    too many (RESOURCE_EXHAUSTED).
    """

    def __init__(self, client: Client) -> None:
        self.client = client
        self._requests: queue.SimpleQueue[pb.Envelope | None] = queue.SimpleQueue()
        self._call = client.node.HeartbeatStream(iter(self._requests.get, None))
        self._replies = iter(self._call)

    def beat(self, body: pb.HeartbeatRequest, *, timeout_s: float | None = None) -> pb.HeartbeatReply:
        self._requests.put(seal(self.client.identity, body))
        timer = threading.Timer(timeout_s or self.client.timeout_s, self._call.cancel)
        timer.start()
        try:
            return next(self._replies)  # type: ignore[no-any-return]
        except StopIteration:  # the server ended the call without a status: treat it as gone
            raise HeartbeatStreamEnded() from None
        finally:
            timer.cancel()

    def close(self) -> None:
        self._requests.put(None)
        self._call.cancel()


class HeartbeatStreamEnded(grpc.RpcError):  # type: ignore[misc]
    """The coordinator closed the heartbeat stream without an error: a new one should be opened."""

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return "the coordinator ended the heartbeat stream"
