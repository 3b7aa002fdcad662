"""Compression of a pseudo-gradient before it is stored: "none", "fp16" or "int8", chosen per job.

A pseudo-gradient is a dict name → float32 tensor (one stage's Δ = θ_start − θ_now).
:func:`compress` maps it to another dict of tensors, which the store layer writes
with ``storage.tensors.dump``; :func:`decompress` maps a dict read back with
``storage.tensors.load`` to float32 again. Both are deterministic: the same input
gives the same tensors, hence the same safetensors bytes and the same CID.

Formats
-------
- ``none``: the float32 tensors as they are.
- ``fp16``: each tensor cast to float16 (round to nearest even). A value beyond
  fp16's range (|x| ≥ 65520 rounds to inf) raises :class:`Fp16Overflow` rather than
  saturating: an honest pseudo-gradient never comes near 65504, so such a value
  means the pool diverged and the update must not be sent. Values below fp16's
  smallest subnormal (≈6e-8) flush to zero; that loss is accepted.
- ``int8``: per-block symmetric quantisation. The tensor is flattened (row-major)
  and cut into blocks of ``block`` elements (the last one shorter); per block
  ``scale = max|x| / 127`` (float32) and ``q = round(x / scale)`` clamped to
  [-127, 127] (−128 is never produced, and refused on the way in). Stored as
  ``name`` → int8 ``q`` *in the tensor's original shape* and ``name.__scale`` →
  float32 scales of shape ``(ceil(numel / block),)``. Keeping ``q`` in its own shape
  puts the shape in the safetensors header, which ``storage.tensors.read_header``
  already validates against the byte ranges — no separate shape tensor to
  disagree with. The round trip errs by at most ``max|x| / 254`` per block (up to
  float32 rounding, ~1e-6 relative), and by at most ``max|x|`` for a block whose
  max is below 127 × the smallest float32 subnormal (its scale underflows to 0).
  Size: 1 byte per value plus 4 bytes per block, ≈ 0.254 of float32 at block 1024.

The block size is a per-job constant: :func:`compress`, :func:`decompress` and
:func:`expected_spec` must be given the same one (the scale count depends on it).

Errors: a sender's own bad input (non-finite values, fp16 overflow, a reserved
name) raises :class:`CompressionError` (a ``ValueError``). Anything wrong with a
compressed dict from outside raises :class:`DecompressionError` (a
``MalformedMessage``, so the trust layer maps it to INVALID_ARGUMENT) naming the
tensor and what is wrong.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Literal, get_args

import numpy as np
import torch

from protocol.errors import MalformedMessage
from storage.tensors import TensorSpec

Method = Literal["none", "fp16", "int8"]
METHODS: tuple[str, ...] = get_args(Method)

DEFAULT_BLOCK = 1024  # 4 bytes of scale per 1024 values: +0.4 % over the int8 payload
MAX_BLOCK = 1 << 24
SCALE_SUFFIX = ".__scale"  # reserved: no pseudo-gradient tensor may be named like this

FP16_MAX = 65504.0
QMAX = 127
# The largest scale whose q × scale stays finite in float32 (q ≤ 127).
MAX_SCALE = torch.finfo(torch.float32).max / QMAX

# Elements handled per pass inside one tensor, so temporaries stay bounded
# (a few × 4 MiB) however large a stage's embedding matrix is.
_STEP = 1 << 20


class CompressionError(ValueError):
    """The sender's pseudo-gradient cannot be compressed as asked; the message says why."""


class Fp16Overflow(CompressionError):
    """A value lies outside fp16's range: the pool diverged, or the job should use int8/none."""


class DecompressionError(MalformedMessage):
    """A compressed update from outside is not what its method promises."""


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"compression {method!r} is not one of {', '.join(METHODS)}")


def _check_block(block: int) -> None:
    if not isinstance(block, int) or isinstance(block, bool) or not 1 <= block <= MAX_BLOCK:
        raise ValueError(f"int8 block size must be an integer in [1, {MAX_BLOCK}], got {block!r}")


