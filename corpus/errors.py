"""Corpus errors: bad input is refused with a message that names the file, line and fix."""

from __future__ import annotations

from protocol.errors import MalformedMessage


class CorpusError(Exception):
    """Base of the corpus pipeline's errors. The message says what and how to fix."""


class CorpusInputError(CorpusError, ValueError):
    """The input cannot make a dataset: empty, a missing field, an option that does not fit."""


class ShardFormatError(CorpusError, MalformedMessage):
    """A shard verified against its CID but does not hold what its dataset manifest says
    (column, type, row length, row count, token ids): the dataset is malformed."""
