from __future__ import annotations


import torch
from torch import nn

from ._common import _bn_role, _norm_modules, _Unknown, _warn_unknown, is_batchnorm


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

