"""Fast kernels against their reference (same signatures), dispatch, backends and torch.compile."""

import copy
import os
import subprocess
import sys

import pytest
import torch

import normlab
import normlab.functional as F
import normlab.nn as nln
from normlab import kernels
from normlab.autograd import normalize_affine
from normlab.kernels import reference

import cpu_kernels as cpu
from conftest import TOL, assert_rel

NAN = float("nan")

# (R, D, groups, seg): LayerNorm/RMS rows, GroupNorm (groups of seg-long channels), InstanceNorm
ROWS = [(37, 131, 1, 1), (700, 37, 1, 1), (1, 7, 1, 1), (24, 150, 4, 50), (48, 49, 6, 49), (15, 3 * 17, 5, 17), (6, 1, 6, 1),
        (1200, 9, 3, 1), (40, 8, 4, 1)]  # the last two: GroupNorm on (N, C), one value per channel
# (N, C, S): BatchNorm over (N, S) per channel; S == 1 is the (M, C) layout (2-D, channels_last)
CHANNELS = [(8, 5, 33), (2, 3, 7), (301, 7, 1), (3, 130, 1), (1, 4, 9),
            # short runs (2×2 to 5×5 maps), which run whole vectors across channels: S below one
            # vector, one vector (16 lanes) with an odd N·C, between one and two vectors
            (5, 3, 4), (3, 5, 16), (2, 3, 25)]
# fp16/bf16 compute in float32 (statistics in float64), as the reference does
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


@pytest.fixture
def poisoned():
    """Every output a kernel allocates starts as NaN (torch's deterministic mode fills fresh memory):
    an element a kernel forgets to write shows."""
    was, fill = torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(was)
    torch.utils.deterministic.fill_uninitialized_memory = fill


def _data(shape, dtype, offset, seed=0):
    g = torch.Generator().manual_seed(sum(shape) + 1000 * seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * 3 + offset).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("center", [True, False])
