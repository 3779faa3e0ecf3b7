r"""Drop-in normalization modules for ``torch.nn``.

Each module holds parameters and buffers with torch.nn's names, defaults and ``state_dict``
keys (``ours.load_state_dict(theirs.state_dict())`` works both ways), and its ``forward`` is
one call into :mod:`normlab.functional`.

.. _train-eval:

**Training and evaluation (BatchNorm; InstanceNorm with** ``track_running_stats=True`` **).**
In ``train()`` mode the layer normalizes with the statistics of the current batch and updates
``running_mean`` and ``running_var`` (the latter with the *unbiased* batch variance)::

    running = (1 − momentum) · running + momentum · batch

This is torch's convention; Keras's ``momentum`` is the weight of the *old* value, so Keras
``momentum=0.99`` equals torch ``momentum=0.01``. ``momentum=None`` gives the cumulative
average over ``num_batches_tracked`` batches instead. In ``eval()`` mode the running
statistics normalize, so a single test sample gets the same output whatever batch it is in
(Lesson 14.1, "BN的训练和测试过程"). ``track_running_stats=False`` always uses batch statistics.

>>> import torch
>>> bn = BatchNorm1d(3)
>>> y = bn(torch.randn(8, 3) * 5 + 2)          # train mode: batch statistics
>>> int(bn.num_batches_tracked)
1
>>> y = bn.eval()(torch.randn(1, 3))            # eval mode: running statistics
"""

from __future__ import annotations

import copy
import math
import numbers
import warnings
from typing import Sequence

import torch
from torch import Tensor, nn
from torch.nn import init
from torch.nn.parameter import Parameter

from . import functional as F
from .errors import ShapeError
from .rules import error
from .stats import accumulation_dtype, check_writable, mean_square, momentum_factor

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
    "InstanceNorm1d",
    "InstanceNorm2d",
    "InstanceNorm3d",
    "LayerNorm",
    "GroupNorm",
    "RMSNorm",
    "CosineLinear",
    "weight_norm",
    "remove_weight_norm",
]

# ------------------------------------------------------------------ docstrings, written once
# The 1d/2d/3d classes of each family share one text; each class fills in its shapes.
_CHANNEL_ARGS = """num_features (int): ``C``, the number of channels (dim 1 of a batched input).
        eps (float): ε, added to the variance inside the square root; positive when batch
            statistics normalize, non-negative otherwise. Default: ``1e-5``.
        momentum (float or None): the weight of each new batch in the running statistics,
            ``running = (1 − momentum)·running + momentum·batch``; ``None`` for their cumulative
            average over ``num_batches_tracked`` batches. Default: ``0.1``.
        affine (bool): learn a per-channel scale γ (initially ones) and shift β (zeros).
            Default: ``%(affine)s``.
        track_running_stats (bool): keep ``running_mean``, ``running_var`` and
            ``num_batches_tracked`` buffers, %(tracking)s
            Default: ``%(track)s``.
        device, dtype: where and in which floating dtype to create parameters and buffers.
            Default: torch's defaults.
        bias (bool, keyword-only): with ``affine``, learn β too; ``False`` learns γ only.
            Default: ``True``."""

_BN_DOC = r"""Batch Normalization over an %(layout)s, each channel with the mean and variance of the batch.

    Drop-in for ``torch.nn.%(name)s``: the same arguments, defaults, buffers and ``state_dict``
    keys, so ``normlab.nn.%(name)s(C).load_state_dict(torch_bn.state_dict())`` works both ways.

    .. math::

        y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \cdot \gamma + \beta

    The mean and the biased variance are taken per channel over %(over)s. In training the batch
    statistics normalize and update the running ones (``running_var`` with the unbiased batch
    variance); in eval the running statistics normalize, so the layer is one affine map per
    channel, ``x·γ/√(σ²+ε) + (β − γμ/√(σ²+ε))``, and a sample's output does not depend on the
    rest of its batch (Lesson 14.1 §2.2, §2.3; the notes of :mod:`normlab.nn` on momentum).
    Training on one value per channel raises a ``ValueError``, as torch does.

    Source: Ioffe & Szegedy 2015, "Batch Normalization: Accelerating Deep Network Training by
    Reducing Internal Covariate Shift", Algorithm 1; the survey “Norm相关总结” eq. (10)–(13).

    Args:
        %(args)s

    Shape:
        - Input: %(shape)s
        - Output: %(shape)s, the same shape (and memory format) as the input

    Example::

        >>> import torch, normlab.nn as nln
        >>> bn = nln.%(name)s(4)
        >>> x = torch.randn(%(example)s) * 3 + 1
        >>> torch.allclose(bn(x), torch.nn.%(name)s(4)(x), atol=1e-5)   # training: batch statistics
        True
        >>> int(bn.num_batches_tracked), bn.eval()(x[:1]).shape          # eval: running statistics
        (1, torch.Size([%(one)s]))
    """

