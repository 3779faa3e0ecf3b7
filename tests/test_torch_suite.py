"""torch's own test samples for its norm modules, run on normlab's.

``torch.testing._internal.common_modules.module_db`` holds a ``ModuleInfo`` per torch.nn module:
the constructor arguments and inputs torch tests each module on (``module_inputs_func``), and the
inputs it must refuse (``module_error_inputs_func``). For every norm module normlab replaces,
every sample, in training and eval, in float64 and float32, this runs the torch.nn module and
normlab's of the same name side by side from the same state and compares what torch's own
``test_modules.py`` checks: outputs, gradients of the input and the parameters, running
statistics and the whole ``state_dict`` after the call, pickling, a non-contiguous copy of the
input, ``channels_last`` input, and that the error inputs torch's module refuses are refused
with an error of the type torch raises (normlab's :class:`~normlab.errors.ShapeError` counts as
torch's RuntimeError) and the ones it accepts are accepted. The
samples come from the installed torch; nothing of its test code is copied here.
"""

from __future__ import annotations

import pickle

import pytest
import torch

import normlab.nn as N

# the test extra installs expecttest, which torch's test helpers import: no silent skip
from torch.testing._internal import common_modules  # noqa: E402

NAMES = ("BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d",
         "LayerNorm", "GroupNorm", "RMSNorm")
INFOS = [mi for mi in common_modules.module_db if mi.module_cls.__name__ in NAMES
         and mi.module_cls.__module__.startswith("torch.nn")]
TOL = {torch.float64: {"rtol": 1e-9, "atol": 1e-10}, torch.float32: {"rtol": 1e-4, "atol": 2e-5}}


def _samples():
    for mi in INFOS:
        for training in (True, False):
            for dtype in (torch.float64, torch.float32):
                for i, s in enumerate(mi.module_inputs_func(mi, device="cpu", dtype=dtype, requires_grad=True,
                                                            training=training)):
                    mode = "train" if training else "eval"
                    yield pytest.param(mi, s, training, dtype,
                                       id=f"{mi.module_cls.__name__}-{mode}-{str(dtype)[6:]}-{i}-{s.desc or 'plain'}")


SAMPLES = list(_samples())


def test_every_norm_module_that_normlab_replaces_has_torch_samples():
    assert {mi.module_cls.__name__ for mi in INFOS} == set(NAMES)
    assert len(SAMPLES) > 200


def _pair(mi, sample, training, dtype):
    """torch's module and normlab's, in the same state (random parameters and statistics)."""
    ctor = sample.constructor_input
    torch.manual_seed(0)
    theirs = mi.module_cls(*ctor.args, **ctor.kwargs).to(dtype)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, t in theirs.state_dict().items():
            if t.is_floating_point():
                t.copy_(torch.rand(t.shape, generator=g, dtype=dtype) + 0.5 if "var" in name or name == "weight"
                        else torch.randn(t.shape, generator=g, dtype=dtype))
    ours = getattr(N, mi.module_cls.__name__)(*ctor.args, **ctor.kwargs).to(dtype)
    ours.load_state_dict(theirs.state_dict())
    theirs.train(training)
    ours.train(training)
    return theirs, ours


def _inputs(sample, transform=lambda t: t):
    def one(a):
        if not isinstance(a, torch.Tensor):
            return a
        return transform(a.detach().clone()).requires_grad_(a.requires_grad)
    return [one(a) for a in sample.forward_input.args], {k: one(v) for k, v in sample.forward_input.kwargs.items()}


def _noncontiguous(t):
    """The same values in memory with gaps (every other element of a twice-as-wide tensor)."""
    if t.dim() == 0:
        return t
    wide = torch.stack([t, torch.full_like(t, float("nan"))], dim=-1)
    return wide[..., 0]


def _run(module, args, kwargs):
    out = module(*args, **kwargs)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=out.dtype)
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad] + \
             [p for p in module.parameters() if p.requires_grad]
    grads = torch.autograd.grad(out, leaves, grad, allow_unused=True) if leaves and out.requires_grad else []
    return out, grads


def _same(theirs, ours, dtype, what):
    assert type(theirs) is type(ours) or (theirs is None) == (ours is None), what
    if isinstance(theirs, torch.Tensor):
        assert ours.shape == theirs.shape and ours.dtype == theirs.dtype, what
        torch.testing.assert_close(ours, theirs, equal_nan=True, msg=lambda m: f"{what}: {m}", **TOL[dtype])


