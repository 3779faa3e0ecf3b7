"""Differential fuzz between routes: any call of a functional norm, good or bad, either succeeds on
every route with the same output or raises the same class with the same message on every route
(the compiled core, torch's op after normlab's checks, the reference)."""

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import normlab
import normlab.functional as F

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.int64]
ROUTES = ("auto", "torch", "reference")


@st.composite
def calls(draw):
    op = draw(st.sampled_from(["layer_norm", "rms_norm", "group_norm", "batch_norm", "instance_norm"]))
    shape = tuple(draw(st.lists(st.integers(0, 3), min_size=1, max_size=4)))
    dtype = draw(st.sampled_from(DTYPES))
    x = (torch.arange(max(1, torch.Size(shape).numel()), dtype=torch.float64).sin() * 3).reshape(-1)
    x = x[:torch.Size(shape).numel()].reshape(shape).to(dtype)
    c = shape[1] if len(shape) > 1 else 1

    def param(n):
        choice = draw(st.sampled_from(["none", "right", "wrong size", "float64", "float32"]))
        if choice == "none":
            return None
        size = n + 1 if choice == "wrong size" else n
        pd = {"float64": torch.float64, "float32": torch.float32}.get(choice, dtype if dtype.is_floating_point
                                                                         else torch.float32)
        return torch.linspace(0.5, 1.5, size, dtype=pd)

    eps = draw(st.sampled_from([1e-5, 0.0, -1.0]))
    if op in ("layer_norm", "rms_norm"):
        k = draw(st.integers(1, 2))
        normalized = tuple(shape[-k:]) if draw(st.booleans()) else (3,) * k
        d = torch.Size(normalized).numel()
        if op == "layer_norm":
            return op, (x, normalized, param(d), param(d), eps), {}
        return op, (x, normalized, param(d), eps if eps != -1.0 else None), {}
    if op == "group_norm":
        return op, (x, draw(st.integers(0, 3)), param(c), param(c), eps), {}
    stats = draw(st.booleans())
    rm = param(c) if stats else None
    rv = None if rm is None else rm.abs() + 1
    flag = draw(st.booleans())
    if op == "batch_norm":
        return op, (x, rm, rv, param(c), param(c), flag, 0.1, eps), {}
    return op, (x, rm, rv, param(c), param(c), flag, 0.1, eps), {}


def _run(op, args):
    cloned = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    try:
        return getattr(F, op)(*cloned), cloned
    except Exception as e:  # noqa: BLE001 - the class and message are what is compared
        return e, cloned


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(calls())
def test_every_route_gives_the_same_answer_or_the_same_error(call):
    op, args, _ = call
    results = {}
    for route in ROUTES:
        with normlab.use_backend(route):
            results[route] = _run(op, args)
    errors = {r: (type(v), str(v)) for r, (v, _) in results.items() if isinstance(v, Exception)}
    assert not errors or len(errors) == len(ROUTES), (op, errors, [a.shape if isinstance(a, torch.Tensor) else a
                                                                   for a in args])
    assert len(set(errors.values())) <= 1, (op, errors)
    if errors:
        for route, (_, after) in results.items():  # a refused call wrote nothing (running statistics)
            for a, b in zip(after, args):
                if isinstance(a, torch.Tensor):
                    assert torch.equal(a, b), (route, op)
        return
    y = results["auto"][0]
    for route in ROUTES[1:]:
        other = results[route][0]
        assert other.dtype == y.dtype and other.shape == y.shape, (route, op)
        tol = 2e-2 if y.dtype == torch.bfloat16 else 1e-4
        assert torch.allclose(other.double(), y.double(), atol=tol, rtol=tol, equal_nan=True), (route, op)
