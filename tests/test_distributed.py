"""SyncBatchNorm and scalers across 2 and 3 gloo processes (uneven and empty shards) equal one process."""

import os
import tempfile

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from normlab.distributed import SyncBatchNorm, all_reduce_moments, all_reduce_scaler, convert_sync_batchnorm
from normlab.preprocessing import MinMaxScaler, StandardScaler
from normlab.stats import Moments

SHARDS = {2: [4, 6], 3: [3, 0, 7]}  # 10 examples in all; the 3-process case has an empty shard


def _global():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10, 3, 4, 4, generator=g, dtype=torch.float64) * 2 + 5
    dy = torch.randn(10, 3, 4, 4, generator=g, dtype=torch.float64)
    features = torch.randn(10, 4, generator=g, dtype=torch.float64) * torch.tensor([1.0, 10, 100, 1000]) + 7
    return x, dy, features


def _worker(rank, world, init_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        x, dy, features = _global()
        lo = sum(SHARDS[world][:rank])
        hi = lo + SHARDS[world][rank]
        # one process on the whole batch: the oracle
        ref = torch.nn.BatchNorm2d(3).double()
        with torch.no_grad():
            ref.weight.uniform_(0.5, 2, generator=torch.Generator().manual_seed(1))
        sync = convert_sync_batchnorm(torch.nn.Sequential(ref))[0]
        xr = x.clone().requires_grad_()
        (ref(xr) * dy).sum().backward()
        xs = x[lo:hi].clone().requires_grad_()
        y = sync(xs)
        (y * dy[lo:hi]).sum().backward()
        with torch.no_grad():
            assert torch.allclose(y, _bn_rows(x, ref, lo, hi), atol=1e-10)
        assert torch.allclose(xs.grad, xr.grad[lo:hi], atol=1e-10)
        dw = sync.weight.grad.clone()
        dist.all_reduce(dw)
        assert torch.allclose(dw, ref.weight.grad, atol=1e-10)  # local grads sum to the global ones
        assert torch.allclose(sync.running_mean, ref.running_mean, atol=1e-12)
        assert torch.allclose(sync.running_var, ref.running_var, atol=1e-12)
        # double backward through the collective: the second derivative equals one process's
        v = torch.linspace(-1, 1, x.numel(), dtype=torch.float64).reshape(x.shape)
        xr2, xs2 = x.clone().requires_grad_(), x[lo:hi].clone().requires_grad_()
        gr, = torch.autograd.grad((ref(xr2) * dy).sum(), xr2, create_graph=True)
        (gr * v).sum().backward()
        gs, = torch.autograd.grad((sync(xs2) * dy[lo:hi]).sum(), xs2, create_graph=True)
        (gs * v[lo:hi]).sum().backward()
        assert torch.allclose(gs, gr[lo:hi], atol=1e-10) and torch.allclose(xs2.grad, xr2.grad[lo:hi], atol=1e-9)
        # moments
        m = all_reduce_moments(Moments.from_data(features[lo:hi], dims=(0,), dtype=torch.float64)
                               if hi > lo else Moments.empty((4,), dtype=torch.float64))
        assert torch.allclose(m.mean, features.mean(0)) and torch.allclose(m.var(1), features.var(0))
        # scalers: partial_fit on the shard, then all-reduce = fit on everything
        for make in (StandardScaler, MinMaxScaler):
            scaler = make()
            if hi > lo:
                scaler.partial_fit(features[lo:hi].numpy())
            all_reduce_scaler(scaler)
            full = make().fit(features.numpy())
            for attr in ("n_samples_seen_", "mean_", "var_", "scale_", "data_min_", "data_max_", "data_range_"):
                if hasattr(full, attr):
                    np.testing.assert_allclose(getattr(scaler, attr), getattr(full, attr), rtol=1e-12)
    finally:
        _leave()
    _done()


def _leave():
    """Leave the group together (a barrier first, where the group still works): a rank that tears
    gloo down while another is still in a collective can abort the process."""
    try:
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _done():
    from normlab.lab.parallel import _exit_done  # no exit-time teardown, which gloo made abort under load

    _exit_done()


def _bn_rows(x, ref, lo, hi):
    mean = x.mean((0, 2, 3), keepdim=True)
    var = x.var((0, 2, 3), correction=0, keepdim=True)
    y = (x - mean) / torch.sqrt(var + ref.eps) * ref.weight.view(1, -1, 1, 1) + ref.bias.view(1, -1, 1, 1)
    return y[lo:hi]


@pytest.mark.parametrize("world", [2, 3])
def test_sync_batchnorm_and_scalers_across_processes(world):
    with tempfile.TemporaryDirectory() as tmp:
        ctx = mp.spawn(_worker, args=(world, os.path.join(tmp, "init")), nprocs=world, join=False)
        deadline = 120.0  # bounded: a hung collective fails the test instead of stalling CI
        while not ctx.join(timeout=5):
            deadline -= 5
            if deadline <= 0:
                for p in ctx.processes:
                    p.kill()
                pytest.fail(f"{world} gloo processes did not finish within 120 s")


def test_one_process_is_plain_batchnorm():
    import normlab.nn as nln
    from normlab.convert import is_batchnorm

    x = torch.randn(6, 3, 2, 2, requires_grad=True)
    sync, bn = SyncBatchNorm(3), torch.nn.BatchNorm2d(3)
    assert isinstance(sync, (torch.nn.SyncBatchNorm, nln._BatchNorm)) and is_batchnorm(sync)
    assert torch.autograd.gradgradcheck(lambda t: SyncBatchNorm(3).double()(t), (x.detach().double().requires_grad_(),))
    assert torch.allclose(sync(x), bn(x), atol=1e-6)
    assert set(sync.state_dict()) == set(bn.state_dict())
    sync.eval(), bn.eval()
    assert torch.allclose(sync(x), bn(x), atol=1e-6)
    with pytest.raises(ValueError, match="more than 1 value"):
        SyncBatchNorm(3)(torch.randn(1, 3))
    scaler = StandardScaler().fit(np.ones((3, 2)))
    assert all_reduce_scaler(scaler) is scaler


@pytest.mark.parametrize("dtype, offset, tol", [(torch.float32, 1e4, 1e-5), (torch.float16, 30.0, 1e-2),
                                                (torch.bfloat16, 30.0, 1e-1)])
def test_one_process_in_low_precision_far_from_zero_matches_float64(dtype, offset, tol):
    # the element-wise work runs in float32 for these dtypes, no float64 copy of x; the float64
    # statistics keep the offset's digits, so the result is as exact as the dtype allows
    g = torch.Generator().manual_seed(3)
    x64 = torch.randn(7, 4, 3, 5, generator=g, dtype=torch.float64) * 2 + offset
    x64 = x64.to(dtype).double()  # the values the low-precision input holds
    dy64 = torch.randn(x64.shape, generator=g, dtype=torch.float64).to(dtype).double()
    ref = torch.nn.BatchNorm2d(4).double()
    with torch.no_grad():
        ref.weight.uniform_(0.5, 2, generator=g)
    sync = convert_sync_batchnorm(ref).to(dtype)
    xr, xs = x64.clone().requires_grad_(), x64.to(dtype).requires_grad_()
    yr, ys = ref(xr), sync(xs)
    assert ys.dtype == dtype
    (yr * dy64).sum().backward()
    (ys * dy64.to(dtype)).sum().backward()

    def rel(a, b):
        return ((a.double() - b).norm() / b.norm()).item()
    assert rel(ys.detach(), yr.detach()) < tol and rel(xs.grad, xr.grad) < tol
    assert rel(sync.weight.grad, ref.weight.grad) < tol and rel(sync.running_mean, ref.running_mean) < tol


def test_conversion_keeps_what_it_can_and_refuses_what_it_cannot():
    import normlab.nn as nln
    from normlab.convert import freeze_norm

    bn = torch.nn.BatchNorm1d(3)
    bn.weight.requires_grad_(False)
    root = convert_sync_batchnorm(bn)
    assert isinstance(root, SyncBatchNorm) and not root.weight.requires_grad and root.bias.requires_grad
    with pytest.raises(ValueError, match="BatchRenorm"):
        convert_sync_batchnorm(torch.nn.Sequential(nln.BatchRenorm1d(3)))
    shared = torch.nn.BatchNorm1d(3)
    model = torch.nn.Sequential(shared, torch.nn.Sequential(shared))
    model.alias = shared  # shared across parents and under two names: still one module after
    synced = convert_sync_batchnorm(model)
    assert isinstance(synced[0], SyncBatchNorm) and synced[0] is synced[1][0] is synced.alias
    with pytest.raises(ValueError, match="frozen"):
        convert_sync_batchnorm(freeze_norm(torch.nn.Sequential(torch.nn.BatchNorm1d(3))))
    sklearn_scaler = pytest.importorskip("sklearn.preprocessing").StandardScaler().fit(np.ones((3, 2)))
    with pytest.raises(TypeError, match="normlab.preprocessing"):
        all_reduce_scaler(sklearn_scaler)


def test_eval_without_running_statistics_needs_no_collective_and_fp16_buffers_do_not_overflow():
    sync = SyncBatchNorm(3, track_running_stats=False).eval()
    x = torch.randn(5, 3)
    assert torch.allclose(sync(x), torch.nn.functional.batch_norm(x, None, None, sync.weight, sync.bias, True), atol=1e-6)
    big = (torch.randn(8, 3) * 300).half()
    for m in (SyncBatchNorm(3).half(), __import__("normlab.nn", fromlist=["x"]).BatchRenorm1d(3).half(),
              __import__("normlab.nn", fromlist=["x"]).BatchNorm1d(3).half()):
        m(big)
        assert torch.isfinite(m.running_var).all(), type(m).__name__


def _disagreeing_worker(rank, world, init_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        sync = SyncBatchNorm(3)
        before = {k: v.clone() for k, v in sync.state_dict().items()}
        # rank 1 passes 4 channels, then integers; the others are right: every rank raises, none hangs
        for bad in (torch.randn(4, 4, 2), torch.ones(4, 3, 2, dtype=torch.long)):
            x = bad if rank == 1 else torch.randn(4, 3, 2)
            try:
                sync(x)
            except (ValueError, TypeError) as err:
                msg = str(err)
                if rank == 1:
                    assert ("channels" in msg and "4" in msg) or "floating-point" in msg, msg
                else:
                    assert "disagree" in msg and "-1" in msg, msg
            else:
                raise AssertionError(f"rank {rank} did not raise")
        for k, v in sync.state_dict().items():
            assert torch.equal(v, before[k]), k
        assert torch.isfinite(sync(torch.randn(4, 3, 2))).all()  # and the group still works
    finally:
        _leave()
    _done()


def test_ranks_that_disagree_on_their_input_all_raise_and_change_nothing():
    with tempfile.TemporaryDirectory() as tmp:
        ctx = mp.spawn(_disagreeing_worker, args=(2, os.path.join(tmp, "init")), nprocs=2, join=False)
        deadline = 120.0
        while not ctx.join(timeout=5):
            deadline -= 5
            if deadline <= 0:
                for p in ctx.processes:
                    p.kill()
                pytest.fail("2 gloo processes did not finish within 120 s")