@pytest.mark.parametrize("offset", [0.0, 1e4])
@pytest.mark.parametrize("R, D, groups, seg", ROWS)
def test_rows_kernels_equal_the_reference(poisoned, R, D, groups, seg, offset, center, dtype):
    if D == 1 and not center and (dtype != torch.float64 or offset):
        # RMS over one value: dx = r·g·(1 − x̂²) with x̂² = 1 − ε/x², all cancellation (condition
        # number x²/ε: 1e13 at x ≈ 1e4); two correct orders of the same sums disagree there
        # beyond float32's 1e-5 and float64's 1e-10 (nor does torch do better)
        pytest.skip("ill-conditioned")
    x = _data((R, D), dtype, offset)
    P = groups * (D // seg)
    w, b = _data((P,), dtype, 1.0, seed=1), _data((P,), dtype, 0.0, seed=2)
    got = cpu.rows_forward(x, w, b, 1e-5, center, groups, seg)
    want = reference.rows_forward(x, w, b, 1e-5, center, groups, seg)
    for g_, w_, name in zip(got, want, ("y", "mean", "var")):
        assert_rel(g_, w_, dtype, what=name)
    var = want[2]
    dy = _data((R, D), dtype, 0.0, seed=3)
    for g_, w_, name in zip(cpu.rows_backward(dy, x, want[1], var, w, 1e-5, center, groups, seg),
                            reference.rows_backward(dy, x, want[1], var, w, 1e-5, center, groups, seg),
                            ("dx", "dw", "db")):
        assert_rel(g_, w_, dtype, what=name)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("offset", [0.0, 1e4])
@pytest.mark.parametrize("shape", CHANNELS)
def test_channels_kernels_equal_the_reference(poisoned, shape, offset, dtype):
    x = _data(shape, dtype, offset)
    C = shape[1]
    w, b = _data((C,), dtype, 1.0, seed=1), _data((C,), dtype, 0.0, seed=2)
    got = cpu.channels_forward(x, w, b, 1e-5)
    want = reference.channels_forward(x, w, b, 1e-5)
    for g_, w_, name in zip(got, want, ("y", "mean", "var")):
        assert_rel(g_, w_, dtype, what=name)
    for g_, w_, name in zip(cpu.channels_stats(x), reference.channels_stats(x), ("mean alone", "var alone")):
        assert_rel(g_, w_, dtype, what=name)
        assert torch.equal(g_, got[1 if name == "mean alone" else 2])  # the same sums as the fused kernel's
    var = want[2]
    dy = _data(shape, dtype, 0.0, seed=3)
    for g_, w_, name in zip(cpu.channels_backward(dy, x, want[1], var, w, 1e-5),
                            reference.channels_backward(dy, x, want[1], var, w, 1e-5), ("dx", "dw", "db")):
        assert_rel(g_, w_, dtype, what=name)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("shape", CHANNELS)
def test_eval_kernel_from_running_statistics_equals_the_reference(poisoned, shape, affine, dtype):
    x = _data(shape, dtype, 1e4)
    C = shape[1]
    mean = _data((C,), dtype, 1e4, seed=1)
    var = _data((C,), dtype, 0.0, seed=2).abs() + 0.1
    w, b = (_data((C,), dtype, 1.0, seed=3), _data((C,), dtype, 0.0, seed=4)) if affine else (None, None)
    assert_rel(cpu.channels_eval(x, mean, var, w, b, 1e-5), reference.channels_eval(x, mean, var, w, b, 1e-5), dtype)
    dy = _data(shape, dtype, 0.0, seed=5)
    for got, want, what in zip(cpu.channels_eval_backward(dy, x, mean, var, w, 1e-5),
                               reference.channels_eval_backward(dy, x, mean, var, w, 1e-5), ("dx", "dw", "db")):
        assert_rel(got, want, dtype, what=what)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N, S, C, groups", [(3, 50, 12, 4), (2, 7, 6, 6), (4, 33, 8, 1), (1, 1, 12, 3)])
def test_channels_last_group_kernels_equal_the_reference(poisoned, N, S, C, groups, dtype):
    x = _data((N, S, C), dtype, 1e4)
    w, b, dy = _data((C,), dtype, 1.0, seed=1), _data((C,), dtype, 0.0, seed=2), _data((N, S, C), dtype, 0.0, seed=3)
    want = reference.groups_forward(x, w, b, 1e-5, groups)
    for got, ref, what in zip(cpu.groups_forward(x, w, b, 1e-5, groups), want, ("y", "mean", "var")):
        assert_rel(got, ref, dtype, what=what)
    var = want[2]
    for got, ref, what in zip(cpu.groups_backward(dy, x, want[1], var, w, 1e-5, groups),
                              reference.groups_backward(dy, x, want[1], var, w, 1e-5, groups), ("dx", "dw", "db")):
        assert_rel(got, ref, dtype, what=what)


def test_kernels_without_parameters_and_with_non_finite_input():
    x = torch.randn(4, 9)
    y, mean, var = cpu.rows_forward(x, None, None, 1e-5, True, 1, 1)
    assert_rel(y, reference.rows_forward(x, None, None, 1e-5, True, 1, 1)[0])
    x[1, 3] = NAN
    x[2, 0] = float("inf")
    y = cpu.rows_forward(x, None, None, 1e-5, True, 1, 1)[0]
    assert torch.isnan(y[1]).all() and torch.isnan(y[2]).all() and torch.isfinite(y[[0, 3]]).all()
    y = cpu.channels_forward(x.view(4, 9, 1), None, None, 1e-5)[0]
    assert torch.isnan(y[:, 3]).all() and torch.isfinite(y[:, 1]).all()


# ----------------------------------------------------------------------------- through the ops

OPS = {
    "layer_norm": (lambda x, w, b: F.layer_norm(x, x.shape[-2:], w, b), lambda s: s[-2:], (5, 3, 7)),
    "rms_norm": (lambda x, w, b: F.rms_norm(x, x.shape[-1:], w), lambda s: s[-1:], (6, 33)),
    "group_norm": (lambda x, w, b: F.group_norm(x, 3, w, b), lambda s: s[1:2], (4, 6, 5, 3)),
    "instance_norm": (lambda x, w, b: F.instance_norm(x, weight=w, bias=b), lambda s: s[1:2], (3, 4, 11)),
    "instance_norm 4-D": (lambda x, w, b: F.instance_norm(x, weight=w, bias=b), lambda s: s[1:2], (3, 4, 5, 6)),
    "group_norm 5-D": (lambda x, w, b: F.group_norm(x, 2, w, b), lambda s: s[1:2], (2, 6, 3, 4, 5)),
    "batch_norm 2-D": (lambda x, w, b: F.batch_norm(x, None, None, w, b, True), lambda s: s[1:2], (17, 5)),
    "batch_norm 4-D": (lambda x, w, b: F.batch_norm(x, None, None, w, b, True), lambda s: s[1:2], (3, 4, 5, 6)),
    "batch_norm 5-D": (lambda x, w, b: F.batch_norm(x, None, None, w, b, True), lambda s: s[1:2], (2, 3, 2, 3, 4)),
    "batch_norm eval": (lambda x, w, b: F.batch_norm(x, torch.linspace(1, 3, x.shape[1], dtype=x.dtype),
                                                     torch.linspace(0.5, 2, x.shape[1], dtype=x.dtype),
                                                     w, b, False), lambda s: s[1:2], (3, 4, 5, 6)),
    "batch_norm eval 2-D": (lambda x, w, b: F.batch_norm(x, torch.linspace(1, 3, x.shape[1], dtype=x.dtype),
                                                         torch.linspace(0.5, 2, x.shape[1], dtype=x.dtype),
                                                         w, b, False), lambda s: s[1:2], (9, 4)),
}


def _run(fn, x, w, b, backend):
    xs, ws, bs = (t.detach().clone().requires_grad_() for t in (x, w, b))
    with kernels.use_backend(backend):
        y = fn(xs, ws, bs)
        y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(7)))
    return y.detach(), xs.grad, ws.grad, bs.grad


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("name", list(OPS))
def test_every_op_takes_a_kernel_and_agrees_with_the_reference(name, channels_last):
    fn, pshape, shape = OPS[name]
    x = torch.randn(shape) * 2 + 3
    if channels_last:
        if x.dim() not in (4, 5):
            pytest.skip("channels_last needs 4-D or 5-D input")
        x = x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    w, b = torch.randn(pshape(shape)), torch.randn(pshape(shape))
    fast = _run(fn, x, w, b, "auto")
    ref = _run(fn, x, w, b, "reference")
    for got, want, what in zip(fast, ref, ("y", "dx", "dw", "db")):
        if name == "rms_norm" and what == "db":
            continue
        assert_rel(got, want, what=f"{name} {what}")
    assert fast[0].is_contiguous(memory_format=torch.channels_last) == x.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("name", list(OPS))
