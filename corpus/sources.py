"""Where documents come from: text files, directories, JSONL and Parquet, streamed.

A source yields documents one at a time, so memory does not grow with the input.
Problems with one file or one record are *counted skips* with a reason (the
summary shows them); problems that would make the whole dataset wrong are errors:

| input | handling |
|---|---|
| a path that does not exist | error (a typo, not a skip) |
| a file that cannot be opened or read (I/O error, broken link, corrupt Parquet) | skip ``unreadable`` |
| invalid UTF-8 | skip ``invalid_utf8``, or decoded with U+FFFD under ``encoding_errors="replace"`` |
| a document over ``max_doc_bytes`` | skip ``too_large`` |
| a JSONL line that is not a JSON object | skip ``invalid_json`` |
| a JSONL record or Parquet file without the text field | error naming ``file:line`` and the fields there |
| a text field that is not a string | error naming ``file:line`` |
| a null text field | skip ``empty`` |

Directories are walked in sorted order (hidden entries and ``__pycache__`` left out)
and take the files whose suffix names a known format, so the order of documents,
and with it the dataset, is the same on every run.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

from corpus.errors import CorpusInputError

MiB = 1 << 20
DEFAULT_MAX_DOC_BYTES = 16 * MiB
MAX_EXAMPLES = 20  # skipped records the summary names, per run

TEXT_SUFFIXES = frozenset(
    ".txt .text .md .rst .py .pyi .c .h .cc .cpp .hpp .rs .go .java .js .ts .sh .tex .html .css".split()
)
JSONL_SUFFIXES = frozenset({".jsonl", ".ndjson"})
PARQUET_SUFFIXES = frozenset({".parquet"})
Kind = Literal["text", "jsonl", "parquet"]
EncodingErrors = Literal["skip", "replace"]


@dataclass(frozen=True, slots=True)
class Document:
    text: str
    origin: str  # "path", "path:line" (JSONL) or "path#row" (Parquet)


@dataclass(frozen=True, kw_only=True)
class ReadOptions:
    text_field: str = "text"
    encoding_errors: EncodingErrors = "skip"
    max_doc_bytes: int = DEFAULT_MAX_DOC_BYTES

    def __post_init__(self) -> None:
        if self.encoding_errors not in ("skip", "replace"):
            raise CorpusInputError(
                f"encoding_errors is {self.encoding_errors!r}; use 'skip' or 'replace'"
            )
        if self.max_doc_bytes <= 0:
            raise CorpusInputError(f"max_doc_bytes must be positive, got {self.max_doc_bytes}")


@dataclass
class ReadLog:
    """Documents skipped while reading, by reason, with the first few named."""

    skipped: Counter[str] = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)

    def skip(self, reason: str, origin: str, detail: str = "", count: int = 1) -> None:
        self.skipped[reason] += count
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append(f"{origin}: {reason}" + (f" ({detail})" if detail else ""))


def kind_of(path: Path) -> Kind | None:
    """The format a file's name says it holds (a trailing .gz is looked through)."""
    suffixes = [s.lower() for s in path.suffixes[-2:]]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    if not suffixes:
        return None
    if suffixes[-1] in JSONL_SUFFIXES:
        return "jsonl"
    if suffixes[-1] in PARQUET_SUFFIXES and path.suffix.lower() != ".gz":
        return "parquet"
    if suffixes[-1] in TEXT_SUFFIXES:
        return "text"
    return None


class Source(ABC):
    """A named, weighted stream of documents."""

    name: str
    weight: float

    @abstractmethod
    def fingerprint(self) -> list[Any]:
        """What identifies this input for the rerun cache (paths, sizes, mtimes)."""

    @abstractmethod
    def size_bytes(self) -> int:
        """Bytes to read, for progress and for sizing work files."""

    @abstractmethod
    def documents(self, log: ReadLog) -> Iterator[Document]:
        """The documents, in a fixed order; skips are recorded in ``log``."""


def parse_input(spec: str) -> tuple[Path, float]:
    """``PATH`` or ``PATH:WEIGHT``; a path that exists as written is never split."""
    path = Path(spec).expanduser()
    if path.exists() or path.is_symlink():
        return path, 1.0
    head, sep, tail = spec.rpartition(":")
    if sep:
        try:
            weight = float(tail)
        except ValueError:
            weight = None
        if weight is not None:
            if not (weight >= 0 and weight < float("inf")):
                raise CorpusInputError(f"weight {tail!r} in {spec!r} must be a finite number >= 0")
            head_path = Path(head).expanduser()
            if head_path.exists():
                return head_path, weight
            raise CorpusInputError(f"input {head!r} (from {spec!r}) does not exist")
    raise CorpusInputError(f"input {spec!r} does not exist")


def _stat_row(path: Path) -> list[Any]:
    try:
        st = path.stat()
    except OSError:
        st = path.lstat()  # a broken link still has a name and an mtime
        return [str(path), -1, st.st_mtime_ns]
    return [str(path), st.st_size, st.st_mtime_ns]


def walk(path: Path) -> list[Path]:
    """The files under ``path`` that have a known format, in sorted order."""
    if not path.is_dir():
        return [path]
    found: list[Path] = []
    for root, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "__pycache__")
        for name in sorted(files):
            p = Path(root, name)
            if not name.startswith(".") and kind_of(p) is not None:
                found.append(p)
    return found


