"""The lab's training loop: mini-batch SGD/Adam on a :class:`~normlab.lab.data.Split`.

:func:`fit` trains any ``nn.Module`` and measures it the way the lesson's
``model_train_test`` does: after every epoch the model is switched to ``eval()`` and the loss
and metric are computed on the whole training and test sets, then switched back to ``train()``
(so BatchNorm uses batch statistics while learning and its running statistics when measured).
The metric is accuracy for classification and MSE for regression.

Runs are deterministic for a seed: the seed fixes the shuffling of every epoch and every random
draw the model makes while training (dropout), from a private RNG that leaves the global one
alone; the initial weights are the caller's (see ``seed`` of :func:`~normlab.lab.models.mlp`).
A progress bar (rich, on standard error) is shown only when standard error is a terminal.

>>> from normlab.lab.data import make_regression
>>> from normlab.lab.models import mlp
>>> split = make_regression(num_examples=200, seed=0)
>>> model = mlp(2, 1, depth=1, width=8, activation="tanh", seed=0)
>>> h = fit(model, split, epochs=3, lr=0.05, seed=0)
>>> len(h.test_metric), h.test_metric[-1] < h.test_metric[0]
(3, True)
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

from .. import nn as nln
from ..diagnostics import GlorotMonitor
from .data import Split, batches

if TYPE_CHECKING:
    from .ensemble import Stack

__all__ = ["fit", "fit_seeds", "evaluate", "mode", "History", "GradientRecorder", "SeedGradients"]

_BATCH_NORMS = (nn.modules.batchnorm._BatchNorm, nln._BatchNorm)


@dataclass
class History:
    """Per-epoch measurements of one training run (plain lists, JSON-able via :meth:`to_dict`).

    ``train_loss``/``test_loss``/``train_metric``/``test_metric`` are measured in eval mode on
    the full sets after each epoch; ``batch_loss`` is the mean training loss over the epoch's
    mini-batches (train mode, as the optimizer saw it); ``seconds`` the epoch's training time.
    ``diverged`` is set when the loss became non-finite; training stops there.
    """

    metric: str
    train_loss: list[float] = field(default_factory=list)
    test_loss: list[float] = field(default_factory=list)
    train_metric: list[float] = field(default_factory=list)
    test_metric: list[float] = field(default_factory=list)
    batch_loss: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    steps: int = 0
    diverged: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


def _loss_and_metric(task: str, loss: str | None):
    if loss is None:
        loss = "ce" if task == "classification" else "mse"
    if loss == "mse":
        return nn.MSELoss(), "mse", lambda out, y: torch.mean((out - y) ** 2).item()
    if loss == "ce":
        return nn.CrossEntropyLoss(), "accuracy", lambda out, y: (out.argmax(1) == y).float().mean().item()
    raise ValueError(f"loss must be 'mse', 'ce' or None (chosen from the task), got {loss!r}")


@contextlib.contextmanager
def mode(model: nn.Module, training: bool):
    """Run a block with every submodule in train (or eval) mode, then restore each submodule's own
    mode — a BN frozen with ``.eval()`` inside a model being trained stays frozen."""
    saved = [(m, m.training) for m in model.modules()]
    model.train(training)
    try:
        yield model
    finally:
        for m, was in saved:
            m.training = was


@torch.no_grad()
def evaluate(model: nn.Module, X, y, criterion, metric_fn, batch_size: int = 4096) -> tuple[float, float]:
    """Loss and metric of ``model`` on ``(X, y)`` in eval mode; restores every submodule's mode."""
    with mode(model, False):
        outs = torch.cat([model(xb) for xb, _ in batches(X, y, batch_size)])
    return criterion(outs, y).item(), metric_fn(outs, y)


def _progress(enabled: bool | None, total: int, description: str):
    from rich.console import Console

    console = Console(stderr=True)
    if not (console.is_terminal if enabled is None else enabled):
        return None
    from rich.progress import Progress

    bar = Progress(console=console, transient=True)
    bar.start()
    bar.add_task(description, total=total)
    return bar


