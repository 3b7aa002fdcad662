"""A byte-level BPE tokenizer (HF ``tokenizers``): trained here, or an existing one.

The tokenizer travels as its ``tokenizer.json`` bytes, a blob in the store named
by the dataset manifest's ``tokenizer_cid``; the end-of-text token that separates
documents in the token stream is ``<|endoftext|>`` (GPT-2's), found in it by name.

Training is deterministic: the same texts and vocabulary size give the same
bytes, hence the same CID, in any process (tested).
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from corpus.errors import CorpusInputError

EOS = "<|endoftext|>"
MIN_VOCAB = 256 + 1  # every byte, and the end-of-text token
MAX_VOCAB = 1 << 32
MAX_TOKENIZER_BYTES = 64 * 1024 * 1024


def token_dtype(vocab_size: int) -> str:
    """uint16 while every id fits (ids 0..65535), else uint32."""
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def new_byte_level_bpe() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def train(texts: Iterable[str], vocab_size: int, *, min_frequency: int = 2) -> Tokenizer:
    """Train a byte-level BPE with ``vocab_size`` entries (fewer if the text runs out of merges)."""
    if not MIN_VOCAB <= vocab_size < MAX_VOCAB:
        raise CorpusInputError(f"vocab size {vocab_size} must be at least {MIN_VOCAB} (bytes + end of text)")
    tok = new_byte_level_bpe()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def to_bytes(tok: Tokenizer) -> bytes:
    return tok.to_str().encode()


def from_bytes(data: bytes, origin: str = "tokenizer") -> Tokenizer:
    """Parse ``tokenizer.json`` bytes; a clear error if they are not a tokenizer."""
    if len(data) > MAX_TOKENIZER_BYTES:
        raise CorpusInputError(f"{origin} is {len(data)} bytes, over the {MAX_TOKENIZER_BYTES}-byte limit")
    try:
        return Tokenizer.from_str(data.decode())
    except Exception as e:  # tokenizers raises plain Exception for a bad file
        raise CorpusInputError(f"{origin} is not a tokenizers tokenizer.json: {e}") from e


def eos_id(tok: Tokenizer) -> int:
    token_id = tok.token_to_id(EOS)
    if token_id is None:
        raise CorpusInputError(
            f"the tokenizer has no {EOS!r} token to separate documents; "
            "add it as a special token, or let `panal corpus prepare` train one"
        )
    return int(token_id)
