"""Shared shapes, dtypes and the one tolerance table of the test suite."""

from __future__ import annotations

import pytest
import torch

# max-abs error relative to the max-abs of the oracle, per dtype
TOL = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.float16: 3e-2,
    torch.bfloat16: 3e-2,
}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def assert_rel(a, b, dtype=torch.float32, tol=None, what=""):
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    err = rel_err(a, b)
    limit = TOL[dtype] if tol is None else tol
    assert err <= limit, f"{what}: relative error {err:.3g} > {limit:.3g}"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


# timm (and transformers, where torchvision is installed) import torchvision, whose wheel's
# compiled operators do not load beside a CPU build of torch: its Python part is enough here
from normlab.bench_models import load_torchvision  # noqa: E402

load_torchvision()
