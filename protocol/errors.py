"""Security failures as specific exceptions, and the one table mapping them to gRPC codes.

A check that fails raises; it never returns ``False`` or ``None``. Servicers
let these propagate and :func:`status_for` turns them into status codes.
"""

from __future__ import annotations

import grpc


class ProtocolError(Exception):
    """Base of every error the trust layer raises. The message says what and how to fix."""


class MalformedMessage(ProtocolError):
    """The bytes are not the message they claim to be (truncated, wrong type, bad field)."""


class MessageTooLarge(ProtocolError):
    """A message, file or tensor is over its size limit."""


class IntegrityError(ProtocolError):
    """Content does not match its digest (SHA-256 or CID)."""


class SignatureError(ProtocolError):
    """A signature does not verify under the claimed key."""


class ReplayError(ProtocolError):
    """An envelope was seen before, or is too old to be told apart from a replay."""


class ClockSkewError(ReplayError):
    """An envelope's timestamp lies outside the accepted window."""


class WrongContextError(ProtocolError):
    """A valid envelope meant for another message kind, job or round."""


class NotAuthorized(ProtocolError):
    """The sender is known but may not do this."""


class IdentityError(ProtocolError):
    """A key file is missing, malformed or has unsafe permissions."""


# One table, most specific class first: ClockSkewError before ReplayError.
_STATUS: tuple[tuple[type[ProtocolError], grpc.StatusCode], ...] = (
    (MalformedMessage, grpc.StatusCode.INVALID_ARGUMENT),
    (MessageTooLarge, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (IntegrityError, grpc.StatusCode.DATA_LOSS),
    (SignatureError, grpc.StatusCode.UNAUTHENTICATED),
    (ClockSkewError, grpc.StatusCode.FAILED_PRECONDITION),
    (ReplayError, grpc.StatusCode.ALREADY_EXISTS),
    (WrongContextError, grpc.StatusCode.FAILED_PRECONDITION),
    (NotAuthorized, grpc.StatusCode.PERMISSION_DENIED),
    (IdentityError, grpc.StatusCode.UNAUTHENTICATED),
)


def status_for(error: ProtocolError) -> grpc.StatusCode:
    """The gRPC status code for a trust-layer error."""
    for cls, code in _STATUS:
        if isinstance(error, cls):
            return code
    return grpc.StatusCode.INVALID_ARGUMENT


def error_name(error: BaseException) -> str:
    """The short class name sent to the peer in status details, e.g. ``ReplayError``."""
    return type(error).__name__