_BRN_DOC = r"""Batch Renormalization over an %(layout)s: BatchNorm corrected towards the running statistics.

    In training, each channel's batch-normalized value is corrected by ``r`` and ``d``, so small
    or non-i.i.d. batches train like large ones; in eval it is BatchNorm's (running statistics).

    .. math::

        \hat x = \frac{x - \mu_B}{\sigma_B}\, r + d,\quad
        r = \mathrm{clip}_{[1/r_{max},\, r_{max}]}\Big(\frac{\sigma_B}{\sigma}\Big),\quad
        d = \mathrm{clip}_{[-d_{max},\, d_{max}]}\Big(\frac{\mu_B - \mu}{\sigma}\Big),\quad
        y = \gamma \hat x + \beta

    with ``σ_B = √(σ²_B + ε)`` from the batch and ``σ = √(running_var + ε)``, ``μ`` the running
    mean; ``r`` and ``d`` are constants in the backward (the paper's stop-gradient). That makes it
    the core's BatchNorm with ``γ' = γ·r`` and ``β' = γ·d + β``, so the written-out backward of the
    survey “Norm相关总结” eq. (4)–(9) applies as it is. With ``r = 1, d = 0`` it is exactly
    BatchNorm. ``rmax``/``dmax`` ramp linearly from 1/0 to their values over the first
    ``warmup_steps`` training batches (counted by ``num_batches_tracked``; :meth:`limits` gives
    the current pair). Running statistics are required and follow BatchNorm's rule.

    Source: Ioffe 2017, "Batch Renormalization: Towards Reducing Minibatch Dependence in
    Batch-Normalized Models", Algorithm 1.

    Args:
        %(args)s
        rmax (float, keyword-only): the largest correction of the scale, ``r ∈ [1/rmax, rmax]``.
            Default: ``3.0``.
        dmax (float, keyword-only): the largest correction of the shift, ``d ∈ [−dmax, dmax]``.
            Default: ``5.0``.
        warmup_steps (int, keyword-only): training batches over which ``rmax``/``dmax`` grow
            from 1/0 (plain BatchNorm); 0: no warm-up. Default: ``0``.

    Shape:
        - Input: %(shape)s
        - Output: %(shape)s, the same shape as the input

    Example::

        >>> import torch, normlab.nn as nln
        >>> bn = nln.%(name)s(4, warmup_steps=1000)
        >>> y = bn(torch.randn(%(example)s))
        >>> y.shape, bn.limits()                         # (rmax, dmax) after one warm-up step
        (torch.Size([%(full)s]), (1.002, 0.005))
    """

_IN_DOC = r"""Instance Normalization over an %(layout)s, each channel of each sample with its own statistics.

    Drop-in for ``torch.nn.%(name)s``: the same arguments, defaults (``affine=False``,
    ``track_running_stats=False``), buffers and ``state_dict`` keys.

    .. math::

        y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \cdot \gamma + \beta

    The mean and biased variance are taken over %(over)s separately for every sample and
    channel, so the output does not depend on the batch. With ``track_running_stats=True`` the
    running statistics (batch averages of the per-instance ones) normalize in eval, as in
    BatchNorm. Unbatched input (without the N dim) is accepted.

    Source: Ulyanov, Vedaldi & Lempitsky 2016, "Instance Normalization: The Missing Ingredient for
    Fast Stylization"; the survey “Norm相关总结” eq. (16)–(17).

    Args:
        %(args)s

    Shape:
        - Input: %(shape)s or unbatched %(unbatched)s
        - Output: the same shape (and memory format) as the input

    Example::

        >>> import torch, normlab.nn as nln
        >>> x = torch.randn(%(example)s) * 3 + 1
        >>> torch.allclose(nln.%(name)s(4)(x), torch.nn.%(name)s(4)(x), atol=1e-5)
        True
    """


def _fill(template: str, **fields) -> str:
    """A family's docstring for one class: ``template`` with its fields, the Args text included."""
    defaults = {"affine": "True", "track": "True", "tracking": "for eval mode; with ``False`` every call\n"
                "            uses the statistics of its own batch."}
    defaults.update(fields.pop("arg_defaults", {}))
    return template % {"args": _CHANNEL_ARGS % defaults, **fields}


def _shape_error(module: nn.Module, expected: str, x: Tensor) -> ShapeError:
    return ShapeError(
        f"{type(module).__name__}({getattr(module, 'num_features', '')}) expects {expected}, "
        f"got {x.dim()}-D input of shape {tuple(x.shape)}"
    )


_ORIGIN = "_normlab_from"  # the class a converted module had, which to_torch and scripting give back


def retype(module: nn.Module, cls: type, **attributes) -> nn.Module:
    """Re-type a module as an instance of another class, keeping its parameters, buffers and hooks.

    The new module gets the old one's attributes: the same Parameter, buffer and submodule
    objects and the same hooks, in fresh containers (so registering a parameter on one does not
    change the other), plus ``attributes``; only the class, and so the forward, changes.
    Optimizers, tied weights and ``state_dict`` keys are unaffected, and ``cls.__init__`` is not
    called. This is how :func:`normlab.convert.to_normlab` and :func:`normlab.convert.to_torch`
    convert.

    Args:
        module (nn.Module): the module to re-type; it is left as it was.
        cls (type): the new class, an ``nn.Module`` subclass whose forward works on the
            attributes of ``module``.
        **attributes: extra attributes of the new module, set as plain attributes (without
            ``nn.Module.__setattr__``).

    Returns:
        nn.Module: a new instance of ``cls``.

    Example::

        >>> class Doubled(torch.nn.Linear):
        ...     def forward(self, x):
        ...         return 2 * super().forward(x)
        >>> lin = torch.nn.Linear(3, 2)
        >>> twice = retype(lin, Doubled, note="times two")
        >>> type(twice).__name__, twice.weight is lin.weight, twice.note
        ('Doubled', True, 'times two')
        >>> x = torch.randn(4, 3)
        >>> torch.allclose(twice(x), 2 * lin(x))
        True
    """
    new = cls.__new__(cls)
    new.__dict__.update({k: (copy.copy(v) if isinstance(v, dict) else v) for k, v in module.__dict__.items()})
    for k, v in attributes.items():
        object.__setattr__(new, k, v)
    return new


_ADDED = "_normlab_added"  # the attributes a conversion gave a module, which going back removes
_ADOPTED: dict[tuple[type, type], type] = {}


