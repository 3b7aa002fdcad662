"""Authentication in one interceptor: every request is a verified envelope before a servicer sees it.

The interceptor takes the raw request bytes, enforces the method's size
limit, parses the envelope, binds it to the TLS client certificate, verifies
digest, signature, freshness and context, and hands the servicer a
:class:`~protocol.envelope.Verified` instead of the raw envelope. A failed
check ends the call with the status code from ``protocol.errors``; the server
goes on serving.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from protocol import panal_pb2 as pb
from protocol.envelope import Verified, open_envelope
from protocol.errors import (
    MalformedMessage,
    MessageTooLarge,
    NotAuthorized,
    ProtocolError,
    error_name,
    status_for,
)
from protocol.identity import fingerprint
from protocol.limits import METHODS, MethodSpec
from protocol.replay import ReplayGuard

log = logging.getLogger("panal.protocol")

# (method, envelope) -> (job, round) the envelope must carry; None skips a check.
ContextFn = Callable[[MethodSpec, pb.Envelope], tuple[str | None, int | None]]
# Raises NotAuthorized (or another ProtocolError) when the sender may not call the method.
AuthorizeFn = Callable[[MethodSpec, Verified], None]


def abort(context: grpc.ServicerContext, error: ProtocolError) -> None:
    """End the call with the error's status code; the details name the error class."""
    context.abort(status_for(error), f"{error_name(error)}: {error}")


class EnvelopeInterceptor(grpc.ServerInterceptor):  # type: ignore[misc]
    def __init__(
        self,
        *,
        replay: ReplayGuard,
        expected_context: ContextFn | None = None,
        authorize: AuthorizeFn | None = None,
        require_client_certificate: bool = True,
        methods: dict[str, MethodSpec] = METHODS,
    ) -> None:
        self.replay = replay
        self.expected_context = expected_context
        self.authorize = authorize
        self.require_client_certificate = require_client_certificate
        self.methods = methods
        # method -> (the servicer's handler, its wrapped handler): built once, not per call.
        self._wrapped: dict[str, tuple[Any, Any]] = {}

    def intercept_service(self, continuation: Callable[[Any], Any], details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(details)
        hit = self._wrapped.get(details.method)
        if hit is not None and hit[0] is handler:
            return hit[1]
        spec = self.methods.get(details.method)
        if handler is None or spec is None or handler.unary_unary is None:
            return handler
        inner = handler.unary_unary

        def behavior(raw: bytes, context: grpc.ServicerContext) -> Any:
            try:
                verified = self.verify(spec, raw, context)
            except ProtocolError as e:
                log.warning("rejected %s from %s: %s: %s", spec.name, context.peer(), error_name(e), e)
                abort(context, e)
            try:
                return inner(verified, context)
            except ProtocolError as e:
                log.warning("%s failed for %s: %s: %s", spec.name, verified.sender_id, error_name(e), e)
                abort(context, e)

        # request_deserializer=None: the interceptor parses, so a malformed
        # request gets a clear INVALID_ARGUMENT instead of gRPC's INTERNAL.
        wrapped = grpc.unary_unary_rpc_method_handler(
            behavior, request_deserializer=None, response_serializer=handler.response_serializer
        )
        self._wrapped[details.method] = (handler, wrapped)
        return wrapped

    def verify(self, spec: MethodSpec, raw: bytes, context: grpc.ServicerContext) -> Verified:
        if len(raw) > spec.max_request_bytes:
            raise MessageTooLarge(
                f"{spec.name} request is {len(raw)} bytes; the limit is {spec.max_request_bytes}"
            )
        try:
            env = pb.Envelope.FromString(raw)
        except DecodeError as e:
            raise MalformedMessage(f"{spec.name} request is not a panal.v1.Envelope: {e}") from e
        if self.require_client_certificate and spec.needs_client_certificate:
            self._check_certificate(env, context)
        job, round = self.expected_context(spec, env) if self.expected_context else (None, None)
        verified = open_envelope(env, spec.body, replay=self.replay, job=job, round=round)
        if self.authorize is not None:
            self.authorize(spec, verified)
        return verified

    @staticmethod
    def _check_certificate(env: pb.Envelope, context: grpc.ServicerContext) -> None:
        names = context.auth_context().get("x509_common_name") or []
        if not names:
            raise NotAuthorized("this call needs an mTLS client certificate; enroll first")
        cn = names[0].decode()
        try:
            sender = fingerprint(bytes(env.sender))
        except ProtocolError as e:
            raise MalformedMessage(f"bad sender key: {e}") from e
        if cn != sender:
            raise NotAuthorized(f"client certificate is for {cn}, but the envelope is signed by {sender}")


# Every node holds its own connection and sends a small request now and then. HTTP/2 BDP
# probing would ping on such bursts to grow a receive window that requests never need (none
# is over protocol.limits.MAX_REQUEST_BYTES); without it the server spends less CPU per call
# when it serves many connections (bench/coordinator.py).
SERVER_TUNING: list[tuple[str, int]] = [("grpc.http2.bdp_probe", 0)]


def build_server(interceptor: EnvelopeInterceptor, *, max_workers: int = 16) -> grpc.Server:
    """A gRPC server with the envelope interceptor and the size caps of ``protocol.limits``."""
    from concurrent.futures import ThreadPoolExecutor

    from protocol.limits import server_options

    return grpc.server(
        ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="panal-rpc"),
        interceptors=[interceptor],
        options=server_options() + SERVER_TUNING,
    )
