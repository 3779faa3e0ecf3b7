"""The Triton kernels against the reference: on a GPU when there is one, otherwise on the CPU
under ``TRITON_INTERPRET=1`` (Triton's interpreter runs the same kernel code with numpy)."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are defined
pytest.importorskip("triton")

from normlab.kernels import reference  # noqa: E402
from normlab.kernels import triton as tk  # noqa: E402

from conftest import assert_rel  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NAN = float("nan")


@pytest.fixture
def poisoned(monkeypatch):
    real = torch.empty_like
    monkeypatch.setattr(tk.torch, "empty_like", lambda x, **k: real(x, **k).fill_(NAN))


def _data(shape, offset, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 3 + offset).to(DEVICE)


@pytest.mark.parametrize("offset", [0.0, 1e4])
@pytest.mark.parametrize("center", [True, False])
@pytest.mark.parametrize("R, D, groups, seg", [(7, 131, 1, 1), (3, 9000, 1, 1), (8, 150, 4, 50), (12, 49, 6, 49)])
def test_rows(poisoned, R, D, groups, seg, center, offset):
    x = _data((R, D), offset, 0)
    P = groups * (D // seg)
    w, b, dy = _data((P,), 1.0, 1), _data((P,), 0.0, 2), _data((R, D), 0.0, 3)
    got = tk.rows_forward(x, w, b, 1e-5, center, groups, seg)
    want = reference.rows_forward(x.cpu(), w.cpu(), b.cpu(), 1e-5, center, groups, seg)
    for g_, w_, name in zip(got, want, ("y", "mean", "var")):
        assert_rel(g_.cpu(), w_, tol=1e-5, what=name)
    var = want[2]
    args = (want[1], var, w.cpu(), 1e-5, center, groups, seg)
    got = tk.rows_backward(dy, x, *(t.to(DEVICE) if torch.is_tensor(t) else t for t in args))
    for g_, w_, name in zip(got, reference.rows_backward(dy.cpu(), x.cpu(), *args), ("dx", "dw", "db")):
        assert_rel(g_.cpu(), w_, tol=1e-5, what=name)


@pytest.mark.parametrize("offset", [0.0, 1e4])
@pytest.mark.parametrize("shape", [(4, 3, 33), (50, 5, 1), (2, 7, 1000)])
def test_channels(poisoned, shape, offset):
    x = _data(shape, offset, 0)
    C = shape[1]
    w, b, dy = _data((C,), 1.0, 1), _data((C,), 0.0, 2), _data(shape, 0.0, 3)
    got = tk.channels_forward(x, w, b, 1e-5)
    want = reference.channels_forward(x.cpu(), w.cpu(), b.cpu(), 1e-5)
    for g_, w_, name in zip(got, want, ("y", "mean", "var")):
        assert_rel(g_.cpu(), w_, tol=1e-5, what=name)
    for g_, w_, name in zip(tk.channels_stats(x), want[1:], ("mean alone", "var alone")):
        assert_rel(g_.cpu(), w_, tol=1e-5, what=name)
    var = want[2]
    got = tk.channels_backward(dy, x, want[1].to(DEVICE), var.to(DEVICE), w, 1e-5)
    for g_, w_, name in zip(got, reference.channels_backward(dy.cpu(), x.cpu(), want[1], var, w.cpu(), 1e-5),
                            ("dx", "dw", "db")):
        assert_rel(g_.cpu(), w_, tol=1e-5, what=name)


def test_strided_and_expanded_parameters(poisoned):
    x, wb = _data((4, 12), 3.0, 0), _data((40,), 1.0, 1)
    w, b = wb[::3][:12], wb[1::3][:12]
    assert_rel(tk.rows_forward(x, w, b, 1e-5, True, 1, 1)[0].cpu(),
               reference.rows_forward(x.cpu(), w.cpu(), b.cpu(), 1e-5, True, 1, 1)[0])
    e = _data((1,), 2.0, 2).expand(12)
    assert_rel(tk.rows_forward(x, e, None, 1e-5, True, 1, 1)[0].cpu(),
               reference.rows_forward(x.cpu(), e.cpu(), None, 1e-5, True, 1, 1)[0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="half precision kernels need a GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_on_gpu(dtype):
    x = torch.randn(64, 1000, device="cuda", dtype=dtype)
    w = torch.randn(1000, device="cuda", dtype=dtype)
    y = tk.rows_forward(x, w, None, 1e-5, True, 1, 1)[0]
    assert_rel(y.float(), torch.nn.functional.layer_norm(x.float(), (1000,), w.float()), tol=3e-2)


@pytest.mark.parametrize("affine", [True, False])
def test_eval_from_running_statistics(poisoned, affine):
    x = _data((4, 3, 33), 50.0, 0)
    mean, var = _data((3,), 50.0, 1), _data((3,), 0.0, 2).abs() + 0.1
    w, b = (_data((3,), 1.0, 3), _data((3,), 0.0, 4)) if affine else (None, None)
    cpu = (lambda t: None if t is None else t.cpu())
    assert_rel(tk.channels_eval(x, mean, var, w, b, 1e-5).cpu(),
               reference.channels_eval(x.cpu(), mean.cpu(), var.cpu(), cpu(w), cpu(b), 1e-5), tol=2e-5)
    dy = _data((4, 3, 33), 0.0, 5)
    for got, want in zip(tk.channels_eval_backward(dy, x, mean, var, w, 1e-5),
                         reference.channels_eval_backward(dy.cpu(), x.cpu(), mean.cpu(), var.cpu(), cpu(w), 1e-5)):
        assert_rel(got.cpu(), want, tol=2e-5)