def test_outputs_of_kernels_can_be_modified_in_place(name):
    fn, pshape, shape = OPS[name]
    x = torch.randn(shape, requires_grad=True)
    w, b = torch.randn(pshape(shape), requires_grad=True), torch.randn(pshape(shape), requires_grad=True)
    y = torch.relu_(fn(x, w, b))  # nn.ReLU(inplace=True) after a norm
    y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


class _Ops(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the operators a call runs, with their canonical shape arguments."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "normlab":
            self.seen.append((func.__name__.split(".")[0], *[a for a in args if isinstance(a, list)]))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("call, forms", [
    (lambda: F.layer_norm(torch.randn(4, 8), (8,)), [("rows_forward", [4, 8])]),
    (lambda: F.layer_norm(torch.randn(2, 8, 4).transpose(1, 2), (8,)), [("rows_forward", [8, 8])]),  # copied once
    (lambda: F.group_norm(torch.randn(2, 6, 4, 5), 3), [("rows_forward", [6, 40])]),
    (lambda: F.instance_norm(torch.randn(2, 3, 5)), [("rows_forward", [6, 5])]),
    (lambda: F.batch_norm(torch.randn(4, 3, 5), None, None, training=True), [("channels_forward", [4, 3, 5], [])]),
    (lambda: F.batch_norm(torch.randn(4, 3), None, None, training=True), [("channels_forward", [4, 3, 1], [])]),
    (lambda: F.batch_norm(torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last), None, None,
                          training=True), [("channels_forward", [40, 3, 1], [0, 2, 3, 1])]),
    (lambda: F.batch_norm(torch.randn(4, 3, 5), torch.zeros(3), torch.ones(3)), [("channels_eval", [4, 3, 5], [])]),
    (lambda: F.group_norm(torch.randn(2, 6, 4, 5).contiguous(memory_format=torch.channels_last), 3),
     [("groups_forward", [2, 20, 6], [0, 2, 3, 1])]),
])
def test_each_norm_is_one_kernel_of_its_canonical_form(call, forms):
    with _Ops() as ops:
        call()
    assert ops.seen == forms


def test_vmap_and_grad_transforms_use_the_reference():
    x = torch.randn(5, 3, 8)
    per_sample = torch.func.vmap(lambda t: F.layer_norm(t, (8,)))(x)
    assert_rel(per_sample, torch.nn.functional.layer_norm(x, (8,)))


@pytest.mark.parametrize("name", ["layer_norm", "batch_norm 4-D", "batch_norm eval", "group_norm"])
def test_batched_gradients_equal_one_vector_at_a_time(name):
    # autograd.grad(is_grads_batched=True) runs the backward under vmap: the kernels cannot
    # read its batched tensors, so the written-out formula runs instead
    fn, pshape, shape = OPS[name]
    g = torch.Generator().manual_seed(8)
    x = (torch.randn(shape, generator=g) * 2 + 3).requires_grad_()
    w, b = (torch.randn(pshape(shape), generator=g).requires_grad_() for _ in range(2))
    y = fn(x, w, b)
    vs = torch.randn((3, *y.shape), generator=g)
    batched = torch.autograd.grad(y, (x, w, b), vs, is_grads_batched=True, retain_graph=True)
    for i, v in enumerate(vs):
        for got, want in zip(batched, torch.autograd.grad(y, (x, w, b), v, retain_graph=True)):
            assert_rel(got[i], want, what=name)


@pytest.mark.parametrize("name", ["layer_norm", "batch_norm 4-D", "batch_norm eval", "group_norm"])
def test_compiled_func_grad_equals_torch(name):
    # torch.func.grad under torch.compile takes the reference path; dynamo's needs_input_grad
    # can be stale there (dx came back as zeros when γ was differentiated too)
    torch._dynamo.reset()
    fn, pshape, shape = OPS[name]
    g = torch.Generator().manual_seed(9)
    x = torch.randn(shape, generator=g) * 3 + 2
    w, b = torch.randn(pshape(shape), generator=g), torch.randn(pshape(shape), generator=g)
    F_torch = {
        "layer_norm": lambda x, w, b: torch.nn.functional.layer_norm(x, x.shape[-2:], w, b),
        "batch_norm 4-D": lambda x, w, b: torch.nn.functional.batch_norm(x, None, None, w, b, True),
        "batch_norm eval": lambda x, w, b: torch.nn.functional.batch_norm(
            x, torch.linspace(1, 3, x.shape[1]), torch.linspace(0.5, 2, x.shape[1]), w, b, False),
        "group_norm": lambda x, w, b: torch.nn.functional.group_norm(x, 3, w, b),
    }[name]
    for argnums in (0, (0, 1, 2)):
        got = torch.compile(torch.func.grad(lambda x, w, b: fn(x, w, b).pow(3).sum(), argnums), backend="aot_eager")(x, w, b)
        want = torch.func.grad(lambda x, w, b: F_torch(x, w, b).pow(3).sum(), argnums)(x, w, b)
        for gt, wt in zip(got if isinstance(argnums, tuple) else [got], want if isinstance(argnums, tuple) else [want]):
            assert_rel(gt, wt, tol=1e-4, what=f"{name} argnums={argnums}")