def fit(
    model: nn.Module,
    data: Split,
    *,
    epochs: int = 5,
    lr: float = 0.03,
    optimizer: str = "sgd",
    batch_size: int = 64,
    loss: str | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    drop_last: bool = False,
    weight_decay: float = 0.0,
    momentum: float = 0.0,
    on_step: Callable[[int, nn.Module, torch.Tensor], None] | None = None,
    on_epoch: Callable[[int, nn.Module, History], None] | None = None,
    progress: bool | None = None,
    description: str = "training",
    shard: tuple[int, int] | None = None,
    shuffle: bool = True,
) -> History:
    """Train ``model`` on ``data.X_train`` for ``epochs`` and measure it on both halves after each.

    Args:
        optimizer: ``"sgd"`` (with ``momentum``) or ``"adam"``.
        loss: ``"mse"``, ``"ce"`` or ``None`` (MSE for regression, cross-entropy for classes).
        seed: fixes the order of the mini-batches in every epoch.
        shuffle: draw a new order every epoch (default); ``False`` keeps the data's own order, e.g.
            sorted by class so that each batch holds one class (the survey's warning for BatchNorm).
        drop_last: skip the last, smaller batch of each epoch. BatchNorm in training cannot
            normalize a batch of one example (one value per channel has no variance); when the
            training set size leaves a remainder of 1, :func:`fit` says so and suggests this.
        on_step: called after every optimizer step as ``on_step(step, model, loss)`` (1-based).
        on_epoch: called after every epoch's measurements as ``on_epoch(epoch, model, history)``.
        progress: show a progress bar; ``None`` shows it only on a terminal.
        shard: ``(rank, world)`` for data-parallel training inside an initialised
            ``torch.distributed`` group (see :mod:`normlab.lab.parallel`): every rank draws the
            same global batches, trains on rows ``rank::world`` of each, and averages gradients
            over ranks before the step (BatchNorm sees only its rank's rows unless it is a
            :class:`~normlab.distributed.SyncBatchNorm`).
    """
    criterion, metric_name, metric_fn = _loss_and_metric(data.task, loss)
    _check_batches(model, data, epochs, batch_size, drop_last)
    if shard is not None:  # every rank must take an equal share of every batch (equal-weight averaging)
        rest = len(data.X_train) % batch_size
        if batch_size % shard[1] or (rest and not drop_last and rest % shard[1]):
            raise ValueError(
                f"data-parallel training on {shard[1]} processes needs batches that split evenly: batch_size="
                f"{batch_size} with {len(data.X_train)} examples leaves a last batch of {rest}; pass drop_last=True "
                "or a batch_size dividing both"
            )
    device = torch.device(device)
    model.to(device)
    split = data.to(device)
    opt = _optimizer(optimizer, model, lr, momentum, weight_decay)
    generator = torch.Generator().manual_seed(int(seed))
    history = History(metric=metric_name)
    bar = _progress(progress, epochs, description)
    model.train()
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), _closing(bar):
        torch.manual_seed(int(seed))  # dropout and any other random layer draw from here
        for epoch in range(1, epochs + 1):
            start, total, count = time.perf_counter(), 0.0, 0
            for xb, yb in batches(split.X_train, split.y_train, batch_size, shuffle=shuffle, generator=generator, drop_last=drop_last):
                if shard is not None:
                    xb, yb = xb[shard[0]::shard[1]], yb[shard[0]::shard[1]]
                opt.zero_grad(set_to_none=True)
                out = criterion(model(xb), yb)
                out.backward()
                if shard is not None:
                    _average_gradients(model, shard[1])
                opt.step()
                history.steps += 1
                total, count = total + out.item() * len(xb), count + len(xb)
                if on_step is not None:
                    on_step(history.steps, model, out)
            history.seconds.append(time.perf_counter() - start)
            history.batch_loss.append(total / count)
            for part in ("train", "test"):
                value, metric = evaluate(model, getattr(split, f"X_{part}"), getattr(split, f"y_{part}"), criterion, metric_fn)
                getattr(history, f"{part}_loss").append(value)
                getattr(history, f"{part}_metric").append(metric)
            if on_epoch is not None:
                on_epoch(epoch, model, history)
            if bar is not None:
                bar.advance(bar.task_ids[0])
            if not math.isfinite(history.batch_loss[-1]):
                history.diverged = True
                break
    return history