class PathSource(Source):
    """A file or a directory of files."""

    def __init__(self, path: str | Path, *, weight: float = 1.0, options: ReadOptions | None = None) -> None:
        self.path = Path(path).expanduser()
        if not (self.path.exists() or self.path.is_symlink()):
            raise CorpusInputError(f"input {self.path} does not exist")
        self.name = str(path)
        self.weight = weight
        self.options = options or ReadOptions()
        self.files = walk(self.path)
        self._fingerprint = [_stat_row(p) for p in self.files]

    def fingerprint(self) -> list[Any]:
        return [self.options.text_field, self.options.encoding_errors, self.options.max_doc_bytes,
                *self._fingerprint]

    def size_bytes(self) -> int:
        return sum(max(0, row[1]) for row in self._fingerprint)

    def documents(self, log: ReadLog) -> Iterator[Document]:
        for path in self.files:
            kind = kind_of(path) or "text"  # a file named on the command line is read as text
            if kind == "parquet":
                yield from read_parquet(path, self.options, log)
            elif kind == "jsonl":
                yield from read_jsonl(path, self.options, log)
            else:
                doc = read_text_file(path, self.options, log)
                if doc is not None:
                    yield doc


def _open(path: Path) -> IO[bytes]:
    if path.suffix.lower() == ".gz":
        return gzip.open(path, "rb")  # type: ignore[return-value]  # a GzipFile is a binary IO
    return open(path, "rb")


def _decode(data: bytes, origin: str, options: ReadOptions, log: ReadLog) -> str | None:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        if options.encoding_errors == "replace":
            return data.decode("utf-8", errors="replace")
        log.skip("invalid_utf8", origin, f"byte {e.start}")
        return None


def _encodable(text: str, origin: str, options: ReadOptions, log: ReadLog) -> str | None:
    """JSON escapes can carry lone surrogates, which no UTF-8 writer accepts."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        if options.encoding_errors == "replace":
            return text.encode("utf-8", errors="replace").decode("utf-8")
        log.skip("invalid_utf8", origin, f"lone surrogate at character {e.start}")
        return None
    return text


def read_text_file(path: Path, options: ReadOptions, log: ReadLog) -> Document | None:
    """One file, one document."""
    origin = str(path)
    try:
        with _open(path) as f:
            data = f.read(options.max_doc_bytes + 1)
    except (OSError, EOFError) as e:
        log.skip("unreadable", origin, getattr(e, "strerror", None) or str(e))
        return None
    if len(data) > options.max_doc_bytes:
        log.skip("too_large", origin, f"over {options.max_doc_bytes} bytes")
        return None
    text = _decode(data.removeprefix(b"\xef\xbb\xbf"), origin, options, log)
    return None if text is None else Document(text, origin)


def read_jsonl(path: Path, options: ReadOptions, log: ReadLog) -> Iterator[Document]:
    """One document per line, from the field ``options.text_field``."""
    name = options.text_field
    lineno = 0
    try:
        with _open(path) as f:
            while True:
                line = f.readline(options.max_doc_bytes + 1)
                if not line:
                    return
                lineno += 1
                origin = f"{path}:{lineno}"
                if len(line) > options.max_doc_bytes and not line.endswith(b"\n"):
                    while line and not line.endswith(b"\n"):  # drop the rest of the long line
                        line = f.readline(MiB)
                    log.skip("too_large", origin, f"line over {options.max_doc_bytes} bytes")
                    continue
                if not line.strip():
                    continue
                raw = _decode(line, origin, options, log)
                if raw is None:
                    continue
                try:
                    record = json.loads(raw)
                except json.JSONDecodeError as e:
                    log.skip("invalid_json", origin, e.msg)
                    continue
                if not isinstance(record, dict):
                    log.skip("invalid_json", origin, f"a JSON {type(record).__name__}, not an object")
                    continue
                if name not in record:
                    fields = ", ".join(sorted(record)[:10]) or "none"
                    raise CorpusInputError(
                        f"{origin}: no field {name!r} (fields here: {fields}); "
                        f"pass --text-field with the field that holds the text"
                    )
                text = record[name]
                if text is None:
                    log.skip("empty", origin, f"{name} is null")
                    continue
                if not isinstance(text, str):
                    raise CorpusInputError(
                        f"{origin}: field {name!r} is a {type(text).__name__}, not a string; "
                        f"pass --text-field with the field that holds the text"
                    )
                text = _encodable(text, origin, options, log)
                if text is not None:
                    yield Document(text, origin)
    except (OSError, EOFError) as e:
        log.skip("unreadable", f"{path}:{lineno}", getattr(e, "strerror", None) or str(e))


def read_parquet(path: Path, options: ReadOptions, log: ReadLog) -> Iterator[Document]:
    """One document per row, from the string column ``options.text_field``, in record batches."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    name = options.text_field
    try:
        pf = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as e:
        log.skip("unreadable", str(path), str(e).splitlines()[0][:200])
        return
    with contextlib.closing(pf):
        schema = pf.schema_arrow
        if name not in schema.names:
            raise CorpusInputError(
                f"{path}: no column {name!r} (columns: {', '.join(schema.names[:10]) or 'none'}); "
                f"pass --text-field with the column that holds the text"
            )
        column_type = schema.field(name).type
        if not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)):
            raise CorpusInputError(f"{path}: column {name!r} is {column_type}, not a string column")
        row = 0
        try:
            for batch in pf.iter_batches(batch_size=256, columns=[name]):
                for text in batch.column(0).to_pylist():
                    origin = f"{path}#{row}"
                    row += 1
                    if text is None:
                        log.skip("empty", origin, f"{name} is null")
                    elif len(text) * 4 > options.max_doc_bytes and len(text.encode()) > options.max_doc_bytes:
                        log.skip("too_large", origin, f"over {options.max_doc_bytes} bytes")
                    else:
                        yield Document(text, origin)
        except (OSError, pa.ArrowException) as e:
            log.skip("unreadable", f"{path}#{row}", str(e).splitlines()[0][:200])
