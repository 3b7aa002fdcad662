"""A client of the coordinator: every call sealed in a signed envelope, over (m)TLS."""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf.message import Message

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
        self.channel = grpc.secure_channel(target, tls.channel_credentials(ca_pem, cert), options=channel_options())
        self.node = pb_grpc.NodeServiceStub(self.channel)
        self.admin = pb_grpc.AdminServiceStub(self.channel)

    def call(
        self, stub: Any, method: str, body: Message, *, job: str = "", round: int = 0, timeout_s: float | None = None
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