def _blocks(numel: int, block: int) -> int:
    return -(-numel // block)


def _spans(n: int, step: int) -> Iterator[tuple[int, int]]:
    for a in range(0, n, step):
        yield a, min(a + step, n)


def _all_finite(flat: torch.Tensor) -> bool:
    # numpy's isfinite is ~8x faster than torch's on one CPU thread; numpy has no bfloat16.
    if flat.dtype in (torch.float32, torch.float16, torch.float64) and flat.device.type == "cpu":
        v = flat.detach().numpy()
        if v.size <= _STEP:  # most tensors of an update: one call
            return bool(np.isfinite(v).all())
        return all(bool(np.isfinite(v[a:b]).all()) for a, b in _spans(flat.numel(), _STEP))
    return all(bool(torch.isfinite(flat[a:b]).all()) for a, b in _spans(flat.numel(), _STEP))


def all_finite_bytes(buffer: bytes | memoryview, dtype: torch.dtype) -> bool:
    """Whether every value in ``buffer``, read as ``dtype`` (float32 or float16), is finite.

    One pass over a whole file's data section, in bounded pieces, instead of one call per tensor.
    """
    np_dtype = {torch.float32: np.float32, torch.float16: np.float16}[dtype]
    values = np.frombuffer(buffer, dtype=np_dtype)
    return all(bool(np.isfinite(values[a:b]).all()) for a, b in _spans(values.size, _STEP))


# ---------------------------------------------------------------------------------------------
# Sender side


def compress(
    tensors: Mapping[str, torch.Tensor], method: str, *, block: int = DEFAULT_BLOCK
) -> dict[str, torch.Tensor]:
    """Compress a pseudo-gradient (name → float32 tensor) with ``method``; names come out sorted."""
    _check_method(method)
    _check_block(block)
    out: dict[str, torch.Tensor] = {}
    for name in sorted(tensors):
        x = tensors[name]
        if not isinstance(name, str) or not name or name.endswith(SCALE_SUFFIX):
            raise CompressionError(
                f"tensor name {name!r} is empty or ends with the reserved {SCALE_SUFFIX!r}"
            )
        if not isinstance(x, torch.Tensor) or x.dtype != torch.float32:
            kind = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
            raise CompressionError(f"tensor {name!r} is {kind}; a pseudo-gradient is float32 (call .float())")
        flat = x.detach().to("cpu").contiguous().reshape(-1)  # (numel,), a view when already contiguous
        if not _all_finite(flat):
            raise CompressionError(f"tensor {name!r} holds NaN or infinite values: the pool diverged")
        if method == "none":
            out[name] = flat.clone().reshape(x.shape)
        elif method == "fp16":
            out[name] = _to_fp16(name, flat).reshape(x.shape)
        else:
            q, scales = _quantise(flat, block)
            out[name] = q.reshape(x.shape)
            out[name + SCALE_SUFFIX] = scales
    return out


def _to_fp16(name: str, flat: torch.Tensor) -> torch.Tensor:
    half = flat.to(torch.float16)  # round to nearest even; |x| ≥ 65520 becomes ±inf
    if not _all_finite(half):
        peak = max(float(flat[a:b].abs().max()) for a, b in _spans(flat.numel(), _STEP))
        raise Fp16Overflow(
            f"tensor {name!r} holds |x| = {peak:.4g}, beyond fp16's maximum {FP16_MAX:g}: an honest "
            "pseudo-gradient never gets there (the pool likely diverged); if it is genuine, "
            "use compression 'int8' or 'none'"
        )
    return half


def _quantise(flat: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(numel,) float32 → (numel,) int8 values and (blocks,) float32 scales."""
    n = flat.numel()
    q = torch.empty(n, dtype=torch.int8)
    scales = torch.empty(_blocks(n, block), dtype=torch.float32)
    step = max(1, _STEP // block) * block  # whole blocks per pass
    for a, b in _spans(n, step):
        k = _blocks(b - a, block)
        part = flat[a:b]
        if b - a < k * block:  # only the tensor's last block is short: pad it with zeros
            part = torch.cat([part, part.new_zeros(k * block - (b - a))])
        blocks = part.view(k, block)  # (k, block)
        scale = blocks.abs().amax(dim=1) / QMAX  # (k,); max is exact whatever the order
        # A zero scale (all-zero block, or one whose max underflows) divides by 1: every
        # |x| < 0.5 then rounds to 0, so the block decodes to zeros.
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        qb = torch.round(blocks / safe[:, None]).clamp_(-QMAX, QMAX)  # round half to even
        q[a:b] = qb.reshape(-1)[: b - a].to(torch.int8)
        scales[a // block : a // block + k] = scale
    return q, scales


# ---------------------------------------------------------------------------------------------
# Receiver side: everything here came from outside


def expected_spec(
    method: str, weights_spec: Mapping[str, TensorSpec], *, block: int = DEFAULT_BLOCK
) -> dict[str, TensorSpec]:
    """The schema a compressed update of a stage with ``weights_spec`` must have.

    Check a fetched blob with ``storage.tensors.check_schema(read_header(data), expected)``
    before loading or decompressing it. Weight dtypes do not matter: a
    pseudo-gradient is float32 whatever the weights are stored in.
    """
    _check_method(method)
    _check_block(block)
    spec: dict[str, TensorSpec] = {}
    for name in sorted(weights_spec):
        shape = tuple(weights_spec[name].shape)
        if name.endswith(SCALE_SUFFIX):
            raise ValueError(f"weight name {name!r} ends with the reserved {SCALE_SUFFIX!r}")
        if method == "none":
            spec[name] = TensorSpec("F32", shape)
        elif method == "fp16":
            spec[name] = TensorSpec("F16", shape)
        else:
            spec[name] = TensorSpec("I8", shape)
            spec[name + SCALE_SUFFIX] = TensorSpec("F32", (_blocks(math.prod(shape), block),))
    return spec


def decompress(
    tensors: Mapping[str, torch.Tensor], method: str, *, block: int = DEFAULT_BLOCK, copy: bool = True
) -> dict[str, torch.Tensor]:
    """Validate a compressed update from outside and return name → float32 tensor, names sorted.

    ``copy=False``: with method "none" the float32 tensors given are returned as they are
    (for a caller that owns them, such as one that has just loaded them).
    """
    _check_method(method)
    _check_block(block)
    for name, t in tensors.items():
        if not isinstance(name, str) or not isinstance(t, torch.Tensor):
            raise DecompressionError(f"entry {name!r} is not a named tensor")
    bases = sorted(n for n in tensors if not n.endswith(SCALE_SUFFIX))
    scale_names = sorted(n for n in tensors if n.endswith(SCALE_SUFFIX))
    if method != "int8" and scale_names:
        raise DecompressionError(
            f"tensor {scale_names[0]!r} is an int8 scale, but the update says compression {method!r}"
        )
    for s in scale_names:
        if s[: -len(SCALE_SUFFIX)] not in bases:
            raise DecompressionError(f"scale tensor {s!r} has no values tensor {s[: -len(SCALE_SUFFIX)]!r}")

    out: dict[str, torch.Tensor] = {}
    for name in bases:
        t = tensors[name].detach().to("cpu")
        if method == "none":
            checked = _checked_float(name, t, torch.float32)
            out[name] = checked.clone() if copy else checked
        elif method == "fp16":
            out[name] = _checked_float(name, t, torch.float16).to(torch.float32)
        else:
            if name + SCALE_SUFFIX not in tensors:
                raise DecompressionError(f"int8 tensor {name!r} has no scales {name + SCALE_SUFFIX!r}")
            out[name] = _dequantise(name, t, tensors[name + SCALE_SUFFIX].detach().to("cpu"), block)
    return out


def _checked_float(name: str, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if t.dtype != dtype:
        raise DecompressionError(f"tensor {name!r} is {t.dtype}, expected {dtype}")
    if not _all_finite(t.contiguous().reshape(-1)):
        raise DecompressionError(f"tensor {name!r} holds NaN or infinite values")
    return t


def _dequantise(name: str, q: torch.Tensor, scales: torch.Tensor, block: int) -> torch.Tensor:
    """int8 q (any shape) and (blocks,) float32 scales → float32 in q's shape."""
    if q.dtype != torch.int8:
        raise DecompressionError(f"tensor {name!r} is {q.dtype}, expected torch.int8")
    if scales.dtype != torch.float32:
        raise DecompressionError(f"scales of {name!r} are {scales.dtype}, expected torch.float32")
    n = q.numel()
    want = _blocks(n, block)
    if scales.dim() != 1 or scales.numel() != want:
        raise DecompressionError(
            f"scales of {name!r} have shape {list(scales.shape)}; {n} values in blocks of {block} need [{want}]"
        )
    if not bool(((scales >= 0) & (scales <= MAX_SCALE)).all()):  # also false for NaN
        raise DecompressionError(f"scales of {name!r} must be finite, ≥ 0 and ≤ {MAX_SCALE:.4g}")
    flat_q = q.contiguous().reshape(-1)
    out = torch.empty(n, dtype=torch.float32)
    step = max(1, _STEP // block) * block
    for a, b in _spans(n, step):
        part = flat_q[a:b]
        if bool((part == -QMAX - 1).any()):
            raise DecompressionError(f"tensor {name!r} holds -128, outside the symmetric int8 range")
        full = (b - a) // block  # whole blocks in this pass; a short tail only at the very end
        s = scales[a // block : a // block + _blocks(b - a, block)]
        dst = out[a:b]
        dst[: full * block].view(full, block).copy_(part[: full * block].view(full, block) * s[:full, None])
        if full * block < b - a:
            dst[full * block :] = part[full * block :].to(torch.float32) * s[full]
    return out.reshape(q.shape)
