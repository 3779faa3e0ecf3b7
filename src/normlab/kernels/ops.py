"""The kernels as torch operators: ``torch.ops.normlab.rows_forward`` and friends.

The operators are defined in C++ (``csrc/norm_cpu.cpp``, loaded by :mod:`normlab.kernels.build`)
with their CPU kernels and Meta kernels (shapes only, for ``torch.compile``, fake tensors and
``torch.export``); the Triton kernels of :mod:`normlab.kernels.triton` are registered here as
their CUDA implementation. Each takes ``x`` in its own shape and layout plus the canonical view
to compute in (see :class:`normlab.kernels.Plan`) and returns ``y``/``dx`` as fresh tensors in
``x``'s shape and memory format, statistics in float64. Autograd stays with
:class:`normlab.autograd.FusedNormalizeAffine` and :class:`~normlab.autograd.FusedChannelAffine`,
which call :func:`forward`/:func:`evaluate`/:func:`affine` and, when no graph is being built,
:func:`backward`/:func:`affine_backward`: the same operator calls in eager mode and while
``torch.compile`` traces (one opaque node each).
"""

import torch

from . import Plan, build

if not build.load():
    raise ImportError(f"normlab's compiled core is not available: {build.status()['why']}")
_ops = torch.ops.normlab


# ------------------------------------------------------------------ the CUDA implementation
# The Triton kernels take canonical views and write into ``out``: y/dx are allocated here in
# x's layout and the kernel writes through their canonical view, so no copy is made.

def _view(t, shape, permute):
    return Plan("", tuple(shape), permute=tuple(permute) or None).view(t)


def _register_triton() -> None:
    lib = torch.library.Library("normlab", "IMPL")  # kept alive below: dropping it unregisters
    _REGISTERED.append(lib)

    def triton():
        from . import triton as tk  # imported at the first CUDA call (seconds), never for the CPU

        return tk

    def rows_forward(x, weight, bias, eps, center, groups, seg, shape):
        y = torch.empty_like(x)
        _, mean, var = triton().rows_forward(x.view(shape), weight, bias, eps, center, groups, seg, out=y.view(shape))
        return y, mean, var

    def rows_backward(dy, x, mean, var, weight, eps, center, groups, seg, shape):
        dx = torch.empty_like(x)
        _, dw, db = triton().rows_backward(dy.contiguous().view(shape), x.view(shape), mean, var, weight, eps, center,
                                          groups, seg, out=dx.view(shape))
        return dx, dw, db

    def channels_forward(x, weight, bias, eps, shape, permute):
        y = torch.empty_like(x)
        _, mean, var = triton().channels_forward(_view(x, shape, permute), weight, bias, eps,
                                                 out=_view(y, shape, permute))
        return y, mean, var

    def channels_backward(dy, x, mean, var, weight, eps, shape, permute):
        dx = torch.empty_like(x)
        dyv = _view(dy, shape, permute).contiguous()
        _, dw, db = triton().channels_backward(dyv, _view(x, shape, permute), mean, var, weight, eps,
                                               out=_view(dx, shape, permute))
        return dx, dw, db

    def channels_affine(x, mean, scale, shift, shape, permute):
        y = torch.empty_like(x)
        triton().channels_affine(_view(x, shape, permute), mean, scale, shift, out=_view(y, shape, permute))
        return y

    def channels_eval(x, mean, var, weight, bias, eps, shape, permute):
        y = torch.empty_like(x)
        triton().channels_eval(_view(x, shape, permute), mean, var, weight, bias, eps, out=_view(y, shape, permute))
        return y

    def channels_affine_backward(dy, x, mean, scale, shape, permute):
        dx = torch.empty_like(x)
        dyv = _view(dy, shape, permute).contiguous()
        _, da, db = triton().channels_affine_backward(dyv, _view(x, shape, permute), mean, scale,
                                                      out=_view(dx, shape, permute))
        return dx, da, db

    for fn in (rows_forward, rows_backward, channels_forward, channels_backward, channels_affine, channels_eval,
               channels_affine_backward):
        lib.impl(fn.__name__, fn, "CUDA")


_REGISTERED: list = []
_register_triton()


# ------------------------------------------------------------------ what the autograd layer calls

def _permute(p):
    return list(p.permute or ())


def forward(p, x, weight, bias, eps, center):
    """``(y, mean, var)`` of the plan's form; statistics flat, float64."""
    if p.form == "rows":
        return _ops.rows_forward(x, weight, bias, eps, center, p.groups, p.seg, list(p.shape))
    if p.form == "groups":
        return _ops.groups_forward(x, weight, bias, eps, p.groups, list(p.shape))
    return _ops.channels_forward(x, weight, bias, eps, list(p.shape), _permute(p))


def backward(p, dy, x, mean, var, weight, eps, center):
    """``(dx, dweight, dbias)``, the parameter gradients flat in x's dtype."""
    if p.form == "rows":
        return _ops.rows_backward(dy, x, mean, var, weight, eps, center, p.groups, p.seg, list(p.shape))
    if p.form == "groups":
        return _ops.groups_backward(dy, x, mean, var, weight, eps, p.groups, list(p.shape))
    return _ops.channels_backward(dy, x, mean, var, weight, eps, list(p.shape), _permute(p))


def evaluate(p, x, mean, var, weight, bias, eps):
    """BatchNorm in eval straight from the running statistics (the map built in float64)."""
    return _ops.channels_eval(x, mean, var, weight, bias, eps, list(p.shape), _permute(p))


def affine(p, x, mean, scale, shift):
    """BatchNorm in eval: ``(x − mean)·scale + shift`` per channel."""
    return _ops.channels_affine(x, mean, scale, shift, list(p.shape), _permute(p))


def affine_backward(p, dy, x, mean, scale):
    """``(dx, Σ dy·(x − mean), Σ dy)``, the sums per channel in float32 or wider."""
    return _ops.channels_affine_backward(dy, x, mean, scale, list(p.shape), _permute(p))
