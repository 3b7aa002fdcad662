"""Authentication in one interceptor: every request is a verified envelope before a servicer sees it.

The interceptor takes the raw request bytes, enforces the method's size
limit, parses the envelope, binds it to the TLS client certificate, verifies
digest, signature, freshness and context, and hands the servicer a
:class:`~protocol.envelope.Verified` instead of the raw envelope. A failed
check ends the call with the status code from ``protocol.errors``; the server
goes on serving.

A coordinator's front-end processes (coordinator/frontend.py) terminate the
nodes' TLS and forward calls over a local socket; the interceptor of that
socket (``forwarded=True``) takes the client certificate's name from the
metadata the front-end's call comes with (:data:`FORWARDED_CN`). Every other check is
made again there: the signature binds the envelope to its sender whichever
process received it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
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
from protocol.limits import METHODS, STREAMS, MethodSpec
from protocol.replay import ReplayGuard

log = logging.getLogger("panal.protocol")

# Heartbeat streams one server process holds at most (a thread each); past it, nodes send unary calls.
MAX_STREAMS = 1024

# The metadata a front-end forwards a call with: the name of the TLS client certificate it received it on.
FORWARDED_CN = "panal-forwarded-cn"

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
        forwarded: bool = False,
        methods: dict[str, MethodSpec] = METHODS,
        streams: dict[str, MethodSpec] = STREAMS,
        max_streams: int = MAX_STREAMS,
    ) -> None:
        self.replay = replay
        self.streams = streams
        self.max_streams = max_streams
        self._open_streams = 0
        self._streams_lock = threading.Lock()
        self.forwarded = forwarded
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
        if handler is None:
            return None
        if details.method in self.streams and handler.stream_stream is not None:
            wrapped = self.stream_handler(self.streams[details.method], handler)
            self._wrapped[details.method] = (handler, wrapped)
            return wrapped
        spec = self.methods.get(details.method)
        if spec is None or handler.unary_unary is None:
            return None  # a method without its checks is not served: UNIMPLEMENTED
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

    def stream_handler(self, spec: MethodSpec, handler: Any) -> Any:
        """Each message of the stream checked as ``spec``'s request is; the first bad one ends the call.

        A stream holds one of the server's threads while it lasts: past ``max_streams`` open ones,
        a new stream is refused (RESOURCE_EXHAUSTED) and the node sends unary calls instead.
        """
        inner = handler.stream_stream

        def behavior(raws: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[Any]:
            with self._streams_lock:
                full = self._open_streams >= self.max_streams
                if not full:
                    self._open_streams += 1
            if full:
                context.abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"this server holds {self.max_streams} streams already; send unary {spec.name} calls",
                )
            sender = ""
            cn = self._client_cn(context)  # one connection, one certificate: read once per stream

            def verified() -> Iterator[Verified]:
                nonlocal sender
                for raw in raws:
                    try:
                        v = self.verify(spec, raw, context, cn=cn)
                    except ProtocolError as e:
                        log.warning(
                            "rejected %s from %s: %s: %s", spec.name, context.peer(), error_name(e), e
                        )
                        abort(context, e)
                    sender = v.sender_id
                    yield v

            try:
                yield from inner(verified(), context)
            except ProtocolError as e:
                log.warning("%s failed for %s: %s: %s", spec.name, sender, error_name(e), e)
                abort(context, e)
            finally:
                with self._streams_lock:
                    self._open_streams -= 1

        return grpc.stream_stream_rpc_method_handler(
            behavior, request_deserializer=None, response_serializer=handler.response_serializer
        )

    def verify(
        self, spec: MethodSpec, raw: bytes, context: grpc.ServicerContext, *, cn: str | None = None
    ) -> Verified:
        """``raw`` as a verified envelope, or a ProtocolError. ``cn``: the client certificate's name,
        when the caller has it already (a stream's messages all come on one connection)."""
        if len(raw) > spec.max_request_bytes:
            raise MessageTooLarge(
                f"{spec.name} request is {len(raw)} bytes; the limit is {spec.max_request_bytes}"
            )
        try:
            env = pb.Envelope.FromString(raw)
        except DecodeError as e:
            raise MalformedMessage(f"{spec.name} request is not a panal.v1.Envelope: {e}") from e
        if self.require_client_certificate and spec.needs_client_certificate:
            self._check_certificate(env, self._client_cn(context) if cn is None else cn)
        job, round = self.expected_context(spec, env) if self.expected_context else (None, None)
        verified = open_envelope(env, spec.body, replay=self.replay, job=job, round=round)
        if self.authorize is not None:
            self.authorize(spec, verified)
        return verified

    def _client_cn(self, context: grpc.ServicerContext) -> str:
        if self.forwarded:
            return next((str(v) for k, v in context.invocation_metadata() if k == FORWARDED_CN), "")
        return client_cn(context)

    @staticmethod
    def _check_certificate(env: pb.Envelope, cn: str) -> None:
        if not cn:
            raise NotAuthorized("this call needs an mTLS client certificate; enroll first")
        try:
            sender = fingerprint(bytes(env.sender))
        except ProtocolError as e:
            raise MalformedMessage(f"bad sender key: {e}") from e
        if cn != sender:
            raise NotAuthorized(f"client certificate is for {cn}, but the envelope is signed by {sender}")


def client_cn(context: grpc.ServicerContext) -> str:
    """The common name of the call's TLS client certificate; empty without one."""
    names = context.auth_context().get("x509_common_name") or []
    return names[0].decode() if names else ""


# Every node holds its own connection and sends a small request now and then. HTTP/2 BDP
# probing would ping on such bursts to grow a receive window that requests never need (none
# is over protocol.limits.MAX_REQUEST_BYTES); without it the server spends less CPU per call
# when it serves many connections (bench/coordinator.py).
SERVER_TUNING: list[tuple[str, int]] = [("grpc.http2.bdp_probe", 0)]


def build_server(interceptor: EnvelopeInterceptor, *, max_workers: int = 16) -> grpc.Server:
    """A gRPC server with the envelope interceptor and the size caps of ``protocol.limits``.

    ``max_workers`` threads for unary calls, plus one for each stream the interceptor admits
    (threads are started as calls need them).
    """
    from concurrent.futures import ThreadPoolExecutor

    from protocol.limits import server_options

    return grpc.server(
        ThreadPoolExecutor(max_workers=max_workers + interceptor.max_streams, thread_name_prefix="panal-rpc"),
        interceptors=[interceptor],
        options=server_options() + SERVER_TUNING,
    )
