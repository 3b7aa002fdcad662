"""A decoder-only GPT in plain PyTorch, written as a sequence of layers.

The model is the list returned by :func:`build_layers`::

    [Embedding, Block × n_layer, FinalNorm, LMHead]

Each layer takes one tensor and returns one tensor, so the list can be cut into
contiguous pipeline stages (``model/partition.py`` decides where) and handed to a
pipeline engine layer by layer. :class:`GPT` runs the same list end to end: the
single-process reference for training and parity tests. Both use :func:`loss_fn`.

Nothing here knows about parallelism (no DeepSpeed import): the engine wrapper maps
these classes onto its own layer specs.

Tied embeddings (``config.tied_embeddings``): the token embedding ``Embedding.wte.weight``
is also the output projection. The weight belongs to the :class:`Embedding` alone;
:meth:`Embedding.attend` projects hidden states onto it. In one process
:class:`LMHead` holds a reference to the Embedding (outside the module tree, so the
weight is counted, saved and updated once). In a pipeline the first and the last stage
each hold an Embedding and the engine keeps the two ``wte.weight`` copies equal
(DeepSpeed: ``TiedLayerSpec`` with ``forward_fn=Embedding.attend`` on the last stage).
That is why the final LayerNorm is a layer of its own: the last stage runs
``FinalNorm`` and then the tied Embedding's ``attend``.

Initialisation follows GPT-2 (normal, std 0.02; residual projections scaled by
1/sqrt(2·n_layer)) and is deterministic: each layer draws from its own generator seeded
by (seed, position in the layer list), so a pipeline stage that builds only its own
layers gets exactly the weights the same layers have inside :class:`GPT`.
"""

from __future__ import annotations

import hashlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.config import GPTConfig, ModelConfigError

# Where layers sit in the list from build_layers (model/partition.py relies on it).
EMBEDDING_LAYERS = 1  # Embedding
HEAD_LAYERS = 2  # FinalNorm, LMHead


def layer_seed(seed: int, position: int) -> int:
    """The init seed of the layer at `position` of the layer list (stable across runs)."""
    digest = hashlib.sha256(f"panal-gpt-init:{seed}:{position}".encode()).digest()
    return int.from_bytes(digest[:7], "big")  # < 2**56: fits torch's manual_seed


