r"""The written-out backward pass shared by every normalization in normlab.

Every in-network norm is one op: statistics over reduction dims, then an affine map over
feature dims,

.. math::

    \hat x = (x - \mu)\cdot r,\qquad r = (\sigma^2 + \epsilon)^{-1/2},\qquad
    y = \gamma \hat x + \beta

(the survey “Norm相关总结” eq. 10–13; LayerNorm eq. 14–15, InstanceNorm eq. 16–17; RMSNorm drops the
centering, :math:`\hat x = x\cdot(\overline{x^2}+\epsilon)^{-1/2}`). BN, LN, IN and GN differ
only in which dims they reduce and how :math:`\gamma, \beta` broadcast, so one
:class:`NormalizeAffine` serves them all, and Weight and Cosine Norm reuse it with
:math:`\mu = 0`.

The backward is the survey “Norm相关总结” eq. (4)–(9), with :math:`m` the number of reduced values and
:math:`g = \partial l/\partial\hat x = \gamma\,\partial l/\partial y` (eq. 4). Substituting
eq. (5) :math:`\partial l/\partial\sigma^2 = -\tfrac12 r^3\sum g\,(x-\mu)` and eq. (6)
:math:`\partial l/\partial\mu = -r\sum g` into eq. (7) gives the x̂ form:

.. math::

    \frac{\partial l}{\partial x} = r\left(g - \overline{g} - \hat x\,\overline{g\hat x}\right)
    \qquad\text{(centred; without centering drop } \overline{g}\text{)}

    \frac{\partial l}{\partial\gamma} = \sum \frac{\partial l}{\partial y}\hat x
    \;\text{(eq. 8)},\qquad
    \frac{\partial l}{\partial\beta} = \sum \frac{\partial l}{\partial y}\;\text{(eq. 9)}

where bars are means over the reduction dims and the sums run over every dim that
:math:`\gamma` broadcasts along. When the statistics are fixed (BatchNorm in eval mode, using
running statistics) :math:`\mu, r` are constants and :math:`\partial l/\partial x = r g`.

The backward is built from differentiable torch ops, recomputing the statistics from the saved
input when a graph is being built, so double backward (gradient penalties) is exact.

:func:`normalize_affine` is the entry point. This is the reference path (the ``"reference"``
backend, ``torch.func`` transforms) and the oracle of the compiled core of
:mod:`normlab.kernels`, whose C++ operators implement the same formulas.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from .stats import accumulation_dtype, centered, corrected_variance, mean_square, moments, reduce_mean

__all__ = ["NormalizeAffine", "normalize_affine", "affine_forward", "affine_backward"]


def _affine(y: Tensor, x: Tensor, rstd: Tensor, weight, bias, mean) -> Tensor:
    """``(y − mean)·rstd·γ + β`` with as few passes over ``y`` as the shapes allow
    (``mean``: a running mean, or the residual of :func:`~normlab.stats.centered`).

    When ``rstd·γ`` is smaller than ``y`` (BN: both per channel) it is folded into one scale
    and shift, the affine view of Lesson 14.1 §2.2; otherwise (LN: rstd per row, γ per column)
    the factors are applied in turn, in place on ``y`` unless ``y`` is the caller's ``x``.
    """
    small = weight is None or math.prod(torch.broadcast_shapes(rstd.shape, weight.shape)) < y.numel()
    if small:
        scale = _scale(rstd, weight)
        shift = None if mean is None else -mean * scale
        if bias is not None:
            shift = bias if shift is None else shift + bias
        if shift is None:
            return y * scale if y is x else y.mul_(scale)
        return torch.addcmul(shift, y, scale)
    if torch.compiler.is_compiling():  # out of place: dynamo may differentiate this forward itself
        y = y if mean is None else y - mean
        y = y * rstd * weight
        return y if bias is None else y + bias
    if y is x:
        y = y.clone()
    if mean is not None:
        y.sub_(mean)
    y.mul_(rstd)
    y.mul_(weight)
    return y if bias is None else y.add_(bias)


def affine_forward(x: Tensor, weight: Tensor | None, bias: Tensor | None, dims: Sequence[int], eps: float,
                   center: bool = True, fixed_mean: Tensor | None = None, fixed_var: Tensor | None = None
                   ) -> tuple[Tensor, Tensor, Tensor]:
    """The forward of :class:`NormalizeAffine` in plain torch ops, without its autograd Function:
    ``(y, mean, var)`` as ``apply`` returns them. What ``torch.jit.trace`` records where an
    exporter needs plain ops (ONNX's TorchScript exporter has no ``aten::rms_norm``)."""
    acc = accumulation_dtype(x.dtype, *(t.dtype for t in (weight, bias, fixed_mean, fixed_var) if t is not None))
    batch_stats = fixed_var is None
    if batch_stats:  # y starts as the centred copy the variance pass needs anyway
        if center and torch.compiler.is_compiling():
            # one read of x fewer than the two passes below: inductor lowers var_mean to one
            # Welford reduction, here of the data shifted by the first value of each group (as the
            # core's kernels shift their sums), so a large common offset cancels before anything
            # is rounded; the shifted data is recomputed inside the map, which it fuses with
            mean, var, y = _shifted_var_mean(x.to(acc), dims)
            shift = None
        elif center:
            mean, y, shift = centered(x, dims, acc)  # y − shift is exactly centred
            var = corrected_variance(y, shift, dims)
        else:
            mean, y, shift = None, x.to(acc), None
            var = mean_square(y, dims)
    else:
        # copies: a later in-place update of the running buffers must not reach the
        # tensors saved for backward (a graph built in eval, then a train step)
        mean = fixed_mean.to(acc, copy=True) if center else None
        var = fixed_var.to(acc, copy=True)
        # x − μ first (promoted to acc): folding μ into the shift would cancel
        # catastrophically when x sits far from 0
        y, shift = (x - mean, None) if center else (x.to(acc), None)
    rstd = torch.rsqrt(var + eps)
    y = _affine(y, x, rstd, weight, bias, shift)
    return y.to(x.dtype), (mean if center else var.new_zeros(())), var


def _shifted_var_mean(xa: Tensor, dims: Sequence[int]) -> tuple[Tensor, Tensor, Tensor]:
    """``(mean, biased var, x − mean)`` over ``dims`` (kept) from the data shifted by its first
    value in each group (0 where that value is not finite: an inf then reaches the mean)."""
    shift = xa
    for d in dims:
        shift = shift.narrow(d, 0, 1)
    shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
    d = xa - shift
    var, md = torch.var_mean(d, dims, correction=0, keepdim=True)
    return shift + md, var, d - md


class NormalizeAffine(torch.autograd.Function):
    """``y = γ·(x − μ)·rsqrt(σ² + ε) + β`` over ``dims``; backward written out (module doc).

    ``apply(x, weight, bias, dims, eps, center, fixed_mean, fixed_var)`` returns
    ``(y, mean, var)``: ``y`` in ``x``'s dtype, and the (non-differentiable) statistics used,
    in the accumulation dtype, with reduced dims kept. ``weight``/``bias`` are ``None`` or
    tensors that broadcast against ``x``. ``fixed_var`` (and ``fixed_mean`` when centring)
    replace the batch statistics, as BatchNorm does in eval mode.
    """

    # forward and setup_context are separate (torch's newer style), so torch.func transforms
    # (grad, vmap, jacrev) work; vmap is derived from the ops themselves
    generate_vmap_rule = True

    @staticmethod
    def forward(x, weight, bias, dims, eps, center, fixed_mean, fixed_var):
        return affine_forward(x, weight, bias, dims, eps, center, fixed_mean, fixed_var)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, dims, eps, center, fixed_mean, fixed_var = inputs
        _, mean, var = output
        ctx.dims, ctx.center, ctx.eps, ctx.batch_stats = tuple(dims), center, eps, fixed_var is None
        # the bias itself is not needed by backward: keep only its shape and dtype
        ctx.bias_meta = (bias.shape, bias.dtype) if bias is not None else None
        # fixed statistics that are functions of something (SyncBatchNorm's all-reduced moments,
        # not running buffers): kept themselves, so that their gradients (eq. 5-6) and a graph
        # through them exist; running buffers are not kept (a later in-place update must not
        # invalidate this graph) and get no gradient, as torch refuses them requiring one
        ctx.fixed_meta = tuple(None if t is None else (t.shape, t.dtype) for t in (fixed_mean, fixed_var))
        fm, fv = (t if t is not None and t.requires_grad else None for t in (fixed_mean, fixed_var))
        rstd = torch.rsqrt(var + eps)
        ctx.save_for_backward(x, weight, mean, rstd, fm, fv)
        ctx.save_for_forward(x, weight, mean, rstd)
        ctx.mark_non_differentiable(mean, var)

    @staticmethod
    def jvp(ctx, dx, dw, db, _d, _e, _c, dmean, dvar):
        """Forward mode (``torch.func.jvp``, ``forward_ad``): the tangent of y from those of x, γ,
        β and fixed statistics. With batch statistics ``dx̂ = r·(ẋ − mean(ẋ) − x̂·mean(x̂·ẋ))``
        (without centering, no ``mean(ẋ)``): the same projection as the backward's, applied
        forward; with fixed statistics ``dx̂ = r·(ẋ − μ̇) − ½·x̂·r²·σ̇²``. Then
        ``ẏ = γ·dx̂ + γ̇·x̂ + β̇``."""
        x, weight, mean, rstd = ctx.saved_tensors
        dims, acc = ctx.dims, rstd.dtype
        xa = x.to(acc)
        xhat = ((xa - mean) if ctx.center else xa) * rstd
        dy = torch.zeros_like(xhat)
        if dx is not None:
            d = dx.to(acc)
            if ctx.batch_stats:
                proj = xhat * reduce_mean(xhat * d, dims)
                d = d - (proj + reduce_mean(d, dims) if ctx.center else proj)
            dy = dy + (d * rstd if weight is None else d * rstd * weight)
        if not ctx.batch_stats and (dmean is not None and ctx.center or dvar is not None):
            d = torch.zeros_like(xhat)
            if dmean is not None and ctx.center:
                d = d - dmean.to(acc) * rstd
            if dvar is not None:
                d = d - 0.5 * xhat * rstd.square() * dvar.to(acc)
            dy = dy + (d if weight is None else d * weight)
        if dw is not None:
            dy = dy + xhat * dw
        if db is not None:
            dy = dy + db
        return dy.to(x.dtype), None, None

    @staticmethod
    def backward(ctx, dy, _dmean, _dvar):
        x, weight, mean, rstd, fm, fv = ctx.saved_tensors
        need = ctx.needs_input_grad[:3]
        need_m, need_v = (ctx.needs_input_grad[6] and ctx.center), ctx.needs_input_grad[7]
        if torch.compiler.is_compiling():  # dynamo's needs_input_grad can be stale under torch.func
            need = (True, weight is not None, ctx.bias_meta is not None)
            need_m, need_v = fm is not None and ctx.center, fv is not None
        # Without a graph to build, two x-sized buffers are reused in place (the reference
        # path is memory-bound and fresh allocations cost page faults). Double backward
        # builds a graph through the same formula, out of place.
        # (dynamo refuses strided out=, and vmap — torch.func, is_grads_batched — refuses out=)
        inplace = not (torch.is_grad_enabled() or torch.compiler.is_compiling() or _transformed(dy))
        if not inplace and (fm is not None or fv is not None):  # a graph through the fixed statistics too
            acc = rstd.dtype
            mean = fm.to(acc) if fm is not None else mean
            rstd = torch.rsqrt(fv.to(acc) + ctx.eps) if fv is not None else rstd
        grads = affine_backward(dy, x, weight, mean, rstd, ctx.dims, ctx.eps, ctx.center, ctx.batch_stats,
                                ctx.bias_meta, need, inplace)
        dmean = dvar = None
        if not ctx.batch_stats and (need_m or need_v):
            # eq. (6) and (5) with the statistics given: ∂l/∂μ = −Σ γ·r·∂l/∂y,
            # ∂l/∂σ² = −½ Σ γ·∂l/∂y·x̂·r²
            acc = rstd.dtype
            g = dy.to(acc) if weight is None else dy.to(acc) * weight
            if need_m:
                shape, dtype = ctx.fixed_meta[0]
                dmean = (-(g * rstd)).sum_to_size(shape).to(dtype)
            if need_v:
                xhat = ((x.to(acc) - mean) if ctx.center else x.to(acc)) * rstd
                shape, dtype = ctx.fixed_meta[1]
                dvar = (-0.5 * g * xhat * rstd.square()).sum_to_size(shape).to(dtype)
        return (*grads, None, None, None, dmean, dvar)


def affine_backward(dy: Tensor, x: Tensor, weight: Tensor | None, mean: Tensor, rstd: Tensor, dims: Sequence[int],
                    eps: float, center: bool, batch_stats: bool, bias_meta, need=(True, True, True),
                    inplace: bool = False, acc: torch.dtype | None = None
                    ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """``(∂l/∂x, ∂l/∂γ, ∂l/∂β)`` of :class:`NormalizeAffine` (module doc: the survey's eq. (4)–(9)
    in x̂ form; with fixed statistics ``∂l/∂x = r·γ·∂l/∂y``), ``None`` where ``need`` says no.
    ``mean``, ``rstd``: the statistics of the forward (with batch statistics and ``inplace=False``
    they are recomputed from ``x``, so that a graph built through this — double backward —
    depends on x through them: they may then be ``None``, with ``acc`` the accumulation dtype);
    ``bias_meta``: β's ``(shape, dtype)``, or ``None``."""
    acc = acc or rstd.dtype
    need_x, need_w, need_b = need
    if batch_stats and not inplace:
        mean, var = moments(x, dims, center=center, dtype=acc)
        rstd = torch.rsqrt(var + eps)
    dya = dy.to(acc)
    dx = dw = db = None
    if need_b:
        shape, dtype = bias_meta
        db = dya.sum_to_size(shape).to(dtype)  # eq. (9)
    if not batch_stats and not need_w:  # fixed statistics: ∂l/∂x = r·γ·∂l/∂y, no x̂ needed
        return ((dya * _scale(rstd, weight)).to(x.dtype) if need_x else None), dw, db
    xa = x.to(acc)
    xhat = xa - mean if center else xa * rstd  # buffer A
    if center:
        xhat = xhat.mul_(rstd) if inplace else xhat * rstd
    buf = dya * xhat  # buffer B
    if need_w:
        dw = buf.sum_to_size(weight.shape).to(weight.dtype)  # eq. (8)
        if dw is buf:  # nothing was summed: buf is reused below
            dw = dw.clone()
    if not need_x:
        return dx, dw, db
    if not batch_stats:
        dx = torch.mul(dya, _scale(rstd, weight), out=buf if inplace else None)
        return dx.to(x.dtype), dw, db
    # eq. (5)-(7) in x̂ form: ∂l/∂x = r·(g − mean(g) − x̂·mean(g·x̂)), g = γ·∂l/∂y (eq. 4)
    if _constant_over(weight, dims, x.dim()):
        # γ constant where the means run (BN, IN): mean(g) = γ·mean(dy) and mean(g·x̂) =
        # γ·mean(dy·x̂), so g is never built and γ joins r in one per-statistic scale
        r, g = _scale(rstd, weight), dya
        gx_mean = reduce_mean(buf, dims)
    else:  # LN, GN: γ varies inside a statistic's group
        buf = buf.mul_(weight) if inplace else buf * weight
        gx_mean = reduce_mean(buf, dims)
        r, g = rstd, torch.mul(dya, weight, out=buf if inplace else None)  # B is free again: it takes g
    proj = xhat.mul_(gx_mean) if inplace else xhat * gx_mean
    if center:
        g_mean = reduce_mean(g, dims)
        proj = proj.add_(g_mean) if inplace else proj + g_mean
    dx = torch.sub(g, proj, out=proj).mul_(r) if inplace else (g - proj) * r
    return dx.to(x.dtype), dw, db


def _transformed(t: Tensor) -> bool:
    """A torch.func transform (vmap, grad, jacrev) is active, or ``t`` is a batched tensor of
    ``autograd.grad(..., is_grads_batched=True)``: vmap refuses ``out=``."""
    return torch._C._are_functorch_transforms_active() or (  # (dynamo cannot trace the second)
        not torch.compiler.is_compiling() and torch._C._functorch.is_legacy_batchedtensor(t))


def _scale(rstd: Tensor, weight: Tensor | None) -> Tensor:
    return rstd if weight is None else rstd * weight


def _constant_over(weight: Tensor | None, dims: Sequence[int], ndim: int) -> bool:
    """``weight`` (broadcast against an ``ndim``-D input) does not vary along ``dims``."""
    if weight is None:
        return True
    shape = (1,) * (ndim - weight.dim()) + tuple(weight.shape)
    return all(shape[d % ndim] == 1 for d in dims)


def normalize_affine(
    x: Tensor,
    dims: Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    *,
    center: bool = True,
    fixed_mean: Tensor | None = None,
    fixed_var: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Functional entry point of the reference: ``(y, mean, var)`` as :class:`NormalizeAffine`
    returns them (the compiled core's operators are :mod:`normlab.kernels`' business). Being
    compiled, the forward's plain ops (:func:`affine_forward`), which dynamo traces (it refuses an
    autograd.Function with a custom ``jvp``) and inductor fuses with their neighbours; autograd
    then derives their backward."""
    if torch.compiler.is_compiling():
        return affine_forward(x, weight, bias, tuple(dims), eps, center, fixed_mean, fixed_var)
    return NormalizeAffine.apply(x, weight, bias, tuple(dims), eps, center, fixed_mean, fixed_var)