def test_double_backward_falls_back_to_the_written_out_formula():
    x = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda a, b: F.layer_norm(a, (5,), b), (x, w))


@pytest.mark.parametrize("grads", ["x", "x w b", "w b"])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("shape", [(3, 5, 7, 2), (11, 6)])
def test_eval_with_gradients_takes_the_kernel_and_is_exact(poisoned, shape, affine, grads):
    # x far from 0, running statistics with digits that a careless float32 path loses (forward
    # and in dγ): both paths against float64 truth on the same values
    if not affine and grads == "w b":
        pytest.skip("nothing requires a gradient")
    g = torch.Generator().manual_seed(5)
    C = shape[1]
    x = torch.randn(shape, generator=g) * 3 + 1e4
    mean = (torch.randn(C, generator=g, dtype=torch.float64) + 1e4 + 1e-3 / 3).float()
    var = (torch.rand(C, generator=g, dtype=torch.float64) * 9 + 0.5).float()
    w, b = (torch.randn(C, generator=g), torch.randn(C, generator=g)) if affine else (None, None)
    dy = torch.randn(shape, generator=g)

    def run(backend, dtype):
        leaves = [t.to(dtype, copy=True).requires_grad_(name in grads.split()) if t is not None else None
                  for t, name in ((x, "x"), (w, "w"), (b, "b"))]
        xs, ws, bs = leaves
        with kernels.use_backend(backend):
            y = F.batch_norm(xs, mean.to(dtype), var.to(dtype), ws, bs, False)
            y.backward(dy.to(dtype))
        return [y.detach()] + [t.grad for t in leaves if t is not None and t.requires_grad]

    truth = run("reference", torch.float64)
    for backend in ("auto", "reference"):
        for got, want in zip(run(backend, torch.float32), truth):
            assert got.dtype == torch.float32
            assert_rel(got, want, what=f"{backend} eval {grads}")


def test_double_backward_of_eval_with_the_kernel_is_exact():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(4, 3, 5, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(3, dtype=torch.float64, generator=g, requires_grad=True)
    rm, rv = torch.randn(3, dtype=torch.float64, generator=g), torch.rand(3, dtype=torch.float64, generator=g) + 0.5
    assert torch.autograd.gradcheck(lambda a, b: F.batch_norm(a, rm, rv, b, b, False), (x, w))
    assert torch.autograd.gradgradcheck(lambda a, b: F.batch_norm(a, rm, rv, b, b, False), (x, w))


# ----------------------------------------------------------------------------- backends


def test_backend_switching_and_errors():
    assert normlab.get_backend() == "auto"
    x = torch.randn(4, 6)
    with normlab.use_backend("torch"):
        assert normlab.get_backend() == "torch"
        assert torch.equal(F.layer_norm(x, (6,)), torch.nn.functional.layer_norm(x, (6,)))
        assert kernels.core() is None
    assert normlab.get_backend() == "auto" and kernels.core() is not None
    previous = normlab.set_backend("reference")
    try:
        assert previous == "auto" and kernels.core() is None
    finally:
        normlab.set_backend(previous)
    with pytest.raises(ValueError, match="reference"):
        normlab.set_backend("cuda")


def test_torch_backend_routes_every_op_to_torch_and_keeps_our_checks():
    x = torch.randn(4, 6, 3, 3)
    rm, rv = torch.zeros(6), torch.ones(6)
    rm2, rv2 = rm.clone(), rv.clone()
    with normlab.use_backend("torch"):
        y = F.batch_norm(x, rm, rv, training=True)
        with pytest.raises(ValueError, match="divide"):
            F.group_norm(x, 4)
        assert torch.equal(F.instance_norm(x), torch.nn.functional.instance_norm(x))
        assert torch.equal(F.group_norm(x, 3), torch.nn.functional.group_norm(x, 3))
        assert torch.equal(F.rms_norm(x, (3,)), torch.nn.functional.rms_norm(x, (3,)))
    assert torch.equal(y, torch.nn.functional.batch_norm(x, rm2, rv2, training=True))
    assert torch.equal(rm, rm2) and torch.equal(rv, rv2)


def test_environment_variable_sets_the_backend_for_the_process():
    code = "import normlab; print(normlab.get_backend())"
    env = {**os.environ, "NORMLAB_BACKEND": "reference"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "reference"
    env["NORMLAB_BACKEND"] = "fastest"
    bad = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "fastest" in bad.stderr


@pytest.mark.parametrize("mode", ["auto", "operators", "fuse"])
def test_modules_compile_without_graph_breaks(mode, monkeypatch):
    torch._dynamo.reset()
    monkeypatch.setattr(kernels, "COMPILE", normlab.get_compile_mode())  # restored after the test
    assert normlab.set_compile_mode(mode) in kernels.COMPILE_MODES and normlab.get_compile_mode() == mode
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3), nln.BatchNorm2d(8), nln.GroupNorm(2, 8), nln.InstanceNorm2d(8, affine=True),
        torch.nn.Flatten(), torch.nn.Linear(8 * 36, 16), nln.LayerNorm(16), nln.RMSNorm(16),
    )
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(4, 3, 8, 8)
    eager = model(x)
    y = compiled(x)
    assert_rel(y, eager, tol=TOL[torch.float32])
    y.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())
    model.eval()  # BatchNorm from its running statistics, with gradients to x and γ, β
    xg = x.clone().requires_grad_()
    want = model(xg)
    probe = torch.randn(want.shape)  # (not ‖y‖²: an RMSNorm output's norm does not depend on x)
    dx_want, = torch.autograd.grad((want * probe).sum(), xg)
    got = compiled(xg)
    assert_rel(got, want, tol=TOL[torch.float32])
    assert_rel(torch.autograd.grad((got * probe).sum(), xg)[0], dx_want, tol=1e-4)


