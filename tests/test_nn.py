"""normlab.nn modules against their torch.nn twins, plus copies, formats and errors."""

from __future__ import annotations

import copy
import io
import pickle

import re

import pytest
import torch
from torch import nn

import normlab.nn as N

from conftest import assert_rel

# name: (constructor name, args, kwargs, input shape); the torch twin has the same name
SPECS = {
    "bn1d": ("BatchNorm1d", (5,), {}, (8, 5)),
    "bn1d_seq": ("BatchNorm1d", (5,), {}, (4, 5, 3)),
    "bn2d": ("BatchNorm2d", (4,), {}, (3, 4, 5, 3)),
    "bn3d": ("BatchNorm3d", (3,), {}, (2, 3, 2, 3, 4)),
    "bn_cumulative": ("BatchNorm1d", (5,), {"momentum": None}, (6, 5)),
    "bn_no_stats": ("BatchNorm2d", (4,), {"track_running_stats": False}, (3, 4, 2, 3)),
    "bn_no_affine": ("BatchNorm2d", (4,), {"affine": False, "momentum": 0.3}, (3, 4, 2, 3)),
    "bn_no_bias": ("BatchNorm1d", (5,), {"bias": False}, (8, 5)),
    "in1d": ("InstanceNorm1d", (4,), {}, (3, 4, 6)),
    "in1d_unbatched": ("InstanceNorm1d", (4,), {"affine": True}, (4, 6)),
    "in2d_tracked": ("InstanceNorm2d", (4,), {"affine": True, "track_running_stats": True}, (3, 4, 5, 3)),
    "in3d": ("InstanceNorm3d", (3,), {"affine": True}, (2, 3, 2, 3, 4)),
    "ln": ("LayerNorm", (6,), {}, (4, 3, 6)),
    "ln_2dims": ("LayerNorm", ((3, 6),), {"eps": 1e-3}, (4, 3, 6)),
    "ln_no_bias": ("LayerNorm", (6,), {"bias": False}, (4, 6)),
    "ln_no_affine": ("LayerNorm", (6,), {"elementwise_affine": False}, (4, 6)),
    "gn": ("GroupNorm", (2, 4), {}, (3, 4, 5, 3)),
    "gn_3d": ("GroupNorm", (3, 6), {"eps": 1e-4}, (2, 6, 7)),
    "gn_no_affine": ("GroupNorm", (1, 4), {"affine": False}, (3, 4, 5)),
    "rms": ("RMSNorm", (6,), {}, (4, 3, 6)),
    "rms_eps": ("RMSNorm", ((3, 6),), {"eps": 1e-4}, (4, 3, 6)),
    "rms_no_affine": ("RMSNorm", (6,), {"elementwise_affine": False}, (4, 6)),
}


def make(name, lib):
    cls, args, kwargs, shape = SPECS[name]
    return getattr(lib, cls)(*args, **kwargs), shape


def _randomize(module):
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p))


@pytest.mark.parametrize("name", SPECS)
def test_twin_over_training_steps_then_eval(name):
    theirs, shape = make(name, nn)
    ours, _ = make(name, N)
    _randomize(theirs)
    ours.load_state_dict(theirs.state_dict())
    assert repr(ours) == repr(theirs)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (ours, theirs) if list(m.parameters())]
    for step in range(4):
        x = torch.randn(shape) * 3 + 2
        xs = [x.clone().requires_grad_() for _ in range(2)]
        outs = [m(xi) for m, xi in zip((ours, theirs), xs)]
        assert_rel(outs[0], outs[1], what=f"{name} step {step} output")
        dy = torch.randn_like(outs[0])
        for o in outs:
            o.backward(dy)
        assert_rel(xs[0].grad, xs[1].grad, what=f"{name} step {step} input grad")
        for (k, p0), p1 in zip(ours.named_parameters(), theirs.parameters()):
            assert_rel(p0.grad, p1.grad, what=f"{name} step {step} grad of {k}")
        for (k, b0), b1 in zip(ours.named_buffers(), theirs.buffers()):
            assert_rel(b0.float(), b1.float(), what=f"{name} step {step} buffer {k}")
        for opt in opts:
            opt.step()
            opt.zero_grad()
    for m in (ours, theirs):
        m.eval()
    x = torch.randn(shape) * 3 + 2
    assert_rel(ours(x), theirs(x), what=f"{name} eval output")
    # state_dict both ways, with identical keys
    sd_ours, sd_theirs = ours.state_dict(), theirs.state_dict()
    assert list(sd_ours) == list(sd_theirs)
    fresh_theirs, _ = make(name, nn)
    fresh_theirs.load_state_dict(sd_ours)
    fresh_ours, _ = make(name, N)
    fresh_ours.load_state_dict(sd_theirs)
    for m in (fresh_theirs, fresh_ours):
        m.eval()
    assert_rel(fresh_ours(x), theirs(x), what=f"{name} loaded into ours")
    assert_rel(fresh_theirs(x), ours(x), what=f"{name} loaded into torch")


