"""Tensors from outside: safetensors only, parsed under limits, never unpickled."""

import json
import pickle
import struct

import pytest
import torch

from protocol.errors import MalformedMessage, MessageTooLarge
from storage import tensors
from storage.tensors import SchemaError, TensorLimits, TensorSpec


def sample():
    g = torch.Generator().manual_seed(0)
    return {
        "w": torch.randn(4, 8, generator=g),
        "b": torch.randn(8, generator=g).to(torch.bfloat16),
        "i": torch.arange(5, dtype=torch.int64),
    }


def test_round_trip_is_exact():
    data = tensors.dump(sample(), {"stage": "0"})
    back = tensors.load(data)
    for k, v in sample().items():
        assert torch.equal(back[k], v) and back[k].dtype == v.dtype


def test_shared_and_noncontiguous_tensors_are_saved():
    w = torch.randn(8, 8)
    back = tensors.load(tensors.dump({"a": w, "a_t": w.t(), "view": w[:2]}))
    assert torch.equal(back["a_t"], w.t())


def test_story_a_pickle_is_refused():
    """A peer sends a pickle (which could run code on load): it is not even parsed."""
    evil = pickle.dumps({"w": torch.zeros(2)})
    with pytest.raises(MalformedMessage):
        tensors.load(evil)


def test_header_claiming_more_than_the_file():
    data = struct.pack("<Q", 10**9) + b"{}"
    with pytest.raises(MalformedMessage, match="header claims"):
        tensors.load(data)


def test_limits_bytes_count_dtype():
    data = tensors.dump(sample())
    with pytest.raises(MessageTooLarge):
        tensors.load(data, TensorLimits(max_bytes=len(data) - 1))
    with pytest.raises(MessageTooLarge, match="tensors"):
        tensors.load(data, TensorLimits(max_tensors=2))
    with pytest.raises(MalformedMessage, match="dtype 'BF16'"):
        tensors.load(data, TensorLimits(allowed_dtypes=frozenset({"F32", "I64"})))


def test_shape_lying_about_its_bytes():
    data = bytearray(tensors.dump({"w": torch.zeros(4, 4)}))
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    header["w"]["shape"] = [4, 5]
    new = json.dumps(header, separators=(",", ":")).encode().ljust(n)
    assert len(new) == n
    with pytest.raises(MalformedMessage, match="does not match"):
        tensors.load(bytes(data[:8] + new + data[8 + n :]))


def test_schema_and_finite_checks():
    got = tensors.spec_of(sample())
    tensors.check_schema(got, dict(got))
    want = dict(got)
    want["w"] = TensorSpec("F32", (4, 9))
    with pytest.raises(SchemaError, match=r"shape \[4, 8\], expected \[4, 9\]"):
        tensors.check_schema(got, want)
    with pytest.raises(SchemaError, match="missing"):
        tensors.check_schema(got, {**got, "extra": TensorSpec("F32", (1,))})
    with pytest.raises(SchemaError, match="unexpected"):
        tensors.check_schema(got, {"w": got["w"]})
    bad = sample()
    bad["w"][0, 0] = float("nan")
    with pytest.raises(MalformedMessage, match="'w'"):
        tensors.check_finite(bad)


def _craft(entries, body):
    """A safetensors file with the header entries given as they are (not as dump would lay them out)."""
    header = json.dumps(entries, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    return struct.pack("<Q", len(header)) + header + body


@pytest.mark.parametrize(
    ("story", "entries", "body"),
    [
        ("a gap between two tensors", {"a": [0, 8], "b": [12, 20]}, bytes(20)),
        ("two tensors overlapping", {"a": [0, 8], "b": [4, 12]}, bytes(12)),
        ("bytes after the last tensor", {"a": [0, 8], "b": [8, 16]}, bytes(20)),
    ],
)
def test_a_data_section_that_is_not_exactly_the_tensors_is_refused(story, entries, body):
    """What ``data_section`` promises (and the coordinator's one-pass finite check relies on): a
    file that loads has no byte outside its tensors, so no hidden NaN can sit in a gap."""
    data = _craft({k: {"dtype": "F32", "shape": [2], "data_offsets": v} for k, v in entries.items()}, body)
    tensors.read_header(data)  # each entry on its own is in range
    with pytest.raises(MalformedMessage, match="not valid safetensors"):
        tensors.load(data)


def test_data_section_is_every_tensor_byte_and_load_checks_an_expected_schema():
    t = {"b": torch.arange(3, dtype=torch.float32), "a": torch.ones(2, 2)}
    data = tensors.dump(t)
    section = tensors.data_section(data)
    assert len(section) == sum(v.numel() * 4 for v in t.values())
    assert bytes(section) in data and data.endswith(bytes(section))
    got = tensors.load(data, expected=tensors.spec_of(t))
    assert torch.equal(got["b"], t["b"])
    with pytest.raises(SchemaError, match="missing tensors: c"):
        tensors.load(data, expected={**tensors.spec_of(t), "c": TensorSpec("F32", (1,))})
