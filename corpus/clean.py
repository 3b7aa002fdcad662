"""Normalise a document, then keep or drop it by a few cheap quality heuristics.

Normalisation is Unicode NFC plus whitespace: line ends become ``\\n``, exotic
spaces become a plain space, zero-width and control characters (other than tab
and newline) go, trailing spaces on each line go, runs of more than three blank
lines shrink to three (PEP 8's two blank lines survive), and the document loses
leading blank lines and trailing whitespace. Indentation is kept: code is text
here.

The filters, in the order they are tried (a document is counted under the first
that removes it):

- ``too_short`` / ``too_long``: fewer than ``min_chars`` or more than ``max_chars``
  characters after normalisation;
- ``symbols``: more than ``max_symbol_ratio`` of the characters are neither
  letters, digits, ``_`` nor whitespace (binary dumps, minified data, ASCII art);
- ``repeated_lines``: more than ``max_repeated_line_fraction`` of the characters
  of non-blank lines sit in lines that repeat an earlier line (boilerplate,
  logs, generated tables) — Gopher's duplicate-line-character fraction.

The defaults keep all but the oddest files of the Python standard library
(symbol ratio at most 0.28, repeated-line fraction 0.05 at the median).
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from dataclasses import dataclass

from corpus.errors import CorpusInputError

FILTERS = ("too_short", "too_long", "symbols", "repeated_lines")

_NEWLINES = re.compile(r"\r\n?|[\u2028\u2029\x85\x0b\x0c]")
_SPACES = re.compile(r"[\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]")
# C0 controls but tab and newline, DEL, C1 controls, zero-width characters, BOM.
_INVISIBLE = re.compile(r"[\x00-\x08\x0e-\x1f\x7f\x80-\x84\x86-\x9f\u200b-\u200d\u2060\ufeff]")
_TRAILING = re.compile(r"[ \t]+\n")
# Anything but printable ASCII, newline and tab: the only text the slow rewrites touch.
_ODD = re.compile(r"[^\n\t\x20-\x7e]")
_BLANK_RUNS = re.compile(r"\n{5,}")
_WORDLIKE = re.compile(r"[\w\s]+")
_ASCII_SYMBOLS = bytes(b for b in range(128) if not re.match(r"[\w\s]", chr(b)))


@dataclass(frozen=True, kw_only=True)
class FilterConfig:
    min_chars: int = 200
    max_chars: int = 1_000_000
    max_symbol_ratio: float = 0.30
    max_repeated_line_fraction: float = 0.30

    def __post_init__(self) -> None:
        if not 0 <= self.min_chars <= self.max_chars:
            raise CorpusInputError(
                f"min_chars {self.min_chars} and max_chars {self.max_chars} must satisfy 0 <= min <= max"
            )
        for name in ("max_symbol_ratio", "max_repeated_line_fraction"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise CorpusInputError(f"{name} is {value}; it is a fraction between 0 and 1 (1 turns it off)")


def normalise(text: str) -> str:
    """NFC and whitespace normalisation (see the module docstring).

    Each rewrite runs only where a cheap scan finds something to rewrite: most text
    (and nearly all code) is printable ASCII without trailing spaces.
    """
    if _ODD.search(text) is not None:
        if not text.isascii():
            text = unicodedata.normalize("NFC", text)
            text = _SPACES.sub(" ", text)
        text = _NEWLINES.sub("\n", text)
        text = _INVISIBLE.sub("", text)
    if " \n" in text or "\t\n" in text:
        text = _TRAILING.sub("\n", text)
    if "\n\n\n\n\n" in text:
        text = _BLANK_RUNS.sub("\n\n\n\n", text)
    return text.lstrip("\n").rstrip()


def symbol_ratio(text: str) -> float:
    """Fraction of characters that are neither word characters nor whitespace."""
    if not text:
        return 0.0
    if text.isascii():  # bytes.translate deletes in a C loop, far faster than a regex
        data = text.encode("ascii")
        return (len(data) - len(data.translate(None, _ASCII_SYMBOLS))) / len(data)
    return len(_WORDLIKE.sub("", text)) / len(text)


def repeated_line_fraction(text: str) -> float:
    """Fraction of the characters of non-blank lines that repeat an earlier line."""
    counts = Counter(map(str.strip, text.split("\n")))  # counted in C
    counts.pop("", None)
    total = sum(len(line) * n for line, n in counts.items())
    repeated = total - sum(map(len, counts))
    return repeated / total if total else 0.0


def check(text: str, config: FilterConfig) -> str | None:
    """The name of the first filter that removes ``text``, or None to keep it."""
    n = len(text)
    if n < config.min_chars:
        return "too_short"
    if n > config.max_chars:
        return "too_long"
    if config.max_symbol_ratio < 1.0 and symbol_ratio(text) > config.max_symbol_ratio:
        return "symbols"
    if config.max_repeated_line_fraction < 1.0 and repeated_line_fraction(text) > config.max_repeated_line_fraction:
        return "repeated_lines"
    return None
