"""A blob store backed by an IPFS daemon's HTTP RPC API (Kubo's ``/api/v0``).

Store URL: ``kubo:http://HOST:PORT``. The daemon is not trusted more than any
other source: every ``add`` is hashed here while it streams and the CID the
daemon answers must equal ours, and every read is re-hashed as it arrives
(``IntegrityError`` at the end of the stream on a mismatch).

How the Kubo model maps onto the BlobStore contract:

- a blob is a UnixFS file DAG; a CIDv0 is verified with Kubo's ``ipfs add``
  defaults, a CIDv1 with ``--cid-version 1 --raw-leaves`` (both with 256 KiB
  chunks); a blob added any other way fails verification;
- requests run ``offline=true`` by default: an absent CID is ``NotFound`` at
  once instead of a wait on the network (``offline=False`` lets reads and pins
  fetch from IPFS peers, bounded by the request timeout);
- ``has`` answers for the root block; ``list`` lists recursive pins only;
- ``unpin`` of an unpinned, indirectly pinned or absent CID is a no-op;
- ``gc`` returns what the daemon reports removed: every block, each named by
  the CID the blockstore keys it with. Kubo's blockstore is keyed by
  multihash, so a dag-pb root ``Qm…`` comes back as the CIDv1 *raw* ``bafkrei…``
  with the same digest: compare ``cid.digest`` to find a root in the list.
"""

from __future__ import annotations

import contextlib
import json
import secrets
from collections.abc import Iterable, Iterator
from typing import Any

import httpx

from storage.blobstore import BlobInfo, BlobStore, Progress, as_cid, check_size
from storage.cid import CID, CidBuilder, InvalidCIDError, base58btc_decode
from storage.errors import IntegrityError, MessageTooLarge, NotFound, StoreError, StoreUnavailable

SCHEME = "kubo:"
CHUNKER = "size-262144"  # must match storage.cid's CHUNK_SIZE, or our CIDs differ from the daemon's
READ_PIECE = 1 << 20

# Phrases the daemons use for "no such block here" (Kubo, then js-ipfs).
_ABSENT = ("not found", "could not find", "no such", "does not exist")
_NOT_PINNED = ("not pinned",)

# Module-level names: inside the class, `list` is the BlobStore method.
CIDList = list[CID]
JSONLines = list[dict[str, Any]]


