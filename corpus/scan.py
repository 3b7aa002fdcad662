"""The scan: read every source once; normalise, filter and deduplicate; spool what passes.

Each document that passes the filters gets an index (0, 1, … in input order) and
its normalised text goes to a work file; dedup decides after the scan which
indices to keep.

Tokenising is a separate pass over that file, even when the tokenizer is known
before the scan: on 2 cores, reading (one Python thread) and encoding (the
tokenizer's threads on all cores) at once ran slower than one after the other.
"""

from __future__ import annotations

from array import array
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from corpus.clean import FILTERS, FilterConfig, check, normalise
from corpus.dedup import DedupConfig, Deduper
from corpus.errors import CorpusInputError
from corpus.progress import Reporter
from corpus.sources import ReadLog, Source
from corpus.spool import RecordWriter


@dataclass
class Scan:
    text_spool: Path  # record i: document i's normalised UTF-8 text
    source_of: np.ndarray  # (N,) uint16 index of the document's source
    hashes: np.ndarray  # (N,) 128-bit content hashes, fields "hi" and "lo"
    sizes: np.ndarray  # (N,) int64 UTF-8 bytes
    keep: np.ndarray  # (N,) bool: not removed as a duplicate
    stats: Counter[str]
    examples: list[str]  # the first skipped records, named


def scan(
    sources: Sequence[Source],
    *,
    filters: FilterConfig,
    dedup: DedupConfig,
    work: Path,
    reporter: Reporter,
) -> Scan:
    """Read all sources; spool the text that passes the filters to ``work/text.spool``."""
    log = ReadLog()
    removed: Counter[str] = Counter()
    read = 0
    source_of = array("H")
    sizes = array("q")
    deduper = Deduper(dedup, work / "dedup")
    text_path = work / "text.spool"
    reporter.stage("reading", total=sum(s.size_bytes() for s in sources))
    try:
        with RecordWriter(text_path) as spool:
            for index, source in enumerate(sources):
                for doc in source.documents(log):
                    read += 1
                    reporter.advance(len(doc.text))
                    text = normalise(doc.text)
                    reason = check(text, filters)
                    if reason is not None:
                        removed[reason] += 1
                        continue
                    data = text.encode()
                    deduper.add(text, data)
                    spool.write(data)
                    source_of.append(index)
                    sizes.append(len(data))
        if read == 0:
            skips = ", ".join(f"{k} {v}" for k, v in sorted(log.skipped.items())) or "no files of a known format"
            raise CorpusInputError(f"the inputs hold no documents ({skips}); see `panal corpus prepare --help`")
        if not len(deduper):
            counts = ", ".join(f"{k} {v}" for k, v in removed.most_common())
            raise CorpusInputError(
                f"the filters removed all {read} documents ({counts}); loosen them "
                "(--min-chars, --max-chars, --max-symbol-ratio, --max-repeated-lines)"
            )
        reporter.stage("deduplicating")
        result = deduper.finish()
    finally:
        deduper.close()
    stats: Counter[str] = Counter()
    stats["documents_read"] = read
    for reason, count in log.skipped.items():
        stats[f"skipped_{reason}"] = count
    for name in FILTERS:
        stats[f"removed_{name}"] = removed[name]
    stats["removed_exact_duplicate"] = result.exact
    stats["removed_near_duplicate"] = result.near
    stats["documents_kept"] = int(result.keep.sum())
    return Scan(
        text_spool=text_path,
        source_of=np.frombuffer(source_of, dtype=np.uint16),
        hashes=deduper.hashes,
        sizes=np.frombuffer(sizes, dtype=np.int64),
        keep=result.keep,
        stats=stats,
        examples=list(log.examples),
    )
