"""Where each kept document goes: validation or training, how many copies, which shard.

Every decision is drawn from the document's content hash and the seed, never from
the order of events, so the same inputs and seed give the same shards.

- Validation: a document is held out when its draw is below ``val_fraction``
  (at least one document when the fraction is not 0).
- Weights: a training document from a source of weight w gets floor(w) copies,
  plus one more with probability w − floor(w).
- Shuffle: copies go to seeded buckets (work files of at most ~``BUCKET_BYTES``
  of tokens each), each bucket is shuffled in memory and packed in turn — an
  external shuffle, so every shard is a mix of the whole corpus, which matters
  when pools train on different shards.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np

from corpus.dedup import mix64
from corpus.progress import Reporter
from corpus.shards import NUMPY_DTYPES, Packer
from corpus.spool import RecordWriter, iter_records

MiB = 1 << 20
# Tokens held in memory at once while shuffling. A constant, not an option: the number of
# buckets shapes the shuffle, and the dataset must not depend on a machine's memory setting.
BUCKET_BYTES = 256 * MiB
MAX_BUCKETS = 512  # open work files at once; beyond 128 GiB of tokens, buckets grow instead

Emit = Callable[[str, np.ndarray], None]  # (split, (n, seq_len + 1) sequences)


def unit(hashes: np.ndarray, seed: int, salt: int) -> np.ndarray:
    """(N,) float in [0, 1): a seeded draw per document from its content hash."""
    with np.errstate(over="ignore"):
        key = mix64(np.array([seed ^ ((salt * 0x9E3779B97F4A7C15) & (2**64 - 1))], dtype=np.uint64))
        h = mix64(mix64(hashes["hi"] ^ key) ^ hashes["lo"])
    return (h >> np.uint64(11)).astype(np.float64) * 2.0**-53


def val_split(hashes: np.ndarray, keep: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """(N,) bool: kept documents held out for validation."""
    u = unit(hashes, seed, 1)
    val = keep & (u < fraction)
    if fraction > 0 and not val.any() and keep.sum() >= 2:
        kept = np.flatnonzero(keep)
        val[kept[np.argmin(u[kept])]] = True
    return val


def copies(hashes: np.ndarray, train: np.ndarray, weight: np.ndarray, seed: int) -> np.ndarray:
    """(N,) int64 copies of each training document; ``weight`` is per document."""
    whole = np.floor(weight)
    n: np.ndarray = whole.astype(np.int64) + (unit(hashes, seed, 3) < weight - whole)
    n[~train] = 0
    return n


def shuffle_and_pack(
    token_spool: Path,
    *,
    hashes: np.ndarray,
    val: np.ndarray,
    n_copies: np.ndarray,
    seed: int,
    seq_len: int,
    sequences_per_shard: int,
    dtype: str,
    work: Path,
    emit: Emit,
    reporter: Reporter,
) -> int:
    """Pack validation documents in order and training copies shuffled; return the tokens dropped
    (each split's tail shorter than one sequence)."""
    np_dtype = NUMPY_DTYPES[dtype]
    itemsize = np.dtype(np_dtype).itemsize
    token_bytes = np.array([len(r) for r in iter_records(token_spool)], dtype=np.int64)
    n_buckets = max(1, min(MAX_BUCKETS, math.ceil(int((token_bytes * n_copies).sum()) / BUCKET_BYTES)))
    with np.errstate(over="ignore"):
        base = mix64(hashes["lo"] ^ np.uint64(seed))
    bucket_of: dict[int, np.ndarray] = {}  # copy c -> (N,) bucket of each document's copy c

    def bucket(i: int, c: int) -> int:
        if c not in bucket_of:
            with np.errstate(over="ignore"):
                bucket_of[c] = mix64(base + np.uint64(c)) % np.uint64(n_buckets)
        return int(bucket_of[c][i])

    shape = dict(seq_len=seq_len, sequences_per_shard=sequences_per_shard, dtype=dtype)
    val_packer = Packer(**shape, emit=lambda seqs: emit("val", seqs))  # type: ignore[arg-type]
    buckets = [RecordWriter(work / f"bucket{b:03d}.tokens") for b in range(n_buckets)]
    reporter.stage("shuffling", total=int(token_bytes.sum()) // itemsize)
    try:
        for i, record in enumerate(iter_records(token_spool)):
            if val[i]:
                val_packer.add(np.frombuffer(record, dtype=np_dtype))
            for c in range(int(n_copies[i])):
                buckets[bucket(i, c)].write(record)
            reporter.advance(len(record) // itemsize)
    finally:
        for writer in buckets:
            writer.close()
    val_packer.close()

    train_packer = Packer(**shape, emit=lambda seqs: emit("train", seqs))  # type: ignore[arg-type]
    reporter.stage("writing shards", total=n_buckets)
    for b, writer in enumerate(buckets):
        items = [np.frombuffer(r, dtype=np_dtype) for r in iter_records(writer.path)]
        for j in np.random.default_rng([seed, 0x5348, b]).permutation(len(items)):
            train_packer.add(items[j])
        del items
        writer.path.unlink()
        reporter.advance(1)
    train_packer.close()
    return val_packer.dropped_tokens + train_packer.dropped_tokens