def test_kernels_run_in_forked_children():
    # torch's thread pool runs the compiled kernels, so a forked child (DataLoader workers)
    # runs them as it runs torch's own ops
    F.layer_norm(torch.randn(4, 32), (32,))  # the parent has run a parallel kernel
    code = (
        "import os, torch, normlab.functional as F\n"
        "F.layer_norm(torch.randn(4, 32), (32,))\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    y = F.layer_norm(torch.randn(16, 32), (32,))\n"
        "    os._exit(0 if y.shape == (16, 32) else 3)\n"
        "print(os.waitpid(pid, 0)[1])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "0", out.stderr


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning")
def test_traced_modules_record_torch_ops_and_save_and_load():
    import io

    model = torch.nn.Sequential(nln.LayerNorm(16), nln.BatchNorm1d(16).eval(), nln.RMSNorm(16))
    with torch.no_grad():
        traced = torch.jit.trace(model, torch.randn(4, 16), check_trace=False)
    assert "normlab::" not in str(traced.inlined_graph)  # torch's own ops: the file loads without normlab
    buf = io.BytesIO()
    torch.jit.save(traced, buf)
    buf.seek(0)
    loaded = torch.jit.load(buf)
    x = torch.randn(4, 16) * 5 + 3
    assert_rel(loaded(x), model(x))


TORCH_OPS = {  # the OPS above, by torch.nn.functional
    "layer_norm": lambda x, w, b: torch.nn.functional.layer_norm(x, x.shape[-2:], w, b),
    "rms_norm": lambda x, w, b: torch.nn.functional.rms_norm(x, x.shape[-1:], w),
    "group_norm": lambda x, w, b: torch.nn.functional.group_norm(x, 3, w, b),
    "batch_norm 4-D": lambda x, w, b: torch.nn.functional.batch_norm(x, None, None, w, b, True),
    "batch_norm eval": lambda x, w, b: torch.nn.functional.batch_norm(
        x, torch.linspace(1, 3, x.shape[1], dtype=x.dtype), torch.linspace(0.5, 2, x.shape[1], dtype=x.dtype), w, b,
        False),
    "instance_norm 4-D": lambda x, w, b: torch.nn.functional.instance_norm(x, weight=w, bias=b),
}


@pytest.mark.parametrize("name", list(TORCH_OPS))
def test_forward_mode_ad_equals_torch(name):
    # jvp through every input, training and eval: the tangents of the written-out forward
    fn, pshape, shape = OPS[name]
    g = torch.Generator().manual_seed(11)
    primals = (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 3,
               torch.randn(pshape(shape), generator=g, dtype=torch.float64),
               torch.randn(pshape(shape), generator=g, dtype=torch.float64))
    tangents = tuple(torch.randn_like(p) for p in primals)
    import torch.autograd.forward_ad as fwAD
    with fwAD.dual_level():
        got = fwAD.unpack_dual(fn(*(fwAD.make_dual(p, t) for p, t in zip(primals, tangents))))
    want = torch.func.jvp(TORCH_OPS[name], primals, tangents)
    assert_rel(got.primal, want[0], torch.float64, what=f"{name} y")
    assert_rel(got.tangent, want[1], torch.float64, what=f"{name} tangent")


def test_compiled_training_updates_the_running_statistics_as_eager():
    torch._dynamo.reset()
    bn, ref = nln.BatchNorm2d(3), nln.BatchNorm2d(3)
    compiled = torch.compile(bn, fullgraph=True, backend="aot_eager")
    for seed in range(3):
        x = torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(seed)) * 2 + 1
        assert_rel(compiled(x), ref(x))
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(bn, name), getattr(ref, name))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("form", ["rows", "channels", "columns", "groups rows", "groups"])
def test_parameters_in_another_dtype_get_gradients_in_theirs(form, dtype):
    # a float32 γ, β with half input (mixed precision): their gradients are summed and returned in
    # float32, as precise as float32's, not rounded to the input's dtype on the way
    call = {"rows": lambda x, w, b: F.layer_norm(x, (16,), w, b),
            "channels": lambda x, w, b: F.batch_norm(x, None, None, w, b, training=True),
            "columns": lambda x, w, b: F.batch_norm(x, None, None, w, b, training=True),
            "groups rows": lambda x, w, b: F.group_norm(x, 4, w, b),
            "groups": lambda x, w, b: F.group_norm(x, 4, w, b)}[form]
    torch_call = {"rows": lambda x, w, b: torch.nn.functional.layer_norm(x, (16,), w, b),
                  "channels": lambda x, w, b: torch.nn.functional.batch_norm(x, None, None, w, b, training=True),
                  "groups": lambda x, w, b: torch.nn.functional.group_norm(x, 4, w, b)}
    torch_call["columns"], torch_call["groups rows"] = torch_call["channels"], torch_call["groups"]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 16, generator=g) * 2 if form == "rows" else torch.randn(4, 16, 5, 3, generator=g) * 2
    if form in ("columns", "groups"):
        x = x.contiguous(memory_format=torch.channels_last)
    x = x.to(dtype).requires_grad_()
    w, b = torch.randn(16, generator=g, requires_grad=True), torch.randn(16, generator=g, requires_grad=True)
    y = call(x, w, b)
    dy = torch.randn(y.shape, generator=g).to(dtype)
    y.backward(dy)
    assert y.dtype == dtype and w.grad.dtype == b.grad.dtype == torch.float32
    xs, ws, bs = (t.detach().double().requires_grad_() for t in (x, w, b))
    torch_call[form](xs, ws, bs).backward(dy.double())
    assert_rel(x.grad, xs.grad, dtype)
    for got, want in ((w.grad, ws.grad), (b.grad, bs.grad)):
        assert (got.double() - want).abs().max() <= 1e-5 * want.abs().max()


