"""The one statistics core of normlab.

Every normalization in normlab is two steps: statistics over *reduction dims*, then an affine
map over *feature dims*. This module is the first step, and the only place in the library that
computes a mean, a variance or an extremum of data:

* :func:`moments` — mean and biased variance over any set of dims, for the in-network norms.
* :class:`Moments` — the mergeable ``(count, mean, M2)`` triple (Chan, Golub & LeVeque 1979),
  for streaming scalers and, later, all-reduce across processes.
* :func:`extrema` — per-feature minimum and maximum, for Min-Max scaling.
* :func:`update_running` and :func:`momentum_factor` — BatchNorm's running statistics, the one
  rule that BatchNorm, BatchRenorm and SyncBatchNorm share.

Numerics (stated once for the whole library):

* Accumulation happens in float32 or wider, whatever the input dtype: fp16/bf16 are upcast
  (:func:`accumulation_dtype`), float64 stays float64.
* Variance is always centred — the corrected two-pass algorithm (:func:`centered`), or Chan's
  merge where data stream in — never ``E[x²] − E[x]²`` on raw data, so ``|mean| ≫ std``
  loses nothing beyond the resolution of the input itself. Variances are clamped at 0.

>>> import torch
>>> x = torch.tensor([[1., 2.], [3., 4.]])
>>> mean, var = moments(x, dims=(0,))
>>> mean
tensor([[2., 3.]])
>>> torch.allclose(var, torch.ones(1, 2))
True
>>> a = Moments.from_data(x[:1], dims=(0,)); b = Moments.from_data(x[1:], dims=(0,))
>>> (a + b).var(correction=1)
tensor([2., 2.])
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from .rules import error

__all__ = [
    "accumulation_dtype",
    "reduce_mean",
    "centered",
    "corrected_variance",
    "mean_square",
    "moments",
    "Moments",
    "extrema",
    "momentum_factor",
    "update_running",
    "check_writable",
]

Dims = Sequence[int]


def accumulation_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The dtype statistics are accumulated in: float32 at least, float64 if any input is.

    >>> accumulation_dtype(torch.bfloat16)
    torch.float32
    >>> accumulation_dtype(torch.float32, torch.float64)
    torch.float64
    """
    out = torch.float32
    for dt in dtypes:
        if dt is not None and dt.is_floating_point:
            out = torch.promote_types(out, dt)
    return out


def reduce_mean(x: Tensor, dims: Dims, keepdim: bool = True) -> Tensor:
    """Mean over ``dims``; over no dims it is a copy of ``x`` (``Tensor.mean(dim=())`` would
    reduce over every dim instead)."""
    dims = tuple(dims)
    return x.mean(dim=dims, keepdim=keepdim) if dims else x.clone()