@pytest.mark.parametrize("name", SPECS)
def test_copies_survive(name):
    ours, shape = make(name, N)
    _randomize(ours)
    ours(torch.randn(shape))  # move running stats away from their init
    ours.eval()
    x = torch.randn(shape)
    ref = ours(x)
    buf = io.BytesIO()
    torch.save(ours, buf)
    buf.seek(0)
    copies = [copy.deepcopy(ours), pickle.loads(pickle.dumps(ours)), torch.load(buf, weights_only=False)]
    for c in copies:
        assert type(c) is type(ours)
        assert torch.equal(c(x), ref)


def _twins(name):
    ours, shape = make(name, N)
    theirs, _ = make(name, nn)
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs, shape


@pytest.mark.parametrize("name", [k for k, v in SPECS.items() if len(v[3]) in (4, 5)])
def test_channels_last_keeps_its_format(name):
    ours, theirs, shape = _twins(name)
    fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
    x = torch.randn(shape).contiguous(memory_format=fmt)
    y = ours(x)
    assert y.is_contiguous(memory_format=fmt)
    assert_rel(y, theirs(x.contiguous()), what=name)


@pytest.mark.parametrize("name", SPECS)
def test_non_contiguous_input(name):
    ours, theirs, shape = _twins(name)
    xt = torch.randn(tuple(reversed(shape))).permute(*reversed(range(len(shape))))
    assert not xt.is_contiguous()
    xs = [xt.clone().requires_grad_(), xt.contiguous().requires_grad_()]
    ys = [ours(xs[0]), theirs(xs[1])]
    assert_rel(ys[0], ys[1], what=name)
    for x, y in zip(xs, ys):
        y.backward(torch.ones_like(y).mul_(torch.arange(y.numel()).view_as(y) % 7))
    assert_rel(xs[0].grad, xs[1].grad, what=f"{name} grad")


def test_reset_and_extra_repr():
    bn = N.BatchNorm1d(3)
    bn(torch.randn(4, 3) + 5)
    bn.reset_running_stats()
    assert bn.running_mean.eq(0).all() and bn.running_var.eq(1).all() and int(bn.num_batches_tracked) == 0
    with torch.no_grad():
        bn.weight.fill_(3)
    bn.reset_parameters()
    assert bn.weight.eq(1).all() and bn.bias.eq(0).all()
    assert "momentum=0.1" in repr(bn)


def test_old_checkpoint_without_num_batches_tracked_loads():
    bn = N.BatchNorm1d(3)
    sd = bn.state_dict()
    del sd["num_batches_tracked"]
    sd._metadata[""]["version"] = 1
    bn.load_state_dict(sd)
    assert int(bn.num_batches_tracked) == 0


def test_train_eval_semantics_of_the_seed():
    bn = N.BatchNorm1d(2, momentum=None)
    batches = [torch.randn(10, 2, dtype=torch.float64) * s + m for s, m in ((1, 0), (2, 5), (3, -1))]
    bn.double()
    for b in batches:
        y = bn(b)  # train: batch statistics, mean ≈ 0 and biased var ≈ 1 per column
        assert torch.allclose(y.mean(0), torch.zeros(2, dtype=torch.float64), atol=1e-12)
    # momentum=None: running stats are the plain average of the batch statistics
    assert torch.allclose(bn.running_mean, torch.stack([b.mean(0) for b in batches]).mean(0))
    assert torch.allclose(bn.running_var, torch.stack([b.var(0) for b in batches]).mean(0))
    bn.eval()
    one = batches[0][:1]
    # eval: a sample's output no longer depends on its batch
    assert torch.allclose(bn(one), bn(batches[0])[:1])


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "module, x, match",
    [
        (N.BatchNorm2d(3), torch.randn(2, 3, 4), r"expects 4-D \(N, C, H, W\) input, got 3-D"),
        (N.BatchNorm1d(3), torch.randn(2, 4), r"expects 3 channels in dim 1"),
        (N.BatchNorm3d(3), torch.randn(2, 3, 4, 4), r"expects 5-D"),
        (N.InstanceNorm2d(3, affine=True), torch.randn(2, 4, 5, 5), r"expects 3 channels"),
        (N.InstanceNorm1d(3), torch.randn(2, 3, 4, 5), r"expects 3-D \(N, C, L\)"),
        (N.GroupNorm(2, 4), torch.randn(2, 6, 5), r"expects 4 channels"),
        (N.LayerNorm(4), torch.randn(2, 5), r"normalized_shape \(4,\)"),
        (N.RMSNorm(4), torch.randn(2, 5), r"normalized_shape \(4,\)"),
    ],
)
def test_shape_errors(module, x, match):
    with pytest.raises(ValueError, match=match):
        module(x)


