"""Token shards: Parquet files of fixed-length sequences, written byte-for-byte reproducibly.

A shard has one column, ``tokens``, of type ``fixed_size_list<uint16 or uint32>[seq_len + 1]``:
row i is one sequence, whose first ``seq_len`` tokens are the model's input and
whose last ``seq_len`` are its labels (shifted by one). Every shard of a split
holds ``sequences_per_shard`` rows but the last, which may hold fewer.

Same tokens, same bytes, same CID: the writer options are pinned (no
timestamps exist in Parquet metadata; ``created_by`` names the pyarrow version,
so a different pyarrow may give different bytes for the same tokens).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from corpus.errors import ShardFormatError

COLUMN = "tokens"
WRITE_OPTIONS: dict[str, Any] = dict(
    compression="zstd",
    compression_level=3,
    use_dictionary=True,
    write_statistics=False,
    version="2.6",
    data_page_version="1.0",
    store_schema=True,
)
NUMPY_DTYPES = {"uint16": np.uint16, "uint32": np.uint32}
ARROW_DTYPES = {"uint16": pa.uint16(), "uint32": pa.uint32()}


def shard_bytes(sequences: np.ndarray) -> bytes:
    """Parquet bytes of an (n, seq_len + 1) uint16/uint32 array."""
    n, width = sequences.shape
    flat = pa.array(np.ascontiguousarray(sequences).reshape(-1))
    table = pa.table({COLUMN: pa.FixedSizeListArray.from_arrays(flat, width)})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, row_group_size=max(1, n), **WRITE_OPTIONS)
    return bytes(sink.getvalue().to_pybytes())


def max_shard_bytes(sequences: int, seq_len: int, token_dtype: str) -> int:
    """The most bytes a well-formed shard of this shape may take: its raw size twice, plus room
    for metadata (compression never expands tokens that much)."""
    raw = sequences * (seq_len + 1) * np.dtype(NUMPY_DTYPES[token_dtype]).itemsize
    return 2 * raw + (1 << 20)


def read_shard(
    data: bytes, *, seq_len: int, token_dtype: str, vocab_size: int, sequences: int, name: str
) -> np.ndarray:
    """The (sequences, seq_len + 1) token array of a shard, after checking it is what the
    manifest says: one ``tokens`` column of the right type and width, the right row count,
    and every id below ``vocab_size``. Raises ShardFormatError naming the shard."""
    try:
        table = pq.read_table(pa.BufferReader(data))
    except (pa.ArrowException, OSError) as e:
        raise ShardFormatError(f"shard {name} is not a readable Parquet file: {e}") from e
    if table.schema.names != [COLUMN]:
        raise ShardFormatError(f"shard {name} has columns {table.schema.names}; expected [{COLUMN!r}]")
    kind = table.schema.field(COLUMN).type
    if not pa.types.is_fixed_size_list(kind):
        raise ShardFormatError(f"shard {name}: column {COLUMN!r} is {kind}, not fixed-length sequences")
    if kind.value_type != ARROW_DTYPES[token_dtype]:
        raise ShardFormatError(f"shard {name} holds {kind.value_type} tokens; the manifest says {token_dtype}")
    if kind.list_size != seq_len + 1:
        raise ShardFormatError(
            f"shard {name} holds sequences of {kind.list_size} tokens; the manifest says {seq_len} + 1"
        )
    if table.num_rows != sequences:
        raise ShardFormatError(f"shard {name} holds {table.num_rows} sequences; the manifest says {sequences}")
    column = table.column(COLUMN).combine_chunks()
    if column.null_count or column.values.null_count:
        raise ShardFormatError(f"shard {name} has null tokens")
    tokens: np.ndarray = column.values.to_numpy(zero_copy_only=False).reshape(sequences, seq_len + 1)
    if tokens.size and int(tokens.max()) >= vocab_size:
        raise ShardFormatError(
            f"shard {name} holds token id {int(tokens.max())}, outside the vocabulary of {vocab_size}"
        )
    return tokens


class Packer:
    """Concatenates documents' tokens and cuts the stream into shards of full sequences.

    ``emit(array)`` receives each full shard, an (n, seq_len + 1) array; ``close()``
    emits the last, shorter one. The tail shorter than one sequence is dropped
    (counted in ``dropped_tokens``).
    """

    def __init__(
        self, *, seq_len: int, sequences_per_shard: int, dtype: str, emit: Callable[[np.ndarray], None]
    ) -> None:
        self.width = seq_len + 1
        self.shard_tokens = sequences_per_shard * self.width
        self.dtype = NUMPY_DTYPES[dtype]
        self.emit = emit
        self._buf = np.empty(self.shard_tokens, dtype=self.dtype)
        self._fill = 0
        self.dropped_tokens = 0

    def add(self, tokens: np.ndarray) -> None:
        pos = 0
        while pos < tokens.size:
            take = min(tokens.size - pos, self.shard_tokens - self._fill)
            self._buf[self._fill : self._fill + take] = tokens[pos : pos + take]
            self._fill += take
            pos += take
            if self._fill == self.shard_tokens:
                self.emit(self._buf.reshape(-1, self.width).copy())
                self._fill = 0

    def close(self) -> None:
        rows = self._fill // self.width
        self.dropped_tokens += self._fill - rows * self.width
        if rows:
            self.emit(self._buf[: rows * self.width].reshape(rows, self.width).copy())
        self._fill = 0
