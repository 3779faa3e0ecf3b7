r"""Around the layers: BatchNorm folded away for inference, precise running statistics, freezing.

Lesson 14.1 §2.2: in eval mode BatchNorm is one affine map per channel,

.. math::  \mathrm{BN}(x) = x\cdot\frac{\gamma}{\sqrt{\sigma^2+\epsilon}}
           + \Big(\beta - \frac{\gamma\mu}{\sqrt{\sigma^2+\epsilon}}\Big),

so it can be merged into the Linear or convolution next to it (:func:`fold_batchnorm`), and a
fitted Z-Score or Min-Max scaler, also an affine map per feature, into the first Linear layer
(:func:`fold_scaler`). :func:`recalibrate_bn` replaces the exponential moving averages with the
statistics of the data themselves ("precise BN"), and :func:`freeze_norm` freezes statistics and
affine parameters in a way ``model.train()`` does not undo.

Works with ``torch.nn`` and ``normlab.nn`` BatchNorm alike.

>>> import torch
>>> from torch import nn
>>> model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2)).eval()
>>> _ = model(torch.randn(16, 4))
>>> folded = fold_batchnorm(model)
>>> [type(m).__name__ for m in folded]
['Linear', 'Identity', 'ReLU', 'Linear']
>>> x = torch.randn(5, 4)
>>> torch.allclose(folded(x), model(x), atol=1e-6)
True
"""

from __future__ import annotations

import copy
import math
import warnings
from typing import Iterable

import numpy as np
import torch
from torch import Tensor, nn

from .nn import retype
from .stats import Moments

__all__ = ["batchnorm_as_affine", "fold_batchnorm", "fold_scaler", "recalibrate_bn", "freeze_norm",
           "unfreeze_norm", "guard_finite", "unguard_finite", "replace_norm", "suggest_groups", "audit",
           "is_batchnorm", "to_normlab", "to_torch", "register_conversion", "retype"]

_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _plain_bns() -> tuple[type, ...]:
    """The classes whose forward computes BatchNorm and nothing else: torch.nn's and normlab's."""
    from . import distributed, nn as nln

    return (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nln.BatchNorm1d, nln.BatchNorm2d,
            nln.BatchNorm3d, nln.BatchRenorm1d, nln.BatchRenorm2d, nln.BatchRenorm3d, distributed.SyncBatchNorm)


