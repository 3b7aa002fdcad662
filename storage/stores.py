"""Store URLs: ``local:PATH`` (the default, ``~/.panal/store``) or ``kubo:http://HOST:PORT``."""

from __future__ import annotations

import os

from storage.blobstore import BlobStore
from storage.errors import StoreError

ENV_VAR = "PANAL_STORE"
DEFAULT_URL = "local:~/.panal/store"


def default_url() -> str:
    return os.environ.get(ENV_VAR) or DEFAULT_URL


def open_store(url: str | None = None) -> BlobStore:
    """The blob store a URL names; ``None`` means $PANAL_STORE or the local default."""
    url = url or default_url()
    scheme, sep, rest = url.partition(":")
    if not sep or not rest:
        raise StoreError(f"store URL {url!r} has no scheme; use local:PATH or kubo:http://HOST:PORT")
    if scheme == "local":
        from storage.local import LocalStore

        return LocalStore(rest)
    if scheme == "kubo":
        from storage.kubo import KuboStore

        return KuboStore(rest)
    raise StoreError(f"unknown store scheme {scheme!r} in {url!r}; use local:PATH or kubo:http://HOST:PORT")