@pytest.mark.parametrize("mi, sample, training, dtype", SAMPLES)
def test_torch_samples_give_torch_outputs_gradients_and_state(mi, sample, training, dtype):
    for label, transform in [("contiguous", lambda t: t), ("non-contiguous", _noncontiguous)]:
        theirs, ours = _pair(mi, sample, training, dtype)
        args, kwargs = _inputs(sample, transform)
        targs, tkwargs = _inputs(sample, transform)
        want, want_grads = _run(theirs, targs, tkwargs)
        got, got_grads = _run(ours, args, kwargs)
        _same(want, got, dtype, f"{label} output")
        assert len(got_grads) == len(want_grads)
        for i, (a, b) in enumerate(zip(want_grads, got_grads)):
            _same(a, b, dtype, f"{label} gradient {i}")
        sd_t, sd_o = theirs.state_dict(), ours.state_dict()
        assert list(sd_t) == list(sd_o)
        for k in sd_t:  # running statistics and num_batches_tracked after the call
            if sd_t[k].is_floating_point():
                _same(sd_t[k], sd_o[k], dtype, f"{label} state {k}")
            else:
                assert torch.equal(sd_t[k], sd_o[k]), k


@pytest.mark.parametrize("mi, sample, training, dtype", [p for p in SAMPLES if p.values[3] == torch.float32])
def test_torch_samples_in_channels_last_and_after_pickling(mi, sample, training, dtype):
    theirs, ours = _pair(mi, sample, training, dtype)
    x = sample.forward_input.args[0] if sample.forward_input.args else None
    if isinstance(x, torch.Tensor) and x.dim() in (4, 5) and mi.module_cls.__name__ not in ("LayerNorm", "RMSNorm"):
        fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        args, kwargs = _inputs(sample, lambda t: t.contiguous(memory_format=fmt))
        targs, tkwargs = _inputs(sample, lambda t: t.contiguous(memory_format=fmt))
        want, want_grads = _run(theirs, targs, tkwargs)
        got, got_grads = _run(ours, args, kwargs)
        _same(want, got, dtype, "channels_last output")
        for i, (a, b) in enumerate(zip(want_grads, got_grads)):
            _same(a, b, dtype, f"channels_last gradient {i}")
    again = pickle.loads(pickle.dumps(ours))
    assert type(again) is type(ours) and again.training == ours.training
    for k, v in ours.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k
    ours.eval(), again.eval()
    args, kwargs = _inputs(sample)
    with torch.no_grad():
        torch.testing.assert_close(again(*args, **kwargs), ours(*args, **kwargs))


@pytest.mark.parametrize("mi, sample, training, dtype", [p for p in SAMPLES if p.values[3] == torch.float64])
def test_torch_samples_pass_gradcheck_and_gradgradcheck(mi, sample, training, dtype):
    # float64, first and second derivatives w.r.t. the input and the parameters, as torch's
    # test_grad and test_gradgrad check its own modules (the same running statistics each call)
    _, ours = _pair(mi, sample, training, dtype)
    args, kwargs = _inputs(sample)
    params = [p for p in ours.parameters() if p.requires_grad]
    tensors = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad] + params
    if not tensors:
        pytest.skip("nothing requires a gradient")
    buffers = {k: v.clone() for k, v in ours.named_buffers()}

    def f(*ts):
        it = iter(ts)
        call_args = [next(it) if isinstance(a, torch.Tensor) and a.requires_grad else a for a in args]
        given = {n: next(it) for n, p in ours.named_parameters() if p.requires_grad}
        # fresh copies of the buffers each call: the same statistics, and nothing a call saved
        # for backward (torch's own op saves the running ones) is written afterwards
        given.update({k: v.clone() for k, v in buffers.items()})
        return torch.func.functional_call(ours, given, tuple(call_args), kwargs)

    assert torch.autograd.gradcheck(f, tensors, fast_mode=True)
    assert torch.autograd.gradgradcheck(f, tensors, fast_mode=True)


def _error_samples():
    for mi in INFOS:
        if mi.module_error_inputs_func is None:
            continue
        for training in (True, False):
            for i, e in enumerate(mi.module_error_inputs_func(mi, device="cpu", dtype=torch.float32,
                                                              requires_grad=False, training=training)):
                yield pytest.param(mi, e, training, id=f"{mi.module_cls.__name__}-{'train' if training else 'eval'}-{i}")


@pytest.mark.parametrize("mi, err, training", list(_error_samples()))
def test_torch_error_samples_are_refused_as_torch_refuses_them(mi, err, training):
    # the oracle is what torch's module does with the sample in this mode (its generator offers
    # eps=0 in eval too, which torch's BatchNorm accepts with running statistics)
    sample = err.module_error_input
    ctor = sample.constructor_input

    def call(cls):
        m = cls(*ctor.args, **ctor.kwargs)
        m.train(training)
        args, kwargs = _inputs(sample)
        return m(*args, **kwargs)

    try:
        call(mi.module_cls)
    except err.error_type:
        _same_error_on_every_route(lambda: call(getattr(N, mi.module_cls.__name__)), err.error_type)
    else:
        call(getattr(N, mi.module_cls.__name__))


