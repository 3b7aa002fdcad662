"""The GPT: shapes, causality, the layer list = the whole model, tying, init, input errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from model.config import GPTConfig, ModelConfigError
from model.gpt import (
    GPT,
    Block,
    Embedding,
    FinalNorm,
    LMHead,
    build_layers,
    loss_fn,
)
from model.plan import LayoutRequest, count_params, resolve_layout, stage_memory
from model.presets import get_preset

torch.set_num_threads(1)

TINY = get_preset("tiny")
VARIANTS = {
    "untied": TINY,
    "tied": TINY.replace(tied_embeddings=True),
    "swiglu": TINY.replace(mlp="swiglu"),
    "no-bias": TINY.replace(bias=False),
}


def ids(config: GPTConfig, B: int = 2, T: int | None = None, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, config.vocab_size, (B, T or config.seq_len), generator=g)


@pytest.mark.parametrize("variant", VARIANTS)
def test_forward_maps_ids_to_logits_of_every_position(variant: str) -> None:
    config = VARIANTS[variant]
    model = GPT(config).eval()
    for T in (1, 17, config.seq_len):
        logits = model(ids(config, B=3, T=T))
        assert logits.shape == (3, T, config.vocab_size)
        assert logits.dtype == torch.float32
        assert torch.isfinite(logits).all()


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_future_token_does_not_change_earlier_logits(variant: str) -> None:
    config = VARIANTS[variant]
    model = GPT(config).eval()
    x = ids(config, B=2, T=32)
    t = 20
    y = x.clone()
    y[:, t] = (x[:, t] + 1) % config.vocab_size  # change one token at position t
    with torch.no_grad():
        a, b = model(x), model(y)
    assert torch.equal(a[:, :t], b[:, :t])  # positions before t never see position t
    assert not torch.allclose(a[:, t:], b[:, t:])  # and position t onwards does


@pytest.mark.parametrize("variant", VARIANTS)
def test_running_the_layer_list_one_by_one_equals_the_whole_model(variant: str) -> None:
    config = VARIANTS[variant]
    layers = build_layers(config, seed=3)
    kinds = [Embedding, *[Block] * config.n_layer, FinalNorm, LMHead]
    assert [type(layer) for layer in layers] == kinds
    model = GPT(config, seed=3).eval()
    x = ids(config)
    h = x
    with torch.no_grad():
        for layer in layers:
            h = layer.eval()(h)
        assert torch.equal(h, model(x))


def test_a_stage_built_alone_has_the_weights_of_the_same_layers_in_the_model() -> None:
    """A pipeline stage builds only its layers (Block(config, index)), yet matches GPT."""
    model = GPT(TINY, seed=7)
    alone = Block(TINY, 2, seed=7)
    inside = model.layers[1 + 2].state_dict()
    assert alone.state_dict().keys() == inside.keys()
    for k, v in alone.state_dict().items():
        assert torch.equal(v, inside[k]), k
    assert not torch.equal(Block(TINY, 1, seed=7).attn.c_attn.weight, alone.attn.c_attn.weight)


def test_init_is_deterministic_from_the_seed() -> None:
    a, b, c = GPT(TINY, seed=0), GPT(TINY, seed=0), GPT(TINY, seed=1)
    for (k, va), vb, vc in zip(
        a.state_dict().items(), b.state_dict().values(), c.state_dict().values(), strict=True
    ):
        assert torch.equal(va, vb), k
    assert not torch.equal(a.embedding.wte.weight, c.embedding.wte.weight)


def test_init_is_gpt2_like() -> None:
    config = TINY.replace(d_model=128, n_head=4, n_layer=8)
    block = GPT(config).layers[1]
    resid = 0.02 / math.sqrt(2 * config.n_layer)
    assert block.attn.c_attn.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert block.attn.c_proj.weight.std().item() == pytest.approx(resid, rel=0.05)
    assert block.mlp.c_proj.weight.std().item() == pytest.approx(resid, rel=0.05)
    assert torch.count_nonzero(block.attn.c_attn.bias) == 0
    assert torch.equal(block.ln_1.weight, torch.ones(config.d_model))


def test_tied_embeddings_share_one_storage_and_one_gradient() -> None:
    config = VARIANTS["tied"]
    model = GPT(config)
    wte = model.embedding.wte.weight
    assert model.head.weight is wte
    assert model.head.weight.data_ptr() == wte.data_ptr()
    # counted, saved and optimised once
    untied = GPT(VARIANTS["untied"])
    assert model.num_params() == untied.num_params() - config.vocab_size * config.d_model
    assert not any("lm_head" in k for k in model.state_dict())
    assert sum(p is wte for p in model.parameters()) == 1
    # the gradient of wte has both the embedding's and the head's part
    x = ids(config, T=16)
    loss_fn(model(x), x).backward()
    assert wte.grad is not None
    rows_used = torch.zeros(config.vocab_size, dtype=torch.bool)
    rows_used[x.flatten()] = True
    assert wte.grad[~rows_used].abs().sum() > 0  # unused tokens get gradient only via the head


def test_tied_head_via_an_embedding_replica_equals_the_model() -> None:
    """The pipeline pattern: the last stage holds its own Embedding and runs FinalNorm then
    Embedding.attend (DeepSpeed: TiedLayerSpec(..., forward_fn=Embedding.attend))."""
    config = VARIANTS["tied"]
    model = GPT(config, seed=5).eval()
    first, *blocks, final_norm, _ = build_layers(config, seed=5)
    replica = Embedding(config, seed=5)  # the last stage's copy; the engine keeps wte equal
    x = ids(config)
    with torch.no_grad():
        h = first(x)
        for block in blocks:
            h = block(h)
        logits = Embedding.attend(replica, final_norm(h))
        assert torch.equal(logits, model(x))


def test_a_tied_head_without_its_embedding_is_refused() -> None:
    with pytest.raises(ModelConfigError, match="pass embedding="):
        LMHead(VARIANTS["tied"])


def test_positions_carry_a_batch_dimension_for_opacus() -> None:
    model = GPT(TINY)
    seen: list[tuple[int, ...]] = []
    model.embedding.wpe.register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape)))
    model(ids(TINY, B=3, T=10))
    assert seen == [(3, 10)]


def test_a_token_id_outside_the_vocabulary_names_the_fix() -> None:
    model = GPT(TINY)
    x = ids(TINY, T=8)
    x[1, 3] = TINY.vocab_size  # a tokenizer with a bigger vocabulary than the model
    with pytest.raises(ModelConfigError, match=r"token id 512 .*set vocab_size ≥"):
        model(x)
    x[1, 3] = -1
    with pytest.raises(ModelConfigError, match="token id -1"):
        model(x)


def test_float_or_flat_input_is_refused() -> None:
    model = GPT(TINY)
    with pytest.raises(ModelConfigError, match="token ids of shape"):
        model(torch.zeros(2, 8))
    with pytest.raises(ModelConfigError, match="token ids of shape"):
        model(torch.zeros(8, dtype=torch.long))


def test_a_sequence_longer_than_the_context_names_the_fix() -> None:
    model = GPT(TINY)
    with pytest.raises(ModelConfigError, match=r"longer than the model's context seq_len 64"):
        model(ids(TINY, T=65))


def test_loss_is_mean_cross_entropy_over_tokens_and_ln_v_at_init() -> None:
    model = GPT(TINY)
    x = ids(TINY)
    logits = model(x)
    labels = torch.roll(x, -1, dims=1)
    loss = loss_fn(logits, labels)
    expected = F.cross_entropy(logits.reshape(-1, TINY.vocab_size), labels.reshape(-1))
    assert torch.allclose(loss, expected)
    assert loss.item() == pytest.approx(math.log(TINY.vocab_size), abs=0.1)
    labels[:, :10] = -100  # ignored positions drop out of the mean
    kept = F.cross_entropy(logits[:, 10:].reshape(-1, TINY.vocab_size), labels[:, 10:].flatten())
    assert torch.allclose(loss_fn(logits, labels), kept)


def test_loss_of_half_precision_logits_is_fp32() -> None:
    model = GPT(TINY).to(torch.bfloat16)
    x = ids(TINY, T=16)
    assert loss_fn(model(x), x).dtype == torch.float32


def test_a_few_steps_of_adamw_fit_a_fixed_batch() -> None:
    model = GPT(TINY)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x = ids(TINY, B=4, T=32)
    inputs, labels = x[:, :-1], x[:, 1:]
    first = None
    for _ in range(15):
        loss = loss_fn(model(inputs), labels)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first - 1.0


def test_dropout_is_active_in_training_only() -> None:
    config = TINY.replace(dropout=0.1)
    model = GPT(config)
    x = ids(config, T=16)
    model.train()
    assert not torch.equal(model(x), model(x))
    model.eval()
    assert torch.equal(model(x), model(x))


def test_the_whole_1t_model_builds_on_the_meta_device_without_memory() -> None:
    with torch.device("meta"):
        model = GPT(get_preset("1t"))
    assert all(p.is_meta for p in model.parameters())
    assert model.num_params() == 1_009_288_038_400


@pytest.mark.skipif(not torch.cuda.is_available(), reason="measures GPU memory")
def test_the_planner_bounds_the_memory_of_a_blocks_backward_on_a_gpu() -> None:
    """Calibrates model/plan.py: from the second micro-batch on, a block's backward holds its
    activations plus a new gradient of its largest weight before adding it in."""
    config = get_preset("seed-article")  # width 8192: 1.5 GB of fp16 weights per block
    with torch.device("cuda"):
        block = Block(config).half()
    x = torch.randn(1, config.seq_len, config.d_model, device="cuda", dtype=torch.half)
    x.requires_grad_()
    g = torch.randn_like(x)
    block(x).backward(g)  # the gradients now exist, as after the first micro-batch
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    block(x).backward(g)
    torch.cuda.synchronize()
    measured = torch.cuda.max_memory_allocated() - before
    counts = count_params(config)
    layout = resolve_layout(config, LayoutRequest(stages=1, dp=1, checkpointing=False))
    one_block = {"params": counts.per_block, "n_blocks": 1, "in_flight": 1}
    m = stage_memory(config, counts, layout, **one_block, first=False, last=False)
    predicted = m.activations + m.fragmentation + m.weight_grad_temporary
    assert 0.8 * predicted <= measured <= 1.25 * predicted, (measured, predicted)
