"""Update policies of a node: what each attack does to a pseudo-gradient or a batch, exactly."""

import math
from statistics import NormalDist

import pytest
import torch

from node.policy import ATTACKS, IGNORE_INDEX, PolicyError, UpdatePolicy, alie_z, make_policy

V = 32  # vocabulary of the hand-made batches


def delta():
    """A hand-made pseudo-gradient of two tensors (FP32)."""
    return {
        "w": torch.tensor([[2.0, -1.0], [0.0, 0.5]]),
        "b": torch.tensor([-4.0, 3.0]),
    }


def stream(b=4, t=12):
    """(inputs, labels) of a consistent stream over ids [0, 20): labels are the inputs shifted by one."""
    seqs = (torch.arange(b)[:, None] * 5 + torch.arange(t + 1)) % 20  # (b, t+1)
    return seqs[:, :-1].clone(), seqs[:, 1:].clone()


def build(name, **params):
    if name in ("label_flip", "backdoor"):
        params.setdefault("vocab_size", V)
    return make_policy(name, seed=7, n_pools=8, n_byzantine=2, **params)


# ---------------------------------------------------------------------------------------------
# Building policies


def test_attacks_list_every_policy_and_honest_first():
    assert ATTACKS == (
        "honest", "sign_flip", "scale", "gaussian", "zeros", "alie", "ipm", "label_flip", "backdoor",
    )  # fmt: skip
    for name in ATTACKS:
        assert build(name).name == name


def test_an_unknown_attack_names_the_known_ones():
    with pytest.raises(PolicyError, match="unknown attack 'flip'.*sign_flip, scale"):
        make_policy("flip")


def test_an_unknown_parameter_names_the_ones_the_attack_takes():
    with pytest.raises(PolicyError, match="'scale' got unknown parameter.*epsilon.*takes factor"):
        make_policy("scale", epsilon=2)
    with pytest.raises(PolicyError, match="takes no parameters"):
        make_policy("sign_flip", factor=2)


def test_data_attacks_need_the_vocabulary():
    with pytest.raises(PolicyError, match="vocab_size"):
        make_policy("label_flip")
    with pytest.raises(PolicyError, match="vocab_size"):
        make_policy("backdoor")


# ---------------------------------------------------------------------------------------------
# The update hook, on a hand-made Δ


@pytest.mark.parametrize(
    "name, params, expected",
    [
        ("honest", {}, delta()),
        ("sign_flip", {}, {"w": torch.tensor([[-2.0, 1.0], [-0.0, -0.5]]), "b": torch.tensor([4.0, -3.0])}),
        (
            "scale",
            {},
            {"w": torch.tensor([[200.0, -100.0], [0.0, 50.0]]), "b": torch.tensor([-400.0, 300.0])},
        ),
        (
            "scale",
            {"factor": -2.0},
            {"w": torch.tensor([[-4.0, 2.0], [0.0, -1.0]]), "b": torch.tensor([8.0, -6.0])},
        ),
        ("zeros", {}, {"w": torch.zeros(2, 2), "b": torch.zeros(2)}),
        ("ipm", {}, {"w": torch.tensor([[-1.0, 0.5], [0.0, -0.25]]), "b": torch.tensor([2.0, -1.5])}),
        (
            "ipm",
            {"epsilon": 2.0},
            {"w": torch.tensor([[-4.0, 2.0], [0.0, -1.0]]), "b": torch.tensor([8.0, -6.0])},
        ),
        # μ − z·σ with μ = Δ, σ = |Δ|, z = 0.5: positive coordinates halve, negative ones grow by half.
        ("alie", {"z": 0.5}, {"w": torch.tensor([[1.0, -1.5], [0.0, 0.25]]), "b": torch.tensor([-6.0, 1.5])}),
        ("label_flip", {}, delta()),
        ("backdoor", {}, delta()),
    ],
)
def test_transform_of_a_hand_made_delta(name, params, expected):
    d = delta()
    out = build(name, **params).transform(d, round=3)
    assert sorted(out) == sorted(expected)
    for k in expected:
        assert out[k].dtype == torch.float32 and out[k].shape == expected[k].shape
        assert torch.equal(out[k], expected[k]), (k, out[k])
    assert all(torch.equal(d[k], delta()[k]) for k in d)  # the input is not modified


