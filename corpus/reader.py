"""The training reader: an assignment of shards in, a deterministic stream of batches out.

``DatasetReader(store, manifest_cid, shard_cids=…, batch_size=B, seed=S)`` verifies
the manifest's signature (against ``trusted`` keys if given), and each shard as it
is loaded: its CID (the store verifies every read) and its contents against the
manifest (column, type, row length ``seq_len + 1``, row count, ids below
``vocab_size``; a mismatch raises ShardFormatError naming the shard).

The stream is a pure function of (manifest, shard set, seed, batch size,
replica, replicas): ``batch(step)`` gives the same tensors in any process, so
the first and the last pipeline stage of a pool, which both need the tokens
(input and labels), see the identical stream without talking to each other.
Order of the given shard CIDs does not matter; resuming is ``skip(steps)`` or
``batch(step)``.

Each epoch visits every sequence of the assigned shards once: the shards are
put in a seeded order, taken ``window`` at a time, and the sequences of a
window are shuffled together (only a window's shards are held in memory).
Epochs run on into each other; a batch may straddle two. With ``replicas``
data-parallel replicas in a pool, replica r takes batches r, r + replicas, …
of the same stream.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Iterator

import numpy as np
import torch

from corpus.errors import CorpusInputError
from corpus.shards import max_shard_bytes, read_shard
from protocol.errors import MalformedMessage
from storage.blobstore import BlobStore
from storage.manifest import MAX_MANIFEST_BYTES, DatasetManifest, ShardEntry, verify

Batch = tuple[torch.Tensor, torch.Tensor]  # (input, label), each (B, T) int64


class DatasetReader:
    def __init__(
        self,
        store: BlobStore,
        manifest_cid: str,
        *,
        batch_size: int,
        seed: int,
        shard_cids: Iterable[str] | None = None,
        split: str = "train",
        trusted: set[bytes] | None = None,
        window: int = 16,
        replica: int = 0,
        replicas: int = 1,
    ) -> None:
        if batch_size < 1:
            raise CorpusInputError(f"batch_size is {batch_size}; use at least 1")
        if window < 1:
            raise CorpusInputError(f"window is {window}; use at least 1 shard")
        if not 0 <= replica < replicas:
            raise CorpusInputError(f"replica {replica} is not in [0, {replicas})")
        if not 0 <= seed < 1 << 63:
            raise CorpusInputError(f"seed is {seed}; use an integer in [0, 2**63)")
        signed = verify(store.get_bytes(manifest_cid, max_bytes=MAX_MANIFEST_BYTES), trusted=trusted)
        if not isinstance(signed.body, DatasetManifest):
            raise MalformedMessage(f"{manifest_cid} is a {signed.kind} manifest, not a dataset")
        self.store = store
        self.manifest: DatasetManifest = signed.body
        self.signer = signed.signer
        self.batch_size = batch_size
        self.seed = seed
        self.window = window
        self.replica = replica
        self.replicas = replicas
        self.shards = self._select(split, shard_cids)
        self.sizes = np.array([s.sequences for s in self.shards], dtype=np.int64)
        self.sequences = int(self.sizes.sum())
        if self.sequences == 0:
            raise CorpusInputError(f"the assigned {split} shards hold no sequences")
        self.step = 0
        self._loaded: OrderedDict[int, np.ndarray] = OrderedDict()
        self._epoch_cache: tuple[int, np.ndarray, np.ndarray] | None = None
        self._window_cache: tuple[int, int, np.ndarray] | None = None

    # ------------------------------------------------------------------ shape

    @property
    def seq_len(self) -> int:
        return self.manifest.seq_len

    @property
    def vocab_size(self) -> int:
        return self.manifest.vocab_size

    @property
    def steps_per_epoch(self) -> float:
        """Steps of this replica per pass over the assigned sequences."""
        return self.sequences / (self.batch_size * self.replicas)

    def _select(self, split: str, shard_cids: Iterable[str] | None) -> list[ShardEntry]:
        mine = [s for s in self.manifest.shards if s.split == split]
        if not mine:
            raise CorpusInputError(f"dataset {self.manifest.name!r} has no {split!r} shards")
        if shard_cids is None:
            return mine
        wanted = {str(c) for c in shard_cids}
        unknown = wanted - {s.cid for s in mine}
        if unknown:
            raise CorpusInputError(
                f"shard {sorted(unknown)[0]} is not a {split} shard of dataset {self.manifest.name!r}"
                + (f" ({len(unknown)} such)" if len(unknown) > 1 else "")
            )
        if not wanted:
            raise CorpusInputError("the assignment names no shards")
        return [s for s in mine if s.cid in wanted]  # manifest order: the given order does not matter

    # ---------------------------------------------------------------- stream

    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """The epoch's shard order and the first stream position of each window."""
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            order = np.random.default_rng([self.seed, 0x45504F43, epoch]).permutation(len(self.shards))
            counts = [int(self.sizes[order[w : w + self.window]].sum()) for w in range(0, len(order), self.window)]
            self._epoch_cache = (epoch, order, np.cumsum([0, *counts]))
        return self._epoch_cache[1], self._epoch_cache[2]

    def _window(self, epoch: int, w: int) -> np.ndarray:
        """(n, 2) (shard index, row) of the window's sequences in their shuffled order."""
        if self._window_cache is None or self._window_cache[:2] != (epoch, w):
            order, _ = self._epoch(epoch)
            shards = order[w * self.window : (w + 1) * self.window]
            pairs = np.concatenate(
                [np.stack([np.full(self.sizes[s], s), np.arange(self.sizes[s])], axis=1) for s in shards]
            )
            perm = np.random.default_rng([self.seed, 0x57494E44, epoch, w]).permutation(len(pairs))
            self._window_cache = (epoch, w, pairs[perm])
        return self._window_cache[2]

    def positions(self, step: int) -> np.ndarray:
        """(B, 2) (shard index, row) of the sequences in this replica's batch ``step``."""
        if step < 0:
            raise CorpusInputError(f"step is {step}; steps start at 0")
        first = (step * self.replicas + self.replica) * self.batch_size
        out = np.empty((self.batch_size, 2), dtype=np.int64)
        for i, g in enumerate(range(first, first + self.batch_size)):
            epoch, pos = divmod(g, self.sequences)
            _, starts = self._epoch(epoch)
            w = int(np.searchsorted(starts, pos, side="right")) - 1
            out[i] = self._window(epoch, w)[pos - starts[w]]
        return out

    def _shard(self, index: int) -> np.ndarray:
        if index in self._loaded:
            self._loaded.move_to_end(index)
            return self._loaded[index]
        entry = self.shards[index]
        m = self.manifest
        data = self.store.get_bytes(entry.cid, max_bytes=max_shard_bytes(entry.sequences, m.seq_len, m.token_dtype))
        tokens = read_shard(data, seq_len=m.seq_len, token_dtype=m.token_dtype, vocab_size=m.vocab_size,
                            sequences=entry.sequences, name=entry.cid)
        self._loaded[index] = tokens
        while len(self._loaded) > self.window:
            self._loaded.popitem(last=False)
        return tokens

    def batch(self, step: int) -> Batch:
        """This replica's batch ``step``: (input, label), each (B, seq_len) int64."""
        pos = self.positions(step)
        rows = np.stack([self._shard(int(s))[int(r)] for s, r in pos]).astype(np.int64)  # (B, T + 1)
        tokens = torch.from_numpy(rows)
        return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()

    def skip(self, steps: int) -> None:
        """Move the iterator ``steps`` batches on (to resume)."""
        self.step += steps

    def __iter__(self) -> Iterator[Batch]:
        while True:
            yield self.batch(self.step)
            self.step += 1

    def verify_all(self) -> None:
        """Load and check every assigned shard now, rather than when first needed."""
        for i in range(len(self.shards)):
            self._shard(i)
