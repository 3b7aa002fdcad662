"""Exact and near-duplicate removal with state on disk, not in memory.

Exact duplicates share a 128-bit BLAKE2b hash of their normalised text. Near
duplicates share enough word 5-gram shingles: each document gets a MinHash
signature (``rensa``, a maintained Rust MinHash library), cut into LSH bands;
documents whose band keys collide are candidates, a candidate pair is kept only
if its signatures agree on at least ``threshold`` of their positions (estimated
Jaccard similarity), and each connected group of such pairs keeps its earliest
document.

Why not an in-memory LSH index (``rensa.RMinHashLSH``, ``datasketch.MinHashLSH``):
they hold every document's band keys in hash maps — about 1.5 KB a document for
rensa with 128 permutations (measured), so 2 GiB would stop near 1.4 M documents.
Here the band keys go to one file per band while documents stream past, and the
decision is made afterwards band by band with a sort (``numpy.argsort``): memory
is about 40 bytes a document at the peak (hash, one band column, its order,
labels), and the signatures stay on disk for the pair checks.
"""

from __future__ import annotations

import functools
import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rensa

from corpus.errors import CorpusInputError

HASH_BYTES = 16
MINHASH_SEED = 0x70616E61  # fixed: signatures must not change with the dataset's shuffle seed
BATCH = 512


@dataclass(frozen=True, kw_only=True)
class DedupConfig:
    near: bool = True
    threshold: float = 0.8  # estimated Jaccard similarity of 5-gram shingle sets
    num_perm: int = 128
    shingle_words: int = 5

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold <= 1.0:
            raise CorpusInputError(f"near-duplicate threshold is {self.threshold}; use a value in (0, 1]")
        if not 16 <= self.num_perm <= 1024:
            raise CorpusInputError(f"num_perm is {self.num_perm}; use 16 to 1024 (128 is usual)")
        if self.shingle_words < 1:
            raise CorpusInputError(f"shingle_words is {self.shingle_words}; use at least 1")


@dataclass(frozen=True)
class DedupResult:
    keep: np.ndarray  # (N,) bool, in document order
    exact: int  # removed as exact copies of an earlier document
    near: int  # removed as near copies of an earlier document


def content_hash(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=HASH_BYTES).digest()


def shingles(text: str, n: int) -> list[str]:
    """Word n-grams (whitespace-split); a document of fewer words is one shingle."""
    words = text.split()
    if len(words) <= n:
        return [" ".join(words)]
    return [" ".join(g) for g in zip(*(words[i:] for i in range(n)), strict=False)]


def _integral(y: np.ndarray, x: np.ndarray) -> float:
    return float(((y[1:] + y[:-1]) * np.diff(x)).sum() / 2)


@functools.lru_cache(maxsize=16)
def lsh_params(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows) minimising false positives plus false negatives around ``threshold``
    (the criterion datasketch uses), integrated numerically."""
    s_lo = np.linspace(0.0, threshold, 101)
    s_hi = np.linspace(threshold, 1.0, 101)
    best: tuple[float, int, int] | None = None
    for b in range(1, num_perm + 1):
        for r in range(1, num_perm // b + 1):
            fp = _integral(1 - (1 - s_lo**r) ** b, s_lo)
            fn = _integral((1 - s_hi**r) ** b, s_hi)
            err = float(fp + fn)
            if best is None or err < best[0] - 1e-12:
                best = (err, b, r)
    assert best is not None
    return best[1], best[2]


def mix64(h: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: spreads band keys over 64 bits."""
    h = h ^ (h >> np.uint64(30))
    h = h * np.uint64(0xBF58476D1CE4E5B9)
    h = h ^ (h >> np.uint64(27))
    h = h * np.uint64(0x94D049BB133111EB)
    out: np.ndarray = h ^ (h >> np.uint64(31))
    return out


