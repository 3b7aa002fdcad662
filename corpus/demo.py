"""The demo corpus: this machine's Python standard library, no download needed.

Two kinds of document: each module's source file (code), and each module's
documentation strings gathered into one text (prose), e.g.::

    Documentation of the module email.message.

    Basic message object for the email package object model.

    class Message:
    Basic message object. ...

Test packages, ``site-packages`` and ``__pycache__`` are left out, unless
``include_tests``. About 800 modules and 14 MB on CPython 3.11 (33 MB with the
tests); the codec tables under ``encodings/`` make a good near-duplicate demo.
"""

from __future__ import annotations

import ast
import sys
import sysconfig
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from corpus.prepare import PrepareOptions
from corpus.sources import Document, ReadLog, ReadOptions, Source, read_text_file

DEMO_NAME = "python-stdlib-demo"


def demo_options(**change: Any) -> PrepareOptions:
    """The demo dataset's options: a 4096-entry vocabulary and sequences of 64 tokens (the
    ``tiny`` preset's context), 4096 sequences a shard, 2% of documents held out."""
    base: dict[str, Any] = dict(
        name=DEMO_NAME, vocab_size=4096, seq_len=64, sequences_per_shard=4096, val_fraction=0.02, seed=0
    )
    return PrepareOptions(**{**base, **change})


SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__", "idle_test", "_bundled"})


def _is_test_dir(name: str) -> bool:
    return name in ("test", "tests") or name.startswith("test_")


def stdlib_files(root: Path, *, include_tests: bool = False) -> list[Path]:
    import os

    found: list[Path] = []
    for dirpath, dirs, files in os.walk(root):
        dirs[:] = sorted(
            d for d in dirs
            if d not in SKIP_DIRS and not d.startswith(".") and (include_tests or not _is_test_dir(d))
        )
        found.extend(Path(dirpath, f) for f in sorted(files) if f.endswith(".py"))
    return found


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts and parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts) or path.stem


def docstrings(source: str, module: str) -> str | None:
    """The module's, classes' and functions' docstrings as one text; None if it has none."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SyntaxWarning)
            tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return None
    parts: list[str] = []
    module_doc = ast.get_docstring(tree)
    if module_doc:
        parts.append(module_doc)

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                name = f"{prefix}{child.name}"
                doc = ast.get_docstring(child)
                if doc:
                    kind = "class" if isinstance(child, ast.ClassDef) else "def"
                    parts.append(f"{kind} {name}:\n{doc}")
                if isinstance(child, ast.ClassDef):
                    visit(child, f"{name}.")

    visit(tree, "")
    if not parts:
        return None
    return f"Documentation of the module {module}.\n\n" + "\n\n".join(parts)


class StdlibSource(Source):
    def __init__(
        self, root: Path | None = None, *, include_tests: bool = False, docstrings: bool = True, weight: float = 1.0
    ) -> None:
        self.root = Path(root or sysconfig.get_paths()["stdlib"])
        self.name = f"python{sys.version_info.major}.{sys.version_info.minor} standard library"
        self.weight = weight
        self.include_tests = include_tests
        self.docstrings = docstrings
        self.files = stdlib_files(self.root, include_tests=include_tests)
        self.options = ReadOptions(encoding_errors="replace")

    def fingerprint(self) -> list[Any]:
        rows: list[Any] = ["stdlib", sys.version, self.include_tests, self.docstrings]
        for p in self.files:
            st = p.stat()
            rows.append([str(p), st.st_size, st.st_mtime_ns])
        return rows

    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.files)

    def documents(self, log: ReadLog) -> Iterator[Document]:
        for path in self.files:
            doc = read_text_file(path, self.options, log)
            if doc is None:
                continue
            yield doc
            if not self.docstrings:
                continue
            prose = docstrings(doc.text, module_name(self.root, path))
            if prose:
                yield Document(prose, f"{path} (docstrings)")
