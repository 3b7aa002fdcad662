"""A node checks that the signed round result judged its pool against the shards it was assigned."""

from node.worker import shards_mismatch
from protocol import panal_pb2 as pb


def test_the_result_must_name_the_shards_the_pool_was_assigned():
    a = pb.Assignment(pool="pool-a", shard_cids=["QmA", "QmB"])
    same = pb.RoundResult(pool_shards=[pb.PoolShards(pool="pool-a", shard_cids=["QmA", "QmB"])])
    assert shards_mismatch(same, a) is None
    # A result that names no shards for the pool (the check off, or an older coordinator) says nothing.
    assert (
        shards_mismatch(pb.RoundResult(pool_shards=[pb.PoolShards(pool="pool-b", shard_cids=["QmC"])]), a)
        is None
    )
    other = pb.RoundResult(pool_shards=[pb.PoolShards(pool="pool-a", shard_cids=["QmA"])])
    why = shards_mismatch(other, a)
    assert why is not None and "['QmA']" in why and "['QmA', 'QmB']" in why and "pool-a" in why