def test_alie_z_follows_the_papers_formula():
    # s = ⌊n/2 + 1⌋ − f, z = Φ⁻¹((n − s)/n)
    assert alie_z(8, 2) == pytest.approx(NormalDist().inv_cdf(5 / 8))
    assert alie_z(10, 4) == pytest.approx(NormalDist().inv_cdf(8 / 10))
    assert alie_z(9, 1) == pytest.approx(NormalDist().inv_cdf(5 / 9))
    assert alie_z(8, 1) == 0.0  # Φ⁻¹(1/2): with one attacker of an even number the attack is honest
    assert make_policy("alie", n_pools=8, n_byzantine=3).z == pytest.approx(NormalDist().inv_cdf(6 / 8))
    with pytest.raises(PolicyError, match="n_pools"):
        make_policy("alie")  # neither pool count nor attackers given


def test_gaussian_noise_has_the_norm_of_each_tensor_and_replaces_it():
    g = torch.Generator().manual_seed(0)
    d = {"big": torch.randn(100, 100, generator=g) * 3, "small": torch.randn(10_000, generator=g) * 0.01}
    out = build("gaussian").transform(d, round=0)
    for k in d:
        ratio = float(out[k].norm() / d[k].norm())
        assert ratio == pytest.approx(1.0, abs=0.05), k  # σ_t = ‖Δ_t‖/√numel: noise norm ≈ ‖Δ_t‖
        cos = float(out[k] @ d[k].flatten() if out[k].dim() == 1 else (out[k] * d[k]).sum()) / (
            float(out[k].norm() * d[k].norm())
        )
        assert abs(cos) < 0.05, k  # replaced, not added: unrelated to Δ
    twice = build("gaussian", relative_std=2.0).transform(d, round=0)
    assert torch.allclose(twice["big"], 2 * out["big"], rtol=1e-5)


def test_gaussian_add_mode_adds_the_same_noise_replace_mode_sends():
    g = torch.Generator().manual_seed(1)
    d = {"w": torch.randn(64, 64, generator=g)}
    noise = build("gaussian").transform(d, round=4)["w"]
    added = build("gaussian", mode="add").transform(d, round=4)["w"]
    assert torch.allclose(added, d["w"] + noise)
    with pytest.raises(PolicyError, match="neither 'replace' nor 'add'"):
        build("gaussian", mode="both")


def test_gaussian_is_deterministic_from_seed_round_and_tensor_name():
    d = {"a": torch.ones(50), "b": torch.ones(50)}
    p = build("gaussian")
    first, again = p.transform(d, round=2), p.transform(dict(reversed(list(d.items()))), round=2)
    assert all(torch.equal(first[k], again[k]) for k in d)  # tensor order does not matter
    assert not torch.equal(first["a"], first["b"])  # each tensor its own draw
    assert not torch.equal(first["a"], p.transform(d, round=3)["a"])  # each round its own draw
    other = make_policy("gaussian", seed=8).transform(d, round=2)
    assert not torch.equal(first["a"], other["a"])  # each attacker its own draw
    assert torch.equal(p.transform({"z": torch.zeros(5)}, round=0)["z"], torch.zeros(5))


# ---------------------------------------------------------------------------------------------
# The data hook


@pytest.mark.parametrize("name", [a for a in ATTACKS if a not in ("label_flip", "backdoor")])
def test_update_attacks_leave_the_data_alone(name):
    x, y = stream()
    p = build(name)
    assert not p.poisons_data
    px, py = p.poison_batch(x, y, step=5)
    assert torch.equal(px, x) and torch.equal(py, y)


