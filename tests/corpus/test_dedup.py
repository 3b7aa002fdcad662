"""Exact and near-duplicate removal: the earliest copy stays, unrelated text is untouched."""

from __future__ import annotations

import random

from corpus.dedup import DedupConfig, Deduper, lsh_params, shingles
from tests.corpus.conftest import document


def run(texts, tmp_path, **config):
    d = Deduper(DedupConfig(**config), tmp_path / "dedup")
    for t in texts:
        d.add(t, t.encode())
    return d.finish()


def edit(text, n, rng):
    words = text.split(" ")
    for _ in range(n):
        words[rng.randrange(len(words))] = "edited"
    return " ".join(words)


def test_exact_and_near_duplicates_keep_the_earliest(tmp_path):
    rng = random.Random(1)
    docs = [document(rng, 300) for _ in range(50)]
    texts = docs + [docs[3], edit(docs[7], 3, rng), edit(docs[7], 4, rng), docs[3]]
    result = run(texts, tmp_path)
    assert result.exact == 2 and result.near == 2
    assert result.keep[:50].all()  # the originals, earliest, all stay
    assert not result.keep[50:].any()


def test_a_near_copy_before_its_original_wins(tmp_path):
    rng = random.Random(2)
    a = document(rng, 300)
    result = run([edit(a, 2, rng), document(rng, 300), a], tmp_path)
    assert result.keep.tolist() == [True, True, False]


def test_different_documents_are_all_kept(tmp_path):
    rng = random.Random(3)
    result = run([document(rng, 300) for _ in range(200)], tmp_path)
    assert result.keep.all() and result.exact == 0 and result.near == 0


def test_heavily_edited_text_is_not_a_near_duplicate(tmp_path):
    rng = random.Random(4)
    a = document(rng, 300)
    result = run([a, edit(a, 60, rng)], tmp_path)  # ~20% of words changed: most 5-grams differ
    assert result.keep.all()


def test_near_dedup_can_be_turned_off(tmp_path):
    rng = random.Random(5)
    a = document(rng, 300)
    result = run([a, edit(a, 1, rng), a], tmp_path, near=False)
    assert result.keep.tolist() == [True, True, False] and result.near == 0


def test_lsh_parameters_match_datasketchs_choice():
    assert lsh_params(0.8, 128) == (9, 13)  # datasketch.lsh._optimal_param(t, 128, .5, .5)
    assert lsh_params(0.5, 128) == (25, 5)


def test_shingles():
    assert shingles("a b c", 5) == ["a b c"]
    assert shingles("a b c d e f", 5) == ["a b c d e", "b c d e f"]


def test_empty_input(tmp_path):
    result = run([], tmp_path)
    assert result.keep.size == 0
