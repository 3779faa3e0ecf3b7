"""The kernels as ``torch.library`` custom ops, so ``torch.compile`` sees one opaque node each.

``torch.ops.normlab.rows_forward`` and friends take ``x`` in its own shape and layout plus the
canonical view to compute in (see :class:`normlab.kernels.Plan`), and return ``y``/``dx`` as
fresh tensors in ``x``'s shape and memory format: the kernel writes into a canonical view of
them, so no copy is made and the result is not a view (in-place ops on a norm's output work).
The implementation picks the kernel for the device (numba on the CPU, Triton on CUDA); a "fake"
implementation gives the output shapes for tracing. Autograd stays with
:class:`normlab.autograd.FusedNormalizeAffine` and :class:`~normlab.autograd.FusedChannelAffine`,
which call :func:`forward`/:func:`affine` and, when no graph is being built,
:func:`backward`/:func:`affine_backward`: plain functions in eager mode, these ops while
``torch.compile`` traces. Statistics come back in float64.
"""

import torch

from . import Plan

_LIB = "normlab"
_ENGINES: dict = {}


def _impl(x):
    """The kernel module for x's device: numba on the CPU, Triton on CUDA (imported once)."""
    kind = "triton" if x.is_cuda else "cpu"
    mod = _ENGINES.get(kind)
    if mod is None:
        import importlib

        mod = _ENGINES[kind] = importlib.import_module(f"{__package__}.{kind}")
    return mod


def _stats(x, n):
    return x.new_empty(n, dtype=torch.float64), x.new_empty(n, dtype=torch.float64)


# --------------------------------------------------------------------- eager implementations
# x in its own shape and layout, the Plan for the canonical view; y/dx fresh in x's layout.

def _forward(p, x, weight, bias, eps, center):
    y = torch.empty_like(x)
    impl, xv, yv = _impl(x), p.view(x), p.view(y)
    if p.form == "rows":
        _, mean, var = impl.rows_forward(xv, weight, bias, eps, center, p.groups, p.seg, out=yv)
    elif p.form == "groups":
        _, mean, var = impl.groups_forward(xv, weight, bias, eps, p.groups, out=yv)
    else:
        _, mean, var = impl.channels_forward(xv, weight, bias, eps, out=yv)
    return y, mean, var


def _backward(p, dy, x, mean, var, weight, eps, center):
    dx = torch.empty_like(x)
    impl, dyv, xv, dxv = _impl(x), p.view(dy), p.view(x), p.view(dx)
    if p.form == "rows":
        _, dw, db = impl.rows_backward(dyv, xv, mean, var, weight, eps, center, p.groups, p.seg, out=dxv)
    elif p.form == "groups":
        _, dw, db = impl.groups_backward(dyv, xv, mean, var, weight, eps, p.groups, out=dxv)
    else:
        _, dw, db = impl.channels_backward(dyv, xv, mean, var, weight, eps, out=dxv)
    return dx, dw, db


def _affine(p, x, mean, scale, shift):
    y = torch.empty_like(x)
    _impl(x).channels_affine(p.view(x), mean, scale, shift, out=p.view(y))
    return y


def evaluate(p, x, mean, var, weight, bias, eps):
    """BatchNorm in eval straight from the running statistics, eager only (no graph, not
    while compiling: :func:`affine` is the op then)."""
    y = torch.empty_like(x)
    _impl(x).channels_eval(p.view(x), mean, var, weight, bias, eps, out=p.view(y))
    return y


def _affine_backward(p, dy, x, mean, scale):
    dx = torch.empty_like(x)
    _, da, db = _impl(x).channels_affine_backward(p.view(dy), p.view(x), mean, scale, out=p.view(dx))
    return dx, da, db


# ------------------------------------------------------------------ what the autograd layer calls
# Eager: the functions above, directly (the custom-op dispatcher costs tens of microseconds a
# call). While torch.compile traces: the registered custom ops, which dynamo sees as one node.

def forward(p, x, weight, bias, eps, center):
    """``(y, mean, var)`` of the plan's form; statistics flat, float64."""
    if not torch.compiler.is_compiling():
        return _forward(p, x, weight, bias, eps, center)
    if p.form == "rows":
        return rows_forward(x, weight, bias, eps, center, p.groups, p.seg, list(p.shape))
    if p.form == "groups":
        return groups_forward(x, weight, bias, eps, p.groups, list(p.shape))
    return channels_forward(x, weight, bias, eps, list(p.shape), list(p.permute or ()))


def backward(p, dy, x, mean, var, weight, eps, center):
    """``(dx, dweight, dbias)``, the parameter gradients flat in x's dtype."""
    if not torch.compiler.is_compiling():
        return _backward(p, dy, x, mean, var, weight, eps, center)
    if p.form == "rows":
        return rows_backward(dy, x, mean, var, weight, eps, center, p.groups, p.seg, list(p.shape))
    if p.form == "groups":
        return groups_backward(dy, x, mean, var, weight, eps, p.groups, list(p.shape))
    return channels_backward(dy, x, mean, var, weight, eps, list(p.shape), list(p.permute or ()))


def affine(p, x, mean, scale, shift):
    """BatchNorm in eval: ``(x − mean)·scale + shift`` per channel."""
    if not torch.compiler.is_compiling():
        return _affine(p, x, mean, scale, shift)
    return channels_affine(x, mean, scale, shift, list(p.shape), list(p.permute or ()))


