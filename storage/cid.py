"""CIDs byte-identical to Kubo's `ipfs add`, computed in one streaming pass.

Layout (Kubo's defaults): the file is cut into fixed 256 KiB chunks; each chunk
becomes a leaf block, either a dag-pb node whose UnixFS Data says
`{Type: File, Data: chunk, filesize: len}` (`ipfs add`, CIDv0 `Qm…`) or the
bare chunk as a raw block (`--cid-version 1 --raw-leaves`, CIDv1 `bafk…`).
Leaves are grouped 174 at a time under dag-pb parents whose UnixFS Data is
`{Type: File, filesize: sum, blocksizes: [bytes under each link]}`; parents are
grouped the same way, level after level, until one root remains (the balanced
layout: every leaf at the same depth, every node full but the rightmost). A
file of one chunk is its own root; an empty file is one empty leaf.

Memory is bounded by one chunk buffer plus at most 174 links per level.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from os import PathLike
from typing import NamedTuple, Protocol, runtime_checkable

CHUNK_SIZE = 262_144  # Kubo's default chunker: size-262144
MAX_LINKS = 174  # Kubo's balanced layout: links per dag-pb node

CODEC_RAW = 0x55
CODEC_DAG_PB = 0x70
_SHA2_256 = 0x12
_DIGEST_LEN = 32
_CODEC_NAMES = {CODEC_RAW: "raw", CODEC_DAG_PB: "dag-pb"}

_B58_ALPHABET = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_B58_INDEX = {c: i for i, c in enumerate(_B58_ALPHABET)}

BytesLike = bytes | bytearray | memoryview
BlockSink = Callable[["CID", bytes], None]


class InvalidCIDError(ValueError):
    """A string or byte string is not a CID this module can represent."""


# --- varints, base58btc, base32 -------------------------------------------------


def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while pos < len(buf):
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            break
    raise InvalidCIDError("truncated or overlong varint")


@functools.lru_cache(maxsize=65536)  # a CID is printed many times (paths, rows, logs): encode it once
def base58btc_encode(data: bytes) -> str:
    zeros = len(data) - len(data.lstrip(b"\0"))
    n = int.from_bytes(data, "big")
    digits = []
    while n:
        n, r = divmod(n, 58)
        digits.append(_B58_ALPHABET[r])
    return "1" * zeros + "".join(reversed(digits))


def base58btc_decode(text: str) -> bytes:
    n = 0
    for c in text:
        if c not in _B58_INDEX:
            raise InvalidCIDError(f"{c!r} is not a base58btc character")
        n = n * 58 + _B58_INDEX[c]
    zeros = len(text) - len(text.lstrip("1"))
    return b"\0" * zeros + n.to_bytes((n.bit_length() + 7) // 8, "big")


def base32_encode(data: bytes) -> str:
    """RFC 4648 base32, lowercase, unpadded (multibase prefix `b` not included)."""
    return base64.b32encode(data).decode("ascii").lower().rstrip("=")


def base32_decode(text: str) -> bytes:
    if text != text.lower():
        raise InvalidCIDError("multibase 'b' is lowercase base32")
    try:
        return base64.b32decode(text.upper() + "=" * (-len(text) % 8))
    except binascii.Error as exc:
        raise InvalidCIDError(f"bad base32: {exc}") from exc


# --- the CID value type ---------------------------------------------------------


@dataclass(frozen=True)
class CID:
    """A sha2-256 CID of a dag-pb or raw block.

    A CIDv0 and the CIDv1 of the same block are different values (they print
    differently); compare `a.to_v1() == b.to_v1()` to ask "same block?".
    """

    version: int
    codec: int
    digest: bytes  # the sha2-256 digest inside the multihash

    def __post_init__(self) -> None:
        if self.version not in (0, 1):
            raise InvalidCIDError(f"CID version must be 0 or 1, got {self.version}")
        if self.codec not in _CODEC_NAMES:
            raise InvalidCIDError(f"unsupported codec 0x{self.codec:x}: only dag-pb and raw")
        if self.version == 0 and self.codec != CODEC_DAG_PB:
            raise InvalidCIDError("CIDv0 can only name dag-pb blocks: use version 1")
        if len(self.digest) != _DIGEST_LEN:
            raise InvalidCIDError(f"sha2-256 digest must be 32 bytes, got {len(self.digest)}")

    @classmethod
    def of_block(cls, block: BytesLike, *, version: int, codec: int) -> CID:
        return cls(version, codec, hashlib.sha256(block).digest())

    @property
    def multihash(self) -> bytes:
        return bytes((_SHA2_256, _DIGEST_LEN)) + self.digest

    def to_bytes(self) -> bytes:
        """Binary form, as a dag-pb link's Hash field carries it."""
        if self.version == 0:
            return self.multihash
        return _varint(1) + _varint(self.codec) + self.multihash

    def to_v1(self) -> CID:
        return CID(1, self.codec, self.digest)

    def __str__(self) -> str:
        if self.version == 0:
            return base58btc_encode(self.multihash)
        return "b" + base32_encode(self.to_bytes())

    def __repr__(self) -> str:
        return f"CID({str(self)!r})"

    @classmethod
    def from_bytes(cls, raw: bytes) -> CID:
        if len(raw) == 2 + _DIGEST_LEN and raw[0] == _SHA2_256:
            version, codec, pos = 0, CODEC_DAG_PB, 0
        else:
            version, pos = _read_varint(raw, 0)
            if version != 1:
                raise InvalidCIDError(f"unknown CID version {version}")
            codec, pos = _read_varint(raw, pos)
        hash_code, pos = _read_varint(raw, pos)
        length, pos = _read_varint(raw, pos)
        if hash_code != _SHA2_256 or length != _DIGEST_LEN:
            raise InvalidCIDError(
                f"unsupported multihash 0x{hash_code:x}/{length}: only sha2-256 (0x12, 32 bytes)"
            )
        if len(raw) != pos + _DIGEST_LEN:
            raise InvalidCIDError(f"digest is {len(raw) - pos} bytes, expected {_DIGEST_LEN}")
        return cls(version, codec, raw[pos:])

    @classmethod
    def parse(cls, text: str) -> CID:
        """Parse `Qm…` (CIDv0, base58btc) or `b…` (CIDv1, base32 lowercase)."""
        try:
            if len(text) == 46 and text.startswith("Qm"):
                cid = cls.from_bytes(base58btc_decode(text))
            elif text.startswith("b"):
                cid = cls.from_bytes(base32_decode(text[1:]))
                if cid.version != 1:
                    raise InvalidCIDError("a CIDv0 is written in base58btc, not base32")
            else:
                raise InvalidCIDError("expected a 'Qm…' CIDv0 or a 'b…' base32 CIDv1")
            # Refuse spellings that decode but are not the canonical form
            # (e.g. stray trailing bits in base32): one block, one string.
            if str(cid) != text:
                raise InvalidCIDError(f"non-canonical spelling of {cid}")
        except InvalidCIDError as exc:
            shown = text if len(text) <= 100 else text[:100] + "…"  # name it, do not echo megabytes
            raise InvalidCIDError(f"not a valid CID: {shown!r}: {exc}") from None
        return cid


