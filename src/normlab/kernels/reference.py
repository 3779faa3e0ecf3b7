"""The oracle of every kernel: the canonical forms computed by the core, with the same signatures.

Each function reshapes the canonical view back into the shape the core reduces over and calls
:func:`normlab.autograd.normalize_affine` (forward) or differentiates it (backward), so a kernel
is tested against the very code that is tested against ``torch.nn``, float64 ``gradcheck`` and
the seed's equations. Slow on purpose: clarity over speed.

Forms (see :mod:`normlab.kernels`): *rows* ``x (R, D)`` with statistics per row and parameters
``(groups·D/seg,)`` indexed ``(r % groups)·(D/seg) + j // seg``; *channels* ``x (N, C, S)`` with
statistics per channel over ``(N, S)`` and parameters ``(C,)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..autograd import affine_backward, normalize_affine  # the reference itself: never the kernels it checks
from ..stats import accumulation_dtype

__all__ = ["rows_forward", "rows_backward", "channels_forward", "channels_backward", "channels_stats", "channels_eval",
           "channels_eval_backward", "groups_forward", "groups_backward", "formula", "formula_backward"]


def _rows(x: Tensor, groups: int, seg: int) -> tuple[Tensor, tuple[int, ...], tuple[int, int, int]]:
    R, D = x.shape
    return x.reshape(R // groups, groups, D // seg, seg), (2, 3), (groups, D // seg, 1)


def _flat(t, shape):
    return None if t is None else t.reshape(shape)


def _into(out, t):
    """``t``, or ``t`` written into the caller's ``out`` (the kernels' output convention)."""
    return t if out is None else out.copy_(t)


def rows_forward(x, weight, bias, eps: float, center: bool, groups: int, seg: int, out=None):
    """``x (R, D)`` → ``(y, mean, var)``: mean and biased variance per row in float64."""
    x4, dims, pshape = _rows(x, groups, seg)
    y, mean, var = normalize_affine(x4.double(), dims, _flat(weight, pshape), _flat(bias, pshape), eps, center=center)
    mean = mean if center else torch.zeros_like(var)
    return _into(out, y.to(x.dtype).reshape(x.shape)), mean.reshape(-1), var.reshape(-1)


def rows_backward(dy, x, mean, var, weight, eps: float, center: bool, groups: int, seg: int, out=None):
    """``(dx, dweight, dbias)`` of :func:`rows_forward`, the parameter gradients flattened.

    ``mean``/``var`` are what the forward returned (kernels use them; the reference recomputes).
    """
    x4, dims, pshape = _rows(x, groups, seg)
    dx, dw, db = _grads(lambda xx, w, b: normalize_affine(xx, dims, w, b, eps, center=center)[0], x4,
                        dy.reshape(x4.shape), weight, pshape, x.shape)
    return _into(out, dx), dw, db


def channels_forward(x, weight, bias, eps: float, out=None):
    """BatchNorm training on ``x (N, C, S)`` → ``(y, mean, var)`` per channel in float64."""
    C = x.shape[1]
    y, mean, var = normalize_affine(x.double(), (0, 2), _flat(weight, (C, 1)), _flat(bias, (C, 1)), eps)
    return _into(out, y.to(x.dtype)), mean.reshape(-1), var.reshape(-1)


def channels_stats(x):
    """BatchNorm's statistics of ``x (N, C, S)`` alone: ``(mean, var)`` per channel in float64."""
    _, mean, var = normalize_affine(x.double(), (0, 2), None, None, 0.0)
    return mean.reshape(-1), var.reshape(-1)


def channels_backward(dy, x, mean, var, weight, eps: float, out=None):
    """``(dx, dweight, dbias)`` of :func:`channels_forward`."""
    C = x.shape[1]
    dx, dw, db = _grads(lambda xx, w, b: normalize_affine(xx, (0, 2), w, b, eps)[0], x, dy, weight, (C, 1), x.shape)
    return _into(out, dx), dw, db


def _grads(f, x, dy, weight, pshape, out_shape, pdtype=None):
    with torch.enable_grad():
        xx = x.detach().double().requires_grad_()
        w = torch.ones(pshape, dtype=torch.float64) if weight is None else weight.detach().double().reshape(pshape)
        w.requires_grad_()
        b = torch.zeros(pshape, dtype=torch.float64, requires_grad=True)
        dx, dw, db = torch.autograd.grad(f(xx, w, b), (xx, w, b), dy.double())
    pdtype = pdtype or x.dtype
    return dx.to(x.dtype).reshape(out_shape), dw.reshape(-1).to(pdtype), db.reshape(-1).to(pdtype)


def channels_eval(x, mean, var, weight, bias, eps: float, out=None):
    """BatchNorm in eval on ``x (N, C, S)`` from the running statistics (``(C,)`` each)."""
    C = x.shape[1]
    y, _, _ = normalize_affine(x.double(), (0, 2), _flat(weight, (C, 1)), _flat(bias, (C, 1)), eps,
                               fixed_mean=mean.double().view(C, 1), fixed_var=var.double().view(C, 1))
    return _into(out, y.to(x.dtype))


