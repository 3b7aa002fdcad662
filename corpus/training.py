"""A dataset in the store as a training batch source: what `panal train` and the node worker read.

Adapts :class:`corpus.reader.DatasetReader` to the engine's shape of data:
``micro_batch(step, index)`` is micro-batch ``index`` of optimizer step
``step`` (``grad_accum`` of them per step), ``val_batch(index)`` a fixed
held-out batch. Both are pure functions of their arguments and the seed, so
the first and the last pipeline stage draw the same tokens, and a resumed
run goes on where it stopped.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from corpus.errors import CorpusInputError
from corpus.reader import Batch, DatasetReader
from storage.blobstore import BlobStore

VAL_SEED = 0  # every pool and every run evaluates on the same held-out batches


class ModelShape(Protocol):
    vocab_size: int
    seq_len: int


class DatasetBatches:
    def __init__(
        self,
        store: BlobStore,
        dataset_cid: str,
        *,
        config: ModelShape,
        micro_batch: int,
        grad_accum: int = 1,
        seed: int,
        shard_cids: Iterable[str] | None = None,
        trusted: set[bytes] | None = None,
    ) -> None:
        self.store, self.cid, self.seed, self.trusted = store, dataset_cid, seed, trusted
        self.micro, self.grad_accum = micro_batch, grad_accum
        self.shard_cids = list(shard_cids) if shard_cids is not None else None
        self._readers: dict[tuple[int, int], DatasetReader] = {}
        first = self._reader(0, 1)
        self.vocab_size, self.seq_len = first.vocab_size, first.seq_len
        if self.vocab_size > config.vocab_size:
            raise CorpusInputError(
                f"dataset {dataset_cid} has a vocabulary of {self.vocab_size}, the model {config.vocab_size}: "
                f"set the model's vocab_size to at least {self.vocab_size}"
            )
        if self.seq_len > config.seq_len:
            raise CorpusInputError(
                f"dataset {dataset_cid} has sequences of {self.seq_len} tokens, longer than the model's context "
                f"{config.seq_len}: set the model's seq_len to at least {self.seq_len}"
            )
        self._val: DatasetReader | None = None

    def _reader(self, replica: int, replicas: int) -> DatasetReader:
        key = (replica, replicas)
        if key not in self._readers:
            self._readers[key] = DatasetReader(
                self.store,
                self.cid,
                batch_size=self.micro,
                seed=self.seed,
                shard_cids=self.shard_cids,
                trusted=self.trusted,
                replica=replica,
                replicas=replicas,
            )
        return self._readers[key]

    def micro_batch(self, step: int, index: int, *, dp_rank: int = 0, dp: int = 1) -> Batch:
        return self._reader(dp_rank, dp).batch(step * self.grad_accum + index)

    def val_batch(self, index: int) -> Batch:
        if self._val is None:
            self._val = DatasetReader(
                self.store, self.cid, batch_size=self.micro, seed=VAL_SEED, split="val", trusted=self.trusted
            )
        return self._val.batch(index)


def dataset_source(
    store: BlobStore,
    dataset_cid: str,
    *,
    config: ModelShape,
    micro_batch: int,
    seed: int,
    grad_accum: int = 1,
    shard_cids: Iterable[str] | None = None,
) -> DatasetBatches:
    return DatasetBatches(
        store,
        dataset_cid,
        config=config,
        micro_batch=micro_batch,
        grad_accum=grad_accum,
        seed=seed,
        shard_cids=shard_cids,
    )