def adopted_class(impl: type, origin: type) -> type:
    """The class of a module converted from ``origin``: ``impl``'s forward, ``origin`` still its base.

    ``isinstance(m, origin)`` keeps holding for the converted module, so code that looks for
    the original class (weight-decay groups, freezing helpers, SyncBatchNorm conversion) still
    finds it; the class has ``origin``'s name, is built once per pair, and survives ``copy``,
    ``pickle`` and ``torch.save``. :func:`normlab.convert.to_torch` gives the module its ``origin``
    class back.

    Args:
        impl (type): the normlab class that computes.
        origin (type): the class the module had.

    Returns:
        type: ``impl`` itself where it already subclasses ``origin``, else a subclass of both.

    Example::

        >>> class MyNorm(torch.nn.LayerNorm):
        ...     pass
        >>> cls = adopted_class(LayerNorm, MyNorm)
        >>> cls.__name__, issubclass(cls, MyNorm), cls.forward is LayerNorm.forward
        ('MyNorm', True, True)
    """
    if issubclass(impl, origin):
        return impl
    if (impl, origin) not in _ADOPTED:
        def __reduce_ex__(self, protocol):  # state apart: a module that refers to itself copies too
            return _new_adopted, (impl, origin), self.__getstate__()

        _ADOPTED[impl, origin] = type(origin.__name__, (impl, origin), {
            "__reduce_ex__": __reduce_ex__, "__module__": impl.__module__, "__qualname__": origin.__qualname__,
            "__doc__": f"{origin.__name__} computed by {impl.__module__}.{impl.__qualname__}.", _ORIGIN: origin})
    return _ADOPTED[impl, origin]


def _new_adopted(impl: type, origin: type) -> nn.Module:
    cls = adopted_class(impl, origin)
    return cls.__new__(cls)


def torch_base(cls: type) -> type | None:
    """The first public torch.nn class of ``cls``'s MRO other than ``Module`` (``LayerNorm`` for
    normlab's LayerNorm and for timm's), or None."""
    return next((c for c in cls.__mro__ if c.__module__.startswith("torch.nn.modules.")
                 and not c.__name__.startswith("_") and c is not nn.Module), None)


def _as_original(module: nn.Module) -> nn.Module:
    """The module as the class it stands in for: the one it was converted from, else its torch.nn
    base, with the same Parameter and buffer objects and without the attributes the conversion added."""
    cls = getattr(type(module), _ORIGIN, None)
    added = module.__dict__.get(_ADDED, ())
    if cls is None:
        cls = torch_base(type(module))
        if getattr(module, "offset", 0.0):
            raise ValueError(f"{type(module).__name__}(offset={module.offset}) scales by offset + γ, which "
                             f"torch.nn.{cls.__name__} cannot; fold the offset into γ first "
                             f"(weight.data += {module.offset}, then offset = 0)")
        added = (*added, "offset")
    new = retype(module, cls)
    for key in (*added, _ADDED):
        new.__dict__.pop(key, None)
    return new


def _prepare_scriptable(self) -> nn.Module:
    # torch.jit.script calls this on every submodule and puts what it returns into the parent's
    # _modules in place: returning torch's class here would change the user's eager model, so
    # scripting is refused before anything is touched, with the way that works
    raise RuntimeError(
        f"torch.jit.script cannot compile normlab's {type(self).__name__} (its forward is Python): script "
        "normlab.convert.to_torch(model) instead, which gives every layer its torch.nn (or original) class "
        "back with the same parameters; the model itself is unchanged")


def _state_errors(module: nn.Module, state_dict, prefix: str) -> list[str]:
    """What is wrong with the entries of ``state_dict`` for ``module`` and every module inside it,
    all checked before any is written: a value that is not a tensor, a shape that does not fit (as
    torch checks it, a 1-element tensor fitting a 0-d one), a negative ``running_var``, a
    ``num_batches_tracked`` that is not a count."""
    errors = []
    for path, m in module.named_modules(prefix=prefix.rstrip(".")):
        persistent = {k: v for k, v in (*m._parameters.items(), *m._buffers.items())
                      if k not in m._non_persistent_buffers_set}
        for name, own in persistent.items():
            key = f"{path}.{name}" if path else name
            if own is None or key not in state_dict:
                continue
            v = state_dict[key]
            if not isinstance(v, Tensor):
                errors.append(f"{key}: expected a tensor, got {type(v).__name__}")
                continue
            shape = v.shape[1:] if own.dim() == 0 and tuple(v.shape) == (1,) else v.shape
            if tuple(shape) != tuple(own.shape):
                errors.append(f"{key}: shape {tuple(v.shape)} does not fit {type(m).__name__}, "
                              f"which has {tuple(own.shape)}")
            elif v.device.type == "meta":
                continue
            elif name == "running_var" and bool((v < 0).any()):
                errors.append(f"{key}: a variance cannot be negative, got {v.min().item()}")
            elif name == "num_batches_tracked" and (v.is_floating_point() or v.is_complex() or int(v) < 0):
                errors.append(f"{key}: expected a count (an integer >= 0), got {v.item()!r}")
    return errors


class _AllOrNothing:
    """``load_state_dict`` writes every entry of this module and of the modules inside it, or none.

    torch checks each entry as it copies it, so a bad bias is found after the weight was written.
    Here every entry of the subtree is checked first (:func:`_state_errors`); a bad one is
    reported as torch reports it (``load_state_dict`` raises a ``RuntimeError`` naming it) and
    nothing of the subtree is written: the modules inside it (normlab's; a torch module inside
    one holds no state) are marked with this load's error list and load nothing."""

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        if self.__dict__.pop("_normlab_refused_in", None) is error_msgs:
            return  # a module around this one refused this load and said why
        errors = _state_errors(self, state_dict, prefix)
        if errors:
            error_msgs.extend(errors)
            for m in self.modules():
                if m is not self and isinstance(m, _AllOrNothing):
                    m.__dict__["_normlab_refused_in"] = error_msgs  # this load only: a stale mark matches no other
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