def _same_error_on_every_route(call, error_type):
    """``call`` raises ``error_type`` on every route (the compiled core, torch's op after normlab's
    checks, the reference), with one class and one message."""
    import normlab

    seen = {}
    for backend in ("auto", "torch", "reference"):
        with normlab.use_backend(backend), pytest.raises(error_type) as got:
            call()
        seen[backend] = (type(got.value), str(got.value))
    assert len(set(seen.values())) == 1, seen


# --------------------------------------------- torch.nn.functional: the OpInfo samples (op_db)

from torch.testing._internal import common_methods_invocations as common_methods  # noqa: E402
OPS = {f"nn.functional.{n}": n for n in ("layer_norm", "batch_norm", "group_norm", "instance_norm", "rms_norm")}
OP_INFOS = [op for op in common_methods.op_db if op.name in OPS and not op.variant_test_name]


def _op_samples():
    for op in OP_INFOS:
        for dtype in (torch.float64, torch.float32, torch.bfloat16):
            for i, s in enumerate(op.sample_inputs("cpu", dtype, requires_grad=dtype != torch.bfloat16)):
                yield pytest.param(op, s, dtype, id=f"{OPS[op.name]}-{str(dtype)[6:]}-{i}")


def _clone(v, dtype=None):
    if isinstance(v, torch.Tensor):
        v = v.detach().clone() if dtype is None or not v.is_floating_point() else v.detach().to(dtype)
        return v.requires_grad_(v.is_floating_point() and v.requires_grad or False)
    return v


def _op_call(fn, s, dtype=None):
    """``fn`` on (a copy of) the sample, its floating tensors in ``dtype`` if given: the output,
    the gradients of what requires grad, and the running statistics as the call left them."""
    def one(v):
        c = _clone(v, dtype)
        if isinstance(v, torch.Tensor) and v.requires_grad:
            c.requires_grad_()
        return c
    x, args, kwargs = one(s.input), [one(a) for a in s.args], {k: one(v) for k, v in s.kwargs.items()}
    y = fn(x, *args, **kwargs)
    leaves = [t for t in [x, *args, *kwargs.values()] if isinstance(t, torch.Tensor) and t.requires_grad]
    grads = torch.autograd.grad(y, leaves, torch.ones_like(y), allow_unused=True) if leaves and y.requires_grad else []
    buffers = [t for t in [*args, *kwargs.values()] if isinstance(t, torch.Tensor) and not t.requires_grad]
    return [("output", [y]), ("gradient", list(grads)), ("buffer", buffers)]


def test_every_functional_norm_has_torch_samples():
    assert {OPS[op.name] for op in OP_INFOS} == set(OPS.values())


@pytest.mark.parametrize("op, s, dtype", list(_op_samples()))
def test_torch_functional_samples_give_torch_outputs_gradients_and_running_statistics(op, s, dtype):
    # normlab's value passes where it is close to torch's, or, in float32/bfloat16, no farther
    # from the float64 answer than torch's own (normlab's float64 statistics are often nearer)
    import normlab.functional as F

    want, got = _op_call(op.op, s), _op_call(getattr(F, OPS[op.name]), s)
    truth = _op_call(op.op, s, torch.float64) if dtype != torch.float64 else want
    tol = TOL.get(dtype, {"rtol": 1.6e-2, "atol": 1e-2})
    for (what, a), (_, b), (_, t64) in zip(want, got, truth):
        assert len(a) == len(b), what
        for i, (t, o, r) in enumerate(zip(a, b, t64)):
            assert (t is None) == (o is None), what
            if t is None:
                continue
            assert o.dtype == t.dtype and o.shape == t.shape, what
            if not torch.allclose(o, t, equal_nan=True, **tol):
                r, err_ours, err_torch = r.double(), (o.double() - r.double()).abs(), (t.double() - r.double()).abs()
                bound = err_torch + tol["atol"] + tol["rtol"] * r.abs()
                assert bool((err_ours <= bound).all()), f"{what} {i}: {err_ours.max()} from float64, torch {err_torch.max()}"


# torch's error samples of layer_norm are its native op's (the same arguments)
ERROR_OPS = {**OPS, "native_layer_norm": "layer_norm"}


def _op_errors():
    for op in common_methods.op_db:
        if op.name in ERROR_OPS and not op.variant_test_name and op.error_inputs_func is not None:
            for i, e in enumerate(op.error_inputs("cpu")):
                yield pytest.param(ERROR_OPS[op.name], e, id=f"{op.name}-{i}")


def test_torch_has_error_samples_for_the_functional_norms():
    assert {name for name, _ in (p.values for p in _op_errors())} >= {"layer_norm", "group_norm", "rms_norm"}


@pytest.mark.parametrize("name, e", list(_op_errors()))
def test_torch_functional_error_samples_are_refused_with_torch_error_type_on_every_route(name, e):
    import normlab.functional as F

    s = e.sample_input  # normlab's errors for what torch calls a RuntimeError are RuntimeErrors too
    _same_error_on_every_route(lambda: getattr(F, name)(s.input, *s.args, **s.kwargs), e.error_type)
