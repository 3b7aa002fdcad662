"""State dicts as safetensors, read back under limits. Nothing is ever unpickled.

A peer's tensor file is parsed by hand first — header length, JSON header,
tensor count, dtypes, shapes against byte ranges — and refused with a clear
error before ``safetensors`` touches the data.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from safetensors.torch import load as _st_load
from safetensors.torch import save as _st_save

from protocol.errors import MalformedMessage
from storage.errors import MessageTooLarge

# safetensors dtype names, their torch dtypes and sizes in bytes.
DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8),
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8),
    "I32": (torch.int32, 4),
    "I16": (torch.int16, 2),
    "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1),
    "BOOL": (torch.bool, 1),
}
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16"})


@dataclass(frozen=True)
class TensorLimits:
    """What a tensor file from outside may be."""

    max_bytes: int = 4 * 1024**3
    max_tensors: int = 100_000
    max_header_bytes: int = 16 * 1024**2
    max_dims: int = 8
    allowed_dtypes: frozenset[str] = field(default_factory=lambda: frozenset(DTYPES))


@dataclass(frozen=True)
class TensorSpec:
    dtype: str
    shape: tuple[int, ...]


class SchemaError(MalformedMessage):
    """Tensor names, shapes or dtypes differ from what was expected."""


_NAME_OF = {torch_dtype: name for name, (torch_dtype, _) in DTYPES.items()}


def _safetensors_rank() -> dict[str, int]:
    """The order ``safetensors.save`` lays dtypes out in (its Dtype enum, descending), as installed."""
    probe = {name: torch.zeros(1, dtype=dt) for name, (dt, _) in DTYPES.items()}
    data = _st_save(probe)
    (n,) = struct.unpack("<Q", data[:8])
    order = list(json.loads(data[8 : 8 + n]))  # JSON objects keep their order
    return {name: i for i, name in enumerate(order)}


_RANK = _safetensors_rank()


def _plain_name(name: str) -> bool:
    return name.isascii() and name.isprintable() and '"' not in name and "\\" not in name


def dump(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> bytes:
    """Serialize a state dict to safetensors bytes, the very bytes ``safetensors.save`` writes."""
    return b"".join(dump_parts(tensors, metadata))


def dump_parts(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> list[bytes | memoryview]:
    """:func:`dump`'s bytes as consecutive buffers, the tensors' own memory (for ``put_chunks``).

    Without metadata the file is assembled here and the data is not copied at all
    (safetensors copies each tensor twice, a second per GiB on this CPU); with
    metadata, or names that need JSON escapes, it goes through ``safetensors.save``.
    Keep the tensors unchanged until the buffers are consumed.
    """
    cpu = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    if metadata or not cpu or not all(_plain_name(n) and t.dtype in _NAME_OF for n, t in cpu.items()):
        plain = {name: t.clone() for name, t in cpu.items()}  # unshared, as safetensors requires
        return [bytes(_st_save(plain, metadata=dict(metadata) if metadata else None))]
    order = sorted(cpu, key=lambda n: (_RANK[_NAME_OF[cpu[n].dtype]], n))
    entries, at = [], 0
    for name in order:
        t = cpu[name]
        size = t.numel() * t.element_size()
        entries.append(
            f'"{name}":{{"dtype":"{_NAME_OF[t.dtype]}","shape":{json.dumps(list(t.shape), separators=(",", ":"))},'
            f'"data_offsets":[{at},{at + size}]}}'
        )
        at += size
    header = ("{" + ",".join(entries) + "}").encode()
    header += b" " * (-len(header) % 8)
    parts: list[bytes | memoryview] = [struct.pack("<Q", len(header)), header]
    for name in order:
        t = cpu[name]
        if t.numel():
            parts.append(t.reshape(-1).view(torch.uint8).numpy().data)  # a view: no copy
    return parts


def read_header(data: bytes, limits: TensorLimits = TensorLimits()) -> dict[str, TensorSpec]:
    """Validate a safetensors file's framing and header without loading any tensor."""
    if len(data) > limits.max_bytes:
        raise MessageTooLarge(f"tensor file is {len(data)} bytes; the limit is {limits.max_bytes}")
    if len(data) < 8:
        raise MalformedMessage("tensor file is shorter than the 8-byte safetensors header length")
    (n,) = struct.unpack("<Q", data[:8])
    if n > limits.max_header_bytes or n > len(data) - 8:
        raise MalformedMessage(
            f"safetensors header claims {n} bytes; the file has {len(data) - 8} after the length "
            f"and the limit is {limits.max_header_bytes}"
        )
    try:
        header = json.loads(data[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MalformedMessage(f"safetensors header is not JSON: {e}") from e
    if not isinstance(header, dict):
        raise MalformedMessage("safetensors header must be a JSON object")
    header.pop("__metadata__", None)
    if len(header) > limits.max_tensors:
        raise MessageTooLarge(f"{len(header)} tensors; the limit is {limits.max_tensors}")
    body = len(data) - 8 - n
    specs: dict[str, TensorSpec] = {}
    for name, entry in header.items():
        try:
            dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
        except (KeyError, TypeError, ValueError) as e:
            raise MalformedMessage(f"tensor {name!r}: header entry is malformed") from e
        if dtype not in limits.allowed_dtypes or dtype not in DTYPES:
            raise MalformedMessage(
                f"tensor {name!r} has dtype {dtype!r}; allowed: {', '.join(sorted(limits.allowed_dtypes))}"
            )
        if (
            not isinstance(shape, list)
            or len(shape) > limits.max_dims
            or not all(isinstance(d, int) and d >= 0 for d in shape)
        ):
            raise MalformedMessage(f"tensor {name!r} has an invalid shape {shape!r}")
        if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end <= body):
            raise MalformedMessage(f"tensor {name!r} has data offsets outside the file")
        if math.prod(shape) * DTYPES[dtype][1] != end - begin:
            raise MalformedMessage(f"tensor {name!r}: shape {shape} does not match its {end - begin} bytes")
        specs[name] = TensorSpec(dtype, tuple(shape))
    return specs


def load(
    data: bytes, limits: TensorLimits = TensorLimits(), *, expected: Mapping[str, TensorSpec] | None = None
) -> dict[str, torch.Tensor]:
    """Parse safetensors bytes from outside: validated header first (and, given ``expected``,
    checked against it with :func:`check_schema`), then the tensors.

    Once loaded, the file's data section is exactly its tensors' bytes, one after another:
    safetensors refuses a file whose tensors overlap, leave a gap or stop short of the end.
    """
    specs = read_header(data, limits)
    if expected is not None:
        check_schema(specs, expected)
    try:
        return dict(_st_load(data))
    except Exception as e:  # safetensors raises SafetensorError for overlaps and other framing faults
        raise MalformedMessage(f"tensor file is not valid safetensors: {e}") from e


def data_section(data: bytes) -> memoryview:
    """The bytes after the header of a file :func:`load` accepted: every tensor's data, in order."""
    (n,) = struct.unpack("<Q", data[:8])
    return memoryview(data)[8 + n :]


def spec_of(tensors: Mapping[str, torch.Tensor]) -> dict[str, TensorSpec]:
    names = {dt: name for name, (dt, _) in DTYPES.items()}
    return {k: TensorSpec(names[t.dtype], tuple(t.shape)) for k, t in tensors.items()}


def check_schema(got: Mapping[str, TensorSpec], expected: Mapping[str, TensorSpec]) -> None:
    """Raise SchemaError naming the first difference: missing, unexpected, shape, dtype."""
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    if missing:
        raise SchemaError(f"missing tensors: {', '.join(missing[:5])}{' …' if len(missing) > 5 else ''}")
    if extra:
        raise SchemaError(f"unexpected tensors: {', '.join(extra[:5])}{' …' if len(extra) > 5 else ''}")
    for name, want in expected.items():
        have = got[name]
        if have.shape != want.shape:
            raise SchemaError(f"tensor {name!r} has shape {list(have.shape)}, expected {list(want.shape)}")
        if have.dtype != want.dtype:
            raise SchemaError(f"tensor {name!r} has dtype {have.dtype}, expected {want.dtype}")


def check_finite(tensors: Mapping[str, torch.Tensor]) -> None:
    """Raise MalformedMessage naming the first tensor holding NaN or ±inf."""
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise MalformedMessage(f"tensor {name!r} holds NaN or infinite values")