class _NormBase(_AllOrNothing, nn.Module):
    """Parameters, running buffers and their bookkeeping, shared by BatchNorm and InstanceNorm.

    Subclasses set ``_ndims`` (accepted input ranks, batched first) and ``_layout`` (its
    description for errors); 1d/2d/3d classes differ in nothing else.
    """

    _version = 2
    __constants__ = ["track_running_stats", "momentum", "eps", "num_features", "affine"]
    __prepare_scriptable__ = _prepare_scriptable
    _ndims: tuple[int, ...] = ()
    _layout: str = ""

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
    ) -> None:
        nn.Module.__init__(self)  # not the torch.nn base's: this one sets the same attributes
        if not isinstance(num_features, int) or num_features <= 0:
            raise ValueError(f"{type(self).__name__}: num_features must be a positive int, got {num_features!r}")
        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        if affine:
            self.weight = Parameter(torch.empty(num_features, **factory))
            self.bias = Parameter(torch.empty(num_features, **factory)) if bias else None
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory))
            self.register_buffer("running_var", torch.ones(num_features, **factory))
            self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.affine:
            init.ones_(self.weight)
            if self.bias is not None:
                init.zeros_(self.bias)

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
            f"bias={self.bias is not None}, track_running_stats={self.track_running_stats}"
        )

    def _check_input(self, x: Tensor) -> None:
        if not isinstance(x, Tensor):
            raise F._not_a_tensor(x, type(self).__name__)
        if x.dim() not in self._ndims:
            raise _shape_error(self, self._layout, x)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        version = local_metadata.get("version")
        key = prefix + "num_batches_tracked"
        # a checkpoint without num_batches_tracked (before torch 0.4.1, version < 2) keeps the
        # current count, as torch does
        if (version is None or version < 2) and self.track_running_stats and key not in state_dict:
            nbt = self.num_batches_tracked
            state_dict[key] = nbt if nbt is not None and nbt.device.type != "meta" else torch.tensor(0)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


class _BatchNorm(_NormBase):
    """Batch Normalization over (N, \\*spatial) per channel; see the module docs for
    train/eval and momentum. Arguments, attributes and ``state_dict`` are torch.nn's."""

    def _check_input(self, x: Tensor) -> None:
        super()._check_input(x)
        if x.shape[1] != self.num_features:  # a RuntimeError in torch: both here
            raise ShapeError(
                f"{type(self).__name__}({self.num_features}) expects {self.num_features} channels "
                f"in dim 1, got input of shape {tuple(x.shape)}"
            )

    def forward(self, input: Tensor) -> Tensor:
        self._check_input(input)
        tracking = self.training and self.track_running_stats
        factor = momentum_factor(self.momentum, self.num_batches_tracked) if tracking else 0.0
        use_batch_stats = self.training or self.running_mean is None
        keep = not self.training or self.track_running_stats
        out = F.batch_norm(
            input,
            self.running_mean if keep else None,
            self.running_var if keep else None,
            self.weight,
            self.bias,
            use_batch_stats,
            factor,
            self.eps,
        )
        if tracking:  # only after success: a failed call leaves every buffer as it was
            self.num_batches_tracked.add_(1)
        return out


class BatchNorm1d(_BatchNorm, nn.BatchNorm1d):
    __doc__ = _fill(_BN_DOC,
                    name="BatchNorm1d", layout="(N, C) or (N, C, L) input", shape="(N, C) or (N, C, L)",
                    over="N (and L)", example="8, 4", one="1, 4")

    _ndims, _layout = (2, 3), "2-D (N, C) or 3-D (N, C, L) input"


class BatchNorm2d(_BatchNorm, nn.BatchNorm2d):
    __doc__ = _fill(_BN_DOC,
                    name="BatchNorm2d", layout="(N, C, H, W) input", shape="(N, C, H, W)", over="(N, H, W)",
                    example="8, 4, 5, 5", one="1, 4, 5, 5")

    _ndims, _layout = (4,), "4-D (N, C, H, W) input"


class BatchNorm3d(_BatchNorm, nn.BatchNorm3d):
    __doc__ = _fill(_BN_DOC,
                    name="BatchNorm3d", layout="(N, C, D, H, W) input", shape="(N, C, D, H, W)",
                    over="(N, D, H, W)", example="8, 4, 3, 3, 3", one="1, 4, 3, 3, 3")

    _ndims, _layout = (5,), "5-D (N, C, D, H, W) input"