def _check_batches(model: nn.Module, data: Split, epochs: int, batch_size: int, drop_last: bool) -> None:
    """Refuse, before any training, what would fail on the way: no batch, or a last batch of one
    example for BatchNorm."""
    if epochs < 0:
        raise ValueError(f"epochs must be >= 0, got {epochs}")
    if drop_last and len(data.X_train) < batch_size:
        raise ValueError(
            f"drop_last=True with batch_size={batch_size} and {len(data.X_train)} training examples leaves no batch "
            "to train on; use a batch_size no larger than the training set"
        )
    if len(data.X_train) % batch_size == 1 and not drop_last:
        if any(isinstance(m, _BATCH_NORMS) for m in model.modules()):
            raise ValueError(
                f"{len(data.X_train)} training examples in batches of {batch_size} leave a last batch of 1 example, "
                "which BatchNorm cannot normalize in training; pass drop_last=True or change batch_size"
            )


def fit_seeds(
    members: list[nn.Module],
    data: Split,
    seeds,
    *,
    epochs: int = 5,
    lr: float = 0.03,
    optimizer: str = "sgd",
    batch_size: int = 64,
    loss: str | None = None,
    device: str | torch.device = "cpu",
    drop_last: bool = False,
    weight_decay: float = 0.0,
    momentum: float = 0.0,
    on_step: Callable[[int, "Stack", torch.Tensor], None] | None = None,
    on_epoch: Callable[[int, "Stack", list[History]], None] | None = None,
    progress: bool | None = None,
    description: str = "training",
    shuffle: bool = True,
) -> list[History]:
    """Train ``members[s]`` as :func:`fit` trains it with ``seed=seeds[s]``, all at once.

    The members (one network per random seed, of one architecture) are trained together as a
    :class:`~normlab.lab.ensemble.Stack`: each on its own batch order, the one :func:`fit` draws for
    its seed, and the loss the sum of the members' mean losses, so every member follows the run it
    would have alone (to float rounding) for about the time of one. Networks the Stack cannot hold
    (a layer it does not know, e.g. dropout) are trained one at a time, with the same hooks.

    ``on_step(step, stack, losses)`` gets the Stack after every step and the members' losses (S,);
    ``on_epoch(epoch, stack, histories)`` after every epoch's measurements, the trained weights
    already copied into the members (``stack.members``). ``stack.offset`` is the index in
    ``members`` of the stack's first member, ``stack.epoch`` the epoch under way. The other
    arguments are :func:`fit`'s. Returns one :class:`History` per member; the members end with
    their trained weights.
    """
    from .ensemble import NOT_STACKED, Stack

    seeds = [int(s) for s in seeds]
    if len(seeds) != len(members) or not members:
        raise ValueError(f"fit_seeds needs one seed per member: {len(members)} members, {len(seeds)} seeds")
    criterion, metric_name, metric_fn = _loss_and_metric(data.task, loss)
    for m in members:
        _check_batches(m, data, epochs, batch_size, drop_last)
    device = torch.device(device)
    split = data.to(device)
    try:
        stacks = [Stack(members)]
    except NOT_STACKED:  # one at a time: a Stack of one holds any network
        stacks = [Stack([m]) for m in members]
    histories = [History(metric=metric_name) for _ in members]
    bar = _progress(progress, epochs * len(stacks), description)
    with _closing(bar):
        for k, stack in enumerate(stacks):
            stack.to(device)
            group = range(len(members)) if len(stacks) == 1 else [k]
            stack.offset = group[0]
            _fit_stack(stack, split, [seeds[i] for i in group], [histories[i] for i in group], criterion, metric_fn,
                       dict(epochs=epochs, lr=lr, optimizer=optimizer, batch_size=batch_size, drop_last=drop_last,
                            weight_decay=weight_decay, momentum=momentum, shuffle=shuffle), on_step, on_epoch, bar, device)
            stack.write_back()
    return histories


