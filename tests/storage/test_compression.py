"""Update compression: round-trip bounds, determinism, and compressed dicts from outside that lie."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from protocol.errors import MalformedMessage
from storage import compression, tensors
from storage.compression import (
    SCALE_SUFFIX,
    CompressionError,
    DecompressionError,
    Fp16Overflow,
    compress,
    decompress,
    expected_spec,
)


def pseudo_gradient(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "blocks.0.attn.weight": torch.randn(64, 48, generator=g) * 1e-3,
        "blocks.0.ln.bias": torch.randn(48, generator=g) * 1e-4,
        "scalar": torch.tensor(2.5e-3),
        "empty": torch.zeros(0, 7),
        # 3000 values: not a multiple of any block size used below.
        "odd": torch.randn(3000, generator=g) * torch.logspace(-6, 0, 3000),
    }


def through_store(t, method, block=compression.DEFAULT_BLOCK):
    """What the coordinator sees: dump to safetensors, load back, check the schema, decompress."""
    data = tensors.dump(compress(t, method, block=block))
    expected = expected_spec(method, tensors.spec_of(t), block=block)
    tensors.check_schema(tensors.read_header(data), expected)
    return decompress(tensors.load(data), method, block=block), data


def block_max(x, block):
    flat = x.reshape(-1)
    pad = -flat.numel() % block
    return torch.cat([flat, flat.new_zeros(pad)]).view(-1, block).abs().amax(dim=1)


@pytest.mark.parametrize("method", compression.METHODS)
def test_round_trip_keeps_names_shapes_and_float32(method):
    x = pseudo_gradient()
    back, _ = through_store(x, method)
    assert sorted(back) == sorted(x)
    for k in x:
        assert back[k].dtype == torch.float32 and back[k].shape == x[k].shape


def test_none_is_exact():
    x = pseudo_gradient()
    back, _ = through_store(x, "none")
    assert all(torch.equal(back[k], x[k]) for k in x)


def test_fp16_is_exactly_the_cast():
    x = pseudo_gradient()
    back, _ = through_store(x, "fp16")
    for k in x:
        assert torch.equal(back[k], x[k].to(torch.float16).to(torch.float32))


@pytest.mark.parametrize("block", [1, 7, 256, 1024])
def test_int8_error_is_within_half_a_step_per_block(block):
    """|x − x̂| ≤ max|x| / 254 in each block, up to float32 rounding (1e-5 relative)."""
    x = pseudo_gradient()
    back, _ = through_store(x, "int8", block)
    for k in x:
        if x[k].numel() == 0:
            continue
        err = (back[k] - x[k]).reshape(-1)
        pad = -err.numel() % block
        err_max = torch.cat([err, err.new_zeros(pad)]).view(-1, block).abs().amax(dim=1)
        assert bool((err_max <= block_max(x[k], block) / 254 * (1 + 1e-5)).all()), k


def test_int8_block_max_and_zero_survive_exactly():
    x = {"w": torch.tensor([0.0, 1.0, -0.5, 0.25, -2.0, 0.0])}
    back, _ = through_store(x, "int8", 3)
    # Each block's max is q = ±127 times max/127: exact up to one rounding of the scale.
    assert back["w"][1].item() == pytest.approx(1.0, rel=1e-6)
    assert back["w"][4].item() == pytest.approx(-2.0, rel=1e-6)
    assert back["w"][0].item() == 0.0 and back["w"][5].item() == 0.0


def test_int8_zero_tensor_gives_zero_scales_and_zeros():
    x = {"z": torch.zeros(5, 300)}
    c = compress(x, "int8", block=256)
    assert c["z" + SCALE_SUFFIX].tolist() == [0.0] * 6
    assert not c["z"].any()
    back, _ = through_store(x, "int8", 256)
    assert torch.equal(back["z"], x["z"])


def test_int8_scale_count_for_a_numel_not_multiple_of_the_block():
    c = compress({"w": torch.ones(1000)}, "int8", block=256)
    assert c["w"].shape == (1000,) and c["w"].dtype == torch.int8
    assert c["w" + SCALE_SUFFIX].shape == (4,)  # 3 full blocks and one of 232
    assert expected_spec("int8", {"w": tensors.TensorSpec("F32", (1000,))}, block=256) == {
        "w": tensors.TensorSpec("I8", (1000,)),
        "w" + SCALE_SUFFIX: tensors.TensorSpec("F32", (4,)),
    }


def test_int8_is_about_a_quarter_of_fp32():
    x = {"w": torch.randn(512, 1024, generator=torch.Generator().manual_seed(1))}
    raw = len(tensors.dump(x))
    int8 = len(tensors.dump(compress(x, "int8")))
    fp16 = len(tensors.dump(compress(x, "fp16")))
    assert 0.25 <= int8 / raw < 0.26  # 1 byte per value + 4 bytes per 1024 values
    assert 0.5 <= fp16 / raw < 0.51


@pytest.mark.parametrize("method", compression.METHODS)
def test_same_input_same_bytes_whatever_the_threads(method):
    x = pseudo_gradient(3)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = tensors.dump(compress(x, method))
        torch.set_num_threads(2)
        two = tensors.dump(compress(x, method))
    finally:
        torch.set_num_threads(before)
    assert one == two == tensors.dump(compress(pseudo_gradient(3), method))


def test_noncontiguous_input_is_compressed_as_its_values():
    w = torch.randn(40, 30, generator=torch.Generator().manual_seed(2))
    assert torch.equal(compress({"w": w.t()}, "int8")["w"], compress({"w": w.t().contiguous()}, "int8")["w"])


@given(
    values=st.lists(
        st.floats(min_value=-1e3, max_value=1e3, allow_nan=False, width=32), min_size=1, max_size=300
    ),
    block=st.integers(1, 64),
)
def test_property_int8_round_trip_bound(values, block):
    x = torch.tensor(values, dtype=torch.float32)
    back = decompress(compress({"x": x}, "int8", block=block), "int8", block=block)["x"]
    err = (back - x).abs()
    pad = -x.numel() % block
    err_max = torch.cat([err, err.new_zeros(pad)]).view(-1, block).amax(dim=1)
    # float32 subnormal maxima underflow their scale (see the module docstring): allow 1e-40 absolute.
    assert bool((err_max <= block_max(x, block) / 254 * (1 + 1e-5) + 1e-40).all())


# --- the sender's own mistakes -------------------------------------------------------------------


def test_fp16_overflow_raises_a_specific_error():
    x = {"w": torch.tensor([1.0, 7.0e4])}
    with pytest.raises(Fp16Overflow, match=r"'w'.*7e\+04.*65504.*int8"):
        compress(x, "fp16")
    # 65504 itself and values that round down to it are fine.
    assert compress({"w": torch.tensor([65504.0, 65519.0])}, "fp16")["w"].tolist() == [65504.0] * 2


@pytest.mark.parametrize("method", compression.METHODS)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_pseudo_gradient_is_refused(method, bad):
    with pytest.raises(CompressionError, match="diverged"):
        compress({"w": torch.tensor([0.0, bad])}, method)


def test_wrong_dtype_reserved_name_unknown_method_bad_block():
    with pytest.raises(CompressionError, match="float32"):
        compress({"w": torch.zeros(3, dtype=torch.float64)}, "int8")
    with pytest.raises(CompressionError, match="reserved"):
        compress({"w" + SCALE_SUFFIX: torch.zeros(3)}, "none")
    with pytest.raises(ValueError, match="not one of none, fp16, int8"):
        compress({"w": torch.zeros(3)}, "int4")
    with pytest.raises(ValueError, match="block size"):
        compress({"w": torch.zeros(3)}, "int8", block=0)


# --- compressed updates from outside that lie ----------------------------------------------------


def honest_int8():
    return compress({"w": torch.linspace(-1, 1, 600), "b": torch.ones(10)}, "int8", block=256)


def tampered(**changes):
    d = honest_int8()
    for k, v in changes.items():
        if v is None:
            del d[k]
        else:
            d[k] = v
    return d


@pytest.mark.parametrize(
    ("story", "update", "match"),
    [
        ("values without their scales", tampered(**{"w.__scale": None}), "no scales"),
        ("scales without their values", tampered(w=None), "has no values tensor"),
        ("values sent as int16", tampered(w=torch.zeros(600, dtype=torch.int16)), "expected torch.int8"),
        ("scales sent as float64", tampered(**{"w.__scale": torch.ones(3, dtype=torch.float64)}), "float32"),
        ("one scale missing", tampered(**{"w.__scale": torch.ones(2)}), r"need \[3\]"),
        ("scales as a matrix", tampered(**{"w.__scale": torch.ones(3, 1)}), r"need \[3\]"),
        ("values grown by a block", tampered(w=torch.zeros(900, dtype=torch.int8)), r"need \[4\]"),
        ("a NaN scale", tampered(**{"w.__scale": torch.tensor([1.0, math.nan, 1.0])}), "finite"),
        ("an infinite scale", tampered(**{"w.__scale": torch.tensor([1.0, math.inf, 1.0])}), "finite"),
        ("a negative scale", tampered(**{"w.__scale": torch.tensor([1.0, -1.0, 1.0])}), "≥ 0"),
        ("a scale that overflows ×127", tampered(**{"w.__scale": torch.full((3,), 3e38)}), "≤"),
        ("-128 in the values", tampered(w=torch.full((600,), -128, dtype=torch.int8)), "-128"),
        ("a scale of a scale", tampered(**{"w.__scale.__scale": torch.ones(1)}), "has no values tensor"),
    ],
)
def test_story_malformed_int8_update_is_refused(story, update, match):
    with pytest.raises(DecompressionError, match=match):
        decompress(update, "int8", block=256)


def test_story_int8_decoded_as_another_block_size():
    """A node quantised with block 128 while the job says 256: the scale count gives it away."""
    c = compress({"w": torch.ones(600)}, "int8", block=128)
    with pytest.raises(DecompressionError, match=r"blocks of 256 need \[3\]"):
        decompress(c, "int8", block=256)


@pytest.mark.parametrize(
    ("method", "update", "match"),
    [
        ("none", {"w": torch.zeros(3, dtype=torch.float16)}, "expected torch.float32"),
        ("none", {"w": torch.tensor([0.0, math.nan])}, "NaN or infinite"),
        ("fp16", {"w": torch.zeros(3)}, "expected torch.float16"),
        ("fp16", {"w": torch.tensor([0.0, math.inf], dtype=torch.float16)}, "NaN or infinite"),
        ("fp16", {"w": torch.zeros(3, dtype=torch.float16), "w.__scale": torch.ones(1)}, "int8 scale"),
        ("none", {"w": [1.0, 2.0]}, "not a named tensor"),
    ],
)
def test_story_malformed_float_update_is_refused(method, update, match):
    with pytest.raises(DecompressionError, match=match):
        decompress(update, method)


def test_decompression_errors_are_malformed_messages():
    assert issubclass(DecompressionError, MalformedMessage)


def test_schema_check_catches_a_shape_lie_before_decompressing():
    """The update claims [20, 30] for a [30, 20] weight: same numel, so only the schema sees it."""
    weights = {"w": tensors.TensorSpec("F16", (30, 20))}
    data = tensors.dump(compress({"w": torch.ones(20, 30)}, "int8"))
    with pytest.raises(tensors.SchemaError, match="shape"):
        tensors.check_schema(tensors.read_header(data), expected_spec("int8", weights))


def test_expected_spec_is_float32_whatever_the_weight_dtype():
    weights = {"b": tensors.TensorSpec("BF16", (4,)), "a": tensors.TensorSpec("F16", (2, 3))}
    assert expected_spec("none", weights) == {
        "a": tensors.TensorSpec("F32", (2, 3)),
        "b": tensors.TensorSpec("F32", (4,)),
    }
    assert list(expected_spec("fp16", weights)) == ["a", "b"]
    assert expected_spec("fp16", weights)["a"].dtype == "F16"