# --- dag-pb / UnixFS encoding ---------------------------------------------------

# UnixFS Data message fields: Type=1 (File=2), Data=2, filesize=3, blocksizes=4
# (repeated, not packed: proto2). PBNode: Links=2 written before Data=1, the
# canonical dag-pb order. PBLink: Hash=1, Name=2 (present and empty), Tsize=3.


def _leaf_framing(n: int) -> tuple[bytes, bytes]:
    """Bytes before and after an n-byte chunk in its dag-pb UnixFS leaf."""
    if n == 0:
        # Kubo leaves Data out of an empty leaf: 0a 04 08 02 18 00.
        unixfs_head, tail = b"\x08\x02", b"\x18\x00"
    else:
        unixfs_head, tail = b"\x08\x02\x12" + _varint(n), b"\x18" + _varint(n)
    unixfs_len = len(unixfs_head) + n + len(tail)
    return b"\x0a" + _varint(unixfs_len) + unixfs_head, tail


def _leaf_cid(
    chunk: memoryview, cid_version: int, *, raw: bool, framing: tuple[bytes, bytes] | None = None
) -> CID:
    """A leaf's CID: a raw block, or the chunk in its dag-pb framing (``_leaf_framing``),
    hashed around it in place rather than concatenated into a block."""
    if raw:
        # Raw blocks have no CIDv0 form: Kubo makes raw leaves CIDv1 even under a v0 root.
        return CID(1, CODEC_RAW, hashlib.sha256(chunk).digest())
    head, tail = framing or _leaf_framing(len(chunk))
    h = hashlib.sha256(head)
    h.update(chunk)
    h.update(tail)
    return CID(cid_version, CODEC_DAG_PB, h.digest())


