"""Signed envelopes over an explicitly built canonical byte string.

The signature never covers re-serialized protobuf. It covers the bytes that
:func:`canonical_bytes` builds field by field, each with a fixed width or a
length prefix, so two different envelopes can never sign the same bytes:

    domain tag | kind | job | round (u64) | sender (32 B) | timestamp ms (u64)
    | nonce (16 B) | SHA-256 of the payload (32 B)

The payload is the exact serialized body as sent; the receiver hashes the
bytes it got.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

from google.protobuf.message import Message

from protocol import panal_pb2 as pb
from protocol.errors import IntegrityError, MalformedMessage, WrongContextError
from protocol.hashing import sha256
from protocol.identity import PUBLIC_KEY_BYTES, SIGNATURE_BYTES, Identity, fingerprint
from protocol.identity import verify_signature as _verify_signature
from protocol.replay import ReplayGuard, now_ms

DOMAIN = b"panal/envelope/v1"
NONCE_BYTES = 16
MAX_NAME = 256  # bytes of a kind or job string


def _field(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def canonical_bytes(
    *,
    kind: str,
    job: str,
    round: int,
    sender: bytes,
    timestamp_ms: int,
    nonce: bytes,
    payload_sha256: bytes,
) -> bytes:
    """The exact bytes an envelope's signature covers."""
    if len(sender) != PUBLIC_KEY_BYTES:
        raise MalformedMessage(f"sender must be a {PUBLIC_KEY_BYTES}-byte Ed25519 key")
    if len(nonce) != NONCE_BYTES:
        raise MalformedMessage(f"nonce must be {NONCE_BYTES} bytes, got {len(nonce)}")
    if len(payload_sha256) != 32:
        raise MalformedMessage(f"payload_sha256 must be 32 bytes, got {len(payload_sha256)}")
    if not (0 <= round < 2**64 and 0 <= timestamp_ms < 2**64):
        raise MalformedMessage("round and timestamp must fit in an unsigned 64-bit integer")
    return b"".join(
        (
            _field(DOMAIN),
            _field(kind.encode()),
            _field(job.encode()),
            struct.pack(">Q", round),
            sender,
            struct.pack(">Q", timestamp_ms),
            nonce,
            payload_sha256,
        )
    )


def kind_of(message: Message | type[Message]) -> str:
    """The envelope kind of a body message: its full protobuf name."""
    return str(message.DESCRIPTOR.full_name)


def seal(
    identity: Identity,
    body: Message,
    *,
    job: str = "",
    round: int = 0,
    timestamp_ms: int | None = None,
    nonce: bytes | None = None,
) -> pb.Envelope:
    """Sign ``body`` into an envelope of kind ``body``'s full name."""
    payload = body.SerializeToString(deterministic=True)
    digest = sha256(payload)
    env = pb.Envelope(
        kind=kind_of(body),
        job=job,
        round=round,
        sender=identity.public_key,
        timestamp_ms=now_ms() if timestamp_ms is None else timestamp_ms,
        nonce=os.urandom(NONCE_BYTES) if nonce is None else nonce,
        payload=payload,
        payload_sha256=digest,
    )
    env.signature = identity.sign(signed_bytes(env))
    return env


def signed_bytes(env: pb.Envelope) -> bytes:
    return canonical_bytes(
        kind=env.kind,
        job=env.job,
        round=env.round,
        sender=env.sender,
        timestamp_ms=env.timestamp_ms,
        nonce=env.nonce,
        payload_sha256=env.payload_sha256,
    )


@dataclass(frozen=True)
class Verified:
    """An envelope whose integrity, signature, freshness and context have been checked."""

    kind: str
    job: str
    round: int
    sender: bytes
    timestamp_ms: int
    body: Message
    envelope: pb.Envelope  # as received: stored by whoever must re-verify it later

    @property
    def sender_id(self) -> str:
        return fingerprint(self.sender)


def check_integrity(env: pb.Envelope) -> None:
    """Shape and payload digest (IntegrityError, MalformedMessage) and signature (SignatureError)."""
    if len(env.kind.encode()) > MAX_NAME or len(env.job.encode()) > MAX_NAME:
        raise MalformedMessage(f"kind and job are limited to {MAX_NAME} bytes")
    if len(env.sender) != PUBLIC_KEY_BYTES:
        raise MalformedMessage(
            f"sender must be a {PUBLIC_KEY_BYTES}-byte Ed25519 public key, got {len(env.sender)}"
        )
    if len(env.signature) != SIGNATURE_BYTES:
        raise MalformedMessage(f"signature must be {SIGNATURE_BYTES} bytes, got {len(env.signature)}")
    if sha256(env.payload) != env.payload_sha256:
        raise IntegrityError(
            f"payload of {env.kind or 'envelope'} does not match its SHA-256: corrupted or altered in transit"
        )
    _verify_signature(env.sender, signed_bytes(env), env.signature)


def open_envelope(
    env: pb.Envelope,
    body_type: type[Message],
    *,
    replay: ReplayGuard | None,
    job: str | None = None,
    round: int | None = None,
) -> Verified:
    """Verify ``env`` completely and decode its body.

    Checks, in order: kind, shape, payload digest, signature, timestamp window,
    job and round (when given), then that the nonce is new. Each failure raises
    its own exception; the nonce is only remembered once everything else holds.
    """
    expected_kind = kind_of(body_type)
    if env.kind != expected_kind:
        raise WrongContextError(f"expected an envelope of kind {expected_kind}, got {env.kind!r}")
    check_integrity(env)
    if replay is not None:
        replay.check_time(env.timestamp_ms)
    if job is not None and env.job != job:
        raise WrongContextError(f"envelope is for job {env.job!r}, this is job {job!r}")
    if round is not None and env.round != round:
        raise WrongContextError(
            f"envelope is for round {env.round} of job {env.job!r}, the open round is {round}"
        )
    try:
        body = body_type.FromString(env.payload)
    except Exception as e:  # protobuf raises DecodeError and, rarely, others
        raise MalformedMessage(f"payload is not a valid {expected_kind}: {e}") from e
    if replay is not None:
        replay.check_and_record(env.sender, env.nonce, env.timestamp_ms)
    return Verified(
        kind=env.kind,
        job=env.job,
        round=env.round,
        sender=bytes(env.sender),
        timestamp_ms=env.timestamp_ms,
        body=body,
        envelope=env,
    )
