"""`panal corpus`: prepare a dataset from raw text, or the demo dataset from the standard library.

Progress and notes go to stderr; the summary table to stdout, and the dataset CID
is the last line of stdout.
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from corpus.cache import StageCache, default_cache_dir
from corpus.clean import FILTERS, FilterConfig
from corpus.dedup import DedupConfig
from corpus.errors import CorpusError
from corpus.prepare import PrepareOptions, PrepareResult, prepare
from corpus.sources import PathSource, ReadOptions, Source, parse_input
from protocol.errors import ProtocolError
from protocol.identity import Identity, load_or_create
from storage.stores import ENV_VAR, open_store

app = typer.Typer(help="Turn raw text into a content-addressed, tokenised dataset.", no_args_is_help=True)
out = Console()
err = Console(stderr=True)

DEFAULT_KEY = Path("~/.panal/operator.key")
STORE_HELP = "Store URL: local:PATH (default local:~/.panal/store) or kubo:http://HOST:PORT."
KEY_HELP = "Operator key that signs the dataset manifest (created if missing)."


class RichReporter:
    """Stages as progress bars on stderr; plain lines when stderr is not a terminal."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.live = console.is_terminal
        self.progress = Progress(
            TextColumn("{task.description:28}"), BarColumn(), TaskProgressColumn(), TimeElapsedColumn(),
            console=console, disable=not self.live,
        )
        self.task: TaskID | None = None
        if self.live:
            self.progress.start()

    def stage(self, name: str, total: float | None = None) -> None:
        if self.task is not None:
            t = self.progress.tasks[-1]
            self.progress.update(self.task, completed=t.total if t.total is not None else 1, total=t.total or 1)
        self.task = self.progress.add_task(name, total=total)
        if not self.live:
            self.console.print(f"{name} …", highlight=False)

    def advance(self, amount: float = 1) -> None:
        if self.task is not None:
            self.progress.advance(self.task, amount)

    def note(self, message: str) -> None:
        self.console.print(message, highlight=False)

    def close(self) -> None:
        if self.task is not None:
            t = self.progress.tasks[-1]
            self.progress.update(self.task, completed=t.total if t.total is not None else 1, total=t.total or 1)
            self.task = None
        self.progress.stop()


def _identity(path: Path) -> Identity:
    path = path.expanduser()
    identity, created = load_or_create(path)
    if created:
        err.print(f"created operator key {path} (fingerprint {identity.fingerprint})", highlight=False)
    return identity


def render(result: PrepareResult) -> None:
    """The summary table on stdout, then the dataset CID as the last line."""
    s = result.stats
    steps = Table("step", "in", "removed", "out", title=f"dataset {result.manifest.name!r}")
    skipped = {k.removeprefix("skipped_"): v for k, v in s.items() if k.startswith("skipped_") and v}
    read = s.get("documents_read", 0)
    skip_detail = ", ".join(f"{k} {v}" for k, v in sorted(skipped.items()))
    steps.add_row("read" + (f" (skipped: {skip_detail})" if skip_detail else ""),
                  f"{read + sum(skipped.values()):,}", f"{sum(skipped.values()):,}", f"{read:,}")
    n = read
    for name in (*FILTERS, "exact_duplicate", "near_duplicate"):
        removed = s.get(f"removed_{name}", 0)
        label = f"filter {name}" if name in FILTERS else name.replace("_", " ")
        steps.add_row(label, f"{n:,}", f"{removed:,}", f"{n - removed:,}")
        n -= removed
    out.print(steps)
    splits = Table("split", "documents", "sequences", "tokens", "shards")
    for split in ("train", "val"):
        splits.add_row(split, f"{s.get(f'documents_{split}', 0):,}", f"{s.get(f'sequences_{split}', 0):,}",
                       f"{s.get(f'tokens_{split}', 0):,}", f"{s.get(f'shards_{split}', 0):,}")
    out.print(splits)
    m = result.manifest
    out.print(
        f"tokenizer {m.tokenizer_cid} ({result.tokenizer_source}), vocabulary {m.vocab_size:,}, "
        f"{m.token_dtype}; sequences of {m.seq_len} + 1 tokens"
        + ("; reused from an earlier run" if result.cached else f"; {result.seconds.get('total', 0):.1f} s"),
        highlight=False,
    )
    for example in result.skipped_examples[:5]:
        err.print(f"skipped {example}", highlight=False)
    print(result.dataset_cid)


def _run(sources: list[Source], options: PrepareOptions, store_url: str | None, key: Path, cache: bool) -> None:
    try:
        identity = _identity(key)
        with open_store(store_url) as store:
            reporter = RichReporter(err)
            try:
                result = prepare(
                    sources, options, store=store, identity=identity,
                    cache=StageCache(default_cache_dir(store) if cache else None), reporter=reporter,
                )
            finally:
                reporter.close()
    except (CorpusError, ProtocolError) as e:
        err.print(f"[red]error:[/red] {e}", highlight=False)
        raise typer.Exit(1) from None
    render(result)