class _Link(NamedTuple):
    cid: CID
    tsize: int  # serialized bytes of the whole subtree (dag-pb Tsize)
    filesize: int  # file bytes under this subtree (UnixFS blocksizes entry)


def _encode_parent(links: list[_Link]) -> bytes:
    parts = []
    for link in links:
        hash_bytes = link.cid.to_bytes()
        body = b"\x0a" + _varint(len(hash_bytes)) + hash_bytes + b"\x12\x00\x18" + _varint(link.tsize)
        parts.append(b"\x12" + _varint(len(body)) + body)
    filesize = sum(link.filesize for link in links)
    unixfs = b"\x08\x02\x18" + _varint(filesize)
    unixfs += b"".join(b"\x20" + _varint(link.filesize) for link in links)
    parts.append(b"\x0a" + _varint(len(unixfs)) + unixfs)
    return b"".join(parts)


# --- the streaming builder ------------------------------------------------------


class CidBuilder:
    """Feed a file's bytes in any pieces with `update`; `finish` returns its CID.

    `on_block(cid, block)`, if given, receives every block as it is made,
    children before their parent and the root last, so a block store can keep them; without it
    leaf bytes are only hashed, never copied into a block.

    `chunk_size` is `ipfs add --chunker size-N`; `max_links` is fixed at 174 in
    Kubo and is a parameter only so tests can build deep DAGs from small inputs.
    """

    def __init__(
        self,
        *,
        cid_version: int = 0,
        raw_leaves: bool | None = None,
        on_block: BlockSink | None = None,
        chunk_size: int = CHUNK_SIZE,
        max_links: int = MAX_LINKS,
    ) -> None:
        if cid_version not in (0, 1):
            raise ValueError(f"cid_version must be 0 or 1 (as `ipfs add --cid-version`), got {cid_version!r}")
        # Kubo refuses chunks over 1 MiB: blocks larger than that do not travel over bitswap.
        if not 1 <= chunk_size <= 1_048_576:
            raise ValueError(f"chunk_size must be 1..1048576 bytes (Kubo's limit), got {chunk_size!r}")
        if max_links < 2:
            raise ValueError(f"max_links must be at least 2, got {max_links!r}")
        self.cid_version = cid_version
        # `ipfs add --cid-version 1` implies --raw-leaves unless told otherwise.
        self.raw_leaves = cid_version == 1 if raw_leaves is None else raw_leaves
        self._on_block = on_block
        self._chunk_size = chunk_size
        self._max_links = max_links
        self._full_framing = _leaf_framing(chunk_size)
        self._buf = bytearray(chunk_size)
        self._view = memoryview(self._buf)
        self._fill = 0
        self._size = 0
        self._leaf_count = 0
        # _levels[k]: finished nodes at height k (0 = leaves) not yet under a parent.
        self._levels: list[list[_Link]] = [[]]
        self._root: CID | None = None

    @property
    def size(self) -> int:
        """Bytes fed so far."""
        return self._size

    def update(self, data: BytesLike) -> None:
        if self._root is not None:
            raise RuntimeError("CidBuilder.update() after finish(): start a new builder")
        chunk_size = self._chunk_size
        view = memoryview(data).cast("B")
        n = len(view)
        self._size += n
        pos = 0
        if self._fill:
            take = min(chunk_size - self._fill, n)
            self._buf[self._fill : self._fill + take] = view[:take]
            self._fill += take
            pos = take
            if self._fill == chunk_size:
                self._add_leaf(self._view)
                self._fill = 0
        # Whole chunks straight from the caller's buffer: hashed, never copied.
        while n - pos >= chunk_size:
            self._add_leaf(view[pos : pos + chunk_size])
            pos += chunk_size
        if pos < n:
            self._buf[: n - pos] = view[pos:]
            self._fill = n - pos

    def finish(self) -> CID:
        """The root CID; the builder takes no more input after this."""
        if self._root is not None:
            return self._root
        # A partial last chunk, or the one empty leaf of an empty file.
        if self._fill or self._leaf_count == 0:
            self._add_leaf(self._view[: self._fill])
            self._fill = 0
        height = 0
        while True:
            level = self._levels[height]
            if height == len(self._levels) - 1 and len(level) == 1:
                self._root = level[0].cid
                # Drop the chunk buffer: a finished builder may be kept around.
                self._buf = bytearray()
                self._view = memoryview(self._buf)
                return self._root
            if level:
                # Even a lone node goes under a parent here: nodes above it exist.
                self._push(height + 1, self._make_parent(level))
                level.clear()
            height += 1

    def _add_leaf(self, chunk: memoryview) -> None:
        self._leaf_count += 1
        n = len(chunk)
        if self.raw_leaves:
            cid = _leaf_cid(chunk, self.cid_version, raw=True)
            tsize = n
            if self._on_block is not None:
                self._on_block(cid, chunk.tobytes())
        else:
            head, tail = self._full_framing if n == self._chunk_size else _leaf_framing(n)
            cid = _leaf_cid(chunk, self.cid_version, raw=False, framing=(head, tail))
            tsize = len(head) + n + len(tail)
            if self._on_block is not None:
                self._on_block(cid, b"".join((head, chunk, tail)))
        self._push(0, _Link(cid, tsize, n))

    def _push(self, height: int, link: _Link) -> None:
        if height == len(self._levels):
            self._levels.append([])
        level = self._levels[height]
        level.append(link)
        # A full group is final: whatever follows goes under a new sibling.
        # If nothing follows, finish() finds it alone at the top: the root.
        if len(level) == self._max_links:
            parent = self._make_parent(level)
            level.clear()
            self._push(height + 1, parent)

    def _make_parent(self, links: list[_Link]) -> _Link:
        block = _encode_parent(links)
        cid = CID(self.cid_version, CODEC_DAG_PB, hashlib.sha256(block).digest())
        if self._on_block is not None:
            self._on_block(cid, block)
        tsize = len(block) + sum(link.tsize for link in links)
        return _Link(cid, tsize, sum(link.filesize for link in links))