def _member_losses(criterion, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Each member's mean loss (S,): ``out`` (N, S, O), ``y`` (N, S) or (N, S, O)."""
    N, S = out.shape[:2]
    if isinstance(criterion, nn.CrossEntropyLoss):
        per = nn.functional.cross_entropy(out.reshape(N * S, -1), y.reshape(N * S), reduction="none")
    else:
        per = nn.functional.mse_loss(out.reshape(N * S, -1), y.reshape(N * S, -1), reduction="none").mean(1)
    return per.view(N, S).mean(0)


def _fit_stack(stack, split, seeds, histories, criterion, metric_fn, kw, on_step, on_epoch, bar, device) -> None:
    S = stack.size
    opt = _optimizer(kw["optimizer"], stack, kw["lr"], kw["momentum"], kw["weight_decay"])
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    n = len(split.X_train)
    alive = [True] * S
    stack.train()
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seeds[0])  # a Stack of one: its random layers draw as fit's would
        for epoch in range(1, kw["epochs"] + 1):
            stack.epoch = epoch
            start, total, count = time.perf_counter(), torch.zeros(S, dtype=torch.float64), 0
            # each member's order as batches(shuffle=True) draws it for fit with that seed: column s
            orders = torch.stack([torch.randperm(n, generator=g) if kw["shuffle"] else torch.arange(n)
                                  for g in generators], 1).to(split.X_train.device)
            for idx, _ in batches(orders, orders, kw["batch_size"], drop_last=kw["drop_last"]):  # idx (B, S)
                xb = split.X_train[idx].flatten(1, 2)  # (B, S, C, *) → (B, S·C, *): member s in its channels
                yb = split.y_train[idx]
                opt.zero_grad(set_to_none=True)
                losses = _member_losses(criterion, stack.split(stack(xb)), yb)
                losses.sum().backward()
                opt.step()
                for h in histories:
                    h.steps += 1
                total += losses.detach().double().cpu() * len(idx)
                count += len(idx)
                if on_step is not None:
                    on_step(histories[0].steps, stack, losses.detach())
            seconds = time.perf_counter() - start
            with mode(stack, False), torch.no_grad():
                outs = {part: stack.split(torch.cat([stack(stack.spread(xb)) for xb, _ in
                                                     batches(getattr(split, f"X_{part}"), getattr(split, f"y_{part}"), 4096)]))
                        for part in ("train", "test")}
            for s, h in enumerate(histories):
                if not alive[s]:
                    continue
                h.seconds.append(seconds)
                h.batch_loss.append(float(total[s]) / count)
                for part in ("train", "test"):
                    y = getattr(split, f"y_{part}")
                    h_out = outs[part][:, s]
                    getattr(h, f"{part}_loss").append(criterion(h_out, y).item())
                    getattr(h, f"{part}_metric").append(metric_fn(h_out, y))
                if not math.isfinite(h.batch_loss[-1]):
                    h.diverged, alive[s] = True, False
            stack.write_back()
            if on_epoch is not None:
                on_epoch(epoch, stack, histories)
            if bar is not None:
                bar.advance(bar.task_ids[0])
            if not any(alive):
                break


@contextlib.contextmanager
def _closing(bar):
    try:
        yield
    finally:
        if bar is not None:
            bar.stop()


