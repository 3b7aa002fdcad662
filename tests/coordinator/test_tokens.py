"""Which token ids a pool's shards hold (coordinator/tokens.py), read from real Parquet shards in a LocalStore."""

import numpy as np
import pytest

from coordinator import tokens as tokens_module
from coordinator.tokens import ShardTokens
from corpus.shards import shard_bytes
from protocol.errors import ProtocolError
from storage.local import LocalStore
from storage.manifest import DatasetManifest, ShardEntry


@pytest.fixture
def dataset(tmp_path):
    store = LocalStore(tmp_path / "store")
    seqs = [
        np.array([[1, 2, 3, 4, 5], [5, 4, 3, 2, 1]], dtype=np.uint16),  # tokens 1..5
        np.array([[7, 7, 7, 7, 9]], dtype=np.uint16),  # tokens 7 and 9
    ]
    cids = [str(store.put_bytes(shard_bytes(s))) for s in seqs]
    ds = DatasetManifest(
        name="t",
        tokenizer_cid=str(store.put_bytes(b"tok")),
        vocab_size=12,
        seq_len=4,
        token_dtype="uint16",
        shards=[
            ShardEntry(cid=c, split="train", tokens=s.size, sequences=len(s)) for c, s in zip(cids, seqs)
        ],
    )
    return store, ds, cids


def test_absent_tokens_are_those_no_shard_holds(dataset):
    store, ds, (a, b) = dataset
    tokens = ShardTokens(store, ds, vocab_size=16)  # a model vocabulary may be larger than the data's
    assert np.flatnonzero(~tokens.absent([a])).tolist() == [1, 2, 3, 4, 5]
    assert np.flatnonzero(~tokens.absent([a, b])).tolist() == [1, 2, 3, 4, 5, 7, 9]
    assert tokens.absent([b]).shape == (16,)
    assert tokens.absent([]).all()


def test_each_shard_is_read_once(dataset, monkeypatch):
    store, ds, (a, b) = dataset
    tokens = ShardTokens(store, ds, vocab_size=12)
    reads = []
    get = store.get_bytes
    monkeypatch.setattr(store, "get_bytes", lambda cid, **kw: reads.append(cid) or get(cid, **kw))
    first = tokens.absent([a, b])
    assert (tokens.absent([a, b]) == first).all() and (tokens.absent([b, a]) == first).all()
    assert sorted(reads) == sorted([a, b])
    # Past the cache's size the oldest shard is read again.
    monkeypatch.setattr(tokens_module, "CACHE_BYTES", 2)  # one shard's 12 bits take 2 bytes
    reads.clear()
    tokens = ShardTokens(store, ds, vocab_size=12)
    for cid in (a, b, a):
        tokens.absent([cid])
    assert reads == [a, b, a]


def test_unknown_shards_and_smaller_models_are_refused(dataset):
    store, ds, _ = dataset
    with pytest.raises(ValueError, match="vocabulary"):
        ShardTokens(store, ds, vocab_size=8)
    tokens = ShardTokens(store, ds, vocab_size=12)
    with pytest.raises(ValueError, match="not in dataset 't'"):
        tokens.absent([str(store.put_bytes(b"not a shard"))])


def test_a_shard_that_is_not_what_the_manifest_says_is_an_error(dataset):
    store, ds, (a, _) = dataset
    wrong = ds.model_copy(update={"shards": [ShardEntry(cid=a, split="train", tokens=10, sequences=3)]})
    with pytest.raises(ProtocolError, match="3"):
        ShardTokens(store, wrong, vocab_size=12).absent([a])
