"""BatchRenorm (Ioffe 2017) against its definition, against BatchNorm at r = 1, d = 0, gradcheck."""

import pytest
import torch

import normlab.nn as nln

from conftest import assert_rel


def _definition(x, running_mean, running_var, weight, bias, eps, rmax, dmax):
    dims = (0, *range(2, x.dim()))
    view = (1, -1) + (1,) * (x.dim() - 2)
    mean_b = x.mean(dims, keepdim=True)
    sigma_b = torch.sqrt(x.var(dims, correction=0, keepdim=True) + eps)
    sigma = torch.sqrt(running_var.view(view) + eps)
    r = (sigma_b / sigma).clamp(1 / rmax, rmax).detach()  # stop-gradient, as in the paper
    d = ((mean_b - running_mean.view(view)) / sigma).clamp(-dmax, dmax).detach()
    return weight.view(view) * ((x - mean_b) / sigma_b * r + d) + bias.view(view)


@pytest.mark.parametrize("cls, shape", [(nln.BatchRenorm1d, (16, 5)), (nln.BatchRenorm2d, (4, 3, 5, 6)),
                                        (nln.BatchRenorm3d, (2, 3, 3, 4, 2))])
@pytest.mark.parametrize("rmax, dmax", [(1.5, 0.5), (3.0, 5.0)])
def test_training_output_and_gradients_follow_the_definition(cls, shape, rmax, dmax):
    torch.manual_seed(0)
    c = shape[1]
    m = cls(c, rmax=rmax, dmax=dmax).double()
    with torch.no_grad():  # running statistics far from the batch's, so r and d clip
        m.running_mean.copy_(torch.linspace(-2, 2, c))
        m.running_var.copy_(torch.linspace(0.1, 9, c))
        m.weight.uniform_(0.5, 2)
        m.bias.normal_()
    x = (torch.randn(shape, dtype=torch.float64) * 2 + 1).requires_grad_()
    rm, rv = m.running_mean.clone(), m.running_var.clone()
    y = m(x)
    g = torch.randn_like(y)
    dx, dw, db = torch.autograd.grad(y, (x, m.weight, m.bias), g)
    w, b = m.weight.detach().clone().requires_grad_(), m.bias.detach().clone().requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    ref = _definition(x2, rm, rv, w, b, m.eps, rmax, dmax)
    rdx, rdw, rdb = torch.autograd.grad(ref, (x2, w, b), g)
    for got, want, what in ((y, ref, "y"), (dx, rdx, "dx"), (dw, rdw, "dweight"), (db, rdb, "dbias")):
        assert_rel(got, want, torch.float64, what=what)
    n = x.numel() // c
    dims = (0, *range(2, x.dim()))
    assert_rel(m.running_mean, 0.9 * rm + 0.1 * x.detach().mean(dims), torch.float64)
    assert_rel(m.running_var, 0.9 * rv + 0.1 * x.detach().var(dims, correction=0) * n / (n - 1), torch.float64)


def test_equals_batchnorm_at_r_1_d_0_and_in_eval():
    torch.manual_seed(1)
    br, bn = nln.BatchRenorm2d(3, warmup_steps=100), nln.BatchNorm2d(3)  # step 0 of the warm-up: rmax=1, dmax=0
    bn.load_state_dict(br.state_dict())
    x = torch.randn(4, 3, 5, 5, requires_grad=True)
    y1, y2 = br(x), bn(x)
    assert_rel(y1, y2)
    # a random cotangent: with y.square().sum() the gradient of x is the O(1) terms' cancellation down
    # to O(ε), ill-conditioned, and two float32 computations of it differ by their rounding
    g = torch.randn_like(y1)
    g1 = torch.autograd.grad(y1, (x, br.weight), g)
    g2 = torch.autograd.grad(y2, (x, bn.weight), g)
    for a, b in zip(g1, g2):
        assert_rel(a, b)
    assert_rel(br.running_var, bn.running_var)
    br.eval(), bn.eval()
    assert_rel(br(x), bn(x))
    assert br.limits() == (1.0 + 2.0 / 100, 5.0 / 100)  # one step into the warm-up


@pytest.mark.parametrize("make", ["BatchRenorm2d", "SyncBatchNorm"])
def test_statistics_are_taken_once_then_batchnorms_map(make):
    # the statistics operator, then BatchNorm's map with them: one pass over x for the moments
    # (not BatchNorm's fused kernel, whose statistics would be taken again), one for the map
    pytest.importorskip("cpu_kernels", reason="the compiled core is not available")
    from torch.utils._python_dispatch import TorchDispatchMode

    from normlab.distributed import SyncBatchNorm

    calls = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.namespace == "normlab":
                calls.append(func.__name__.split(".")[0])
            return func(*args, **(kwargs or {}))

    m = SyncBatchNorm(3) if make == "SyncBatchNorm" else getattr(nln, make)(3)
    x = torch.randn(4, 3, 5, 5, requires_grad=True)
    with Record():
        m(x).backward(torch.randn(4, 3, 5, 5))
    assert sorted(calls) == ["channels_eval", "channels_eval_backward", "channels_stats"], calls


