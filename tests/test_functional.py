"""normlab.functional against torch.nn.functional, float64 gradcheck, numerics and errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as TF

import normlab.functional as F
import normlab.nn as N

from conftest import TOL, assert_rel


def _bn(x, w, b, mod):
    return mod.batch_norm(x, None, None, w, b, True)


def _bn_eval(x, w, b, mod):
    c = x.shape[1]
    rm = torch.linspace(-1, 1, c, dtype=x.dtype)
    rv = torch.linspace(0.5, 2, c, dtype=x.dtype)
    return mod.batch_norm(x, rm, rv, w, b, False)


# name: (op(x, w, b, module), input shape, parameter shape or None)
CASES = {
    "batch_norm_2d": (_bn, (7, 5), (5,)),
    "batch_norm_4d": (_bn, (3, 4, 5, 3), (4,)),
    "batch_norm_eval": (_bn_eval, (3, 4, 5), (4,)),
    "instance_norm": (lambda x, w, b, m: m.instance_norm(x, weight=w, bias=b), (3, 4, 5, 3), (4,)),
    "layer_norm": (lambda x, w, b, m: m.layer_norm(x, (5, 3), w, b), (3, 4, 5, 3), (5, 3)),
    "group_norm": (lambda x, w, b, m: m.group_norm(x, 2, w, b), (3, 4, 5, 3), (4,)),
    "group_norm_3d": (lambda x, w, b, m: m.group_norm(x, 3, w, b), (2, 6, 7), (6,)),
    "rms_norm": (lambda x, w, b, m: m.rms_norm(x, (6,), w), (4, 3, 6), (6,)),
    "rms_norm_eps": (lambda x, w, b, m: m.rms_norm(x, (3, 6), None, 1e-3), (4, 3, 6), None),
    "layer_norm_1d": (lambda x, w, b, m: m.layer_norm(x, (7,), w, b), (7,), (7,)),  # nothing to sum for dγ
    "layer_norm_noaffine": (lambda x, w, b, m: m.layer_norm(x, (6,)), (4, 3, 6), None),
}


def _inputs(shape, pshape, dtype, offset=0.0):
    x = (torch.randn(shape, dtype=torch.float64) * 2 + offset).to(dtype).requires_grad_()
    if pshape is None:
        return x, None, None
    w = torch.randn(pshape, dtype=torch.float64).to(dtype).requires_grad_()
    b = torch.randn(pshape, dtype=torch.float64).to(dtype).requires_grad_()
    return x, w, b


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", CASES)
def test_matches_torch_forward_and_backward(name, dtype):
    op, shape, pshape = CASES[name]
    x, w, b = _inputs(shape, pshape, dtype)
    ours = op(x, w, b, F)
    theirs = op(x, w, b, TF)
    assert ours.dtype == dtype
    assert_rel(ours, theirs, dtype, what=f"{name} forward")
    dy = torch.randn_like(ours)
    args = [t for t in (x, w, b) if t is not None]
    g_ours = torch.autograd.grad(ours, args, dy, allow_unused=True)
    g_theirs = torch.autograd.grad(theirs, args, dy, allow_unused=True)
    for i, (a, t) in enumerate(zip(g_ours, g_theirs)):
        if t is None:  # torch's rms_norm has no bias, etc.
            assert a is None or a.abs().max() == 0
            continue
        assert_rel(a, t, dtype, what=f"{name} grad[{i}]")


@pytest.mark.parametrize("name", CASES)
def test_gradcheck_and_gradgradcheck(name):
    op, shape, pshape = CASES[name]
    x, w, b = _inputs(shape, pshape, torch.float64)
    args = tuple(t for t in (x, w, b) if t is not None)

    def fn(*a):
        return op(*(list(a) + [None] * (3 - len(a))), F)

    assert torch.autograd.gradcheck(fn, args)
    assert torch.autograd.gradgradcheck(fn, args)


@pytest.mark.parametrize("center", [True, False])
def test_the_reference_differentiates_through_given_statistics(center):
    """Statistics that are functions of something (SyncBatchNorm's all-reduced moments) get the
    survey's eq. (5)-(6) as their gradients, in backward, double backward and forward mode;
    running buffers (no grad) still get none, and may be updated in place after the forward."""
    from normlab.autograd import normalize_affine

    g = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(s, generator=g, dtype=torch.float64).requires_grad_() for s in ((4, 3, 5), (3, 1), (3, 1)))
    m = torch.randn(3, 1, generator=g, dtype=torch.float64).requires_grad_()
    v = (torch.rand(3, 1, generator=g, dtype=torch.float64) + 0.5).requires_grad_()
    fn = lambda x, w, b, m, v: normalize_affine(x, (0, 2), w, b, 1e-5, center=center, fixed_mean=m, fixed_var=v)[0]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w, b, m, v), check_forward_ad=True)
    assert torch.autograd.gradgradcheck(fn, (x, w, b, m, v))
    rm, rv = m.detach().clone(), v.detach().clone()  # buffers
    y = fn(x, w, b, rm, rv)
    rm.add_(1.0)
    rv.mul_(2.0)
    y.sum().backward()  # the graph kept copies of the buffers
    assert x.grad is not None and rm.grad is None


def test_weight_norm_op_matches_torch_and_gradchecks():
    v = torch.randn(4, 3, 2, dtype=torch.float64, requires_grad=True)
    for dim in (0, 1, 2, -2, None, -1):
        if dim in (None, -1):
            g = torch.rand((), dtype=torch.float64) + 0.5
        else:
            gshape = [1] * 3
            gshape[dim] = v.shape[dim]
            g = torch.rand(gshape, dtype=torch.float64) + 0.5
        g.requires_grad_()
        ref = torch._weight_norm(v, g, -1 if dim is None else dim)
        assert_rel(F.weight_norm(v, g, dim), ref, torch.float64, what=f"weight_norm dim={dim}")
        assert torch.autograd.gradcheck(lambda v, g: F.weight_norm(v, g, dim), (v, g))
        assert torch.autograd.gradgradcheck(lambda v, g: F.weight_norm(v, g, dim), (v, g))


@pytest.mark.parametrize("centered", [False, True])
def test_cosine_linear_is_cosine_of_seed_eq_20_26(centered):
    x = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    y = F.cosine_linear(x, w, centered=centered, eps=0.0)
    xc = x - x.mean(-1, keepdim=True) if centered else x
    wc = w - w.mean(-1, keepdim=True) if centered else w
    ref = TF.cosine_similarity(xc[:, None, :], wc[None, :, :], dim=-1, eps=0)
    assert_rel(y, ref, torch.float64)
    if centered:  # eq. 26: (w−μw)·(x−μx) / (n σw σx) is the Pearson correlation
        n = x.shape[1]
        pearson = (xc @ wc.T) / (n * x.std(-1, correction=0)[:, None] * w.std(-1, correction=0)[None, :])
        assert_rel(y, pearson, torch.float64)
    assert y.abs().max() <= 1 + 1e-12
    assert torch.autograd.gradcheck(lambda x, w: F.cosine_linear(x, w, centered), (x, w))
    assert torch.autograd.gradgradcheck(lambda x, w: F.cosine_linear(x, w, centered), (x, w))


def test_zscore_reproduces_the_lesson_and_sklearn():
    f = torch.arange(1, 5, dtype=torch.float32).reshape(2, 2)
    assert torch.allclose(F.zscore(f), torch.tensor([[-0.7071, -0.7071], [0.7071, 0.7071]]), atol=1e-4)
    from sklearn.preprocessing import StandardScaler, minmax_scale

    x = torch.randn(50, 4, dtype=torch.float64) * 5 + 3
    x[:, 2] = 7.0  # constant column: scale 1, output 0
    ref = StandardScaler().fit_transform(x.numpy())
    assert torch.allclose(F.zscore(x, correction=0), torch.from_numpy(ref), atol=1e-12)
    assert torch.allclose(F.minmax(x), torch.from_numpy(minmax_scale(x.numpy())), atol=1e-12)
    assert torch.allclose(F.minmax(x, feature_range=(-1, 2)), torch.from_numpy(minmax_scale(x.numpy(), (-1, 2))), atol=1e-12)
    # along rows, and differentiable
    xr = x.T.contiguous().requires_grad_()
    assert torch.allclose(F.zscore(xr, dim=1, correction=0), torch.from_numpy(ref.T), atol=1e-12)
    F.zscore(xr, dim=1).sum().backward()
    assert xr.grad is not None


def test_scalings_gradcheck():
    x = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: F.zscore(t), (x,))
    assert torch.autograd.gradgradcheck(lambda t: F.zscore(t, dim=1, correction=0, eps=1e-3), (x,))
    assert torch.autograd.gradcheck(lambda t: F.minmax(t, feature_range=(-1, 1)), (x,))


def test_scaling_errors():
    with pytest.raises(ValueError, match="feature_range"):
        F.minmax(torch.randn(3, 2), feature_range=(1, 0))
    with pytest.raises(ValueError, match="correction"):
        F.zscore(torch.randn(1, 2))


# ------------------------------------------------------------------------------ numerics
OFFSET_CASES = ["batch_norm_4d", "layer_norm", "group_norm", "instance_norm"]


@pytest.mark.parametrize("name", OFFSET_CASES)
def test_huge_offset_fp32_matches_float64_on_same_values(name):
    op, shape, pshape = CASES[name]
    x32 = (torch.randn(shape) * 1.0 + 1e4).float()
    ours = op(x32, None, None, F)
    ref = op(x32.double(), None, None, F)  # float64 on exactly the same (rounded) values
    assert (ours.double() - ref).abs().max() < 1e-2


def test_huge_offset_running_var():
    x = (torch.randn(64, 8, dtype=torch.float64) * 0.5 + 1e4).float()
    rm, rv = torch.zeros(8), torch.ones(8)
    F.batch_norm(x, rm, rv, training=True, momentum=1.0)
    ref = x.double().var(0)
    assert ((rv.double() - ref).abs() / ref).max() < 1e-3


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", CASES)
def test_half_precision_same_dtype_close_to_fp32(name, dtype):
    op, shape, pshape = CASES[name]
    x, w, b = _inputs(shape, pshape, torch.float32)
    low = op(*(t.detach().to(dtype) if t is not None else None for t in (x, w, b)), F)
    assert low.dtype == dtype
    high = op(*(t.detach().to(dtype).float() if t is not None else None for t in (x, w, b)), F)
    assert (low.float() - high).abs().max() <= TOL[dtype] * max(1.0, float(high.abs().max()))


# -------------------------------------------------------------------------------- errors
def test_integer_input_is_a_type_error():
    with pytest.raises(TypeError, match="floating-point"):
        F.layer_norm(torch.ones(2, 3, dtype=torch.long), (3,))
    with pytest.raises(TypeError, match="Tensor"):
        F.rms_norm([1.0, 2.0], (2,))


@pytest.mark.parametrize(
    "call",
    [
        lambda: F.layer_norm(torch.empty(2, 0), (0,)),
        lambda: F.zscore(torch.empty(0, 3)),
        lambda: F.minmax(torch.empty(0, 3)),
    ],
)
def test_statistics_over_nothing_are_a_clear_value_error(call):
    with pytest.raises(ValueError, match="empty"):
        call()


@pytest.mark.parametrize(
    "call, ref",
    [
        (lambda m: m.layer_norm(torch.empty(0, 3), (3,)), (0, 3)),
        (lambda m: m.rms_norm(torch.empty(0, 2, 3), (3,)), (0, 2, 3)),
        (lambda m: m.group_norm(torch.empty(0, 4, 2), 2), (0, 4, 2)),
        (lambda m: m.instance_norm(torch.empty(0, 4, 2)), (0, 4, 2)),
        (lambda m: m.batch_norm(torch.empty(0, 3), torch.zeros(3), torch.ones(3)), (0, 3)),
    ],
)
def test_an_empty_batch_passes_through_as_in_torch(call, ref):
    # no statistic is computed over an empty set here: torch returns an empty output
    assert call(F).shape == call(TF).shape == ref


def test_batch_norm_one_value_per_channel_changes_nothing():
    rm, rv = torch.randn(3), torch.rand(3) + 0.5
    before = rm.clone(), rv.clone()
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        F.batch_norm(torch.randn(1, 3), rm, rv, training=True)
    assert torch.equal(rm, before[0]) and torch.equal(rv, before[1])
    with pytest.raises(ValueError, match="running_mean and running_var are required"):  # eval
        F.batch_norm(torch.randn(2, 3), None, None, training=False)


@pytest.mark.parametrize("training", [True, False])
def test_running_statistics_that_require_grad_are_refused_as_torch_does(training):
    x = torch.randn(4, 3)
    rm, rv = torch.zeros(3, requires_grad=True), torch.ones(3, requires_grad=True)
    with pytest.raises(RuntimeError):
        TF.batch_norm(x, rm, rv, training=training)
    with pytest.raises(ValueError, match=r"running_mean requires grad.*running_mean\.detach\(\)"):
        F.batch_norm(x, rm, rv, training=training)
    assert torch.equal(rm, torch.zeros(3)) and torch.equal(rv, torch.ones(3))
    with torch.no_grad():  # no graph: nothing to refuse, as in torch
        assert_rel(F.batch_norm(x, rm, rv, training=training), TF.batch_norm(x, rm, rv, training=training))


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: F.layer_norm(torch.randn(2, 3), (4,)), r"trailing dims"),
        (lambda: F.layer_norm(torch.randn(2, 3), (3,), torch.ones(4)), r"weight must have shape \(3,\)"),
        (lambda: F.batch_norm(torch.randn(2, 3), torch.zeros(4), torch.ones(4), training=True), r"running_mean must have shape \(3,\)"),
        (lambda: F.group_norm(torch.randn(2, 6, 3), 4), r"num_groups=4 must divide the 6"),
        (lambda: F.instance_norm(torch.randn(2, 3)), r"at least 3-D"),
        (lambda: F.instance_norm(torch.randn(2, 3, 1), torch.zeros(3), torch.ones(3)), r"more than 1 value per channel"),
        (lambda: F.instance_norm(torch.randn(2, 3, 4), use_input_stats=False), r"required"),
        (lambda: F.cosine_linear(torch.randn(2, 3), torch.randn(4, 5)), r"\(out_features, 3\)"),
    ],
)
def test_shape_errors_name_the_expected_shape(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_channels_last_and_non_contiguous_inputs():
    x = torch.randn(3, 4, 5, 6).contiguous(memory_format=torch.channels_last)
    for name in ("batch_norm_4d", "group_norm", "instance_norm"):
        op = CASES[name][0]
        y = op(x, None, None, F)
        assert y.is_contiguous(memory_format=torch.channels_last), name
        assert_rel(y, op(x.contiguous(), None, None, TF), what=name)
    xt = torch.randn(6, 5, 4, 3).permute(3, 2, 1, 0)  # non-contiguous (3, 4, 5, 6)
    for name in ("batch_norm_4d", "group_norm", "instance_norm"):
        op = CASES[name][0]
        assert_rel(op(xt, None, None, F), op(xt.contiguous(), None, None, TF), what=name)
    assert_rel(F.layer_norm(xt, (5, 6)), TF.layer_norm(xt.contiguous(), (5, 6)), what="layer_norm")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_rms_norm_default_eps_is_that_of_the_accumulation_dtype(dtype):
    # small-RMS rows make eps visible: torch uses float32's eps for half inputs
    x = (torch.randn(4, 8) * 0.05).to(dtype)
    ours, theirs = F.rms_norm(x, (8,)), TF.rms_norm(x, (8,))
    ref = TF.rms_norm(x.float(), (8,), eps=torch.finfo(torch.float32).eps)
    assert (ours.float() - ref).abs().max() <= 3e-2 * ref.abs().max()
    assert (ours.float() - theirs.float()).abs().max() <= 3e-2 * ref.abs().max()


@pytest.mark.parametrize("backend", ["core", "reference"])
def test_constant_channel_centres_to_zero_even_with_tiny_eps(backend):
    # normlab's statistics (not torch's, which leave 0.05 here): the corrected two-pass mean
    # removes its own rounding error
    import normlab
    from normlab import kernels

    if backend == "core" and kernels.core() is None:
        pytest.skip("the compiled core is not built on this machine")
    x = torch.full((4, 3, 3, 3), 3.3)
    with normlab.use_backend("auto" if backend == "core" else backend):
        assert F.batch_norm(x, None, None, training=True, eps=1e-12).abs().max() == 0
        assert F.group_norm(x, 3, eps=1e-12).abs().max() == 0
        assert F.layer_norm(x, (3, 3), eps=1e-12).abs().max() == 0


def test_weight_norm_over_no_dims_and_dim_range():
    v = torch.randn(5, dtype=torch.float64, requires_grad=True)
    g = torch.rand(5, dtype=torch.float64, requires_grad=True)
    assert_rel(F.weight_norm(v, g, 0), torch._weight_norm(v, g, 0), torch.float64)
    assert torch.autograd.gradcheck(lambda v, g: F.weight_norm(v, g, 0), (v, g))
    with pytest.raises(IndexError, match="dim=2 is out of range"):
        F.weight_norm(torch.randn(3, 4), torch.ones(3, 1), 2)


@pytest.mark.parametrize("name", ["batch_norm_4d", "layer_norm", "group_norm", "rms_norm", "instance_norm"])
def test_torch_func_transforms(name):
    # per-sample gradients (vmap over grad) and Jacobians, as with torch.nn.functional
    from torch.func import grad, jacrev, vmap

    op, shape, pshape = CASES[name]
    x, w, b = (t.detach() if t is not None else None for t in _inputs(shape, pshape, torch.float64))

    def loss(mod):
        return lambda xi: op(xi.unsqueeze(0) if name != "batch_norm_4d" else xi, w, b, mod).pow(3).sum()

    if name == "batch_norm_4d":  # batch statistics couple the samples: plain grad and jacobian
        assert_rel(grad(loss(F))(x), grad(loss(TF))(x), torch.float64)
        assert_rel(jacrev(lambda t: op(t, w, b, F))(x), jacrev(lambda t: op(t, w, b, TF))(x), torch.float64)
    else:
        assert_rel(vmap(grad(loss(F)))(x), vmap(grad(loss(TF)))(x), torch.float64)


# ---------------------------------------------------------------- torch.nn's semantics at the edges

@pytest.mark.parametrize("backend", ["auto", "reference", "torch"])
def test_an_empty_batch_in_training_gives_an_empty_output_and_leaves_the_running_statistics(backend):
    import normlab

    with normlab.use_backend(backend):
        for shape in [(0, 3), (0, 3, 4), (0, 3, 2, 2)]:
            rm, rv = torch.full((3,), 0.5), torch.full((3,), 2.0)
            x = torch.randn(shape, requires_grad=True)
            w, b = torch.randn(3, requires_grad=True), torch.randn(3, requires_grad=True)
            y = F.batch_norm(x, rm, rv, w, b, training=True)
            want = torch.nn.functional.batch_norm(x, rm.clone(), rv.clone(), w, b, training=True)
            assert y.shape == want.shape == shape
            assert torch.equal(rm, torch.full((3,), 0.5)) and torch.equal(rv, torch.full((3,), 2.0))
            dw, db = torch.autograd.grad(y.sum(), (w, b))
            assert torch.equal(dw, torch.zeros(3)) and torch.equal(db, torch.zeros(3))
        assert F.batch_norm(torch.randn(0), None, None, training=True).shape == (0,)
        assert F.instance_norm(torch.randn(2, 3, 0)).shape == (2, 3, 0)  # as torch: empty instances
        m = N.BatchNorm1d(3)
        assert m(torch.randn(0, 3)).shape == (0, 3) and int(m.num_batches_tracked) == 1  # as torch.nn's
        with pytest.raises(ValueError, match="more than 1 value per channel"):
            F.batch_norm(torch.randn(1, 3), None, None, training=True)


@pytest.mark.parametrize("backend", ["auto", "reference", "torch"])
def test_layer_rms_and_group_norm_of_an_empty_input_are_in_the_graph_of_their_parameters(backend):
    import normlab

    w, b = torch.randn(5, requires_grad=True), torch.randn(5, requires_grad=True)
    with normlab.use_backend(backend):
        for y, params in [(F.layer_norm(torch.randn(0, 5), (5,), w, b), (w, b)), (F.rms_norm(torch.randn(0, 5), (5,), w), (w,)),
                          (F.group_norm(torch.randn(0, 5, 3), 5, w, b), (w, b))]:
            assert y.numel() == 0
            for g in torch.autograd.grad(y.sum(), params):
                assert torch.equal(g, torch.zeros(5))


@pytest.mark.parametrize("backend", ["auto", "reference", "torch"])
@pytest.mark.parametrize("op", ["batch_norm", "instance_norm"])
def test_eps_must_be_positive_for_batch_norm_training_and_non_negative_elsewhere(backend, op):
    import normlab

    x, rm, rv = torch.randn(4, 3, 5), torch.zeros(3), torch.ones(3)
    call = {"batch_norm": lambda t, e: F.batch_norm(x, rm, rv, training=t, eps=e),
            "instance_norm": lambda t, e: F.instance_norm(x, rm, rv, use_input_stats=t, eps=e)}[op]
    with normlab.use_backend(backend):
        for eps in (0.0, -1e-5) if op == "batch_norm" else (-1e-5,):  # torch's InstanceNorm takes ε = 0
            with pytest.raises(ValueError, match="eps must be positive" if op == "batch_norm" else "non-negative"):
                call(True, eps)
        assert torch.equal(rm, torch.zeros(3)) and torch.equal(rv, torch.ones(3))
        with pytest.raises(ValueError, match="eps must be non-negative"):
            call(False, -1e-5)
        assert torch.isfinite(call(False, 0.0)).all()  # as torch: eps = 0 is fine with running statistics


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("shape", [(4, 3), (4, 3, 5), (4, 3, 2, 2)])
def test_an_infinity_in_a_batch_reaches_the_running_statistics_as_in_torch(backend, shape):
    import normlab

    x = torch.randn(shape)
    x[1, 0] = float("inf")
    rm, rv, trm, trv = torch.zeros(3), torch.ones(3), torch.zeros(3), torch.ones(3)
    with normlab.use_backend(backend):
        y = F.batch_norm(x, rm, rv, training=True)
    want = torch.nn.functional.batch_norm(x, trm, trv, training=True)
    torch.testing.assert_close(y, want, equal_nan=True)
    torch.testing.assert_close(rm, trm, equal_nan=True)
    torch.testing.assert_close(rv, trv, equal_nan=True)


@pytest.mark.parametrize("backend", ["auto", "reference", "torch"])
@pytest.mark.parametrize("call", [
    lambda: F.layer_norm(torch.randn(2, 3), (3,), weight=torch.ones(4)),
    lambda: F.layer_norm(torch.randn(2, 3), (4,)),
    lambda: F.rms_norm(torch.randn(2, 3), (3,), weight=torch.ones(2)),
    lambda: F.group_norm(torch.randn(2, 6, 3), 4),
    lambda: F.group_norm(torch.randn(2, 6, 3), 3, bias=torch.ones(5)),
    lambda: F.batch_norm(torch.randn(4, 3), torch.zeros(2), torch.ones(2)),
    lambda: F.instance_norm(torch.randn(4, 3, 5), weight=torch.ones(4)),
    lambda: N.BatchNorm2d(3)(torch.randn(2, 4, 3, 3)),
])
def test_shapes_that_do_not_fit_raise_what_code_written_for_torch_catches(backend, call):
    import normlab
    from normlab.errors import ShapeError

    with normlab.use_backend(backend), pytest.raises(ShapeError) as err:
        call()
    assert isinstance(err.value, ValueError) and isinstance(err.value, RuntimeError)
    assert "must" in str(err.value) or "expects" in str(err.value)


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("op", ["batch_norm", "instance_norm"])
@pytest.mark.parametrize("unwritable", ["expanded", "inference"])
def test_running_statistics_are_updated_all_or_nothing(backend, op, unwritable):
    import normlab

    if unwritable == "expanded":
        rv = torch.ones(1).expand(3)
    else:
        with torch.inference_mode():
            rv = torch.ones(3)
    rm = torch.zeros(3)
    x = torch.randn(4, 3, 5)
    call = (lambda: F.batch_norm(x, rm, rv, training=True)) if op == "batch_norm" else \
        (lambda: F.instance_norm(x, rm, rv, use_input_stats=True))
    with normlab.use_backend(backend), pytest.raises(ValueError, match=r"running_var cannot be updated in place"):
        call()
    assert torch.equal(rm, torch.zeros(3)) and torch.equal(rv, torch.ones(3))  # neither was written


@pytest.mark.parametrize("backend", ["auto", "reference", "torch"])
@pytest.mark.parametrize("make, shape", [(lambda: N.BatchNorm2d(3), (2, 3, 4, 4)), (lambda: N.LayerNorm(4), (2, 4)),
                                         (lambda: N.RMSNorm(4), (2, 4)), (lambda: N.GroupNorm(1, 3), (2, 3, 4)),
                                         (lambda: N.InstanceNorm1d(3, affine=True), (2, 3, 4))])
def test_parameters_on_another_device_say_how_to_bring_them_together(backend, make, shape):
    import normlab

    with torch.device("meta"):  # how large models are built before their weights are loaded
        on_meta = make()
    with normlab.use_backend(backend):
        with pytest.raises(ValueError, match=r"is on meta .* module\.to_empty\(device=input\.device\)"):
            on_meta(torch.randn(shape))
        with pytest.raises(ValueError, match=r"is on cpu but the input is on meta; .* module\.to\(input\.device\)"):
            make()(torch.randn(shape, device="meta"))
        assert on_meta(torch.randn(shape, device="meta")).shape == shape  # meta with meta traces shapes


@pytest.mark.parametrize("op", [lambda x: F.layer_norm(x, (8,)), lambda x: F.rms_norm(x, (8,)),
                                lambda x: F.batch_norm(x, None, None, training=True),
                                lambda x: F.group_norm(x, 2)])
def test_the_reference_path_squares_huge_values_without_overflow_as_the_kernels(op):
    # float32 squares overflow above ~1.8e19: the reference scales before squaring, so both
    # paths (and so every layout and transform) give the same answer
    import normlab
    from normlab.kernels import build

    if not build.status()["loaded"]:
        pytest.skip("one path only without the compiled core: torch's ops (which overflow here)")

    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(0)) * 1e19
    with normlab.use_backend("reference"):
        ref = op(x)
    assert torch.isfinite(ref).all()
    torch.testing.assert_close(ref, op(x), rtol=1e-5, atol=1e-5)


_JVP_OPS = {
    "batch_norm train": lambda m, x, w, b: m.batch_norm(x, torch.zeros(3, dtype=x.dtype), torch.ones(3, dtype=x.dtype),
                                                       w, b, True),
    "batch_norm eval": lambda m, x, w, b: m.batch_norm(x, torch.full((3,), 0.3, dtype=x.dtype),
                                                      torch.full((3,), 1.7, dtype=x.dtype), w, b, False),
    "layer_norm": lambda m, x, w, b: m.layer_norm(x, (5,)),
    "group_norm": lambda m, x, w, b: m.group_norm(x, 3, w, b),
    "instance_norm": lambda m, x, w, b: m.instance_norm(x, weight=w, bias=b),
    "rms_norm": lambda m, x, w, b: m.rms_norm(x, (5,)),
}


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("name", list(_JVP_OPS))
def test_forward_mode_ad_equals_torch_in_training_and_eval(backend, name):
    # torch.func.jvp and jacfwd take the reference path (NormalizeAffine.jvp), forward_ad the core's
    import torch.autograd.forward_ad as fwAD

    import normlab

    f = _JVP_OPS[name]
    g = torch.Generator().manual_seed(0)
    primals = (torch.randn(4, 3, 5, generator=g, dtype=torch.float64), torch.randn(3, generator=g, dtype=torch.float64),
               torch.randn(3, generator=g, dtype=torch.float64))
    tangents = tuple(torch.randn(p.shape, generator=g, dtype=torch.float64) for p in primals)
    _, want = torch.func.jvp(lambda *p: f(TF, *p), primals, tangents)
    with normlab.use_backend(backend):
        _, got = torch.func.jvp(lambda *p: f(F, *p), primals, tangents)
        with fwAD.dual_level():
            dual = fwAD.unpack_dual(f(F, *(fwAD.make_dual(p, t) for p, t in zip(primals, tangents)))).tangent
        jac = torch.func.jacfwd(lambda x: f(F, x, *primals[1:]))(primals[0])
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(dual, want)
    torch.testing.assert_close(jac, torch.func.jacfwd(lambda x: f(TF, x, *primals[1:]))(primals[0]))