class KuboStore(BlobStore):
    """Blobs on an IPFS daemon, reached over its HTTP RPC API."""

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 60.0,
        offline: bool = True,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        api = url.removeprefix(SCHEME).rstrip("/")
        if not api.startswith(("http://", "https://")):
            raise StoreError(f"a Kubo store URL looks like kubo:http://127.0.0.1:5001, got {url!r}")
        self.url = SCHEME + api
        self.api = api + "/api/v0"
        self.offline = offline
        # Connecting is quick or never: fail fast on a dead port, wait longer for answers.
        self._client = httpx.Client(
            timeout=httpx.Timeout(timeout, connect=min(timeout, 5.0)), transport=transport
        )
        try:
            self.version = self._check_version()
        except BaseException:
            self._client.close()
            raise

    def close(self) -> None:
        self._client.close()

    def __repr__(self) -> str:
        return f"KuboStore({self.url!r})"

    # ---------------------------------------------------------------- writes

    def put_chunks(
        self,
        chunks: Iterable[bytes],
        *,
        cid_version: int = 0,
        pin: bool = False,
        progress: Progress | None = None,
    ) -> CID:
        builder = CidBuilder(cid_version=cid_version)
        boundary = secrets.token_hex(16)
        sent_all = False

        def body() -> Iterator[bytes]:
            # One multipart part, streamed: the data is never held whole in memory.
            nonlocal sent_all
            yield (
                f"--{boundary}\r\n"
                'Content-Disposition: form-data; name="file"; filename="blob"\r\n'
                "Content-Type: application/octet-stream\r\n\r\n"
            ).encode()
            for part in chunks:
                if not part:
                    continue
                chunk = part if isinstance(part, bytes) else bytes(part)  # HTTP bodies are bytes
                builder.update(chunk)
                yield chunk
                if progress:
                    progress(len(chunk))
            yield f"\r\n--{boundary}--\r\n".encode()
            sent_all = True

        params = {
            "cid-version": str(cid_version),
            "raw-leaves": _flag(cid_version == 1),
            "chunker": CHUNKER,
            "pin": _flag(pin),
            "hash": "sha2-256",
            "progress": "false",
        }
        headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
        lines = self._call("add", params, content=body(), headers=headers)
        answered = [line["Hash"] for line in lines if "Hash" in line]
        if not sent_all or not answered:
            raise StoreError(f"{self.url}: the daemon answered add before it had read the whole blob")
        ours, theirs = builder.finish(), _parse_cid(answered[-1])
        if ours != theirs:
            raise IntegrityError(
                f"{self.url} stored the blob as {theirs}, but its bytes hash to {ours} "
                f"(CIDv{cid_version}, chunker {CHUNKER}): the daemon changed the data or adds differently"
            )
        return ours

    # ----------------------------------------------------------------- reads

    def iter_chunks(self, cid: CID | str, *, max_bytes: int | None = None) -> Iterator[bytes]:
        # Checked now, not at the first next(): an absent or oversized blob fails at the call.
        cid = as_cid(cid)
        size = self._size(cid)
        check_size(size, max_bytes, cid)
        return self._verified_cat(cid, size, max_bytes)

    def _verified_cat(self, cid: CID, size: int, max_bytes: int | None) -> Iterator[bytes]:
        builder = CidBuilder(cid_version=cid.version)
        received = 0
        params = {"arg": str(cid), **self._net()}
        with self._stream("cat", params) as response:
            for piece in response.iter_bytes(READ_PIECE):
                received += len(piece)
                # Counted as bytes arrive: a daemon that streams more than it said
                # (or than the caller allows) is cut off, not buffered.
                if max_bytes is not None and received > max_bytes:
                    raise MessageTooLarge(f"{self.url} sent more than the {max_bytes}-byte limit for {cid}")
                if received > size:
                    raise IntegrityError(f"{self.url} sent more than the {size} bytes it reported for {cid}")
                builder.update(piece)
                yield piece
        got = builder.finish()
        if got != cid:
            raise IntegrityError(
                f"{self.url} returned {received} bytes for {cid} that hash to {got}: "
                "corrupted or substituted data"
            )

    def has(self, cid: CID | str) -> bool:
        # Offline, so an absent CID answers at once instead of waiting on the network.
        # Kubo holds blocks, not blobs: this asks for the root block only.
        cid = as_cid(cid)
        try:
            self._call("block/stat", {"arg": str(cid), "offline": "true"})
        except NotFound:
            return False
        return True

    def stat(self, cid: CID | str) -> BlobInfo:
        cid = as_cid(cid)
        return BlobInfo(cid=cid, size=self._size(cid), pinned=self._pinned(cid))

    def list(self) -> Iterator[BlobInfo]:
        for root in self._recursive_pins():
            # A daemon shared with other uses may pin directories too: those are not blobs.
            size = self._file_size(root)
            if size is not None:
                yield BlobInfo(cid=root, size=size, pinned=True)

    # ------------------------------------------------------------------ pins

    def pin(self, cid: CID | str) -> None:
        # Recursive: the daemon then keeps every block of the DAG through gc.
        self._call("pin/add", {"arg": str(as_cid(cid)), "recursive": "true", **self._net()})

    def unpin(self, cid: CID | str) -> None:
        """Drop the recursive pin; a no-op for an unpinned, indirectly pinned or absent CID."""
        try:
            self._call("pin/rm", {"arg": str(as_cid(cid)), "recursive": "true", "offline": "true"})
        except StoreError as exc:
            if not _says(exc, _NOT_PINNED + _ABSENT):
                raise

    def gc(self) -> CIDList:
        removed: CIDList = []
        for line in self._call("repo/gc", {}):
            if line.get("Error"):
                raise StoreError(f"{self.url}: garbage collection failed: {line['Error']}")
            key = line.get("Key")
            if key:
                removed.append(_parse_cid(key["/"] if isinstance(key, dict) else key))
        return removed

    # ------------------------------------------------------------- internals

    def _check_version(self) -> str:
        api = self.url.removeprefix(SCHEME)
        hint = f"is `ipfs daemon` running at {api}? Start it or pass --store local:PATH"
        try:
            response = self._client.post(f"{self.api}/version")
        except httpx.TransportError as exc:
            raise StoreUnavailable(f"cannot reach the IPFS RPC API at {self.api} ({exc}): {hint}") from exc
        try:
            version = response.json()["Version"] if response.status_code == 200 else None
        except (ValueError, KeyError, TypeError):
            version = None
        if not isinstance(version, str):
            raise StoreUnavailable(
                f"{self.api}/version answered HTTP {response.status_code} without an IPFS version: "
                f"not an IPFS RPC API; {hint}"
            )
        return version

    def _net(self) -> dict[str, str]:
        return {"offline": "true"} if self.offline else {}

    def _size(self, cid: CID) -> int:
        size = self._file_size(cid)
        if size is None:
            raise StoreError(f"{self.url}: {cid} is a directory, not a blob")
        return size

    def _file_size(self, cid: CID) -> int | None:
        """Bytes in the file ``cid`` names, or None if it names a directory."""
        stat = self._call("files/stat", {"arg": f"/ipfs/{cid}", **self._net()})[-1]
        if stat.get("Type") == "directory":
            return None
        size = stat.get("Size")
        if not isinstance(size, int) or size < 0:
            raise StoreError(f"{self.url}: files/stat of {cid} gave no size: {stat!r}")
        return size

    def _pinned(self, cid: CID) -> bool:
        try:
            self._call("pin/ls", {"arg": str(cid), "type": "recursive", "offline": "true"})
        except StoreError as exc:
            if _says(exc, _NOT_PINNED):
                return False
            raise
        return True

    def _recursive_pins(self) -> CIDList:
        pins: CIDList = []
        for line in self._call("pin/ls", {"type": "recursive", "stream": "true"}):
            if "Cid" in line:  # streamed form: one {"Cid", "Type"} per line
                pins.append(_parse_cid(line["Cid"]))
            for key in line.get("Keys", {}):  # unstreamed form: {"Keys": {cid: {"Type"}}}
                pins.append(_parse_cid(key))
        return pins

    def _call(
        self,
        endpoint: str,
        params: dict[str, str],
        *,
        content: Iterator[bytes] | None = None,
        headers: dict[str, str] | None = None,
    ) -> JSONLines:
        """POST and parse the newline-delimited JSON answer into a list of objects."""
        with self._stream(endpoint, params, content=content, headers=headers) as response:
            text = response.read().decode()
        lines: JSONLines = []
        for raw in text.splitlines():
            if raw.strip():
                try:
                    obj = json.loads(raw)
                except ValueError:
                    raise StoreError(
                        f"{self.url} {endpoint}: not an IPFS RPC answer: {raw[:200]!r}"
                    ) from None
                if isinstance(obj, dict) and obj.get("Type") == "error":
                    raise self._error(endpoint, params, obj.get("Message", raw))
                lines.append(obj if isinstance(obj, dict) else {"value": obj})
        return lines

    @contextlib.contextmanager
    def _stream(
        self,
        endpoint: str,
        params: dict[str, str],
        *,
        content: Iterator[bytes] | None = None,
        headers: dict[str, str] | None = None,
    ) -> Iterator[httpx.Response]:
        """A streamed POST; HTTP and transport failures become store errors.

        The client's timeout bounds every connect, read and write, so a long add
        or gc may run as long as bytes keep moving, and a silent daemon fails.
        """
        request = self._client.build_request(
            "POST", f"{self.api}/{endpoint}", params=params, content=content, headers=headers
        )
        try:
            response = self._client.send(request, stream=True)
        except httpx.TransportError as exc:
            raise StoreUnavailable(f"{self.url} {endpoint}: {exc!r}") from exc
        try:
            if response.status_code != 200:
                body = response.read().decode(errors="replace")
                try:
                    message = json.loads(body).get("Message", body)
                except (ValueError, AttributeError):
                    message = body
                raise self._error(endpoint, params, f"HTTP {response.status_code}: {message}")
            yield response
        except httpx.TransportError as exc:
            raise StoreUnavailable(f"{self.url} {endpoint}: {exc!r}") from exc
        finally:
            response.close()

    def _error(self, endpoint: str, params: dict[str, str], message: str) -> StoreError:
        what = f"{self.url} {endpoint} {params.get('arg', '')}".rstrip()
        error = StoreError(f"{what}: {message}")
        return NotFound(str(error)) if _says(error, _ABSENT) else error


def _parse_cid(text: str) -> CID:
    """A CID as a daemon prints it: Kubo writes CIDv1 in base32 (``b…``), js-ipfs in base58btc (``z…``)."""
    if text.startswith("z"):
        try:
            cid = CID.from_bytes(base58btc_decode(text[1:]))
        except InvalidCIDError as exc:
            raise InvalidCIDError(f"not a valid CID: {text!r}: {exc}") from None
        if cid.version == 1:
            return cid
    return CID.parse(text)


def _flag(value: bool) -> str:
    return "true" if value else "false"


def _says(exc: Exception, phrases: tuple[str, ...]) -> bool:
    text = str(exc).lower()
    return any(phrase in text for phrase in phrases)
