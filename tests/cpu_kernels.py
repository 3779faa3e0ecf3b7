"""Test helper: the compiled CPU kernels (``csrc/norm_cpu.cpp``, registered as ``torch.ops.normlab``),
with the signatures of :mod:`normlab.kernels.reference`, their oracle, so the tests call both alike.

Each function takes the canonical view (see :mod:`normlab.kernels`) and returns fresh outputs;
``out``, when given, receives ``y``/``dx`` (the kernels themselves always allocate, in x's layout).
Numerics, the same in every kernel (the C++ source says why): statistics in float64 from sums
shifted by the first value of the row or channel, the output in x's precision (float for
fp16/bf16) with the mean's rounding folded into the shift, parameter-gradient partials per block
summed in float64. Importing this module builds or loads the core (:mod:`normlab.kernels.build`)
and raises ``ImportError`` when it is not available.
"""

from __future__ import annotations

import torch

from normlab.kernels import build

if not build.load():
    raise ImportError(f"normlab's compiled core is not available: {build.status()['why']}")

_ops = torch.ops.normlab


def _into(out, t):
    return t if out is None else out.copy_(t)


def rows_forward(x, weight, bias, eps: float, center: bool, groups: int, seg: int, out=None):
    """``x (R, D)`` → ``(y, mean, var)``; mean and biased var per row, float64."""
    y, mean, var = _ops.rows_forward(x, weight, bias, eps, center, groups, seg, list(x.shape))
    return _into(out, y), mean, var


def rows_backward(dy, x, mean, var, weight, eps: float, center: bool, groups: int, seg: int, out=None):
    """``(dx, dweight, dbias)``; the parameter gradients flat, in x's dtype."""
    dx, dw, db = _ops.rows_backward(dy, x, mean, var, weight, eps, center, groups, seg, list(x.shape))
    return _into(out, dx), dw, db


def channels_forward(x, weight, bias, eps: float, out=None):
    """BN training on ``x (N, C, S)`` → ``(y, mean, var)`` per channel, float64."""
    y, mean, var = _ops.channels_forward(x, weight, bias, eps, list(x.shape), [])
    return _into(out, y), mean, var


def channels_backward(dy, x, mean, var, weight, eps: float, out=None):
    """BN training backward on ``(N, C, S)`` → ``(dx, dweight, dbias)`` per channel, in x's dtype."""
    dx, dw, db = _ops.channels_backward(dy, x, mean, var, weight, eps, list(x.shape), [])
    return _into(out, dx), dw, db


def channels_stats(x):
    """Per channel of ``x (N, C, S)``: ``(mean, var)``, the biased variance, float64."""
    return _ops.channels_stats(x, list(x.shape), [])


def channels_eval(x, mean, var, weight, bias, eps: float, out=None):
    """BatchNorm in eval on ``x (N, C, S)`` straight from the running statistics ``mean``, ``var``
    (``(C,)``): ``(x − mean)·γ/√(var + ε) + β``, the map built in float64."""
    return _into(out, _ops.channels_eval(x, mean, var, weight, bias, eps, list(x.shape), []))


def channels_eval_backward(dy, x, mean, var, weight, eps: float, out=None):
    """Backward of :func:`channels_eval`: ``(dx, dweight, dbias)``, the parameter gradients in
    float32 or wider."""
    dx, dw, db = _ops.channels_eval_backward(dy, x, mean, var, weight, eps, list(x.shape), [])
    return _into(out, dx), dw, db


def groups_forward(x, weight, bias, eps: float, groups: int, out=None):
    """GroupNorm/InstanceNorm on channels_last ``x (N, S, C)`` → ``(y, mean, var)`` per (sample, group)."""
    y, mean, var = _ops.groups_forward(x, weight, bias, eps, groups, list(x.shape), [])
    return _into(out, y), mean, var


def groups_backward(dy, x, mean, var, weight, eps: float, groups: int, out=None):
    dx, dw, db = _ops.groups_backward(dy, x, mean, var, weight, eps, groups, list(x.shape), [])
    return _into(out, dx), dw, db
