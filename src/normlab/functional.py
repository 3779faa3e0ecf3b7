r"""The normalization ops, with torch.nn.functional's signatures.

Each in-network norm only chooses its reduction dims and how γ/β broadcast, then calls the one
op :func:`normlab.autograd.normalize_affine` (statistics from :mod:`normlab.stats`, backward
written out from the survey “Norm相关总结” eq. 4–9):

============  ===============================  ======================================
op            statistics over                  γ, β per
============  ===============================  ======================================
batch_norm    (N, \*spatial), per channel      channel
layer_norm    the trailing ``normalized_shape``   element of ``normalized_shape``
instance_norm (\*spatial), per sample & channel   channel
group_norm    (C/G, \*spatial), per sample & group  channel (a reshape around LayerNorm)
rms_norm      like layer_norm, no centering    element of ``normalized_shape``
============  ===============================  ======================================

GroupNorm with one group is LayerNorm over (C, \*spatial); with C groups it is InstanceNorm:

>>> import torch
>>> x = torch.randn(2, 6, 5)
>>> torch.allclose(group_norm(x, 1), layer_norm(x, (6, 5)), atol=1e-6)
True
>>> torch.allclose(group_norm(x, 6), instance_norm(x), atol=1e-6)
True

Besides the in-network norms: :func:`cosine_linear` (the survey “Norm相关总结” eq. 20–26), and the classic
column scalings of Lesson 14.1, :func:`zscore` and :func:`minmax` (one-shot; to fit on training
data and apply to test data, use :mod:`normlab.preprocessing`).

Errors name the offending value and the fix; a failed call mutates nothing.
"""

from __future__ import annotations

import math
import operator
from typing import Sequence

import torch
from torch import Tensor

from . import kernels
from .autograd import affine_forward, normalize_affine
from .rules import error
from .stats import accumulation_dtype, check_writable, extrema, moments, update_running

kernels.load_core()  # built at first use, then loaded from the cache (kernels.build)

__all__ = [
    "batch_norm",
    "layer_norm",
    "instance_norm",
    "group_norm",
    "rms_norm",
    "cosine_linear",
    "weight_norm",
    "zscore",
    "minmax",
]


# --------------------------------------------------------------------------------- checks
def _not_a_tensor(x, who: str) -> TypeError:
    """The error for an input that is not a tensor; torch.fx's symbolic tracing is named."""
    if isinstance(x, torch.fx.Proxy):
        return TypeError(f"{who}: torch.fx.symbolic_trace cannot trace through normlab's layers; trace "
                         "normlab.convert.to_torch(model) instead, or use a torch.fx.Tracer whose is_leaf_module "
                         "returns True for them (where type(m).__module__ starts with 'normlab')")
    return TypeError(f"{who}: expected a torch.Tensor, got {type(x).__name__}; convert it first, e.g. "
                     "torch.as_tensor(x, dtype=torch.float32)")


def _check_input(x: Tensor, op: str, min_ndim: int = 1) -> None:
    if not isinstance(x, Tensor):
        raise _not_a_tensor(x, op)
    if not x.is_floating_point():
        raise error("input_dtype", op=op, dtype=x.dtype)
    if x.dim() < min_ndim:
        raise error("input_ndim", op=op, min_ndim=min_ndim, ndim=x.dim(), shape=tuple(x.shape))


def _int_arg(v, what: str, op: str) -> int:
    """An int argument as torch's functions take it (an int, a numpy int, a 0-d integer tensor),
    as a Python int; a bool, a float or a sequence is refused, on every route alike."""
    try:
        if isinstance(v, bool):
            raise TypeError
        return operator.index(v)
    except TypeError:
        raise error("int_arg", op=op, what=what, type=type(v).__name__) from None


def _require_values(x: Tensor, dims: Sequence[int], op: str) -> None:
    """Statistics over an empty set are an error; an input with no statistics to take (an empty
    batch of rows or samples) is not: it gives an empty output (the core's rule)."""
    dims = [d % x.dim() for d in dims] if x.dim() else []
    count = math.prod([n for d, n in enumerate(x.shape) if d not in dims])
    if math.prod([x.shape[d] for d in dims]) == 0 and count > 0:
        raise error("no_values", op=op, shape=tuple(x.shape), dims=tuple(dims))


def _normalize(op: str, x: Tensor, dims: Sequence[int], weight=None, bias=None, eps=1e-5, *, center=True,
               fixed_mean=None, fixed_var=None):
    """:func:`normalize_affine` with torch's rule for empty input: an empty batch gives an
    empty output (and no statistics) in the graph of x, γ and β (their gradients zeros, as
    torch's), but statistics over an empty set are an error."""
    if fixed_var is None:
        _require_values(x, dims, op)
    if x.numel() == 0:
        y = x.clone()
        if weight is not None:
            y = (y * weight).to(x.dtype)
        if bias is not None:
            y = (y + bias).to(x.dtype)
        return y, None, None
    return normalize_affine(x, dims, weight, bias, eps, center=center, fixed_mean=fixed_mean, fixed_var=fixed_var)