def test_instance_norm_without_parameters_only_warns_on_channel_count():
    with pytest.warns(UserWarning, match="expects 3 channels"):
        N.InstanceNorm1d(3)(torch.randn(2, 4, 5))


def test_group_norm_checks_divisibility_at_construction():
    with pytest.raises(ValueError, match=r"num_groups=4 must divide num_channels=6; choose one of \[1, 2, 3, 6\]"):
        N.GroupNorm(4, 6)


@pytest.mark.parametrize(
    "x, exc",
    [
        (torch.randn(1, 3), ValueError),  # one value per channel
        (torch.randn(1, 3, 1), ValueError),
        (torch.ones(4, 3, dtype=torch.long), TypeError),
        (torch.randn(4, 2), ValueError),  # wrong channel count
    ],
)
def test_failed_batch_norm_call_changes_nothing(x, exc):
    bn = N.BatchNorm1d(3)
    bn(torch.randn(6, 3) * 2 + 1)
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    with pytest.raises(exc):
        bn(x)
    for k, v in bn.state_dict().items():
        assert torch.equal(v, before[k]), k
    # torch itself bumps num_batches_tracked before it raises; we do not
    tbn = nn.BatchNorm1d(3)
    with pytest.raises(ValueError):
        tbn(torch.randn(1, 3))
    assert int(tbn.num_batches_tracked) == 1


def test_num_features_must_be_positive():
    with pytest.raises(ValueError, match="num_features"):
        N.BatchNorm1d(0)


# ------------------------------------------------------------------ weight & cosine norm
def _linear_pair(dim):
    from torch.nn.utils.parametrizations import weight_norm as torch_weight_norm

    base = nn.Conv2d(3, 4, 3) if dim == 1 else nn.Linear(5, 4)
    theirs = torch_weight_norm(copy.deepcopy(base), dim=dim)
    ours = N.weight_norm(copy.deepcopy(base), dim=dim)
    return ours, theirs, (2, 3, 6, 6) if dim == 1 else (3, 5)


@pytest.mark.parametrize("dim", [0, 1, None])
def test_weight_norm_twin(dim):
    ours, theirs, shape = _linear_pair(dim)
    assert list(ours.state_dict()) == sorted(theirs.state_dict()) or set(ours.state_dict()) == set(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())
    with torch.no_grad():  # g away from ‖v‖ so the gradient of g is not trivial
        theirs.parametrizations.weight.original0.mul_(1.7)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(shape)
    y0, y1 = ours(x), theirs(x)
    assert_rel(y0, y1, what="weight norm output")
    dy = torch.randn_like(y0)
    y0.backward(dy)
    y1.backward(dy)
    p_ours, p_theirs = dict(ours.named_parameters()), dict(theirs.named_parameters())
    for k in p_theirs:
        assert_rel(p_ours[k].grad, p_theirs[k].grad, what=f"grad of {k}")
    theirs.load_state_dict(ours.state_dict())


