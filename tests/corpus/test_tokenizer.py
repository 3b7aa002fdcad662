"""BPE training: deterministic bytes in any process; the end-of-text token; clear errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

from corpus import tokenizer as bpe
from corpus.errors import CorpusInputError

TRAIN = """
import random, sys
sys.path.insert(0, {root!r})
from tests.corpus.conftest import document
from corpus import tokenizer as bpe
rng = random.Random(11)
texts = [document(rng, 200) for _ in range(150)]
sys.stdout.buffer.write(bpe.to_bytes(bpe.train(texts, 400)))
"""


def test_training_gives_the_same_bytes_in_two_processes():
    import pathlib

    root = str(pathlib.Path(__file__).resolve().parents[2])
    runs = [
        subprocess.run([sys.executable, "-c", TRAIN.format(root=root)], capture_output=True, check=True).stdout
        for _ in range(2)
    ]
    assert runs[0] == runs[1] and len(runs[0]) > 1000
    tok = bpe.from_bytes(runs[0])
    assert tok.get_vocab_size() == 400
    assert bpe.eos_id(tok) == 0
    text = "The river was quiet.\n  def f(): return 1"
    assert tok.decode(tok.encode(text).ids) == text  # byte-level: lossless


def test_dtype_follows_the_vocabulary():
    assert bpe.token_dtype(50_000) == "uint16"
    assert bpe.token_dtype(65_536) == "uint16"
    assert bpe.token_dtype(65_537) == "uint32"


def test_bad_tokenizers_are_refused():
    with pytest.raises(CorpusInputError, match="not a tokenizers tokenizer.json"):
        bpe.from_bytes(b"{}", "t.json")
    with pytest.raises(CorpusInputError, match="at least 257"):
        bpe.train(["x"], 100)
    from tokenizers import Tokenizer, models

    bare = Tokenizer(models.BPE())
    with pytest.raises(CorpusInputError, match="no '<|endoftext|>' token"):
        bpe.eos_id(bare)