# --- one-call helpers -----------------------------------------------------------


@runtime_checkable
class _ReadInto(Protocol):
    def readinto(self, buffer: bytearray | memoryview, /) -> int | None: ...


@runtime_checkable
class _Read(Protocol):
    def read(self, size: int = ..., /) -> bytes | None: ...


Source = _ReadInto | _Read | Iterable[BytesLike]


def _pieces(source: Source) -> Iterator[BytesLike]:
    """The source's bytes in pieces; a piece is only valid until the next one."""
    # Binary files are also iterables (of lines), so look for readinto/read first.
    if isinstance(source, _ReadInto):
        # One reused buffer: the builder hashes (or copies) each piece at once.
        buf = bytearray(CHUNK_SIZE)
        view = memoryview(buf)
        while n := source.readinto(buf):
            yield view[:n]
    elif isinstance(source, _Read):
        while piece := source.read(CHUNK_SIZE):
            yield piece
    else:
        yield from source


def cid_of_stream(source: Source, *, cid_version: int = 0, raw_leaves: bool | None = None) -> CID:
    """CID of everything read from a binary stream, or of an iterable of chunks."""
    builder = CidBuilder(cid_version=cid_version, raw_leaves=raw_leaves)
    for piece in _pieces(source):
        builder.update(piece)
    return builder.finish()


def cid_of_bytes(data: BytesLike, *, cid_version: int = 0, raw_leaves: bool | None = None) -> CID:
    view = memoryview(data).cast("B")
    if len(view) <= CHUNK_SIZE and cid_version in (0, 1):
        # One chunk: its leaf is the root. Hashed in place (a CidBuilder would first copy it
        # into a chunk buffer of its own): envelopes and small blobs are hashed on every call.
        return _leaf_cid(view, cid_version, raw=cid_version == 1 if raw_leaves is None else raw_leaves)
    builder = CidBuilder(cid_version=cid_version, raw_leaves=raw_leaves)
    builder.update(view)
    return builder.finish()


def cid_of_file(path: str | PathLike[str], *, cid_version: int = 0, raw_leaves: bool | None = None) -> CID:
    """CID that `ipfs add [--cid-version 1 --raw-leaves] PATH` prints for a regular file."""
    # Unbuffered: readinto then fills our chunk buffer straight from the kernel.
    with open(path, "rb", buffering=0) as f:
        return cid_of_stream(f, cid_version=cid_version, raw_leaves=raw_leaves)


def iter_blocks(
    source: Source, *, cid_version: int = 0, raw_leaves: bool | None = None
) -> Iterator[tuple[CID, bytes]]:
    """Every block of the source's DAG as `(cid, block)`, children before parents, root last.

    Holds only the blocks made from one piece of input at a time.
    """
    pending: list[tuple[CID, bytes]] = []
    builder = CidBuilder(
        cid_version=cid_version,
        raw_leaves=raw_leaves,
        on_block=lambda cid, block: pending.append((cid, block)),
    )
    for piece in _pieces(source):
        builder.update(piece)
        yield from pending
        pending.clear()
    builder.finish()
    yield from pending