def test_fixed_statistics_of_another_layout_are_broadcast_by_the_reference():
    x = torch.randn(2, 3, 4, 5)
    for mean, var in ((torch.randn(1, 1, 1, 1), torch.rand(1, 1, 1, 1) + 1), (torch.randn(3, 1, 1), torch.rand(3, 1, 1) + 1)):
        got = normalize_affine(x, (0, 2, 3), fixed_mean=mean, fixed_var=var)[0]
        assert_rel(got, (x - mean) / torch.sqrt(var + 1e-5))


def test_compile_layer_norm_over_a_permuted_view():
    torch._dynamo.reset()
    ln = nln.LayerNorm(6)
    compiled = torch.compile(lambda x: ln(x.permute(0, 2, 3, 1)), fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 6, 4, 4, requires_grad=True)
    y = compiled(x)
    y.square().sum().backward()
    assert_rel(y, ln(x.permute(0, 2, 3, 1)))


def test_use_backend_is_per_thread():
    import threading

    seen = {}
    inside, release = threading.Event(), threading.Event()

    def other():
        with normlab.use_backend("torch"):
            inside.set()
            release.wait(10)
            seen["other"] = normlab.get_backend()

    t = threading.Thread(target=other)
    t.start()
    inside.wait(10)
    seen["main"] = normlab.get_backend()
    release.set()
    t.join()
    assert seen == {"main": "auto", "other": "torch"} and normlab.get_backend() == "auto"


@pytest.mark.parametrize("call", [
    lambda o, x: o.channels_eval(x, torch.zeros(8), torch.ones(8), None, None, 1e-5, [4, 8], []),
    lambda o, x: o.rows_backward(torch.randn(4, 8), x, torch.zeros(1, dtype=torch.float64),
                                 torch.ones(1, dtype=torch.float64), None, 1e-5, True, 1, 1, [4, 8]),
    lambda o, x: o.rows_backward(torch.randn(4, 8), x, torch.zeros(4, dtype=torch.float64),
                                 torch.ones(4, dtype=torch.float64), None, 1e-5, True, 3, 1, [4, 8]),
    lambda o, x: o.groups_backward(torch.randn(4, 8), x, torch.zeros(4, dtype=torch.float64),
                                   torch.ones(4, dtype=torch.float64), None, 1e-5, 3, [1, 4, 8], []),
    lambda o, x: o.channels_eval_backward(torch.randn(4, 8), x, torch.zeros(8), torch.ones(3), None, 1e-5, [4, 8, 1], []),
    lambda o, x: o.channels_eval_backward(torch.randn(8, 4), x, torch.zeros(8), torch.ones(8), None, 1e-5, [4, 8, 1], []),
    lambda o, x: o.rows_backward(torch.randn(32), x, torch.zeros(4, dtype=torch.float64),
                                 torch.ones(4, dtype=torch.float64), None, 1e-5, True, 1, 1, [4, 8]),
])
def test_kernel_operators_refuse_arguments_that_do_not_fit(call):
    # the form operators are public (torch.ops.normlab.*): a wrong shape, layout or statistic
    # is a ValueError, never a read out of bounds
    with pytest.raises(ValueError):
        call(torch.ops.normlab, torch.randn(4, 8))


def test_a_bias_changed_in_place_after_forward_is_no_error():  # as in torch: β's value is not saved
    x, w, b = torch.randn(4, 3, 5, requires_grad=True), torch.randn(3, requires_grad=True), torch.randn(3, requires_grad=True)
    for y in (F.batch_norm(x, None, None, w, b, True), F.group_norm(x, 3, w, b)):
        with torch.no_grad():
            b.add_(1)
        y.sum().backward()
    assert b.grad is not None and b.grad.dtype == b.dtype


