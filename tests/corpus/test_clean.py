"""Normalisation and the quality filters, one by one."""

from __future__ import annotations

import pytest

from corpus.clean import FilterConfig, check, normalise, repeated_line_fraction, symbol_ratio
from corpus.errors import CorpusInputError


def test_nfc_and_whitespace():
    decomposed = "cafe\u0301"  # e + combining acute
    assert normalise(decomposed) == "caf\u00e9"
    assert normalise("a\r\nb\rc\u2028d") == "a\nb\nc\nd"
    assert normalise("non\u00a0breaking\u3000space") == "non breaking space"
    assert normalise("zero\u200bwidth\ufeff and \x00nul\x07") == "zerowidth and nul"
    assert normalise("trailing   \nspaces\t\t\nend  ") == "trailing\nspaces\nend"
    assert normalise("\n\n  leading indent kept\n") == "  leading indent kept"
    assert normalise("a" + "\n" * 9 + "b") == "a\n\n\n\nb"  # at most three blank lines
    assert normalise("def f():\n\tif x:\n\t\treturn 1\n\n\ndef g(): pass") == (
        "def f():\n\tif x:\n\t\treturn 1\n\n\ndef g(): pass"
    )
    assert normalise("form\x0cfeed") == "form\nfeed"


def test_normalise_is_idempotent_on_odd_text():
    text = " \u00a0x\r\n\r\n\r\n\r\n\r\n\r\ny \t\n\u200b"
    once = normalise(text)
    assert normalise(once) == once


def test_symbol_ratio_ascii_and_unicode_agree():
    assert symbol_ratio("ab, cd!") == pytest.approx(2 / 7)
    assert symbol_ratio("ab, cd!é") == pytest.approx(2 / 8)
    assert symbol_ratio("") == 0.0


def test_repeated_line_fraction():
    assert repeated_line_fraction("a\nb\nc") == 0
    assert repeated_line_fraction("aa\nbb\naa\n\n\naa") == pytest.approx(4 / 8)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("short", "too_short"),
        ("x " * 60, "too_long"),
        ("#$%^&*" * 10, "symbols"),
        ("\n".join(["same line"] * 10), "repeated_lines"),
        ("A plain sentence with words. " * 2, None),
    ],
)
def test_each_filter(text, reason):
    config = FilterConfig(min_chars=10, max_chars=100, max_symbol_ratio=0.3, max_repeated_line_fraction=0.3)
    assert check(text, config) == reason


def test_filter_config_errors_name_the_fix():
    with pytest.raises(CorpusInputError, match="min <= max"):
        FilterConfig(min_chars=10, max_chars=5)
    with pytest.raises(CorpusInputError, match="between 0 and 1"):
        FilterConfig(max_symbol_ratio=1.5)