def band_keys(signatures: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """(N, bands) uint64 keys, one per band of ``rows`` signature values."""
    sig = signatures.astype(np.uint64)
    keys = np.empty((sig.shape[0], bands), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for b in range(bands):
            h = np.full(sig.shape[0], np.uint64(b + 1) * np.uint64(0x9E3779B97F4A7C15), dtype=np.uint64)
            for c in range(b * rows, (b + 1) * rows):
                h = mix64(h ^ sig[:, c])
            keys[:, b] = h
    return keys


class Deduper:
    """Takes documents in order (``add``), then says which to keep (``finish``)."""

    def __init__(self, config: DedupConfig, work_dir: Path) -> None:
        self.config = config
        self.work_dir = Path(work_dir)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.bands, self.rows = lsh_params(config.threshold, config.num_perm)
        self._hashes = bytearray()
        self._pending: list[str] = []
        self._count = 0
        self._sig_path = self.work_dir / "minhash.u32"
        self._sig_file = open(self._sig_path, "wb") if config.near else None  # noqa: SIM115
        self._band_files = (
            [open(self.work_dir / f"band{b:03d}.u64", "wb") for b in range(self.bands)]  # noqa: SIM115
            if config.near
            else []
        )

    def __len__(self) -> int:
        return self._count

    @property
    def hashes(self) -> np.ndarray:
        """(N,) content hashes so far, as two little-endian uint64 fields ``hi`` and ``lo``."""
        return np.frombuffer(bytes(self._hashes), dtype=[("hi", "<u8"), ("lo", "<u8")])

    def add(self, text: str, data: bytes) -> None:
        """Document number ``len(self)``: its normalised text and that text's UTF-8 bytes."""
        self._hashes += content_hash(data)
        self._count += 1
        if self.config.near:
            self._pending.append(text)
            if len(self._pending) >= BATCH:
                self._flush()

    def _flush(self) -> None:
        if not self._pending or self._sig_file is None:
            return
        n = self.config.shingle_words
        matrix = rensa.RMinHash.digest_matrix_from_token_sets(
            [shingles(t, n) for t in self._pending], self.config.num_perm, MINHASH_SEED
        )
        sig = np.asarray(matrix.to_rows(), dtype=np.uint32).reshape(len(self._pending), self.config.num_perm)
        self._pending.clear()
        self._sig_file.write(sig.tobytes())
        keys = band_keys(sig, self.bands, self.rows)
        for b, f in enumerate(self._band_files):
            f.write(np.ascontiguousarray(keys[:, b]).tobytes())

    def close(self) -> None:
        for f in [self._sig_file, *self._band_files]:
            if f is not None and not f.closed:
                f.close()

    def finish(self) -> DedupResult:
        self._flush()
        self.close()
        n = self._count
        keep = np.ones(n, dtype=bool)
        if n == 0:
            return DedupResult(keep, 0, 0)
        _, first = np.unique(self.hashes, return_index=True)  # first occurrence of each hash
        keep[:] = False
        keep[first] = True
        exact = int(n - first.size)
        if not self.config.near or first.size < 2:
            return DedupResult(keep, exact, 0)
        near_dup = self._near_duplicates(keep)
        keep &= ~near_dup
        return DedupResult(keep, exact, int(near_dup.sum()))

    def _near_duplicates(self, candidates: np.ndarray) -> np.ndarray:
        """(N,) bool: documents among ``candidates`` joined to an earlier one by verified pairs."""
        n = self._count
        ids = np.flatnonzero(candidates)  # ascending: earlier documents first
        sig = np.memmap(self._sig_path, dtype=np.uint32, mode="r", shape=(n, self.config.num_perm))
        labels = np.arange(n, dtype=np.int64)
        edges_u: list[np.ndarray] = []
        edges_v: list[np.ndarray] = []
        for b in range(self.bands):
            keys = np.fromfile(self.work_dir / f"band{b:03d}.u64", dtype=np.uint64)[ids]
            order = np.argsort(keys, kind="stable")  # equal keys keep document order
            sorted_keys = keys[order]
            starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
            group_of = np.repeat(starts, np.diff(np.r_[starts, sorted_keys.size]))
            members = np.flatnonzero(group_of != np.arange(sorted_keys.size))
            if members.size:
                edges_u.append(ids[order[group_of[members]]])  # the group's earliest document
                edges_v.append(ids[order[members]])
        if not edges_u:
            return np.zeros(n, dtype=bool)
        u = np.concatenate(edges_u)
        v = np.concatenate(edges_v)
        pairs = np.unique(np.stack([u, v], axis=1), axis=0)
        u, v = pairs[:, 0], pairs[:, 1]
        similar = np.empty(u.size, dtype=bool)
        need = math.ceil(self.config.threshold * self.config.num_perm - 1e-9)
        for start in range(0, u.size, 65536):  # bounded reads from the signature file
            su = sig[u[start : start + 65536]]
            sv = sig[v[start : start + 65536]]
            similar[start : start + 65536] = (su == sv).sum(axis=1) >= need
        u, v = u[similar], v[similar]
        # Connected components by min-label propagation with pointer jumping.
        while u.size:
            low = np.minimum(labels[u], labels[v])
            before = labels.copy()
            np.minimum.at(labels, u, low)
            np.minimum.at(labels, v, low)
            labels = labels[labels]
            if np.array_equal(before, labels):
                break
        dropped: np.ndarray = labels != np.arange(n)
        return dropped