def test_compiled_int_normalized_shape_as_eager():
    torch._dynamo.reset()
    x = torch.randn(2, 5)
    for fn in (lambda t: F.layer_norm(t, 5), lambda t: F.rms_norm(t, 5)):
        assert_rel(torch.compile(fn, backend="eager", fullgraph=True)(x), fn(x))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("make", [
    lambda g, dt: torch.randn(3, 37, 5, 7, generator=g).to(dt).permute(0, 2, 3, 1),  # ConvNext's (N, H, W, C) view
    lambda g, dt: torch.randn(70, 45, generator=g).to(dt).t(),                        # a transposed matrix
    lambda g, dt: torch.randn(4, 64, 40, generator=g).to(dt).transpose(1, 2),
    lambda g, dt: torch.randn(4, 9, 6, generator=g).to(dt)[:, ::2],                   # neither: torch's copy
])
def test_rows_of_a_permuted_view_equal_those_of_its_contiguous_copy(make, dtype):
    # the CPU operators transpose a permuted input themselves (in tiles): same bits as the copy
    g = torch.Generator().manual_seed(0)
    x = make(g, dtype)
    assert not x.is_contiguous()
    D = x.shape[-1]
    w, b = torch.randn(D, generator=g).to(dtype), torch.randn(D, generator=g).to(dtype)
    dy = torch.randn(x.shape, generator=g).to(dtype)
    for op in (lambda t, w: F.layer_norm(t, (D,), w, b), lambda t, w: F.rms_norm(t, (D,), w)):
        got_x, got_w = x.clone().requires_grad_(), w.clone().requires_grad_()
        want_x, want_w = x.contiguous().requires_grad_(), w.clone().requires_grad_()
        y, want = op(got_x, got_w), op(want_x, want_w)
        assert y.is_contiguous() and torch.equal(y, want)
        y.backward(dy)
        want.backward(dy)
        assert torch.equal(got_x.grad, want_x.grad) and torch.equal(got_w.grad, want_w.grad)


# one mistake, one error: the same class and message on every route (the compiled core, the Python
# fallback on torch's op, the reference); through torch.ops the class is its builtin base
_F64 = dict(dtype=torch.float64)
MISTAKES = {
    "group norm channels": (lambda: F.group_norm(torch.randn(4, 6, 3), 2, torch.ones(4), torch.zeros(4)), normlab.ShapeError),
    "eval without statistics": (lambda: F.batch_norm(torch.randn(4, 3), None, None, training=False), normlab.StateError),
    "layer norm weight of another dtype": (lambda: F.layer_norm(torch.randn(2, 3), (3,), torch.ones(3, **_F64)),
                                           normlab.DTypeError),
    "batch norm statistics of another dtype": (
        lambda: F.batch_norm(torch.randn(4, 3), torch.zeros(3, **_F64), torch.ones(3, **_F64), training=False),
        normlab.DTypeError),
    "group norm bias of another dtype": (
        lambda: F.group_norm(torch.randn(2, 4, 3, dtype=torch.bfloat16), 2, torch.ones(4), torch.ones(4, **_F64)),
        normlab.DTypeError),
    "instance norm weight of integers": (lambda: F.instance_norm(torch.randn(2, 3, 4), weight=torch.ones(3, dtype=torch.int64)),
                                         TypeError),
    "batch norm eps 0 in training": (lambda: F.batch_norm(torch.randn(4, 3), None, None, training=True, eps=0.0),
                                     ValueError),
    "num_groups a one-element list": (lambda: F.group_norm(torch.randn(2, 4, 3), [2]), TypeError),
    "num_groups a bool": (lambda: F.group_norm(torch.randn(2, 4, 3), True), TypeError),
    "num_groups a float": (lambda: F.group_norm(torch.randn(2, 4, 3), 2.0), TypeError),
}


@pytest.mark.parametrize("name", list(MISTAKES))
def test_a_mistake_raises_the_same_error_on_every_route(name):
    call, cls = MISTAKES[name]
    messages = {}
    for backend in ("auto", "torch", "reference"):
        with normlab.use_backend(backend), pytest.raises(cls) as err:
            call()
        assert isinstance(err.value, RuntimeError) or cls in (TypeError, ValueError), (backend, type(err.value))
        messages[backend] = str(err.value)
    torch._dynamo.reset()  # and compiled: normlab's checks run before the traced operator
    with pytest.raises(cls) as err:
        torch.compile(call, backend="aot_eager")()
    messages["compiled"] = str(err.value)
    assert len(set(messages.values())) == 1, messages
    assert issubclass(cls, RuntimeError) == (cls not in (TypeError, ValueError))  # torch's class is in it


def test_what_torch_accepts_is_accepted_on_every_route():
    x = torch.randn(2, 4, 3, 5).to(memory_format=torch.channels_last)
    for backend in ("auto", "torch", "reference"):
        with normlab.use_backend(backend):
            assert F.instance_norm(torch.randn(2, 3, 4), eps=0.0).shape == (2, 3, 4)  # torch takes ε = 0 here
            for wd in (torch.bfloat16, torch.float64):  # RMSNorm takes a weight of any float dtype, as torch's
                y = F.rms_norm(torch.randn(2, 3), (3,), torch.ones(3, dtype=wd))
                assert y.dtype == torch.float32, backend
            assert F.rms_norm(x, (5,)).is_contiguous(memory_format=torch.channels_last), backend  # as torch's
            z = F.zscore(torch.tensor([[1.0], [2.0], [float("inf")], [3.0]]))
            assert bool(z.isnan().all()), (backend, z)  # a column holding inf has no finite z-scores