def test_weight_norm_copies_and_removal():
    lin = N.weight_norm(nn.Linear(4, 3))
    x = torch.randn(2, 4)
    ref = lin(x)
    buf = io.BytesIO()
    torch.save(lin, buf)
    buf.seek(0)
    for c in (copy.deepcopy(lin), pickle.loads(pickle.dumps(lin)), torch.load(buf, weights_only=False)):
        assert torch.equal(c(x), ref)
        assert c.parametrizations.weight.original1 is not lin.parametrizations.weight.original1
    N.weight_norm(lin, "bias", dim=None)
    assert torch.allclose(lin(x), ref, atol=1e-6)
    N.remove_weight_norm(lin, "bias")
    N.remove_weight_norm(lin)
    assert type(lin) is nn.Linear and sorted(lin.state_dict()) == ["bias", "weight"]
    assert torch.allclose(lin(x), ref, atol=1e-6)


def test_weight_norm_errors():
    lin = N.weight_norm(nn.Linear(4, 3))
    with pytest.raises(ValueError, match="already weight-normed"):
        N.weight_norm(lin)
    with pytest.raises(ValueError, match="no parameter named 'kernel'"):
        N.weight_norm(nn.Linear(2, 2), "kernel")
    with pytest.raises(ValueError, match="not weight-normed"):
        N.remove_weight_norm(nn.Linear(2, 2))
    plain = nn.Linear(2, 2)
    with pytest.raises(IndexError, match="out of range"):
        N.weight_norm(plain, dim=3)
    assert type(plain) is nn.Linear and "parametrizations" not in plain._modules


@pytest.mark.parametrize("centered", [False, True])
def test_cosine_linear_module(centered):
    layer = N.CosineLinear(6, 3, centered=centered)
    x = torch.randn(4, 2, 6) * 100
    y = layer(x)
    assert y.shape == (4, 2, 3) and y.abs().max() <= 1 + 1e-6
    # scale invariance in x (and shift invariance when centered)
    x2 = 0.01 * x + (5.0 if centered else 0.0)
    assert torch.allclose(layer(x2), y, atol=1e-4)
    assert f"centered={centered}" in repr(layer)
    buf = io.BytesIO()
    torch.save(layer, buf)
    buf.seek(0)
    for c in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer)), torch.load(buf, weights_only=False)):
        assert torch.equal(c(x), y)
    xt = x.transpose(0, 1).contiguous().transpose(0, 1)  # non-contiguous, same values
    assert torch.allclose(layer(xt), y)
    with pytest.raises(ValueError, match="in_features >= 2"):
        N.CosineLinear(1, 3, centered=True)


@pytest.mark.parametrize("name", ["bn2d", "in2d_tracked"])
def test_graph_built_in_eval_survives_a_train_step(name):
    # teacher/student or consistency losses: the eval graph must keep the statistics it used,
    # although the train step then updates the running buffers in place
    ours, shape = make(name, N)
    theirs, _ = make(name, nn)
    _randomize(theirs)
    theirs.running_mean.uniform_(-1, 1)
    theirs.running_var.uniform_(0.5, 2)
    ours.load_state_dict(theirs.state_dict())
    frozen = copy.deepcopy(theirs).eval()  # the oracle for the eval branch: untouched buffers
    x = torch.randn(shape, requires_grad=True)
    ours.eval()
    y1 = ours(x)
    ours.train()
    y2 = ours(x)
    got = torch.autograd.grad((y1 * y1).sum() + (y2 * y2 * y2).sum(), x)[0]
    theirs.train()
    want = torch.autograd.grad((frozen(x) ** 2).sum() + (theirs(x) ** 3).sum(), x)[0]
    assert_rel(got, want, what=name)


def test_weight_norm_on_a_1d_parameter_matches_torch():
    from torch.nn.utils.parametrizations import weight_norm as torch_weight_norm

    ours = N.weight_norm(nn.BatchNorm1d(4), dim=0)
    theirs = torch_weight_norm(nn.BatchNorm1d(4), dim=0)
    assert ours.parametrizations.weight.original0.shape == theirs.parametrizations.weight.original0.shape
    theirs.load_state_dict(ours.state_dict())
    with torch.no_grad():
        for m in (ours, theirs):
            m.parametrizations.weight.original0.fill_(2.0)
            m.parametrizations.weight.original1.copy_(torch.tensor([1.0, -3.0, 0.5, 2.0]))
    assert torch.equal(ours.weight, theirs.weight)


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_batchnorm_batchrenorm_and_syncbatchnorm_update_running_statistics_by_one_rule(backend, dtype, momentum):
    # normlab.stats.update_running is the rule; BatchNorm's compiled core applies it in C++
    import normlab
    from normlab.distributed import SyncBatchNorm
    from normlab.stats import momentum_factor, update_running

    g = torch.Generator().manual_seed(0)
    xs = [(torch.randn(6, 3, 5, generator=g) * 3 + 100).to(dtype) for _ in range(3)]
    for make in (N.BatchNorm1d, N.BatchRenorm1d, SyncBatchNorm):
        m = make(3, momentum=momentum, dtype=dtype)
        rm, rv = m.running_mean.clone(), m.running_var.clone()
        with normlab.use_backend(backend):
            for t, x in enumerate(xs):
                m(x)
                xd = x.double()
                update_running(rm, rv, xd.mean((0, 2)), xd.var((0, 2)), momentum_factor(momentum, t))
                torch.testing.assert_close(m.running_mean, rm, msg=f"{make.__name__} running_mean")
                torch.testing.assert_close(m.running_var, rv, msg=f"{make.__name__} running_var")
        assert int(m.num_batches_tracked) == len(xs)


