"""Re-verify a round from the store: anyone holding the CIDs and public keys can check the coordinator.

Given the signed round result, the job spec and the coordinator's public key:

1. the result's signature is the coordinator's, for this job and round;
2. each stage's start weights are what they must be — the seed's initial weights in
   round 0, else the previous round's result;
3. every input update is an envelope signed by its node, for this job and round,
   found by its CID in the round's bundle of envelopes, naming a blob whose SHA-256
   and CID match;
4. recomputing the stage — the job's robust rule, detection, outer step — from those
   inputs gives bit-identical weights and momentum (their CIDs match the result's),
   and the same updates rejected by detection. Detection's absent-token check reads the
   train shards the result names for each pool; whether those are the shards the pool was
   assigned, its nodes check (``node.worker.shards_mismatch``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from google.protobuf.message import DecodeError

from coordinator.aggregation import AggregationError
from coordinator.defence import defend_stage
from coordinator.detection import MAJORITY
from coordinator.job import JobSpec
from coordinator.rounds import SCORE_FIELDS, finite_score
from coordinator.tokens import ShardTokens
from coordinator.updates import make_update_id
from model.stage import initial_stage_weights
from protocol import panal_pb2 as pb
from protocol.envelope import check_integrity, open_envelope
from protocol.errors import ProtocolError
from protocol.hashing import sha256
from protocol.identity import fingerprint
from storage import compression, manifest, tensors
from storage.blobstore import BlobStore
from storage.cid import cid_of_bytes
from storage.manifest import DatasetManifest

MAX_BLOB = 64 << 30
MAX_ENVELOPE = 64 << 10


@dataclass(frozen=True)
class Check:
    what: str
    ok: bool
    detail: str


def load_result(
    store: BlobStore, result_cid: str, coordinator_key: bytes, job: str, round: int
) -> pb.RoundResult:
    env = pb.Envelope.FromString(store.get_bytes(result_cid, max_bytes=16 << 20))
    if bytes(env.sender) != coordinator_key:
        raise ProtocolError(
            f"round result {result_cid} is signed by {fingerprint(bytes(env.sender))}, not the coordinator"
        )
    body = open_envelope(env, pb.RoundResult, replay=None, job=job, round=round).body
    return body  # type: ignore[return-value]


def _envelopes(store: BlobStore, result: pb.RoundResult) -> Callable[[str], bytes]:
    """An input envelope's bytes by its CID: from the round's bundle, read once when first asked
    (results from before bundles: each envelope is a blob of its own). Raises ProtocolError or ValueError."""
    bundle: dict[str, bytes] = {}

    def from_bundle(cid: str) -> bytes:
        if not bundle:
            count = sum(len(s.input_envelope_cids) for s in result.stages)
            data = store.get_bytes(result.input_envelopes_cid, max_bytes=count * (MAX_ENVELOPE + 8) + 64)
            try:
                envelopes = pb.EnvelopeBundle.FromString(data).envelopes
            except DecodeError as e:
                raise ValueError(f"{result.input_envelopes_cid} is not an envelope bundle: {e}") from e
            bundle.update((str(cid_of_bytes(e)), bytes(e)) for e in envelopes)
        if cid not in bundle:
            raise ProtocolError(f"envelope {cid} is not in the round's bundle {result.input_envelopes_cid}")
        return bundle[cid]

    if result.input_envelopes_cid:
        return from_bundle
    return lambda cid: store.get_bytes(cid, max_bytes=MAX_ENVELOPE)


def _absent(tokens: ShardTokens, cids: list[str] | None, pool: str, checks: list[Check]) -> np.ndarray | None:
    """As the coordinator's closer: the pool's absent tokens, or None (the check skipped) when a shard cannot be read."""
    if not cids:
        return None
    try:
        return tokens.absent(cids)
    except (ProtocolError, ValueError) as e:
        checks.append(
            Check(f"pool {pool} shards", False, f"cannot read them for the absent-token check: {e}")
        )
        return None


def verify_round(
    store: BlobStore,
    spec: JobSpec,
    result_cid: str,
    *,
    round: int,
    coordinator_key: bytes,
    previous_cid: str | None = None,
) -> list[Check]:
    """Every check of the module docstring, one :class:`Check` each (all are run)."""
    checks: list[Check] = []
    try:
        result = load_result(store, result_cid, coordinator_key, spec.name, round)
    except (ProtocolError, ValueError) as e:
        return [Check("round result signature", False, f"{type(e).__name__}: {e}")]
    checks.append(
        Check("round result signature", True, f"signed by the coordinator {fingerprint(coordinator_key)}")
    )
    previous = (
        load_result(store, previous_cid, coordinator_key, spec.name, round - 1) if previous_cid else None
    )
    config = spec.gpt_config()
    defence = spec.defence()
    tokens: ShardTokens | None = None
    if defence.detection.max_absent_row_ratio is not None:
        try:
            signed = manifest.verify(store.get_bytes(spec.dataset, max_bytes=manifest.MAX_MANIFEST_BYTES))
            if not isinstance(signed.body, DatasetManifest):
                raise ValueError(f"{spec.dataset} is a {signed.kind} manifest, not a dataset")
            tokens = ShardTokens(store, signed.body, config.vocab_size)
        except (ProtocolError, ValueError) as e:
            checks.append(Check("dataset", False, f"the absent-token check needs the dataset: {e}"))
    pool_shards = {p.pool: list(p.shard_cids) for p in result.pool_shards}
    envelope = _envelopes(store, result)
    for stage in result.stages:
        s = stage.stage
        # 2. the start of the round
        if round == 0:
            expected = str(
                cid_of_bytes(tensors.dump(initial_stage_weights(config, spec.stages, s, seed=spec.seed)))
            )
            source = "the seed's initial weights"
        else:
            expected = (
                next(p.weights_cid for p in previous.stages if p.stage == s)
                if previous
                else stage.start_weights_cid
            )
            source = "the previous round's result" if previous else "(previous round not given)"
        checks.append(
            Check(
                f"stage {s} start weights",
                stage.start_weights_cid == expected,
                f"{stage.start_weights_cid} is {source}",
            )
        )
        # 3. the inputs
        try:
            deltas, ids, pools = [], [], []
            for cid in stage.input_envelope_cids:
                env = pb.Envelope.FromString(envelope(cid))
                check_integrity(env)
                req: pb.SubmitUpdateRequest = open_envelope(
                    env, pb.SubmitUpdateRequest, replay=None, job=spec.name, round=round
                ).body  # type: ignore[assignment]
                data = store.get_bytes(req.blob_cid, max_bytes=MAX_BLOB)
                if sha256(data) != req.blob_sha256:
                    raise ProtocolError(f"blob {req.blob_cid} does not match the SHA-256 its node signed")
                deltas.append(compression.decompress(tensors.load(data), spec.compression))
                ids.append(make_update_id(spec.name, round, req, fingerprint(bytes(env.sender))))
                pools.append(req.pool)
            checks.append(Check(f"stage {s} inputs", True, f"{len(ids)} signed updates, blobs verified"))
        except (ProtocolError, ValueError) as e:
            checks.append(Check(f"stage {s} inputs", False, f"{type(e).__name__}: {e}"))
            continue
        # 4. the recomputation
        if stage.weights_cid == stage.start_weights_cid:
            checks.append(Check(f"stage {s} outcome", True, "the round failed: weights unchanged"))
            continue
        start = tensors.load(store.get_bytes(stage.start_weights_cid, max_bytes=MAX_BLOB))
        momentum = (
            tensors.load(store.get_bytes(stage.start_momentum_cid, max_bytes=MAX_BLOB))
            if stage.start_momentum_cid
            else None
        )
        # As the closer: shards are read only where detection has row scores (MAJORITY updates).
        absent = None
        if tokens is not None and len(pools) >= MAJORITY:
            absent = [_absent(tokens, pool_shards.get(p), p, checks) for p in pools]
        try:
            out = defend_stage(start, deltas, momentum, defence, ids, outer=spec.outer, absent=absent)
        except AggregationError as e:
            checks.append(Check(f"stage {s} outcome", False, f"recomputation failed: {e}"))
            continue
        weights_cid = str(cid_of_bytes(tensors.dump(out.weights)))
        momentum_cid = str(cid_of_bytes(tensors.dump(out.momentum)))
        rejected = {v.id for v in out.verdicts if not v.accepted}
        published = {r.update_id for r in stage.rejected if r.reason.startswith("rejected by detection")}
        scores = [
            (
                v.id,
                v.accepted,
                v.score.row,
                v.score.absent_row,
                *(finite_score(getattr(v.score, k)) for k in SCORE_FIELDS),
            )
            for v in out.verdicts
        ]
        said = [
            (x.update_id, x.accepted, x.row, x.absent_row, *(getattr(x, k) for k in SCORE_FIELDS))
            for x in stage.scores
        ]
        same = (
            weights_cid == stage.weights_cid
            and momentum_cid == stage.momentum_cid
            and rejected == published
            and scores == said
        )
        checks.append(
            Check(
                f"stage {s} outcome",
                same,
                f"recomputed weights {weights_cid}, momentum {momentum_cid}, {len(rejected)} rejected by detection"
                + ("" if scores == said else ", detection scores that differ from the published ones")
                + (
                    ""
                    if same
                    else f"; the result says {stage.weights_cid}, {stage.momentum_cid}, {len(published)}"
                ),
            )
        )
    return checks