def _init_layer(layer: nn.Module, config: GPTConfig, seed: int, position: int) -> None:
    """GPT-2 init of one layer from its own generator; no-op on the meta device."""
    params = list(layer.parameters())
    if not params or params[0].is_meta:
        return
    gen = torch.Generator(device=params[0].device).manual_seed(layer_seed(seed, position))
    std = 0.02
    # Each block adds two residual branches (attention, MLP) into the residual stream;
    # scaling their output projections keeps its variance from growing with depth.
    resid_std = std / math.sqrt(2 * config.n_layer)
    with torch.no_grad():
        for name, m in layer.named_modules():  # a fixed order, so the draws are reproducible
            if isinstance(m, nn.Linear):
                s = resid_std if name.endswith("c_proj") else std
                nn.init.normal_(m.weight, mean=0.0, std=s, generator=gen)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, mean=0.0, std=std, generator=gen)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where position t sees only positions ≤ t."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.dropout = config.dropout
        # q, k, v projections for all heads in one matmul
        self.c_attn = nn.Linear(config.d_model, 3 * config.d_model, bias=config.bias)
        self.c_proj = nn.Linear(config.d_model, config.d_model, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.size()  # batch, sequence length, d_model
        q, k, v = self.c_attn(x).split(C, dim=2)  # 3 × (B, T, C)
        hs = C // self.n_head
        q = q.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        # Fused (flash / memory-efficient) kernel: the (T, T) score matrix is never stored.
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # heads side by side again
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """Position-wise feed-forward: d_model → d_ff → d_model with GELU (GPT-2)."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.d_model, config.ff_dim, bias=config.bias)
        self.c_proj = nn.Linear(config.ff_dim, config.d_model, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.c_fc(x))  # (B, T, d_ff)
        return self.dropout(self.c_proj(h))  # (B, T, C)


class SwiGLU(nn.Module):
    """Gated feed-forward (LLaMA): silu(x W_gate) ⊙ (x W_up), projected back to d_model."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        # gate and up projections in one matmul: (C → 2·d_ff)
        self.c_fc = nn.Linear(config.d_model, 2 * config.ff_dim, bias=config.bias)
        self.c_proj = nn.Linear(config.ff_dim, config.d_model, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.c_fc(x).chunk(2, dim=-1)  # 2 × (B, T, d_ff)
        return self.dropout(self.c_proj(F.silu(gate) * up))  # (B, T, C)


class Block(nn.Module):
    """One transformer layer, pre-norm: x + attn(ln(x)), then x + mlp(ln(x)). (B,T,C)→(B,T,C).

    The class name matters: the engine checkpoints activations of layers named "Block".
    """

    def __init__(self, config: GPTConfig, index: int = 0, *, seed: int = 0) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.d_model, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.d_model, bias=config.bias)
        self.mlp: nn.Module = SwiGLU(config) if config.mlp == "swiglu" else MLP(config)
        _init_layer(self, config, seed, EMBEDDING_LAYERS + index)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x


class Embedding(nn.Module):
    """Token + learned position embeddings: (B, T) int64 ids → (B, T, C).

    `check_token_ids` raises a clear error on ids outside the vocabulary (instead of an
    index error deep in a kernel, or a device-side assert on GPU). It costs one host sync
    per micro-batch on a GPU: a data path that already checks ids on the CPU may turn it off.
    """

    def __init__(self, config: GPTConfig, *, seed: int = 0, check_token_ids: bool = True) -> None:
        super().__init__()
        self.vocab_size = config.vocab_size
        self.seq_len = config.seq_len
        self.check_token_ids = check_token_ids
        self.wte = nn.Embedding(config.vocab_size, config.d_model)  # token embedding
        self.wpe = nn.Embedding(config.seq_len, config.d_model)  # position embedding
        self.drop = nn.Dropout(config.dropout)
        _init_layer(self, config, seed, 0)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        if idx.dim() != 2 or idx.dtype not in (torch.int64, torch.int32):
            raise ModelConfigError(
                f"the model takes token ids of shape (batch, seq) and an integer dtype, got "
                f"shape {tuple(idx.shape)} dtype {idx.dtype}; pass a LongTensor of token ids"
            )
        B, T = idx.shape
        if T > self.seq_len:
            raise ModelConfigError(
                f"sequence length {T} is longer than the model's context seq_len "
                f"{self.seq_len}; cut sequences to at most {self.seq_len} tokens, or raise "
                f"seq_len in the model config"
            )
        if self.check_token_ids:
            _check_token_ids(idx, self.vocab_size)
        # Positions carry a batch dimension (B, T), not (T,): Opacus computes per-sample
        # gradients of the position embedding from it.
        pos = torch.arange(T, device=idx.device).repeat(B, 1)  # (B, T)
        x = self.wte(idx) + self.wpe(pos)  # (B, T, C)
        return self.drop(x)

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        """The tied output projection: hidden states (B, T, C) → logits (B, T, V) via wteᵀ."""
        return F.linear(x, self.wte.weight)


def _check_token_ids(idx: torch.Tensor, vocab_size: int) -> None:
    bad = (idx < 0) | (idx >= vocab_size)
    if bool(bad.any()):
        value = int(idx[bad][0])
        raise ModelConfigError(
            f"token id {value} is outside the model's vocabulary [0, {vocab_size}): the "
            f"tokenizer or dataset has a bigger vocabulary than the model; set vocab_size ≥ "
            f"the tokenizer's vocabulary size in the model config, or retokenize the data"
        )


class FinalNorm(nn.Module):
    """The LayerNorm after the last block: (B, T, C) → (B, T, C)."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_f = nn.LayerNorm(config.d_model, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln_f(x)


class LMHead(nn.Module):
    """Projection to vocabulary logits: (B, T, C) → (B, T, V).

    Untied: owns `lm_head` (V × C, no bias). Tied: owns nothing and projects with the
    given Embedding's `wte.weight` (see the module docstring).
    """

    def __init__(self, config: GPTConfig, *, seed: int = 0, embedding: Embedding | None = None) -> None:
        super().__init__()
        self.lm_head: nn.Linear | None = None
        self._embedding: Embedding | None = None
        if config.tied_embeddings:
            if embedding is None:
                raise ModelConfigError(
                    "tied_embeddings is true: LMHead shares the token embedding's weight; "
                    "pass embedding=<the model's Embedding> (or set tied_embeddings false)"
                )
            # Not registered as a submodule: the Embedding alone owns the shared weight, so
            # parameters(), state_dict() and the optimizer see it once.
            object.__setattr__(self, "_embedding", embedding)
        else:
            self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
            _init_layer(self, config, seed, EMBEDDING_LAYERS + config.n_layer + 1)

    @property
    def weight(self) -> torch.Tensor:
        """The (V, C) matrix this head projects with (the embedding's when tied)."""
        if self._embedding is not None:
            return self._embedding.wte.weight
        assert self.lm_head is not None
        return self.lm_head.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._embedding is not None:
            return self._embedding.attend(x)
        assert self.lm_head is not None
        return self.lm_head(x)


def build_layers(config: GPTConfig, *, seed: int = 0, check_token_ids: bool = True) -> list[nn.Module]:
    """The model as a list of layers: [Embedding, Block × n_layer, FinalNorm, LMHead]."""
    embedding = Embedding(config, seed=seed, check_token_ids=check_token_ids)
    blocks = [Block(config, i, seed=seed) for i in range(config.n_layer)]
    head = LMHead(config, seed=seed, embedding=embedding if config.tied_embeddings else None)
    return [embedding, *blocks, FinalNorm(config), head]


class GPT(nn.Module):
    """All layers of :func:`build_layers` run end to end: (B, T) ids → (B, T, V) logits."""

    def __init__(self, config: GPTConfig, *, seed: int = 0, check_token_ids: bool = True) -> None:
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList(build_layers(config, seed=seed, check_token_ids=check_token_ids))

    @property
    def embedding(self) -> Embedding:
        layer = self.layers[0]
        assert isinstance(layer, Embedding)
        return layer

    @property
    def head(self) -> LMHead:
        layer = self.layers[-1]
        assert isinstance(layer, LMHead)
        return layer

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = idx  # (B, T) ids, then (B, T, C) hidden states, finally (B, T, V) logits
        for layer in self.layers:
            x = layer(x)
        return x

    def num_params(self) -> int:
        """Parameters, each counted once (a tied weight is one parameter)."""
        return sum(p.numel() for p in self.parameters())


def loss_fn(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of next-token prediction, the mean over tokens.

    logits (B, T, V), labels (B, T) int64; labels equal to -100 are ignored. Computed in
    fp32 so the log-softmax stays accurate when the model runs in fp16/bf16.
    """
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())
