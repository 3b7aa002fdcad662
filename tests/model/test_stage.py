"""Stage weights without DeepSpeed: names and values match a single-process GPT."""

import pytest
import torch

from model.gpt import GPT
from model.presets import get_preset
from model.stage import TIED_PREFIX, assemble_gpt, initial_stage_weights, token_row_names


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("stages", [1, 2, 4])
def test_stages_reassemble_into_the_same_gpt(tied, stages):
    cfg = get_preset("tiny").replace(tied_embeddings=tied)
    weights = [initial_stage_weights(cfg, stages, s, seed=3) for s in range(stages)]
    reference = GPT(cfg, seed=3)
    rebuilt = assemble_gpt(cfg, weights)
    for (name, a), (_, b) in zip(reference.state_dict().items(), rebuilt.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    if tied and stages > 1:
        # The tied embedding lives on the first and the last stage, equal on both.
        assert torch.equal(weights[0][TIED_PREFIX + "wte.weight"], weights[-1][TIED_PREFIX + "wte.weight"])
    names = [n for w in weights for n in w]
    assert len(names) == len(set(names)) or tied


@pytest.mark.parametrize("tied", [False, True])
def test_token_rows_are_the_embedding_and_the_head(tied):
    config = get_preset("tiny").replace(tied_embeddings=tied)
    names = [token_row_names(initial_stage_weights(config, 2, s)) for s in range(2)]
    if tied:  # both ends hold the one embedding
        assert names == [[TIED_PREFIX + "wte.weight"]] * 2
    else:
        assert names == [["0.wte.weight"], [f"{config.n_layer + 2}.lm_head.weight"]]
    weights = initial_stage_weights(config, 2, 0)
    assert all(weights[n].shape[0] == config.vocab_size for n in names[0])
