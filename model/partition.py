"""Cutting the layer list into pipeline stages.

The layer list (``model.gpt.build_layers``) is ``[Embedding, Block × n_layer, FinalNorm,
LMHead]``. A stage is a contiguous range of it: the Embedding goes with the first stage,
FinalNorm and LMHead with the last, and the blocks are split as evenly as possible
(counts differ by at most one).

Where the stages with one block more go: to the stages just before the last one
(S − 2, S − 3, …). The first stage already carries the embedding and, in a 1F1B
schedule, the most activations (stage s keeps min(S − s, M) micro-batches in flight);
the last stage carries the final norm, the output projection and the logits. DeepSpeed's
``partition_method="type:Block"`` gives the extra blocks to the first stages instead, so
the engine installs :func:`pipeline_parts` itself: what runs is what the planner sized.
"""

from __future__ import annotations

from model.config import ModelConfigError
from model.gpt import EMBEDDING_LAYERS, HEAD_LAYERS


class PartitionError(ModelConfigError):
    """A pipeline partition that cannot be made; the message names the fix."""


def partition_layers(n_layer: int, n_stages: int) -> list[range]:
    """The block indices of each stage: contiguous, each block once, balanced.

    >>> partition_layers(10, 4)
    [range(0, 2), range(2, 5), range(5, 8), range(8, 10)]
    """
    if n_stages < 1:
        raise PartitionError(f"pipeline stages must be at least 1, got {n_stages}")
    if n_layer < 1:
        raise PartitionError(f"n_layer must be at least 1, got {n_layer}")
    if n_stages > n_layer:
        raise PartitionError(
            f"{n_stages} pipeline stages for {n_layer} blocks: every stage needs at least one "
            f"block; use at most {n_layer} stages (--stages ≤ {n_layer})"
        )
    base, extra = divmod(n_layer, n_stages)
    # extra < n_stages: stages n_stages-1-extra … n_stages-2 take one block more
    takes_extra = range(n_stages - 1 - extra, n_stages - 1)
    ranges: list[range] = []
    start = 0
    for stage in range(n_stages):
        count = base + (1 if stage in takes_extra else 0)
        ranges.append(range(start, start + count))
        start += count
    return ranges


def pipeline_parts(n_layer: int, n_stages: int) -> list[int]:
    """Stage boundaries over the layer list, in DeepSpeed's ``PipelineModule.parts`` form.

    Stage s runs layers ``parts[s]:parts[s + 1]`` of ``build_layers(config)``.

    >>> pipeline_parts(4, 2)
    [0, 3, 7]
    """
    ranges = partition_layers(n_layer, n_stages)
    parts = [0] + [EMBEDDING_LAYERS + r.stop for r in ranges[:-1]]
    parts.append(EMBEDDING_LAYERS + n_layer + HEAD_LAYERS)
    return parts