def channels_eval_backward(dy, x, mean, var, weight, eps: float, out=None):
    """``(dx, dweight, dbias)`` of :func:`channels_eval`, the running statistics constants; the
    parameter gradients in float32 or wider (``Σ dy·x̂`` of fp16 data can pass fp16's range)."""
    C = x.shape[1]
    fixed = {"fixed_mean": mean.double().view(C, 1), "fixed_var": var.double().view(C, 1)}
    dx, dw, db = _grads(lambda xx, w, b: normalize_affine(xx, (0, 2), w, b, eps, **fixed)[0], x, dy, weight, (C, 1),
                        x.shape, torch.promote_types(x.dtype, torch.float32))
    return _into(out, dx), dw, db


def groups_forward(x, weight, bias, eps: float, groups: int, out=None):
    """GroupNorm/InstanceNorm on channels_last ``x (N, S, C)``: statistics per sample over (S, a
    group of C/groups adjacent channels) → ``(y, mean, var)``, statistics ``(N·groups,)``."""
    N, S, C = x.shape
    x4, pshape = x.reshape(N, S, groups, C // groups), (groups, C // groups)
    y, mean, var = normalize_affine(x4.double(), (1, 3), _flat(weight, pshape), _flat(bias, pshape), eps)
    return _into(out, y.to(x.dtype).reshape(x.shape)), mean.reshape(-1), var.reshape(-1)


def groups_backward(dy, x, mean, var, weight, eps: float, groups: int, out=None):
    N, S, C = x.shape
    x4, pshape = x.reshape(N, S, groups, C // groups), (groups, C // groups)
    dx, dw, db = _grads(lambda xx, w, b: normalize_affine(xx, (1, 3), w, b, eps)[0], x4, dy.reshape(x4.shape),
                        weight, pshape, x.shape)
    return _into(out, dx), dw, db


# ------------------------------------------------ the reference as operators, for the core itself
# Where the compiled core has no kernel to run — a forward-mode tangent, a graph to build through
# the backward (double backward), batched gradients, a device without kernels — its operators
# call these two (``torch.ops.normlab.formula``, ``formula_backward``) on the canonical form's
# view: the reference's own differentiable ops, so the formula lives in the reference and the
# kernels only. They run as CompositeImplicitAutograd: autograd, forward AD and vmap see the
# plain torch ops inside.


def formula(x: Tensor, dims: list[int], weight, bias, eps: float, center: bool, fixed_mean, fixed_var) -> Tensor:
    """``y`` of :func:`normlab.autograd.normalize_affine` on ``x`` (reduced over ``dims``; the
    parameters and fixed statistics broadcast against it), in x's dtype."""
    return normalize_affine(x, dims, weight, bias, eps, center=center, fixed_mean=fixed_mean, fixed_var=fixed_var)[0]


def formula_backward(dy: Tensor, x: Tensor, dims: list[int], weight, eps: float, center: bool, fixed_mean, fixed_var,
                     pshape: list[int]) -> tuple[Tensor, Tensor, Tensor]:
    """``(dx, dweight, dbias)`` of :func:`formula` by :func:`normlab.autograd.affine_backward`
    out of place (batch statistics recomputed from x); the parameter gradients summed to
    ``pshape`` in the accumulation dtype (``dweight`` empty without a weight)."""
    acc = accumulation_dtype(x.dtype, *(t.dtype for t in (weight, fixed_mean, fixed_var) if t is not None))
    batch = fixed_var is None
    mean = rstd = None
    if not batch:
        mean = fixed_mean.to(acc) if center else None
        rstd = torch.rsqrt(fixed_var.to(acc) + eps)
    dx, dw, db = affine_backward(dy, x, weight, mean, rstd, dims, eps, center, batch, (tuple(pshape), acc),
                                 (True, weight is not None, True), inplace=False, acc=acc)
    return dx, (x.new_empty(0, dtype=acc) if dw is None else dw), db


_LIB = torch.library.Library("normlab", "FRAGMENT")  # kept alive here: dropping it unregisters
_LIB.define("formula(Tensor x, int[] dims, Tensor? weight, Tensor? bias, float eps, bool center, "
            "Tensor? fixed_mean, Tensor? fixed_var) -> Tensor")
_LIB.define("formula_backward(Tensor dy, Tensor x, int[] dims, Tensor? weight, float eps, bool center, "
            "Tensor? fixed_mean, Tensor? fixed_var, int[] pshape) -> (Tensor, Tensor, Tensor)")
_LIB.impl("formula", formula, "CompositeImplicitAutograd")
_LIB.impl("formula_backward", formula_backward, "CompositeImplicitAutograd")
