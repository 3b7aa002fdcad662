"""A small generated corpus with known defects, a local store and a signing key per test."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from protocol.identity import Identity
from storage.local import LocalStore

WORDS = (
    "the of and to in is was for on that with as by at from his her an were are which this be "
    "data model train token shard store node pool stage round update manifest signed hash verify "
    "river mountain garden window silver orange quiet rapid gentle ancient modern simple "
    "python function return value class method import module error result number string list"
).split()


def paragraph(rng: random.Random, words: int) -> str:
    out = []
    for i in range(words):
        w = rng.choice(WORDS)
        out.append(w.capitalize() if i % 12 == 0 else w)
        if i % 12 == 11:
            out[-1] += "."
    return " ".join(out)


def document(rng: random.Random, words: int = 120) -> str:
    return "\n\n".join(paragraph(rng, words // 3) for _ in range(3))


def make_corpus(root: Path, *, docs: int = 240, seed: int = 7) -> dict[str, int]:
    """Text files and a JSONL file under ``root``; returns how many defects of each kind it holds."""
    rng = random.Random(seed)
    (root / "texts").mkdir(parents=True)
    texts = [document(rng) for _ in range(docs)]
    for i, t in enumerate(texts[: docs // 2]):
        (root / "texts" / f"doc{i:04d}.txt").write_text(t)
    lines = [json.dumps({"text": t, "id": i}) for i, t in enumerate(texts[docs // 2 :])]
    # Defects: an exact copy, a near copy (one word changed), a short one, symbol soup, repeated lines.
    lines.append(json.dumps({"text": texts[0]}))
    near = texts[1].split(" ")
    near[40] = "quokka"
    lines.append(json.dumps({"text": " ".join(near)}))
    lines.append(json.dumps({"text": "too short"}))
    lines.append(json.dumps({"text": "#$%^&*(){}[]<>|~" * 30}))
    lines.append(json.dumps({"text": "\n".join(["the same line over and over"] * 40)}))
    (root / "more.jsonl").write_text("\n".join(lines) + "\n")
    return {"exact": 1, "near": 1, "too_short": 1, "symbols": 1, "repeated_lines": 1, "docs": docs + 5}


@pytest.fixture
def corpus_dir(tmp_path: Path) -> Path:
    make_corpus(tmp_path / "corpus")
    return tmp_path / "corpus"


@pytest.fixture
def store(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "store")


@pytest.fixture
def identity() -> Identity:
    return Identity.generate()


def small_options(**change):
    from corpus.clean import FilterConfig
    from corpus.prepare import PrepareOptions

    base = dict(name="tiny", vocab_size=400, seq_len=32, sequences_per_shard=256, val_fraction=0.05,
                filters=FilterConfig(min_chars=100))
    return PrepareOptions(**{**base, **change})


def small_sources(corpus: Path, text_weight: float = 1.0, jsonl_weight: float = 1.0):
    from corpus.sources import PathSource

    return [PathSource(corpus / "texts", weight=text_weight), PathSource(corpus / "more.jsonl", weight=jsonl_weight)]