def _check_param(t: Tensor | None, name: str, shape: Sequence[int], op: str, x: Tensor, any_dtype: bool = False) -> None:
    """A parameter or running statistic fits ``x``: its shape, device and dtype (the core's checks);
    ``any_dtype``: RMSNorm's rule, where torch takes parameters of every float dtype."""
    if t is None:
        return
    if tuple(t.shape) != tuple(shape):
        raise error("param_shape", op=op, name=name, want=tuple(shape), got=tuple(t.shape))
    if t.is_meta and not x.is_meta:
        raise error("param_meta", op=op, name=name, device=x.device)
    if t.device != x.device:
        raise error("param_device", op=op, name=name, device=t.device, input_device=x.device)
    if not t.is_floating_point():
        raise error("param_float", op=op, name=name, dtype=t.dtype)
    if not (any_dtype or t.dtype == x.dtype or (t.dtype == torch.float32 and x.dtype in (torch.float16, torch.bfloat16))):
        raise error("param_dtype", op=op, name=name, dtype=t.dtype, input_dtype=x.dtype)


def _one_dtype(op: str, *params: tuple[Tensor | None, str]) -> None:
    """torch's rule: the parameters and running statistics given share one dtype."""
    given = [(t, name) for t, name in params if t is not None]
    for t, name in given[1:]:
        if t.dtype != given[0][0].dtype:
            raise error("one_dtype", op=op, name=name, dtype=t.dtype, first=given[0][1], first_dtype=given[0][0].dtype)


def _channels(x: Tensor, op: str, *params: tuple[Tensor | None, str]) -> int:
    c = x.shape[1]
    for t, name in params:
        _check_param(t, name, (c,), op, x)
    _one_dtype(op, *params)
    return c


def _per_channel(t: Tensor | None, ndim: int) -> Tensor | None:
    """View a (C,) tensor so it broadcasts along dim 1 of an ``ndim``-D input."""
    return None if t is None else t.view((-1,) + (1,) * (ndim - 2))


def _native() -> bool:
    """torch's own op after our checks: the "torch" backend (:func:`normlab.set_backend`), or
    "auto" where the compiled core is not there."""
    return kernels.native()


# --------------------------------------------------------------------------------- norms
def batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    r"""Batch Normalization of an (N, C, *) input: each channel with the batch's or the running statistics.

    .. math::

        y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \cdot \gamma + \beta

    With ``training=True`` the mean and biased variance of each channel over ``(N, *)``
    normalize and, when given, ``running_mean``/``running_var`` are updated in place with the
    unbiased batch variance, ``running = (1 − momentum)·running + momentum·batch`` (torch's
    convention; Keras's ``momentum=0.99`` is torch's ``0.01``). With ``training=False`` the running
    statistics normalize: the fixed affine map ``x·γ/√(σ²+ε) + (β − γμ/√(σ²+ε))`` of Lesson 14.1
    §2.2. The layer is :class:`normlab.nn.BatchNorm2d` (and 1d/3d); the backward is the survey
    “Norm相关总结” eq. (4)–(9).

    Source: Ioffe & Szegedy 2015, "Batch Normalization", Algorithm 1; the survey “Norm相关总结”
    eq. (10)–(13).

    Args:
        input (Tensor): ``(N, C)`` or ``(N, C, *)``, floating point.
        running_mean, running_var (Tensor or None): ``(C,)`` buffers; required with
            ``training=False``, updated in place with ``training=True``.
        weight, bias (Tensor or None): γ and β, ``(C,)``. Default: ``None`` (1 and 0).
        training (bool): normalize with the batch statistics. Default: ``False``.
        momentum (float): the weight of the batch in the running update. Default: ``0.1``.
        eps (float): ε inside the square root. Default: ``1e-5``.

    Shape:
        - Input: ``(N, C)`` or ``(N, C, *)``; statistics and parameters ``(C,)``
        - Output: the same shape as the input

    Example::

        >>> import torch, normlab.functional as F
        >>> x = torch.randn(16, 3) * 2 + 5
        >>> mean, var = torch.zeros(3), torch.ones(3)
        >>> y = F.batch_norm(x, mean, var, training=True)
        >>> torch.allclose(y, torch.nn.functional.batch_norm(x, None, None, training=True), atol=1e-5)
        True
        >>> torch.allclose(mean, 0.1 * x.mean(0))          # the running mean moved 10% of the way
        True
    """
    core = kernels.core("batch_norm")
    if core is not None:
        if core is kernels.TRACED and not (isinstance(input, Tensor) and input.dim() == 1 and input.numel() == 0):
            _check_channel_args("batch_norm", input, running_mean, running_var, weight, bias, training, eps)
        return core.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    return _channel_norm("batch_norm", input, (0, *range(2, input.dim())), running_mean, running_var,
                         weight, bias, training, momentum, eps)