@app.command("prepare")
def prepare_command(
    inputs: list[str] = typer.Argument(
        ..., help="Files or directories: text, .jsonl[.gz], .parquet. PATH:WEIGHT weights a source."
    ),
    name: str = typer.Option(..., "--name", help="Dataset name (in its manifest)."),
    text_field: str = typer.Option("text", "--text-field", help="JSONL field / Parquet column with the text."),
    vocab_size: int = typer.Option(50_000, "--vocab-size", help="BPE vocabulary to train."),
    tokenizer: str | None = typer.Option(
        None, "--tokenizer", help="Use this tokenizer.json (path or CID) instead of training one."
    ),
    seq_len: int = typer.Option(2048, "--seq-len", help="Tokens of context per training sequence."),
    shard_sequences: int = typer.Option(8192, "--shard-sequences", help="Sequences per shard."),
    val_fraction: float = typer.Option(0.01, "--val-fraction", help="Documents held out for validation."),
    seed: int = typer.Option(0, "--seed", help="Seed of the split, weights sampling and shuffle."),
    min_chars: int = typer.Option(200, "--min-chars", help="Drop shorter documents."),
    max_chars: int = typer.Option(1_000_000, "--max-chars", help="Drop longer documents."),
    max_symbol_ratio: float = typer.Option(0.3, "--max-symbol-ratio", help="Drop documents with more symbols."),
    max_repeated_lines: float = typer.Option(
        0.3, "--max-repeated-lines", help="Drop documents with a larger fraction of repeated-line characters."
    ),
    near_dedup: bool = typer.Option(True, "--near-dedup/--no-near-dedup", help="MinHash near-duplicate removal."),
    near_threshold: float = typer.Option(0.8, "--near-threshold", help="Jaccard similarity of near duplicates."),
    encoding_errors: str = typer.Option(
        "skip", "--encoding-errors", help="Invalid UTF-8: 'skip' the document (counted) or 'replace' bytes."
    ),
    max_doc_mib: int = typer.Option(16, "--max-doc-mib", help="Skip (counted) documents larger than this."),
    tokenizer_train_mib: int = typer.Option(256, "--tokenizer-train-mib", help="Text sample to train BPE on (MiB)."),
    work_dir: Path | None = typer.Option(None, "--work-dir", help="Scratch space (default: system temp)."),
    cache: bool = typer.Option(True, "--cache/--no-cache", help="Reuse results of an earlier identical run."),
    key: Path = typer.Option(DEFAULT_KEY, "--key", help=KEY_HELP),
    store: str | None = typer.Option(None, "--store", envvar=ENV_VAR, help=STORE_HELP),
) -> None:
    """Clean, deduplicate, tokenise and shard text; publish it; print the dataset CID last."""
    try:
        read = ReadOptions(text_field=text_field, encoding_errors=encoding_errors,  # type: ignore[arg-type]
                           max_doc_bytes=max_doc_mib << 20)
        sources: list[Source] = []
        for spec in inputs:
            path, weight = parse_input(spec)
            sources.append(PathSource(path, weight=weight, options=read))
        options = PrepareOptions(
            name=name, vocab_size=vocab_size, tokenizer=tokenizer, seq_len=seq_len,
            sequences_per_shard=shard_sequences, val_fraction=val_fraction, seed=seed,
            filters=FilterConfig(min_chars=min_chars, max_chars=max_chars, max_symbol_ratio=max_symbol_ratio,
                                 max_repeated_line_fraction=max_repeated_lines),
            dedup=DedupConfig(near=near_dedup, threshold=near_threshold),
            tokenizer_train_bytes=tokenizer_train_mib << 20, work_dir=work_dir,
        )
    except CorpusError as e:
        err.print(f"[red]error:[/red] {e}", highlight=False)
        raise typer.Exit(1) from None
    _run(sources, options, store, key, cache)


@app.command("demo")
def demo_command(
    vocab_size: int = typer.Option(4096, "--vocab-size", help="BPE vocabulary to train."),
    seq_len: int = typer.Option(64, "--seq-len", help="Tokens of context (the tiny preset's context is 64)."),
    shard_sequences: int = typer.Option(4096, "--shard-sequences", help="Sequences per shard."),
    val_fraction: float = typer.Option(0.02, "--val-fraction", help="Documents held out for validation."),
    seed: int = typer.Option(0, "--seed", help="Seed of the split and shuffle."),
    with_tests: bool = typer.Option(False, "--with-tests", help="Add the stdlib's test suites (33 MB, not 14)."),
    work_dir: Path | None = typer.Option(None, "--work-dir", help="Scratch space (default: system temp)."),
    cache: bool = typer.Option(True, "--cache/--no-cache", help="Reuse results of an earlier identical run."),
    key: Path = typer.Option(DEFAULT_KEY, "--key", help=KEY_HELP),
    store: str | None = typer.Option(None, "--store", envvar=ENV_VAR, help=STORE_HELP),
) -> None:
    """Prepare the demo dataset: this Python's standard library (code and docstrings), no download."""
    from corpus.demo import StdlibSource, demo_options

    try:
        options = demo_options(vocab_size=vocab_size, seq_len=seq_len, sequences_per_shard=shard_sequences,
                               val_fraction=val_fraction, seed=seed, work_dir=work_dir)
        sources: list[Source] = [StdlibSource(include_tests=with_tests)]
    except CorpusError as e:
        err.print(f"[red]error:[/red] {e}", highlight=False)
        raise typer.Exit(1) from None
    _run(sources, options, store, key, cache)