class _BatchRenorm(_BatchNorm):
    """What BatchRenorm1d/2d/3d share; the maths and arguments are in their docstring (_BRN_DOC)."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, device=None, dtype=None, *, bias: bool = True,
                 rmax: float = 3.0, dmax: float = 5.0, warmup_steps: int = 0) -> None:
        if not track_running_stats:
            raise ValueError(f"{type(self).__name__} corrects batch statistics towards running ones: "
                             "track_running_stats must be True")
        if rmax < 1 or dmax < 0 or warmup_steps < 0:
            raise ValueError(f"need rmax >= 1, dmax >= 0, warmup_steps >= 0; got {rmax}, {dmax}, {warmup_steps}")
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias)
        self.rmax, self.dmax, self.warmup_steps = rmax, dmax, warmup_steps

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rmax={self.rmax}, dmax={self.dmax}, warmup_steps={self.warmup_steps}"

    def limits(self) -> tuple[float, float]:
        """``(rmax, dmax)`` at the current step of the warm-up."""
        if self.warmup_steps == 0:
            return self.rmax, self.dmax
        t = min(1.0, float(self.num_batches_tracked) / self.warmup_steps)
        return 1.0 + (self.rmax - 1.0) * t, self.dmax * t

    def forward(self, input: Tensor) -> Tensor:
        if not self.training or (isinstance(input, Tensor) and input.numel() == 0):
            return super().forward(input)  # eval, or an empty batch: BatchNorm's answer
        self._check_input(input)
        # BatchNorm's checks before the statistics are taken: a refused call computes and writes nothing
        F._check_channel_args("batch_norm", input, self.running_mean, self.running_var, self.weight, self.bias,
                              True, self.eps)
        n = input.numel() // input.shape[1]
        if n == 1:
            raise error("channel_values", op="batch_norm", shape=tuple(input.shape))
        # statistics → corrections → BatchNorm's map: the batch's μ_B, σ²_B (functions of x), then
        # y = γ·(x̂·r + d) + β as BatchNorm with those statistics, scale γ·r and shift γ·d + β, with r
        # and d constants to autograd, in float32 or wider (never rounded to a half parameter dtype)
        check_writable(self.running_mean, "running_mean")  # before anything is computed or saved
        check_writable(self.running_var, "running_var")
        mean, var = F._batch_stats(input)
        with torch.no_grad():  # (detached: no forward-mode tangent either)
            sigma = torch.sqrt(self.running_var.double() + self.eps)
            rmax, dmax = self.limits()
            r = (torch.sqrt(var.detach() + self.eps) / sigma).clamp(1.0 / rmax, rmax)
            d = ((mean.detach() - self.running_mean.double()) / sigma).clamp(-dmax, dmax)
        acc = accumulation_dtype(input.dtype)
        r, d = r.to(acc), d.to(acc)
        scale, shift = (r, d) if self.weight is None else (self.weight.to(acc) * r, self.weight.to(acc) * d)
        if self.bias is not None:
            shift = shift + self.bias.to(acc)
        out = F._batch_norm_apply(input, mean, var, scale, shift, self.eps)
        F._update_running(self.running_mean, self.running_var, mean, var * (n / (n - 1)),  # after success
                          momentum_factor(self.momentum, self.num_batches_tracked))
        self.num_batches_tracked.add_(1)
        return out


class BatchRenorm1d(_BatchRenorm):
    __doc__ = _fill(_BRN_DOC,
                    name="BatchRenorm1d", layout="(N, C) or (N, C, L) input", shape="(N, C) or (N, C, L)",
                    example="2, 4", full="2, 4")

    _ndims, _layout = BatchNorm1d._ndims, BatchNorm1d._layout


class BatchRenorm2d(_BatchRenorm):
    __doc__ = _fill(_BRN_DOC,
                    name="BatchRenorm2d", layout="(N, C, H, W) input", shape="(N, C, H, W)",
                    example="2, 4, 5, 5", full="2, 4, 5, 5")

    _ndims, _layout = BatchNorm2d._ndims, BatchNorm2d._layout


class BatchRenorm3d(_BatchRenorm):
    __doc__ = _fill(_BRN_DOC,
                    name="BatchRenorm3d", layout="(N, C, D, H, W) input", shape="(N, C, D, H, W)",
                    example="2, 4, 3, 3, 3", full="2, 4, 3, 3, 3")

    _ndims, _layout = BatchNorm3d._ndims, BatchNorm3d._layout


_IN_DEFAULTS = {"affine": "False", "track": "False", "tracking": "so that eval mode normalizes with\n"
                "            them; with ``False`` every call uses the statistics of each instance."}


class _InstanceNorm(_NormBase):
    """Instance Normalization: statistics over spatial dims per sample and channel.

    Defaults are torch's: ``affine=False``, ``track_running_stats=False``. Unbatched input
    (no N dim) is accepted. With ``track_running_stats=True`` eval mode uses the running
    statistics, as BatchNorm does.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = False,
        track_running_stats: bool = False,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias)

    def forward(self, input: Tensor) -> Tensor:
        self._check_input(input)
        batched = input.dim() == self._ndims[-1]
        channels = input.shape[1 if batched else 0]
        if channels != self.num_features:
            msg = (
                f"{type(self).__name__}({self.num_features}) expects {self.num_features} channels, "
                f"got input of shape {tuple(input.shape)}"
            )
            if self.affine or self.track_running_stats:
                raise ShapeError(msg)
            warnings.warn(msg + "; num_features is unused without affine or running stats", stacklevel=2)
        x = input if batched else input.unsqueeze(0)
        out = F.instance_norm(
            x,
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            self.training or not self.track_running_stats,
            self.momentum if self.momentum is not None else 0.0,
            self.eps,
        )
        return out if batched else out.squeeze(0)


class InstanceNorm1d(_InstanceNorm, nn.InstanceNorm1d):
    __doc__ = _fill(_IN_DOC,
                    name="InstanceNorm1d", layout="(N, C, L) input", shape="(N, C, L)", unbatched="(C, L)",
                    over="L", example="2, 4, 10", arg_defaults=_IN_DEFAULTS)

    _ndims, _layout = (2, 3), "3-D (N, C, L) or 2-D unbatched (C, L) input"


class InstanceNorm2d(_InstanceNorm, nn.InstanceNorm2d):
    __doc__ = _fill(_IN_DOC,
                    name="InstanceNorm2d", layout="(N, C, H, W) input", shape="(N, C, H, W)",
                    unbatched="(C, H, W)", over="(H, W)", example="2, 4, 5, 5", arg_defaults=_IN_DEFAULTS)

    _ndims, _layout = (3, 4), "4-D (N, C, H, W) or 3-D unbatched (C, H, W) input"


class InstanceNorm3d(_InstanceNorm, nn.InstanceNorm3d):
    __doc__ = _fill(_IN_DOC,
                    name="InstanceNorm3d", layout="(N, C, D, H, W) input", shape="(N, C, D, H, W)",
                    unbatched="(C, D, H, W)", over="(D, H, W)", example="2, 4, 3, 3, 3",
                    arg_defaults=_IN_DEFAULTS)

    _ndims, _layout = (4, 5), "5-D (N, C, D, H, W) or 4-D unbatched (C, D, H, W) input"


def _as_shape(normalized_shape) -> tuple[int, ...]:
    if isinstance(normalized_shape, numbers.Integral):
        return (int(normalized_shape),)
    return tuple(int(s) for s in normalized_shape)


