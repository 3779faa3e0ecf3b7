r"""Normalization across processes, on torch.distributed (gloo on CPU, NCCL on GPU).

Every statistic travels as the mergeable triple ``(count, mean, M2)`` of
:class:`normlab.stats.Moments` and is merged with Chan's formula in rank order, so ranks may hold
different batch sizes — including none — and the result equals one process holding the
concatenated batch (up to rounding), with no ``E[x²] − E[x]²`` cancellation.

* :class:`SyncBatchNorm` (``torch.nn.SyncBatchNorm``'s signature) and
  :func:`convert_sync_batchnorm`: BatchNorm whose batch statistics, backward sums and running
  statistics are those of the global batch.
* :func:`all_reduce_moments`: the triple of every rank, merged.
* :func:`all_reduce_scaler`: scalers ``partial_fit`` on each rank's shard end up with the fitted
  state of one ``fit`` on all the data.

Outside an initialised process group (or with one process) everything reduces to the local
computation, so the same code runs in a single process.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
from torch import Tensor, nn

from . import functional as F
from .errors import DTypeError, ShapeError
from .nn import _BatchNorm
from .stats import Moments, check_writable, momentum_factor

__all__ = ["SyncBatchNorm", "convert_sync_batchnorm", "all_reduce_moments", "all_reduce_scaler"]


def _world(group) -> int:
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def all_reduce_moments(m: Moments, group=None) -> Moments:
    r"""Merge the moments of every rank, in rank order, into the moments of all their data.

    Each rank passes the triple ``(count, mean, M2)`` of its own data — the same shape on every
    rank, any counts, none included. The triples are gathered in float64 and merged in rank order
    with Chan's formula,

    .. math::

        n = n_a + n_b, \quad \delta = \bar x_b - \bar x_a, \quad
        \bar x = \bar x_a + \delta\,\frac{n_b}{n}, \quad
        M_2 = M_{2,a} + M_{2,b} + \delta^2\,\frac{n_a n_b}{n},

    so every rank gets the same triple, equal to that of the concatenated data up to rounding and
    with no ``E[x²] − E[x]²`` cancellation (Chan, Golub & LeVeque 1979, "Updating formulae and a
    pairwise algorithm for computing sample variances"). It is a collective: every rank of
    ``group`` must call it. The merged mean and M2 are differentiable functions of every rank's
    (autograd's backward all-reduces their gradients, as ``torch.distributed.nn`` does), which is
    how :class:`SyncBatchNorm` gets the backward over the global batch. Outside an initialized
    process group, or with one process, ``m`` is returned as it is.

    Args:
        m (Moments): this rank's :class:`normlab.stats.Moments`.
        group (ProcessGroup, optional): the ranks to merge over. Default: ``None`` (the default
            process group).

    Returns:
        Moments: the merged triple (in float64 when merged across ranks), the same on every rank.

    Shape:
        - ``m.count``, ``m.mean``, ``m.m2``: any shape, the same on every rank
        - Output: the same shape

    Example::

        >>> from normlab.stats import Moments
        >>> _ = torch.manual_seed(0)
        >>> x = torch.randn(100, 3)
        >>> m = Moments.from_data(x, (0,))
        >>> all_reduce_moments(m) is m             # no process group: the local moments
        True
        >>> shards = Moments.from_data(x[:30], (0,)), Moments.from_data(x[30:], (0,))
        >>> merged = shards[0].merge(shards[1])    # what two ranks holding these shards get
        >>> torch.allclose(merged.var(correction=1), x.var(0))
        True
    """
    world = _world(group)
    if world == 1:
        return m
    from torch.distributed.nn.functional import all_reduce

    # each rank's triple in its own slot of a sum: a gather that autograd differentiates (the
    # backward all-reduces the gradients), so the merged mean and M2 are functions of every rank's
    mine, rank = torch.stack([m.count, m.mean, m.m2]).to(torch.float64), dist.get_rank(group)
    slots = torch.stack([mine if r == rank else torch.zeros_like(mine) for r in range(world)])
    with warnings.catch_warnings():  # its deprecation names torch's successor, which has no autograd
        warnings.filterwarnings("ignore", message=".*all_reduce is deprecated", category=FutureWarning)
        parts = all_reduce(slots, op=dist.ReduceOp.SUM, group=group)
    total = Moments(parts[0, 0].detach(), parts[0, 1], parts[0, 2])
    for p in parts[1:]:
        total = total.merge(Moments(p[0].detach(), p[1], p[2]))
    return total


def _global_moments(x: Tensor, group) -> Moments:
    """The merged ``(count, mean, M2)`` per channel of every rank's batch, float64, with the mean
    and M2 differentiable functions of every rank's ``x``: BatchNorm's statistics operator on
    each rank, then :func:`all_reduce_moments`. An empty shard takes part with a zero count."""
    C = x.shape[1]
    if x.numel():
        mean, var = F._batch_stats(x)
        n = float(x.numel() // C)
        local = Moments(torch.full_like(mean, n), mean, var * n)
    else:  # zeros that are still functions of x: the backward's collective runs on this rank too
        zero = x.sum((0, *range(2, x.dim())), dtype=torch.float64)
        local = Moments(zero.detach(), zero, zero)
    return all_reduce_moments(local, group)


class SyncBatchNorm(_BatchNorm, nn.SyncBatchNorm):
    r"""Batch Normalization over the batches of all ranks of a process group, as torch.nn.SyncBatchNorm.

    ``torch.nn.SyncBatchNorm``'s arguments, buffers and ``state_dict``; in training

    .. math::

        y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \cdot \gamma + \beta

    with the mean and the biased variance taken per channel over the global batch: the batches of
    every rank of ``process_group``, as if concatenated. Each rank takes its own ``(count, mean,
    M2)`` with BatchNorm's statistics operator, the triples are merged in rank order with Chan's
    formula (as :func:`all_reduce_moments`), so uneven and empty shards are exact, and BatchNorm's
    map normalizes with the result; ``running_var`` stores the unbiased global variance, updated
    with ``momentum`` by BatchNorm's rule. The statistics are functions of every rank's batch
    through a differentiable all-reduce (``torch.distributed.nn``) and the map passes their
    gradients back (eq. (5)–(6) with the statistics given), so autograd gives the backward of the
    survey “Norm相关总结” eq. (5)–(7) with both sums taken over the global batch,

    .. math::

        \frac{\partial l}{\partial x} = \frac{\gamma}{\sqrt{\sigma^2 + \epsilon}}
        \Big(\frac{\partial l}{\partial y} - \frac{1}{n}\sum \frac{\partial l}{\partial y}
        - \hat x \cdot \frac{1}{n}\sum \frac{\partial l}{\partial y}\,\hat x\Big),

    ``n`` the global count per channel, and the double backward too. Parameter gradients are local
    (DistributedDataParallel averages them, as with torch's SyncBatchNorm). In training every rank
    must call it in step (the statistics are a collective); each rank's input is checked before
    any statistic travels, and ranks whose channel counts disagree all raise, naming every rank's
    count, so none is left waiting.
    Training on at most one value per channel over all ranks raises a ``ValueError``.

    In eval mode it is BatchNorm with running statistics (or, with
    ``track_running_stats=False``, with this rank's own batch statistics), and no collective runs.
    Outside an initialized process group, or with one process, it is BatchNorm on the local batch,
    computed the same way (float64 statistics whether or not the compiled core is there). It is a
    :class:`normlab.nn` BatchNorm and a ``torch.nn.SyncBatchNorm`` for ``isinstance``.

    Source: Ioffe & Szegedy 2015, "Batch Normalization: Accelerating Deep Network Training by
    Reducing Internal Covariate Shift", Algorithm 1; the survey “Norm相关总结” eq. (5)–(7) for the
    backward.

    Args:
        num_features (int): ``C``, the number of channels (dim 1 of the input).
        eps (float): the value added to the variance, ε. Default: ``1e-5``.
        momentum (float or None): the weight of a new batch in the running statistics; ``None``
            for the cumulative average. Default: ``0.1``.
        affine (bool): learn the per-channel γ and β. Default: ``True``.
        track_running_stats (bool): keep running statistics for eval mode. Default: ``True``.
        process_group (ProcessGroup, optional): the ranks whose batches are pooled.
            Default: ``None`` (the default process group).
        device (torch.device, optional): the device of the parameters and buffers.
            Default: ``None``.
        dtype (torch.dtype, optional): the dtype of the parameters and buffers. Default: ``None``.

    Shape:
        - Input: :math:`(N, C, *)`, at least 2-D, floating point
        - Output: :math:`(N, C, *)`, the same shape as the input

    Example::

        >>> _ = torch.manual_seed(0)
        >>> sync, bn = SyncBatchNorm(4), nn.BatchNorm2d(4)
        >>> x = torch.randn(8, 4, 5, 5) * 3 + 1
        >>> torch.allclose(sync(x), bn(x), atol=1e-5)    # no process group: the local batch
        True
        >>> torch.allclose(sync.running_var, bn.running_var, atol=1e-6)
        True
        >>> sync.eval()(x[:1]).shape                      # eval: the running statistics
        torch.Size([1, 4, 5, 5])
    """

    _ndims = tuple(range(2, 65))  # (N, C, *): any rank from 2 on, as torch's
    _layout = "(N, C, *) input"

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group=None, device=None, dtype=None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.process_group = process_group

    def _check_input_dim(self, input: Tensor) -> None:
        if not isinstance(input, Tensor):
            raise TypeError(f"SyncBatchNorm expects a torch.Tensor, got {type(input).__name__}")
        if not input.is_floating_point():  # as the other BatchNorms: no integer, bool or complex data
            raise DTypeError(f"SyncBatchNorm expects a floating-point tensor, got dtype {input.dtype}; "
                            "convert it first, e.g. x.float()")
        if input.dim() < 2:
            raise ValueError(f"SyncBatchNorm expects at least 2-D input (N, C, ...), got {input.dim()}-D input")
        if input.shape[1] != self.num_features:
            raise ShapeError(f"SyncBatchNorm({self.num_features}) expects {self.num_features} channels in dim 1, "
                             f"got input of shape {tuple(input.shape)}")
        batch_stats = self.training or self.running_mean is None
        keep = not self.training or self.track_running_stats
        F._check_channel_args("batch_norm", input, self.running_mean if keep else None,
                              self.running_var if keep else None, self.weight, self.bias, batch_stats, self.eps)
        if self.training and self.track_running_stats:  # before anything is computed or saved
            check_writable(self.running_mean, "running_mean")
            check_writable(self.running_var, "running_var")

    def _agree(self, input: Tensor) -> None:
        """Check the input on every rank before any statistic travels: each rank's channel count
        (-1 where its own input was refused) is gathered first, so ranks that disagree all raise,
        naming every rank's count, and none is left waiting in a collective another has left."""
        try:
            self._check_input_dim(input)
            refused = None
        except (TypeError, ValueError) as err:
            refused = err
        if _world(self.process_group) > 1:
            nccl = dist.get_backend(self.process_group) == "nccl"
            device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
            mine = torch.tensor([-1 if refused is not None else input.shape[1]], dtype=torch.long, device=device)
            parts = [torch.empty_like(mine) for _ in range(_world(self.process_group))]
            dist.all_gather(parts, mine, group=self.process_group)
            counts = [int(p) for p in parts]
            if refused is None and len(set(counts)) > 1:
                raise ShapeError(
                    "SyncBatchNorm: the ranks' inputs disagree on the channel count (dim 1), by rank: "
                    f"{counts} (-1: that rank's input was refused); every rank must pass (N, "
                    f"{self.num_features}, ...)")
        if refused is not None:
            raise refused

    def forward(self, input: Tensor) -> Tensor:
        if not self.training:  # eval: BatchNorm's own path and checks, no collective
            return super().forward(input)
        self._agree(input)  # the first collective: nothing is computed or written before it
        stats = _global_moments(input, self.process_group)
        if float(stats.count.max()) == 0:  # every rank's batch is empty: BatchNorm's answer, an empty output
            return super().forward(input)
        if float(stats.count.min()) <= 1:
            raise ValueError(f"SyncBatchNorm: expected more than 1 value per channel over all ranks, got "
                             f"{int(stats.count.min())}; use larger batches or GroupNorm")
        y = F._batch_norm_apply(input, stats.mean, stats.var(), self.weight, self.bias, self.eps)
        if input.numel() == 0 and stats.mean.requires_grad:  # an empty shard: its backward must still reach the
            y = y + 0 * (stats.mean.sum() + stats.m2.sum()).to(y.dtype)  # all-reduce, which every rank runs
        if self.track_running_stats:
            F._update_running(self.running_mean, self.running_var, stats.mean, stats.var(correction=1),
                              momentum_factor(self.momentum, self.num_batches_tracked))
            self.num_batches_tracked.add_(1)
        return y

    @classmethod
    def convert_sync_batchnorm(cls, module: nn.Module, process_group=None) -> nn.Module:
        """:func:`normlab.distributed.convert_sync_batchnorm` (torch's classmethod makes torch's layer)."""
        return convert_sync_batchnorm(module, process_group)


def convert_sync_batchnorm(module: nn.Module, process_group=None) -> nn.Module:
    """Return a copy of a module with every BatchNorm replaced by a SyncBatchNorm.

    Every BatchNorm of torch.nn or normlab.nn in ``module`` (``module`` itself included) becomes a
    :class:`SyncBatchNorm` on ``process_group``: parameters (with their ``requires_grad``),
    running statistics and mode carried over, on the same device and dtype. A SyncBatchNorm
    already there is kept, and a BatchNorm shared by several parents stays shared. ``module``
    itself is left unchanged (the result is a deep copy). BatchRenorm and frozen layers
    (:func:`normlab.convert.freeze_norm`) are refused rather than silently turned into plain,
    updating SyncBatchNorm. No process group is needed to convert.

    Args:
        module (nn.Module): the model, or a single BatchNorm.
        process_group (ProcessGroup, optional): the ranks each SyncBatchNorm pools over.
            Default: ``None`` (the default process group).

    Returns:
        nn.Module: the converted copy.

    Raises:
        ValueError: ``module`` holds a BatchRenorm or a frozen norm layer.

    Example::

        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
        >>> synced = convert_sync_batchnorm(model)
        >>> type(synced[1]).__name__, type(model[1]).__name__
        ('SyncBatchNorm', 'BatchNorm2d')
        >>> x = torch.randn(2, 3, 6, 6)
        >>> torch.allclose(synced(x), model(x), atol=1e-5)   # one process: the same as BatchNorm
        True
    """
    from . import nn as nln
    from .convert._common import _bn_role, adopt_state, is_batchnorm, module_label, replace_modules

    def sync_of(child: nn.Module, where: str) -> nn.Module:
        if isinstance(child, nln._BatchRenorm) or getattr(child, "_normlab_frozen", None):
            kind = "BatchRenorm" if isinstance(child, nln._BatchRenorm) else "a frozen norm layer"
            raise ValueError(f"convert_sync_batchnorm: {module_label(where)} is {kind}, which SyncBatchNorm "
                             "would not preserve; unfreeze_norm it first, or keep it unsynced")
        if _bn_role(child) != "plain":
            raise ValueError(f"convert_sync_batchnorm: {module_label(where, child)} applies more "
                             "after normalizing (an activation), which SyncBatchNorm would drop; convert it with "
                             "its library's own function (timm.layers.convert_sync_batchnorm)")
        like = next(iter(child.parameters()), child.running_mean)
        factory = {} if like is None else {"device": like.device, "dtype": like.dtype}
        sync = SyncBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                             child.track_running_stats, process_group, **factory)
        sync.train(child.training)
        return adopt_state(sync, child)  # its parameters and buffers, the same objects, as torch's

    def choose(child: nn.Module, where: str, report: dict) -> nn.Module | None:
        return sync_of(child, where) if is_batchnorm(child) and not isinstance(child, SyncBatchNorm) else None

    return replace_modules("convert_sync_batchnorm", module, choose, inplace=False)[0]


def all_reduce_scaler(scaler, group=None):
    """Give every rank the scaler fitted on the data of all ranks.

    Each rank calls ``partial_fit`` on its own shard (a rank without data need not), then this
    gathers the sufficient statistics and merges them in rank order — the same fitted state as
    one ``fit`` on the concatenated data, for MinMax and Z-Score alike (``(count, mean, M2)``
    merged by Chan's formula for the StandardScaler, minima and maxima for the MinMaxScaler). A
    rank that saw no data gets the fitted state, number of features and feature names too. It is
    a collective: every rank of ``group`` must call it. Outside an initialized process group, or
    with one process, ``scaler`` is returned as it is.

    Args:
        scaler (StandardScaler or MinMaxScaler): a scaler of :mod:`normlab.preprocessing`, fitted
            on this rank's shard or not fitted at all.
        group (ProcessGroup, optional): the ranks to merge over. Default: ``None`` (the default
            process group).

    Returns:
        the same ``scaler``, fitted on the data of all ranks.

    Raises:
        TypeError: ``scaler`` is not a scaler of normlab.preprocessing (mergeable statistics).
        ValueError: no rank has fitted data, or the ranks disagree on the features (count,
            names).

    Example::

        >>> import numpy as np
        >>> from normlab.preprocessing import StandardScaler
        >>> _ = torch.manual_seed(0)
        >>> X = torch.randn(100, 3) * 4 + 2
        >>> shard = StandardScaler().partial_fit(X[:60]).partial_fit(X[60:])
        >>> all_reduce_scaler(shard) is shard        # no process group: this rank's data is all
        True
        >>> bool(np.allclose(shard.scale_, StandardScaler().fit(X).scale_))
        True
    """
    from sklearn.exceptions import NotFittedError
    from sklearn.utils.validation import check_is_fitted

    if not (hasattr(scaler, "_merge") and hasattr(scaler, "_commit")):
        raise TypeError(f"all_reduce_scaler needs a normlab.preprocessing scaler (mergeable statistics), got "
                        f"{type(scaler).__name__}")
    try:
        check_is_fitted(scaler)
        mine = {k: v.cpu() for k, v in scaler._stats.items()}
        names = getattr(scaler, "feature_names_in_", None)
        meta = (int(scaler.n_features_in_), None if names is None else [str(n) for n in names])
    except NotFittedError:  # this rank saw no data
        mine, meta = None, None
    if _world(group) == 1:
        return scaler
    gathered: list = [None] * _world(group)
    dist.all_gather_object(gathered, (mine, meta), group=group)
    fitted = [(s, m) for s, m in gathered if s is not None]
    if not fitted:
        raise ValueError("all_reduce_scaler: no rank has fitted data; partial_fit a shard on at least one rank")
    if any(m != fitted[0][1] for _, m in fitted):
        raise ValueError(f"all_reduce_scaler: ranks disagree on the features (count, names): "
                         f"{sorted({repr(m) for _, m in fitted})}; fit the same columns everywhere")
    total = fitted[0][0]
    for s, _ in fitted[1:]:
        total = scaler._merge(total, s)
    scaler.n_features_in_ = fitted[0][1][0]
    if fitted[0][1][1] is not None:
        import numpy as np

        scaler.feature_names_in_ = np.asarray(fitted[0][1][1], dtype=object)
    scaler._commit(total)
    return scaler
