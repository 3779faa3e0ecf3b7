from __future__ import annotations

import math

import torch
from torch import nn

from ._common import _bn_role, _norm_modules, _warn_unknown, adopt_state, is_batchnorm, module_label, replace_modules
from .fold import _after_normalization


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

    def choose(bn: nn.Module, name: str, report: dict) -> nn.Module | None:
        if not is_batchnorm(bn):
            return None
        new = _replacement(bn, name, target, num_groups)
        # BN + activation: the activation stays after the new norm
        return nn.Sequential(new, _after_normalization(bn)) if _bn_role(bn) != "plain" else new

    model = replace_modules("replace_norm", model, choose, inplace=inplace)[0]
    _warn_unknown("replace_norm", model)
    return model


def _replacement(bn: nn.Module, where: str, target: str, num_groups: int | None) -> nn.Module:
    """The module :func:`replace_norm` puts where ``bn`` was."""
    from .. import nn as nln

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
    else:
        one_d = dims == 1
        if target == "instance" and one_d:
            raise ValueError(f"{module_label(where, bn)}: InstanceNorm needs spatial dims, a BatchNorm1d "
                             "has none on (N, C) input; use 'group' or 'layer'")
        groups = {"group": num_groups or suggest_groups(c, 1 if one_d else 64), "layer": 1, "instance": c}[target]
        if c % groups:
            raise ValueError(f"num_groups={groups} does not divide the {c} channels of {module_label(where, bn)}")
        new = nln.GroupNorm(groups, c, bn.eps, bn.affine, **factory)
    new.train(bn.training)
    return adopt_state(new, bn)  # γ, β (and running statistics) are the BatchNorm's own objects


def _bn_dims(bn: nn.Module) -> int | None:
    """1, 2 or 3 for BatchNorm1d/2d/3d of torch.nn or normlab.nn (and their subclasses)."""
    from .. import nn as nln

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

