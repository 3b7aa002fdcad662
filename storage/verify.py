"""Walk a CID: verify the blob and, if it is a manifest, its signature and every blob it names."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from protocol.errors import ProtocolError
from storage import manifest
from storage.blobstore import BlobStore, as_cid
from storage.cid import CID

MAX_DEPTH = 64  # a checkpoint's parent chain is walked at most this deep


@dataclass(frozen=True)
class Check:
    cid: str
    role: str  # "root", "tokenizer", "shard train", "stage 0", "parent checkpoint", …
    ok: bool
    detail: str  # what it is, or why it failed
    depth: int


def verify_tree(
    store: BlobStore,
    cid: CID | str,
    *,
    trusted: set[bytes] | None = None,
    on_check: Callable[[Check], None] | None = None,
    max_manifest_bytes: int = manifest.MAX_MANIFEST_BYTES,
) -> list[Check]:
    """Verify ``cid`` and everything under it; return one Check per blob (all are visited).

    A manifest is recognised by its content; its children are verified
    recursively, each blob once.
    """
    checks: list[Check] = []
    seen: set[str] = set()

    def record(check: Check) -> None:
        checks.append(check)
        if on_check:
            on_check(check)

    def visit(cid_text: str, role: str, depth: int) -> None:
        if cid_text in seen:
            return
        seen.add(cid_text)
        try:
            c = as_cid(cid_text)
            info = store.stat(c)
            if info.size <= max_manifest_bytes:
                data = store.get_bytes(c, max_bytes=max_manifest_bytes)
                if manifest.looks_like_manifest(data):
                    signed = manifest.verify(data, trusted=trusted)
                    record(
                        Check(
                            cid_text,
                            role,
                            True,
                            f"{signed.kind} manifest signed by {signed.signer_id}",
                            depth,
                        )
                    )
                    if depth >= MAX_DEPTH:
                        record(Check(cid_text, role, False, f"manifest chain deeper than {MAX_DEPTH}", depth))
                        return
                    for child_role, child in signed.body.children():
                        visit(child, child_role, depth + 1)
                    return
            else:
                for _ in store.iter_chunks(c):  # verified as it streams
                    pass
            record(Check(cid_text, role, True, f"{info.size} bytes", depth))
        except (ProtocolError, ValueError) as e:
            record(Check(cid_text, role, False, f"{type(e).__name__}: {e}", depth))

    visit(str(cid), "root", 0)
    return checks