# BatchNorm in parts, for the layers that do something between the statistics and the map:
# SyncBatchNorm all-reduces the statistics, BatchRenorm corrects them. The core's operators
# (normlab::batch_stats, batch_norm_apply, update_running) where it is there, else the reference.


def _batch_stats(input: Tensor) -> tuple[Tensor, Tensor]:
    """BatchNorm's batch statistics alone: per channel over ``(N, *)`` the mean and the biased
    variance, ``(C,)`` each in float64, differentiable functions of ``input``."""
    op = "batch_stats"  # (checked here on every route: normlab's exception classes)
    _check_input(input, op, min_ndim=2)
    dims = (0, *range(2, input.dim()))
    _require_values(input, dims, op)
    if kernels.core("batch_norm") is not None:
        return torch.ops.normlab.batch_stats(input)
    mean, var = moments(input, dims, keepdim=False, dtype=torch.float64)
    return mean, var


def _batch_norm_apply(input: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None,
                      eps: float) -> Tensor:
    """BatchNorm's map with the statistics given, ``(x − μ)·γ/√(σ² + ε) + β`` per channel: the
    gradients flow into ``mean`` and ``var`` too where they require them (the survey “Norm相关总结”
    eq. (5)–(6)), so statistics that are functions of the batch give BatchNorm's backward."""
    op = "batch_norm_apply"  # (checked here on every route: normlab's exception classes)
    _check_input(input, op, min_ndim=2)
    _channels(input, op, (weight, "weight"), (bias, "bias"))
    for t, name in ((mean, "mean"), (var, "var")):
        _check_param(t, name, (input.shape[1],), op, input, any_dtype=True)
    if not eps >= 0:
        raise error("eps", op=op, sign="non-negative", stats="given", eps=f"{eps:g}")
    if kernels.core("batch_norm") is not None:
        return torch.ops.normlab.batch_norm_apply(input, mean, var, weight, bias, eps)
    nd = input.dim()
    y = _normalize(op, input, (0, *range(2, nd)), _per_channel(weight, nd), _per_channel(bias, nd), eps,
                   fixed_mean=_per_channel(mean, nd), fixed_var=_per_channel(var, nd))[0]
    return kernels.keep_format(y, input)  # the core's strides


def _update_running(running_mean: Tensor | None, running_var: Tensor | None, mean: Tensor, var: Tensor,
                    momentum: float) -> None:
    """BatchNorm's rule for the running statistics (:func:`normlab.stats.update_running`), in
    the core where it is there; ``var`` is the unbiased variance."""
    if kernels.core("batch_norm") is not None:
        torch.ops.normlab.update_running(running_mean, running_var, mean.detach(), var.detach(), momentum)
    else:
        update_running(running_mean, running_var, mean.detach(), var.detach(), momentum)


