"""An update's blob checked as the coordinator checks it (``coordinator.updates.load_update``),
against a real local blob store: every compression method, and blobs that lie."""

import math

import pytest
import torch

from coordinator.updates import load_update
from protocol import panal_pb2 as pb
from protocol.errors import IntegrityError, MalformedMessage
from protocol.hashing import sha256
from storage import compression, tensors
from storage.stores import open_store

WEIGHTS = {
    "h.0.attn.weight": tensors.TensorSpec("F32", (48, 16)),
    "h.0.ln.bias": tensors.TensorSpec("F32", (16,)),
    "h.0.mlp.weight": tensors.TensorSpec("F32", (64, 16)),
}


@pytest.fixture
def store(tmp_path):
    return open_store(f"local:{tmp_path / 'store'}")


def delta(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {k: 1e-3 * torch.randn(s.shape, generator=g) for k, s in WEIGHTS.items()}


def request(store, blob, method):
    cid = store.put_bytes(blob)
    return pb.SubmitUpdateRequest(
        blob_cid=str(cid), blob_sha256=sha256(blob), blob_bytes=len(blob), compression=method
    )


@pytest.mark.parametrize("method", compression.METHODS)
def test_an_honest_update_loads_as_its_float32_values(store, method):
    d = delta()
    blob = tensors.dump(compression.compress(d, method))
    got = load_update(store, request(store, blob, method), weights_spec=WEIGHTS, method=method)
    assert list(got) == sorted(WEIGHTS)
    want = compression.decompress(tensors.load(blob), method)
    for k in WEIGHTS:
        assert got[k].dtype == torch.float32 and got[k].shape == WEIGHTS[k].shape
        assert torch.equal(got[k], want[k])


@pytest.mark.parametrize("method", ["none", "fp16"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("name", sorted(WEIGHTS))
def test_a_non_finite_value_anywhere_is_refused_naming_its_tensor(store, method, bad, name):
    """The coordinator checks every value in one pass over the file; the reason still names the tensor."""
    d = delta()
    d[name].view(-1)[-1] = bad  # the last value of the tensor, wherever it sits in the file
    dtype = torch.float32 if method == "none" else torch.float16
    blob = tensors.dump({k: v.to(dtype) for k, v in d.items()})
    with pytest.raises(MalformedMessage, match=f"{name!r} holds NaN or infinite"):
        load_update(store, request(store, blob, method), weights_spec=WEIGHTS, method=method)


def test_blobs_that_lie_are_refused(store):
    blob = tensors.dump(delta())
    req = request(store, blob, "none")
    with pytest.raises(IntegrityError, match="compressed with 'none'; this job uses 'fp16'"):
        load_update(store, req, weights_spec=WEIGHTS, method="fp16")
    wrong = pb.SubmitUpdateRequest()
    wrong.CopyFrom(req)
    wrong.blob_sha256 = sha256(b"other")
    with pytest.raises(IntegrityError, match="SHA-256"):
        load_update(store, wrong, weights_spec=WEIGHTS, method="none")
    short = {k: v for k, v in delta().items() if k != "h.0.ln.bias"}
    with pytest.raises(tensors.SchemaError, match="missing tensors: h.0.ln.bias"):
        load_update(store, request(store, tensors.dump(short), "none"), weights_spec=WEIGHTS, method="none")
    half = tensors.dump({k: v.half() for k, v in delta().items()})
    with pytest.raises(tensors.SchemaError, match="dtype F16, expected F32"):
        load_update(store, request(store, half, "none"), weights_spec=WEIGHTS, method="none")
