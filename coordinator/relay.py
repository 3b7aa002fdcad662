"""The front-ends' link to the coordinator process: forwarded calls on a Unix socket.

A front-end (coordinator/frontend.py) forwards every call it does not answer
itself. Over gRPC that hop cost as much CPU again as the node's call (HTTP/2, a
channel, a call object and thread hand-offs on each side: ~2 ms of CPU a call in
the front-end and as much in the coordinator, measured under bench/coordinator.py's
load), so the link is
plainer: length-prefixed protobuf frames, ``RelayCall`` out and ``RelayReply``
back, matched by id with any number in flight, on one Unix socket per front-end
in a directory only the coordinator's user can enter.

The coordinator runs each call through the same interceptor (``forwarded``:
the client certificate's name comes with the call) and servicers as its gRPC
server, in a thread pool; an abort becomes the reply's status code and details,
which the front-end ends the node's call with. Frames are bounded by the largest
request or reply ``protocol.limits`` allows: a frame over the bound, or one that
does not parse, ends that connection (the front-end connects again on its next
call) and the server goes on serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from typing import Any, NamedTuple

import grpc
from google.protobuf.message import DecodeError

from protocol import panal_pb2 as pb
from protocol.limits import MAX_REPLY_BYTES, MAX_REQUEST_BYTES, METHODS
from protocol.server import FORWARDED_CN, EnvelopeInterceptor

log = logging.getLogger("panal.coordinator.relay")

FRAME = struct.Struct(">I")  # each frame: its length, then a RelayCall or RelayReply
SLACK = 64 * 1024  # the frame's own fields, over the request or reply it carries
MAX_CALL_FRAME = MAX_REQUEST_BYTES + SLACK
MAX_REPLY_FRAME = MAX_REPLY_BYTES + SLACK
MAX_PENDING = 4096  # calls queued or running in the coordinator; past it: RESOURCE_EXHAUSTED
CODES = {code.value[0]: code for code in grpc.StatusCode}


class RelayError(Exception):
    """A relayed call that ends without a reply: its status code and details, for the node.

    Raised in the coordinator where the interceptor or a servicer aborts the call (it becomes the
    RelayReply), and in a front-end for that reply, a missed deadline or a broken link."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code, self.details = code, details


class LinkBroken(Exception):
    """A frame that breaks the link: over its bound, cut short, or not a message."""


def frame(message: Any) -> bytes:
    data = message.SerializeToString()
    return FRAME.pack(len(data)) + data  # type: ignore[no-any-return]


# ------------------------------------------------------------------ the coordinator's end


class RelayContext:
    """What the interceptor and the servicers ask of a gRPC context, for a relayed call."""

    def __init__(self, call: pb.RelayCall) -> None:
        self._metadata = ((FORWARDED_CN, call.client_cn),)
        self._peer = call.peer or "unknown"
        self._deadline = time.monotonic() + call.timeout_ms / 1000 if call.timeout_ms else None

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def peer(self) -> str:
        return f"{self._peer} (through a front-end)"

    def time_remaining(self) -> float | None:
        return None if self._deadline is None else max(0.0, self._deadline - time.monotonic())

    def is_active(self) -> bool:
        return self._deadline is None or time.monotonic() < self._deadline

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise RelayError(code, details)


class _Details(NamedTuple):  # grpc.HandlerCallDetails
    method: str
    invocation_metadata: tuple[tuple[str, str], ...]


class _Servicers:
    """Takes the generated ``add_*Servicer_to_server`` registrations (in place of a grpc.Server)."""

    def __init__(self) -> None:
        self.generic: list[grpc.GenericRpcHandler] = []

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        self.generic.extend(handlers)

    def add_registered_method_handlers(self, service: str, handlers: Any) -> None:
        pass  # the generic handlers above serve the same methods

    def handler(self, details: Any) -> Any:
        return next((h for g in self.generic if (h := g.service(details)) is not None), None)


def method_handlers(
    interceptor: EnvelopeInterceptor, registrations: list[Callable[[Any], None]]
) -> dict[str, Any]:
    """Every unary method, as the interceptor wraps it: ``registration(server)`` adds a servicer."""
    servicers = _Servicers()
    for register in registrations:
        register(servicers)
    handlers = {}
    for path in METHODS:
        handler = interceptor.intercept_service(servicers.handler, _Details(path, ()))
        if handler is not None:
            handlers[path] = handler
    return handlers