def _average_gradients(model: nn.Module, world: int) -> None:
    import torch.distributed as dist

    for p in model.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad.div_(world)


def _optimizer(name: str, model: nn.Module, lr: float, momentum: float, weight_decay: float):
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"optimizer must be 'sgd' or 'adam', got {name!r}")


class GradientRecorder:
    """Every weight-gradient value of each layer during chosen epochs — the data of the lesson's
    per-layer gradient box plots (the lesson's ``weights_vp(model, att="grad")``), pooled over all the
    optimizer steps of an epoch rather than read from the last one.

    Pass ``on_step``/``on_epoch`` to :func:`fit`; afterwards ``layers(epoch)`` maps each layer's
    name to a flat tensor of its gradients, and ``remove()`` takes the monitor's hooks away.

    >>> from normlab.lab.data import make_regression
    >>> from normlab.lab.models import mlp
    >>> model = mlp(2, 1, depth=2, width=4, seed=0)
    >>> rec = GradientRecorder(model, epochs={1, 3})
    >>> _ = fit(model, make_regression(num_examples=40, seed=0), epochs=3, batch_size=10,
    ...         on_step=rec.on_step, on_epoch=rec.on_epoch)
    >>> rec.remove()
    >>> {name: g.numel() for name, g in rec.layers(3).items()}  # 3 steps × weights per layer
    {'0': 24, '2': 48, '4': 12}
    """

    def __init__(self, model: nn.Module, epochs: set[int]):
        self.epochs, self.epoch = set(epochs), 1
        self.values: dict[int, dict[str, list[torch.Tensor]]] = {e: {} for e in self.epochs}
        # the monitor's hooks cost time on every step: attached only during the recorded epochs
        self.monitor = GlorotMonitor(model) if 1 in self.epochs else None

    def on_step(self, step: int, model: nn.Module, loss) -> None:
        if self.monitor is not None:
            for name, g in self.monitor.weight_grads().items():
                self.values[self.epoch].setdefault(name, []).append(g)

    def on_epoch(self, epoch: int, model: nn.Module, history: History) -> None:
        self.epoch = epoch + 1
        if self.epoch in self.epochs and self.monitor is None:
            self.monitor = GlorotMonitor(model)
        elif self.epoch not in self.epochs:
            self.remove()

    def layers(self, epoch: int) -> dict[str, torch.Tensor]:
        return {name: torch.cat(gs) for name, gs in self.values[epoch].items()}

    def remove(self) -> None:
        if self.monitor is not None:
            self.monitor.remove()
            self.monitor = None


class SeedGradients:
    """:class:`GradientRecorder` for :func:`fit_seeds`: every weight-gradient value of each layer of
    each member during chosen epochs. Pass ``on_step`` to :func:`fit_seeds`; afterwards
    ``layers(epoch, member)`` maps each layer's name to a flat tensor of its gradients."""

    def __init__(self, epochs: set[int]):
        self.epochs = set(epochs)
        self.values: dict[tuple[int, int], dict[str, list[torch.Tensor]]] = {}  # (epoch, offset) -> (S, k) per step

    def on_step(self, step: int, stack, losses) -> None:
        if stack.epoch in self.epochs:
            for name, g in stack.weight_grads().items():
                self.values.setdefault((stack.epoch, stack.offset), {}).setdefault(name, []).append(g)

    def layers(self, epoch: int, member: int) -> dict[str, torch.Tensor]:
        offsets = [o for e, o in self.values if e == epoch and o <= member]
        if not offsets:
            raise KeyError(f"no gradients recorded for epoch {epoch}: recorded epochs {sorted(self.epochs)}, and "
                           "only those that training reached")
        offset = max(offsets)
        return {name: torch.stack(gs, 1)[member - offset].flatten()
                for name, gs in self.values[(epoch, offset)].items()}