class LayerNorm(_AllOrNothing, nn.LayerNorm):
    r"""Layer Normalization over the last dims of the input, each sample with its own mean and variance.

    Drop-in for ``torch.nn.LayerNorm``: the same arguments, defaults and ``state_dict`` keys.

    .. math::

        y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \cdot (o + \gamma) + \beta

    The mean and biased variance are taken over the last ``len(normalized_shape)`` dims of each
    sample (a token, in a transformer); γ and β have the shape ``normalized_shape``. Nothing
    depends on the batch, so training and eval compute the same and there are no running
    statistics. The offset ``o`` (0, torch's layer) makes γ zero-centred: γ starts at ``1 − o``
    and the scale is ``o + γ``, added in float32 (:func:`normlab.functional.rms_norm`).

    Source: Ba, Kiros & Hinton 2016, "Layer Normalization"; the survey “Norm相关总结” eq. (14)–(15).

    Args:
        normalized_shape (int or sequence of ints): the trailing shape to normalize over; an int
            ``D`` means the last dim, of size ``D``.
        eps (float): ε, added to the variance inside the square root. Default: ``1e-5``.
        elementwise_affine (bool): learn γ (initially ones) and β (zeros) per element of
            ``normalized_shape``. Default: ``True``.
        bias (bool): with ``elementwise_affine``, learn β too. Default: ``True``.
        device, dtype: where and in which floating dtype to create the parameters.
        offset (float, keyword-only): ``o``, added to γ; needs ``elementwise_affine``. Default: ``0.0``.

    Shape:
        - Input: ``(*, *normalized_shape)``
        - Output: the same shape as the input

    Example::

        >>> import torch, normlab.nn as nln
        >>> x = torch.randn(2, 5, 16) * 4 + 3              # (batch, tokens, features)
        >>> ln = nln.LayerNorm(16)
        >>> torch.allclose(ln(x), torch.nn.LayerNorm(16)(x), atol=1e-5)
        True
        >>> bool(ln(x).mean(-1).abs().max() < 1e-5)         # every token centred
        True
    """

    __constants__ = ["normalized_shape", "eps", "elementwise_affine"]
    __prepare_scriptable__ = _prepare_scriptable
    offset = 0.0  # a class default: modules re-typed from torch.nn's have none of their own

    def __init__(
        self,
        normalized_shape: int | Sequence[int],
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        offset: float = 0.0,
    ) -> None:
        nn.Module.__init__(self)  # not the torch.nn base's: this one sets the same attributes
        factory = {"device": device, "dtype": dtype}
        self.normalized_shape = _as_shape(normalized_shape)
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        self.offset = _check_offset(offset, elementwise_affine)
        if elementwise_affine:
            self.weight = Parameter(torch.empty(self.normalized_shape, **factory))
            self.bias = Parameter(torch.empty(self.normalized_shape, **factory)) if bias else None
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.weight is not None:
            init.constant_(self.weight, 1.0 - self.offset)
        if self.bias is not None:
            init.zeros_(self.bias)

    def forward(self, input: Tensor) -> Tensor:
        return F.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps, offset=self.offset)

    def extra_repr(self) -> str:
        return (
            f"{self.normalized_shape}, eps={self.eps}, "
            f"elementwise_affine={self.elementwise_affine}, bias={self.bias is not None}" + _offset_repr(self)
        )


class RMSNorm(_AllOrNothing, nn.RMSNorm):
    r"""Root Mean Square Layer Normalization: LayerNorm without the centering, over the last dims.

    Drop-in for ``torch.nn.RMSNorm``: the same arguments, defaults and ``state_dict`` keys.

    .. math::

        y = \frac{x}{\sqrt{\mathrm{E}[x^2] + \epsilon}} \cdot (o + \gamma)

    The mean of squares is taken over the last ``len(normalized_shape)`` dims of each sample;
    there is no mean to subtract and no β (the norm of Llama-style transformers). The offset
    ``o`` (0, torch's layer) makes γ zero-centred, as Gemma's ``x̂·(1 + w)``: γ starts at
    ``1 − o`` and the scale is ``o + γ``, added in float32 (:func:`normlab.functional.rms_norm`).

    Source: Zhang & Sennrich 2019, "Root Mean Square Layer Normalization".

    Args:
        normalized_shape (int or sequence of ints): the trailing shape to normalize over.
        eps (float or None): ε inside the square root; ``None`` means the machine epsilon of the
            dtype the statistics are computed in, ``torch.finfo(...).eps`` (float32 for fp16/bf16
            input), as torch. Default: ``None``.
        elementwise_affine (bool): learn γ (initially ``1 − offset``). Default: ``True``.
        device, dtype: where and in which floating dtype to create the parameter.
        offset (float, keyword-only): ``o``, added to γ; needs ``elementwise_affine``. Default: ``0.0``.

    Shape:
        - Input: ``(*, *normalized_shape)``
        - Output: the same shape as the input

    Example::

        >>> import torch, normlab.nn as nln
        >>> x = torch.randn(2, 5, 16) * 4
        >>> rms = nln.RMSNorm(16)
        >>> torch.allclose(rms(x), torch.nn.RMSNorm(16)(x), atol=1e-5)
        True
        >>> bool(((rms(x) ** 2).mean(-1) - 1).abs().max() < 1e-4)   # unit mean square per token
        True
    """

    __constants__ = ["normalized_shape", "eps", "elementwise_affine"]
    __prepare_scriptable__ = _prepare_scriptable
    offset = 0.0  # a class default: modules re-typed from torch.nn's have none of their own

    def __init__(
        self,
        normalized_shape: int | Sequence[int],
        eps: float | None = None,
        elementwise_affine: bool = True,
        device=None,
        dtype=None,
        *,
        offset: float = 0.0,
    ) -> None:
        nn.Module.__init__(self)  # not the torch.nn base's: this one sets the same attributes
        self.normalized_shape = _as_shape(normalized_shape)
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        self.offset = _check_offset(offset, elementwise_affine)
        if elementwise_affine:
            self.weight = Parameter(torch.empty(self.normalized_shape, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.weight is not None:
            init.constant_(self.weight, 1.0 - self.offset)

    def forward(self, input: Tensor) -> Tensor:
        return F.rms_norm(input, self.normalized_shape, self.weight, self.eps, offset=self.offset)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}" + _offset_repr(
            self)


def _check_offset(offset: float, elementwise_affine: bool) -> float:
    if not (isinstance(offset, (int, float)) and math.isfinite(offset)):
        raise ValueError(f"offset must be a finite number, got {offset!r}")
    if offset and not elementwise_affine:
        raise ValueError(f"offset={offset} is added to the learned γ, which elementwise_affine=False has not; "
                         "drop the offset or learn γ")
    return float(offset)


def _offset_repr(module: nn.Module) -> str:
    return f", offset={module.offset}" if module.offset else ""


