"""The kernels as ``torch.library`` custom ops, so ``torch.compile`` sees one opaque node each.

``torch.ops.normlab.rows_forward`` and friends take ``x`` in its own shape and layout plus the
canonical view to compute in (see :class:`normlab.kernels.Plan`), and return ``y``/``dx`` as
fresh tensors in ``x``'s shape and memory format: the kernel writes into a canonical view of
them, so no copy is made and the result is not a view (in-place ops on a norm's output work).
The implementation picks the kernel for the device (numba on the CPU, Triton on CUDA); a "fake"
implementation gives the output shapes for tracing. Autograd stays with
:class:`normlab.autograd.NormalizeAffine`, which calls the forward op and, when no graph is
being built, the backward op. Statistics come back in float64.
"""

import torch

_LIB = "normlab"


def _impl(x):
    if x.device.type == "cuda":
        from . import triton

        return triton
    from . import cpu

    return cpu


def _plan(form, shape, permute):
    from . import Plan

    return Plan(form, tuple(shape), permute=tuple(permute) or None)


def _stats(x, n):
    return x.new_empty(n, dtype=torch.float64), x.new_empty(n, dtype=torch.float64)


def call(name: str):
    """The op ``name``: the registered custom op while ``torch.compile`` traces, the plain Python
    function otherwise (the custom-op dispatcher costs tens of microseconds a call)."""
    return _OPS[name] if torch.compiler.is_compiling() else _EAGER[name]


@torch.library.custom_op(f"{_LIB}::rows_forward", mutates_args=(),
                         schema="(Tensor x, Tensor? weight, Tensor? bias, float eps, bool center, int groups, int seg,"
                                " int[] shape) -> (Tensor, Tensor, Tensor)")
def rows_forward(x, weight, bias, eps, center, groups, seg, shape):
    y = torch.empty_like(x)
    view = _plan("rows", shape, ()).view
    _, mean, var = _impl(x).rows_forward(view(x), weight, bias, eps, center, groups, seg, out=view(y))
    return y, mean, var


@rows_forward.register_fake
def _(x, weight, bias, eps, center, groups, seg, shape):
    return (torch.empty_like(x), *_stats(x, shape[0]))


@torch.library.custom_op(f"{_LIB}::rows_backward", mutates_args=(),
                         schema="(Tensor dy, Tensor x, Tensor mean, Tensor rstd, Tensor? weight, float eps, bool center,"
                                " int groups, int seg, int[] shape) -> (Tensor, Tensor, Tensor)")
def rows_backward(dy, x, mean, rstd, weight, eps, center, groups, seg, shape):
    dx = torch.empty_like(x)
    view = _plan("rows", shape, ()).view
    _, dw, db = _impl(x).rows_backward(view(dy), view(x), mean, rstd, weight, eps, center, groups, seg, out=view(dx))
    return dx, dw, db


