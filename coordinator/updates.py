"""Checking an update's blob: every check a pseudo-gradient from another operator must pass.

The envelope (signature, replay, job and round) was checked by the interceptor
and the assignment by the coordinator; this module checks the blob the update
names: its size, its SHA-256 against the signed request, its CID (the store
verifies on read), that it is safetensors with exactly the stage's tensor
names, shapes and dtypes (after the job's compression), and that every value
is finite. Each failure raises an exception whose message is the rejection
reason recorded and sent back to the node.
"""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor

import torch

from protocol import panal_pb2 as pb
from protocol.errors import IntegrityError, MessageTooLarge
from protocol.hashing import sha256
from storage import compression, tensors
from storage.blobstore import BlobStore
from storage.tensors import TensorLimits, TensorSpec

# Headroom over the stage's own size (an fp32 pseudo-gradient is as large as the weights).
SIZE_SLACK = 1.05
HEADER_SLACK = 64 * 1024


def max_update_bytes(weights_spec: dict[str, TensorSpec]) -> int:
    fp32 = sum(4 * _numel(s.shape) for s in weights_spec.values())
    return int(fp32 * SIZE_SLACK) + HEADER_SLACK + 64 * len(weights_spec)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def make_update_id(job: str, round: int, request: pb.SubmitUpdateRequest, node_id: str) -> str:
    """An update's id: a function of what it is, so anyone re-verifying a round derives the same."""
    key = f"{job}/{round}/{request.pool}/{request.stage}/{node_id}/{request.blob_cid}"
    return hashlib.sha256(key.encode()).hexdigest()[:24]


def load_update(
    store: BlobStore,
    request: pb.SubmitUpdateRequest,
    *,
    weights_spec: dict[str, TensorSpec],
    method: str,
) -> dict[str, torch.Tensor]:
    """The pseudo-gradient the update names, decompressed to FP32, after every check."""
    if request.compression != method:
        raise IntegrityError(f"update is compressed with {request.compression!r}; this job uses {method!r}")
    limit = max_update_bytes(weights_spec)
    if request.blob_bytes > limit:
        raise MessageTooLarge(
            f"update blob declares {request.blob_bytes} bytes; the limit for this stage is {limit}"
        )
    data = store.get_bytes(request.blob_cid, max_bytes=limit)  # verified against its CID
    if len(data) != request.blob_bytes:
        raise IntegrityError(
            f"update blob is {len(data)} bytes; the signed request says {request.blob_bytes}"
        )

    def check_signed_digest(digest: bytes) -> None:
        if digest != request.blob_sha256:
            raise IntegrityError("update blob's SHA-256 does not match the one in the signed request")

    if len(data) <= 4 << 20:  # small: a helper thread would cost more than the hash
        check_signed_digest(sha256(data))
        return _checked_delta(data, limit, weights_spec, method)
    # Large: hashed in a helper thread (hashlib lets go of the GIL) while the blob is parsed and
    # checked, and compared before anything is returned.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="panal-sha") as pool:
        pending = pool.submit(sha256, data)
        delta = _checked_delta(data, limit, weights_spec, method)
        check_signed_digest(pending.result())
    return delta


def _checked_delta(
    data: bytes, limit: int, weights_spec: dict[str, TensorSpec], method: str
) -> dict[str, torch.Tensor]:
    limits = TensorLimits(
        max_bytes=limit,
        max_tensors=3 * len(weights_spec) + 1,
        allowed_dtypes=frozenset({"F32", "F16", "I8", "I64"}),
    )
    loaded = tensors.load(data, limits, expected=compression.expected_spec(method, weights_spec))
    float_dtype = {"none": torch.float32, "fp16": torch.float16}.get(method)
    if float_dtype is not None and compression.all_finite_bytes(tensors.data_section(data), float_dtype):
        # Every tensor is of the method's float dtype (the schema says so) and the data section is
        # exactly their bytes: one pass has checked every value. (A second pass over a large
        # stage would cost as much as the rest of these checks together.)
        delta = {k: loaded[k] if method == "none" else loaded[k].float() for k in sorted(loaded)}
    else:
        # int8: decompress checks the scales, so q × scale is finite; a float update that failed
        # the pass above: decompress names the tensor holding NaN or ±inf.
        delta = compression.decompress(loaded, method, copy=False)  # load's own copies
    tensors.check_schema(
        tensors.spec_of(delta), {k: TensorSpec("F32", s.shape) for k, s in weights_spec.items()}
    )
    return delta