def test_load_state_dict_without_num_batches_tracked_keeps_the_count_as_torch():
    for make in (N.BatchNorm1d, nn.BatchNorm1d):
        m = make(3)
        for _ in range(4):
            m(torch.randn(5, 3))
        sd = m.state_dict()
        del sd["num_batches_tracked"]
        sd._metadata[""]["version"] = 1  # a checkpoint from before the count existed
        fresh = copy.deepcopy(m)
        fresh.load_state_dict(sd)
        assert int(fresh.num_batches_tracked) == 4, make


@pytest.mark.parametrize("key, value", [
    ("running_mean", torch.zeros(4)),            # wrong shape
    ("running_var", torch.ones(3, 1)),           # wrong dims
    ("running_var", torch.tensor([1.0, -1.0, 1.0])),  # a negative variance
    ("num_batches_tracked", torch.tensor(-2)),   # a negative count
    ("num_batches_tracked", torch.tensor(2.5)),  # not a count
    ("weight", torch.ones(2)),
])
def test_a_rejected_state_dict_writes_nothing(key, value):
    m = N.BatchNorm1d(3)
    m(torch.randn(6, 3) * 2 + 1)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    sd = {k: torch.full_like(v, 7) for k, v in before.items()}
    sd[key] = value
    with pytest.raises(RuntimeError, match=key):
        m.load_state_dict(sd)
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k


def _every_module_with_state():
    from normlab.distributed import SyncBatchNorm

    return {"LayerNorm": lambda: N.LayerNorm(3), "RMSNorm": lambda: N.RMSNorm(3), "GroupNorm": lambda: N.GroupNorm(1, 3),
            "InstanceNorm1d": lambda: N.InstanceNorm1d(3, affine=True, track_running_stats=True),
            "BatchRenorm1d": lambda: N.BatchRenorm1d(3), "SyncBatchNorm": lambda: SyncBatchNorm(3),
            "CosineLinear": lambda: N.CosineLinear(2, 3), "weight_norm": lambda: N.weight_norm(torch.nn.Linear(2, 3)),
            "in a Sequential": lambda: torch.nn.Sequential(N.weight_norm(torch.nn.Linear(2, 3)), N.LayerNorm(3))}


@pytest.mark.parametrize("name", list(_every_module_with_state()))
def test_every_module_loads_all_of_a_state_dict_or_nothing(name):
    """Every entry but one is good (7s): the bad one, wherever it comes, leaves every entry of the
    module holding it as it was (a torch container around it loads its other children, as torch does)."""
    m = _every_module_with_state()[name]()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    for bad in before:
        now = {k: v.clone() for k, v in m.state_dict().items()}
        sd = {k: torch.full_like(v, 7) for k, v in before.items()}
        sd[bad] = torch.ones(5, 5)
        with pytest.raises(RuntimeError, match=re.escape(bad)) as err:
            m.load_state_dict(sd)
        assert str(err.value).count("does not fit") == 1, err.value  # said once, by the module that refused
        mine = bad.split(".")[0] + "." if isinstance(m, torch.nn.Sequential) else ""
        for k, v in m.state_dict().items():
            assert torch.equal(v, now[k]) or not k.startswith(mine), (bad, k)
    m.load_state_dict({k: torch.full_like(v, 7) for k, v in before.items()})  # after refusals, a good load loads
    assert all(bool((v == 7).all()) for v in m.state_dict().values())