def instance_norm(
    input: Tensor,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    use_input_stats: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    r"""Instance Normalization of an (N, C, *) input: each channel of each sample with its own statistics.

    .. math::

        y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \cdot \gamma + \beta

    The mean and biased variance over ``(*)`` per sample and channel normalize when
    ``use_input_stats``; running buffers, when given, are then updated with the batch average of
    the per-instance mean and unbiased variance (torch's rule). With ``use_input_stats=False``
    the running statistics normalize, as BatchNorm in eval. The layer is
    :class:`normlab.nn.InstanceNorm2d` (and 1d/3d).

    Source: Ulyanov, Vedaldi & Lempitsky 2016, "Instance Normalization"; the survey “Norm相关总结”
    eq. (16)–(17).

    Args:
        input (Tensor): ``(N, C, *)`` with at least one spatial dim.
        running_mean, running_var (Tensor or None): ``(C,)`` buffers. Default: ``None``.
        weight, bias (Tensor or None): γ and β, ``(C,)``. Default: ``None``.
        use_input_stats (bool): normalize with each instance's statistics. Default: ``True``.
        momentum (float): the weight of the batch in the running update. Default: ``0.1``.
        eps (float): ε inside the square root. Default: ``1e-5``.

    Shape:
        - Input: ``(N, C, *)``; statistics and parameters ``(C,)``
        - Output: the same shape (and memory format) as the input

    Example::

        >>> import torch, normlab.functional as F
        >>> x = torch.randn(2, 3, 8, 8) * 4 + 1
        >>> y = F.instance_norm(x)
        >>> bool(y.mean((2, 3)).abs().max() < 1e-5), tuple(y.shape)
        (True, (2, 3, 8, 8))
    """
    core = kernels.core("instance_norm")
    if core is not None and core is not kernels.TRACED:  # the compiled core checks in C++
        return core.instance_norm(input, running_mean, running_var, weight, bias, use_input_stats, momentum, eps)
    if isinstance(input, Tensor) and input.dim() < 3:
        raise error("instance_ndim", ndim=input.dim(), shape=tuple(input.shape))
    if core is not None:  # being compiled: normlab's checks, then the traced operator
        _check_channel_args("instance_norm", input, running_mean, running_var, weight, bias, use_input_stats, eps)
        return core.instance_norm(input, running_mean, running_var, weight, bias, use_input_stats, momentum, eps)
    return _channel_norm("instance_norm", input, tuple(range(2, input.dim())), running_mean,
                         running_var, weight, bias, use_input_stats, momentum, eps)


def _torch_channel_norm(op, input, running_mean, running_var, weight, bias, batch_stats, momentum, eps):
    """torch's op with normlab's promises kept: running statistics updated all or nothing, the
    output in the input's memory format (torch's instance_norm returns channels_last input
    contiguous), and a graph built on the running statistics keeps copies of them, so a later
    training step that updates them in place does not invalidate it."""
    fn = torch.nn.functional.batch_norm if op == "batch_norm" else torch.nn.functional.instance_norm
    if batch_stats:  # torch writes running_mean before it finds running_var unwritable: refuse first
        check_writable(running_mean, "running_mean")
        check_writable(running_var, "running_var")
    if not batch_stats and (torch.is_grad_enabled() or torch.jit.is_tracing()):  # one graph for jit.trace
        running_mean, running_var = running_mean.clone(), running_var.clone()
    return kernels.keep_format(fn(input, running_mean, running_var, weight, bias, batch_stats, momentum, eps), input)


def _check_channel_args(op, input, running_mean, running_var, weight, bias, batch_stats, eps) -> None:
    """The checks of BatchNorm and InstanceNorm before anything is computed (the core's, in its
    order): the input, each per-channel tensor's shape, device and dtype, running statistics that
    require grad, ε, running statistics missing where they are needed. SyncBatchNorm runs them too."""
    _check_input(input, op, min_ndim=2)
    _channels(input, op, (running_mean, "running_mean"), (running_var, "running_var"), (weight, "weight"),
              (bias, "bias"))
    for t, name in ((running_mean, "running_mean"), (running_var, "running_var")):
        if t is not None and t.requires_grad and torch.is_grad_enabled():  # torch refuses this too
            raise error("running_grad", op=op, name=name)
    positive = op == "batch_norm" and batch_stats  # torch's rule for ε: InstanceNorm takes 0 either way
    if not (eps > 0 if positive else eps >= 0):
        raise error("eps", op=op, sign="positive" if positive else "non-negative",
                    stats="batch" if batch_stats else "running", eps=f"{eps:g}")
    if not batch_stats and (running_mean is None or running_var is None):
        raise error("running_required", op=op)


def _channel_norm(op, input, dims, running_mean, running_var, weight, bias, batch_stats, momentum, eps):
    """BatchNorm and InstanceNorm: per-channel parameters and running statistics, reduction
    over ``dims``; batch statistics (updating the running ones) or the running ones."""
    if op == "batch_norm" and isinstance(input, Tensor) and input.dim() == 1 and input.numel() == 0:
        _check_input(input, op)
        return input.clone()  # torch's answer for a 1-D empty batch
    _check_channel_args(op, input, running_mean, running_var, weight, bias, batch_stats, eps)
    nd, c = input.dim(), input.shape[1]
    w, b = _per_channel(weight, nd), _per_channel(bias, nd)
    if input.numel() == 0:  # an empty batch: an empty output, the running statistics as they were
        return _normalize(op, input, (), w, b, eps)[0]
    if not batch_stats:
        if _native():  # torch's op, after our checks
            return _torch_channel_norm(op, input, running_mean, running_var, weight, bias, False, momentum, eps)
        y = _normalize(op, input, dims, w, b, eps, fixed_mean=_per_channel(running_mean, nd),
                       fixed_var=_per_channel(running_var, nd))[0]
        return kernels.keep_format(y, input)  # the core's strides: channels_last kept, else contiguous
    n = math.prod([input.shape[d] for d in dims])
    if n == 1:
        raise error("channel_values", op=op, shape=tuple(input.shape))
    if _native():
        return _torch_channel_norm(op, input, running_mean, running_var, weight, bias, True, momentum, eps)
    if op == "instance_norm" and _is_channels_last(input):  # GroupNorm's view with one channel per group
        x, undo = _channels_last_groups(input, c)
        y, mean, var = _normalize(op, x, (1, 3), _flat_view(weight, c), _flat_view(bias, c), eps)
        y = undo(y)
    else:
        y, mean, var = _normalize(op, input, dims, w, b, eps)
    # InstanceNorm has one statistic per (sample, channel): the running ones get their average
    update_running(running_mean, running_var, mean.reshape(-1, c).mean(0),
                   var.reshape(-1, c).mean(0) * (n / (n - 1)), momentum)  # unbiased
    return kernels.keep_format(y, input)


def _trailing_dims(input: Tensor, normalized_shape, op: str) -> tuple[tuple[int, ...], tuple]:
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    k = len(shape)
    if k == 0 or tuple(input.shape[input.dim() - k:]) != shape or input.dim() < k:
        raise error("normalized_shape", op=op, normalized_shape=shape, shape=tuple(input.shape))
    return tuple(range(input.dim() - k, input.dim())), shape


def layer_norm(
    input: Tensor,
    normalized_shape: Sequence[int] | int,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    *,
    offset: float = 0.0,
) -> Tensor:
    r"""Layer Normalization over the last dims of the input: each sample with its own mean and variance.

    .. math::

        y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \cdot (o + \gamma) + \beta

    The mean and biased variance over the trailing ``normalized_shape`` dims; γ and β have that
    shape, and the offset ``o`` (0 by default) makes γ zero-centred: the scale is ``o + γ``, added
    in float32 or wider (see :func:`rms_norm`). The layer is :class:`normlab.nn.LayerNorm`.

    Source: Ba, Kiros & Hinton 2016, "Layer Normalization"; the survey “Norm相关总结” eq. (14)–(15).

    Args:
        input (Tensor): ``(*, *normalized_shape)``.
        normalized_shape (int or sequence of ints): the trailing dims to normalize over.
        weight, bias (Tensor or None): γ and β of shape ``normalized_shape``. Default: ``None``.
        eps (float): ε inside the square root. Default: ``1e-5``.
        offset (float, keyword-only): ``o``, added to γ; needs a weight. Default: ``0.0``.

    Shape:
        - Input: ``(*, *normalized_shape)``
        - Output: the same shape as the input

    Example::

        >>> import torch, normlab.functional as F
        >>> x = torch.randn(4, 10) * 3 + 7
        >>> torch.allclose(F.layer_norm(x, (10,)), torch.nn.functional.layer_norm(x, (10,)), atol=1e-5)
        True
    """
    weight = _offset_weight(weight, offset, "layer_norm")
    core = kernels.core("layer_norm")
    if core is not None and core is not kernels.TRACED:  # the compiled core checks in C++
        return core.layer_norm(input, normalized_shape, weight, bias, eps)
    op = "layer_norm"
    _check_input(input, op)
    dims, shape = _trailing_dims(input, normalized_shape, op)
    _check_param(weight, "weight", shape, op, input)
    _check_param(bias, "bias", shape, op, input)
    _one_dtype(op, (weight, "weight"), (bias, "bias"))
    if core is not None:  # being compiled: the checks above, then the traced operator
        _require_values(input, dims, op)
        return core.layer_norm(input, normalized_shape, weight, bias, eps)
    if _native():
        _require_values(input, dims, op)  # as the core and the reference: no statistics of nothing
        return torch.nn.functional.layer_norm(input, shape, weight, bias, eps)
    # contiguous, as torch's and the core's output whatever x's strides
    return _normalize(op, input, dims, weight, bias, eps)[0].contiguous()


def _offset_weight(weight: Tensor | None, offset: float, op: str) -> Tensor | None:
    """``offset + weight`` in float32 or wider: the scale of a zero-centred γ."""
    if offset == 0:
        return weight
    if not (isinstance(offset, (int, float)) and math.isfinite(offset)):
        raise ValueError(f"{op}: offset must be a finite number, got {offset!r}")
    if weight is None:
        raise ValueError(f"{op}: offset={offset} is added to weight, but weight is None; pass a weight "
                         f"(zeros for a scale of {offset})")
    return weight.to(torch.promote_types(weight.dtype, torch.float32)) + offset


def rms_norm(
    input: Tensor,
    normalized_shape: Sequence[int] | int,
    weight: Tensor | None = None,
    eps: float | None = None,
    *,
    offset: float = 0.0,
) -> Tensor:
    r"""Root Mean Square Normalization over the last dims: LayerNorm without the centering.

    .. math::

        y = \frac{x}{\sqrt{\mathrm{E}[x^2] + \epsilon}} \cdot (o + \gamma)

    The mean of squares over the trailing ``normalized_shape`` dims. ``eps=None`` means the
    machine epsilon of the dtype the statistics are computed in (float32 for fp16/bf16 input), as
    torch does. The offset ``o`` makes γ zero-centred (Gemma's ``x̂·(1 + w)``, Transformer
    Engine's ``zero_centered_gamma``): it is added to γ in float32 or wider, once per call on the
    γ-sized vector, and the sum scales x̂ in float32 before the one rounding to the input's dtype
    (a γ near 0 in bfloat16 keeps its digits). The layer is :class:`normlab.nn.RMSNorm`.

    Source: Zhang & Sennrich 2019, "Root Mean Square Layer Normalization".

    Args:
        input (Tensor): ``(*, *normalized_shape)``.
        normalized_shape (int or sequence of ints): the trailing dims to normalize over.
        weight (Tensor or None): γ of shape ``normalized_shape``. Default: ``None``.
        eps (float or None): ε inside the square root. Default: ``None``.
        offset (float, keyword-only): ``o``, added to γ; needs a weight. Default: ``0.0``.

    Shape:
        - Input: ``(*, *normalized_shape)``
        - Output: the same shape as the input

    Example::

        >>> import torch, normlab.functional as F
        >>> x = torch.randn(4, 10) * 3
        >>> torch.allclose(F.rms_norm(x, (10,)), torch.nn.functional.rms_norm(x, (10,)), atol=1e-5)
        True
        >>> w = torch.zeros(10)                        # zero-centred γ: a scale of 1 + 0
        >>> torch.allclose(F.rms_norm(x, (10,), w, offset=1.0), F.rms_norm(x, (10,)))
        True
    """
    weight = _offset_weight(weight, offset, "rms_norm")
    core = kernels.core("rms_norm")
    if core is not None and core is not kernels.TRACED:  # the compiled core checks in C++
        return core.rms_norm(input, normalized_shape, weight, eps)
    op = "rms_norm"
    _check_input(input, op)
    dims, shape = _trailing_dims(input, normalized_shape, op)
    _check_param(weight, "weight", shape, op, input, any_dtype=True)
    if core is not None:  # being compiled: the checks above, then the traced operator
        _require_values(input, dims, op)
        return core.rms_norm(input, normalized_shape, weight, eps)
    if _native() and not torch.jit.is_tracing():
        _require_values(input, dims, op)
        return torch.nn.functional.rms_norm(input, shape, weight, eps)
    if eps is None:  # torch's rule: the eps of the dtype the statistics are computed in
        eps = torch.finfo(accumulation_dtype(input.dtype)).eps
    if torch.jit.is_tracing():  # the reference's plain ops: ONNX's TorchScript exporter has no aten::rms_norm
        return kernels.keep_format(affine_forward(input, weight, None, dims, eps, center=False)[0], input)
    return kernels.keep_format(_normalize(op, input, dims, weight, None, eps, center=False)[0], input)


def group_norm(
    input: Tensor,
    num_groups: int,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    r"""Group Normalization: the channels split into groups, each group of each sample normalized alone.

    .. math::

        y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \cdot \gamma + \beta

    The mean and biased variance over the ``C / num_groups`` channels of a group and their
    spatial positions, per sample; γ and β per channel. It is a reshape around the LayerNorm
    core, ``(N, C, *S) → (N, G, C/G · ∏S)``. The layer is :class:`normlab.nn.GroupNorm`.

    Source: Wu & He 2018, "Group Normalization", §3.

    Args:
        input (Tensor): ``(N, C, *)``.
        num_groups (int): the number of groups; must divide ``C``.
        weight, bias (Tensor or None): γ and β, ``(C,)``. Default: ``None``.
        eps (float): ε inside the square root. Default: ``1e-5``.

    Shape:
        - Input: ``(N, C, *)``
        - Output: the same shape (and memory format) as the input

    Example::

        >>> import torch, normlab.functional as F
        >>> x = torch.randn(2, 6, 5)
        >>> torch.allclose(F.group_norm(x, 3), torch.nn.functional.group_norm(x, 3), atol=1e-5)
        True
    """
    num_groups = _int_arg(num_groups, "num_groups", "group_norm")
    core = kernels.core("group_norm")
    if core is not None and core is not kernels.TRACED:  # the compiled core checks in C++
        return core.group_norm(input, num_groups, weight, bias, eps)
    op = "group_norm"
    _check_input(input, op, min_ndim=2)
    c = _channels(input, op, (weight, "weight"), (bias, "bias"))
    if num_groups <= 0 or c % num_groups:
        raise error("groups_divide", groups=num_groups, channels=c)
    _require_values(input, range(1, input.dim()), op)
    if input.numel() and input.numel() // (input.shape[0] * num_groups) == 1:  # torch's rule, the core's words
        raise error("group_values", shape=tuple(input.shape), groups=num_groups)
    if core is not None:  # being compiled: the checks above, then the traced operator
        return core.group_norm(input, num_groups, weight, bias, eps)
    if _native():
        return torch.nn.functional.group_norm(input, num_groups, weight, bias, eps)
    n, cg = input.shape[0], c // num_groups
    if _is_channels_last(input):  # (N, *S, C) in memory: groups of adjacent channels, no copy
        x, undo = _channels_last_groups(input, num_groups)
        w = None if weight is None else weight.view(num_groups, cg)
        b = None if bias is None else bias.view(num_groups, cg)
        return undo(_normalize(op, x, (1, 3), w, b, eps)[0])
    x = input.contiguous().reshape(n, num_groups, cg, math.prod(input.shape[2:]))
    w = None if weight is None else weight.view(num_groups, cg, 1)
    b = None if bias is None else bias.view(num_groups, cg, 1)
    y = _normalize(op, x, (2, 3), w, b, eps)[0]
    return kernels.keep_format(y.reshape(input.shape), input)


def _flat_view(t: Tensor | None, c: int) -> Tensor | None:
    return None if t is None else t.view(c, 1)


def _is_channels_last(x: Tensor) -> bool:
    fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(x.dim())
    return fmt is not None and not x.is_contiguous() and x.is_contiguous(memory_format=fmt)


def _channels_last_groups(x: Tensor, groups: int):
    """``x (N, C, *S)`` stored channels_last as the contiguous view ``(N, ∏S, G, C/G)``, and the
    function that turns a result of that shape back into ``x``'s shape and layout (no copies)."""
    n, c, spatial = x.shape[0], x.shape[1], x.shape[2:]
    perm = (0, *range(2, x.dim()), 1)
    view = x.permute(perm).reshape(n, math.prod(spatial), groups, c // groups)
    inverse = (0, x.dim() - 1, *range(1, x.dim() - 1))

    def undo(y: Tensor) -> Tensor:
        return y.reshape(n, *spatial, c).permute(inverse)

    return view, undo


# --------------------------------------------------------------------------- weight-side
def weight_norm_dims(v: Tensor, dim: int | None) -> tuple[int, ...]:
    """The dims ``‖v‖`` is taken over in weight norm: all but ``dim`` (``None`` or ``-1``: all,
    torch's rule)."""
    if dim is None or dim == -1:
        return tuple(range(v.dim()))
    if not -v.dim() <= dim < v.dim():
        raise IndexError(f"weight_norm: dim={dim} is out of range for a {v.dim()}-D weight of shape {tuple(v.shape)}")
    return tuple(i for i in range(v.dim()) if i != dim % v.dim())


def weight_norm(v: Tensor, g: Tensor, dim: int | None = 0) -> Tensor:
    r"""Weight Normalization of a tensor: a length g times the direction v/‖v‖, with its written-out backward.

    .. math::

        w = g \, \frac{v}{\lVert v \rVert}

    ``‖v‖`` is taken over every dim except ``dim`` (``dim=None``: over the whole tensor), so
    each output unit gets its own direction and length; as in torch, ``dim=-1`` also means the
    whole tensor. It is the normalization core with μ = 0 and σ = ‖v‖/√n, whose backward is the
    projection ``∂l/∂v = (g/‖v‖)(∂l/∂w − ŵ (ŵ·∂l/∂w))``, ``∂l/∂g = ŵ·∂l/∂w`` with ``ŵ = v/‖v‖``.
    To reparametrize a module's weight, use :func:`normlab.nn.weight_norm`.

    Source: Salimans & Kingma 2016, "Weight Normalization", eq. (2)–(3); the survey
    “Norm相关总结” eq. (19).

    Args:
        v (Tensor): the direction parameter.
        g (Tensor): the length: ``v``'s shape with size 1 on every reduced dim (0-D when
            ``dim=None``).
        dim (int or None): the dim that keeps its own length. Default: ``0``.

    Shape:
        - Output: ``v``'s shape

    Example::

        >>> import torch, normlab.functional as F
        >>> v, g = torch.randn(3, 4), torch.full((3, 1), 2.0)
        >>> w = F.weight_norm(v, g, 0)
        >>> torch.allclose(w.norm(dim=1), torch.full((3,), 2.0))   # every row has length g
        True
    """
    dims = weight_norm_dims(v, dim)
    n = math.prod([v.shape[i] for i in dims])
    # x̂ = v·√n/‖v‖, so w = (g/√n)·x̂
    return _normalize("weight_norm", v, dims, g / math.sqrt(n), None, 0.0, center=False)[0]


def cosine_linear(
    x: Tensor, weight: Tensor, centered: bool = False, eps: float = 1e-8
) -> Tensor:
    r"""Cosine Normalization of a linear map: the cosine between the input and each weight row.

    .. math::

        y_j = \cos\theta_j = \frac{w_j \cdot x}{\sqrt{\lVert w_j\rVert^2 + \epsilon}\,
              \sqrt{\lVert x\rVert^2 + \epsilon}}

    Bounded in [−1, 1] instead of the unbounded dot product; ``centered=True`` is the Pearson
    form, ``(w_j − μ_w)·(x − μ_x) / (‖w_j − μ_w‖ ‖x − μ_x‖)``, with ``eps`` inside each square
    root likewise. The layer is :class:`normlab.nn.CosineLinear`.

    Source: Luo et al. 2018, "Cosine Normalization"; the survey “Norm相关总结” eq. (20)–(26).

    Args:
        x (Tensor): ``(*, in_features)``.
        weight (Tensor): ``(out_features, in_features)``.
        centered (bool): the centred (Pearson) form. Default: ``False``.
        eps (float): ε inside each square root. Default: ``1e-8``.

    Shape:
        - Input: ``(*, in_features)``, weight ``(out_features, in_features)``
        - Output: ``(*, out_features)``

    Example::

        >>> import torch, normlab.functional as F
        >>> x, w = torch.randn(5, 8), torch.randn(3, 8)
        >>> want = torch.nn.functional.normalize(x, dim=1) @ torch.nn.functional.normalize(w, dim=1).T
        >>> torch.allclose(F.cosine_linear(x, w), want, atol=1e-6)
        True
    """
    op = "cosine_linear"
    _check_input(x, op)
    if weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(
            f"cosine_linear: weight must have shape (out_features, {x.shape[-1]}) for input "
            f"of shape {tuple(x.shape)}, got {tuple(weight.shape)}"
        )
    xh, wh, n = cosine_rows(x, weight, centered, eps)
    return torch.nn.functional.linear(xh, wh) / n


def cosine_rows(x: Tensor, weight: Tensor, centered: bool, eps: float) -> tuple[Tensor, Tensor, int]:
    """The rows of ``x`` and of ``weight`` (any leading dims) each normalized over the last dim as
    :func:`cosine_linear` does, scaled so that their dot products divided by ``n`` (returned) are
    the cosines: what a batched form (e.g. S layers' weights ``(S, out, in)``) multiplies itself."""
    n = x.shape[-1]
    # the core normalizes by √(σ² + eps/n) = √(‖x−μ‖² + eps)/√n: rescale by 1/√n each side
    xh = _normalize("cosine_linear", x, (-1,), None, None, eps / n, center=centered)[0]
    wh = _normalize("cosine_linear", weight, (-1,), None, None, eps / n, center=centered)[0]
    return xh, wh, n


# --------------------------------------------------------------------- classic scalings
def _as_dims(x: Tensor, dim) -> tuple[int, ...]:
    return (dim,) if isinstance(dim, int) else tuple(dim)


def zscore(x: Tensor, dim: int | Sequence[int] = 0, eps: float = 0.0, correction: int = 1) -> Tensor:
    r"""Z-Score standardization of a tensor along a dim, with its own mean and standard deviation.

    .. math::

        z = \frac{x - \mathrm{mean}(x)}{\sqrt{\mathrm{var}(x) + \epsilon}}

    along ``dim`` (default: per column). A constant column gets scale 1 instead of a division by
    zero. ``correction=1`` (default) uses the unbiased variance, as ``torch.std`` and the lesson's
    ``Z_ScoreNormalization`` do; ``correction=0`` gives scikit-learn's ``StandardScaler``. This
    one-shot form uses the statistics of ``x`` itself; to fit on training data and apply to
    test data, use :class:`normlab.preprocessing.StandardScaler`.

    Source: Lesson 14.1 §1.2.

    Args:
        x (Tensor): the data, floating point.
        dim (int or sequence of ints): the dims the statistics are taken over. Default: ``0``.
        eps (float): ε added to the variance. Default: ``0.0``.
        correction (int): the variance's degrees-of-freedom correction. Default: ``1``.

    Shape:
        - Output: ``x``'s shape

    Example::

        >>> import torch, normlab.functional as F
        >>> F.zscore(torch.tensor([[1., 2.], [3., 4.]]))
        tensor([[-0.7071, -0.7071],
                [ 0.7071,  0.7071]])
    """
    _check_input(x, "zscore")
    dims = _as_dims(x, dim)
    _require_values(x, dims, "zscore")
    mean, var = moments(x, dims)
    n = math.prod([x.shape[d] for d in dims])
    if n - correction <= 0:
        raise ValueError(
            f"zscore: {n} value(s) along dim {dim} leave no degrees of freedom with "
            f"correction={correction}; use correction=0 or more samples"
        )
    std = (var * (n / (n - correction)) + eps).sqrt()
    # a constant column divides by 1; a column holding an inf or a NaN has a NaN std and gives NaN
    return ((x - mean) / torch.where(std == 0, 1, std)).to(x.dtype)


def minmax(
    x: Tensor, dim: int | Sequence[int] = 0, feature_range: tuple[float, float] = (0, 1)
) -> Tensor:
    r"""Min-Max normalization of a tensor along a dim: its range mapped linearly onto feature_range.

    .. math::

        x' = \frac{x - \min(x)}{\max(x) - \min(x)} \cdot (b - a) + a, \qquad (a, b) = \text{feature\_range}

    along ``dim`` (default: per column). A constant column gets range 1 (it maps to
    ``feature_range[0]``). One-shot, with the extremes of ``x`` itself; to fit on training data
    and apply to test data, use :class:`normlab.preprocessing.MinMaxScaler`.

    Source: Lesson 14.1 §1.1 (0-1 normalization).

    Args:
        x (Tensor): the data, floating point.
        dim (int or sequence of ints): the dims the extremes are taken over. Default: ``0``.
        feature_range (tuple of two floats): ``(a, b)``, the target range. Default: ``(0, 1)``.

    Shape:
        - Output: ``x``'s shape

    Example::

        >>> import torch, normlab.functional as F
        >>> F.minmax(torch.tensor([[1., 10.], [3., 20.], [2., 15.]]))
        tensor([[0.0000, 0.0000],
                [1.0000, 1.0000],
                [0.5000, 0.5000]])
    """
    _check_input(x, "minmax")
    lo_t, hi_t = feature_range
    if not lo_t < hi_t:
        raise ValueError(f"minmax: feature_range must be (min, max) with min < max, got {feature_range}")
    dims = _as_dims(x, dim)
    _require_values(x, dims, "minmax")
    lo, hi = extrema(x, dims, keepdim=True)
    rng = hi - lo
    return (x - lo) / torch.where(rng > 0, rng, 1) * (hi_t - lo_t) + lo_t
