"""Shards: Parquet round trip, reproducible bytes, and a clear error for every mismatch."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from corpus.errors import ShardFormatError
from corpus.shards import Packer, read_shard, shard_bytes
from storage.cid import cid_of_bytes


def seqs(n=10, width=9, vocab=500, seed=0, dtype=np.uint16):
    return np.random.default_rng(seed).integers(0, vocab, (n, width)).astype(dtype)


def test_round_trip_and_same_bytes_every_time():
    a = seqs()
    data = shard_bytes(a)
    assert data == shard_bytes(a.copy())
    assert cid_of_bytes(data) == cid_of_bytes(shard_bytes(a))
    back = read_shard(data, seq_len=8, token_dtype="uint16", vocab_size=500, sequences=10, name="s")
    assert back.dtype == np.uint16 and (back == a).all()
    wide = seqs(dtype=np.uint32, vocab=70_000)
    back = read_shard(shard_bytes(wide), seq_len=8, token_dtype="uint32", vocab_size=70_000, sequences=10, name="s")
    assert (back == wide).all()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(seq_len=7), r"sequences of 9 tokens; the manifest says 7 \+ 1"),
        (dict(token_dtype="uint32"), "holds uint16 tokens; the manifest says uint32"),
        (dict(vocab_size=100), "outside the vocabulary of 100"),
        (dict(sequences=11), "holds 10 sequences; the manifest says 11"),
    ],
)
def test_every_mismatch_with_the_manifest_names_the_shard(change, message):
    args = dict(seq_len=8, token_dtype="uint16", vocab_size=500, sequences=10, name="QmShard")
    with pytest.raises(ShardFormatError, match=message) as e:
        read_shard(shard_bytes(seqs()), **{**args, **change})
    assert "QmShard" in str(e.value)


def test_wrong_columns_and_garbage():
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({"ids": [1, 2]}), sink)
    with pytest.raises(ShardFormatError, match=r"columns \['ids'\]"):
        read_shard(sink.getvalue().to_pybytes(), seq_len=1, token_dtype="uint16", vocab_size=9, sequences=2, name="x")
    with pytest.raises(ShardFormatError, match="not a readable Parquet file"):
        read_shard(b"garbage", seq_len=1, token_dtype="uint16", vocab_size=9, sequences=2, name="x")


def test_packer_cuts_full_sequences_and_shards():
    out = []
    p = Packer(seq_len=3, sequences_per_shard=2, dtype="uint16", emit=out.append)
    p.add(np.arange(5, dtype=np.uint16))
    p.add(np.arange(5, 15, dtype=np.uint16))  # 15 tokens: 3 sequences of 4, 3 left over
    p.close()
    assert [s.shape for s in out] == [(2, 4), (1, 4)]
    assert out[0].reshape(-1).tolist() == list(range(8))
    assert out[1].reshape(-1).tolist() == [8, 9, 10, 11]
    assert p.dropped_tokens == 3
