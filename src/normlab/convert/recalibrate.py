from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn

from ..stats import Moments
from ._common import _warn_unknown, is_batchnorm


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

