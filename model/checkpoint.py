"""Checkpoints in the blob store: safetensors per stage plus a signed checkpoint manifest.

Collective: every rank of the pool calls save/load together. Each stage's
weights (FP32 master values) are one blob; each rank's optimizer state (its
ZeRO partition of the master weights and Adam moments, the step and the
schedule position) is another, so a reload resumes exactly. Rank 0 signs the
manifest; its CID is returned on every rank.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as tdist

from model.engine import EngineError, StageEngine
from protocol.identity import Identity
from storage import manifest, tensors
from storage.blobstore import BlobStore
from storage.manifest import CheckpointManifest, StageEntry

_CID_BYTES = 96  # a CID string fits (CIDv0: 46 chars, CIDv1 base32: 59)


def _encode(text: str) -> torch.Tensor:
    raw = text.encode()
    if len(raw) > _CID_BYTES:
        raise EngineError(f"CID {text!r} longer than {_CID_BYTES} bytes")
    return torch.tensor(list(raw.ljust(_CID_BYTES, b"\0")), dtype=torch.uint8)


def _decode(t: torch.Tensor) -> str:
    return bytes(t.tolist()).rstrip(b"\0").decode()


@dataclass
class _Entry:
    start: int
    stop: int
    weights: str = ""
    optimizer: dict[int, str] = field(default_factory=dict)


def _all_gather_rows(row: torch.Tensor) -> list[torch.Tensor]:
    rows = [torch.empty_like(row) for _ in range(tdist.get_world_size())]
    tdist.all_gather(rows, row)
    return rows


def save_checkpoint(
    engine: StageEngine,
    store: BlobStore,
    identity: Identity,
    *,
    job: str,
    round: int = 0,
    dataset_cid: str | None = None,
    parent: str | None = None,
) -> str:
    """Write this pool's checkpoint; every rank returns the manifest's CID."""
    weights = engine.get_weights()  # collective over the data-parallel group
    w_cid = str(store.put_bytes(tensors.dump(weights), pin=True)) if engine.dp_rank == 0 else ""
    o_cid = str(store.put_bytes(tensors.dump(engine.optimizer_state()), pin=True))
    meta = torch.tensor(
        [engine.stage_id, engine.dp_rank, engine.layer_range.start, engine.layer_range.stop],
        dtype=torch.int64,
    )
    metas = _all_gather_rows(meta)
    w_rows = _all_gather_rows(_encode(w_cid))
    o_rows = _all_gather_rows(_encode(o_cid))
    cid_row = torch.zeros(_CID_BYTES, dtype=torch.uint8)
    if tdist.get_rank() == 0:
        entries: dict[int, _Entry] = {}
        for m, w, o in zip(metas, w_rows, o_rows, strict=True):
            stage, dp_rank, start, stop = (int(x) for x in m.tolist())
            entry = entries.setdefault(stage, _Entry(start, stop))
            if dp_rank == 0:
                entry.weights = _decode(w)
            entry.optimizer[dp_rank] = _decode(o)
        body = CheckpointManifest(
            job=job,
            round=round,
            step=engine.global_steps,
            model_config_json=engine.config.to_dict(),
            stages=[
                StageEntry(
                    stage=s,
                    cid=e.weights,
                    layer_start=e.start,
                    layer_end=e.stop,
                    optimizer=[e.optimizer[r] for r in sorted(e.optimizer)],
                )
                for s, e in sorted(entries.items())
            ],
            parent=parent,
            dataset_cid=dataset_cid,
        )
        cid_row = _encode(str(store.put_bytes(manifest.sign(body, identity), pin=True)))
    tdist.broadcast(cid_row, src=0)
    return _decode(cid_row)


def load_checkpoint(
    engine: StageEngine,
    store: BlobStore,
    cid: str,
    *,
    trusted: set[bytes] | None = None,
    with_optimizer: bool = True,
) -> CheckpointManifest:
    """Load a checkpoint into this rank's stage (weights, and optimizer state for an exact resume)."""
    signed = manifest.verify(store.get_bytes(cid, max_bytes=manifest.MAX_MANIFEST_BYTES), trusted=trusted)
    body = signed.body
    if not isinstance(body, CheckpointManifest):
        raise EngineError(f"{cid} is a {signed.kind} manifest, not a checkpoint")
    if body.model_config_json != engine.config.to_dict():
        raise EngineError(f"checkpoint {cid} is for another model config; use the one it was saved with")
    entries = {e.stage: e for e in body.stages}
    if len(entries) != engine.world.stages:
        raise EngineError(
            f"checkpoint {cid} has {len(entries)} stages, this pool has {engine.world.stages}; "
            "resume with the same --stages"
        )
    entry = entries[engine.stage_id]
    engine.set_weights(tensors.load(store.get_bytes(entry.cid, max_bytes=tensors.TensorLimits().max_bytes)))
    if with_optimizer:
        if len(entry.optimizer) != engine.world.dp:
            raise EngineError(
                f"checkpoint {cid} was saved with data-parallel degree {len(entry.optimizer)}, "
                f"this pool has {engine.world.dp}; resume with the same layout or load weights only"
            )
        state = tensors.load(
            store.get_bytes(entry.optimizer[engine.dp_rank], max_bytes=tensors.TensorLimits().max_bytes)
        )
        engine.load_optimizer_state(state)
    return body