@pytest.mark.parametrize("call", [
    lambda: N.BatchNorm1d(3)([1.0, 2.0, 3.0]),
    lambda: N.InstanceNorm1d(3)([[1.0, 2.0, 3.0]]),
    lambda: N.BatchRenorm1d(3)([[1.0, 2.0, 3.0]]),
    lambda: N.weight_norm([1, 2]),
])
def test_what_is_not_a_tensor_or_a_module_is_a_type_error_that_says_so(call):
    with pytest.raises(TypeError, match="expect"):
        call()


# ------------------------------------------------------------------ zero-centred γ (offset)
@pytest.mark.parametrize("kind", ["rms", "layer"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_offset_scales_by_offset_plus_gamma_added_in_float32(kind, dtype):
    import normlab.functional as NF

    x = torch.randn(3, 5, 16) * 3 + 1
    w = torch.randn(16) * 1e-3  # near 0: 1 + w rounds to 1 in half precision, not in float32
    fn = NF.rms_norm if kind == "rms" else NF.layer_norm
    y = fn(x.to(dtype), (16,), w.to(dtype), eps=1e-6, offset=1.0)
    xd = x.to(dtype).double()
    xhat = (xd if kind == "rms" else xd - xd.mean(-1, keepdim=True))
    xhat = xhat * torch.rsqrt(xhat.square().mean(-1, keepdim=True) + 1e-6)
    want = xhat * (1 + w.to(dtype).double())
    assert y.dtype == dtype
    assert_rel(y, want, dtype)
    # the scale 1 + γ is applied in float32, then rounded once (Gemma's contract): the output is
    # the float64 result rounded, but in rare ties; a scale rounded to the dtype first (1 + 1e-3
    # is 1 in bfloat16) would move about one value in four
    if dtype != torch.float32:
        assert float((y != want.to(dtype)).float().mean()) < 0.01
    layer = (N.RMSNorm(16, eps=1e-6, offset=1.0) if kind == "rms" else N.LayerNorm(16, eps=1e-6, offset=1.0))
    assert torch.equal(layer.weight, torch.zeros(16))  # starts as the layer without γ
    assert_rel(layer(x), fn(x, (16,), eps=1e-6))


@pytest.mark.parametrize("kind", ["rms", "layer"])
def test_offset_gradients_match_float64_gradcheck(kind):
    import normlab.functional as NF

    fn = NF.rms_norm if kind == "rms" else NF.layer_norm
    x = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    w = (torch.randn(6, dtype=torch.float64) * 0.1).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, w: fn(x, (6,), w, eps=1e-6, offset=0.5), (x, w))


def test_offset_is_refused_where_it_cannot_hold():
    import normlab.functional as NF
    from normlab.convert import to_torch

    with pytest.raises(ValueError, match="weight is None"):
        NF.rms_norm(torch.randn(2, 4), (4,), None, offset=1.0)
    with pytest.raises(ValueError, match="finite"):
        NF.layer_norm(torch.randn(2, 4), (4,), torch.ones(4), offset=float("inf"))
    with pytest.raises(ValueError, match="elementwise_affine=False"):
        N.RMSNorm(4, elementwise_affine=False, offset=1.0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), N.RMSNorm(4, offset=1.0))
    with pytest.raises(ValueError, match=r"to_torch: '1' \(RMSNorm\): .*offset"):  # torch.nn.RMSNorm has no offset
        to_torch(model, inplace=True)
    assert type(model[1]) is N.RMSNorm
    with pytest.raises(RuntimeError, match="to_torch"):  # TorchScript: normlab's forward is Python
        torch.jit.script(model)
    assert type(model[1]) is N.RMSNorm


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_channel_norms_return_the_cores_strides_on_every_route(backend):
    # a permuted (not channels_last) input gives contiguous output, channels_last stays so
    import normlab
    from normlab.distributed import SyncBatchNorm

    permuted = torch.randn(5, 4, 3, 6).permute(1, 2, 0, 3)  # (4, 3, 5, 6), neither contiguous nor channels_last
    last = torch.randn(4, 3, 5, 6).contiguous(memory_format=torch.channels_last)
    with normlab.use_backend(backend):
        for m in (N.BatchNorm2d(3), N.BatchNorm2d(3).eval(), N.InstanceNorm2d(3), N.BatchRenorm2d(3), SyncBatchNorm(3)):
            assert m(permuted).is_contiguous(), m
            assert m(last).is_contiguous(memory_format=torch.channels_last), m