def _dotted(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _defines_forward(cls: type) -> type:
    """The class of ``cls``'s MRO whose ``forward`` ``cls`` runs."""
    return next(c for c in cls.__mro__ if "forward" in c.__dict__)


# what a subclass may define and still compute what its base does
_HARMLESS = frozenset({"__init__", "extra_repr", "reset_parameters", "reset_running_stats", "__repr__",
                       "__reduce_ex__", "__init_subclass__"})


def _keeps(cls: type, known: type) -> bool:
    """``cls`` computes what ``known`` (a base of it) does: the classes between them define no
    method but harmless ones, so neither the forward nor anything it calls (``_check_input_dim``,
    ``_apply_instance_norm``, ...) is their own."""
    for c in cls.__mro__:
        if c is known:
            return True
        if any(callable(v) and k not in _HARMLESS for k, v in vars(c).items() if not isinstance(v, type)):
            return False
    return False


class _Unknown(str):
    """Why a norm subclass is not known: a method of its own (the forward, or one it calls)."""


def _bn_role(m: nn.Module):
    """How normlab knows a module as a BatchNorm: ``None`` (not a BatchNorm), ``"plain"``, a
    function giving what its forward applies after the normalization (``thirdparty.BN_THEN``), or a string
    saying why a BatchNorm subclass is not known (an ``_Unknown``: methods of its own)."""
    from . import nn as nln
    from .thirdparty import BN_THEN

    if (not isinstance(m, (nn.modules.batchnorm._NormBase, nln._NormBase))
            or isinstance(m, (nn.modules.instancenorm._InstanceNorm, nln._InstanceNorm))):
        return None
    cls = type(m)
    known = next((c for c in cls.__mro__ if c in _plain_bns()), None)
    if known is not None and _keeps(cls, known):
        return "plain"
    impl = _defines_forward(cls)
    then = BN_THEN.get(_dotted(impl))
    if then is not None and _keeps(cls, impl):
        return then
    return _Unknown(_not_known(m, "BatchNorm"))


def _not_known(m: nn.Module, what: str = "the class it subclasses") -> str:
    from .nn import torch_base

    base = torch_base(type(m))
    if base is not None:
        return (f"{_dotted(type(m))} subclasses {base.__name__} with methods of its own (its forward, or one it "
                f"calls), so normlab cannot know that it computes {what}; register_conversion, then to_normlab, "
                "teaches it")
    return "no conversion is registered for this class; register_conversion teaches one"


def is_batchnorm(m: nn.Module) -> bool:
    """Tell whether a module is a BatchNorm whose forward normlab knows.

    True for torch.nn's BatchNorm1d/2d/3d and SyncBatchNorm, normlab.nn's BatchNorm and
    BatchRenorm layers, :class:`normlab.distributed.SyncBatchNorm`, subclasses of these that keep
    their forward, and BatchNorms that apply a known activation after the normalization (timm's
    ``BatchNormAct2d``: the normalization is folded, the dropout and activation stay). False for
    every other module, and for a BatchNorm subclass with methods of its own (its forward, or
    one that forward calls, such as ``_check_input_dim``): normlab cannot know what it computes, so no function of this module treats it as a BatchNorm
    (each one that acts on BatchNorms finds them with this one, and says which it left and why).

    Args:
        m (nn.Module): the module to test.

    Returns:
        bool: whether ``m`` is a BatchNorm normlab knows.

    Example::

        >>> class Scaled(nn.BatchNorm2d):            # a forward of its own: not a known BatchNorm
        ...     def forward(self, x):
        ...         return 2 * super().forward(x)
        >>> is_batchnorm(nn.BatchNorm2d(3)), is_batchnorm(Scaled(3)), is_batchnorm(nn.LayerNorm(3))
        (True, False, False)
    """
    role = _bn_role(m)
    return role is not None and not isinstance(role, _Unknown)


def _frozen_rest(m: nn.Module):
    """For a frozen BatchNorm (torchvision's FrozenBatchNorm2d, timm's FrozenBatchNormAct2d): what
    stays when it is folded; None for any other module."""
    from .thirdparty import FROZEN_BN

    return FROZEN_BN.get(_dotted(_defines_forward(type(m))))


def _foldable(m: nn.Module) -> bool:
    """A known BatchNorm, or a frozen one: an affine map per channel in eval mode."""
    return is_batchnorm(m) or _frozen_rest(m) is not None


def _unknown_bns(model: nn.Module) -> dict[str, str]:
    """The BatchNorm subclasses of ``model`` whose forward normlab does not know, with the reason."""
    return {n: role for n, m in model.named_modules() if isinstance(role := _bn_role(m), _Unknown)}


def _norm_modules() -> tuple[type, ...]:
    from . import nn as nln

    # normlab.nn's layers subclass these, but BatchRenorm (not torch's BatchNorm: it trains otherwise)
    return (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nln._NormBase)


@torch.no_grad()
def batchnorm_as_affine(bn: nn.Module) -> tuple[Tensor, Tensor]:
    r"""Return the scale and shift per channel of the affine map a BatchNorm computes in eval mode.

    In eval mode BatchNorm normalizes with its running statistics, so it is one affine map per
    channel, ``bn(x) = x·scale + shift`` (Lesson 14.1 §2.2; for a BatchNorm followed by an
    activation, timm's ``BatchNormAct2d``, the map of its normalization, before the activation):

    .. math::

        \text{scale} = \frac{\gamma}{\sqrt{\sigma^2 + \epsilon}}, \qquad
        \text{shift} = \beta - \mu \cdot \text{scale}

    with μ = ``running_mean``, σ² = ``running_var``, ε = ``eps``, and γ = 1, β = 0 without affine
    parameters. Both are computed in float64, for exact folding (:func:`fold_batchnorm` uses
    them). The layer's current mode is not looked at: the map is the one of eval mode.

    Source: Ioffe & Szegedy 2015, "Batch Normalization: Accelerating Deep Network Training by
    Reducing Internal Covariate Shift", §3.1 (inference with the population statistics).

    Args:
        bn (nn.Module): a BatchNorm of torch.nn or normlab.nn (see :func:`is_batchnorm`) with
            running statistics, or a frozen one (torchvision's ``FrozenBatchNorm2d``).

    Returns:
        tuple of two float64 Tensors: ``(scale, shift)``.

    Raises:
        TypeError: ``bn`` is not a BatchNorm.
        ValueError: ``bn`` has no running statistics (``track_running_stats=False``): in eval it
            still normalizes with batch statistics, which is not an affine map.

    Shape:
        - Input of ``bn``: :math:`(N, C, *)`
        - ``scale``, ``shift``: :math:`(C,)`, to broadcast along dim 1, e.g.
          ``x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)`` for :math:`(N, C, H, W)`

    Example::

        >>> _ = torch.manual_seed(0)
        >>> bn = nn.BatchNorm1d(3)
        >>> _ = bn(torch.randn(16, 3) * 2 + 1)       # training: the running statistics move
        >>> scale, shift = batchnorm_as_affine(bn.eval())
        >>> scale.shape, scale.dtype
        (torch.Size([3]), torch.float64)
        >>> x = torch.randn(4, 3)
        >>> torch.allclose(bn(x).double(), x.double() * scale + shift, atol=1e-6)
        True
    """
    if not _foldable(bn):
        raise TypeError(f"expected a BatchNorm module, got {type(bn).__name__}")
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError(
            f"{type(bn).__name__} has no running statistics (track_running_stats=False): in eval it still "
            "normalizes with batch statistics, which is not an affine map; recalibrate_bn or train with stats"
        )
    scale = torch.rsqrt(bn.running_var.double() + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.double()
    shift = -bn.running_mean.double() * scale
    if bn.bias is not None:
        shift = shift + bn.bias.double()
    return scale, shift


def _why_not(bn: nn.Module) -> str | None:
    ours = (_frozen_pre_hook, _guard_pre, _guard_post)
    if any(h not in ours for h in (*bn._forward_pre_hooks.values(), *bn._forward_hooks.values())):
        return "it has forward hooks of its own, which folding it away would drop"
    if bn.training and _frozen_rest(bn) is None:  # a frozen one uses its running statistics in training too
        return "in training mode (it normalizes with batch statistics); call model.eval() first"
    if bn.running_mean is None:
        return "no running statistics (track_running_stats=False)"
    return None


@torch.no_grad()
def _fold_after(layer: nn.Module, bn: nn.Module) -> None:
    """``bn(layer(x))`` into ``layer``: output channel o scaled by a[o], shifted by s[o]."""
    a, s = batchnorm_as_affine(bn)
    w = layer.weight.double()
    view = (-1,) + (1,) * (w.dim() - 1)
    b = layer.bias.double() if layer.bias is not None else torch.zeros_like(a)
    layer.weight.copy_((w * a.view(view)).to(layer.weight.dtype))
    new_bias = (b * a + s).to(layer.weight.dtype)
    if layer.bias is None:
        layer.bias = nn.Parameter(new_bias, requires_grad=layer.weight.requires_grad)
    else:
        layer.bias.copy_(new_bias)


@torch.no_grad()
def _fold_before(bn: nn.Module, linear: nn.Linear) -> None:
    """``linear(bn(x))`` into ``linear``: input feature i scaled by a[i], shift folded into the bias."""
    a, s = batchnorm_as_affine(bn)
    w = linear.weight.double()
    b = linear.bias.double() if linear.bias is not None else torch.zeros(w.shape[0], dtype=torch.float64,
                                                                           device=w.device)
    new_bias = (b + w @ s).to(linear.weight.dtype)
    linear.weight.copy_((w * a.view(1, -1)).to(linear.weight.dtype))
    if linear.bias is None:
        linear.bias = nn.Parameter(new_bias, requires_grad=linear.weight.requires_grad)
    else:
        linear.bias.copy_(new_bias)


def _channels_out(layer: nn.Module) -> int:
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


def fold_batchnorm(model: nn.Module, *, inplace: bool = False, example_input: Tensor | None = None) -> nn.Module:
    """Fold every eval-mode BatchNorm into the Linear/Conv next to it; returns the folded model.

    Two patterns are folded, and the BN becomes ``nn.Identity`` (or, for a BatchNorm that applies
    more after normalizing, such as timm's ``BatchNormAct2d``, what it applies: its dropout and
    activation); a BatchNorm subclass with methods of its own is left, with the reason
    (:func:`is_batchnorm`). Frozen BatchNorms (torchvision's ``FrozenBatchNorm2d``, timm's
    ``FrozenBatchNormAct2d``) fold too, in either mode: they always use their running statistics.

    * ``layer → BN``: a Linear or Conv1d/2d/3d over the BN's channels, whose output feeds only
      the BN; folded into the layer's weight and bias.
    * ``BN → Linear``: a BatchNorm1d whose output feeds only a Linear over the same features;
      folded into the Linear.

    How the pairs are found: ``torch.fx`` traces the model, or, when its
    forward has control flow fx cannot follow, the largest submodules it can trace (so the
    conv → BN → activation blocks of a real model fold even when its top-level forward does
    not trace). A BatchNorm whose neighbours live in a forward that does not trace is found by
    running ``example_input`` through the model once and watching which layer's output the BN
    reads and what else reads it; without ``example_input`` such a model raises a
    ``ValueError`` that names the modules and asks for it.

    A BatchNorm that cannot be folded stays, and a warning names it with the reason: training
    mode, no running statistics, no adjacent layer, an output used elsewhere, or a module called
    more than once (shared weights). The model's attribute ``normlab_fold_report`` lists every
    BatchNorm as ``{"name", "folded_into", "found_by"}`` or ``{"name", "reason"}``. In eval mode
    the result equals the original up to float rounding.

    A BatchNorm1d next to a Linear is folded on the assumption that its input is 2-D ``(N, C)``
    (a BN1d on ``(N, C, L)`` normalizes another axis than the Linear's); with ``example_input``
    the shapes are checked instead.

    Args:
        model: the model, in eval mode for the BNs to fold.
        inplace: fold into ``model`` itself instead of a deep copy. Default: ``False``.
        example_input: one input the model accepts (a tensor, a tuple of positional arguments
            or a dict of keyword arguments); needed where fx cannot trace. With it, the folded
            model is also run against the original, and an output that differs beyond rounding
            (see :func:`to_normlab`) puts everything back and raises a ``ValueError`` naming the
            BatchNorm. Default: ``None``.

    Example::

        >>> class Block(nn.Module):  # a plain Module whose forward fx cannot trace
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
        ...     def forward(self, x):
        ...         if x.shape[1] != 3:
        ...             raise ValueError("three channels expected")
        ...         return torch.relu(self.bn(self.conv(x)))
        >>> block = Block().eval()
        >>> x = torch.randn(2, 3, 8, 8)
        >>> folded = fold_batchnorm(block, example_input=x)
        >>> folded.normlab_fold_report
        [{'name': 'bn', 'folded_into': 'conv', 'found_by': 'observation'}]
        >>> torch.allclose(folded(x), block(x), atol=1e-6)
        True
    """
    model = model if inplace else copy.deepcopy(model)
    if is_batchnorm(model):
        raise ValueError("fold_batchnorm: the model is a BatchNorm itself, with no layer next to it to fold into; "
                         "pass the model that contains it")
    pairs, found_by, why = _find_pairs(model, example_input)
    unknown = _unknown_bns(model)
    before = None if example_input is None else _outputs(model, example_input, list(pairs))
    saved = {}  # the layers' weights and biases before folding, to put back if the check fails
    for other in {other for _, other in pairs.values()} if before is not None else ():
        layer = model.get_submodule(other)
        saved[other] = (layer.weight.detach().clone(), None if layer.bias is None else layer.bias.detach().clone())
    report: list[dict] = []
    for name, m in model.named_modules():
        if name in unknown:
            report.append({"name": name, "reason": unknown[name]})
        if not _foldable(m):
            continue
        reason = _why_not(m)
        if reason is None and name in pairs:
            kind, other = pairs[name]
            target = model.get_submodule(other)
            if kind == "after" and _channels_out(target) == m.running_mean.numel():
                _fold_after(target, m)
            elif kind == "before" and target.in_features == m.running_mean.numel():
                _fold_before(m, target)
            else:
                reason = "the adjacent layer has another number of channels"
            if reason is None:
                report.append({"name": name, "folded_into": other, "found_by": found_by[name]})
                continue
        report.append({"name": name, "reason": reason or why.get(name)
                       or "no Linear/Conv feeding only it, nor a Linear fed only by it"})
    bns = {r["name"]: model.get_submodule(r["name"]) for r in report if "folded_into" in r}
    for name, bn in bns.items():
        _set_submodule(model, name, _after_normalization(bn))
    if before is not None and (where := _check(model, example_input, list(bns), before)):
        with torch.no_grad():
            for other, (weight, bias) in saved.items():
                layer = model.get_submodule(other)
                layer.weight.copy_(weight)
                if bias is None:
                    layer.bias = None
                else:
                    layer.bias.copy_(bias)
        for name, bn in bns.items():
            _set_submodule(model, name, bn)
        raise ValueError(f"fold_batchnorm: {where}; the model is left as it was")
    left = {r["name"]: r["reason"] for r in report if "reason" in r}
    if left:
        warnings.warn(_left_in_place("fold_batchnorm", left), stacklevel=2)
    model.normlab_fold_report = report
    return model


def _after_normalization(bn: nn.Module) -> nn.Module:
    """What stays of a known BatchNorm once its normalization is folded away or replaced."""
    role = _bn_role(bn) or _frozen_rest(bn)
    return nn.Identity() if role == "plain" else role(bn)


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


# ------------------------------------------------------------------ which layer feeds which
def _find_pairs(model: nn.Module, example_input=None) -> tuple[dict, dict, dict]:
    """The BatchNorms of ``model`` that sit next to a layer they can be folded into.

    Returns ``(pairs, found_by, why)``: ``pairs[bn] = ("after", layer)`` for a Linear/Conv
    whose output only the BN reads, or ``("before", linear)`` for a BatchNorm1d whose output only
    a Linear reads (module names as in ``named_modules``); ``found_by[bn]`` is ``"trace"`` or
    ``"observation"``; ``why[bn]`` says why a BN was looked at and not paired, where that is known.

    Every module whose own forward ``torch.fx`` cannot trace (its children kept as calls) is
    opaque: the model is traced from the top with the opaque modules as leaves, and each child of
    an opaque module from itself. A BN whose parent is opaque is placed by observation: one
    forward pass of ``example_input`` in eval mode, under hooks and a ``TorchFunctionMode`` that
    record which module call produced each tensor and every module and torch function that
    reads it (the model's modes and state are left as they were).
    """
    names = _names_of(model)
    bns = [n for n, m in model.named_modules() if _foldable(m)]
    parents = {n.rpartition(".")[0] for n in bns}
    ancestors = {a for p in parents for a in _prefixes(p)}
    opaque = {n: why for n in sorted(ancestors) if (why := _untraceable(model.get_submodule(n)))}
    pairs: dict[str, tuple[str, str]] = {}
    found_by: dict[str, str] = {}
    roots, attrs = [], set()
    for root, graph in _graphs(model, opaque, ancestors):
        roots.append(root)
        attrs |= {f"{root}.{n.target}" if root else n.target for n in graph.nodes if n.op == "get_attr"}
        for bn, (kind, other) in _graph_pairs(model, root, graph, names).items():
            pairs[bn], found_by[bn] = (kind, other), "trace"
    traced_parents = {p for p in parents if p not in opaque
                      and any(r == "" or p == r or p.startswith(r + ".") for r in roots)}
    hidden = [bn for bn in bns if bn.rpartition(".")[0] not in traced_parents
              and _why_not(model.get_submodule(bn)) is None]
    seen = _observe(model, example_input) if example_input is not None else None
    why: dict[str, str] = {}
    if seen is not None:
        observed = seen.pairs(names)
        for bn in hidden:
            if bn in observed:
                pairs[bn], found_by[bn] = observed[bn], "observation"
        for bn, (kind, other) in list(pairs.items()):
            one_d_linear = isinstance(model.get_submodule(other), nn.Linear) and _is_bn1d(model.get_submodule(bn))
            if one_d_linear and seen.ndim.get(bn, 2) != 2:  # shapes from the run: BN1d ↔ Linear only on (N, C)
                del pairs[bn]
                why[bn] = f"a BatchNorm1d on {seen.ndim[bn]}-D input normalizes another axis than the Linear's"
            elif any(a in opaque for a in _prefixes(bn)[:-1]) and observed.get(bn) != (kind, other):
                # traced inside a block that a forward fx cannot trace calls: the run must agree
                del pairs[bn]
                why[bn] = "the run of example_input shows another use of it or of its layer"
    elif hidden:
        where = sorted({bn.rpartition(".")[0] for bn in hidden})
        raise ValueError(
            f"fold_batchnorm: the neighbours of {', '.join(map(module_label, hidden))} are decided in the forward of "
            + "; ".join(f"{module_label(w, model.get_submodule(w))}, which torch.fx cannot trace "
                        f"({opaque.get(w, 'not traced')})" for w in where)
            + ". Pass example_input= (one batch the model accepts) so they are found by running it once."
        )
    for bn in hidden:
        if seen is not None and bn not in seen.calls:
            why[bn] = "not called in the forward pass of example_input"
    for bn, (kind, other) in list(pairs.items()):
        reason = _unfoldable_layer(model, other, attrs, seen)
        if reason:
            del pairs[bn]
            why[bn] = f"{other} {reason}"
    return pairs, found_by, why


def _unfoldable_layer(model: nn.Module, name: str, attrs: set[str], seen) -> str | None:
    """Why folding into the layer ``name`` would change something else, or None.

    Folding rewrites the layer's weight in place, so it must be the layer's own plain weight,
    used by the layer's plain forward and by nothing else."""
    from torch.nn.utils import parametrize

    layer = model.get_submodule(name)
    base = next(b for b in _LAYERS if isinstance(layer, b))
    if type(layer).forward is not base.forward:
        return f"is a {type(layer).__name__} with a forward of its own (folding assumes {base.__name__}'s)"
    if parametrize.is_parametrized(layer) or any(hasattr(layer, a) for a in ("weight_orig", "weight_v", "weight_g")):
        return "has a parametrized weight (weight norm, pruning, ...)"
    own = {id(p) for p in layer.parameters(recurse=False)}
    uses = sum(id(p) in own for _, p in model.named_parameters(remove_duplicate=False))
    if uses > len(own):
        return "shares a parameter with another module (tied weights)"
    if {f"{name}.weight", f"{name}.bias"} & attrs:
        return "has its weight read outside its forward (tied weights)"
    if seen is not None:
        for p in layer.parameters(recurse=False):
            if not seen.reads.get(id(p), set()) <= {name}:
                return "has its weight read outside its forward (tied weights)"
    return None


def _prefixes(name: str) -> list[str]:
    """``"a.b"`` → ``["", "a", "a.b"]``: the module and its ancestors."""
    parts = name.split(".") if name else []
    return [""] + [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def _names_of(model: nn.Module) -> dict[int, str]:
    """``id(module) → name`` for the modules reachable under one name only; shared ones (the
    same object under two names) are left out, so they are never folded."""
    count: dict[int, int] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        count[id(m)] = count.get(id(m), 0) + 1
    return {id(m): n for n, m in model.named_modules() if count[id(m)] == 1}


def _is_bn1d(m: nn.Module) -> bool:
    # only a plain BatchNorm folds into the Linear after it: an activation after it would be skipped
    return isinstance(m, nn.BatchNorm1d) and _bn_role(m) == "plain"


class _Tracer(torch.fx.Tracer):
    """fx tracer with norm layers as leaves (their input checks do not trace) and ``leaves``;
    with ``shallow``, every module but the root is a leaf (only the root's own code is traced)."""

    def __init__(self, leaves=(), shallow: nn.Module | None = None):
        super().__init__()
        self.leaves, self.shallow = {id(m) for m in leaves}, shallow

    def is_leaf_module(self, m, qualname):
        if self.shallow is not None:
            return m is not self.shallow
        return (id(m) in self.leaves or isinstance(m, _norm_modules()) or _frozen_rest(m) is not None
                or super().is_leaf_module(m, qualname))


def _why(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:120]}" if text else type(e).__name__


def _untraceable(m: nn.Module) -> str | None:
    """Why fx cannot trace ``m``'s own forward (its children kept as calls), or None."""
    try:
        _Tracer(shallow=m).trace(m)
    except Exception as e:  # dynamic control flow, unsupported arguments, ...
        return _why(e)
    return None


def _graphs(model: nn.Module, opaque: dict[str, str], ancestors: set[str]):
    """``(root name, fx graph)`` of the largest submodules that trace, opaque modules as leaves.

    A module without a BatchNorm inside that still breaks the trace is made a leaf too (it is
    then one reader like any other); a root that fails even so is treated as opaque."""
    leaves = [model.get_submodule(n) for n in opaque]
    plain = [m for n, m in model.named_modules() if n not in ancestors]

    def visit(name: str, m: nn.Module):
        if name not in opaque:
            for extra in ((), plain):
                try:
                    yield name, _Tracer(leaves=leaves + list(extra)).trace(m)
                    return
                except Exception as e:
                    why = _why(e)
            opaque[name] = why
        for child, sub in m.named_children():
            full = f"{name}.{child}" if name else child
            if full in ancestors:
                yield from visit(full, sub)

    yield from visit("", model)


def _graph_pairs(model: nn.Module, root: str, graph, names: dict[int, str]) -> dict[str, tuple[str, str]]:
    """Pairs in one fx graph traced from ``root`` (targets relative to it)."""
    base = model.get_submodule(root) if root else model
    mods = {f"{root}.{n}" if root and n else (n or root): m for n, m in base.named_modules()}
    full = {n.target: (f"{root}.{n.target}" if root else n.target) for n in graph.nodes if n.op == "call_module"}
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1

    def once(node) -> bool:
        return calls[node.target] == 1 and id(mods.get(full[node.target])) in names

    pairs: dict[str, tuple[str, str]] = {}
    for node in graph.nodes:
        if node.op != "call_module" or not _foldable(mods.get(full[node.target])) or not once(node):
            continue
        one_d = _is_bn1d(mods[full[node.target]])
        src = node.args[0] if node.args else None
        if (isinstance(src, torch.fx.Node) and src.op == "call_module"
                and isinstance(mods.get(full[src.target]), _LAYERS) and len(src.users) == 1 and once(src)):
            pairs[full[node.target]] = ("after", full[src.target])
            continue
        users = list(node.users)
        if (one_d and len(users) == 1 and users[0].op == "call_module" and once(users[0])
                and isinstance(mods.get(full[users[0].target]), nn.Linear)):
            pairs[full[node.target]] = ("before", full[users[0].target])
    return pairs


_METADATA = frozenset({"shape", "size", "dim", "ndim", "ndimension", "dtype", "device", "layout", "numel", "nelement",
                       "stride", "is_contiguous", "is_floating_point", "is_complex", "requires_grad", "is_cuda",
                       "is_sparse", "is_quantized", "is_meta", "element_size", "storage_offset", "names"})


def _attribute_name(func) -> str:
    """The name of a torch function or Tensor method; a property's getter by the property's name."""
    name = getattr(func, "__name__", "")
    return getattr(getattr(func, "__self__", None), "__name__", name) if name == "__get__" else name


class _Observer(torch.overrides.TorchFunctionMode):
    """One forward pass, recorded: which module call produced each tensor, and who reads it.

    A read is a torch function (or Tensor method) taking the tensor, attributed to the innermost
    module running at the time (``None``: code outside every module), or a module call receiving
    it (a "receipt", attributed to the called module). Module outputs and the model's inputs are
    the tensors watched; strong references keep their ids unique while the pass runs.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.modules = dict(model.named_modules())
        self.names = {id(m): n for n, m in self.modules.items()}
        self.stack: list[str] = []
        self.calls: dict[str, int] = {}
        self.inputs: dict[str, object] = {}
        self.outputs: dict[str, object] = {}
        self.ndim: dict[str, int] = {}
        self.watched: dict[int, Tensor] = {}
        self.reads: dict[int, set] = {}
        self.receipts: dict[int, set] = {}

    def watch(self, t) -> None:
        if isinstance(t, Tensor):
            self.watched[id(t)] = t
            self.reads.setdefault(id(t), set())
            self.receipts.setdefault(id(t), set())

    def _mark(self, where: dict[int, set], values, who) -> None:
        for t in torch.utils._pytree.tree_leaves(values):
            if isinstance(t, Tensor) and self.watched.get(id(t)) is t:
                where[id(t)].add(who)

    def pre(self, module, args):
        name = self.names.get(id(module))
        if name is None:
            return
        self.calls[name] = self.calls.get(name, 0) + 1
        self.inputs[name] = args[0] if args else None
        self._mark(self.receipts, args, name)
        self.stack.append(name)  # before looking at the input: that read is the module's own
        if args and isinstance(args[0], Tensor):
            self.ndim[name] = args[0].dim()

    def post(self, module, args, output):
        name = self.names.get(id(module))
        if name is None:
            return
        if self.stack and self.stack[-1] == name:
            self.stack.pop()
        self.outputs[name] = output
        self.watch(output)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _attribute_name(func) not in _METADATA:  # folding changes values, never shapes or dtypes
            self._mark(self.reads, (args, kwargs), self.stack[-1] if self.stack else None)
        return func(*args, **kwargs)

    def only_read_by(self, t, name: str) -> bool:
        """``t`` is read by module ``name`` and nothing else (receipts by its ancestors pass it on)."""
        owners = set(_prefixes(name)[:-1])
        return (self.reads[id(t)] <= {name}
                and self.receipts[id(t)] - owners <= {name} and name in self.receipts[id(t)])

    def pairs(self, names: dict[int, str]) -> dict[str, tuple[str, str]]:
        by_output = {id(out): n for n, out in self.outputs.items() if isinstance(out, Tensor)}
        ok = set(names.values())

        def single(n) -> bool:
            return n in ok and self.calls.get(n) == 1

        mods = self.modules
        pairs: dict[str, tuple[str, str]] = {}
        for bn, x in self.inputs.items():
            if not (_foldable(mods[bn]) and single(bn) and isinstance(x, Tensor)):
                continue
            src = by_output.get(id(x))
            if (src is not None and isinstance(mods[src], _LAYERS) and single(src)
                    and self.outputs[src] is x and self.only_read_by(x, bn)):
                pairs[bn] = ("after", src)
                continue
            y = self.outputs.get(bn)
            if not (_is_bn1d(mods[bn]) and isinstance(y, Tensor)):
                continue
            users = [n for n, inp in self.inputs.items() if inp is y]
            if (len(users) == 1 and isinstance(mods[users[0]], nn.Linear) and single(users[0])
                    and self.only_read_by(y, users[0])):
                pairs[bn] = ("before", users[0])
        return pairs


def _observe(model: nn.Module, example_input) -> _Observer:
    """Run ``example_input`` through ``model`` once in eval mode and no_grad, recording the data
    flow (:class:`_Observer`); the model's modes are restored, its state is not touched."""
    seen = _Observer(model)
    for a in torch.utils._pytree.tree_leaves(example_input):
        seen.watch(a)
    for m in model.modules():  # a layer's weights, to see whether anything but the layer reads them
        if isinstance(m, _LAYERS):
            for p in m.parameters(recurse=False):
                seen.watch(p)
    modes = {m: m.training for m in model.modules()}
    hooks = [nn.modules.module.register_module_forward_pre_hook(seen.pre),
             nn.modules.module.register_module_forward_hook(seen.post)]
    try:
        model.eval()
        with torch.no_grad(), seen:
            out = _call(model, example_input)
        seen._mark(seen.reads, out, "<output>")  # what the model returns is read by its caller
    finally:
        for h in hooks:
            h.remove()
        for m, mode in modes.items():
            m.training = mode
    return seen


def fold_scaler(scaler, layer: nn.Module, *, example_input=None) -> nn.Module:
    """Fold a fitted scaler into the first layer, so a deployed model takes raw features.

    ``scaler`` is a fitted :class:`~normlab.preprocessing.StandardScaler` or
    :class:`~normlab.preprocessing.MinMaxScaler`, or scikit-learn's StandardScaler, MinMaxScaler,
    MaxAbsScaler or RobustScaler: each is ``x·a + c`` per feature, so
    ``linear(scaler.transform(x)) = x·(W·diag(a))ᵀ + (b + W·c)``. A MinMaxScaler with
    ``clip=True`` is not affine and is refused.

    Args:
        scaler: the fitted scaler.
        layer: an ``nn.Linear`` (a new, folded ``nn.Linear`` is returned), or a whole model: the
            Linear that alone reads the model's input is found as in :func:`fold_batchnorm` (fx
            trace, or one run of ``example_input`` where the forward does not trace) and a copy
            of the model with that Linear folded is returned.
        example_input: one input of the model, needed only when fx cannot trace it.

    Example::

        >>> from normlab.preprocessing import StandardScaler
        >>> X = torch.randn(100, 4) * 5 + 3
        >>> scaler = StandardScaler().fit(X)
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
        >>> raw = fold_scaler(scaler, model)            # takes X as it comes
        >>> torch.allclose(raw(X), model(scaler.transform(X)), atol=1e-5)
        True
    """
    if isinstance(layer, nn.Linear):
        return _scaled_linear(scaler, layer)
    if not isinstance(layer, nn.Module):
        raise TypeError(f"fold_scaler folds into an nn.Linear or a model (nn.Module), got {type(layer).__name__}")
    model = copy.deepcopy(layer)
    first = _first_linear(model, example_input)
    _set_submodule(model, first, _scaled_linear(scaler, model.get_submodule(first)))
    return model


def _first_linear(model: nn.Module, example_input) -> str:
    """The name of the Linear that alone reads the model's (first) input."""
    names = _names_of(model)
    why = _untraceable(model)
    if why is None:
        try:
            graph = _Tracer().trace(model)
        except Exception as e:
            why = _why(e)
    if why is None:
        x = next(n for n in graph.nodes if n.op == "placeholder")
        users = list(x.users)
        hit = [u.target for u in users if u.op == "call_module"]
        calls = [n.target for n in graph.nodes if n.op == "call_module"]
        attrs = {n.target for n in graph.nodes if n.op == "get_attr"}
        if (len(users) == 1 and hit and isinstance(model.get_submodule(hit[0]), nn.Linear)
                and calls.count(hit[0]) == 1 and id(model.get_submodule(hit[0])) in names):
            return _checked_first(model, hit[0], attrs, None)
        found = [_node_reader(model, u) for u in users]
    elif example_input is None:
        raise ValueError(f"fold_scaler: torch.fx cannot trace {type(model).__name__} ({why}); pass "
                         "example_input= (one batch the model accepts) to find its first layer by running it once")
    else:
        seen = _observe(model, example_input)
        x = next((t for t in torch.utils._pytree.tree_leaves(example_input) if isinstance(t, Tensor)), None)
        if x is None:
            raise TypeError(f"fold_scaler: example_input holds no tensor, got {type(example_input).__name__}")
        for name, inp in seen.inputs.items():
            if (inp is x and isinstance(seen.modules[name], nn.Linear) and seen.calls[name] == 1
                    and name in names.values() and seen.only_read_by(x, name)):
                return _checked_first(model, name, set(), seen)
        who = seen.reads[id(x)] | seen.receipts[id(x)]
        found = [_observed_reader(model, r) for r in sorted(who - {""}, key=str)] + (
            [f"the forward of {module_label('', model)} itself"] if "" in seen.reads[id(x)] else [])
    raise ValueError(f"fold_scaler: the model's input is read by {', '.join(found) or 'nothing'}, not by one "
                     "nn.Linear alone, so no layer can take the scaler in; keep scaler.transform in front of the model "
                     "(fold_scaler(scaler, linear) folds it into a Linear you name, one that alone reads the scaled "
                     "features)")


def _node_reader(model: nn.Module, node) -> str:
    """An fx node that reads the input, in words: a module by its path, else the function or method."""
    if node.op == "call_module":
        return module_label(node.target, model.get_submodule(node.target))
    if node.op == "output":
        return "the model's output"
    return f"{getattr(node.target, '__name__', node.target)}() in the forward of {type(model).__name__}"


def _observed_reader(model: nn.Module, who) -> str:
    """A reader recorded by :class:`_Observer`, in words."""
    if who is None:
        return "code outside the model"
    if who == "<output>":
        return "the model's output"
    return module_label(who, model.get_submodule(who))


def _checked_first(model: nn.Module, name: str, attrs: set[str], seen) -> str:
    reason = _unfoldable_layer(model, name, attrs, seen)
    if reason:
        raise ValueError(f"fold_scaler: the first Linear, {module_label(name)}, {reason}; fold the scaler by hand or into "
                         "a plain nn.Linear")
    return name


@torch.no_grad()
def _scaled_linear(scaler, linear: nn.Linear) -> nn.Linear:
    """A new ``nn.Linear`` equal to ``linear(scaler.transform(x))``."""
    from sklearn.utils.validation import check_is_fitted

    check_is_fitted(scaler)
    a, c = _scaler_affine(scaler)
    if a.numel() != linear.in_features:
        raise ValueError(f"the scaler has {a.numel()} features but the Linear takes {linear.in_features}; "
                         "fold the scaler into the first layer")
    w = linear.weight.double()
    a, c = a.to(w.device), c.to(w.device)
    b = linear.bias.double() if linear.bias is not None else torch.zeros(w.shape[0], dtype=torch.float64,
                                                                           device=w.device)
    out = nn.Linear(linear.in_features, linear.out_features, device=linear.weight.device, dtype=linear.weight.dtype)
    out.weight.copy_(w * a.view(1, -1))
    out.bias.copy_(b + w @ c)
    return out


def _scaler_affine(scaler) -> tuple[Tensor, Tensor]:
    """``(a, c)`` in float64 with ``scaler.transform(x) = x·a + c``, read from the fitted attributes."""
    n = scaler.n_features_in_

    def vec(v, fill):
        return torch.as_tensor(np.full(n, fill) if v is None else v, dtype=torch.float64)

    if hasattr(scaler, "data_min_"):  # MinMax: x·scale_ + min_
        if getattr(scaler, "clip", False):
            raise ValueError("a MinMaxScaler with clip=True is not an affine map and cannot be folded; use clip=False")
        return vec(scaler.scale_, 1.0), vec(scaler.min_, 0.0)
    if hasattr(scaler, "max_abs_"):  # MaxAbs: x / scale_
        return 1.0 / vec(scaler.scale_, 1.0), vec(None, 0.0)
    if hasattr(scaler, "center_"):  # Robust: (x − center_) / scale_, either may be None
        scale = vec(getattr(scaler, "scale_", None), 1.0)
        return 1.0 / scale, -vec(scaler.center_, 0.0) / scale
    if hasattr(scaler, "mean_"):  # Z-Score: (x − mean_) / scale_; mean_ is kept when not used
        centred = getattr(scaler, "with_mean", True) and scaler.mean_ is not None
        scale = vec(scaler.scale_, 1.0)
        return 1.0 / scale, -vec(scaler.mean_ if centred else None, 0.0) / scale
    raise TypeError("fold_scaler folds a fitted StandardScaler, MinMaxScaler, MaxAbsScaler or RobustScaler, "
                    f"got {type(scaler).__name__}")


@torch.no_grad()
def recalibrate_bn(model: nn.Module, data: Iterable, num_batches: int | None = None) -> list[dict]:
    r"""Set every BatchNorm's running statistics to the exact statistics of its input over data.

    Precise BN: instead of the exponential moving average accumulated during training,
    ``running_mean`` and ``running_var`` become the mean and the unbiased variance of all the
    ``n`` values each channel receives over ``data``,

    .. math::

        \mu = \frac{1}{n}\sum_i x_i, \qquad \sigma^2 = \frac{1}{n - 1}\sum_i (x_i - \mu)^2,

    the statistics that eval mode then normalizes with (Lesson 14.1 §2.3, training vs testing).

    One pass runs the model in training mode, as during training, while each BN's input is
    accumulated per channel with :class:`normlab.stats.Moments` (exact, mergeable, in float64);
    ``num_batches_tracked`` becomes the number of batches. Modes, momenta and every other buffer
    and parameter are restored (the pass's own moving-average updates, spectral norm's ``u``, ...).
    A BatchNorm the forward never reached is left as it was. Runs under ``torch.no_grad()``.

    Args:
        model (nn.Module): the model; each of its BatchNorms with running statistics is
            recalibrated.
        data (iterable): batches of input: tensors, or tuples/lists whose first element is the
            input (a DataLoader of ``(x, y)`` works as it is).
        num_batches (int, optional): use at most this many batches of ``data``. Default: ``None``
            (all of them).

    Returns:
        list of dict: per BatchNorm, ``{"name", "mean_shift", "var_ratio", "reached"}``, saying how
        far the old running statistics were: ``mean_shift = ‖μ_old − μ‖/√(C·mean(σ²))`` (the RMS
        shift of the mean, in units of the RMS σ), ``var_ratio = mean(σ²_old/σ²)``;
        ``"reached"`` is False, and both numbers NaN, for a BatchNorm the forward never took.

    Raises:
        ValueError: the model has no BatchNorm with running statistics, or ``data`` gave no batch.

    Example::

        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
        >>> data = [torch.randn(16, 4) for _ in range(4)]
        >>> report = recalibrate_bn(model, data)
        >>> [(r["name"], r["reached"]) for r in report]
        [('1', True)]
        >>> with torch.no_grad():
        ...     h = model[0](torch.cat(data))          # what the BatchNorm saw, all at once
        >>> torch.allclose(model[1].running_mean, h.mean(0), atol=1e-6)
        True
        >>> torch.allclose(model[1].running_var, h.var(0), atol=1e-6)
        True
        >>> int(model[1].num_batches_tracked), model.training
        (4, True)
    """
    bns = [(n, m) for n, m in model.named_modules() if is_batchnorm(m) and m.running_mean is not None]
    _warn_unknown("recalibrate_bn", model)
    if not bns:
        raise ValueError("the model has no BatchNorm with running statistics to recalibrate")
    acc: dict[str, Moments] = {}
    saved = {n: (m.momentum, m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
             for n, m in bns}
    buffers = {n: b.clone() for n, b in model.named_buffers()}  # every buffer the pass may touch
    modes = [(m, m.training) for m in model.modules()]

    def hook(name):
        def pre(module, args):
            x = args[0].detach()
            m = Moments.from_data(x, dims=(0, *range(2, x.dim())), dtype=torch.float64)
            acc[name] = m if name not in acc else acc[name].merge(m)
        return pre

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in bns]
    batches = 0
    try:
        model.train()
        for i, batch in enumerate(data):
            if num_batches is not None and i >= num_batches:
                break
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            model(x)
            batches += 1
    finally:
        for h in handles:
            h.remove()
        for m, was in modes:
            m.training = was
        for n, b in model.named_buffers():  # the pass's EMA updates, spectral norm's u, ...: undone
            b.copy_(buffers[n])
    if batches == 0:
        raise ValueError("recalibrate_bn got no batches from data; pass an iterable of input batches")
    report = []
    for n, m in bns:
        momentum, old_mean, old_var, _ = saved[n]
        if n not in acc:  # a branch the forward never took: left as it was
            report.append({"name": n, "mean_shift": math.nan, "var_ratio": math.nan, "reached": False})
            continue
        stats = acc[n]
        mean, var = stats.mean.reshape(-1), stats.var(correction=1).reshape(-1)
        m.running_mean.copy_(mean.to(m.running_mean.dtype))
        m.running_var.copy_(var.to(m.running_var.dtype))
        m.num_batches_tracked.fill_(batches)
        m.momentum = momentum
        scale = math.sqrt(float(var.double().mean()) or 1.0)
        report.append({
            "name": n,
            "mean_shift": float((old_mean.double() - mean.double()).norm() / scale / math.sqrt(mean.numel())),
            "var_ratio": float((old_var.double() / var.double().clamp_min(1e-30)).mean()),
            "reached": True,
        })
    return report


def _frozen_pre_hook(module: nn.Module, args) -> None:
    # a frozen norm normalizes with its running statistics whatever model.train() said
    module.training = False


def freeze_norm(model: nn.Module) -> nn.Module:
    """Freeze every normalization layer, so that training no longer changes it.

    Running statistics stop updating and γ, β stop receiving gradients (``requires_grad=False``),
    whatever ``model.train()`` says afterwards: a forward pre-hook puts the layer back in eval mode
    before each call, so ``.training`` reads False again from the next forward on. A frozen
    BatchNorm thus always behaves as at test time, normalizing with its running statistics
    (Lesson 14.1 §2.3). Applies to the BatchNorm, InstanceNorm, LayerNorm, GroupNorm and RMSNorm
    layers of torch.nn and normlab.nn; a layer already frozen is left as it is. Survives
    ``deepcopy`` and pickling. :func:`unfreeze_norm` undoes it, and :func:`audit` reports it.

    Args:
        model (nn.Module): the model (a norm layer passed itself is frozen too).

    Returns:
        nn.Module: ``model`` itself, frozen in place.

    Example::

        >>> model = freeze_norm(nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3))).train()
        >>> _ = model(torch.randn(4, 2))
        >>> model[1].training, model[1].weight.requires_grad, int(model[1].num_batches_tracked)
        (False, False, 0)
    """
    _warn_unknown("freeze_norm", model)
    for m in model.modules():
        if (isinstance(m, _norm_modules()) and not isinstance(_bn_role(m), _Unknown)
                and not getattr(m, "_normlab_frozen", None)):
            grads = {n: p.requires_grad for n, p in m.named_parameters(recurse=False)}
            for p in m.parameters(recurse=False):
                p.requires_grad_(False)
            # no hook handle is kept: it would point at this module object, not at one that
            # to_normlab/to_torch re-types from it (unfreeze_norm finds the hook itself)
            m.register_forward_pre_hook(_frozen_pre_hook)
            m._normlab_frozen = (grads,)
            m.training = False
    return model


def unfreeze_norm(model: nn.Module) -> nn.Module:
    """Undo freeze_norm, so that the norm layers train and follow the model's mode again.

    The parameters get back the ``requires_grad`` they had before :func:`freeze_norm` and the
    forward pre-hook is removed; the layers stay in eval mode until ``model.train()`` or
    ``model.eval()`` sets the mode (call one of them). Layers that are not frozen are left alone.

    Args:
        model (nn.Module): the model (a norm layer passed itself is unfrozen too).

    Returns:
        nn.Module: ``model`` itself, unfrozen in place.

    Example::

        >>> model = freeze_norm(nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3)))
        >>> model = unfreeze_norm(model).train()
        >>> model[1].training, model[1].weight.requires_grad
        (True, True)
    """
    for m in model.modules():
        frozen = getattr(m, "_normlab_frozen", None)
        if frozen:
            (grads,) = frozen
            _remove_hooks(m, _frozen_pre_hook)
            for n, p in m.named_parameters(recurse=False):
                p.requires_grad_(grads.get(n, True))
            del m._normlab_frozen
    return model


def _remove_hooks(m: nn.Module, *hooks) -> None:
    """Remove the forward (pre-)hooks ``hooks`` from ``m``, found by identity in its own hook dicts."""
    for table in (m._forward_pre_hooks, m._forward_hooks):
        for key in [k for k, h in table.items() if h in hooks]:
            del table[key]


def _guard_pre(module: nn.Module, args) -> None:
    if module.training and module.running_mean is not None:
        module._normlab_guard_snapshot = tuple(
            t.clone() for t in (module.running_mean, module.running_var, module.num_batches_tracked))


@torch.no_grad()
def _guard_post(module: nn.Module, args, output) -> None:
    snapshot = module.__dict__.pop("_normlab_guard_snapshot", None)
    if snapshot is None or not (torch.isfinite(snapshot[0]).all() and torch.isfinite(snapshot[1]).all()):
        return  # already non-finite before this batch: nothing left to protect (recalibrate_bn)
    if not (torch.isfinite(module.running_mean).all() and torch.isfinite(module.running_var).all()):
        for buf, saved in zip((module.running_mean, module.running_var, module.num_batches_tracked), snapshot):
            buf.copy_(saved)
        module.nonfinite_skips += 1


def guard_finite(model: nn.Module) -> nn.Module:
    """Make every BatchNorm skip a running-statistics update whose batch statistics are not finite.

    Without it one bad batch (NaN/inf values, an fp16 overflow) turns ``running_var`` into NaN
    silently, and the damage only shows in eval. With it, in training mode, each BatchNorm keeps a
    copy of ``running_mean``, ``running_var`` and ``num_batches_tracked`` before the call and
    restores all three when the update left them non-finite, counting the skips in
    ``bn.nonfinite_skips``. The output of that batch is still NaN — the guard protects the model's
    state, not the step. Statistics already non-finite before a batch are left alone
    (:func:`recalibrate_bn` rebuilds them). Works for torch.nn and normlab.nn BatchNorm; a layer
    already guarded is left as it is; survives deepcopy and pickling. :func:`unguard_finite`
    removes the guard.

    Args:
        model (nn.Module): the model (a BatchNorm passed itself is guarded too).

    Returns:
        nn.Module: ``model`` itself, guarded in place.

    Example::

        >>> bn = guard_finite(nn.BatchNorm1d(2))
        >>> y = bn(torch.tensor([[1.0, float("nan")], [2.0, 3.0]]))
        >>> bn.nonfinite_skips, bool(torch.isfinite(bn.running_var).all()), int(bn.num_batches_tracked)
        (1, True, 0)
        >>> bool(y.isnan().any())      # the output of the bad batch itself is not repaired
        True
    """
    _warn_unknown("guard_finite", model)
    for m in model.modules():
        if is_batchnorm(m) and not getattr(m, "_normlab_guard", None):
            m.register_forward_pre_hook(_guard_pre)
            m.register_forward_hook(_guard_post)
            m._normlab_guard = True
            m.nonfinite_skips = getattr(m, "nonfinite_skips", 0)
    return model


def unguard_finite(model: nn.Module) -> nn.Module:
    """Remove the hooks of guard_finite; the skip counters stay for inspection.

    Args:
        model (nn.Module): a model guarded with :func:`guard_finite` (unguarded layers are left
            alone).

    Returns:
        nn.Module: ``model`` itself, without the guard.

    Example::

        >>> bn = unguard_finite(guard_finite(nn.BatchNorm1d(2)))
        >>> _ = bn(torch.tensor([[1.0, float("nan")], [2.0, 3.0]]))
        >>> bn.nonfinite_skips, bool(torch.isfinite(bn.running_var).all())
        (0, False)
    """
    for m in model.modules():
        if getattr(m, "_normlab_guard", None):
            _remove_hooks(m, _guard_pre, _guard_post)
            del m._normlab_guard
    return model


def suggest_groups(channels: int, values_per_channel: int = 64) -> int:
    """Suggest a GroupNorm group count for a number of channels: 32 where the channels allow it.

    Wu & He's default of 32 groups (Wu & He 2018, "Group Normalization"), fewer when a group would
    hold fewer than 2 channels or fewer than 16 values per sample: the largest
    ``G ≤ min(32, C // 2)`` that divides ``C`` with ``(C / G) · values_per_channel ≥ 16``, or 1
    (LayerNorm over the channels) when there is none.

    Args:
        channels (int): the number of channels ``C``.
        values_per_channel (int): the values one channel holds per sample: the spatial size
            (``H·W`` for images; 1 for an MLP). Default: ``64``.

    Returns:
        int: the number of groups, a divisor of ``channels``.

    Example::

        >>> suggest_groups(64), suggest_groups(64, values_per_channel=1), suggest_groups(3)
        (32, 4, 1)
    """
    for g in range(min(32, channels // 2), 1, -1):
        if channels % g == 0 and (channels // g) * values_per_channel >= 16:
            return g
    return 1


_TARGETS = ("group", "layer", "instance", "batchrenorm")


def replace_norm(model: nn.Module, target: str = "group", num_groups: int | None = None, *,
                 inplace: bool = False) -> nn.Module:
    """Replace every BatchNorm by a GroupNorm, LayerNorm, InstanceNorm or BatchRenorm, for small batches.

    BatchNorm needs batches that are not too small (the survey “Norm相关总结”); GroupNorm and its
    special cases do not depend on the batch at all (Wu & He 2018, "Group Normalization"), and
    Batch Renormalization keeps the running statistics but corrects small batches towards them
    (Ioffe 2017, "Batch Renormalization"). ``target`` chooses the replacement:

    * ``"group"``: :class:`normlab.nn.GroupNorm` with ``num_groups`` groups, or
      :func:`suggest_groups` of the channels (values per channel 1 for a BatchNorm1d, else 64);
    * ``"layer"``: GroupNorm with one group: LayerNorm over ``(C, *spatial)``;
    * ``"instance"``: GroupNorm with one channel per group: InstanceNorm with affine parameters;
      needs spatial dims, so a BatchNorm1d is refused;
    * ``"batchrenorm"``: :class:`normlab.nn.BatchRenorm1d`/``2d``/``3d`` of the same rank,
      keeping the running statistics (the whole ``state_dict``) and ``rmax``, ``dmax``,
      ``warmup_steps`` where the BatchNorm has them.

    ``eps``, ``affine``, the mode, device and dtype are carried over, and γ and β too, so a
    trained model starts from its BatchNorm's affine map. Every replacement is built (and
    checked) before any is put in place, so an error leaves an ``inplace`` model as it was; a
    BatchNorm shared by several parents stays shared.

    Args:
        model (nn.Module): the model whose BatchNorms (torch.nn or normlab.nn) are replaced.
        target (str): ``"group"``, ``"layer"``, ``"instance"`` or ``"batchrenorm"``.
            Default: ``"group"``.
        num_groups (int, optional): the number of groups for ``target="group"``; must divide the
            channels of every BatchNorm. Default: ``None`` (:func:`suggest_groups`, per layer).
        inplace (bool, keyword-only): change ``model`` itself instead of a deep copy.
            Default: ``False``.

    Returns:
        nn.Module: the model with its BatchNorms replaced (``model`` itself if ``inplace``).

    Raises:
        ValueError: an unknown ``target``; ``num_groups`` does not divide a layer's channels;
            ``"instance"`` for a BatchNorm1d; ``"batchrenorm"`` for a BatchNorm whose class does
            not say its input rank.

    Example::

        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
        >>> gn = replace_norm(model)
        >>> type(gn[1]).__name__, gn[1].num_groups, type(model[1]).__name__
        ('GroupNorm', 4, 'BatchNorm2d')
        >>> replace_norm(model, "layer")[1].num_groups
        1
        >>> type(replace_norm(model, "batchrenorm")[1]).__name__
        'BatchRenorm2d'
    """
    if target not in _TARGETS:
        raise ValueError(f"target must be one of {_TARGETS}, got {target!r}")
    model = model if inplace else copy.deepcopy(model)
    # every replacement is built (and checked) before any is put in place, so an error leaves an
    # ``inplace`` model as it was; a BatchNorm shared by several parents stays shared
    built: dict[int, nn.Module] = {}
    sites = []
    for parent_name, parent in list(model.named_modules()):
        for child_name, bn in list(parent._modules.items()):  # every name, even two for one module
            if bn is not None and is_batchnorm(bn):
                if id(bn) not in built:
                    new = _replacement(bn, f"{parent_name}.{child_name}".lstrip("."), target, num_groups)
                    if _bn_role(bn) != "plain":  # BN + activation: the activation stays after the new norm
                        new = nn.Sequential(new, _after_normalization(bn))
                    built[id(bn)] = new
                sites.append((parent, child_name, built[id(bn)]))
    for parent, child_name, new in sites:
        setattr(parent, child_name, new)
    _warn_unknown("replace_norm", model)
    return model


def _warn_unknown(tool: str, model: nn.Module) -> None:
    if unknown := _unknown_bns(model):
        warnings.warn(_left_in_place(tool, unknown), stacklevel=3)


def module_label(name: str, module: nn.Module | None = None) -> str:
    """How every message names a module: its path in the model as ``named_modules`` gives it,
    quoted (``'features.0'``; the model itself is "the model"), with its class where given."""
    kind = f" ({type(module).__name__})" if module is not None else ""
    return (repr(name) if name else "the model") + kind


def _left_in_place(tool: str, why: dict[str, str]) -> str:
    """One line per reason, naming the modules (the first five, and how many more)."""
    by_reason: dict[str, list[str]] = {}
    for name, reason in why.items():
        by_reason.setdefault(reason, []).append(module_label(name))
    lines = []
    for reason, names in by_reason.items():
        more = f" and {len(names) - 5} more" if len(names) > 5 else ""
        lines.append(f"{', '.join(names[:5])}{more} ({reason})")
    return f"{tool} left in place {len(why)} BatchNorm(s):\n  " + "\n  ".join(lines)


def _replacement(bn: nn.Module, where: str, target: str, num_groups: int | None) -> nn.Module:
    """The module :func:`replace_norm` puts where ``bn`` was."""
    from . import nn as nln

    c = bn.num_features
    like = bn.weight if bn.weight is not None else bn.running_mean
    factory = {} if like is None else {"device": like.device, "dtype": like.dtype}
    dims = _bn_dims(bn)
    if target == "batchrenorm":
        if dims is None:
            raise ValueError(f"{module_label(where, bn)} does not say its input rank; "
                             "replace it by hand or convert it to BatchNorm1d/2d/3d first")
        new = (nln.BatchRenorm1d, nln.BatchRenorm2d, nln.BatchRenorm3d)[dims - 1](
            c, bn.eps, bn.momentum, bn.affine, True, **factory)
        for attr in ("rmax", "dmax", "warmup_steps"):
            if hasattr(bn, attr):
                setattr(new, attr, getattr(bn, attr))
        if bn.running_mean is not None:
            new.load_state_dict(bn.state_dict())
        elif bn.affine:
            new.weight.data.copy_(bn.weight.data)
            new.bias.data.copy_(bn.bias.data)
    else:
        one_d = dims == 1
        if target == "instance" and one_d:
            raise ValueError(f"{module_label(where, bn)}: InstanceNorm needs spatial dims, a BatchNorm1d "
                             "has none on (N, C) input; use 'group' or 'layer'")
        groups = {"group": num_groups or suggest_groups(c, 1 if one_d else 64), "layer": 1, "instance": c}[target]
        if c % groups:
            raise ValueError(f"num_groups={groups} does not divide the {c} channels of {module_label(where, bn)}")
        new = nln.GroupNorm(groups, c, bn.eps, bn.affine, **factory)
        if bn.affine:
            new.weight.data.copy_(bn.weight.data)
            new.bias.data.copy_(bn.bias.data)
    new.train(bn.training)
    return new


def _bn_dims(bn: nn.Module) -> int | None:
    """1, 2 or 3 for BatchNorm1d/2d/3d of torch.nn or normlab.nn (and their subclasses)."""
    from . import nn as nln

    for dims, classes in ((1, (nn.BatchNorm1d, nln.BatchRenorm1d)), (2, (nn.BatchNorm2d, nln.BatchRenorm2d)),
                          (3, (nn.BatchNorm3d, nln.BatchRenorm3d))):
        if isinstance(bn, classes):  # normlab.nn's BatchNorms subclass torch.nn's
            return dims
    return None


def _spatial_size(shape) -> int:
    return math.prod(shape[2:]) if len(shape) > 2 else 1


@torch.no_grad()
def audit(model: nn.Module, batch_size: int | None = None, input_shape: tuple[int, ...] | None = None) -> dict:
    """Inspect every normalization layer and recommend, in plain words, what to fix.

    Per layer: type, train/eval mode, frozen (:func:`freeze_norm`), parameters that do not train
    while the statistics still update ("frozen but updating"), non-finite running statistics, and
    — given ``batch_size`` and ``input_shape``, by running one dummy batch of zeros in eval mode
    (the modes are restored afterwards) — the number of values a batch gives each statistic.
    Nothing in the model is changed.

    Args:
        model (nn.Module): the model to inspect.
        batch_size (int, optional): the batch size of training, for the dummy batch.
            Default: ``None`` (no dummy batch).
        input_shape (tuple of int, optional): the shape of one example, without the batch dim.
            Default: ``None`` (no dummy batch).

    Returns:
        dict: ``{"layers": [...], "recommendations": [...]}``. Each layer is a dict with
        ``"name"``, ``"type"``, ``"training"``, ``"frozen"``; for a BatchNorm with running
        statistics ``"finite_stats"``, and ``"frozen_but_updating": True`` when γ, β do not train
        but the statistics still update in training mode; with the dummy batch
        ``"values_per_statistic"``: ``N·spatial`` for BatchNorm, ``(C/G)·spatial`` for GroupNorm,
        the product of ``normalized_shape`` for LayerNorm and RMSNorm, ``spatial`` for
        InstanceNorm. Each recommendation is a string that names the layer and the fix:
        non-finite running statistics (:func:`recalibrate_bn`, :func:`guard_finite`), frozen but
        updating (:func:`freeze_norm`), a BatchNorm that sees fewer than 32 values per channel
        (:func:`replace_norm` to GroupNorm or BatchRenorm, or a larger batch).

    Example::

        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
        >>> report = audit(model, batch_size=2, input_shape=(3, 4, 4))
        >>> [(r["name"], r["values_per_statistic"]) for r in report["layers"]]
        [('1', 8)]
        >>> report["recommendations"][0].split(":")[0]
        '1 sees 8 values per channel at batch 2'
    """
    norms = [(n, m) for n, m in model.named_modules() if isinstance(m, _norm_modules())]
    shapes: dict[str, tuple] = {}
    if batch_size is not None and input_shape is not None:
        handles = [m.register_forward_pre_hook(lambda mod, a, n=n: shapes.__setitem__(n, tuple(a[0].shape)))
                   for n, m in norms]
        modes = [(m, m.training) for m in model.modules()]
        try:
            model.eval()
            p = next(model.parameters(), None)
            model(torch.zeros((batch_size, *input_shape), device=p.device if p is not None else None,
                              dtype=p.dtype if p is not None else None))
        finally:
            for h in handles:
                h.remove()
            for m, was in modes:
                m.training = was
    layers, advice = [], []
    for name, m in norms:
        row = {"name": name, "type": type(m).__name__, "training": m.training,
               "frozen": bool(getattr(m, "_normlab_frozen", None))}
        bn = is_batchnorm(m)
        if bn and m.running_mean is not None:
            finite = bool(torch.isfinite(m.running_mean).all() and torch.isfinite(m.running_var).all())
            row["finite_stats"] = finite
            if not finite:
                advice.append(f"{name}: running statistics contain NaN/inf; recalibrate_bn(model, data) "
                              "rebuilds them, guard_finite(model) prevents it")
            params = [p for p in m.parameters(recurse=False)]
            if m.training and not row["frozen"] and params and not any(p.requires_grad for p in params):
                row["frozen_but_updating"] = True
                advice.append(f"{name}: γ, β do not train but the running statistics still update in train "
                              "mode; freeze_norm(model) freezes both")
        if name in shapes:
            shape = shapes[name]
            if bn:
                values = shape[0] * _spatial_size(shape)
            elif isinstance(m, (nn.GroupNorm,)) or type(m).__name__ == "GroupNorm":
                values = (shape[1] // m.num_groups) * _spatial_size(shape)
            elif hasattr(m, "normalized_shape"):
                values = math.prod(m.normalized_shape)
            else:  # instance norm
                values = _spatial_size(shape)
            row["values_per_statistic"] = values
            if bn and values < 32:
                advice.append(f"{name} sees {values} values per channel at batch {batch_size}: use GroupNorm or "
                              "BatchRenorm (replace_norm(model, 'group' | 'batchrenorm')), or a larger batch")
        layers.append(row)
    return {"layers": layers, "recommendations": advice}


# ------------------------------------------------------------------------ one-call adoption
# A module is converted by re-typing it: the new module gets the old one's attributes, with
# the same Parameter and buffer objects (optimizers, tied weights and state_dict keys stay as
# they are) and its hooks; only the class, and so the forward, changes, and the old class stays
# a base of the new one (normlab.nn.adopted_class).

_TO_NORMLAB: dict = {}  # class, or class name for code normlab does not import


def register_conversion(cls, convert) -> None:
    """Teach to_normlab to convert one more norm class.

    ``convert(module)`` returns the normlab module that replaces ``module`` (usually built with
    :func:`retype`, so that its parameters and buffers stay the same objects), or ``None`` to
    leave it; it says why a module cannot be converted by raising ``ValueError``, whose message
    the report of :func:`to_normlab` lists under ``"left"``. ``cls`` is a class, matched exactly
    (not its subclasses), or, for code normlab should not import, a class name; registering it
    again replaces its conversion, and a registration comes before the built-in ones (the
    README lists those). The converted module stays an instance of ``cls``, :func:`to_torch`
    gives it its class back, and :func:`to_normlab` keeps it only when it computes what the
    original did on a probe input.

    Args:
        cls (type or str): the class to convert, or its ``__name__``.
        convert (callable): ``convert(module)`` → the replacing ``nn.Module``, or ``None``.

    Example::

        >>> from normlab import nn as nln
        >>> class MyLayerNorm(nn.LayerNorm):      # a forward of its own: to_normlab leaves it ...
        ...     def forward(self, x):
        ...         return super().forward(x)
        >>> print(to_normlab(MyLayerNorm(4), report=True)[1]["left"][0][2])
        normlab.convert.MyLayerNorm subclasses LayerNorm with methods of its own (its forward, or one it calls), so normlab cannot know that it computes the class it subclasses; register_conversion, then to_normlab, teaches it
        >>> register_conversion(MyLayerNorm, lambda m: retype(m, nln.LayerNorm))  # ... until taught
        >>> converted = to_normlab(MyLayerNorm(4))
        >>> isinstance(converted, MyLayerNorm), type(to_torch(converted)) is MyLayerNorm
        (True, True)
    """
    _TO_NORMLAB[cls] = convert


def _torch_pairs() -> dict:
    from . import nn as nln

    return {nn.BatchNorm1d: nln.BatchNorm1d, nn.BatchNorm2d: nln.BatchNorm2d, nn.BatchNorm3d: nln.BatchNorm3d,
            nn.InstanceNorm1d: nln.InstanceNorm1d, nn.InstanceNorm2d: nln.InstanceNorm2d,
            nn.InstanceNorm3d: nln.InstanceNorm3d, nn.LayerNorm: nln.LayerNorm, nn.GroupNorm: nln.GroupNorm,
            nn.RMSNorm: nln.RMSNorm}


def _conversion(cls: type):
    """How to_normlab converts a class, and whether the result needs no probe: a registered
    conversion, torch.nn's own (for a subclass only where it keeps every method), a built-in one,
    or ``(None, False)``."""
    from . import thirdparty

    registered = _TO_NORMLAB.get(cls) or _TO_NORMLAB.get(cls.__name__)
    if registered is not None:
        return registered, False
    pairs = _torch_pairs()
    base = next((c for c in cls.__mro__ if c in pairs), None)
    if base is not None and _keeps(cls, base):  # torch.nn's forward and all it calls: normlab's suite tests those
        return (lambda m: retype(m, pairs[base])), True
    return thirdparty.conversion_for(cls), False


def _is_norm(m: nn.Module) -> bool:
    """A module whose class says it normalizes and that holds no such module (not a container)."""
    def says(mod):
        return "norm" in type(mod).__name__.lower()
    return says(m) and not any(says(c) for c in m.modules() if c is not m)


@torch.no_grad()
def _probe(original: nn.Module, new: nn.Module) -> str | None:
    """How ``new`` differs from ``original`` on a probe input, in eval mode, float32 and bfloat16
    (and the parameters' dtype), or None; neither module's state changes."""
    from . import thirdparty

    xs = thirdparty.probe_input(new)
    like = next(iter(original.parameters()), None)
    if xs is None or (like is not None and like.device.type == "meta"):
        return None
    dtypes = [torch.float32, torch.bfloat16] + ([like.dtype] if like is not None and like.is_floating_point() else [])
    modes = [(m, m.training) for m in (*original.modules(), *new.modules())]
    try:
        for m, _ in modes:
            m.training = False
        for dtype in dict.fromkeys(dtypes):
            xd = [x.to(device=like.device if like is not None else None, dtype=dtype) for x in xs]
            try:
                want = original.forward(*xd)
            except Exception:  # noqa: BLE001 - the original does not take this dtype: nothing to match
                continue
            try:
                got = new.forward(*xd)
            except Exception as err:  # noqa: BLE001 - the original took this input, the conversion must too
                return f"it raises {type(err).__name__} on a {dtype} probe input the original takes: {err}"
            if (why := _difference([got], [want], floor=dtype)) is not None:
                return f"it would compute something else than the original on a {dtype} probe input: {why}"
    finally:
        for m, was in modes:
            m.training = was
    return None


def _swap(tool: str, model: nn.Module, choose, inplace: bool, example_input) -> tuple[nn.Module, dict]:
    """Replace every module ``choose`` returns a replacement for; a module shared by several
    parents stays shared, and every replacement is built before any is put in place. With
    ``example_input`` the new model is run against the old one, and a replaced module whose
    output differs beyond rounding puts every module back and raises, naming it."""
    model = model if inplace else copy.deepcopy(model)
    report = {"converted": [], "left": []}
    top = choose(model, "", report)  # the model itself is a norm
    built: dict[int, nn.Module | None] = {}
    sites = []
    for parent_name, parent in ([] if top is not None else list(model.named_modules())):
        for child_name, child in list(parent._modules.items()):
            if child is None:
                continue
            if id(child) not in built:
                built[id(child)] = choose(child, f"{parent_name}.{child_name}".lstrip("."), report)
            if built[id(child)] is not None:
                sites.append((parent, child_name, child, built[id(child)]))
    names = [name for name, *_ in report["converted"]]
    before = _outputs(model, example_input, names) if example_input is not None and names else None
    for parent, child_name, _, new in sites:
        parent._modules[child_name] = new
    result = top if top is not None else model
    if before is not None and (where := _check(result, example_input, names, before)):
        for parent, child_name, old, _ in sites:
            parent._modules[child_name] = old
        raise ValueError(f"{tool}: {where}; the model is left as it was")
    return result, report


def _check(model: nn.Module, example_input, names, before: dict) -> str | None:
    """Where the changed model departs from ``before`` on ``example_input``, or why it could not
    run it, in words; None where it computes the same."""
    try:
        after = _outputs(model, example_input, names)
    except Exception as err:  # noqa: BLE001 - whatever the changed model raises, the change is undone
        return f"the changed model raised {type(err).__name__}: {err}"
    return _first_difference(before, after)


def to_normlab(model: nn.Module, *, inplace: bool = False, report: bool = False, example_input=None):
    """Convert every norm of a model to normlab's implementation, keeping its parameters.

    Converted: torch.nn's BatchNorm1d/2d/3d, InstanceNorm1d/2d/3d, LayerNorm, GroupNorm and
    RMSNorm, subclasses of them that keep their forward, and the norms of timm, torchvision,
    transformers and diffusers that the README lists, each with its original's dtype rules
    (:mod:`normlab.thirdparty`), plus those of the registry (:func:`register_conversion`). A
    module is converted only where normlab knows what its forward computes: a subclass with a
    method of its own is left, and so is a third-party conversion that does not reproduce the
    original on a probe input (float32 and bfloat16, eval mode), which guards against an upstream
    change of that class. Each module is re-typed (:func:`retype`): parameters and buffers are
    the same objects, so ``state_dict`` keys, optimizers and tied weights are unchanged; a module
    shared by several parents stays shared; and the converted module is still an instance of its
    original class (:func:`normlab.nn.adopted_class`), so ``isinstance`` checks elsewhere find it.
    :func:`to_torch` goes back.

    Args:
        model (nn.Module): any module (a norm itself is converted too).
        inplace (bool, keyword-only): change ``model`` itself instead of a deep copy.
            Default: ``False``.
        report (bool, keyword-only): also return
            ``{"converted": [(name, from, to)], "left": [(name, class, why)]}``, ``left`` listing
            every norm module (a module whose class name says it normalizes and that holds no
            such module) that was not converted, with the reason. Default: ``False``.
        example_input (optional, keyword-only): an input of the model (a tensor, a tuple of
            positional arguments or a dict of keyword arguments): the converted model is run
            against the original on it, in the model's mode, and a converted module whose output
            differs beyond rounding (1e-3 of the output's scale in float32, 5e-2 in bfloat16)
            makes the call raise a ``ValueError`` naming it, with the model left as it was.
            Default: ``None``.

    Returns:
        nn.Module, or ``(nn.Module, dict)`` with ``report=True``: the converted model.

    Example::

        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8))
        >>> fast, done = to_normlab(model, report=True, example_input=torch.randn(3, 4))
        >>> done["converted"]
        [('1', 'LayerNorm', 'normlab.nn.LayerNorm')]
        >>> isinstance(fast[1], torch.nn.LayerNorm)
        True
    """
    from . import nn as nln

    def choose(m, name, rep):
        if _is_normlab(m):
            return None
        convert, trusted = _conversion(type(m))
        if convert is None:
            if _is_norm(m):
                rep["left"].append((name, type(m).__name__, _not_known(m)))
            return None
        try:
            new = convert(m)
        except (ValueError, AttributeError, TypeError) as err:
            rep["left"].append((name, type(m).__name__, str(err)))
            return None
        if new is None:
            return None
        impl = type(new)
        try:
            new.__class__ = nln.adopted_class(impl, type(m))
        except TypeError as err:  # no class can derive from both
            rep["left"].append((name, type(m).__name__, f"its class cannot be kept as a base: {err}"))
            return None
        added = tuple(k for k in new.__dict__ if k not in m.__dict__)
        if added:
            new.__dict__[nln._ADDED] = added
        if not trusted and (why := _probe(m, new)) is not None:
            rep["left"].append((name, type(m).__name__, why))
            return None
        public = next(c for c in impl.__mro__ if not c.__name__.startswith("_") and _is_normlab_class(c))
        summary = " ".join((impl.__doc__ or "").replace("``", "").split()).split(". ")[0].rstrip(".")
        how = "" if impl is public else f" ({summary})"
        rep["converted"].append((name, type(m).__name__, f"normlab.nn.{public.__name__}{how}"))
        return new

    model, rep = _swap("to_normlab", model, choose, inplace, example_input)
    return (model, rep) if report else model


def _is_normlab_class(cls: type) -> bool:
    return cls.__module__ in ("normlab.nn", "normlab.thirdparty", "normlab.distributed")


def _is_normlab(m: nn.Module) -> bool:
    """A module that computes with normlab already (its forward is normlab's)."""
    return _is_normlab_class(_defines_forward(type(m)))


def to_torch(model: nn.Module, *, inplace: bool = False, example_input=None) -> nn.Module:
    """Convert normlab's norms back to torch.nn's, undoing to_normlab.

    normlab.nn's BatchNorm1d/2d/3d, InstanceNorm1d/2d/3d, LayerNorm, GroupNorm and RMSNorm become
    torch.nn's again, and every module :func:`to_normlab` converted gets its own class back
    (third-party and registered classes included); parameters and buffers stay the same objects
    (:func:`retype`). Other modules are left alone.

    Args:
        model (nn.Module): any module (a norm itself is converted too).
        inplace (bool, keyword-only): change ``model`` itself instead of a deep copy.
            Default: ``False``.
        example_input (optional, keyword-only): as for :func:`to_normlab`: the result is run
            against the model on it, and a difference beyond rounding raises. Default: ``None``.

    Returns:
        nn.Module: the converted model.

    Example::

        >>> import torch
        >>> bn = torch.nn.BatchNorm2d(3)
        >>> back = to_torch(to_normlab(bn))
        >>> type(back)
        <class 'torch.nn.modules.batchnorm.BatchNorm2d'>
        >>> torch.equal(back.weight, bn.weight)
        True
    """
    from . import nn as nln

    back = set(_torch_pairs().values())

    def choose(m, name, rep):
        if getattr(type(m), nln._ORIGIN, None) is None and type(m) not in back:
            return None
        try:
            new = nln._as_original(m)
        except ValueError as err:  # raised before any module is replaced: the model is as it was
            raise ValueError(f"to_torch: {module_label(name, m)}: {err}") from None
        rep["converted"].append((name, type(m).__name__, type(new).__name__))
        return new

    return _swap("to_torch", model, choose, inplace, example_input)[0]


# ------------------------------------------------------------- the same function, checked
# relative to the largest value of the original's output: rounding, not a different function
_TOLERANCE = {torch.float64: 1e-7, torch.float32: 1e-3, torch.float16: 2e-2, torch.bfloat16: 5e-2}


def _call(model: nn.Module, example_input):
    if isinstance(example_input, dict):
        return model(**example_input)
    return model(*example_input) if isinstance(example_input, tuple) else model(example_input)


def _tensors(out) -> list[Tensor]:
    return [t.detach().clone() for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, Tensor)]


@torch.no_grad()
def _outputs(model: nn.Module, example_input, names=()) -> dict[str, list[Tensor]]:
    """The tensors each module of ``names`` returns at its first call, in the order they ran,
    and the model's under ``""``, for one run of ``example_input`` in the model's modes, with
    a fixed random seed (dropout draws the same masks every run); every buffer is restored."""
    got: dict[str, list[Tensor]] = {}

    def record(name):
        def hook(module, args, out) -> None:  # returns None: the output stays as it is
            if name not in got:
                got[name] = _tensors(out)
        return hook

    handles = [model.get_submodule(n).register_forward_hook(record(n)) for n in names if n]
    buffers = [(b, b.clone()) for b in model.buffers()]
    cuda = sorted({t.device.index or 0 for t in (*model.parameters(), *model.buffers()) if t.device.type == "cuda"})
    try:
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(0)
            got[""] = _tensors(_call(model, example_input))
    finally:
        for h in handles:
            h.remove()
        for b, saved in buffers:
            b.copy_(saved)
    return got


def _difference(new: list[Tensor], old: list[Tensor], floor: torch.dtype | None = None) -> str | None:
    """How ``new`` differs from ``old`` beyond rounding, in words, or None; rounding in the output's
    dtype, or in ``floor`` (the input's) where that is coarser: a float32 output computed from
    bfloat16 values is exact to bfloat16's rounding only."""
    if len(new) != len(old):
        return f"{len(new)} output tensors where the original gave {len(old)}"
    for x, y in zip(new, old):
        dtype = y.dtype
        if x.shape != y.shape:
            return f"an output of shape {tuple(x.shape)} where the original's is {tuple(y.shape)}"
        if x.dtype != y.dtype:
            return f"a {x.dtype} output where the original's is {y.dtype}"
        if not y.is_floating_point():
            if not torch.equal(x, y):
                return "other values"
            continue
        x, y = x.double(), y.double()
        finite = torch.isfinite(y)
        if not torch.equal(finite, torch.isfinite(x)) or not torch.equal(x[~finite].nan_to_num(), y[~finite].nan_to_num()):
            return "NaN or infinity where the original has other values"
        if finite.any():
            err, scale = float((x - y)[finite].abs().max()), float(y[finite].abs().max())
            tol = max(_TOLERANCE.get(dtype, 1e-3), _TOLERANCE.get(floor, 0.0))
            if err > tol * scale:
                return (f"values that differ by up to {err:.3g} ({err / max(scale, 1e-300):.2g} of the largest, "
                        f"{scale:.3g}; rounding stays under {tol:g})")
    return None


def _first_difference(before: dict, after: dict) -> str | None:
    """Where the second run first departs from the first: the module, in the order they ran."""
    for name in after:
        if name not in before:
            return f"{module_label(name)} ran where it did not before"
        if (why := _difference(after[name], before[name])) is not None:
            return f"the output of {module_label(name)} changed: {why}"
    return None
