"""Corpus pipeline throughput against plain `tokenizers`, measured in the same run.

    python bench/corpus.py [--corpus demo|files] [--vocab-size 4096] [--repeats 3]

The corpus is the demo's (this Python's standard library: sources and, with
``demo``, the docstrings gathered per module, which costs an ``ast.parse`` of
every module; ``files`` takes the source files alone). What is timed:

- baseline: the same raw text, already in memory, tokenised directly with the
  same trained tokenizer — `encode_batch` or `encode_batch_fast`, the whole list
  in one call or 4 MiB batches, whichever of the four was fastest in a warm-up;
- `prepare` with that tokenizer given (read, clean, dedup, tokenise, shuffle,
  shard, publish: everything but training);
- `prepare` from scratch, with and without its tokenizer-training time.

Each repeat times baseline, both prepares, baseline again, back to back, and
takes ratios against the mean of the two baselines around them: on a shared
machine whose load changes by the minute, pairs measured together say more than
best-of figures taken minutes apart. The median ratio of the repeats is shown.

Target: prepare >= 0.7x the baseline's documents/s (the ratio is the same for
tokens/s: both count the documents read and the tokens written).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

# This file is named after the package it measures: drop bench/ from the path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from tokenizers import Tokenizer  # noqa: E402

from corpus import tokenizer as bpe  # noqa: E402
from corpus.demo import StdlibSource, demo_options  # noqa: E402
from corpus.prepare import PrepareOptions, PrepareResult, prepare  # noqa: E402
from corpus.sources import ReadLog  # noqa: E402
from protocol.identity import Identity  # noqa: E402
from storage.local import LocalStore  # noqa: E402

BATCH_CHARS = 4 << 20


def encoder(tok: Tokenizer, texts: list[str], method: str, batched: bool) -> Callable[[], int]:
    """A function tokenising ``texts`` one plain way; returns the number of tokens."""
    batches: list[list[str]] = []
    if batched:
        batch: list[str] = []
        chars = 0
        for t in texts:
            batch.append(t)
            chars += len(t)
            if chars >= BATCH_CHARS:
                batches.append(batch)
                batch, chars = [], 0
        batches.append(batch)
    else:
        batches = [texts]

    def run() -> int:
        encode = getattr(tok, method)
        return sum(len(e.ids) for b in batches for e in encode(b, add_special_tokens=False))

    return run


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    t0 = time.perf_counter()
    value = fn()
    return time.perf_counter() - t0, value


def run_prepare(source: StdlibSource, options: PrepareOptions) -> tuple[PrepareResult, bytes]:
    """A fresh store every time: nothing is reused. Returns the result and its tokenizer's bytes."""
    with tempfile.TemporaryDirectory() as tmp:
        store = LocalStore(tmp)
        result = prepare([source], options, store=store, identity=Identity.generate())
        return result, store.get_bytes(result.manifest.tokenizer_cid)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", choices=["demo", "files"], default="demo")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    source = StdlibSource(docstrings=args.corpus == "demo")
    read_s, docs = timed(lambda: [d.text for d in source.documents(ReadLog())])
    texts: list[str] = docs  # type: ignore[assignment]
    mb = sum(len(t.encode()) for t in texts) / 1e6
    print(f"corpus {args.corpus}: {len(texts):,} documents, {mb:.1f} MB (read into memory in {read_s:.2f} s)")

    options = demo_options(name="bench", vocab_size=args.vocab_size)
    first, tok_bytes = run_prepare(source, options)
    with tempfile.TemporaryDirectory() as tmp:
        tok_path = Path(tmp) / "tokenizer.json"
        tok_path.write_bytes(tok_bytes)
        given_options = dataclasses.replace(options, tokenizer=str(tok_path))

        # Warm-up: the fastest plain way to tokenise this text becomes the baseline.
        variants = {
            (m, b): encoder(bpe.from_bytes(tok_bytes), texts, m, b)
            for m in ("encode_batch", "encode_batch_fast") for b in (False, True)
        }
        warm = {key: timed(fn)[0] for key, fn in variants.items()}
        method, batched = min(warm, key=lambda k: warm[k])
        how = f"{method}, {'4 MiB batches' if batched else 'one call'}"

        rows: dict[str, list[tuple[float, float]]] = {"given": [], "no-train": [], "scratch": []}
        base_times: list[float] = []
        for _ in range(args.repeats):
            b1, tokens = timed(encoder(bpe.from_bytes(tok_bytes), texts, method, batched))
            given, _ = run_prepare(source, given_options)
            scratch, _ = run_prepare(source, options)
            b2, _ = timed(encoder(bpe.from_bytes(tok_bytes), texts, method, batched))
            base = (b1 + b2) / 2
            base_times += [b1, b2]
            train = scratch.seconds.get("train tokenizer", 0.0)
            rows["given"].append((given.seconds["total"], base / given.seconds["total"]))
            rows["no-train"].append((scratch.seconds["total"] - train, base / (scratch.seconds["total"] - train)))
            rows["scratch"].append((scratch.seconds["total"], base / scratch.seconds["total"]))
            print(f"  repeat: baseline {b1:.2f}/{b2:.2f} s, given {given.seconds['total']:.2f} s, "
                  f"scratch {scratch.seconds['total']:.2f} s (training {train:.2f} s)", flush=True)

    n_docs = first.stats["documents_read"]
    out_tokens = first.stats["tokens_train"] + first.stats["tokens_val"]
    best_base = min(base_times)
    print(f"\n{'what':46} {'best s':>7} {'docs/s':>7} {'tokens/s':>10} {'median ratio':>13}")
    print(f"{'tokenizers alone (' + how + ')':46} {best_base:7.2f} {n_docs / best_base:7.0f} "
          f"{int(tokens) / best_base:10,.0f} {1.0:13.2f}")  # type: ignore[call-overload]
    labels = {"given": "prepare, tokenizer given", "no-train": "prepare, excluding tokenizer training",
              "scratch": "prepare from scratch (with training)"}
    for key, label in labels.items():
        best = min(s for s, _ in rows[key])
        ratio = statistics.median(r for _, r in rows[key])
        print(f"{label:46} {best:7.2f} {n_docs / best:7.0f} {out_tokens / best:10,.0f} {ratio:13.2f}")
    print(f"target: prepare >= 0.70x tokenizers alone -> tokenizer given {statistics.median(r for _, r in rows['given']):.2f}x, "
          f"excluding training {statistics.median(r for _, r in rows['no-train']):.2f}x")
    print("stages of the first from-scratch run: "
          + ", ".join(f"{k} {v:.2f} s" for k, v in first.seconds.items()))


if __name__ == "__main__":
    main()