@pytest.mark.parametrize("position", [0, 2, 5])
def test_an_inf_in_a_batch_makes_the_running_variance_nan_wherever_it_is(position):
    x = torch.randn(6, 2)
    x[position, 0] = float("inf")
    for backend in ("auto", "reference"):
        m, ref = nln.BatchNorm1d(2), torch.nn.BatchNorm1d(2)
        with normlab.use_backend(backend):
            m(x)
        ref(x)
        assert torch.equal(m.running_var.isnan(), ref.running_var.isnan()), (backend, m.running_var)
        assert m.running_mean[0] == float("inf") and torch.isfinite(m.running_var[1])


@pytest.mark.parametrize("mode", ["auto", "operators"])
def test_compiled_norms_keep_eager_memory_format(mode, monkeypatch):
    # one promise on every route: what eager returns for a channels_last input, compiled returns too
    torch._dynamo.reset()
    monkeypatch.setattr(kernels, "COMPILE", mode)
    x = torch.randn(2, 4, 5, 5).to(memory_format=torch.channels_last)
    for m in (nln.InstanceNorm2d(4, affine=True), nln.GroupNorm(2, 4), nln.BatchNorm2d(4), nln.LayerNorm(5),
              nln.RMSNorm(5)):
        eager, compiled = m(x), torch.compile(m, backend="aot_eager", fullgraph=True)(x)
        assert eager.stride() == compiled.stride(), (type(m).__name__, eager.stride(), compiled.stride())
        assert_rel(compiled, eager, tol=TOL[torch.float32])


@pytest.mark.parametrize("make", [lambda: nln.BatchNorm2d(8), lambda: nln.LayerNorm(10), lambda: nln.GroupNorm(2, 8),
                                  lambda: nln.InstanceNorm2d(8)])
def test_compiled_formula_keeps_a_large_offset_exact(make, monkeypatch):
    # the formula torch.compile gets ("fuse") takes its statistics in one pass of the data shifted
    # by each group's first value: an offset of 1e4 costs no digits, as in the core's kernels
    torch._dynamo.reset()
    monkeypatch.setattr(kernels, "COMPILE", "fuse")
    x = torch.randn(4, 8, 10, 10, generator=torch.Generator().manual_seed(0)) + 1e4
    m = make()
    y = torch.compile(m, backend="aot_eager", fullgraph=True)(x)
    with normlab.use_backend("reference"):
        want = copy.deepcopy(m).double()(x.double())
    assert (y.double() - want).abs().max() < 1e-5
    assert torch.isnan(torch.compile(make(), backend="aot_eager")(x.index_fill(3, torch.tensor([0]), float("inf")))).any()


def test_compiled_autograd_takes_the_cores_backward_nodes():
    # compiled autograd (torch.compile of the backward) collects what each node keeps: plain values
    from torch._dynamo import compiled_autograd

    if not hasattr(compiled_autograd, "_enable"):
        pytest.skip("this torch has no compiled_autograd._enable")
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), nln.BatchNorm2d(8), nln.GroupNorm(2, 8),
                                torch.nn.Flatten(), torch.nn.Linear(8 * 36, 16), nln.LayerNorm(16), nln.RMSNorm(16))
    x = torch.randn(4, 3, 8, 8)
    for train in (True, False):
        model.train(train)
        model.zero_grad()
        model(x).square().sum().backward()
        want = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        loss = model(x).square().sum()
        with compiled_autograd._enable(torch.compile(backend="aot_eager")):
            loss.backward()
        for p, w in zip(model.parameters(), want):
            assert_rel(p.grad, w, tol=1e-5)


def test_every_rule_is_written_once_and_raised_by_both_the_core_and_the_python_routes():
    """The rulebook (normlab.rules) holds each check's class and words; the C++ core raises them
    through the header generated from it, the Python routes through rules.error, and neither
    spells a message of its own."""
    import pathlib
    import re

    from normlab import rules

    root = pathlib.Path(normlab.__file__).parent
    cpp = "".join((root / "kernels" / "csrc" / f).read_text() for f in ("norm_ops.cpp", "python.cpp", "norm_cpu.cpp"))
    py = "".join(p.read_text() for p in root.rglob("*.py") if p.name != "rules.py")
    assert set(re.findall(r"NORMLAB_RULE\(.*?,\s*(\w+),\s*\{", cpp, flags=re.S)) == set(rules.RULES)
    assert set(re.findall(r'\berror\("(\w+)"', py)) == set(rules.RULES)
    for name, (_, text) in rules.RULES.items():
        words = max(re.split(r"\{\w+\}", text), key=len)  # the longest stretch without a field
        assert words not in cpp and words not in py, (name, words)
    header = rules.cpp_header()
    assert all(f"inline constexpr Rule {name}{{" in header for name in rules.RULES)
    e = rules.error("param_shape", op="layer_norm", name="weight", want=(4,), got=(3,))
    assert isinstance(e, normlab.ShapeError) and str(e) == "layer_norm: weight must have shape (4,) to match the input, got (3,)"
