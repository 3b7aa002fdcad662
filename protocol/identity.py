"""Ed25519 identities on disk: created 0600, refused when others can read them.

A node, an admin and the coordinator each hold one. The public key is the
identity; its fingerprint (the first 16 bytes of its SHA-256, in hex) is the
node id shown to operators and put in TLS certificates.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import nacl.exceptions
import nacl.signing

from protocol.errors import IdentityError, SignatureError

PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64
_BEGIN = "-----BEGIN PANAL ED25519 PRIVATE KEY-----"
_END = "-----END PANAL ED25519 PRIVATE KEY-----"
_MAX_KEY_FILE = 4096


def fingerprint(public_key: bytes) -> str:
    """Node id of a public key: 32 hex characters."""
    if len(public_key) != PUBLIC_KEY_BYTES:
        raise IdentityError(f"an Ed25519 public key is {PUBLIC_KEY_BYTES} bytes, got {len(public_key)}")
    return _fingerprint(bytes(public_key))


# Every message from a node names its key: hash it, and parse it for libsodium, once per key.
# (A failed parse raises and is not remembered.)
@functools.lru_cache(maxsize=65536)
def _fingerprint(public_key: bytes) -> str:
    return hashlib.sha256(public_key).hexdigest()[:32]


_verify_key = functools.lru_cache(maxsize=65536)(nacl.signing.VerifyKey)


def verify_signature(public_key: bytes, message: bytes, signature: bytes) -> None:
    """Raise SignatureError unless ``signature`` is ``public_key``'s over ``message``."""
    if len(public_key) != PUBLIC_KEY_BYTES:
        raise SignatureError(f"sender key must be {PUBLIC_KEY_BYTES} bytes, got {len(public_key)}")
    if len(signature) != SIGNATURE_BYTES:
        raise SignatureError(f"signature must be {SIGNATURE_BYTES} bytes, got {len(signature)}")
    try:
        _verify_key(bytes(public_key)).verify(message, signature)
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError) as e:
        raise SignatureError(f"signature does not verify under key {fingerprint(public_key)}") from e


@dataclass(frozen=True)
class Identity:
    """An Ed25519 key pair. Never print ``seed``."""

    seed: bytes

    def __post_init__(self) -> None:
        if len(self.seed) != 32:
            raise IdentityError(f"an Ed25519 seed is 32 bytes, got {len(self.seed)}")

    def __repr__(self) -> str:  # keep the secret out of logs and tracebacks
        return f"Identity(fingerprint={self.fingerprint!r})"

    @classmethod
    def generate(cls) -> Identity:
        return cls(bytes(nacl.signing.SigningKey.generate()))

    @property
    def _signing_key(self) -> nacl.signing.SigningKey:
        return nacl.signing.SigningKey(self.seed)

    @property
    def public_key(self) -> bytes:
        return bytes(self._signing_key.verify_key)

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.public_key)

    def sign(self, message: bytes) -> bytes:
        return self._signing_key.sign(message).signature

    # ------------------------------------------------------------------ disk

    def save(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """Write the key to ``path`` (mode 0600) and the public key to ``path.pub``."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if overwrite else os.O_EXCL)
        try:
            fd = os.open(path, flags, 0o600)
        except FileExistsError as e:
            raise IdentityError(f"{path} already exists; pick another path or remove it first") from e
        with os.fdopen(fd, "w") as f:
            os.fchmod(f.fileno(), 0o600)
            body = base64.b64encode(self.seed).decode()
            f.write(f"{_BEGIN}\n{body}\n{_END}\n")
            f.flush()
            os.fsync(f.fileno())
        public_line = f"panal-ed25519 {base64.b64encode(self.public_key).decode()} {self.fingerprint}\n"
        Path(f"{path}.pub").write_text(public_line)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Identity:
        """Load a key, refusing one that its group or other users can read or write."""
        path = Path(path)
        try:
            st = path.stat()
        except FileNotFoundError as e:
            raise IdentityError(f"no key at {path}; create one with `panal keys new {path}`") from e
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o077:
            raise IdentityError(
                f"key file {path} has mode {mode:04o}, open to group or others; "
                f"run `chmod 600 {path}` if it was never exposed, else make a new key"
            )
        if st.st_size > _MAX_KEY_FILE:
            raise IdentityError(f"{path} is {st.st_size} bytes, too large to be a panal key")
        lines = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
        if len(lines) != 3 or lines[0] != _BEGIN or lines[2] != _END:
            raise IdentityError(f"{path} is not a panal Ed25519 private key")
        try:
            seed = base64.b64decode(lines[1], validate=True)
        except binascii.Error as e:
            raise IdentityError(f"{path}: key body is not valid base64") from e
        return cls(seed)


def load_or_create(path: str | Path) -> tuple[Identity, bool]:
    """The identity at ``path``, made if missing. Returns (identity, created)."""
    path = Path(path)
    if path.exists():
        return Identity.load(path), False
    identity = Identity.generate()
    identity.save(path)
    return identity, True


def read_public_key(path: str | Path) -> bytes:
    """The public key from a ``.pub`` file written by :meth:`Identity.save`."""
    text = Path(path).read_text()[:_MAX_KEY_FILE].split()
    if len(text) < 2 or text[0] != "panal-ed25519":
        raise IdentityError(f"{path} is not a panal public key file")
    try:
        key = base64.b64decode(text[1], validate=True)
    except binascii.Error as e:
        raise IdentityError(f"{path}: public key is not valid base64") from e
    if len(key) != PUBLIC_KEY_BYTES:
        raise IdentityError(f"{path}: public key is {len(key)} bytes, expected 32")
    return key
