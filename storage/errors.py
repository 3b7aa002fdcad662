"""Storage errors. Integrity failures reuse the trust layer's ``IntegrityError``."""

from __future__ import annotations

from protocol.errors import IntegrityError, MessageTooLarge, ProtocolError

__all__ = ["IntegrityError", "MessageTooLarge", "NotFound", "StoreError", "StoreUnavailable"]


class StoreError(ProtocolError):
    """A blob store could not do what was asked; the message says why and what to do."""


class NotFound(StoreError):
    """No blob with this CID in the store."""


class StoreUnavailable(StoreError):
    """The backend cannot be reached or is the wrong version."""