def centered(x: Tensor, dims: Dims, dtype: torch.dtype | None = None,
             mean_dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """``(mean, d, r)``: the first pass of the corrected two-pass variance, in the
    accumulation dtype (``mean`` in ``mean_dtype`` if given: float64 keeps digits of a large
    offset that a float32 mean rounds away), reduced dims kept.

    ``d = x − m₀`` with ``m₀`` the computed mean, and ``r = mean(d)`` the rounding error
    ``m₀`` still carries; ``mean = m₀ + r`` is the refined mean, the exactly centred data is
    ``d − r`` and the variance ``mean(d²) − r²`` (Chan, Golub & LeVeque's corrected two-pass
    algorithm). A constant feature thus centres to exactly 0. Norms reuse ``d`` as the buffer
    of their output and fold ``− r`` into their affine step, so the refinement costs one
    reduction.
    """
    xa = x.to(dtype or accumulation_dtype(x.dtype))
    m0 = reduce_mean(xa, dims)
    d = xa - m0
    r = reduce_mean(d, dims)
    # an inf in the data makes m₀ that inf and r NaN (inf − inf): the mean is m₀ then, as torch's
    r = torch.where(torch.isfinite(m0), r, torch.zeros_like(r))
    if mean_dtype is not None:
        return m0.to(mean_dtype) + r.to(mean_dtype), d, r
    return m0 + r, d, r


def corrected_variance(d: Tensor, r: Tensor, dims: Dims) -> Tensor:
    """``mean((d − r)²) = mean(d²) − r²`` over ``dims``, clamped at 0 (see :func:`centered`)."""
    return (mean_square(d, dims) - r.square()).clamp(min=0)


def mean_square(x: Tensor, dims: Dims, keepdim: bool = True) -> Tensor:
    """``mean(x²)`` over ``dims``: the variance of centred data, or RMSNorm's statistic."""
    dims = tuple(dims)
    if not dims:
        return x.square()
    n = max(math.prod([x.shape[d] for d in dims]), 1)
    # squares of |x| ≳ 1.8e19 overflow float32: the norm runs on x divided by a power of two near
    # its largest magnitude (exact; a constant, so the gradient is unchanged), and the mean
    # square is (‖x/s‖·s/√n)², which overflows only where the mean square itself does
    with torch.no_grad():
        # (2^k as pow, not exp2: an exported model's ONNX has Pow)
        s = torch.pow(2.0, torch.floor(torch.log2(x.detach().abs().amax(dim=dims, keepdim=True))))
        s = torch.where(torch.isfinite(s) & (s > 0), s, torch.ones_like(s))
    if torch.is_grad_enabled() and x.requires_grad:
        # recorded for autograd: squares, whose second derivative exists everywhere (the norm's
        # does not at a group of zeros, a constant channel once centred); (m·s)·s overflows only
        # where the mean square does
        ms = (x / s).square().mean(dim=dims, keepdim=True) * s * s
    else:  # vector_norm fuses square and sum in one pass
        ms = (torch.linalg.vector_norm(x / s, 2, dim=dims, keepdim=True) * (s / math.sqrt(n))).square()
    return ms if keepdim else ms.squeeze(dims)


def moments(
    x: Tensor,
    dims: Dims,
    *,
    center: bool = True,
    keepdim: bool = True,
    dtype: torch.dtype | None = None,
) -> tuple[Tensor | None, Tensor]:
    """Mean and biased variance of ``x`` over ``dims``, accumulated in float32 or wider.

    With ``center=False`` the mean is not subtracted: the result is ``(None, mean(x²))``, the
    statistic of RMSNorm ("LayerNorm without centering") and of Weight/Cosine Norm.

    Args:
        x: any floating-point tensor.
        dims: the reduction dims.
        center: subtract the mean (default) or not.
        keepdim: keep reduced dims as size 1, so the results broadcast against ``x``.
        dtype: accumulation dtype; default :func:`accumulation_dtype` of ``x``.

    Returns:
        ``(mean, var)`` in the accumulation dtype. ``var`` is ``mean((x − mean)²)`` (divisor
        ``n``) by two passes, so it is exact to rounding when ``|mean| ≫ std``. The ops are
        differentiable, so the autograd backward passes can recompute statistics for double
        backward.
    """
    dims = tuple(dims)
    if not center:
        return None, mean_square(x.to(dtype or accumulation_dtype(x.dtype)), dims, keepdim)
    mean, d, r = centered(x, dims, dtype)
    var = corrected_variance(d, r, dims)
    if not keepdim:
        mean, var = mean.squeeze(dims), var.squeeze(dims)
    return mean, var


@dataclass(frozen=True)
class Moments:
    """Mergeable first and second moments: ``count``, ``mean`` and ``m2 = Σ(x − mean)²``.

    Two triples computed on disjoint parts of the data merge into the triple of their union,
    exactly up to rounding (Chan, Golub & LeVeque, "Updating formulae and a pairwise algorithm
    for computing sample variances", 1979)::

        n = nₐ + n_b,   δ = mean_b − meanₐ
        mean = meanₐ + δ·n_b/n,   m2 = m2ₐ + m2_b + δ²·nₐ·n_b/n

    That is what lets a scaler stream (``partial_fit``) and processes all-reduce statistics.
    ``count`` is per feature, so NaN can be ignored feature by feature.
    """

    count: Tensor
    mean: Tensor
    m2: Tensor

    @classmethod
    def from_data(
        cls,
        x: Tensor,
        dims: Dims = (0,),
        *,
        ignore_nan: bool = False,
        dtype: torch.dtype | None = None,
        weight: Tensor | None = None,
    ) -> "Moments":
        """The triple of ``x`` reduced over ``dims`` (reduced dims dropped).

        ``ignore_nan=True`` skips NaN values, so each feature has its own count. ``weight``
        (non-negative, broadcasting against ``x``) makes it the weighted triple: ``count = Σw``,
        ``mean = Σw·x/Σw``, ``m2 = Σw·(x − mean)²``, which merges as the unweighted one does.
        """
        dims = tuple(dims)
        xa = x.to(dtype or accumulation_dtype(x.dtype))
        if weight is not None:
            valid = ~torch.isnan(xa) if ignore_nan else torch.ones_like(xa, dtype=torch.bool)
            w = torch.where(valid, weight.to(xa.dtype), 0)
            count = w.sum(dim=dims)
            safe = torch.where(count > 0, count, torch.ones_like(count))
            mean = torch.where(valid, xa * w, 0).sum(dim=dims) / safe
            d = torch.where(valid, xa - _unsqueeze_dims(mean, dims, xa.dim()), 0)
            m2 = (w * d.square()).sum(dim=dims) - (w * d).sum(dim=dims).square() / safe
            return cls(count, mean, m2.clamp(min=0))
        if not ignore_nan:
            n = 1
            for d in dims:
                n *= x.shape[d]
            count = torch.full_like(xa.sum(dim=dims), float(n))
            if n == 0:
                zero = torch.zeros_like(count)
                return cls(count, zero, zero.clone())
            mean, var = moments(xa, dims, keepdim=False)
            return cls(count, mean, var * count)
        valid = ~torch.isnan(xa)
        count = valid.sum(dim=dims, dtype=xa.dtype)
        safe = count.clamp(min=1)
        mean = torch.where(valid, xa, 0).sum(dim=dims) / safe
        d = torch.where(valid, xa - _unsqueeze_dims(mean, dims, xa.dim()), 0)
        # corrected two-pass: the second term removes the rounding error left in `mean`
        m2 = d.square().sum(dim=dims) - d.sum(dim=dims).square() / safe
        return cls(count, mean, m2.clamp(min=0))

    @classmethod
    def empty(cls, shape, *, dtype=torch.float64, device=None) -> "Moments":
        """The identity of :meth:`merge`: zero count, zero mean, zero m2."""
        z = torch.zeros(shape, dtype=dtype, device=device)
        return cls(z, z.clone(), z.clone())

    def merge(self, other: "Moments") -> "Moments":
        """Moments of the union of the two data sets (Chan et al.)."""
        n = self.count + other.count
        safe = torch.where(n > 0, n, torch.ones_like(n))
        delta = other.mean - self.mean
        w = other.count / safe
        mean = self.mean + delta * w
        m2 = self.m2 + other.m2 + delta.square() * self.count * w
        return Moments(n, mean, m2)

    __add__ = merge

    def var(self, correction: int = 0) -> Tensor:
        """Variance with divisor ``count − correction`` (0: biased; 1: unbiased).

        Where the divisor is not positive the result is NaN, as in ``torch.var``.
        """
        denom = self.count - correction
        out = self.m2 / torch.where(denom > 0, denom, torch.ones_like(denom))
        return torch.where(denom > 0, out.clamp(min=0), torch.full_like(out, float("nan")))

    def to(self, *args, **kwargs) -> "Moments":
        """Move or cast all three tensors (``Tensor.to`` arguments)."""
        return Moments(*(t.to(*args, **kwargs) for t in (self.count, self.mean, self.m2)))


def extrema(
    x: Tensor, dims: Dims = (0,), *, ignore_nan: bool = False, keepdim: bool = False
) -> tuple[Tensor, Tensor]:
    """Per-feature ``(min, max)`` of ``x`` over ``dims`` (``keepdim``: reduced dims kept).

    With ``ignore_nan=True`` NaN values are skipped; a feature with no finite-or-infinite value
    left (all NaN) gets NaN for both.
    """
    dims = tuple(dims)
    if not ignore_nan:
        return x.amin(dim=dims, keepdim=keepdim), x.amax(dim=dims, keepdim=keepdim)
    nan = torch.isnan(x)
    lo = torch.where(nan, float("inf"), x).amin(dim=dims, keepdim=keepdim)
    hi = torch.where(nan, float("-inf"), x).amax(dim=dims, keepdim=keepdim)
    empty = nan.all(dim=dims, keepdim=keepdim) if x.numel() else torch.ones_like(lo, dtype=torch.bool)
    return torch.where(empty, float("nan"), lo), torch.where(empty, float("nan"), hi)


def momentum_factor(momentum: float | None, num_batches_tracked: Tensor | int) -> float:
    """The weight of a new batch in the running statistics (torch.nn's convention): ``momentum``,
    or, where it is ``None``, the cumulative average's ``1/(t + 1)`` for the batch after ``t``.

    >>> momentum_factor(0.1, 7), momentum_factor(None, 3)
    (0.1, 0.25)
    """
    return 1.0 / (float(num_batches_tracked) + 1.0) if momentum is None else momentum


@torch.no_grad()
def update_running(running_mean: Tensor | None, running_var: Tensor | None, mean: Tensor, var: Tensor,
                   momentum: float) -> None:
    r"""BatchNorm's running statistics after a training batch (Ioffe & Szegedy 2015, §3.1, with
    torch.nn's convention for the momentum):

    .. math::

        \text{running} \leftarrow (1 - m)\,\text{running} + m\,\text{batch}

    for the mean, and for the variance with the batch's *unbiased* variance ``var``, which the
    caller passes (``n/(n − 1)`` times the biased one). The mix is computed in float64 and stored
    in each buffer's dtype (an fp16 buffer never holds an intermediate), and both new values exist
    before either buffer is written, so a failure changes neither. ``None`` buffers are skipped.
    The compiled core applies the same rule in C++ (tested equal).

    >>> rm, rv = torch.zeros(2), torch.ones(2)
    >>> update_running(rm, rv, torch.tensor([1., 2.]), torch.tensor([3., 5.]), 0.5)
    >>> rm, rv
    (tensor([0.5000, 1.0000]), tensor([2., 3.]))
    """
    pairs = [(t, b) for t, b in ((running_mean, mean), (running_var, var)) if t is not None]
    for name, t in (("running_mean", running_mean), ("running_var", running_var)):
        check_writable(t, name)
    new = [(t.double() * (1 - momentum) + b.double().reshape(t.shape) * momentum).to(t.dtype) for t, b in pairs]
    for (t, _), v in zip(pairs, new):
        t.copy_(v)


def check_writable(t: Tensor | None, name: str) -> None:
    """Refuse, before either buffer is written, a running statistic that an in-place update
    cannot write: an expanded tensor or one made under ``torch.inference_mode()``. The compiled
    core says the same; the fallback on torch's own ops calls this before torch writes.

    >>> check_writable(torch.zeros(3), "running_mean")   # a plain buffer: fine
    """
    if t is None or torch.compiler.is_compiling():  # (dynamo cannot trace is_inference; functionalized
        return  # updates write no buffer in place)
    why = None
    if t.is_inference() and not torch.is_inference_mode_enabled():
        why = "it was made under torch.inference_mode()"
    elif torch._debug_has_internal_overlap(t) == 1:  # 1: some elements share one memory location
        why = "several of its elements share one memory location (an expanded tensor)"
    if why:
        raise error("unwritable", name=name, why=why)


def _unsqueeze_dims(t: Tensor, dims: tuple[int, ...], ndim: int) -> Tensor:
    for d in sorted(d % ndim for d in dims):
        t = t.unsqueeze(d)
    return t
