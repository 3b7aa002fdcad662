"""Where a pool's micro-batches come from: a token file, or a dataset in the store.

Every source is a pure function of (seed, step, micro-batch index, data-parallel
rank): the first and the last pipeline stage of a replica draw the identical
stream (the first needs the inputs, the last the labels), and a resumed run
continues exactly where it stopped.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from model.config import ModelConfigError

Batch = tuple[torch.Tensor, torch.Tensor]  # (inputs (B, T), labels (B, T)), int64


class DataError(ModelConfigError):
    """The data cannot feed this model; the message names the fix."""


class BatchSource(Protocol):
    vocab_size: int
    seq_len: int

    def micro_batch(self, step: int, index: int, *, dp_rank: int = 0, dp: int = 1) -> Batch: ...

    def val_batch(self, index: int) -> Batch: ...


def _rng(*key: int) -> np.random.Generator:
    digest = hashlib.sha256(":".join(map(str, key)).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


class TokenFile:
    """A flat file of token ids (little-endian uint16 or uint32, as nanoGPT's ``train.bin``).

    Training windows of ``seq_len + 1`` tokens are drawn at random offsets from
    the first ``1 - val_frac`` of the file; validation windows tile the rest.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        seq_len: int,
        micro_batch: int,
        vocab_size: int,
        dtype: str = "uint16",
        val_frac: float = 0.05,
        seed: int = 0,
    ) -> None:
        path = Path(path)
        if dtype not in ("uint16", "uint32"):
            raise DataError(f"token dtype {dtype!r} must be uint16 or uint32")
        if not path.is_file():
            raise DataError(f"token file {path} does not exist")
        self.tokens = np.memmap(path, dtype=np.dtype(dtype).newbyteorder("<"), mode="r")
        self.seq_len, self.micro, self.vocab_size, self.seed = seq_len, micro_batch, vocab_size, seed
        n = len(self.tokens)
        self.split = int(n * (1 - val_frac))
        window = seq_len + 1
        if self.split < window or n - self.split < window:
            raise DataError(
                f"{path} holds {n} tokens: too few for windows of {window} tokens in both the "
                f"training part and the {val_frac:.0%} held out; use a longer file or a shorter --seq-len"
            )
        top = int(self.tokens.max())
        if top >= vocab_size:
            raise DataError(
                f"{path} holds token id {top}, outside the model's vocabulary of {vocab_size}; "
                "use a model config with vocab_size > the tokenizer's largest id"
            )

    def _windows(self, starts: np.ndarray) -> Batch:
        rows = np.stack([self.tokens[s : s + self.seq_len + 1] for s in starts]).astype(np.int64)
        seqs = torch.from_numpy(rows)  # (B, T + 1)
        return seqs[:, :-1].contiguous(), seqs[:, 1:].contiguous()

    def micro_batch(self, step: int, index: int, *, dp_rank: int = 0, dp: int = 1) -> Batch:
        rng = _rng(self.seed, step, index, dp_rank, dp)
        starts = rng.integers(0, self.split - self.seq_len - 1, size=self.micro)
        return self._windows(starts)

    def val_batch(self, index: int) -> Batch:
        window = self.seq_len + 1
        count = (len(self.tokens) - self.split) // window
        starts = [self.split + ((index * self.micro + i) % count) * window for i in range(self.micro)]
        return self._windows(np.array(starts))
