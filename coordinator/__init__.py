"""The coordinator: node registry, enrollment tokens, job specs, placement of
stages and shards, rounds, aggregation and poisoning defence, persistent state
(SQLite), gRPC servicers and metrics.
"""
