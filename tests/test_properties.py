"""Invariances the seeds state, as property tests: normalization removes a shift and a
positive scale over exactly its reduction set (Lesson 14.1 §2.1: 平移和放缩不改变数据分布)."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import normlab.functional as F

settings.register_profile("normlab", max_examples=40, deadline=None)
settings.load_profile("normlab")

scales = st.floats(0.05, 20.0)
shifts = st.floats(-1e3, 1e3)
seeds = st.integers(0, 2**31 - 1)


def _data(seed, shape):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64)


# torch (and normlab) want eps > 0 with batch statistics; to these float64 variances 1e-300 is 0
TINY = 1e-300


def _close(a, b):
    assert torch.allclose(a, b, atol=1e-7, rtol=1e-7), float((a - b).abs().max())


@given(seeds, st.lists(scales, min_size=3, max_size=3), st.lists(shifts, min_size=3, max_size=3))
def test_layer_and_group_norm_invariant_per_sample(seed, a, b):
    x = _data(seed, (3, 4, 5))
    a = torch.tensor(a, dtype=torch.float64).view(3, 1, 1)
    b = torch.tensor(b, dtype=torch.float64).view(3, 1, 1)
    _close(F.layer_norm(a * x + b, (4, 5), eps=0), F.layer_norm(x, (4, 5), eps=0))
    _close(F.group_norm(a * x + b, 2, eps=0), F.group_norm(x, 2, eps=0))


@given(seeds, st.lists(scales, min_size=6, max_size=6), st.lists(shifts, min_size=6, max_size=6))
def test_instance_norm_invariant_per_sample_and_channel(seed, a, b):
    x = _data(seed, (2, 3, 7))
    a = torch.tensor(a, dtype=torch.float64).view(2, 3, 1)
    b = torch.tensor(b, dtype=torch.float64).view(2, 3, 1)
    _close(F.instance_norm(a * x + b, eps=TINY), F.instance_norm(x, eps=TINY))


@given(seeds, st.lists(scales, min_size=4, max_size=4), st.lists(shifts, min_size=4, max_size=4))
def test_batch_norm_invariant_per_channel(seed, a, b):
    x = _data(seed, (5, 4, 3))
    a = torch.tensor(a, dtype=torch.float64).view(1, 4, 1)
    b = torch.tensor(b, dtype=torch.float64).view(1, 4, 1)
    _close(F.batch_norm(a * x + b, None, None, training=True, eps=TINY), F.batch_norm(x, None, None, training=True, eps=TINY))


@given(seeds, st.lists(scales, min_size=3, max_size=3))
def test_rms_norm_and_cosine_invariant_to_scale(seed, a):
    x = _data(seed, (3, 6))
    a = torch.tensor(a, dtype=torch.float64).view(3, 1)
    _close(F.rms_norm(a * x, (6,), eps=0), F.rms_norm(x, (6,), eps=0))
    w = _data(seed + 1, (2, 6))
    _close(F.cosine_linear(a * x, w, eps=0), F.cosine_linear(x, w, eps=0))


@given(seeds, scales, shifts)
def test_batch_norm_is_not_invariant_to_a_per_sample_shift(seed, a, b):
    # the reduction set matters: BN mixes samples, so shifting one sample changes the others
    x = _data(seed, (4, 3))
    x2 = x.clone()
    x2[0] = a * x2[0] + b + 1.0
    y, y2 = (F.batch_norm(t, None, None, training=True, eps=TINY) for t in (x, x2))
    assert not torch.allclose(y[1:], y2[1:], atol=1e-9)
