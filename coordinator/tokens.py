"""Which token ids each pool's train shards hold: what detection's absent-token check needs.

A pool trains on the shards the coordinator dealt it (``coordinator.placement``). Training
on them moves the rows of a token none of them contains — its embedding row, its output
row — only as every pool's training does; an update that moves such rows far more did not
get that from its data, and a trigger-token backdoor's does (``coordinator.detection``).

Each shard is read once per process (its CID is checked by the store, its tokens by
``corpus.shards.read_shard``) and remembered as a bit per token id, so the check costs
one pass over the job's train shards, not one per round. A job that cannot afford that
pass turns the check off (``detection: {max_absent_row_ratio: null}``).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import numpy as np

from corpus.shards import max_shard_bytes, read_shard
from storage.blobstore import BlobStore
from storage.manifest import DatasetManifest

CACHE_BYTES = 64 << 20  # shards remembered, a bit per token id each: 65 k shards at 8 k tokens


class ShardTokens:
    """Token presence of a dataset's shards, cached by CID."""

    def __init__(self, store: BlobStore, dataset: DatasetManifest, vocab_size: int) -> None:
        if vocab_size < dataset.vocab_size:
            raise ValueError(
                f"the model's vocabulary ({vocab_size}) is smaller than the dataset's ({dataset.vocab_size})"
            )
        self.store = store
        self.dataset = dataset
        self.vocab_size = vocab_size
        self._entries = {s.cid: s for s in dataset.shards}
        self._present: OrderedDict[str, np.ndarray] = OrderedDict()  # cid → packed bits over token ids

    def present(self, cid: str) -> np.ndarray:
        """(vocab_size,) bool: the token ids shard ``cid`` holds."""
        if cid in self._present:
            self._present.move_to_end(cid)
            return np.unpackbits(self._present[cid], count=self.vocab_size).astype(bool)
        entry = self._entries.get(cid)
        if entry is None:
            raise ValueError(f"shard {cid} is not in dataset {self.dataset.name!r}")
        m = self.dataset
        data = self.store.get_bytes(cid, max_bytes=max_shard_bytes(entry.sequences, m.seq_len, m.token_dtype))
        tokens = read_shard(
            data,
            seq_len=m.seq_len,
            token_dtype=m.token_dtype,
            vocab_size=m.vocab_size,
            sequences=entry.sequences,
            name=cid,
        )
        seen = np.bincount(tokens.reshape(-1), minlength=self.vocab_size).astype(bool)
        self._present[cid] = np.packbits(seen)
        while len(self._present) * len(self._present[cid]) > CACHE_BYTES and len(self._present) > 1:
            self._present.popitem(last=False)
        return seen

    def absent(self, shard_cids: Sequence[str]) -> np.ndarray:
        """(vocab_size,) bool: True for the token ids none of the shards holds."""
        seen = np.zeros(self.vocab_size, dtype=bool)
        for cid in shard_cids:
            seen |= self.present(cid)
        return ~seen
