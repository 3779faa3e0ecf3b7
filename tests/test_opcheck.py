"""torch.library.opcheck on every operator normlab registers (torch.ops.normlab.*): schema and
mutation annotations, autograd registration, fake tensors and AOT dispatch."""

import pytest
import torch
from torch.library import opcheck
from torch.utils._python_dispatch import TorchDispatchMode

import normlab.functional as F

pytest.importorskip("cpu_kernels", reason="the compiled core is not available")  # the operators live in it

OPS = torch.ops.normlab


def _leaf(*shape, grad=True):
    return torch.randn(*shape, dtype=torch.float64).requires_grad_(grad)


def _public_samples():
    x, w, b = _leaf(4, 6, 5), _leaf(6), _leaf(6)
    xc = _leaf(4, 6, 3, 3, grad=False).to(memory_format=torch.channels_last).requires_grad_()
    stats = lambda: (torch.zeros(6, dtype=torch.float64), torch.ones(6, dtype=torch.float64))  # noqa: E731
    return {
        "layer_norm": (OPS.layer_norm.default, (_leaf(4, 5), [5], _leaf(5), _leaf(5), 1e-5)),
        "layer_norm 2 dims, no affine": (OPS.layer_norm.default, (_leaf(3, 4, 5), [4, 5], None, None, 1e-5)),
        "rms_norm": (OPS.rms_norm.default, (_leaf(4, 5), [5], _leaf(5), None)),
        "group_norm": (OPS.group_norm.default, (x, 3, w, b, 1e-5)),
        "group_norm channels_last": (OPS.group_norm.default, (xc, 2, w, b, 1e-5)),
        "batch_norm training": (OPS.batch_norm.default, (x, *stats(), w, b, True, 0.1, 1e-5)),
        "batch_norm training channels_last": (OPS.batch_norm.default, (xc, *stats(), w, b, True, 0.1, 1e-5)),
        "batch_norm eval": (OPS.batch_norm.default, (x, *stats(), w, b, False, 0.1, 1e-5)),
        "instance_norm": (OPS.instance_norm.default, (x, None, None, w, b, True, 0.1, 1e-5)),
        "instance_norm with statistics": (OPS.instance_norm.default, (x, *stats(), None, None, True, 0.1, 1e-5)),
        "batch_stats": (OPS.batch_stats.default, (x,)),
        "batch_stats channels_last": (OPS.batch_stats.default, (xc,)),
        "batch_norm_apply, statistics requiring grad": (
            OPS.batch_norm_apply.default, (x, _leaf(6), _leaf(6, grad=False).abs().add(0.5).requires_grad_(), w, b,
                                           1e-5)),
        "batch_norm_apply channels_last, no affine": (OPS.batch_norm_apply.default, (xc, *stats(), None, None, 0.0)),
        "update_running": (OPS.update_running.default, (*stats(), *stats(), 0.1)),
    }


# The public operators' autograd is C++ planning over concrete sizes; torch.compile reaches them
# through normlab's decomposition route (normlab.kernels), not with symbolic shapes
PUBLIC_TESTS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_static")


@pytest.mark.parametrize("name", list(_public_samples()))
def test_public_operators_pass_opcheck(name):
    op, args = _public_samples()[name]
    opcheck(op, args, test_utils=PUBLIC_TESTS)


class _Recorder(TorchDispatchMode):
    """The first call of each normlab operator below the public ones, with its arguments."""

    def __init__(self):
        super().__init__()
        self.calls = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "normlab":
            self.calls.setdefault(func, (args, kwargs or {}))
        return func(*args, **(kwargs or {}))


def _form_calls():
    rec = _Recorder()
    with rec:
        for _, (op, args) in _public_samples().items():
            y = op(*args)
            for t in (y if isinstance(y, tuple) else (y,)):
                if t is not None and t.requires_grad:
                    t.sum().backward(retain_graph=True)
    return rec.calls


def _reference_samples():
    """The reference as operators (normlab::formula, formula_backward: what the core runs where it
    has no kernel), on the forms' views: rows (R/g, g, D/seg, seg) over (2, 3), channels (N, C, S)
    over (0, 2) with and without fixed statistics, RMS (no centring)."""
    rows, pr = _leaf(3, 2, 2, 5), [2, 1, 1]
    chans, pc = _leaf(4, 6, 5), [6, 1]
    fixed = (torch.zeros(6, 1, dtype=torch.float64), torch.rand(6, 1, dtype=torch.float64) + 0.5)
    return {
        "formula rows": (OPS.formula.default, (rows, [2, 3], _leaf(*pr), _leaf(*pr), 1e-5, True, None, None)),
        "formula rms": (OPS.formula.default, (rows, [2, 3], _leaf(*pr), None, 1e-5, False, None, None)),
        "formula channels eval": (OPS.formula.default, (chans, [0, 2], _leaf(*pc), _leaf(*pc), 1e-5, True, *fixed)),
        "formula_backward rows": (OPS.formula_backward.default,
                                  (_leaf(3, 2, 2, 5), rows, [2, 3], _leaf(*pr), 1e-5, True, None, None, pr)),
        "formula_backward channels, no weight": (OPS.formula_backward.default,
                                                 (_leaf(4, 6, 5), chans, [0, 2], None, 1e-5, True, None, None, pc)),
        "formula_backward eval": (OPS.formula_backward.default,
                                  (_leaf(4, 6, 5), chans, [0, 2], _leaf(*pc), 1e-5, True, *fixed, pc)),
    }


@pytest.mark.parametrize("name", list(_reference_samples()))
def test_reference_operators_pass_opcheck(name):
    op, args = _reference_samples()[name]
    opcheck(op, args)


def test_every_operator_is_checked():
    registered = {s.name.split("::")[1] for s in torch._C._jit_get_all_schemas() if s.name.startswith("normlab::")}
    public = {op.__name__.split(".")[0] for op, _ in _public_samples().values()}
    forms = {f.__name__.split(".")[0] for f in _form_calls()}
    reference = {op.__name__.split(".")[0] for op, _ in _reference_samples().values()}
    assert registered == public | forms | reference, registered ^ (public | forms | reference)


@pytest.mark.parametrize("name", ["rows_forward", "rows_backward", "channels_forward", "channels_backward",
                                  "channels_stats", "channels_eval", "channels_eval_backward", "groups_forward", "groups_backward"])
def test_form_operators_pass_opcheck_with_the_arguments_the_norms_give_them(name):
    calls = {f.__name__.split(".")[0]: (f, a, k) for f, (a, k) in _form_calls().items()}
    func, args, kwargs = calls[name]
    opcheck(func, tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args), kwargs)


def test_the_functional_layer_calls_the_checked_operators():
    rec = _Recorder()
    with rec:
        F.layer_norm(torch.randn(2, 5), (5,))
    assert any(f.__name__.startswith("rows_forward") for f in rec.calls)
