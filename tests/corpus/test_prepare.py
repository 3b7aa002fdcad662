"""`prepare` end to end on a small generated corpus: what it removes, what it publishes,
that it verifies, that it is deterministic, and that a rerun skips the work."""

from __future__ import annotations

import dataclasses
import json
import time

import pytest

from corpus import tokenizer as bpe
from corpus.cache import StageCache
from corpus.errors import CorpusInputError
from corpus.prepare import prepare
from corpus.sources import PathSource
from protocol.identity import Identity
from storage.local import LocalStore
from storage.manifest import verify
from storage.verify import verify_tree
from tests.corpus.conftest import small_options, small_sources


def run(corpus, store, identity, cache=None, text_weight=1.0, **change):
    return prepare(small_sources(corpus, text_weight), small_options(**change), store=store, identity=identity,
                   cache=cache)


def test_end_to_end_counts_publishes_and_verifies(corpus_dir, store, identity):
    result = run(corpus_dir, store, identity)
    s = result.stats
    assert s["documents_read"] == 245
    assert (s["removed_too_short"], s["removed_symbols"], s["removed_repeated_lines"]) == (1, 1, 1)
    assert (s["removed_exact_duplicate"], s["removed_near_duplicate"]) == (1, 1)
    assert s["documents_kept"] == 240 == s["documents_train"] + s["documents_val"]
    assert s["documents_val"] >= 1 and s["shards_val"] >= 1 and s["shards_train"] >= 2

    m = result.manifest
    assert (m.seq_len, m.vocab_size, m.token_dtype, m.name) == (32, 400, "uint16", "tiny")
    train = [e for e in m.shards if e.split == "train"]
    assert all(e.sequences == 256 for e in train[:-1]) and 0 < train[-1].sequences <= 256
    assert all(e.tokens == e.sequences * 33 for e in m.shards)
    assert s["tokens_train"] == sum(e.tokens for e in train)

    checks = verify_tree(store, result.dataset_cid, trusted={identity.public_key})
    assert all(c.ok for c in checks), [c for c in checks if not c.ok]
    assert {c.role for c in checks} == {"root", "tokenizer", "shard train", "shard val"}
    signed = verify(store.get_bytes(result.dataset_cid), trusted={identity.public_key})
    assert signed.body == m

    tok = bpe.from_bytes(store.get_bytes(m.tokenizer_cid))
    from corpus.reader import DatasetReader

    x, _ = DatasetReader(store, result.dataset_cid, batch_size=4, seed=0).batch(0)
    assert any(w in tok.decode(x[0].tolist()) for w in ("the", "of", "and"))


def test_same_inputs_give_the_same_dataset_in_a_fresh_store(corpus_dir, tmp_path, identity):
    a = run(corpus_dir, LocalStore(tmp_path / "a"), identity)
    b = run(corpus_dir, LocalStore(tmp_path / "b"), Identity.generate())
    assert a.manifest == b.manifest  # tokenizer, every shard, every count
    c = run(corpus_dir, LocalStore(tmp_path / "c"), identity, seed=1)
    assert c.manifest.tokenizer_cid != a.manifest.tokenizer_cid or c.manifest.shards != a.manifest.shards


def test_a_given_tokenizer_gives_the_same_shards_as_the_trained_one(corpus_dir, tmp_path, identity):
    store = LocalStore(tmp_path / "s")
    trained = run(corpus_dir, store, identity)
    path = tmp_path / "tokenizer.json"
    path.write_bytes(store.get_bytes(trained.manifest.tokenizer_cid))
    by_path = run(corpus_dir, LocalStore(tmp_path / "t"), identity, tokenizer=str(path))
    by_cid = run(corpus_dir, store, identity, tokenizer=trained.manifest.tokenizer_cid)
    assert by_path.tokenizer_source == by_cid.tokenizer_source == "given"
    assert by_path.manifest.shards == by_cid.manifest.shards == trained.manifest.shards


def test_rerun_is_skipped_and_prints_the_same_cid(corpus_dir, store, identity, tmp_path):
    cache = StageCache(tmp_path / "cache")
    t0 = time.perf_counter()
    first = run(corpus_dir, store, identity, cache=cache)
    first_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    again = run(corpus_dir, store, identity, cache=cache)
    again_s = time.perf_counter() - t0
    assert again.cached and not first.cached
    assert again.dataset_cid == first.dataset_cid and again.stats == first.stats
    assert again_s < first_s / 3

    # Only the packing changes: the tokenizer is reused, not trained again.
    repacked = run(corpus_dir, store, identity, cache=cache, seq_len=16)
    assert repacked.tokenizer_source == "cached" and not repacked.cached
    assert repacked.manifest.tokenizer_cid == first.manifest.tokenizer_cid

    # A blob gone from the store means the cache entry no longer counts.
    store.path_of(first.manifest.shards[0].cid).unlink()
    rebuilt = run(corpus_dir, store, identity, cache=cache)
    assert not rebuilt.cached and rebuilt.manifest.shards == first.manifest.shards

    # A touched input is a different input.
    f = next((corpus_dir / "texts").iterdir())
    f.write_text(f.read_text() + " more")
    assert not run(corpus_dir, store, identity, cache=cache).cached


def test_source_weights_repeat_or_drop_training_documents(corpus_dir, store, identity):
    plain = run(corpus_dir, store, identity)
    double = run(corpus_dir, store, identity, text_weight=2.0)
    none = run(corpus_dir, store, identity, text_weight=0.0)
    from_texts = 120  # documents in texts/, all kept
    assert double.stats["training_copies"] > plain.stats["training_copies"] > none.stats["training_copies"]
    assert double.stats["training_copies"] - plain.stats["training_copies"] <= from_texts
    assert none.stats["documents_val"] == plain.stats["documents_val"]  # weights leave validation alone


def test_empty_and_useless_input_are_clear_errors(tmp_path, store, identity):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CorpusInputError, match="hold no documents"):
        prepare([PathSource(tmp_path / "empty")], small_options(), store=store, identity=identity)
    (tmp_path / "short.jsonl").write_text("\n".join(json.dumps({"text": "tiny"}) for _ in range(5)))
    with pytest.raises(CorpusInputError, match=r"the filters removed all 5 documents \(too_short 5\)"):
        prepare([PathSource(tmp_path / "short.jsonl")], small_options(), store=store, identity=identity)
    with pytest.raises(CorpusInputError, match="no inputs"):
        prepare([], small_options(), store=store, identity=identity)
    with pytest.raises(CorpusInputError, match="needs a name"):
        dataclasses.replace(small_options(), name=" ")


def test_too_little_text_for_one_sequence(tmp_path, store, identity):
    (tmp_path / "a.txt").write_text("word " * 40)
    with pytest.raises(CorpusInputError, match="no full training sequence"):
        prepare([PathSource(tmp_path / "a.txt")], small_options(seq_len=4000, val_fraction=0.0, vocab_size=300),
                store=store, identity=identity)