@rows_backward.register_fake
def _(dy, x, mean, rstd, weight, eps, center, groups, seg, shape):
    p = groups * (shape[1] // seg)
    return torch.empty_like(x), x.new_empty(p), x.new_empty(p)


@torch.library.custom_op(f"{_LIB}::channels_forward", mutates_args=(),
                         schema="(Tensor x, Tensor? weight, Tensor? bias, float eps, int[] shape, int[] permute)"
                                " -> (Tensor, Tensor, Tensor)")
def channels_forward(x, weight, bias, eps, shape, permute):
    y = torch.empty_like(x)
    view = _plan("channels", shape, permute).view
    _, mean, var = _impl(x).channels_forward(view(x), weight, bias, eps, out=view(y))
    return y, mean, var


@channels_forward.register_fake
def _(x, weight, bias, eps, shape, permute):
    return (torch.empty_like(x), *_stats(x, shape[1]))


@torch.library.custom_op(f"{_LIB}::channels_backward", mutates_args=(),
                         schema="(Tensor dy, Tensor x, Tensor mean, Tensor rstd, Tensor? weight, float eps, int[] shape,"
                                " int[] permute) -> (Tensor, Tensor, Tensor)")
def channels_backward(dy, x, mean, rstd, weight, eps, shape, permute):
    dx = torch.empty_like(x)
    view = _plan("channels", shape, permute).view
    _, dw, db = _impl(x).channels_backward(view(dy), view(x), mean, rstd, weight, eps, out=view(dx))
    return dx, dw, db


@channels_backward.register_fake
def _(dy, x, mean, rstd, weight, eps, shape, permute):
    c = shape[1]
    return torch.empty_like(x), x.new_empty(c), x.new_empty(c)


@torch.library.custom_op(f"{_LIB}::channels_affine", mutates_args=(),
                         schema="(Tensor x, Tensor mean, Tensor scale, Tensor shift, int[] shape, int[] permute) -> Tensor")
def channels_affine(x, mean, scale, shift, shape, permute):
    y = torch.empty_like(x)
    view = _plan("channels", shape, permute).view
    _impl(x).channels_affine(view(x), mean, scale, shift, out=view(y))
    return y


@channels_affine.register_fake
def _(x, mean, scale, shift, shape, permute):
    return torch.empty_like(x)


@torch.library.custom_op(f"{_LIB}::channels_affine_backward", mutates_args=(),
                         schema="(Tensor dy, Tensor x, Tensor mean, Tensor scale, int[] shape, int[] permute)"
                                " -> (Tensor, Tensor, Tensor)")
def channels_affine_backward(dy, x, mean, scale, shape, permute):
    dx = torch.empty_like(x)
    view = _plan("channels", shape, permute).view
    _, da, db = _impl(x).channels_affine_backward(view(dy), view(x), mean, scale, out=view(dx))
    return dx, da, db


@channels_affine_backward.register_fake
def _(dy, x, mean, scale, shape, permute):
    c = shape[1]
    return torch.empty_like(x), x.new_empty(c), x.new_empty(c)


@torch.library.custom_op(f"{_LIB}::groups_forward", mutates_args=(),
                         schema="(Tensor x, Tensor? weight, Tensor? bias, float eps, int groups, int[] shape)"
                                " -> (Tensor, Tensor, Tensor)")
def groups_forward(x, weight, bias, eps, groups, shape):
    y = torch.empty_like(x)
    view = _plan("groups", shape, ()).view
    _, mean, var = _impl(x).groups_forward(view(x), weight, bias, eps, groups, out=view(y))
    return y, mean, var


@groups_forward.register_fake
def _(x, weight, bias, eps, groups, shape):
    return (torch.empty_like(x), *_stats(x, shape[0] * groups))


@torch.library.custom_op(f"{_LIB}::groups_backward", mutates_args=(),
                         schema="(Tensor dy, Tensor x, Tensor mean, Tensor rstd, Tensor? weight, float eps, int groups,"
                                " int[] shape) -> (Tensor, Tensor, Tensor)")
def groups_backward(dy, x, mean, rstd, weight, eps, groups, shape):
    dx = torch.empty_like(x)
    view = _plan("groups", shape, ()).view
    _, dw, db = _impl(x).groups_backward(view(dy), view(x), mean, rstd, weight, eps, groups, out=view(dx))
    return dx, dw, db


@groups_backward.register_fake
def _(dy, x, mean, rstd, weight, eps, groups, shape):
    c = shape[2]
    return torch.empty_like(x), x.new_empty(c), x.new_empty(c)


_OPS = {"rows_forward": rows_forward, "rows_backward": rows_backward,
        "channels_forward": channels_forward, "channels_backward": channels_backward,
        "channels_affine": channels_affine, "channels_affine_backward": channels_affine_backward,
        "groups_forward": groups_forward, "groups_backward": groups_backward}
_EAGER = {name: op._init_fn for name, op in _OPS.items()}
