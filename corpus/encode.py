"""Tokenising in parallel, in order, into a token spool.

``tokenizers`` encodes a batch on all cores in Rust and releases the GIL while it
does, so one batch is encoded in a helper thread while the caller stores the
previous one's tokens and reads the next one's text; the output keeps the
input's order.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from corpus.shards import NUMPY_DTYPES
from corpus.spool import RecordWriter

BATCH_CHARS = 4 << 20  # enough text per batch to keep every core busy to the batch's end


def encoded(tok: Tokenizer, docs: Iterator[tuple[int, str]]) -> Iterator[tuple[list[int], list[list[int]]]]:
    """(document indices, their token ids) batch by batch, in input order."""
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)  # _fast skips offsets (tokenizers >= 0.21)

    def run(texts: list[str]) -> list[list[int]]:
        return [e.ids for e in encode(texts, add_special_tokens=False)]

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="panal-encode") as pool:
        pending: tuple[list[int], Future[list[list[int]]]] | None = None
        indices: list[int] = []
        texts: list[str] = []
        chars = 0
        for index, text in docs:
            indices.append(index)
            texts.append(text)
            chars += len(text)
            if chars >= BATCH_CHARS:
                submitted = (indices, pool.submit(run, texts))
                if pending is not None:
                    yield pending[0], pending[1].result()
                pending = submitted
                indices, texts, chars = [], [], 0
        if texts:
            submitted = (indices, pool.submit(run, texts))
            if pending is not None:
                yield pending[0], pending[1].result()
            pending = submitted
        if pending is not None:
            yield pending[0], pending[1].result()


def write_token_spool(
    tok: Tokenizer, docs: Iterator[tuple[int, str]], path: Path, *, eos: int, dtype: str,
    total: int | None = None,
) -> None:
    """One record per document index 0, 1, …: its token ids then ``eos``, or an empty record
    for an index ``docs`` skips (so record i is always document i). ``total`` pads the end."""
    np_dtype = NUMPY_DTYPES[dtype]
    empty = b""
    with RecordWriter(path) as out:
        for indices, batch in encoded(tok, docs):
            for index, ids in zip(indices, batch, strict=True):
                while out.records < index:
                    out.write(empty)
                ids.append(eos)
                out.write(np.array(ids, dtype=np_dtype).tobytes())
        while total is not None and out.records < total:
            out.write(empty)