def test_gradcheck_and_state_dict_and_errors():
    m = nln.BatchRenorm1d(3, rmax=2.0, dmax=1.0).double()
    with torch.no_grad():  # r and d clipped at rmax and dmax: locally constant, so the stop-gradient
        m.running_var.fill_(1e-4)  # backward is the true derivative and gradcheck applies
        m.running_mean.fill_(100.0)
    x = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    m.momentum = 0.0  # keep the running statistics fixed across gradcheck's evaluations
    assert torch.autograd.gradcheck(lambda t: m(t), (x,))
    assert torch.autograd.gradgradcheck(lambda t: m(t), (x,))
    torch_bn = torch.nn.BatchNorm1d(3)
    m.load_state_dict(torch_bn.state_dict())
    assert set(m.state_dict()) == set(torch_bn.state_dict())
    assert "rmax=2.0" in repr(m)
    with pytest.raises(ValueError, match="track_running_stats"):
        nln.BatchRenorm2d(3, track_running_stats=False)
    with pytest.raises(ValueError, match="rmax >= 1"):
        nln.BatchRenorm2d(3, rmax=0.5)
    before = m.running_mean.clone()
    with pytest.raises(ValueError, match="more than 1 value"):
        m.float()(torch.randn(1, 3))
    assert torch.equal(m.running_mean, before.float())


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("make", ["BatchRenorm1d", "SyncBatchNorm"])
def test_a_constant_channel_has_finite_second_derivatives(backend, make):
    # var = 0 in channel 1: the statistics' second derivative exists there (a norm's does not)
    import normlab
    from normlab.distributed import SyncBatchNorm

    m = (SyncBatchNorm(3) if make == "SyncBatchNorm" else nln.BatchRenorm1d(3, rmax=2.0, dmax=1.0)).double()
    x = torch.randn(6, 3, dtype=torch.float64)
    x[:, 1] = 0.5
    x.requires_grad_()
    with normlab.use_backend(backend):
        g, = torch.autograd.grad((m(x) * torch.randn(6, 3, dtype=torch.float64)).sum(), x, create_graph=True)
        gg, = torch.autograd.grad(g.square().sum(), x)
    assert torch.isfinite(gg).all()


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_forward_mode_agrees_with_reverse_mode(backend):
    # ⟨g, J·t⟩ by forward mode = ⟨Jᵀ·g, t⟩ by reverse mode, r and d constants in both
    import torch.autograd.forward_ad as fwAD

    import normlab

    m = nln.BatchRenorm2d(3, rmax=1.5, dmax=0.5).double()
    with torch.no_grad():
        m.running_var.fill_(2.0)
        m.running_mean.fill_(0.3)
    m.momentum = 0.0
    x, t, g = (torch.randn(4, 3, 5, 5, dtype=torch.float64) for _ in range(3))
    with normlab.use_backend(backend):
        with fwAD.dual_level():
            jt = fwAD.unpack_dual(m(fwAD.make_dual(x, t))).tangent
        xr = x.clone().requires_grad_()
        jg, = torch.autograd.grad(m(xr), xr, g)
    torch.testing.assert_close((g * jt).sum(), (jg * t).sum())


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_renorm_and_sync_refuse_inference_buffers_before_computing(backend):
    import normlab
    from normlab.distributed import SyncBatchNorm

    for make in (lambda: nln.BatchRenorm2d(3), lambda: SyncBatchNorm(3)):
        with torch.inference_mode():
            m = make()
        m.weight, m.bias = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.zeros(3))
        with normlab.use_backend(backend), pytest.raises(ValueError, match="inference_mode"):
            m(torch.randn(4, 3, 2, 2))
        assert int(m.num_batches_tracked) == 0 and torch.equal(m.running_mean, torch.zeros(3))


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_batchnorm_in_parts_raises_normlabs_classes_on_every_route(backend):
    import normlab
    import normlab.functional as F
    from normlab.errors import DTypeError, ShapeError

    x, s = torch.randn(4, 3, 5), torch.ones(3, dtype=torch.float64)
    with normlab.use_backend(backend):
        with pytest.raises(ShapeError):
            F._batch_norm_apply(x, torch.zeros(4, dtype=torch.float64), s, None, None, 1e-5)
        with pytest.raises(ShapeError):
            F._batch_norm_apply(x, s, s, torch.ones(4), None, 1e-5)
        with pytest.raises(DTypeError):
            F._batch_stats(torch.ones(4, 3, dtype=torch.long))
        with pytest.raises(ValueError, match="no values"):
            F._batch_stats(torch.randn(0, 3, 5))
