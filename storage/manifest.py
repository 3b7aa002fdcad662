"""Manifests: signed, canonical JSON descriptions of a dataset, a checkpoint or an update.

A manifest is itself a blob, so one CID names a whole dataset or checkpoint,
and :func:`storage.verify.verify_tree` walks from it to every blob it names.

On disk (and on the wire) a manifest is canonical JSON — sorted keys, no
whitespace, UTF-8, no NaN — of::

    {"panal_manifest": 1, "kind": "dataset", "body": {...},
     "signer": <base64 Ed25519 key>, "timestamp_ms": ..., "nonce": <base64>,
     "signature": <base64>}

The signature is the trust layer's (protocol.envelope.canonical_bytes) with
kind ``panal.manifest.<kind>`` and the SHA-256 of the canonical JSON of
``body`` as the payload digest. The digest is taken of the body exactly as
parsed, never of a re-validated copy, so any signer producing canonical JSON
verifies here.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from protocol.envelope import NONCE_BYTES, canonical_bytes
from protocol.errors import MalformedMessage, NotAuthorized
from protocol.hashing import sha256
from protocol.identity import Identity, fingerprint, verify_signature
from protocol.replay import now_ms
from storage.cid import CID
from storage.errors import MessageTooLarge

FORMAT_VERSION = 1
MAX_MANIFEST_BYTES = 16 * 1024 * 1024


def canonical_json(value: Any) -> bytes:
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode()


def _cid(value: str) -> str:
    CID.parse(value)  # raises a ValueError naming the bad string
    return value


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    def children(self) -> list[tuple[str, str]]:
        """(role, CID) of every blob this manifest names."""
        return []


class ShardEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    cid: str
    split: Literal["train", "val"]
    tokens: int = Field(ge=0)
    sequences: int = Field(ge=0)

    _check_cid = field_validator("cid")(_cid)


class DatasetManifest(_Body):
    kind: Literal["dataset"] = "dataset"
    name: str
    tokenizer_cid: str
    vocab_size: int = Field(gt=0)
    seq_len: int = Field(gt=0)
    token_dtype: Literal["uint16", "uint32"]
    shards: list[ShardEntry]
    stats: dict[str, int] = Field(default_factory=dict)

    _check_cid = field_validator("tokenizer_cid")(_cid)

    def children(self) -> list[tuple[str, str]]:
        return [("tokenizer", self.tokenizer_cid)] + [(f"shard {s.split}", s.cid) for s in self.shards]


class StageEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    stage: int = Field(ge=0)
    cid: str
    layer_start: int = Field(ge=0)
    layer_end: int = Field(ge=0)
    # Optimizer state (Adam moments, schedule position) per data-parallel rank, for exact resume.
    optimizer: list[str] = Field(default_factory=list)

    _check_cid = field_validator("cid")(_cid)

    @field_validator("optimizer")
    @classmethod
    def _check_cids(cls, v: list[str]) -> list[str]:
        return [_cid(c) for c in v]


class CheckpointManifest(_Body):
    kind: Literal["checkpoint"] = "checkpoint"
    job: str
    round: int = Field(ge=0)
    step: int = Field(ge=0)
    model_config_json: dict[str, Any]
    stages: list[StageEntry]
    parent: str | None = None
    dataset_cid: str | None = None

    @field_validator("parent", "dataset_cid")
    @classmethod
    def _optional_cid(cls, v: str | None) -> str | None:
        return None if v is None else _cid(v)

    def children(self) -> list[tuple[str, str]]:
        kids = [(f"stage {s.stage}", s.cid) for s in self.stages]
        kids += [
            (f"stage {s.stage} optimizer {r}", c) for s in self.stages for r, c in enumerate(s.optimizer)
        ]
        if self.parent:
            kids.append(("parent checkpoint", self.parent))
        return kids


class UpdateManifest(_Body):
    kind: Literal["update"] = "update"
    job: str
    round: int = Field(ge=0)
    pool: str
    stage: int = Field(ge=0)
    node: str
    cid: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    tokens: int = Field(ge=0)
    loss: float
    norm: float = Field(ge=0)
    compression: Literal["none", "fp16", "int8"] = "none"
    base_weights_cid: str | None = None

    _check_cid = field_validator("cid")(_cid)

    def children(self) -> list[tuple[str, str]]:
        return [("pseudo-gradient", self.cid)]


BODIES: dict[str, type[_Body]] = {
    "dataset": DatasetManifest,
    "checkpoint": CheckpointManifest,
    "update": UpdateManifest,
}
Manifest = DatasetManifest | CheckpointManifest | UpdateManifest


class Signed(BaseModel):
    """A verified manifest: its body, who signed it, and when."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)
    kind: str
    body: _Body
    signer: bytes
    timestamp_ms: int

    @property
    def signer_id(self) -> str:
        return fingerprint(self.signer)