def test_label_flip_moves_every_label_by_a_fixed_permutation_and_keeps_the_inputs():
    x, y = stream()
    y[0, :3] = IGNORE_INDEX  # positions the loss skips stay skipped
    p = build("label_flip")
    assert p.poisons_data
    px, py = p.poison_batch(x, y, step=0)
    assert torch.equal(px, x)
    assert torch.equal(py[0, :3], torch.full((3,), IGNORE_INDEX))
    real = y != IGNORE_INDEX
    assert bool((py[real] != y[real]).all())  # a derangement: no label stays
    assert sorted(p.table.tolist()) == list(range(V))  # a permutation of the vocabulary
    assert torch.equal(py[real], p.table[y[real]])
    _, later = p.poison_batch(x, y, step=9)
    assert torch.equal(later, py)  # the same mapping at every step
    assert torch.equal(build("label_flip").table, p.table)  # and from the same seed
    assert not torch.equal(make_policy("label_flip", seed=8, vocab_size=V).table, p.table)


def test_label_flip_shift_mode():
    x, y = stream()
    _, py = build("label_flip", mode="shift", shift=3).poison_batch(x, y, step=0)
    assert torch.equal(py, (y + 3) % V)


def test_backdoor_writes_trigger_then_target_into_a_fraction_of_sequences_consistently():
    x, y = stream(b=8, t=16)
    p = build("backdoor", trigger=(29, 30), target=4, fraction=0.5)
    assert p.poisons_data
    px, py = p.poison_batch(x, y, step=3)
    assert torch.equal(x, stream(b=8, t=16)[0])  # the input batch is not modified
    changed = [r for r in range(8) if not torch.equal(px[r], x[r])]
    assert len(changed) == 4
    for r in changed:
        row = px[r].tolist()
        at = next(i for i in range(15) if row[i : i + 2] == [29, 30])
        assert row[at + 2] == 4  # the target follows the trigger
        assert py[r, at + 1] == 4  # ... and is what the pool learns to predict there
        # Still one stream: each label is the next input (except the last label, untouched).
        assert torch.equal(py[r, :-1], px[r, 1:])
    for r in set(range(8)) - set(changed):
        assert torch.equal(py[r], y[r])


def test_backdoor_is_deterministic_per_step_and_defaults_to_the_last_vocabulary_ids():
    x, y = stream(b=8, t=16)
    p = build("backdoor")
    assert p.trigger == (V - 3, V - 2, V - 1) and p.target == 0
    a, b = p.poison_batch(x, y, step=1), p.poison_batch(x, y, step=1)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    other = [p.poison_batch(x, y, step=s)[0] for s in range(2, 6)]
    assert any(not torch.equal(a[0], o) for o in other)  # rows and positions change with the step
    with pytest.raises(PolicyError, match=r"must be ids in \[0, 32\)"):
        build("backdoor", target=V)


@pytest.mark.parametrize("name", ATTACKS)
def test_every_policy_is_pure(name):
    """The same inputs give the same outputs and nothing passed in is modified."""
    g = torch.Generator().manual_seed(3)
    d = {"a": torch.randn(7, 3, generator=g), "b": torch.randn(5, generator=g)}
    keep = {k: v.clone() for k, v in d.items()}
    x, y = stream()
    p = build(name)
    one, two = p.transform(d, round=1), p.transform(d, round=1)
    assert all(torch.equal(one[k], two[k]) and one[k].dtype == torch.float32 for k in d)
    p.poison_batch(x, y, step=0)
    assert all(torch.equal(d[k], keep[k]) for k in d)
    assert torch.equal(x, stream()[0]) and torch.equal(y, stream()[1])
    assert isinstance(p, UpdatePolicy) and math.isfinite(float(one["a"].sum()))
