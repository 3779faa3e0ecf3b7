import numpy as np
import pytest
import torch

from normlab.stats import Moments, accumulation_dtype, extrema, moments


@pytest.mark.parametrize("dims", [(0,), (1,), (0, 2), (-1,), (0, 1, 2)])
def test_moments_match_float64(dims):
    x = torch.randn(5, 6, 7)
    mean, var = moments(x, dims)
    x64 = x.double()
    assert torch.allclose(mean.double(), x64.mean(dims, keepdim=True), atol=1e-6)
    assert torch.allclose(var.double(), x64.var(dims, correction=0, keepdim=True), atol=1e-6)


def test_moments_without_centering_is_mean_square():
    x = torch.randn(4, 9)
    mean, ms = moments(x, (1,), center=False, keepdim=False)
    assert mean is None
    assert torch.allclose(ms, x.square().mean(1))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_accumulate_in_float32(dtype):
    x = (torch.randn(4096) + 3).to(dtype)
    mean, var = moments(x, (0,))
    assert mean.dtype == var.dtype == torch.float32
    ref = x.double()
    assert abs(float(mean) - float(ref.mean())) < 1e-4
    assert abs(float(var) - float(ref.var(correction=0))) < 1e-4
    assert accumulation_dtype(dtype) == torch.float32
    assert accumulation_dtype(torch.float32, torch.float64) == torch.float64


def test_large_offset_is_stable():
    # |mean| ≫ std: E[x²] − E[x]² in float32 would lose every digit here
    base = torch.randn(10_000, dtype=torch.float64)
    x = (base + 1e4).float()
    _, var = moments(x, (0,))
    ref = x.double().var(correction=0)
    assert abs(float(var) - float(ref)) / float(ref) < 1e-3


def test_chan_merge_equals_single_pass():
    x = torch.randn(1000, 4, dtype=torch.float64) * 3 + 1e6
    parts = torch.split(x, [1, 10, 389, 600])
    acc = Moments.empty(4)
    for p in parts:
        acc = acc + Moments.from_data(p)
    full = Moments.from_data(x)
    assert torch.equal(acc.count, full.count)
    assert torch.allclose(acc.mean, full.mean, rtol=1e-14)
    assert torch.allclose(acc.var(), full.var(), rtol=1e-9)
    assert torch.allclose(acc.var(correction=1), x.var(0), rtol=1e-9)


def test_nan_ignored_per_feature():
    x = torch.randn(200, 3, dtype=torch.float64)
    x[::3, 0] = float("nan")
    x[:, 2] = float("nan")
    m = Moments.from_data(x[:50], ignore_nan=True) + Moments.from_data(x[50:], ignore_nan=True)
    xn = x.numpy()
    assert m.count.tolist() == [float((~np.isnan(xn[:, j])).sum()) for j in range(3)]
    np.testing.assert_allclose(m.mean[:2].numpy(), np.nanmean(xn[:, :2], 0), rtol=1e-12)
    np.testing.assert_allclose(m.var()[:2].numpy(), np.nanvar(xn[:, :2], 0), rtol=1e-10)
    assert torch.isnan(m.var()[2])  # no value seen: variance undefined


def test_empty_moments_and_extrema():
    m = Moments.from_data(torch.empty(0, 3))
    assert m.count.tolist() == [0, 0, 0]
    assert (Moments.from_data(torch.ones(2, 3)) + m).mean.tolist() == [1, 1, 1]
    lo, hi = extrema(torch.tensor([[1.0, float("nan")], [float("nan"), float("nan")], [-2.0, float("nan")]]), ignore_nan=True)
    assert lo[0] == -2 and hi[0] == 1 and torch.isnan(lo[1]) and torch.isnan(hi[1])
    lo, hi = extrema(torch.tensor([[1.0, 5.0], [3.0, 4.0]]))
    assert lo.tolist() == [1, 4] and hi.tolist() == [3, 5]


def test_moments_to_moves_all_fields():
    m = Moments.from_data(torch.randn(5, 2)).to(torch.float64)
    assert m.count.dtype == m.mean.dtype == m.m2.dtype == torch.float64
