"""Per-channel sums and affine against float64 formulas, in every layout and dtype they take."""
import pytest
import torch

from mabn_d2.layers.channel_ops import (
    accumulation_dtype, channel_normalize, channel_sum, channel_sum_of_products, channel_sum_of_squares,
)

SHAPE = (3, 5, 7, 6)


def _tensors(dtype=torch.float64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    a = torch.randn(SHAPE, dtype=torch.float64, generator=generator) + 0.5
    b = torch.randn(SHAPE, dtype=torch.float64, generator=generator) * 2.0
    return a.to(dtype), b.to(dtype)


def _per_channel(t):
    """float64 (C, N*H*W): each channel's values as one row, by explicit indexing."""
    t = t.double()
    return torch.stack([t[:, c].reshape(-1) for c in range(t.shape[1])])


LAYOUTS = {
    "contiguous": lambda t: t,
    "channels_last": lambda t: t.contiguous(memory_format=torch.channels_last),
    "strided": lambda t: torch.stack([t, -t], dim=-1)[..., 0],  # same values, every other element
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_sums_match_the_formula_in_float64(layout):
    a, b = _tensors()
    a_l, b_l = LAYOUTS[layout](a), LAYOUTS[layout](b)
    rows_a, rows_b = _per_channel(a), _per_channel(b)
    expected_sum = torch.tensor([sum(float(v) for v in row) for row in rows_a], dtype=torch.float64)
    torch.testing.assert_close(channel_sum(a_l, torch.float64), expected_sum, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(channel_sum_of_squares(a_l, torch.float64), (rows_a * rows_a).sum(1), rtol=1e-13, atol=0)
    torch.testing.assert_close(channel_sum_of_products(a_l, b_l, torch.float64), (rows_a * rows_b).sum(1), rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_float32_sums_are_accurate(layout):
    a, b = _tensors(torch.float32, seed=1)
    rows_a, rows_b = _per_channel(a), _per_channel(b)
    a_l, b_l = LAYOUTS[layout](a), LAYOUTS[layout](b)
    torch.testing.assert_close(channel_sum_of_squares(a_l, torch.float32).double(), (rows_a * rows_a).sum(1), rtol=1e-6, atol=0)
    torch.testing.assert_close(channel_sum_of_products(a_l, b_l, torch.float32).double(), (rows_a * rows_b).sum(1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_precision_inputs_accumulate_in_float32(dtype):
    """Many equal values: a sum kept in bf16/fp16 would stall far below the true total."""
    a = torch.full((2, 3, 64, 64), 1.0, dtype=dtype)
    b = torch.full((2, 3, 64, 64), 0.5, dtype=dtype)
    count = 2 * 64 * 64
    for result in (channel_sum(a, torch.float32), channel_sum_of_squares(a, torch.float32),
                   channel_sum_of_products(a, b, torch.float32)):
        assert result.dtype == torch.float32
    torch.testing.assert_close(channel_sum(a, torch.float32), torch.full((3,), float(count)))
    torch.testing.assert_close(channel_sum_of_squares(a, torch.float32), torch.full((3,), float(count)))
    torch.testing.assert_close(channel_sum_of_products(a, b, torch.float32), torch.full((3,), 0.5 * count))


def test_products_under_autocast_stay_in_float32():
    a, b = _tensors(torch.float32, seed=2)
    expected = (_per_channel(a) * _per_channel(b)).sum(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        result = channel_sum_of_products(a, b, torch.float32)
    assert result.dtype == torch.float32
    torch.testing.assert_close(result.double(), expected, rtol=1e-5, atol=1e-5)


def test_accumulation_dtype():
    f16, bf16, f32, f64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
    cases = [((bf16, f32), f32), ((f16, f16), f32), ((f32, f32), f32), ((f64, f64), f64), ((f32, f64), f64), ((f64, f32), f64)]
    for (x_dtype, state_dtype), expected in cases:
        assert accumulation_dtype(torch.empty(1, dtype=x_dtype), torch.empty(1, dtype=state_dtype)) == expected


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_normalize_is_the_per_channel_affine(layout):
    x, _ = _tensors()
    x = LAYOUTS[layout](x)
    generator = torch.Generator().manual_seed(3)
    var = torch.rand(5, dtype=torch.float64, generator=generator) + 0.1
    scale = torch.randn(5, dtype=torch.float64, generator=generator)
    shift = torch.randn(5, dtype=torch.float64, generator=generator)
    mean = torch.randn(5, dtype=torch.float64, generator=generator)
    view = (1, -1, 1, 1)
    eps = 1e-3
    zero_mean = x * (scale / (var + eps).sqrt()).view(view) + shift.view(view)
    torch.testing.assert_close(channel_normalize(x, var, scale, shift, eps), zero_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(channel_normalize(x, var, scale, None, eps), zero_mean - shift.view(view), rtol=1e-12, atol=1e-12)
    centred = (x - mean.view(view)) * (scale / (var + eps).sqrt()).view(view) + shift.view(view)
    torch.testing.assert_close(channel_normalize(x, var, scale, shift, eps, mean=mean), centred, rtol=1e-12, atol=1e-12)
    assert channel_normalize(x, var, scale, shift, eps).is_contiguous(
        memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format
    )


def test_normalize_keeps_reduced_precision_activations_with_float32_statistics():
    x = torch.randn(2, 4, 3, 3).to(torch.bfloat16)
    ones, zeros = torch.ones(4), torch.zeros(4)
    y = channel_normalize(x, ones, ones, zeros, 1e-5)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), x.float() / (1 + 1e-5) ** 0.5, rtol=1e-2, atol=1e-2)