class GroupNorm(_AllOrNothing, nn.GroupNorm):
    r"""Group Normalization: the channels split into groups, each group of each sample normalized alone.

    Drop-in for ``torch.nn.GroupNorm``: the same arguments, defaults and ``state_dict`` keys.

    .. math::

        y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \cdot \gamma + \beta

    The mean and biased variance are taken, for every sample, over the ``C / num_groups``
    channels of a group and all their spatial positions; γ and β are per channel. Nothing depends
    on the batch, so it works at batch size 1 where BatchNorm cannot. ``num_groups=1`` is
    LayerNorm over ``(C, *)``; ``num_groups=num_channels`` is InstanceNorm. A ``num_groups``
    that does not divide ``num_channels`` raises a ``ValueError`` at construction, listing the
    divisors.

    Source: Wu & He 2018, "Group Normalization", §3.

    Args:
        num_groups (int): the number of groups ``G``; must divide ``num_channels``.
        num_channels (int): ``C``, the number of channels (dim 1 of the input).
        eps (float): ε, added to the variance inside the square root. Default: ``1e-5``.
        affine (bool): learn γ (initially ones) and β (zeros) per channel. Default: ``True``.
        device, dtype: where and in which floating dtype to create the parameters.
        bias (bool, keyword-only): with ``affine``, learn β too. Default: ``True``.

    Shape:
        - Input: ``(N, C, *)``
        - Output: the same shape (and memory format) as the input

    Example::

        >>> import torch, normlab.nn as nln
        >>> x = torch.randn(2, 6, 4, 4) * 2 + 1
        >>> gn = nln.GroupNorm(3, 6)                       # 3 groups of 2 channels
        >>> torch.allclose(gn(x), torch.nn.GroupNorm(3, 6)(x), atol=1e-5)
        True
        >>> torch.allclose(nln.GroupNorm(1, 6)(x), nln.LayerNorm((6, 4, 4))(x), atol=1e-5)
        True
    """

    __constants__ = ["num_groups", "num_channels", "eps", "affine"]
    __prepare_scriptable__ = _prepare_scriptable

    def __init__(
        self,
        num_groups: int,
        num_channels: int,
        eps: float = 1e-5,
        affine: bool = True,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
    ) -> None:
        nn.Module.__init__(self)  # not the torch.nn base's: this one sets the same attributes
        if num_groups <= 0 or num_channels % num_groups:
            divisors = [d for d in range(1, num_channels + 1) if num_channels % d == 0]
            raise ValueError(
                f"GroupNorm: num_groups={num_groups} must divide num_channels={num_channels}; "
                f"choose one of {divisors}"
            )
        factory = {"device": device, "dtype": dtype}
        self.num_groups = num_groups
        self.num_channels = num_channels
        self.eps = eps
        self.affine = affine
        if affine:
            self.weight = Parameter(torch.empty(num_channels, **factory))
            self.bias = Parameter(torch.empty(num_channels, **factory)) if bias else None
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.weight is not None:
            init.ones_(self.weight)
        if self.bias is not None:
            init.zeros_(self.bias)

    def forward(self, input: Tensor) -> Tensor:
        if isinstance(input, Tensor) and input.dim() >= 2 and input.shape[1] != self.num_channels:
            raise ShapeError(
                f"GroupNorm({self.num_groups}, {self.num_channels}) expects {self.num_channels} "
                f"channels in dim 1 of an (N, C, *) input, got shape {tuple(input.shape)}"
            )
        return F.group_norm(input, self.num_groups, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return (
            f"{self.num_groups}, {self.num_channels}, eps={self.eps}, affine={self.affine}, "
            f"bias={self.bias is not None}"
        )


class CosineLinear(_AllOrNothing, nn.Module):
    r"""A linear layer whose outputs are the cosines between the input and each weight row.

    .. math::

        y_j = \cos\theta_j = \frac{w_j \cdot x}{\sqrt{\lVert w_j\rVert^2 + \epsilon}\,
              \sqrt{\lVert x\rVert^2 + \epsilon}}

    Bounded in [−1, 1] whatever the scale of ``x`` or ``w``, where a dot product is unbounded.
    ``centered=True`` subtracts the means of ``w_j`` and of ``x`` first: the Pearson correlation.
    There is no bias, which would break the bound.

    Source: Luo et al. 2018, "Cosine Normalization: Using Cosine Similarity Instead of Dot Product
    in Neural Networks"; the survey “Norm相关总结” eq. (20) and, centred, (21)–(26).

    Args:
        in_features (int): size of each input sample.
        out_features (int): size of each output sample.
        centered (bool): the centred (Pearson) form; needs ``in_features >= 2``. Default: ``False``.
        eps (float): ε inside each square root. Default: ``1e-8``.
        device, dtype: where and in which floating dtype to create the weight (initialized as
            ``nn.Linear``'s).

    Shape:
        - Input: ``(*, in_features)``
        - Output: ``(*, out_features)``

    Example::

        >>> import torch, normlab.nn as nln
        >>> layer = nln.CosineLinear(8, 3)
        >>> y = layer(torch.randn(5, 8) * 1000)             # any input scale
        >>> y.shape, bool(y.abs().max() <= 1)
        (torch.Size([5, 3]), True)
    """

    __constants__ = ["in_features", "out_features", "centered", "eps"]

    def __init__(
        self,
        in_features: int,
        out_features: int,
        centered: bool = False,
        eps: float = 1e-8,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if centered and in_features < 2:
            raise ValueError("CosineLinear(centered=True) needs in_features >= 2: one centred value is always 0")
        self.in_features = in_features
        self.out_features = out_features
        self.centered = centered
        self.eps = eps
        self.weight = Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Linear's default

    def forward(self, input: Tensor) -> Tensor:
        return F.cosine_linear(input, self.weight, self.centered, self.eps)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"centered={self.centered}, eps={self.eps}"
        )


# ------------------------------------------------------------------------------ weight norm
class _WeightNorm(_AllOrNothing, nn.Module):
    """Holds ``original0`` (g) and ``original1`` (v) under the keys torch's parametrization
    uses, so state dicts move between ``torch.nn.utils.parametrizations.weight_norm`` and
    ours."""

    def __init__(self, weight: Tensor, dim: int | None) -> None:
        super().__init__()
        self.dim = dim
        v = weight.detach()
        dims = F.weight_norm_dims(v, dim)
        # g = ‖v‖ over dims, so that w = g·v/‖v‖ starts equal to the weight it replaces
        g = (mean_square(v, dims) * math.prod([v.shape[d] for d in dims])).sqrt()
        if dim is None or dim == -1:  # torch keeps a 0-D g for the whole-tensor norm
            g = g.reshape(())
        self.original0 = Parameter(g.clone())
        self.original1 = Parameter(v.clone())

    def forward(self) -> Tensor:
        return F.weight_norm(self.original1, self.original0, self.dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


_WN_CLASSES: dict[type, type] = {}


def _weight_normed_class(base: type) -> type:
    # One subclass per module class, computing every weight-normed attribute on access. It is
    # rebuilt from (base, state) when pickled, copied or saved: torch's parametrized classes
    # refuse pickling, and hook-based weight norm refuses deepcopy.
    if base not in _WN_CLASSES:

        def __getattr__(self, name):
            wn = self.__dict__["_modules"].get("parametrizations")
            if wn is not None and name in wn._modules and isinstance(wn._modules[name], _WeightNorm):
                return wn._modules[name]()
            return base.__getattr__(self, name)

        def __reduce_ex__(self, protocol):  # state apart: a module that refers to itself copies too
            return _new_weight_normed, (base,), self.__getstate__()

        _WN_CLASSES[base] = type(
            f"WeightNorm{base.__name__}",
            (base,) if issubclass(base, _AllOrNothing) else (_AllOrNothing, base),
            {
                "__getattr__": __getattr__,
                "__reduce_ex__": __reduce_ex__,
                "__module__": base.__module__,
                "_normlab_base": base,
            },
        )
    return _WN_CLASSES[base]


def _new_weight_normed(base: type) -> nn.Module:
    cls = _weight_normed_class(base)
    return cls.__new__(cls)


def weight_norm(module: nn.Module, name: str = "weight", dim: int | None = 0) -> nn.Module:
    r"""Reparametrize a weight of a module as a length times a direction, learned separately.

    .. math::

        w = g \, \frac{v}{\lVert v \rVert}

    ``‖v‖`` is over every dim except ``dim`` (0: one length per output unit; ``None`` or ``-1``:
    the whole tensor), and ``g`` starts at ``‖w‖``, so the module computes what it did before.
    ``g`` and ``v`` live at ``parametrizations.<name>.original0`` and ``.original1``, the keys of
    ``torch.nn.utils.parametrizations.weight_norm``, so state dicts move between the two; ``w`` is
    recomputed on every access with the written-out backward of
    :func:`normlab.functional.weight_norm`, and the module survives ``copy.deepcopy``, ``pickle``
    and ``torch.save``. Undo with :func:`remove_weight_norm`.

    Source: Salimans & Kingma 2016, "Weight Normalization: A Simple Reparameterization to
    Accelerate Training of Deep Neural Networks", eq. (2); the survey “Norm相关总结” eq. (19).

    Args:
        module (nn.Module): the module whose parameter is reparametrized (in place).
        name (str): the parameter's name. Default: ``"weight"``.
        dim (int or None): the dim that keeps its own length ``g``. Default: ``0``.

    Returns:
        ``module``, with ``module.<name>`` now computed from ``g`` and ``v``.

    Example::

        >>> import torch, normlab.nn as nln
        >>> lin = torch.nn.Linear(4, 3)
        >>> w = lin.weight.detach().clone()
        >>> lin = nln.weight_norm(lin)
        >>> sorted(lin.state_dict())
        ['bias', 'parametrizations.weight.original0', 'parametrizations.weight.original1']
        >>> torch.allclose(lin.weight, w), tuple(lin.parametrizations.weight.original0.shape)
        (True, (3, 1))
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"weight_norm: expected a torch.nn.Module (e.g. nn.Linear), got {type(module).__name__}")
    wn = module._modules.get("parametrizations")
    if wn is not None and name in wn._modules:
        raise ValueError(f"weight_norm: {name!r} of {type(module).__name__} is already weight-normed")
    param = module._parameters.get(name)
    if not isinstance(param, Tensor):
        raise ValueError(
            f"weight_norm: {type(module).__name__} has no parameter named {name!r}; "
            f"parameters: {sorted(k for k, v in module._parameters.items() if v is not None)}"
        )
    holder = _WeightNorm(param, dim)  # first: a bad dim must leave the module untouched
    if wn is None:
        module.add_module("parametrizations", nn.ModuleDict())
    del module._parameters[name]
    module.parametrizations[name] = holder
    if "_normlab_base" not in type(module).__dict__:
        module.__class__ = _weight_normed_class(type(module))
    return module


def remove_weight_norm(module: nn.Module, name: str = "weight") -> nn.Module:
    """Undo weight_norm: the weight becomes a plain parameter again, holding the current g · v/‖v‖.

    Args:
        module (nn.Module): a module passed through :func:`weight_norm` (changed in place).
        name (str): the reparametrized parameter. Default: ``"weight"``.

    Returns:
        ``module``, of its original class again once no weight of it is reparametrized.

    Example::

        >>> import torch, normlab.nn as nln
        >>> lin = nln.weight_norm(torch.nn.Linear(4, 3))
        >>> lin = nln.remove_weight_norm(lin)
        >>> type(lin).__name__, sorted(lin.state_dict())
        ('Linear', ['bias', 'weight'])
    """
    wn = module._modules.get("parametrizations")
    if wn is None or name not in wn._modules:
        raise ValueError(f"remove_weight_norm: {name!r} of {type(module).__name__} is not weight-normed")
    with torch.no_grad():
        w = wn[name]().detach().clone()
    del wn[name]
    if len(wn) == 0:
        del module._modules["parametrizations"]
        module.__class__ = type(module)._normlab_base
    module.register_parameter(name, Parameter(w))
    return module