def affine_backward(p, dy, x, mean, scale):
    if not torch.compiler.is_compiling():
        return _affine_backward(p, dy, x, mean, scale)
    return channels_affine_backward(dy, x, mean, scale, list(p.shape), list(p.permute or ()))


def _plan(form, shape, permute=(), groups=1, seg=1):
    return Plan(form, tuple(shape), groups, seg, tuple(permute) or None)


@torch.library.custom_op(f"{_LIB}::rows_forward", mutates_args=(),
                         schema="(Tensor x, Tensor? weight, Tensor? bias, float eps, bool center, int groups, int seg,"
                                " int[] shape) -> (Tensor, Tensor, Tensor)")
def rows_forward(x, weight, bias, eps, center, groups, seg, shape):
    return _forward(_plan("rows", shape, groups=groups, seg=seg), x, weight, bias, eps, center)


@rows_forward.register_fake
def _(x, weight, bias, eps, center, groups, seg, shape):
    return (torch.empty_like(x), *_stats(x, shape[0]))


@torch.library.custom_op(f"{_LIB}::rows_backward", mutates_args=(),
                         schema="(Tensor dy, Tensor x, Tensor mean, Tensor var, Tensor? weight, float eps, bool center,"
                                " int groups, int seg, int[] shape) -> (Tensor, Tensor, Tensor)")
def rows_backward(dy, x, mean, var, weight, eps, center, groups, seg, shape):
    return _backward(_plan("rows", shape, groups=groups, seg=seg), dy, x, mean, var, weight, eps, center)


@rows_backward.register_fake
def _(dy, x, mean, var, weight, eps, center, groups, seg, shape):
    p = groups * (shape[1] // seg)
    return torch.empty_like(x), x.new_empty(p), x.new_empty(p)


@torch.library.custom_op(f"{_LIB}::channels_forward", mutates_args=(),
                         schema="(Tensor x, Tensor? weight, Tensor? bias, float eps, int[] shape, int[] permute)"
                                " -> (Tensor, Tensor, Tensor)")
def channels_forward(x, weight, bias, eps, shape, permute):
    return _forward(_plan("channels", shape, permute), x, weight, bias, eps, True)


@channels_forward.register_fake
def _(x, weight, bias, eps, shape, permute):
    return (torch.empty_like(x), *_stats(x, shape[1]))


@torch.library.custom_op(f"{_LIB}::channels_backward", mutates_args=(),
                         schema="(Tensor dy, Tensor x, Tensor mean, Tensor var, Tensor? weight, float eps, int[] shape,"
                                " int[] permute) -> (Tensor, Tensor, Tensor)")
def channels_backward(dy, x, mean, var, weight, eps, shape, permute):
    return _backward(_plan("channels", shape, permute), dy, x, mean, var, weight, eps, True)


@channels_backward.register_fake
def _(dy, x, mean, var, weight, eps, shape, permute):
    c = shape[1]
    return torch.empty_like(x), x.new_empty(c), x.new_empty(c)


@torch.library.custom_op(f"{_LIB}::channels_affine", mutates_args=(),
                         schema="(Tensor x, Tensor mean, Tensor scale, Tensor shift, int[] shape, int[] permute) -> Tensor")
def channels_affine(x, mean, scale, shift, shape, permute):
    return _affine(_plan("channels", shape, permute), x, mean, scale, shift)


@channels_affine.register_fake
def _(x, mean, scale, shift, shape, permute):
    return torch.empty_like(x)


@torch.library.custom_op(f"{_LIB}::channels_affine_backward", mutates_args=(),
                         schema="(Tensor dy, Tensor x, Tensor mean, Tensor scale, int[] shape, int[] permute)"
                                " -> (Tensor, Tensor, Tensor)")
def channels_affine_backward(dy, x, mean, scale, shape, permute):
    return _affine_backward(_plan("channels", shape, permute), dy, x, mean, scale)


@channels_affine_backward.register_fake
def _(dy, x, mean, scale, shape, permute):
    c, acc = shape[1], torch.promote_types(x.dtype, torch.float32)  # the sums: float32 or wider
    return torch.empty_like(x), x.new_empty(c, dtype=acc), x.new_empty(c, dtype=acc)


@torch.library.custom_op(f"{_LIB}::groups_forward", mutates_args=(),
                         schema="(Tensor x, Tensor? weight, Tensor? bias, float eps, int groups, int[] shape)"
                                " -> (Tensor, Tensor, Tensor)")
def groups_forward(x, weight, bias, eps, groups, shape):
    return _forward(_plan("groups", shape, groups=groups), x, weight, bias, eps, True)


@groups_forward.register_fake
def _(x, weight, bias, eps, groups, shape):
    return (torch.empty_like(x), *_stats(x, shape[0] * groups))


@torch.library.custom_op(f"{_LIB}::groups_backward", mutates_args=(),
                         schema="(Tensor dy, Tensor x, Tensor mean, Tensor var, Tensor? weight, float eps, int groups,"
                                " int[] shape) -> (Tensor, Tensor, Tensor)")
def groups_backward(dy, x, mean, var, weight, eps, groups, shape):
    return _backward(_plan("groups", shape, groups=groups), dy, x, mean, var, weight, eps, True)


@groups_backward.register_fake
def _(dy, x, mean, var, weight, eps, groups, shape):
    c = shape[2]
    return torch.empty_like(x), x.new_empty(c), x.new_empty(c)
