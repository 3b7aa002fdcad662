"""`GPTConfig`: the shape of a decoder-only transformer, validated where it is built.

Configs travel inside job specs and assignments, so they (de)serialise to plain
JSON-able dicts and every validation error names the field and the fix.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

MLPKind = Literal["gelu", "swiglu"]
MLP_KINDS: tuple[str, ...] = ("gelu", "swiglu")

# The default vocabulary: a 50k BPE tokenizer (corpus/ trains it with this size).
DEFAULT_VOCAB_SIZE = 50_000
DEFAULT_SEQ_LEN = 2048


class ModelConfigError(ValueError):
    """A model config (or an input given to the model) is invalid; the message names the fix."""


def default_d_ff(d_model: int, mlp: str) -> int:
    """Hidden width of the MLP when the config does not set `d_ff`.

    GELU: 4·d_model (GPT-2/3). SwiGLU has three matrices instead of two, so it takes
    ⅔ of that, 8·d_model/3 rounded up to a multiple of 256 (as LLaMA does), to keep the
    parameter count (and FLOPs) about equal to the GELU MLP.
    """
    if mlp == "swiglu":
        return 256 * math.ceil(8 * d_model / 3 / 256)
    return 4 * d_model


def _closest_divisors(n: int, target: int) -> list[int]:
    """Divisors of n nearest to target (for error messages that propose a fix)."""
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    return sorted(sorted(divisors, key=lambda d: (abs(d - target), d))[:2])


@dataclass(frozen=True, kw_only=True)
class GPTConfig:
    """Shape of the model. Defaults: GPT-2 small widths, 50k vocabulary, 2048 context."""

    vocab_size: int = DEFAULT_VOCAB_SIZE
    seq_len: int = DEFAULT_SEQ_LEN  # context length: the most tokens one sequence may hold
    n_layer: int = 12
    n_head: int = 12
    d_model: int = 768
    d_ff: int | None = None  # None: default_d_ff(d_model, mlp), resolved at construction
    mlp: MLPKind = "gelu"
    tied_embeddings: bool = False  # lm_head uses the token embedding's weight (GPT-2 style)
    dropout: float = 0.0
    bias: bool = True  # biases in Linear and LayerNorm (GPT-2); False is a little faster

    def __post_init__(self) -> None:
        for name in ("vocab_size", "seq_len", "n_layer", "n_head", "d_model"):
            _check_positive_int(name, getattr(self, name))
        if self.vocab_size < 2:
            raise ModelConfigError(f"vocab_size {self.vocab_size} is too small; use at least 2")
        if self.mlp not in MLP_KINDS:
            raise ModelConfigError(f"mlp {self.mlp!r} is not one of {list(MLP_KINDS)}; use 'gelu'")
        for name in ("tied_embeddings", "bias"):
            if not isinstance(getattr(self, name), bool):
                raise ModelConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.d_ff is None:
            object.__setattr__(self, "d_ff", default_d_ff(self.d_model, self.mlp))
        else:
            _check_positive_int("d_ff", self.d_ff)
        if self.d_model % self.n_head != 0:
            fixes = " or ".join(str(d) for d in _closest_divisors(self.d_model, self.n_head))
            raise ModelConfigError(
                f"d_model {self.d_model} is not divisible by n_head {self.n_head}; "
                f"choose n_head dividing d_model, e.g. {fixes}"
            )
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, int | float):
            raise ModelConfigError(f"dropout must be a number in [0, 1), got {self.dropout!r}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ModelConfigError(f"dropout {self.dropout} is outside [0, 1); use e.g. 0.0 or 0.1")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def ff_dim(self) -> int:
        """`d_ff` as a plain int (it is always resolved after construction)."""
        assert self.d_ff is not None
        return self.d_ff

    # --- (de)serialisation: configs travel in job specs and assignments -------------------

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict with every field resolved (d_ff included)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GPTConfig:
        """Build from a dict (parsed JSON/YAML); unknown keys are an error, not ignored."""
        if not isinstance(data, dict):
            raise ModelConfigError(f"a model config must be a mapping of fields, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ModelConfigError(
                f"unknown model config field(s) {unknown}; valid fields are {sorted(known)}"
            )
        return cls(**data)

    def replace(self, **changes: Any) -> GPTConfig:
        """A copy with some fields changed (d_ff is re-derived unless given)."""
        data = self.to_dict()
        if "d_ff" not in changes and ("d_model" in changes or "mlp" in changes):
            data["d_ff"] = None
        data.update(changes)
        return GPTConfig.from_dict(data)

    # --- checks of things fed to a model of this shape ------------------------------------

    def check_tokenizer(self, tokenizer_vocab_size: int) -> None:
        """Raise unless every id of a tokenizer with this vocabulary size fits the model."""
        if tokenizer_vocab_size > self.vocab_size:
            raise ModelConfigError(
                f"the tokenizer has {tokenizer_vocab_size} tokens but the model's vocab_size is "
                f"{self.vocab_size}: ids ≥ {self.vocab_size} would index past the embedding; "
                f"set vocab_size ≥ {tokenizer_vocab_size} in the model config, or retrain the "
                f"tokenizer with at most {self.vocab_size} tokens"
            )

    def check_seq_len(self, seq_len: int) -> None:
        """Raise unless sequences of `seq_len` tokens fit the model's context."""
        if seq_len > self.seq_len:
            raise ModelConfigError(
                f"sequence length {seq_len} is longer than the model's context seq_len "
                f"{self.seq_len}; cut sequences to at most {self.seq_len} tokens, or raise "
                f"seq_len in the model config"
            )


def _check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ModelConfigError(f"{name} must be a whole number, got {value!r}")
    if value <= 0:
        raise ModelConfigError(f"{name} must be positive, got {value}")
