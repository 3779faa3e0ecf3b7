r"""Around the layers: BatchNorm folded away for inference, precise running statistics, freezing.

Seed 000 §2.2: in eval mode BatchNorm is one affine map per channel,

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

from .stats import Moments

__all__ = ["batchnorm_as_affine", "fold_batchnorm", "fold_scaler", "recalibrate_bn", "freeze_norm",
           "unfreeze_norm", "guard_finite", "unguard_finite", "replace_norm", "suggest_groups", "audit",
           "is_batchnorm", "to_normlab", "to_torch", "register_conversion", "retype"]

_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def is_batchnorm(m: nn.Module) -> bool:
    """A BatchNorm of torch.nn or normlab.nn (anything with BatchNorm's buffers and arithmetic)."""
    from . import nn as nln

    return isinstance(m, (nn.modules.batchnorm._BatchNorm, nln._BatchNorm))


def _norm_modules() -> tuple[type, ...]:
    from . import nn as nln

    return (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nln._NormBase, nln.LayerNorm,
            nln.GroupNorm, nln.RMSNorm)


@torch.no_grad()
def batchnorm_as_affine(bn: nn.Module) -> tuple[Tensor, Tensor]:
    """``(scale, shift)`` per channel of ``bn`` in eval mode: ``bn(x) = x·scale + shift``.

    ``scale = γ/√(σ²+ε)``, ``shift = β − μ·scale`` from the running statistics (γ = 1, β = 0
    without affine parameters), in float64 for exact folding.
    """
    if not is_batchnorm(bn):
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
    if bn.training:
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
        layer.bias = nn.Parameter(new_bias)
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
        linear.bias = nn.Parameter(new_bias)
    else:
        linear.bias.copy_(new_bias)


def _channels_out(layer: nn.Module) -> int:
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


def fold_batchnorm(model: nn.Module, *, inplace: bool = False, example_input: Tensor | None = None) -> nn.Module:
    """Fold every eval-mode BatchNorm into the Linear/Conv next to it; returns the folded model.

    Two patterns are folded, and the BN becomes ``nn.Identity``:

    * ``layer → BN``: a Linear or Conv1d/2d/3d over the BN's channels, whose output feeds only
      the BN; folded into the layer's weight and bias.
    * ``BN → Linear``: a BatchNorm1d whose output feeds only a Linear over the same features;
      folded into the Linear.

    The data flow comes from ``torch.fx.symbolic_trace``, so BNs inside custom modules fold too
    (ResNet blocks). A model that fx cannot trace falls back to neighbours inside each
    ``nn.Sequential``. A BatchNorm that cannot be folded stays, and a warning names it with the
    reason: training mode, no running statistics, no adjacent layer, or an output used elsewhere.
    The model's attribute ``normlab_fold_report`` lists every BatchNorm as
    ``{"name", "folded_into" | "reason"}``. In eval mode the result equals the original up to
    float rounding.

    Modules called more than once (shared weights) are never folded. A BatchNorm1d next to a
    Linear is folded on the assumption that its input is 2-D ``(N, C)`` (a BN1d on ``(N, C, L)``
    normalizes another axis than the Linear's); pass ``example_input`` to check shapes instead.
    """
    model = model if inplace else copy.deepcopy(model)
    pairs = _traced_pairs(model, example_input)
    if pairs is None:
        pairs = _sequential_pairs(model)
    report: list[dict] = []
    folded: set[str] = set()
    for bn_name, (kind, other) in pairs.items():
        bn = model.get_submodule(bn_name)
        reason = _why_not(bn)
        if reason is None:
            target = model.get_submodule(other)
            if kind == "after" and _channels_out(target) == bn.num_features:
                _fold_after(target, bn)
            elif kind == "before" and target.in_features == bn.num_features:
                _fold_before(bn, target)
            else:
                reason = "the adjacent layer has another number of channels"
        if reason is None:
            _set_submodule(model, bn_name, nn.Identity())
            report.append({"name": bn_name, "folded_into": other})
            folded.add(bn_name)
        else:
            report.append({"name": bn_name, "reason": reason})
    for name, m in model.named_modules():
        if is_batchnorm(m) and name not in pairs and name not in folded:
            report.append({"name": name, "reason": _why_not(m) or "no Linear/Conv feeding only it, nor a Linear fed only by it"})
    left = [r for r in report if "reason" in r]
    if left:
        warnings.warn("fold_batchnorm left in place: " + "; ".join(f"{r['name']} ({r['reason']})" for r in left),
                      stacklevel=2)
    model.normlab_fold_report = report
    return model


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _traced_pairs(model: nn.Module, example_input: Tensor | None) -> dict[str, tuple[str, str]] | None:
    """``{bn: ("after", layer) | ("before", linear)}`` from the fx graph, or None if untraceable."""
    import torch.fx

    class _Tracer(torch.fx.Tracer):  # norm layers are leaves: their input checks do not trace
        def is_leaf_module(self, m, qualname):
            return isinstance(m, _norm_modules()) or super().is_leaf_module(m, qualname)

    try:
        graph = _Tracer().trace(model)
        gm = torch.fx.GraphModule(model, graph)
        if example_input is not None:
            from torch.fx.passes.shape_prop import ShapeProp

            ShapeProp(gm).propagate(example_input)
    except Exception:  # dynamic control flow etc.: the Sequential walk serves
        return None
    mods = dict(model.named_modules())
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1

    def two_d(node) -> bool:
        meta = node.meta.get("tensor_meta")
        return meta is None or len(meta.shape) == 2

    pairs: dict[str, tuple[str, str]] = {}
    for node in graph.nodes:
        if node.op != "call_module" or not is_batchnorm(mods.get(node.target)) or calls[node.target] > 1:
            continue
        one_d = isinstance(mods[node.target], (nn.BatchNorm1d, _bn1d()))
        src = node.args[0] if node.args else None
        if (isinstance(src, torch.fx.Node) and src.op == "call_module" and isinstance(mods.get(src.target), _LAYERS)
                and len(src.users) == 1 and calls[src.target] == 1
                and (not one_d or not isinstance(mods[src.target], nn.Linear) or two_d(node))):
            pairs[node.target] = ("after", src.target)
            continue
        users = list(node.users)
        if (len(users) == 1 and users[0].op == "call_module" and isinstance(mods.get(users[0].target), nn.Linear)
                and calls[users[0].target] == 1 and one_d and two_d(node)):
            pairs[node.target] = ("before", users[0].target)
    return pairs


def _sequential_pairs(model: nn.Module) -> dict[str, tuple[str, str]]:
    pairs: dict[str, tuple[str, str]] = {}
    seen: dict[int, int] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        seen[id(m)] = seen.get(id(m), 0) + 1
    for name, seq in model.named_modules():
        if not isinstance(seq, nn.Sequential):
            continue
        children = list(seq._modules.items())  # with repeats: a reused module keeps its places
        if any(seen[id(c)] > 1 for _, c in children if c is not None):
            children = [(n, c if seen[id(c)] == 1 else None) for n, c in children]  # shared: not foldable
        full = [f"{name}.{c}" if name else c for c, _ in children]
        for i, (_, bn) in enumerate(children):
            if bn is None or not is_batchnorm(bn):
                continue
            if i > 0 and isinstance(children[i - 1][1], _LAYERS):
                pairs[full[i]] = ("after", full[i - 1])
            elif (i + 1 < len(children) and isinstance(children[i + 1][1], nn.Linear)
                  and isinstance(bn, (nn.BatchNorm1d, _bn1d()))):
                pairs[full[i]] = ("before", full[i + 1])
    return pairs


def _bn1d():
    from . import nn as nln

    return nln.BatchNorm1d


@torch.no_grad()
def fold_scaler(scaler, linear: nn.Linear) -> nn.Linear:
    """A new ``nn.Linear`` equal to ``linear(scaler.transform(x))``, so a deployed model takes raw
    features. ``scaler`` is a fitted :class:`~normlab.preprocessing.StandardScaler` or
    :class:`~normlab.preprocessing.MinMaxScaler`, or scikit-learn's StandardScaler, MinMaxScaler,
    MaxAbsScaler or RobustScaler: each is ``x·a + c`` per feature. A MinMaxScaler with
    ``clip=True`` is not affine and is refused.
    """
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
    """Precise BN: set every BatchNorm's running statistics to the exact statistics of its input
    over ``data`` (not an exponential moving average).

    ``data`` yields batches (tensors, or tuples/lists whose first element is the input). One pass
    runs the model in training mode, as during training, while each BN's input is accumulated
    per channel with :class:`normlab.stats.Moments` (exact, mergeable); then ``running_mean``
    becomes the mean and ``running_var`` the unbiased variance over all the values seen, and
    ``num_batches_tracked`` the number of batches. Modes, momenta and every other buffer and
    parameter are restored. Returns per layer ``{"name", "mean_shift", "var_ratio"}``: how far the
    old running statistics were (``‖μ_old − μ‖/√mean(σ²)``, ``mean(σ²_old/σ²)``).
    """
    bns = [(n, m) for n, m in model.named_modules() if is_batchnorm(m) and m.running_mean is not None]
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
    """Freeze every normalization layer: running statistics stop updating and γ, β stop receiving
    gradients, whatever ``model.train()`` says afterwards (a forward pre-hook puts the layer back
    in eval mode before each call, so ``.training`` reads False again from the next forward on).
    Survives ``deepcopy`` and pickling. Returns ``model``."""
    for m in model.modules():
        if isinstance(m, _norm_modules()) and not getattr(m, "_normlab_frozen", None):
            grads = {n: p.requires_grad for n, p in m.named_parameters(recurse=False)}
            for p in m.parameters(recurse=False):
                p.requires_grad_(False)
            m._normlab_frozen = (m.register_forward_pre_hook(_frozen_pre_hook), grads)
            m.training = False
    return model


def unfreeze_norm(model: nn.Module) -> nn.Module:
    """Undo :func:`freeze_norm`: parameters get their ``requires_grad`` back and the layers follow
    ``model.train()``/``eval()`` again (call one of them to set the mode). Returns ``model``."""
    for m in model.modules():
        frozen = getattr(m, "_normlab_frozen", None)
        if frozen:
            handle, grads = frozen
            handle.remove()
            for n, p in m.named_parameters(recurse=False):
                p.requires_grad_(grads.get(n, True))
            del m._normlab_frozen
    return model


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
    """Make every BatchNorm skip a running-statistics update whose batch statistics are not
    finite (a NaN/inf batch, an fp16 overflow), counting the skips in ``bn.nonfinite_skips``.

    Without it one bad batch turns ``running_var`` into NaN silently, and the damage only shows
    in eval. The output of that batch is still NaN — the guard protects the model's state, not
    the step. Works for torch.nn and normlab.nn BatchNorm; survives deepcopy and pickling.
    """
    for m in model.modules():
        if is_batchnorm(m) and not getattr(m, "_normlab_guard", None):
            m._normlab_guard = (m.register_forward_pre_hook(_guard_pre), m.register_forward_hook(_guard_post))
            m.nonfinite_skips = getattr(m, "nonfinite_skips", 0)
    return model


def unguard_finite(model: nn.Module) -> nn.Module:
    """Remove :func:`guard_finite`'s hooks (the skip counters stay for inspection)."""
    for m in model.modules():
        handles = getattr(m, "_normlab_guard", None)
        if handles:
            for h in handles:
                h.remove()
            del m._normlab_guard
    return model


def suggest_groups(channels: int, values_per_channel: int = 64) -> int:
    """A GroupNorm group count: Wu & He's 32, fewer when a group would hold fewer than 2 channels
    or fewer than 16 values per sample (``values_per_channel`` is the spatial size; 1 for an MLP)."""
    for g in range(min(32, channels // 2), 1, -1):
        if channels % g == 0 and (channels // g) * values_per_channel >= 16:
            return g
    return 1


_TARGETS = ("group", "layer", "instance", "batchrenorm")


def replace_norm(model: nn.Module, target: str = "group", num_groups: int | None = None, *,
                 inplace: bool = False) -> nn.Module:
    """Swap every BatchNorm for a norm that does not depend on the batch (seed 004: BN needs
    batches that are not too small).

    ``target``: ``"group"`` (GroupNorm, ``num_groups`` or :func:`suggest_groups`), ``"layer"``
    (GroupNorm with one group: LayerNorm over (C, *spatial)), ``"instance"`` (GroupNorm with one
    channel per group: InstanceNorm with affine parameters; needs spatial dims) or
    ``"batchrenorm"`` (:class:`normlab.nn.BatchRenorm2d` & co., keeping the running statistics).
    γ and β are carried over, so a trained model starts from its BatchNorm's affine map.
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
                    built[id(bn)] = _replacement(bn, f"{parent_name}.{child_name}".lstrip("."), target, num_groups)
                sites.append((parent, child_name, built[id(bn)]))
    for parent, child_name, new in sites:
        setattr(parent, child_name, new)
    return model


def _replacement(bn: nn.Module, where: str, target: str, num_groups: int | None) -> nn.Module:
    """The module :func:`replace_norm` puts where ``bn`` was."""
    from . import nn as nln

    c = bn.num_features
    like = bn.weight if bn.weight is not None else bn.running_mean
    factory = {} if like is None else {"device": like.device, "dtype": like.dtype}
    dims = _bn_dims(bn)
    if target == "batchrenorm":
        if dims is None:
            raise ValueError(f"{where}: {type(bn).__name__} does not say its input rank; "
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
            raise ValueError(f"{where}: InstanceNorm needs spatial dims, a BatchNorm1d "
                             "has none on (N, C) input; use 'group' or 'layer'")
        groups = {"group": num_groups or suggest_groups(c, 1 if one_d else 64), "layer": 1, "instance": c}[target]
        if c % groups:
            raise ValueError(f"num_groups={groups} does not divide the {c} channels of {where}")
        new = nln.GroupNorm(groups, c, bn.eps, bn.affine, **factory)
        if bn.affine:
            new.weight.data.copy_(bn.weight.data)
            new.bias.data.copy_(bn.bias.data)
    new.train(bn.training)
    return new


def _bn_dims(bn: nn.Module) -> int | None:
    """1, 2 or 3 for BatchNorm1d/2d/3d of torch.nn or normlab.nn (and their subclasses)."""
    from . import nn as nln

    for dims, classes in ((1, (nn.BatchNorm1d, nln.BatchNorm1d, nln.BatchRenorm1d)),
                          (2, (nn.BatchNorm2d, nln.BatchNorm2d, nln.BatchRenorm2d)),
                          (3, (nn.BatchNorm3d, nln.BatchNorm3d, nln.BatchRenorm3d))):
        if isinstance(bn, classes):
            return dims
    return None


def _spatial_size(shape) -> int:
    return math.prod(shape[2:]) if len(shape) > 2 else 1


@torch.no_grad()
def audit(model: nn.Module, batch_size: int | None = None, input_shape: tuple[int, ...] | None = None) -> dict:
    """Inspect every normalization layer; plain-language recommendations for what is wrong.

    Per layer: type, train/eval mode, frozen (:func:`freeze_norm`), parameters that do not train
    while the statistics still update ("frozen but updating"), non-finite running statistics, and
    — given ``batch_size`` and ``input_shape`` (one example, without the batch dim), by running
    one dummy batch in eval mode — the number of values a batch gives each statistic.
    Returns ``{"layers": [...], "recommendations": [...]}``.
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
# they are) and its hooks; only the class, and so the forward, changes.

_TO_NORMLAB: dict = {}  # class, or class name for third-party code normlab does not import
_ORIGIN = "_normlab_from"  # the class a converted third-party module had (to_torch restores it)


def register_conversion(cls, convert) -> None:
    """Teach :func:`to_normlab` a norm: ``convert(module)`` returns the normlab module that
    replaces ``module`` (see :func:`retype`), or ``None`` to leave it (say why by raising
    ``ValueError``). ``cls`` is a class or, for code normlab should not import, a class name.

    >>> import torch
    >>> class MyRMSNorm(torch.nn.Module):
    ...     def __init__(self, n):
    ...         super().__init__()
    ...         self.scale, self.eps = torch.nn.Parameter(torch.ones(n)), 1e-6
    >>> from normlab import nn as nln
    >>> register_conversion(MyRMSNorm, lambda m: None)  # (a real one would build an nln.RMSNorm)
    """
    _TO_NORMLAB[cls] = convert


def retype(module: nn.Module, cls: type, **attributes) -> nn.Module:
    """``module`` as an instance of ``cls``: the same parameters, buffers, submodules and hooks
    (fresh containers holding the same objects), plus ``attributes``."""
    new = cls.__new__(cls)
    new.__dict__.update({k: (type(v)(v) if isinstance(v, dict) else v) for k, v in module.__dict__.items()})
    for k, v in attributes.items():
        object.__setattr__(new, k, v)
    return new


def _torch_pairs() -> dict:
    from . import nn as nln

    return {nn.BatchNorm1d: nln.BatchNorm1d, nn.BatchNorm2d: nln.BatchNorm2d, nn.BatchNorm3d: nln.BatchNorm3d,
            nn.InstanceNorm1d: nln.InstanceNorm1d, nn.InstanceNorm2d: nln.InstanceNorm2d,
            nn.InstanceNorm3d: nln.InstanceNorm3d, nn.LayerNorm: nln.LayerNorm, nn.GroupNorm: nln.GroupNorm,
            nn.RMSNorm: nln.RMSNorm}


def _weight_only_rmsnorm(m: nn.Module) -> nn.Module:
    """transformers' Llama/Qwen2/Mistral-style RMSNorm: ``weight · x̂`` with ``variance_epsilon``."""
    from . import nn as nln

    w = getattr(m, "weight", None)
    if not isinstance(w, nn.Parameter) or not hasattr(m, "variance_epsilon"):
        raise ValueError("expected a `weight` Parameter and a `variance_epsilon`")
    return retype(m, nln._WeightOnlyRMSNorm, normalized_shape=tuple(w.shape), eps=float(m.variance_epsilon),
                  elementwise_affine=True, **{_ORIGIN: type(m)})


def _convnext_layernorm(m: nn.Module) -> nn.Module:
    """transformers' ConvNextLayerNorm: LayerNorm over the last dim, or over dim 1 (channels_first)."""
    from . import nn as nln

    cls = {"channels_last": nln.LayerNorm, "channels_first": nln._ChannelsFirstLayerNorm}.get(m.data_format)
    if cls is None:
        raise ValueError(f"data_format {m.data_format!r} is neither channels_last nor channels_first")
    return retype(m, cls, **{_ORIGIN: type(m)})


for _name in ("LlamaRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "MistralRMSNorm", "MixtralRMSNorm", "Phi3RMSNorm",
              "T5LayerNorm"):
    register_conversion(_name, _weight_only_rmsnorm)
register_conversion("ConvNextLayerNorm", _convnext_layernorm)
register_conversion("ConvNextV2LayerNorm", _convnext_layernorm)


def _swap(model: nn.Module, choose, inplace: bool) -> tuple[nn.Module, dict]:
    """Replace every module ``choose`` returns a replacement for; a module shared by several
    parents stays shared, and every replacement is built before any is put in place."""
    model = model if inplace else copy.deepcopy(model)
    report = {"converted": [], "left": []}
    if (new := choose(model, "", report)) is not None:  # the model itself is a norm
        return new, report
    built: dict[int, nn.Module | None] = {}
    sites = []
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent._modules.items()):
            if child is None:
                continue
            if id(child) not in built:
                built[id(child)] = choose(child, f"{parent_name}.{child_name}".lstrip("."), report)
            if built[id(child)] is not None:
                sites.append((parent, child_name, built[id(child)]))
    for parent, child_name, new in sites:
        parent._modules[child_name] = new
    return model, report


def to_normlab(model: nn.Module, *, inplace: bool = False, report: bool = False):
    """Every norm of ``model`` as normlab's: torch.nn's BatchNorm1d/2d/3d, InstanceNorm1d/2d/3d,
    LayerNorm, GroupNorm and RMSNorm, and the third-party norms of the registry
    (:func:`register_conversion`; built in: transformers' Llama/Qwen2/Mistral-style RMSNorms and
    ConvNextLayerNorm). Parameters and buffers are the same objects, so ``state_dict`` keys,
    optimizers and tied weights are unchanged; subclasses of those norms and anything else are
    left alone. :func:`to_torch` goes back.

    Args:
        model: any module (a norm itself is converted too).
        inplace: change ``model`` itself instead of a deep copy.
        report: also return ``{"converted": [(name, from, to)], "left": [(name, class, why)]}``,
            ``left`` listing every module whose class name says it normalizes but that was not
            converted.

    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8))
    >>> fast, done = to_normlab(model, report=True)
    >>> done["converted"]
    [('1', 'LayerNorm', 'normlab.nn.LayerNorm')]
    >>> x = torch.randn(3, 4)
    >>> torch.allclose(fast(x), model(x), atol=1e-6)
    True
    """
    pairs = _torch_pairs()
    targets = tuple(set(pairs.values()))

    def choose(m, name, rep):
        convert = None
        if type(m) in pairs:
            cls = pairs[type(m)]
            convert = lambda m: retype(m, cls)  # noqa: E731
        else:
            convert = _TO_NORMLAB.get(type(m)) or _TO_NORMLAB.get(type(m).__name__)
        if convert is None:
            if "norm" in type(m).__name__.lower() and not isinstance(m, targets) and not _is_normlab(m):
                rep["left"].append((name, type(m).__name__, "no conversion is registered for this class"))
            return None
        try:
            new = convert(m)
        except ValueError as err:
            rep["left"].append((name, type(m).__name__, str(err)))
            return None
        if new is not None:
            public = next(c for c in type(new).__mro__ if not c.__name__.startswith("_"))
            rep["converted"].append((name, type(m).__name__, f"normlab.nn.{public.__name__}"))
        return new

    model, rep = _swap(model, choose, inplace)
    return (model, rep) if report else model


def _is_normlab(m: nn.Module) -> bool:
    return type(m).__module__.startswith("normlab.")


def to_torch(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Undo :func:`to_normlab`: normlab's norms back to torch.nn's (and converted third-party
    norms back to their own classes), parameters and buffers the same objects.

    >>> import torch
    >>> back = to_torch(to_normlab(torch.nn.BatchNorm2d(3)))
    >>> type(back)
    <class 'torch.nn.modules.batchnorm.BatchNorm2d'>
    """
    back = {v: k for k, v in _torch_pairs().items()}

    def choose(m, name, rep):
        origin = m.__dict__.get(_ORIGIN)
        if origin is not None:
            new = retype(m, origin)
            del new.__dict__[_ORIGIN]
            return new
        return retype(m, back[type(m)]) if type(m) in back else None

    return _swap(model, choose, inplace)[0]
