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

The package by concern: :mod:`~normlab.convert.fold` (BatchNorm and scalers folded into the layer
next to them), :mod:`~normlab.convert.recalibrate` (precise BN), :mod:`~normlab.convert.freeze`
(frozen norms and the finite-batch guard), :mod:`~normlab.convert.swap` (BN → GN, BatchRenorm,
the audit), :mod:`~normlab.convert.adopt` (to_normlab, to_torch and the conversion registry);
what they share — which modules are BatchNorms, how a module is named, checking a changed model
against the original — is in ``_common``.
"""

from ..nn import retype
from ._common import is_batchnorm
from .adopt import register_conversion, to_normlab, to_torch
from .fold import batchnorm_as_affine, fold_batchnorm, fold_scaler
from .freeze import freeze_norm, guard_finite, unfreeze_norm, unguard_finite
from .recalibrate import recalibrate_bn
from .swap import audit, replace_norm, suggest_groups

__all__ = ["batchnorm_as_affine", "fold_batchnorm", "fold_scaler", "recalibrate_bn", "freeze_norm",
           "unfreeze_norm", "guard_finite", "unguard_finite", "replace_norm", "suggest_groups", "audit",
           "is_batchnorm", "to_normlab", "to_torch", "register_conversion", "retype"]