def _signed_bytes(
    kind: str, body_json: bytes, body: dict[str, Any], signer: bytes, ts: int, nonce: bytes
) -> bytes:
    return canonical_bytes(
        kind=f"panal.manifest.{kind}",
        job=str(body.get("job", "")),
        round=int(body.get("round", 0)),
        sender=signer,
        timestamp_ms=ts,
        nonce=nonce,
        payload_sha256=sha256(body_json),
    )


def sign(body: _Body, identity: Identity) -> bytes:
    """The canonical JSON bytes of ``body`` signed by ``identity``: ready to put in a store."""
    plain = body.model_dump(mode="json")
    kind = plain["kind"]
    ts, nonce = now_ms(), os.urandom(NONCE_BYTES)
    signature = identity.sign(
        _signed_bytes(kind, canonical_json(plain), plain, identity.public_key, ts, nonce)
    )
    return canonical_json(
        {
            "panal_manifest": FORMAT_VERSION,
            "kind": kind,
            "body": plain,
            "signer": base64.b64encode(identity.public_key).decode(),
            "timestamp_ms": ts,
            "nonce": base64.b64encode(nonce).decode(),
            "signature": base64.b64encode(signature).decode(),
        }
    )


def looks_like_manifest(data: bytes) -> bool:
    return data[:1] == b"{" and b'"panal_manifest"' in data[:4096] + data[-4096:]


def _b64(value: Any, what: str) -> bytes:
    if not isinstance(value, str):
        raise MalformedMessage(f"manifest field {what!r} must be a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except binascii.Error as e:
        raise MalformedMessage(f"manifest field {what!r} is not valid base64") from e


def verify(data: bytes, *, trusted: set[bytes] | None = None) -> Signed:
    """Parse, validate and verify a manifest blob.

    With ``trusted``, the signer must be one of those public keys.
    Raises MalformedMessage, SignatureError, NotAuthorized or MessageTooLarge.
    """
    if len(data) > MAX_MANIFEST_BYTES:
        raise MessageTooLarge(f"manifest is {len(data)} bytes; the limit is {MAX_MANIFEST_BYTES}")
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MalformedMessage(f"manifest is not JSON: {e}") from e
    if not isinstance(doc, dict) or doc.get("panal_manifest") != FORMAT_VERSION:
        raise MalformedMessage(f"not a panal manifest (format version {FORMAT_VERSION} expected)")
    kind = doc.get("kind")
    if kind not in BODIES:
        raise MalformedMessage(f"unknown manifest kind {kind!r}; known: {', '.join(BODIES)}")
    raw_body = doc.get("body")
    if not isinstance(raw_body, dict):
        raise MalformedMessage("manifest body must be a JSON object")
    signer = _b64(doc.get("signer"), "signer")
    nonce = _b64(doc.get("nonce"), "nonce")
    signature = _b64(doc.get("signature"), "signature")
    ts = doc.get("timestamp_ms")
    if not isinstance(ts, int) or ts < 0:
        raise MalformedMessage("manifest timestamp_ms must be a non-negative integer")
    try:
        body = BODIES[kind].model_validate(raw_body)
    except ValidationError as e:
        raise MalformedMessage(f"{kind} manifest is invalid: {e}") from e
    if len(signer) != 32 or len(nonce) != NONCE_BYTES:
        raise MalformedMessage("manifest signer must be 32 bytes and nonce 16 bytes")
    verify_signature(
        signer, _signed_bytes(kind, canonical_json(raw_body), raw_body, signer, ts, nonce), signature
    )
    if trusted is not None and signer not in trusted:
        raise NotAuthorized(f"manifest signed by {fingerprint(signer)}, who is not trusted here")
    return Signed(kind=kind, body=body, signer=signer, timestamp_ms=ts)
