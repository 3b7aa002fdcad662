"""`prepare`: sources in, a signed, content-addressed, tokenised dataset out.

    scan: read ─ normalise ─ filter ─ hash + MinHash ─ spool      (corpus.scan)
    dedup: exact, then near, decided on disk                      (corpus.dedup)
    tokenizer: given, reused from an earlier run, or trained on a seeded sample
               of the training documents                          (corpus.tokenizer)
    tokenise in parallel, in order                                (corpus.encode)
    split, weight, shuffle, pack into Parquet shards              (corpus.shuffle, corpus.shards)
    publish tokenizer, shards and the signed DatasetManifest

Every stage streams: text and tokens live in work files; memory holds a batch of
documents, about 100 bytes a document (hashes, dedup state, split and weights)
and one shuffle bucket (measured: 523 MiB peak for a 40 MiB input, 580 MiB for
400 MiB and 167k documents, training included).
The same inputs and options give the same tokenizer and shard CIDs. A rerun whose
result is in the store and the rerun cache returns it at once; one that changes
only the packing (seq_len, shard size, weights) reuses the trained tokenizer.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow
import rensa
import tokenizers
from tokenizers import Tokenizer

from corpus import tokenizer as bpe
from corpus.cache import StageCache, cache_key
from corpus.clean import FilterConfig
from corpus.dedup import DedupConfig
from corpus.encode import write_token_spool
from corpus.errors import CorpusInputError
from corpus.progress import NullReporter, Reporter
from corpus.scan import Scan, scan
from corpus.shards import shard_bytes
from corpus.shuffle import copies, shuffle_and_pack, unit, val_split
from corpus.sources import Source
from corpus.spool import iter_records
from protocol.identity import Identity
from storage.blobstore import BlobStore
from storage.cid import CID
from storage.manifest import MAX_MANIFEST_BYTES, DatasetManifest, ShardEntry, sign, verify

FORMAT = 1  # bump when a change makes the same inputs give different shards
MiB = 1 << 20
MAX_SOURCES = 1 << 16


@dataclass(frozen=True, kw_only=True)
class PrepareOptions:
    name: str
    vocab_size: int = 50_000
    tokenizer: str | None = None  # a tokenizer.json path or the CID of one in the store
    seq_len: int = 2048
    sequences_per_shard: int = 8192
    val_fraction: float = 0.01
    seed: int = 0
    filters: FilterConfig = field(default_factory=FilterConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    tokenizer_train_bytes: int = 256 * MiB  # a seeded sample of the training text, at most this much
    work_dir: Path | None = None  # where work files go (default: the system's temp dir)

    def __post_init__(self) -> None:
        if not self.name.strip():
            raise CorpusInputError("the dataset needs a name: pass --name NAME")
        if self.seq_len < 1:
            raise CorpusInputError(f"seq_len is {self.seq_len}; use at least 1")
        if self.sequences_per_shard < 1:
            raise CorpusInputError(f"sequences per shard is {self.sequences_per_shard}; use at least 1")
        if not 0.0 <= self.val_fraction < 1.0:
            raise CorpusInputError(f"val_fraction is {self.val_fraction}; use a fraction in [0, 1)")
        if not 0 <= self.seed < 1 << 63:
            raise CorpusInputError(f"seed is {self.seed}; use an integer in [0, 2**63)")
        if self.tokenizer is None and not bpe.MIN_VOCAB <= self.vocab_size < bpe.MAX_VOCAB:
            raise CorpusInputError(f"vocab size {self.vocab_size} must be at least {bpe.MIN_VOCAB}")
        if self.tokenizer_train_bytes < 1:
            raise CorpusInputError("the tokenizer's training sample must be at least 1 byte")


@dataclass(frozen=True)
class PrepareResult:
    dataset_cid: str
    manifest: DatasetManifest
    stats: dict[str, int]
    skipped_examples: list[str]
    tokenizer_source: str  # "trained", "given" or "cached"
    cached: bool  # the whole result came from the rerun cache
    seconds: dict[str, float]  # per stage, and "total"


def versions() -> dict[str, str]:
    """Libraries whose version can change the output for the same input."""
    return {
        "corpus": str(FORMAT),
        "tokenizers": tokenizers.__version__,
        "rensa": str(rensa.RMinHash.ALGORITHM_VERSION),
        "pyarrow": pyarrow.__version__,
    }


def prepare(
    sources: Sequence[Source],
    options: PrepareOptions,
    *,
    store: BlobStore,
    identity: Identity,
    cache: StageCache | None = None,
    reporter: Reporter | None = None,
) -> PrepareResult:
    """Build the dataset, publish it to ``store`` signed by ``identity``, return its CID and stats."""
    if not sources:
        raise CorpusInputError("no inputs: name at least one file or directory")
    if len(sources) > MAX_SOURCES:
        raise CorpusInputError(f"{len(sources)} inputs; at most {MAX_SOURCES} (name directories instead)")
    reporter = reporter or NullReporter()
    cache = cache or StageCache(None)
    t_start = time.perf_counter()
    given = _given_tokenizer(options.tokenizer, store)
    text_key = [[s.fingerprint() for s in sources], dataclasses.asdict(options.filters),
                dataclasses.asdict(options.dedup), versions()]
    tok_key = cache_key("tokenizer", text_key, options.vocab_size, options.tokenizer_train_bytes,
                        options.val_fraction, options.seed)
    plain = dataclasses.asdict(options)
    for local_only in ("work_dir", "tokenizer"):
        plain.pop(local_only)
    dataset_key = cache_key("dataset", text_key, [s.weight for s in sources], plain,
                            str(given[0]) if given else None, identity.public_key.hex())

    hit = _cached_dataset(cache.get("dataset", dataset_key), store, identity)
    if hit is not None:
        reporter.note(f"reusing dataset {hit.dataset_cid}: same inputs and options as an earlier run")
        reporter.close()
        return dataclasses.replace(hit, seconds={"total": time.perf_counter() - t_start})

    seconds: dict[str, float] = {}
    tokenizer_source = "given"
    if given is None:
        reused = _cached_tokenizer(cache.get("tokenizer", tok_key), store)
        if reused is not None:
            reporter.note(f"reusing tokenizer {reused[0]} trained by an earlier run on the same text")
            given, tokenizer_source = reused, "cached"

    with tempfile.TemporaryDirectory(prefix="panal-corpus-", dir=options.work_dir) as tmp:
        work = Path(tmp)
        t = time.perf_counter()
        sc = scan(sources, filters=options.filters, dedup=options.dedup, work=work, reporter=reporter)
        seconds["scan"] = time.perf_counter() - t
        stats = sc.stats
        val = val_split(sc.hashes, sc.keep, options.val_fraction, options.seed)
        train = sc.keep & ~val
        stats["documents_val"] = int(val.sum())
        stats["documents_train"] = int(train.sum())

        if given is None:
            t = time.perf_counter()
            tok_cid, tok = _train(sc, train, options, store, reporter)
            cache.put("tokenizer", tok_key, {"tokenizer_cid": str(tok_cid)})
            tokenizer_source = "trained"
            seconds["train tokenizer"] = time.perf_counter() - t
        else:
            tok_cid, tok = given
        t = time.perf_counter()
        _tokenise_spool(sc, sc.keep, tok, work / "tokens.spool", reporter)
        seconds["tokenise"] = time.perf_counter() - t
        vocab_size = tok.get_vocab_size()
        dtype = bpe.token_dtype(vocab_size)

        t = time.perf_counter()
        weight = np.array([s.weight for s in sources], dtype=np.float64)[sc.source_of]
        n_copies = copies(sc.hashes, train, weight, options.seed)
        stats["training_copies"] = int(n_copies.sum())
        entries: list[ShardEntry] = []

        def publish(split: str, sequences: np.ndarray) -> None:
            cid = store.put_bytes(shard_bytes(sequences), pin=True)
            entries.append(ShardEntry(cid=str(cid), split=split,  # type: ignore[arg-type]
                                      tokens=int(sequences.size), sequences=int(sequences.shape[0])))

        stats["tokens_dropped"] = shuffle_and_pack(
            work / "tokens.spool", hashes=sc.hashes, val=val, n_copies=n_copies, seed=options.seed,
            seq_len=options.seq_len, sequences_per_shard=options.sequences_per_shard, dtype=dtype,
            work=work, emit=publish, reporter=reporter,
        )
        seconds["shuffle+shards"] = time.perf_counter() - t

    entries = [e for e in entries if e.split == "train"] + [e for e in entries if e.split == "val"]
    for split in ("train", "val"):
        mine = [e for e in entries if e.split == split]
        stats[f"shards_{split}"] = len(mine)
        stats[f"sequences_{split}"] = sum(e.sequences for e in mine)
        stats[f"tokens_{split}"] = sum(e.tokens for e in mine)
    if stats["sequences_train"] == 0:
        raise CorpusInputError(
            f"the kept text makes no full training sequence of {options.seq_len + 1} tokens; "
            f"add text or lower --seq-len"
        )
    reporter.stage("publishing manifest")
    body = DatasetManifest(
        name=options.name,
        tokenizer_cid=str(tok_cid),
        vocab_size=vocab_size,
        seq_len=options.seq_len,
        token_dtype=dtype,  # type: ignore[arg-type]
        shards=entries,
        stats=dict(sorted(stats.items())),
    )
    dataset_cid = str(store.put_bytes(sign(body, identity), pin=True))
    cache.put("dataset", dataset_key, {"dataset_cid": dataset_cid, "examples": sc.examples,
                                       "tokenizer_source": tokenizer_source})
    seconds["total"] = time.perf_counter() - t_start
    reporter.close()
    return PrepareResult(dataset_cid, body, dict(body.stats), sc.examples, tokenizer_source, False, seconds)


# ---------------------------------------------------------------------------- stages


def _given_tokenizer(spec: str | None, store: BlobStore) -> tuple[CID, Tokenizer] | None:
    """The tokenizer named by --tokenizer (a file or a CID), now also in the store."""
    if spec is None:
        return None
    path = Path(spec).expanduser()
    if path.is_file():
        with open(path, "rb") as f:
            data = f.read(bpe.MAX_TOKENIZER_BYTES + 1)
        origin = str(path)
    else:
        try:
            cid = CID.parse(spec)
        except ValueError:
            raise CorpusInputError(f"--tokenizer {spec!r} is neither a file nor a CID") from None
        data = store.get_bytes(cid, max_bytes=bpe.MAX_TOKENIZER_BYTES)
        origin = f"tokenizer {cid}"
    tok = bpe.from_bytes(data, origin)
    bpe.eos_id(tok)
    return store.put_bytes(data, pin=True), tok


def _cached_tokenizer(entry: dict[str, Any] | None, store: BlobStore) -> tuple[CID, Tokenizer] | None:
    if entry is None:
        return None
    try:
        cid = CID.parse(str(entry["tokenizer_cid"]))
        if not store.has(cid):
            return None
        return cid, bpe.from_bytes(store.get_bytes(cid, max_bytes=bpe.MAX_TOKENIZER_BYTES))
    except Exception:  # any doubt about a cache entry means recompute
        return None


def _train(
    sc: Scan, train: np.ndarray, options: PrepareOptions, store: BlobStore, reporter: Reporter
) -> tuple[CID, Tokenizer]:
    """Train on a seeded sample (about ``tokenizer_train_bytes``) of the training documents."""
    train_bytes = int(sc.sizes[train].sum())
    sample = train & (unit(sc.hashes, options.seed, 2) < options.tokenizer_train_bytes / max(1, train_bytes))
    reporter.stage("training tokenizer", total=int(sc.sizes[sample].sum()))
    spool = sc.text_spool

    def texts() -> Iterator[str]:
        budget = options.tokenizer_train_bytes
        for i, data in enumerate(iter_records(spool)):
            if sample[i] and budget > 0:
                budget -= len(data)
                reporter.advance(len(data))
                yield data.decode()

    data = bpe.to_bytes(bpe.train(texts(), options.vocab_size))
    # Tokenise with the published bytes, exactly what a reader of the dataset will load.
    return store.put_bytes(data, pin=True), bpe.from_bytes(data)


def _tokenise_spool(sc: Scan, wanted: np.ndarray, tok: Tokenizer, out: Path, reporter: Reporter) -> None:
    spool = sc.text_spool
    reporter.stage("tokenising", total=int(sc.sizes[wanted].sum()))

    def docs() -> Iterator[tuple[int, str]]:
        for i, data in enumerate(iter_records(spool)):
            if wanted[i]:
                reporter.advance(len(data))
                yield i, data.decode()

    dtype = bpe.token_dtype(tok.get_vocab_size())
    write_token_spool(tok, docs(), out, eos=bpe.eos_id(tok), dtype=dtype, total=len(wanted))


def _cached_dataset(entry: dict[str, Any] | None, store: BlobStore, identity: Identity) -> PrepareResult | None:
    """The earlier result, if the store still holds its manifest and every blob it names."""
    if entry is None:
        return None
    try:
        cid = CID.parse(str(entry["dataset_cid"]))
        if not store.has(cid):
            return None
        signed = verify(store.get_bytes(cid, max_bytes=MAX_MANIFEST_BYTES), trusted={identity.public_key})
        body = signed.body
        if not isinstance(body, DatasetManifest) or not all(store.has(c) for _, c in body.children()):
            return None
        return PrepareResult(str(cid), body, dict(body.stats), list(entry.get("examples", [])),
                             str(entry.get("tokenizer_source", "cached")), True, {})
    except Exception:  # any doubt about a cache entry means recompute
        return None