class RelayServer:
    """The coordinator's end: serves the front-ends' calls from ``handlers`` (see ``method_handlers``)."""

    def __init__(self, path: str, handlers: Mapping[str, Any], *, max_workers: int = 32) -> None:
        self.path = path
        self._handlers = handlers
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="panal-relay")
        self._lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        self._in_flight: set[Future[None]] = set()
        self._stopping = False
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._listener.bind(path)
            os.chmod(path, 0o600)
            self._listener.listen(64)
        except OSError:
            self._listener.close()
            raise

    def start(self) -> RelayServer:
        threading.Thread(target=self._accept, name="panal-relay-accept", daemon=True).start()
        return self

    def stop(self, grace: float = 5.0) -> None:
        """No new calls; calls in flight get ``grace`` seconds; then every connection is closed."""
        with self._lock:
            self._stopping = True
            in_flight = list(self._in_flight)
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        wait_futures(in_flight, timeout=grace)
        with self._lock:
            for conn in self._connections:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
        self._pool.shutdown(wait=False, cancel_futures=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:  # stop() closed the listener
                return
            with self._lock:
                if self._stopping:
                    conn.close()
                    return
                self._connections.add(conn)
            threading.Thread(target=self._serve, args=(conn,), name="panal-relay-link", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        """Read calls until the front-end hangs up (or breaks the link); each is run in the pool."""
        send_lock = threading.Lock()
        try:
            while (call := _read_call(conn)) is not None:
                refusal = self._submit(call, conn, send_lock)
                if refusal is not None:
                    self._send(conn, send_lock, refusal)
        except LinkBroken as e:
            log.error("closing a front-end's link: %s", e)
        except OSError as e:
            if not self._stopping:
                log.warning("a front-end's link failed: %s", e)
        finally:
            with self._lock:
                self._connections.discard(conn)
            conn.close()

    def _submit(
        self, call: pb.RelayCall, conn: socket.socket, send_lock: threading.Lock
    ) -> pb.RelayReply | None:
        """Queue the call for the pool; or the reply that refuses it (stopping, or too many queued)."""
        with self._lock:
            if self._stopping:
                code, details = grpc.StatusCode.UNAVAILABLE, "the coordinator is stopping; retry with backoff"
                return pb.RelayReply(id=call.id, code=code.value[0], details=details)
            if len(self._in_flight) >= MAX_PENDING:
                code = grpc.StatusCode.RESOURCE_EXHAUSTED
                details = f"the coordinator has {MAX_PENDING} calls queued; retry with backoff"
                return pb.RelayReply(id=call.id, code=code.value[0], details=details)
            future = self._pool.submit(self._run, call, conn, send_lock)
            self._in_flight.add(future)
        future.add_done_callback(self._done)  # outside the lock: one done already runs _done now, here
        return None

    def _done(self, future: Future[None]) -> None:
        with self._lock:
            self._in_flight.discard(future)

    def _run(self, call: pb.RelayCall, conn: socket.socket, send_lock: threading.Lock) -> None:
        self._send(conn, send_lock, self._answer(call))

    def _answer(self, call: pb.RelayCall) -> pb.RelayReply:
        handler = self._handlers.get(call.method)
        if handler is None:
            code, details = grpc.StatusCode.UNIMPLEMENTED, f"method {call.method!r} is not served here"
            return pb.RelayReply(id=call.id, code=code.value[0], details=details)
        context = RelayContext(call)
        if not context.is_active():  # waited out its deadline in the queue: the node has given up
            code, details = grpc.StatusCode.DEADLINE_EXCEEDED, "the call's deadline passed before it ran"
            return pb.RelayReply(id=call.id, code=code.value[0], details=details)
        try:
            reply = handler.unary_unary(call.request, context)
            data = handler.response_serializer(reply) if handler.response_serializer else reply
            return pb.RelayReply(id=call.id, reply=data)
        except RelayError as e:  # the interceptor or a servicer aborted the call
            return pb.RelayReply(id=call.id, code=e.code.value[0], details=e.details)
        except Exception as e:  # as gRPC answers an exception in a servicer
            log.exception("relayed call %s failed", call.method)
            code = grpc.StatusCode.UNKNOWN.value[0]
            return pb.RelayReply(id=call.id, code=code, details=f"Exception calling application: {e}")

    @staticmethod
    def _send(conn: socket.socket, send_lock: threading.Lock, reply: pb.RelayReply) -> None:
        try:
            with send_lock:
                conn.sendall(frame(reply))
        except OSError as e:  # the front-end went away: its node's call ended with it
            log.warning("cannot answer a front-end (call %d): %s", reply.id, e)


def _read_call(conn: socket.socket) -> pb.RelayCall | None:
    """The next call, or None when the front-end hung up between calls."""
    head = _recv_exactly(conn, FRAME.size, eof_ok=True)
    if head is None:
        return None
    (size,) = FRAME.unpack(head)
    if size > MAX_CALL_FRAME:
        raise LinkBroken(f"a call frame of {size} bytes is over the bound of {MAX_CALL_FRAME}")
    data = _recv_exactly(conn, size, eof_ok=False)
    try:
        call: pb.RelayCall = pb.RelayCall.FromString(data)
        return call
    except DecodeError as e:
        raise LinkBroken(f"a call frame is not a panal.v1.RelayCall: {e}") from e


def _recv_exactly(conn: socket.socket, size: int, *, eof_ok: bool) -> bytes | None:
    buf = bytearray(size)
    view, got = memoryview(buf), 0
    while got < size:
        n = conn.recv_into(view[got:])
        if n == 0:
            if eof_ok and got == 0:
                return None
            raise LinkBroken(f"the link closed inside a frame ({got} of {size} bytes)")
        got += n
    return bytes(buf)


# ------------------------------------------------------------------ a front-end's end


class RelayClient:
    """A front-end's end: forwards calls on one connection, any number in flight (asyncio).

    Connects on the first call, and again on the next call after the link breaks;
    calls in flight when it breaks end UNAVAILABLE.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._writer: asyncio.StreamWriter | None = None
        self._reading: asyncio.Task[None] | None = None
        self._pending: dict[int, asyncio.Future[pb.RelayReply]] = {}
        self._ids = itertools.count(1)
        self._connecting = asyncio.Lock()

    async def call(self, method: str, request: bytes, *, client_cn: str, peer: str, timeout: float) -> bytes:
        """The reply's bytes, or RelayError with the status the node's call must end with."""
        call_id = next(self._ids)
        message = frame(
            pb.RelayCall(
                id=call_id,
                method=method,
                client_cn=client_cn,
                peer=peer,
                timeout_ms=max(1, int(timeout * 1000)),
                request=request,
            )
        )
        if len(message) > MAX_CALL_FRAME + FRAME.size:
            raise RelayError(
                grpc.StatusCode.RESOURCE_EXHAUSTED, f"the request is over {MAX_REQUEST_BYTES} bytes"
            )
        writer = await self._connection()
        reply_to: asyncio.Future[pb.RelayReply] = asyncio.get_running_loop().create_future()
        self._pending[call_id] = reply_to
        try:
            writer.write(message)
            await writer.drain()
            reply = await asyncio.wait_for(reply_to, timeout)
        except TimeoutError:
            raise RelayError(
                grpc.StatusCode.DEADLINE_EXCEEDED, "the coordinator did not answer within the call's deadline"
            ) from None
        except OSError as e:
            raise RelayError(grpc.StatusCode.UNAVAILABLE, f"the link to the coordinator broke: {e}") from e
        finally:
            self._pending.pop(call_id, None)
        if reply.code:
            raise RelayError(CODES.get(reply.code, grpc.StatusCode.UNKNOWN), reply.details)
        return bytes(reply.reply)

    async def close(self) -> None:
        if self._reading is not None:
            self._reading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reading
        if self._writer is not None:
            self._writer.close()

    async def _connection(self) -> asyncio.StreamWriter:
        async with self._connecting:
            if self._writer is None or self._writer.is_closing():
                try:
                    reader, writer = await asyncio.open_unix_connection(self.path)
                except OSError as e:
                    raise RelayError(
                        grpc.StatusCode.UNAVAILABLE,
                        f"cannot reach the coordinator process at {self.path}: {e}",
                    ) from e
                self._writer = writer
                self._reading = asyncio.create_task(self._read_replies(reader, writer))
            return self._writer

    async def _read_replies(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        why = "the coordinator process closed the link"
        try:
            while True:
                (size,) = FRAME.unpack(await reader.readexactly(FRAME.size))
                if size > MAX_REPLY_FRAME:
                    raise LinkBroken(f"a reply frame of {size} bytes is over the bound of {MAX_REPLY_FRAME}")
                try:
                    reply = pb.RelayReply.FromString(await reader.readexactly(size))
                except DecodeError as e:
                    raise LinkBroken(f"a reply frame is not a panal.v1.RelayReply: {e}") from e
                waiting = self._pending.get(reply.id)
                if waiting is not None and not waiting.done():
                    waiting.set_result(reply)
        except asyncio.IncompleteReadError:
            pass  # closed (between frames, or inside one)
        except (LinkBroken, OSError) as e:
            why = str(e)
            log.error("the link to the coordinator process broke: %s", why)
        finally:
            if self._writer is writer:
                self._writer = None
            writer.close()
            for waiting in self._pending.values():  # all on this link: a new one opens after this
                if not waiting.done():
                    waiting.set_exception(RelayError(grpc.StatusCode.UNAVAILABLE, why))
