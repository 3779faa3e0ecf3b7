"""The experiments of the seeds, as a registry of functions that return plain records.

Each experiment tests one claim of Lesson 14.1 or the survey “Norm相关总结” and computes
its verdict from the numbers it measured (see :mod:`normlab.lab.records` for the record format).
Every experiment has a quick version (the tour of ``normlab run``: seconds on a laptop CPU) and
a full one (``--full``: more epochs, more seeds, the settings of the papers where they fit).

Add your own in a few lines (say in ``my_lab.py``); ``normlab run --import my_lab my-ln`` then runs
it like the built-in ones, or call ``run("my-ln")`` from Python::

    from normlab.lab.experiments import experiment
    from normlab.lab import data, models, records, train

    @experiment("my-ln", "LayerNorm on wine", source="my notes", claim="LN beats none on wine",
                seeds=(3, 5), epochs=(5, 20))           # (quick, --full)
    def my_ln(cfg):                                    # cfg.seeds, cfg.epochs: this run's
        split = data.load_dataset("wine", seed=0).scaled("zscore")
        diff = []
        for seed in cfg.seeds:
            acc = {}
            for norm in ("none", "layer"):
                model = models.mlp(13, 3, depth=4, width=32, norm=norm, seed=seed)
                acc[norm] = train.fit(model, split, epochs=cfg.epochs, seed=seed).test_metric[-1]
            diff.append(acc["layer"] - acc["none"])
        return {"checks": [records.check("LN − none accuracy", diff, ">", 0)]}
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import re
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from .. import convert
from .. import functional as NF
from .. import nn as nln
from ..diagnostics import GlorotMonitor
from ..preprocessing import MinMaxScaler, StandardScaler
from . import data, models, parallel, records, train

__all__ = ["Config", "Experiment", "EXPERIMENTS", "experiment", "run", "TOUR"]


@dataclass(frozen=True)
class Config:
    """How to run an experiment: quick or full, which random seeds, an epochs override, the device.

    Each check is computed per random seed and reported with its 95% interval over the seeds
    (:func:`normlab.lab.records.check`), so more seeds narrow the intervals. ``seeds`` and
    ``epochs`` left ``None`` are the experiment's own (declared at registration, quick or full);
    :func:`run` hands the experiment a Config where they are filled in.
    """

    full: bool = False
    seeds: tuple[int, ...] | None = None
    epochs: int | None = None
    device: str = "cpu"
    progress: bool | None = False
    nproc: int = 1

    def pick(self, quick, full):
        return full if self.full else quick


@dataclass(frozen=True)
class Experiment:
    name: str
    title: str
    source: str
    claim: str
    fn: Callable[[Config], dict] = field(repr=False)
    seeds: tuple[int, int] | None = None  # how many random seeds, (quick, full); None: exact, no randomness
    epochs: tuple[int, int] | None = None  # (quick, full); None: no training


EXPERIMENTS: dict[str, Experiment] = {}


def experiment(name: str, title: str, *, source: str, claim: str, seeds: tuple[int, int] | None = None,
               epochs: tuple[int, int] | None = None):
    """Register ``fn(cfg) -> dict`` as experiment ``name``.

    ``seeds`` and ``epochs`` are how many random seeds and epochs it runs, ``(quick, full)``
    (``normlab list``, ``--help`` and the page read them here); ``fn`` finds this run's in
    ``cfg.seeds`` (a tuple of seeds) and ``cfg.epochs``, after ``--seeds`` and ``--epochs``. ``fn``
    returns the record's ``checks`` (required) and any of ``params``, ``figures``, ``tables``,
    ``notes``; the registry adds the name, title, source, claim, the verdict and the wall time.
    """

    if not (isinstance(name, str) and re.fullmatch(r"[A-Za-z0-9][\w-]*", name)):
        raise ValueError(f"experiment name {name!r}: use letters, digits, '-' and '_' (it names the report's "
                         "files and anchors), e.g. 'my-claim'")

    def register(fn: Callable[[Config], dict]) -> Callable[[Config], dict]:
        if name in EXPERIMENTS:
            raise ValueError(f"an experiment named {name!r} is already registered; choose another name")
        EXPERIMENTS[name] = Experiment(name, title, source, claim, fn, _pair(seeds, "seeds"), _pair(epochs, "epochs"))
        return fn

    return register


def _full_hint(exp: Experiment) -> str:
    """What ``--full`` would change, from the registration's numbers (nothing it does not run)."""
    more = [f"{what[1]} {what[0]} instead of {what[2]}" for what in (
        ("random seeds", *reversed(exp.seeds)) if exp.seeds else (),
        ("epochs", *reversed(exp.epochs)) if exp.epochs else ()) if what and what[1] > what[2]]
    if not more:
        return ""
    return f"`normlab run {exp.name} --full` runs {' and '.join(more)}"


def _pair(v, what: str) -> tuple[int, int] | None:
    if v is None:
        return None
    if not (isinstance(v, tuple) and len(v) == 2 and all(isinstance(k, int) and k > 0 for k in v)):
        raise ValueError(f"{what}={v!r}: give (quick, full), two positive whole numbers, e.g. {what}=(3, 5)")
    return v


def run(name: str, cfg: Config | None = None) -> dict:
    """Run one registered experiment and return its record."""
    if name not in EXPERIMENTS:
        raise KeyError(f"unknown experiment {name!r}; valid names: {', '.join(EXPERIMENTS)}")
    exp, cfg = EXPERIMENTS[name], cfg or Config()
    cfg = dataclasses.replace(
        cfg, seeds=cfg.seeds or (tuple(range(cfg.pick(*exp.seeds))) if exp.seeds else None),
        epochs=cfg.epochs or (cfg.pick(*exp.epochs) if exp.epochs else None))
    start = time.perf_counter()
    out = exp.fn(cfg)
    if not isinstance(out, dict):
        raise TypeError(f"experiment {name!r} returned a {type(out).__name__}; it must return a dict with "
                        "'checks' (see normlab.lab.records)")
    hint = "" if cfg.full else _full_hint(exp)
    record = {
        "name": exp.name,
        "title": exp.title,
        "source": exp.source,
        "claim": exp.claim,
        "params": {"full": cfg.full, **out.get("params", {})},
        "checks": out.get("checks", []),
        "verdict": records.verdict(out.get("checks", []), hint=hint),
        "figures": out.get("figures", []),
        "tables": out.get("tables", []),
        "notes": out.get("notes", []),
        "seconds": round(time.perf_counter() - start, 2),
    }
    try:  # refused here, naming the key, rather than when the report is written
        record = records.to_json(record)
    except TypeError as e:
        raise TypeError(f"experiment {name!r}: {e}") from None
    if (wrong := records.problem(record)) is not None:  # name and verdict are the registry's own
        raise ValueError(f"experiment {name!r} returned a record the report cannot show: {wrong}")
    return record


# ----------------------------------------------------------------------------- shared helpers

# The smallest effects that matter, fixed before any run, by the kind of quantity a check compares
# (records.check's margin): a difference inside ±margin is "no practical effect", a decision.
_MARGIN = {"accuracy": 0.01, "ratio": 0.05, "spread": 0.1, "offset": 0.05}
_MARGIN_TEXT = {
    "accuracy": "1 accuracy point (0.01)",
    "ratio": "5% (a ratio within 0.95–1.05 is no effect)",
    "spread": "0.1 in log10, a factor 1.26 in the max/min ratio between layers",
    "offset": "0.05 on the 0–1 offset scale",
}


def _check(kind: str, name: str, values, op: str, threshold: float, detail: str = "",
           within: tuple[float, float] | None = None) -> dict:
    """:func:`records.check` with the margin fixed for this kind of quantity (``_MARGIN``), said in
    the detail; a difference of accuracies lies in [−1, 1] unless ``within`` says otherwise."""
    said = f"margin: {_MARGIN_TEXT[kind]}"
    if within is None and kind == "accuracy":
        within = (-1, 1)
    return records.check(name, values, op, threshold, f"{detail}; {said}" if detail else said, within=within,
                         margin=_MARGIN[kind])


def _mean_curve(curves: list[list[float]], log: bool = False) -> tuple[list[float], list[float], list[float]]:
    """Mean and mean ± std over seeds, epoch by epoch; with ``log`` (a quantity drawn on a log axis,
    such as an MSE) the geometric mean and the band ×/÷ the geometric std, which stays above 0
    where mean − std would not.

    A run that stopped early (diverged) is padded with NaN, so the mean is NaN from there on: a
    failure counts against its configuration instead of leaving the mean to the survivors.
    """
    n = max(len(c) for c in curves)
    t = torch.tensor([c + [math.nan] * (n - len(c)) for c in curves], dtype=torch.float64)
    if log:
        t = t.log()
    mean = t.mean(0)
    std = t.std(0, correction=0)
    curve = [mean, mean - std, mean + std]
    return tuple((c.exp() if log else c).tolist() for c in curve)


def _paired(a, b, fn) -> list[float]:
    """``fn(a_s, b_s)`` for each random seed ``s``: a check's values, one per seed."""
    return [fn(x, y) for x, y in zip(a, b)]


def _diff(a, b) -> list[float]:
    return _paired(a, b, lambda x, y: x - y)


def _ratio(a, b) -> list[float]:
    return _paired(a, b, lambda x, y: x / y if y else math.inf)


def _mean(values) -> float:
    values = [float(v) for v in values]
    return statistics.fmean(values) if values else math.nan


def _std(values) -> float:
    values = [float(v) for v in values]
    return statistics.pstdev(values) if len(values) > 1 else 0.0


def _auc(curve: list[float]) -> float:
    """Mean of a per-epoch curve: lower for a loss that falls sooner (speed of convergence)."""
    return _mean(curve)


def _curves_panel(title: str, ylabel: str, runs: dict[str, list[list[float]]], logy: bool = False, x0: int = 1) -> dict:
    series = []
    for label, curves in runs.items():
        mean, lo, hi = _mean_curve(curves, log=logy)
        series.append(records.series(label, range(x0, x0 + len(mean)), mean, lo, hi))
    return records.panel("lines", title, "epoch", ylabel, logy=logy, series=series)


def _input_offset(model: nn.Module, X: torch.Tensor) -> float:
    """How far the inputs of the Linear layers above the first are from zero mean: |mean| / rms
    per unit over ``X``, averaged — 0 for a centred unit, 1 for one of constant sign and size (a
    bounded index: a nearly constant unit does not blow it up as |mean|/std would) — in eval mode;
    nothing is updated."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)][1:]
    seen: list[torch.Tensor] = []
    handles = [m.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach())) for m in linears]
    try:
        with train.mode(model, False), torch.no_grad():
            model(X)
    finally:
        for h in handles:
            h.remove()
    return _mean(float((t.mean(0).abs() / t.square().mean(0).sqrt().clamp_min(1e-30)).mean()) for t in seen)


def _grad_std_spread(layers: dict[str, torch.Tensor]) -> float:
    """log10(max/min) over layers of the weight-gradient standard deviation: 0 = perfectly steady."""
    return _log10_spread([float(g.double().std()) for g in layers.values()])


def _bn_mlp(num_features: int, seed: int) -> nn.Module:
    """The batch-size experiment's BN model, module-level so that worker processes can build it."""
    return models.mlp(num_features, 10, depth=3, width=64, activation="relu", norm="batch", seed=seed)


def _log10_spread(values) -> float:
    """log10(max/min) of positive scales: 0 = all equal; a layer whose scale vanished (0) or
    exploded (inf) makes it inf, never quietly drops out; NaN with fewer than two values."""
    values = [float(v) for v in values]
    if len(values) < 2 or any(math.isnan(v) for v in values):
        return math.nan
    if min(values) <= 0 or math.isinf(max(values)):
        return math.inf
    return math.log10(max(values) / min(values))


def _boxes(layers: dict[str, torch.Tensor], group: str) -> list[dict]:
    return [records.box(f"{group} L{i + 1}", g, group=group) for i, g in enumerate(layers.values())]


# ----------------------------------------------------------------------------- zscore


@experiment(
    "zscore",
    "Raw vs Z-Score inputs",
    source="Lesson 14.1 §2 (Z-Score modelling experiment)",
    claim="A network trained on Z-Score inputs (statistics from the training split) converges faster and "
    "reaches a lower test error than on raw inputs, and its per-layer gradients are steadier in the first epochs.",
    seeds=(50, 50), epochs=(20, 40),
)
def _zscore(cfg: Config) -> dict:
    epochs, seeds = cfg.epochs, cfg.seeds
    lr, batch = 0.03, 10
    raw_split = data.make_regression(num_examples=1000, num_inputs=2, degree=1, loc=5.0, seed=0)
    runs = {"raw": raw_split, "zscore": raw_split.scaled("zscore")}
    curves: dict[str, list[list[float]]] = {}
    train_curves: dict[str, list[list[float]]] = {}
    spreads: dict[str, list[float]] = {}
    boxes: list[dict] = []
    for kind, split in runs.items():  # every random seed at once (lab.ensemble)
        nets = [models.mlp(2, 1, depth=3, width=4, activation="sigmoid", init="xavier", seed=seed) for seed in seeds]
        rec = train.SeedGradients({1})
        hs = train.fit_seeds(nets, split, seeds, epochs=epochs, lr=lr, batch_size=batch, device=cfg.device,
                             on_step=rec.on_step, progress=cfg.progress, description=f"zscore {kind}")
        curves[kind] = [h.test_loss for h in hs]
        train_curves[kind] = [h.train_loss for h in hs]
        spreads[kind] = [_grad_std_spread(rec.layers(1, s)) for s in range(len(seeds))]
        boxes += _boxes(rec.layers(1, 0), kind)
    # The same on a real dataset with features on very different scales.
    real = data.load_dataset("breast_cancer", seed=0)
    real_acc = {}
    for kind, split in (("raw", real), ("zscore", real.scaled("zscore"))):
        nets = [models.mlp(real.num_features, 2, depth=2, width=16, activation="sigmoid", init="xavier", seed=seed)
                for seed in seeds]
        hs = train.fit_seeds(nets, split, seeds, epochs=epochs, lr=0.1, batch_size=batch, device=cfg.device,
                             progress=cfg.progress, description=f"zscore breast_cancer {kind}")
        real_acc[kind] = [h.test_metric for h in hs]
    final_s = {k: [c[-1] for c in v] for k, v in curves.items()}  # per random seed
    auc_s = {k: [_auc(c) for c in v] for k, v in curves.items()}
    acc_s = {k: [c[-1] for c in v] for k, v in real_acc.items()}
    final, auc, acc, spread = ({k: _mean(v) for k, v in d.items()} for d in (final_s, auc_s, acc_s, spreads))
    checks = [
        _check("ratio", "final test MSE, zscore / raw", _ratio(final_s["zscore"], final_s["raw"]), "<", 1.0,
                      f"after {epochs} epochs: zscore {final['zscore']:.4g}, raw {final['raw']:.4g} (means)"),
        _check("ratio", "mean test MSE over epochs (convergence speed), zscore / raw",
                      _ratio(auc_s["zscore"], auc_s["raw"]), "<", 1.0),
        _check("accuracy", "breast_cancer test accuracy, zscore − raw", _diff(acc_s["zscore"], acc_s["raw"]), ">", 0.0,
                      f"zscore {acc['zscore']:.3f}, raw {acc['raw']:.3f} (means)"),
        _check("spread", "epoch-1 gradient spread across layers (log10 max/min std), zscore − raw",
                      _diff(spreads["zscore"], spreads["raw"]), "<", 0.0,
                      f"zscore {spread['zscore']:.3f}, raw {spread['raw']:.3f} (means; 0 = equal gradient scale in every "
                      "layer)"),
    ]
    notes = ["The lesson trains 5 epochs; a 4-unit sigmoid network barely moves in 5 epochs at lr 0.03, so the "
             "tour trains 20 (--full: 40). Z-Score statistics come from the training split only."]
    majority = float(torch.bincount(real.y_test.long()).max()) / len(real.y_test)  # what always-one-class scores
    stuck = [a for a in acc_s["raw"] if abs(a - majority) < 1e-6]
    if stuck:
        notes.append(f"On breast_cancer the raw network scores exactly {majority:.3f} in {len(stuck)} of "
                     f"{len(acc_s['raw'])} random seeds: the share of the majority class in the test split. It "
                     "predicts that class for every example: with inputs in the hundreds and thousands its sigmoids "
                     "saturate and it never learns.")
    if checks[-1]["status"] != "holds":
        notes.append("The gradient-steadiness part is not shown here: in both runs the largest per-layer gradient "
                     f"is {10 ** spread['raw']:.0f}× (raw) and {10 ** spread['zscore']:.0f}× (zscore) the smallest — "
                     "sigmoid' ≤ 1/4 shrinks it layer by layer whatever the inputs — so centring the inputs shows in "
                     "the loss rather than in this spread.")
    return {
        "params": {"epochs": epochs, "random seeds": list(seeds), "lr": lr, "batch_size": batch, "model": "sigmoid MLP 2-4-4-4-1, Xavier",
                   "data": "regression y = 2·z₁ − z₂ + 1 + noise seen through inputs x = z + 5 (not zero-centred); "
                   "breast_cancer with a 30-16-16-2 sigmoid MLP, lr 0.1"},
        "notes": notes,
        "checks": checks,
        "figures": [
            records.figure(
                "Learning curves, raw vs Z-Score inputs (over random seeds; cf. the lesson's train and test MSE)",
                _curves_panel("regression: training MSE (log scale)", "MSE", train_curves, logy=True),
                _curves_panel("regression: test MSE (log scale)", "MSE", curves, logy=True),
                _curves_panel("breast_cancer: test accuracy", "accuracy", real_acc),
                caption="If the claim holds, the Z-Score curves lie below raw's in the two MSE panels (lower error, "
                        "sooner) and above it on the right (higher accuracy). Over the random seeds: for the MSE the "
                        "geometric mean and a band ×/÷ one geometric standard deviation (an error stays above 0 "
                        "on a log axis), for the accuracy the mean ± one standard deviation.",
            ),
            records.figure(
                f"Weight gradients of each layer during epoch 1, raw vs Z-Score inputs (random seed {seeds[0]})",
                records.panel("boxes", "all weight-gradient values of the epoch, per layer", "layer", "∂loss/∂w",
                              boxes=boxes),
                caption="One box per layer and input (whiskers at the 5th and 95th percentiles). Steady gradients "
                        "look alike from layer to layer; the gradient-spread check compares how unequal they are.",
            ),
        ],
        "tables": [records.table("Summary (mean over random seeds)", ["inputs", "final test MSE", "mean test MSE", "breast_cancer accuracy", "gradient spread"],
                                 [[k, final[k], auc[k], acc[k], spread[k]] for k in runs])],
    }


# ----------------------------------------------------------------------------- drift


@experiment(
    "drift",
    "Gradients drift as training goes on: Z-Score only vs BatchNorm",
    source="Lesson 14.1 §3.1 (Zero-Centered property fades)",
    claim="With Z-Score inputs alone, a tanh network's per-layer gradients are steady early (epoch 5) and "
    "unsteady later (epoch 40); BatchNorm keeps them steady.",
    seeds=(50, 50), epochs=(40, 40),
)
def _drift(cfg: Config) -> dict:
    late = cfg.epochs
    early = max(1, min(5, late // 2))  # the lesson's epoch 5, earlier when --epochs is small
    seeds = cfg.seeds
    lr, batch = 0.03, 10
    split = data.make_regression(num_examples=1000, num_inputs=2, degree=2, bias=False, seed=0).scaled("zscore")
    spread = {(k, e): [] for k in ("zscore", "zscore+BN") for e in (early, late)}
    offset = {(k, e): [] for k in ("zscore", "zscore+BN") for e in (early, late)}
    boxes, curves = [], {}
    for kind, norm in (("zscore", "none"), ("zscore+BN", "batch")):  # every random seed at once
        nets = [models.mlp(2, 1, depth=2, width=4, activation="tanh", init="xavier", norm=norm, seed=seed)
                for seed in seeds]
        rec = train.SeedGradients({early, late})

        def on_epoch(epoch, stack, histories, kind=kind):
            if epoch in (early, late):  # the claim's own subject: are the layers' inputs still centred?
                offset[(kind, epoch)] += [_input_offset(m, split.X_train.to(cfg.device)) for m in stack.members]

        hs = train.fit_seeds(nets, split, seeds, epochs=late, lr=lr, batch_size=batch, device=cfg.device,
                             on_step=rec.on_step, on_epoch=on_epoch, progress=cfg.progress, description=f"drift {kind}")
        curves[kind] = [h.test_loss for h in hs]
        for e in (early, late):
            spread[(kind, e)] = [_grad_std_spread(rec.layers(e, s)) for s in range(len(seeds))]
            boxes.append((kind, e, _boxes(rec.layers(e, 0), f"epoch {e}")))
    m = {k: _mean(v) for k, v in spread.items()}
    growth = {k: _diff(spread[(k, late)], spread[(k, early)]) for k in ("zscore", "zscore+BN")}  # per seed
    off = {k: _mean(v) for k, v in offset.items()}
    checks = [
        _check("offset", f"Z-Score only: hidden layers' input offset |mean|/rms at epoch {late} − epoch {early}",
                      _diff(offset[("zscore", late)], offset[("zscore", early)]), ">", 0.0,
                      f"epoch {early} {off[('zscore', early)]:.3f}, epoch {late} {off[('zscore', late)]:.3f} (means; 0 = "
                      "centred, 1 = one constant sign): the zero-centred property fades if the inputs of the layers "
                      "above the first move off zero"),
        _check("spread", f"Z-Score only: gradient spread at epoch {late} − epoch {early}", growth["zscore"], ">", 0.0,
                      "spread = log10(max/min) over layers of the weight-gradient std; growing = drifting apart"),
        _check("spread", f"growth of the gradient spread from epoch {early} to {late}, BN − Z-Score only",
                      _diff(growth["zscore+BN"], growth["zscore"]), "<", 0.0,
                      f"BN {_mean(growth['zscore+BN']):+.3f}, Z-Score only {_mean(growth['zscore']):+.3f} (means): "
                      "steadier = grows less"),
    ]
    mse = {k: _mean(c[-1] for c in v) for k, v in curves.items()}
    notes = [f"BN's own gradient spread changes by {_mean(growth['zscore+BN']):+.3f} between epoch {early} and "
             f"{late} (Z-Score only: {_mean(growth['zscore']):+.3f}); the check reads 'BN keeps them steady' as "
             "'changes less than without BN', and the table shows both epochs.",
             f"Final test MSE: Z-Score only {mse['zscore']:.4g}, BN {mse['zscore+BN']:.4g} — "
             + ("BN ends worse on this tiny 4-unit network: steadier gradients are not a lower error here."
                if mse["zscore+BN"] > mse["zscore"] else "BN also ends with the lower error.")]
    abs_panels = []
    for kind in ("zscore", "zscore+BN"):
        bx = [b for k, _, group in boxes if k == kind for b in group]
        abs_panels.append(records.panel("boxes", {"zscore": "Z-Score only", "zscore+BN": "Z-Score + BN"}[kind],
                                        "epoch and layer", "∂loss/∂w", boxes=bx))
    return {
        "params": {"epochs": [early, late], "random seeds": list(seeds), "lr": lr, "batch_size": batch,
                   "model": "tanh MLP 2-4-4-1 (the lesson's tanh_class2), Xavier; BN before each tanh"},
        "checks": checks,
        "notes": notes,
        "figures": [
            records.figure(f"Weight gradients of each layer at epoch {early} and {late} (random seed {seeds[0]})",
                           *abs_panels, sharey=True,
                           caption=f"Each colour is one epoch. Drifting apart means the boxes of epoch {late} differ "
                                   f"more from layer to layer than those of epoch {early}; the two panels share one "
                                   "axis so Z-Score only and BN compare directly."),
            records.figure("Test MSE per epoch, Z-Score only vs Z-Score + BN (geometric mean ×/÷ geometric std over "
                           "random seeds)",
                           _curves_panel("test MSE (log scale)", "MSE", curves, logy=True),
                           caption="Lower is better. Steadier gradients need not mean a lower error: the notes give "
                                   "the final errors."),
        ],
        "tables": [records.table("Gradient spread across layers (log10 max/min of per-layer std), mean over random seeds",
                                 ["model", f"epoch {early}", f"epoch {late}"],
                                 [[k, m[(k, early)], m[(k, late)]] for k in ("zscore", "zscore+BN")]),
                   records.table("Offset of the hidden layers' inputs from zero mean (|mean| / rms per unit, on the "
                                 "training set; 0 = centred, 1 = one constant sign), mean over random seeds",
                                 ["model", f"epoch {early}", f"epoch {late}"],
                                 [[k, off[(k, early)], off[(k, late)]] for k in ("zscore", "zscore+BN")])],
    }


# ----------------------------------------------------------------------------- glorot


@experiment(
    "glorot",
    "The Glorot condition at initialisation: default vs Xavier init",
    source="Lesson 14.1 §3.2; Glorot & Bengio (2010)",
    claim="With torch's default init U(±1/√n) the forward variance shrinks by about 1/3 per tanh layer and the "
    "back-propagated gradient variance shrinks likewise; Xavier init keeps both far steadier (what shrink is left "
    "comes from tanh's slope below 1 away from 0). Sigmoid's "
    "derivative (≤ 1/4) makes the gradients vanish whatever the init.",
    seeds=(20, 50),
)
def _glorot(cfg: Config) -> dict:
    depth, width, n = cfg.pick((8, 256, 512), (12, 512, 2048))
    seeds = cfg.seeds
    results: dict[tuple[str, str], list[list[dict]]] = {}
    summaries: dict[tuple[str, str], list[dict]] = {}
    for activation in ("tanh", "sigmoid"):
        for init in ("default", "xavier"):
            for seed in seeds:
                model = models.mlp(width, 1, depth=depth, width=width, activation=activation, init=init, seed=seed)
                _zero_biases(model)  # Glorot & Bengio's setting: the comparison is about the weights
                g = torch.Generator().manual_seed(seed)
                x, target = torch.randn(n, width, generator=g), torch.randn(n, 1, generator=g)
                with GlorotMonitor(model, layers=[nn.Linear]) as mon:
                    nn.functional.mse_loss(model(x), target).backward()
                summary = mon.summary()  # the hidden layers; the output layer has another width
                stats = [r for r in mon.stats() if r["name"] in summary["hidden_layers"]]
                results.setdefault((activation, init), []).append(stats)
                summary["saturation"] = _mean(r["saturation"] for r in stats if not math.isnan(r.get("saturation", math.nan)))
                summaries.setdefault((activation, init), []).append(summary)

    def per_seed(key, field_):
        return [s[field_] for s in summaries[key]]

    def avg(key, field_):
        return _mean(per_seed(key, field_))

    panels = []
    for which, label in (("forward_var", "forward: Var(layer output)"), ("backward_var", "backward: Var(∂loss/∂layer output)")):
        series = []
        for (activation, init), runs in results.items():
            per_layer = [_mean(run[i][which] for run in runs) for i in range(depth)]
            series.append(records.series(f"{activation}/{init}", range(1, depth + 1), per_layer))
        panels.append(records.panel("lines", label, "layer", "variance", logy=True, series=series))
    checks = [
        records.check("tanh/default: forward variance ratio per layer", per_seed(("tanh", "default"), "forward_per_layer"), ">",
                      0.25, "theory n·Var(W) = 1/3 per layer"),
        records.check("tanh/default: forward variance ratio per layer (upper)", per_seed(("tanh", "default"), "forward_per_layer"),
                      "<", 0.45),
        records.check("tanh/default: backward variance ratio per layer", per_seed(("tanh", "default"), "backward_per_layer"), "<",
                      0.5, "gradient variance shrinks on the way back to the first layer"),
        *[records.check(f"tanh: |log10 {d} ratio per layer|, xavier / default",
                        _paired(per_seed(("tanh", "xavier"), f"{d}_per_layer"), per_seed(("tanh", "default"), f"{d}_per_layer"),
                                lambda x, y: abs(math.log10(x)) / abs(math.log10(y))),
                        "<", 0.5, "Xavier's per-layer ratio is at least twice as close to 1 on a log scale")
          for d in ("forward", "backward")],
        *[records.check(f"sigmoid/{init}: backward variance ratio per layer", per_seed(("sigmoid", init), "backward_per_layer"), "<", 0.25,
                        "sigmoid' ≤ 1/4: each layer back multiplies the gradient variance by n·Var(W)·E[σ'²] ≤ "
                        "n·Var(W)/16, i.e. it shrinks by a factor ≥ 16/(n·Var(W))")
          for init in ("default", "xavier")],
    ]
    rows = [[f"{a}/{i}", avg((a, i), "forward_per_layer"), avg((a, i), "backward_per_layer"),
             avg((a, i), "forward_end_to_end"), avg((a, i), "backward_end_to_end"), avg((a, i), "saturation")]
            for (a, i) in results]
    return {
        "params": {"depth": depth, "width": width, "batch": n, "random seeds": list(seeds), "input": "N(0, 1)", "biases": 0, "loss": "MSE to N(0, 1) targets"},
        "checks": checks,
        "figures": [records.figure(
            "Variance through the hidden layers at initialisation (mean over random seeds)", *panels,
            caption="Glorot's condition — Var(W) = 2/(n_in + n_out), Xavier's init — keeps both lines flat: the variance "
                    "neither shrinks nor grows from layer to layer. Forward (left, read from layer 1 on): with torch's "
                    "default init the tanh lines fall by about a third per layer, Xavier's far less. Backward (right): "
                    "the gradient flows from the last layer to the first, so a gradient that shrinks on its way back "
                    "draws a line that rises from left to right; sigmoid's rise steeply whatever the init (its slope "
                    "is at most 1/4).")],
        "tables": [records.table(
            "Variance ratios of the hidden layers (GlorotMonitor.summary; mean over random seeds)",
            ["activation/init", "forward per layer", "backward per layer", "forward end to end",
             "backward end to end", "saturated fraction"],
            rows)],
        "notes": ["Per layer = the geometric mean of the layer-to-layer ratio, (end to end)^(1/(L−1)) over the "
                  f"L = {depth} hidden layers; 1 is Glorot's condition. End to end = last hidden layer over the first "
                  "(forward) or first over last (backward: the gradient flows back): below 1 it shrinks. The output "
                  "layer (width 1) is left out. Saturated fraction: tanh/sigmoid outputs in their flat part, "
                  "averaged over the hidden layers' activations."],
    }


def _zero_biases(model: nn.Module) -> None:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear) and m.bias is not None:
                m.bias.zero_()


# ----------------------------------------------------------------------------- batchnorm


class _Percentiles:
    """15/50/85th percentiles of one unit's input to the last hidden sigmoid, on fixed data, over
    steps, for every member of a :class:`~normlab.lab.ensemble.Stack`, as the network computes it in
    training (BN with the batch's own statistics: what the layers above learn from, Ioffe &
    Szegedy's Fig. 1b, c), read on a copy so the running statistics stay untouched; and each
    member's test accuracy in eval mode."""

    def __init__(self, X: torch.Tensor, y: torch.Tensor, every: int):
        self.X, self.y, self.every = X, y, every
        self.steps: list[int] = []
        self.values: list[list[list[float]]] = []  # [member][check] -> (15%, 50%, 85%)
        self.accuracy: list[list[float]] = []  # [member][check]

    def __call__(self, step, stack, losses) -> None:
        if step % self.every:
            return
        index = [i for i, m in enumerate(stack.members[0]) if isinstance(m, nn.Sigmoid)][-1]
        x = stack.spread(self.X)
        with torch.no_grad():
            with train.mode(stack, False):
                out = stack.split(stack(x))
            probe = copy.deepcopy(stack.layers[:index]).train()
            for layer in probe:  # everything below the sigmoid
                x = layer(x)
        seen = stack.split(x)[:, :, 0].double().cpu()  # (N, S): unit 0 of each member
        q = torch.quantile(seen, torch.tensor([0.15, 0.5, 0.85], dtype=torch.float64), dim=0)  # (3, S)
        if not self.values:
            self.values = [[] for _ in range(stack.size)]
            self.accuracy = [[] for _ in range(stack.size)]
        self.steps.append(step)
        for s in range(stack.size):
            self.values[s].append(q[:, s].tolist())
            self.accuracy[s].append(float((out[:, s].argmax(1) == self.y).float().mean()))


@experiment(
    "batchnorm",
    "A deep sigmoid network with and without BatchNorm",
    source="Lesson 14.1 §4; Ioffe & Szegedy (2015), Fig. 1",
    claim="BatchNorm makes a 3-hidden-layer sigmoid network train faster and reach a higher test accuracy, and "
    "keeps the distribution of a sigmoid's input steadier during training.",
    seeds=(20, 50), epochs=(10, 40),
)
def _batchnorm(cfg: Config) -> dict:
    epochs, seeds = cfg.epochs, cfg.seeds
    lr, batch = 0.5, 60
    split = data.load_dataset("digits", seed=0).scaled("zscore")
    every = max(1, len(split.X_train) // batch // 2)  # twice per epoch
    acc_curves = {"none": [], "BN": []}
    drift = {"none": [], "BN": []}
    bands = {}
    for kind, norm in (("none", "none"), ("BN", "batch")):  # every random seed at once
        nets = [models.mlp(split.num_features, 10, depth=3, width=100, activation="sigmoid", init="xavier", norm=norm,
                           seed=seed) for seed in seeds]
        tracker = _Percentiles(split.X_test.to(cfg.device), split.y_test.to(cfg.device), every)
        train.fit_seeds(nets, split, seeds, epochs=epochs, lr=lr, batch_size=batch, device=cfg.device, drop_last=True,
                        on_step=tracker, progress=cfg.progress, description=f"batchnorm {kind}")
        acc_curves[kind] = tracker.accuracy
        for s, values in enumerate(tracker.values):
            q = torch.tensor(values, dtype=torch.float64)
            width = (q[:, 2] - q[:, 0]).mean()
            drift[kind].append(float((q[1:] - q[:-1]).abs().sum(0).mean() / width))
            if s == 0:
                bands[kind] = (tracker.steps, q)
    steps = [every * (i + 1) for i in range(max(len(c) for runs in acc_curves.values() for c in runs))]
    mean_acc = {k: _mean_curve(v) for k, v in acc_curves.items()}
    final_s = {k: [c[-1] for c in v] for k, v in acc_curves.items()}  # per random seed
    early_s = {k: [_mean(c[: max(1, len(c) // 4)]) for c in v] for k, v in acc_curves.items()}
    final, early, d = ({k: _mean(v) for k, v in x.items()} for x in (final_s, early_s, drift))
    checks = [
        _check("accuracy", "final test accuracy, BN − none", _diff(final_s["BN"], final_s["none"]), ">", 0.0,
                      f"BN {final['BN']:.3f}, none {final['none']:.3f} (means)"),
        _check("accuracy", "test accuracy over the first quarter of training, BN − none", _diff(early_s["BN"], early_s["none"]),
                      ">", 0.0),
        _check("ratio", "drift of the sigmoid input's percentiles (path length / band width), BN / none",
                      _ratio(drift["BN"], drift["none"]), "<", 1.0,
                      f"BN {d['BN']:.3f}, none {d['none']:.3f} (means)"),
    ]
    band_panels = [
        records.panel("lines", f"{'without BN' if kind == 'none' else 'with BN'}: median, band 15–85%", "step",
                      "input to the sigmoid", series=[records.series(kind, kind_steps, q[:, 1], q[:, 0], q[:, 2])])
        for kind, (kind_steps, q) in bands.items()
    ]
    acc_panel = records.panel("lines", "test accuracy during training", "step", "accuracy",
                              series=[records.series(k, steps, *m) for k, m in mean_acc.items()])
    return {
        "params": {"epochs": epochs, "random seeds": list(seeds), "lr": lr, "batch_size": batch, "data": "digits (Z-Score)",
                   "model": "sigmoid MLP 64-100-100-100-10, Xavier init, BN before each sigmoid"},
        "checks": checks,
        "figures": [
            records.figure("Test accuracy with and without BN (mean ± std over random seeds; cf. Ioffe & Szegedy "
                           "2015, Fig. 1a)", acc_panel,
                           caption="If the claim holds, BN's curve rises sooner and ends higher."),
            records.figure("The input to one sigmoid of the last hidden layer during training (random seed "
                           f"{seeds[0]}; cf. Fig. 1b, c)", *band_panels, sharey=True,
                           caption="The line is the median over the test set, the band the 15th to 85th percentile, "
                                   "read as the network computes it in training (BN with the batch's own statistics). "
                                   "The claim: with BN the band stays steadier; without BN it wanders as the layers "
                                   "below it learn (internal covariate shift). The drift check measures it."),
        ],
        "tables": [records.table("Summary (mean over random seeds)", ["model", "final test accuracy", "early test accuracy", "percentile drift"],
                                 [[k, final[k], early[k], d[k]] for k in acc_curves])],
    }


# ----------------------------------------------------------------------------- compare


def _last_epoch_backward(nets: list[nn.Module], split: data.Split, seeds, fit_kwargs: dict) -> tuple[list, list]:
    """Train the random seeds together, watching each one's back-propagated gradient variance per
    layer during the last epoch: (histories, [member][layer] variances).

    The watch is attached for the last epoch only, so the other epochs' times are the model's own
    (the per-epoch time reported is the median over epochs).
    """
    epochs = fit_kwargs["epochs"]
    watches = []
    variances: list[list[float]] = [[] for _ in nets]

    def on_step(step, stack, losses):
        if stack.epoch == epochs and (not watches or watches[-1][0] is not stack):
            watches.append((stack, stack.watch_backward()))

    def on_epoch(epoch, stack, histories):
        if epoch == epochs and watches and watches[-1][0] is stack:
            watch = watches[-1][1]
            watch.remove()
            for s, v in enumerate(watch.variances()):
                variances[stack.offset + s] = v

    histories = train.fit_seeds(nets, split, seeds, on_step=on_step, on_epoch=on_epoch, **fit_kwargs)
    return histories, variances


_IN_NETWORK = ("batch", "layer", "group", "instance", "rms")


@experiment(
    "compare",
    "Every norm of normlab on the same tasks",
    source="the survey “Norm相关总结” (BN, LN, IN, GN, WN, Cosine Norm) and RMSNorm",
    claim="The in-network norms (BN, LN, IN, GN, RMS) rescue a deep sigmoid network that barely learns without "
    "normalization and keep its back-propagated gradient variance steadier across layers; on an easy tanh "
    "network no norm, weight and cosine normalization included, costs accuracy.",
    seeds=(20, 50), epochs=(6, 20),
)
def _compare(cfg: Config) -> dict:
    epochs, seeds = cfg.epochs, cfg.seeds
    batch, depth, width = 32, 4, 64
    split = data.load_dataset("digits", seed=0).scaled("zscore")
    tasks = {"sigmoid": 0.3, "tanh": 0.1}  # activation -> learning rate
    results: dict[str, dict[str, list]] = {}
    for activation, lr in tasks.items():
        for norm in models.NORMS:  # every random seed at once
            nets = [models.mlp(split.num_features, 10, depth=depth, width=width, activation=activation, norm=norm,
                               seed=seed) for seed in seeds]
            hs, bwd = _last_epoch_backward(nets, split, seeds, dict(
                epochs=epochs, lr=lr, batch_size=batch, device=cfg.device, drop_last=True,
                progress=cfg.progress, description=f"compare {activation} {norm}"))
            results.setdefault(activation, {})[norm] = list(zip(hs, bwd))
    rows, acc, spread, acc_s, spread_s = [], {}, {}, {}, {}
    for activation, by_norm in results.items():
        for norm, runs in by_norm.items():
            finals = [h.test_metric[-1] for h, _ in runs]
            acc_s[activation, norm], spread_s[activation, norm] = finals, [_log10_spread(b) for _, b in runs]
            acc[activation, norm] = _mean(finals)
            spread[activation, norm] = _mean(spread_s[activation, norm])
            rows.append([activation, norm, acc[activation, norm], _std(finals), _mean(_mean(h.test_metric) for h, _ in runs),
                         spread[activation, norm], 1e3 * _mean(statistics.median(h.seconds) for h, _ in runs)])
    checks = [records.check(f"sigmoid: {n} − none final test accuracy", _diff(acc_s["sigmoid", n], acc_s["sigmoid", "none"]),
                            ">", 0.2, within=(-1, 1)) for n in _IN_NETWORK]
    checks += [_check("spread", f"sigmoid: {n} − none gradient-variance spread",
                             _diff(spread_s["sigmoid", n], spread_s["sigmoid", "none"]), "<", 0.0,
                             "spread = log10(max/min) over layers of Var(∂loss/∂layer output) in the last epoch")
               for n in _IN_NETWORK]
    checks += [records.check(f"tanh: {n} − none final test accuracy (at most 2 points worse)",
                             _diff(acc_s["tanh", n], acc_s["tanh", "none"]), ">=", -0.02,
                             "the claim allows a norm to cost up to 2 accuracy points (−0.02) on a network that trains "
                             "without one; below that it fails, an interval across −0.02 is undecided", within=(-1, 1))
               for n in models.NORMS if n != "none"]
    figures = []
    for activation, by_norm in results.items():
        order = sorted(by_norm, key=lambda n: acc[activation, n], reverse=True)
        figures.append(records.figure(
            f"Every norm on a {activation} MLP 64-{width}×{depth}-10, lr {tasks[activation]} (mean ± std over random seeds)",
            _curves_panel("test accuracy", "accuracy", {n: [h.test_metric for h, _ in runs] for n, runs in by_norm.items()}),
            records.panel("bars", "final test accuracy", "", "accuracy", labels=order, values=[acc[activation, n] for n in order],
                          errors=[_std(h.test_metric[-1] for h, _ in by_norm[n]) for n in order]),
            records.panel("lines", "Var(∂loss/∂layer output), last epoch", "layer", "variance (log scale)", logy=True,
                          series=[records.series(n, range(1, depth + 2), [_mean(b[i] for _, b in runs)
                                                                          for i in range(depth + 1)])
                                  for n, runs in by_norm.items()]),
            caption=f"Left: test accuracy per epoch (chance, guessing one of the {split.num_classes} digits, is "
                    f"{1 / split.num_classes:.2f}); middle: final accuracy, best first, ± std over random seeds; right: "
                    "how the gradient variance changes from layer to layer (flat is steady). Each norm has one "
                    "colour and line style in every figure of this report.",
        ))
    return {
        "params": {"epochs": epochs, "random seeds": list(seeds), "learning rates": tasks, "batch_size": batch, "data": "digits (Z-Score)",
                   "model": f"MLP 64-{width}×{depth}-10, torch default init, norm before each activation"},
        "checks": checks,
        "figures": figures,
        "tables": [records.table("Every norm (mean over random seeds)", ["activation", "norm", "final test accuracy", "std",
                                                                  "mean accuracy over epochs", "gradient spread",
                                                                  "ms per epoch, all random seeds at once (this run; moves with the machine's load)"],
                                 rows)],
    }


# ----------------------------------------------------------------------------- batch-size


@experiment(
    "batch-size",
    "BatchNorm vs GroupNorm vs LayerNorm as the batch shrinks",
    source="the survey “Norm相关总结” (BN needs batches that are not too small); Wu & He (2018), Table 2",
    claim="BatchNorm's test error grows as the batch shrinks towards 2, while GroupNorm and LayerNorm, which "
    "do not look across the batch, are insensitive to the batch size; at batch 2 both beat BatchNorm.",
    seeds=(20, 50), epochs=(3, 10),
)
def _batch_size(cfg: Config) -> dict:
    sizes = cfg.pick((32, 8, 2), (32, 16, 8, 4, 2))
    epochs, seeds = cfg.epochs, cfg.seeds
    base_lr = 0.05  # per 32 examples; scaled linearly with the batch size (Wu & He's rule)
    split = data.load_dataset("digits", seed=0).scaled("zscore")
    errors: dict[str, dict[int, list[float]]] = {}

    def build(norm, seed):
        base = "batch" if norm in ("batchrenorm", "BN→GN") else norm
        model = models.mlp(split.num_features, 10, depth=3, width=64, activation="relu", norm=base, seed=seed)
        if norm == "batchrenorm":  # Ioffe 2017: BN corrected towards its running statistics
            return convert.replace_norm(model, "batchrenorm", inplace=True)
        if norm == "BN→GN":  # the practitioner's fix, applied to a BN model
            return convert.replace_norm(model, "group", inplace=True)
        return model

    for norm in ("batch", "group", "layer", "batchrenorm", "BN→GN"):
        for size in sizes:  # every random seed at once
            hs = train.fit_seeds([build(norm, seed) for seed in seeds], split, seeds, epochs=epochs,
                                 lr=base_lr * size / 32, momentum=0.9, batch_size=size, device=cfg.device, drop_last=True,
                                 progress=cfg.progress, description=f"batch-size {norm} {size}")
            errors.setdefault(norm, {})[size] = [1.0 - h.test_metric[-1] for h in hs]
    if cfg.nproc > 1:  # SyncBN's answer: the global batch split over processes, statistics synced
        label = f"SyncBN ×{cfg.nproc}"
        for size in sizes:
            if size % cfg.nproc or size // cfg.nproc < 1:
                continue
            for seed in seeds:
                h, _ = parallel.fit_parallel(functools.partial(_bn_mlp, split.num_features, seed), split, cfg.nproc,
                                             epochs=epochs, lr=base_lr * size / 32, momentum=0.9, batch_size=size,
                                             seed=seed, drop_last=True)
                errors.setdefault(label, {}).setdefault(size, []).append(1.0 - h.test_metric[-1])
    err = {n: {s: _mean(v) for s, v in by.items()} for n, by in errors.items()}
    big, small = max(sizes), min(sizes)
    rise = {n: _diff(errors[n][small], errors[n][big]) for n in ("batch", "group", "layer")}  # per random seed
    ranges = {n: [max(per) - min(per) for per in zip(*errors[n].values())] for n in ("group", "layer")}
    checks = [
        *[_check("accuracy", f"BN error increase from batch {big} to {small} − {n.upper()}'s", _diff(rise["batch"], rise[n]),
                        ">", 0.0, within=(-2, 2))
          for n in ("group", "layer")],
        *[_check("accuracy", f"test error at batch {small}, {n.upper()} − BN", _diff(errors[n][small], errors["batch"][small]),
                        "<", 0.0)
          for n in ("group", "layer")],
        *[records.check(f"{n.upper()} error range over batch sizes (max − min)", ranges[n], "<", 0.05,
                        "insensitive: within 5 points across all batch sizes") for n in ("group", "layer")],
    ]
    notes = []
    if cfg.nproc > 1 and big in err.get(f"SyncBN ×{cfg.nproc}", {}):
        sync = err[f"SyncBN ×{cfg.nproc}"]
        checks.append(records.check(f"|SyncBN ×{cfg.nproc} − BN| test error at global batch {big}",
                                    _paired(errors[f"SyncBN ×{cfg.nproc}"][big], errors["batch"][big],
                                            lambda a, b: abs(a - b)), "<=", 0.01,
                                    "SyncBN over processes trains like one process on the global batch"))
        notes.append(f"SyncBN ×{cfg.nproc} against BN on the same global batch: "
                     + ", ".join(f"batch {b}: {sync[b]:.3f} vs {err['batch'][b]:.3f}" for b in sync)
                     + ". The two are the same computation (tests/test_lab.py checks it to 1e-12 in float64); at small "
                       "batches training is chaotic and float32 rounding in a different reduction order sends runs apart.")
    series = [records.series(n, list(by), [by[s] for s in by],
                             [by[s] - _std(errors[n][s]) for s in by], [by[s] + _std(errors[n][s]) for s in by])
              for n, by in err.items()]
    return {
        "params": {"batch_sizes": list(sizes), "epochs": epochs, "random seeds": list(seeds), "lr": f"{base_lr}·batch/32, SGD momentum 0.9",
                   "data": "digits (Z-Score)", "model": "ReLU MLP 64-64-64-64-10, norm before each ReLU (GN: 4 groups of 16)"},
        "notes": notes + ["An MLP, not a CNN: a convolution's BN sees batch × height × width values per channel (128 at batch 2 "
                  "on 8×8 digits), so its statistics stay good; a fully-connected BN sees only the batch, which makes "
                  "the small-batch effect of Wu & He visible on data this small.",
                  f"BatchRenorm (Ioffe 2017, rmax 3, dmax 5) at batch {small}: error {err['batchrenorm'][small]:.3f} vs "
                  f"BN's {err['batch'][small]:.3f}; with {small} values per channel the corrections r, d clip at their "
                  "limits, so the batch statistics still dominate. BN→GN is the BN model passed through "
                  "normlab.convert.replace_norm(model, 'group') before training."],
        "checks": checks,
        "figures": [records.figure("Test error against the batch size (mean ± std over random seeds; cf. Wu & He "
                                   "2018, Fig. 1)",
                                   records.panel("lines", "test error after training", "batch size (log scale)",
                                                 "error", series=series, logx=True),
                                   caption="If the claim holds, BN's line climbs as the batch shrinks to 2 while "
                                           "GN's and LN's stay flat.")],
        "tables": [records.table("Test error (mean over random seeds)", ["norm", *[f"batch {s}" for s in sizes]],
                                 [[n, *[by.get(s, math.nan) for s in sizes]] for n, by in err.items()])],
    }


# ----------------------------------------------------------------------------- affine


@experiment(
    "affine",
    "BatchNorm in eval is one affine map",
    source="Lesson 14.1 §2.2",
    claim="In eval mode BN computes x·diag(γ/√(σ²+ε)) + (β − γμ/√(σ²+ε)); with γ=1, β=0 it is the Z-Score of x "
    "under the running statistics, and with γ=√(σ²+ε), β=μ it is the identity.",
)
def _affine(cfg: Config) -> dict:
    features, n = 6, cfg.pick(256, 4096)
    g = torch.Generator().manual_seed(0)
    bn = nln.BatchNorm1d(features)
    x_train = torch.randn(64, features, generator=g) * torch.linspace(0.5, 20, features) + torch.linspace(-100, 100, features)
    bn.train()
    for _ in range(20):  # learn running statistics from training batches
        bn(x_train[torch.randint(0, 64, (32,), generator=g)])
    bn.eval()
    with torch.no_grad():
        bn.weight.copy_(torch.rand(features, generator=g) + 0.5)
        bn.bias.copy_(torch.randn(features, generator=g))
    x = torch.randn(n, features, generator=g) * 10 + 3
    mu, var, eps = bn.running_mean, bn.running_var, bn.eps
    std = torch.sqrt(var + eps)

    def max_rel(a, b):
        return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))

    cases = []
    with torch.no_grad():
        scale, shift = bn.weight / std, bn.bias - bn.weight * mu / std
        cases.append(("BN(x) vs x·diag(γ/√(σ²+ε)) + (β − γμ/√(σ²+ε))", max_rel(bn(x), x @ torch.diag(scale) + shift)))
        bn.weight.fill_(1.0)
        bn.bias.zero_()
        cases.append(("γ=1, β=0: BN(x) vs Z-Score (x − μ)/√(σ²+ε)", max_rel(bn(x), (x - mu) / std)))
        bn.weight.copy_(std)
        bn.bias.copy_(mu)
        cases.append(("γ=√(σ²+ε), β=μ: BN(x) vs x", max_rel(bn(x), x)))
    tol, eps32 = 1e-5, torch.finfo(torch.float32).eps
    checks = [records.check(name, err, "<", tol, "max |difference| / max |reference|, float32") for name, err in cases]
    return {
        "params": {"features": features, "examples": n, "eps": eps, "running statistics": "20 training batches of 32"},
        "checks": checks,
        "figures": [records.figure("How far each affine identity is from exact, in float32 (log scale)",
                                   records.panel("bars", "max relative error", "", "error", logy=True,
                                                 labels=["affine map", "Z-Score case", "identity case"],
                                                 values=[max(e, 1e-12) for _, e in cases],
                                                 refs=[{"y": tol, "label": f"the checks' threshold, {tol:g}"},
                                                       {"y": eps32, "label": f"float32's rounding unit, {eps32:.2g}"}]),
                                   caption="One dot per identity: max |difference| / max |reference|. Dots at or "
                                           "below float32's rounding unit are exact to the dtype; a check holds "
                                           "below the threshold.")],
        "tables": [records.table("Per-channel affine view of the trained BN", ["channel", "μ", "σ²", "scale γ/√(σ²+ε)", "shift β − γμ/√(σ²+ε)"],
                                 [[c, mu[c], var[c], scale[c], shift[c]] for c in range(features)])],
    }


# ----------------------------------------------------------------------------- identities


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a − b| / max |b|: 0 for an identity, float64's rounding (~1e-16) when computed."""
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


# the identities' names on the figure's axis, by the start of the check's name
_SHORT = {"Min-Max": "Min-Max [0, 1]", "Z-Score columns": "Z-Score mean 0, std 1", "distribution: the": "Z(a·x + b) = Z(x)",
          "Z-Score is": "Z-Score as Linear", "backward eq. (4)–(9) vs autograd, Batch": "backward (4)–(9), BN",
          "backward eq. (4)–(9) vs autograd, Layer": "backward (4)–(9), LN", "LayerNorm: training": "LN train = eval",
          "LayerNorm: each": "LN alone = in batch", "GroupNorm with 1": "GN, 1 group = LN",
          "GroupNorm with C": "GN, C groups = IN", "Weight Norm": "WN, eq. (19)", "Cosine Norm: eq.": "eq. (21) = eq. (26)"}


def _survey_backward(x, gamma, dy, eps, dim):
    """The survey's eq. (4)–(9), written as printed, for a 2-D ``x`` normalized over ``dim`` (the
    m values of one statistic: the batch for BN, the features for LN) with γ, β per column."""
    m = x.shape[dim]
    mu = x.mean(dim, keepdim=True)
    var = x.var(dim, keepdim=True, correction=0)
    xhat = (x - mu) / torch.sqrt(var + eps)
    dxhat = dy * gamma                                                                      # (4)
    dvar = (dxhat * (x - mu) * -0.5 * (var + eps) ** -1.5).sum(dim, keepdim=True)           # (5)
    dmu = (dxhat * -1 / torch.sqrt(var + eps)).sum(dim, keepdim=True)                       # (6)
    dx = dxhat / torch.sqrt(var + eps) + dvar * 2 * (x - mu) / m + dmu / m                  # (7)
    dgamma = (dy * xhat).sum(0)  # γ is per column (x is 2-D): summed over the rows        # (8)
    dbeta = dy.sum(0)                                                                       # (9)
    return dx, dgamma, dbeta


@experiment(
    "identities",
    "The texts' identities, computed: scalers, distributions, affine maps, backward, LN, GN, WN, Cosine Norm",
    source="Lesson 14.1 §一.1, §二.1–二.2; the survey “Norm相关总结” eq. (4)–(9), (14)–(26)",
    claim="Min-Max maps each column to [0, 1] and Z-Score to mean 0, std 1; shifting and scaling keep the "
    "distribution; Z-Score is a Linear layer; the backward of a normalization is eq. (4)–(9); LayerNorm is the same "
    "in training and testing and stores nothing; GroupNorm with one group is LayerNorm and with one channel per "
    "group InstanceNorm; Weight Norm is WN(Wx) = v·g·x/‖v‖; Cosine Norm is bounded by 1 and eq. (21) = eq. (26).",
)
def _identities(cfg: Config) -> dict:
    with models._seeded(0):  # the layers' initial weights too, without touching the global RNG
        return _identity_record()


def _identity_record() -> dict:
    f64 = torch.float64
    g = torch.Generator().manual_seed(0)
    X = data.load_dataset("breast_cancer", seed=0).X_train.to(f64)  # 30 columns from 0.001 to 4254
    rows: list[tuple[str, float, str]] = []
    mm = torch.as_tensor(MinMaxScaler().fit_transform(X))
    rows.append(("Min-Max: every column's min is 0 and max is 1 (max deviation)",
                 float(torch.stack([mm.min(0).values.abs(), (mm.max(0).values - 1).abs()]).max()),
                 "MinMaxScaler fitted on breast_cancer's training split (30 columns, 0.001 to 4254)"))
    zs = torch.as_tensor(StandardScaler().fit_transform(X))
    rows.append(("Z-Score columns: mean 0 and standard deviation 1 (max deviation)",
                 float(torch.stack([zs.mean(0).abs(), (zs.std(0, correction=0) - 1).abs()]).max()),
                 "StandardScaler, the standard deviation with divisor n as the scaler's"))
    a, b = torch.tensor([1e3, 0.01, 7.0], dtype=f64), torch.tensor([-5e4, 3.0, 0.0], dtype=f64)
    Y = torch.randn(500, 3, generator=g, dtype=f64) ** 3  # skewed columns
    rows.append(("distribution: the Z-Score of a·x + b equals the Z-Score of x (a > 0)",
                 _rel(torch.as_tensor(StandardScaler().fit_transform(Y * a + b)), torch.as_tensor(StandardScaler().fit_transform(Y))),
                 "shape, skewness and ranks are those of the standardized data: moving and stretching the axes moves "
                 "only the coordinates"))
    rows.append(("distribution: changed ranks within each column after a·x + b",
                 float(((Y * a + b).argsort(0) != Y.argsort(0)).sum()), "a count: 0 means the order is untouched"))
    sc = StandardScaler().fit(X)
    lin = nn.Linear(X.shape[1], X.shape[1]).to(f64)
    with torch.no_grad():
        scale = torch.as_tensor(sc.scale_, dtype=f64)
        lin.weight.copy_(torch.diag(1 / scale))
        lin.bias.copy_(-torch.as_tensor(sc.mean_, dtype=f64) / scale)
        rows.append(("Z-Score is a Linear layer: x·diag(1/σ) − μ/σ vs the scaler", _rel(lin(X), zs),
                     "weight diag(1/σ), bias −μ/σ"))
    for label, dims, shape in (("BatchNorm (over the batch)", 0, (32, 8)), ("LayerNorm (over the features)", -1, (8, 32))):
        x = (torch.randn(*shape, generator=g, dtype=f64) * 3 + 5).requires_grad_()
        n = shape[1] if dims == 0 else shape[-1]
        gamma = (torch.rand(n, generator=g, dtype=f64) + 0.5).requires_grad_()
        beta = torch.randn(n, generator=g, dtype=f64).requires_grad_()
        dy = torch.randn(*shape, generator=g, dtype=f64)
        y = (NF.batch_norm(x, None, None, gamma, beta, training=True, eps=1e-5) if dims == 0
             else NF.layer_norm(x, (n,), gamma, beta, eps=1e-5))
        auto = torch.autograd.grad(y, (x, gamma, beta), dy)
        mine = _survey_backward(x.detach(), gamma.detach(), dy, 1e-5, dims)
        rows.append((f"backward eq. (4)–(9) vs autograd, {label}", max(_rel(p, q) for p, q in zip(mine, auto)),
                     "∂l/∂x, ∂l/∂γ, ∂l/∂β written as the survey prints them, against normlab's layer under autograd"))
    ln = nln.LayerNorm(16).to(f64)
    x = torch.randn(10, 16, generator=g, dtype=f64) * 4 - 2
    with torch.no_grad():
        y_train, y_eval = ln.train()(x), ln.eval()(x)
        alone = torch.cat([ln(x[i : i + 1]) for i in range(len(x))])
    rows.append(("LayerNorm: training output vs testing output", _rel(y_train, y_eval), "the same input in both modes"))
    rows.append(("LayerNorm: each example alone vs in a batch", _rel(alone, y_eval), "no batch dimension is looked at"))
    rows.append(("LayerNorm: stored statistics (buffers)", float(sum(b.numel() for b in ln.buffers())),
                 "a count: BatchNorm stores running mean and variance, LN nothing"))
    x = torch.randn(4, 6, 5, 5, generator=g, dtype=f64) * 2 + 1
    with torch.no_grad():
        rows.append(("GroupNorm with 1 group vs LayerNorm over (C, H, W)",
                     _rel(nln.GroupNorm(1, 6, affine=False).to(f64)(x), nln.LayerNorm((6, 5, 5), elementwise_affine=False)(x)),
                     "one group holds every channel of an example"))
        rows.append(("GroupNorm with C groups vs InstanceNorm",
                     _rel(nln.GroupNorm(6, 6, affine=False).to(f64)(x), nln.InstanceNorm2d(6)(x)),
                     "one channel per group"))
    wn = nln.weight_norm(nn.Linear(7, 3, bias=False).to(f64))
    x = torch.randn(5, 7, generator=g, dtype=f64)
    with torch.no_grad():
        gn, v = wn.parametrizations.weight.original0, wn.parametrizations.weight.original1
        norm = v.norm(dim=1, keepdim=True)
        rows.append(("Weight Norm: WN(Wx) vs v·(g·x/‖v‖), eq. (19)", _rel(wn(x), (x @ v.T) * (gn / norm).T),
                     "eq. (3) with μ = 0, σ = ‖v‖, b = 0: the input scaled by g/‖v‖ through the direction v"))
    cos = nln.CosineLinear(9, 4, eps=0.0).to(f64)
    x = torch.randn(200, 9, generator=g, dtype=f64) * torch.logspace(-3, 6, 200, dtype=f64)[:, None]
    with torch.no_grad():
        rows.append(("Cosine Norm: largest |output| over inputs of scale 1e-3 to 1e6, eq. (20)", float(cos(x).abs().max()),
                     "a cosine: at most 1 whatever the scale of x or w, where a dot product is unbounded"))
        cen = nln.CosineLinear(9, 4, centered=True, eps=0.0).to(f64)
        w = cen.weight
        dw, dx = w - w.mean(1, keepdim=True), x - x.mean(1, keepdim=True)
        sw, sx = dw.square().mean(1).sqrt(), dx.square().mean(1).sqrt()
        eq26 = (dx @ dw.T) / (9 * sx[:, None] * sw[None, :])
        rows.append(("Cosine Norm: eq. (21) (the centred layer) vs eq. (26), n·σ_w·σ_x", _rel(cen(x), eq26),
                     "|w − μ_w| = √n·σ_w and |x − μ_x| = √n·σ_x, eq. (22)–(25)"))
    tol, eps64 = 1e-10, torch.finfo(f64).eps
    checks = []
    for name, value, detail in rows:
        if name.startswith("Cosine Norm: largest"):
            checks.append(records.check(name, value, "<=", 1.0, detail))
        elif "count" in detail:
            checks.append(records.check(name, value, "<", 0.5, detail))
        else:
            checks.append(records.check(name, value, "<", tol, f"{detail}; max |difference| / max |reference|, float64"))
    measured = [(n, v) for n, v, d in rows if "count" not in d and not n.startswith("Cosine Norm: largest")]
    # the lesson's §二.1 picture: two classes of points before and after Z-Score
    clouds = data.make_classification(num_examples=200, num_class=2, deg_dispersion=(6.0, 2.0), loc=10.0, seed=0)
    pts = torch.cat([clouds.X_train, clouds.X_test]) * torch.tensor([3.0, 0.5])
    labels = torch.cat([clouds.y_train, clouds.y_test])
    scaled = torch.as_tensor(StandardScaler().fit_transform(pts))

    def cloud(X):
        return [records.series(f"class {k}", X[labels == k, 0], X[labels == k, 1]) for k in (0, 1)]

    return {
        "params": {"dtype": "float64", "threshold": tol, "data": "breast_cancer's training split; random tensors "
                   "from one seeded generator"},
        "checks": checks,
        "figures": [records.figure(
            "How far each identity is from exact, in float64 (log scale)",
            records.panel("bars", "max relative error", "", "error", logy=True,
                          labels=[next(v for k, v in _SHORT.items() if n.startswith(k)) for n, _ in measured],
                          values=[max(v, 1e-18) for _, v in measured],
                          refs=[{"y": tol, "label": f"the checks' threshold, {tol:g}"},
                                {"y": eps64, "label": f"float64's rounding unit, {eps64:.2g}"}]),
            caption="One bar per identity (an exact 0 is drawn at 1e-18). Bars near float64's rounding unit are "
                    "exact to the dtype; the counts (changed ranks, LayerNorm's buffers) and Cosine Norm's bound "
                    "are in the checks table."),
            records.figure(
                "A data set before and after Z-Score (cf. Lesson 14.1's scatter before and after normalizing)",
                records.panel("points", "raw: x₁ stretched ×3, x₂ squeezed ×0.5, both far from 0", "x₁", "x₂",
                              series=cloud(pts)),
                records.panel("points", "after Z-Score: each column mean 0, std 1", "x₁", "x₂", series=cloud(scaled)),
                caption="The same points: only the axes' numbers change (compare the tick labels); the two clouds "
                        "keep their shapes, their overlap and every point's place relative to the others.")],
    }


# ----------------------------------------------------------------------------- scaling-stats


def _accuracies(nets: list[nn.Module], X: torch.Tensor, y: torch.Tensor) -> list[float]:
    """Each network's accuracy on ``(X, y)`` in eval mode."""
    out = []
    for net in nets:
        with train.mode(net, False), torch.no_grad():
            out.append(float((net(X).argmax(1) == y).float().mean()))
    return out


@experiment(
    "scaling-stats",
    "Scaling statistics belong to the model: fitted on the training split, applied to the test split",
    source="Lesson 14.1 §一.2 (train on the training set, test on the test set)",
    claim="The statistics of a scaler are part of the model: computed on the training split and applied unchanged "
    "to any test data. A test batch standardized by its own statistics, or a single test example, is not what the "
    "model learned on, and costs accuracy.",
    seeds=(20, 50), epochs=(10, 30),
)
def _scaling_stats(cfg: Config) -> dict:
    epochs, seeds, batch = cfg.epochs, cfg.seeds, 8
    raw = data.load_dataset("breast_cancer", seed=0)
    split = raw.scaled("zscore")
    nets = [models.mlp(raw.num_features, 2, depth=2, width=16, activation="tanh", seed=seed) for seed in seeds]
    train.fit_seeds(nets, split, seeds, epochs=epochs, lr=0.05, batch_size=16, device=cfg.device,
                    progress=cfg.progress, description="scaling-stats")
    nets = [n.cpu() for n in nets]
    X, y = raw.X_test, raw.y_test
    n = len(X) - len(X) % batch

    def own(rows):  # standardized by their own statistics: a scaler fitted on them
        return torch.as_tensor(StandardScaler().fit_transform(rows), dtype=torch.float32)

    ways = {
        "training statistics": split.X_test,
        "the whole test split's statistics": own(X),
        f"each test batch of {batch} by its own": torch.cat([own(X[i : i + batch]) for i in range(0, n, batch)]),
        "each test example by its own": torch.cat([own(X[i : i + 1]) for i in range(len(X))]),
    }
    acc = {k: _accuracies(nets, v, y[: len(v)]) for k, v in ways.items()}
    single = ways["each test example by its own"]
    majority = float(torch.bincount(y).max()) / len(y)
    checks = [
        _check("accuracy", f"test accuracy, training statistics − each test batch of {batch} by its own",
                      _diff(acc["training statistics"][:], acc[f"each test batch of {batch} by its own"]), ">", 0.0),
        _check("accuracy", "test accuracy, training statistics − each test example by its own",
                      _diff(acc["training statistics"], acc["each test example by its own"]), ">", 0.0),
    ]
    means = {k: _mean(v) for k, v in acc.items()}
    return {
        "params": {"epochs": epochs, "random seeds": list(seeds), "data": "breast_cancer (30 raw features)",
                   "model": "tanh MLP 30-16-16-2 on Z-Score inputs (training statistics), lr 0.05"},
        "checks": checks,
        "notes": ["A single example has standard deviation 0 in every column: the scaler keeps the scale of a "
                  f"constant column at 1, so every feature becomes {float(single.abs().max()):g} and the network gives "
                  f"one answer for every example (the majority class is {majority:.3f} of the test split).",
                  "The whole test split's own statistics are close to the training ones (143 examples drawn from the "
                  "same population), so they cost little; small batches and single examples are where the statistics "
                  "must come from training."],
        "figures": [records.figure(
            "Test accuracy by where the scaling statistics come from (mean ± std over random seeds)",
            records.panel("bars", "test accuracy", "", "accuracy", labels=list(acc), values=list(means.values()),
                          errors=[_std(v) for v in acc.values()],
                          refs=[{"y": majority, "label": f"always the majority class, {majority:.3f}"}]),
            caption="The same trained networks, the same test examples; only the statistics that standardize them "
                    "change. If the claim holds, the first bar is the highest and the last two are lower.")],
        "tables": [records.table("Test accuracy (mean over random seeds)", ["statistics from", "test accuracy", "std"],
                                 [[k, means[k], _std(v)] for k, v in acc.items()])],
    }


# ----------------------------------------------------------------------------- label-scaling


@experiment(
    "label-scaling",
    "Standardized labels of a regression",
    source="Lesson 14.1 §一.2 (should the labels be standardized?)",
    claim="Standardizing the labels of a regression (and mapping the predictions back) does not change the "
    "model's test error in the labels' own units.",
    seeds=(20, 50), epochs=(20, 40),
)
def _label_scaling(cfg: Config) -> dict:
    epochs, seeds = cfg.epochs, cfg.seeds
    sets = {
        "the lesson's data": data.make_regression(num_examples=1000, num_inputs=2, degree=1, seed=0).scaled("zscore"),
        "diabetes": data.load_dataset("diabetes", seed=0).scaled("zscore"),
    }
    mse: dict[tuple[str, str], list[float]] = {}
    spreads = {}
    for name, split in sets.items():
        y_scaler = StandardScaler().fit(split.y_train)
        s = float(torch.as_tensor(y_scaler.scale_).reshape(()))
        spreads[name] = (float(split.y_train.mean()), s)
        scaled = dataclasses.replace(split, y_train=y_scaler.transform(split.y_train), y_test=y_scaler.transform(split.y_test))
        for labels, sp in (("raw", split), ("standardized", scaled)):
            nets = [models.mlp(split.num_features, 1, depth=2, width=16, activation="tanh", seed=seed) for seed in seeds]
            hs = train.fit_seeds(nets, sp, seeds, epochs=epochs, lr=0.01, batch_size=32, device=cfg.device,
                                 progress=cfg.progress, description=f"label-scaling {name} {labels}")
            # the standardized model's MSE in the labels' units: predictions mapped back by ×s + m
            mse[name, labels] = [h.test_loss[-1] * (s * s if labels == "standardized" else 1.0) for h in hs]
    checks = []
    for name in sets:
        ratio = _ratio(mse[name, "standardized"], mse[name, "raw"])
        checks += [records.check(f"{name}: test MSE in the labels' units, standardized / raw (no effect: below 1.05)",
                                 ratio, "<", 1.05, "no effect means a ratio within 0.95–1.05, both sides checked"),
                   records.check(f"{name}: test MSE in the labels' units, standardized / raw (no effect: above 0.95)",
                                 ratio, ">", 0.95)]
    return {
        "params": {"epochs": epochs, "random seeds": list(seeds), "optimizer": "SGD, lr 0.01, batch 32",
                   "model": "tanh MLP, 2 hidden layers of 16, Z-Score inputs",
                   "labels": {k: f"mean {m:.3g}, std {s:.3g}" for k, (m, s) in spreads.items()}},
        "checks": checks,
        "notes": ["Standardizing the labels divides the loss by their variance, and so the gradients by their standard "
                  "deviation: with the same learning rate the two runs take steps of different sizes. Where the labels "
                  "are near mean 0, std 1 (the lesson's data) nothing changes; where they are in the hundreds "
                  "(diabetes), raw labels make steps hundreds of times larger."],
        "figures": [records.figure(
            "Test MSE in the labels' own units, raw vs standardized labels (mean ± std over random seeds, log scale)",
            *[records.panel("bars", name, "", "test MSE", logy=True, labels=["raw", "standardized"],
                            values=[_mean(mse[name, k]) for k in ("raw", "standardized")],
                            errors=[_std(mse[name, k]) for k in ("raw", "standardized")]) for name in sets],
            caption="If the claim holds, the two bars of each panel are level.")],
        "tables": [records.table("Test MSE in the labels' units (mean over random seeds)", ["data", "raw labels",
                                 "standardized labels"], [[n, _mean(mse[n, "raw"]), _mean(mse[n, "standardized"])]
                                                          for n in sets])],
    }


# ----------------------------------------------------------------------------- bn-affine


@experiment(
    "bn-affine",
    "BN's stage 1 as a starting point, and the distribution BN learns",
    source="Lesson 14.1 §二.3 (benefit 1), §二.4",
    claim="Standardizing before the learnable scale and shift (BN) converges faster than the learnable scale and "
    "shift alone; and BN learns the distribution that suits the loss, not necessarily mean 0 and variance 1.",
    seeds=(20, 50), epochs=(10, 30),
)
def _bn_affine(cfg: Config) -> dict:
    epochs, seeds = cfg.epochs, cfg.seeds
    split = data.load_dataset("digits", seed=0).scaled("zscore")
    curves, nets_of = {}, {}
    for kind, norm in (("BN", "batch"), ("affine", "affine")):
        nets = [models.mlp(split.num_features, 10, depth=3, width=64, activation="sigmoid", norm=norm, seed=seed)
                for seed in seeds]
        hs = train.fit_seeds(nets, split, seeds, epochs=epochs, lr=0.3, batch_size=32, device=cfg.device,
                             drop_last=True, progress=cfg.progress, description=f"bn-affine {kind}")
        curves[kind], nets_of[kind] = [h.test_metric for h in hs], [n.cpu() for n in nets]
    quarter = max(1, epochs // 4)
    early = {k: [_mean(c[:quarter]) for c in v] for k, v in curves.items()}
    final = {k: [c[-1] for c in v] for k, v in curves.items()}
    moved, spread_off, gammas, betas, out_std = [], [], [], [], []
    for net in nets_of["BN"]:
        bns = [m for m in net.modules() if isinstance(m, nln._BatchNorm)]
        moved.append(_mean(float(((bn.weight.detach() - 1).abs() + bn.bias.detach().abs()).mean()) for bn in bns))
        seen = []
        hooks = [bn.register_forward_hook(lambda m, a, y: seen.append(y.detach())) for bn in bns]
        with train.mode(net, False), torch.no_grad():
            net(split.X_test)
        for h in hooks:
            h.remove()
        spread_off.append(_mean(float((t.std(0) - 1).abs().mean() + t.mean(0).abs().mean()) for t in seen))
        gammas.append(torch.cat([bn.weight.detach() for bn in bns]))
        betas.append(torch.cat([bn.bias.detach() for bn in bns]))
        out_std.append(torch.cat([t.std(0) for t in seen]))
    checks = [
        _check("accuracy", "test accuracy over the first quarter of training, BN − affine", _diff(early["BN"], early["affine"]),
                      ">", 0.0),
        _check("accuracy", "final test accuracy, BN − affine", _diff(final["BN"], final["affine"]), ">", 0.0),
        records.check("learned γ, β: mean |γ − 1| + |β| over BN's units", moved, ">", 0.05,
                      "0 would be Z-Score kept as it is (γ = 1, β = 0); above 0.05 BN moved away from it"),
        records.check("learned distribution: mean over BN's units of |std − 1| + |mean| of the output on the test set",
                      spread_off, ">", 0.05, "0 would be mean 0, variance 1 at every unit"),
    ]
    return {
        "params": {"epochs": epochs, "random seeds": list(seeds), "data": "digits (Z-Score)", "lr": 0.3,
                   "model": "sigmoid MLP 64-64-64-64-10; BN, or a learnable γ⊙x + β (Affine) before each sigmoid"},
        "checks": checks,
        "figures": [
            records.figure("Test accuracy, BN vs the learnable scale and shift alone (mean ± std over random seeds)",
                           _curves_panel("test accuracy", "accuracy", curves),
                           caption="Both have the same learnable γ and β per unit; BN standardizes first. If the "
                                   "claim holds, BN's curve rises sooner."),
            records.figure(f"What BN learned (random seed {seeds[0]}, all units of its 3 BN layers)",
                           records.panel("boxes", "learned parameters and the output's spread", "", "value",
                                         boxes=[records.box("γ", gammas[0]), records.box("β", betas[0]),
                                                records.box("std of BN's output", out_std[0])],
                                         refs=[{"y": 1.0, "label": "Z-Score's γ and std, 1"},
                                               {"y": 0.0, "label": "Z-Score's β, 0"}]),
                           caption="If BN only standardized, the boxes would sit on the lines at 1 (γ, std) and 0 (β)."),
        ],
        "tables": [records.table("Summary (mean over random seeds)", ["", "BN", "affine alone"],
                                 [["early test accuracy", _mean(early["BN"]), _mean(early["affine"])],
                                  ["final test accuracy", _mean(final["BN"]), _mean(final["affine"])]])],
    }


# ----------------------------------------------------------------------------- shuffle


@experiment(
    "shuffle",
    "Batches that differ from the data: sorted by class vs shuffled",
    source="the survey “Norm相关总结” (batch normalization: shuffle the data)",
    claim="BatchNorm needs batches distributed like the whole data: batches sorted by class make training harder "
    "than shuffled ones, and more so with BN than with LayerNorm, which does not look across the batch.",
    seeds=(20, 50), epochs=(5, 15),
)
def _shuffle(cfg: Config) -> dict:
    epochs, seeds = cfg.epochs, cfg.seeds
    split = data.load_dataset("digits", seed=0).scaled("zscore")
    order = torch.sort(split.y_train, stable=True).indices
    by_class = dataclasses.replace(split, X_train=split.X_train[order], y_train=split.y_train[order])
    acc, curves = {}, {}
    for norm in ("batch", "layer"):
        for shuffled in (True, False):
            nets = [models.mlp(split.num_features, 10, depth=3, width=64, activation="relu", norm=norm, seed=seed)
                    for seed in seeds]
            hs = train.fit_seeds(nets, by_class, seeds, epochs=epochs, lr=0.05, batch_size=32, device=cfg.device,
                                 drop_last=True, shuffle=shuffled, progress=cfg.progress,
                                 description=f"shuffle {norm} {'shuffled' if shuffled else 'sorted'}")
            key = (norm, "shuffled" if shuffled else "sorted")
            acc[key], curves[f"{norm.upper()[0]}N, {key[1]}"] = [h.test_metric[-1] for h in hs], [h.test_metric for h in hs]
    lost = {n: _diff(acc[n, "shuffled"], acc[n, "sorted"]) for n in ("batch", "layer")}
    checks = [
        _check("accuracy", "BN: test accuracy, shuffled − sorted batches", lost["batch"], ">", 0.0),
        _check("accuracy", "accuracy lost to sorted batches, BN − LN", _diff(lost["batch"], lost["layer"]), ">", 0.0,
                      f"BN loses {_mean(lost['batch']):.3f}, LN {_mean(lost['layer']):.3f} (means)", within=(-2, 2)),
    ]
    return {
        "params": {"epochs": epochs, "random seeds": list(seeds), "data": "digits (Z-Score), training split sorted by "
                   "class", "model": "ReLU MLP 64-64-64-64-10, BN or LN before each ReLU, lr 0.05, batch 32"},
        "checks": checks,
        "notes": ["Sorted, every batch holds one or two classes and the epoch ends on the last ones, which costs any "
                  "network something; LN, which normalizes each example alone, is the control that separates what "
                  "BN's batch statistics add. In eval BN uses running averages over those one-class batches."],
        "figures": [records.figure("Test accuracy per epoch, shuffled vs sorted batches (mean ± std over random seeds)",
                                   _curves_panel("test accuracy", "accuracy", curves),
                                   caption="If the claim holds, BN's sorted curve lies well below its shuffled one, "
                                           "and further below than LN's.")],
        "tables": [records.table("Final test accuracy (mean over random seeds)", ["norm", "shuffled", "sorted"],
                                 [[n.upper()[0] + "N", _mean(acc[n, "shuffled"]), _mean(acc[n, "sorted"])]
                                  for n in ("batch", "layer")])],
    }


# ----------------------------------------------------------------------------- learning-rate


class _AccuracyTrack:
    """Every member's test accuracy every ``every`` steps (eval mode, on the Stack itself)."""

    def __init__(self, X: torch.Tensor, y: torch.Tensor, every: int):
        self.X, self.y, self.every = X, y, every
        self.steps: list[int] = []
        self.accuracy: list[list[float]] = []  # [check][member]

    def __call__(self, step, stack, losses) -> None:
        if step % self.every:
            return
        with train.mode(stack, False), torch.no_grad():
            out = stack.split(stack(stack.spread(self.X)))
        self.steps.append(step)
        self.accuracy.append((out.argmax(2) == self.y[:, None]).float().mean(0).tolist())

    def steps_to(self, target: float) -> list[float]:
        """Per member, the first step at which the accuracy reached ``target``; one check past the
        last where it never did (a lower bound, so a ratio against it understates the gap)."""
        out = []
        for s in range(len(self.accuracy[0])):
            hit = [step for step, acc in zip(self.steps, self.accuracy) if acc[s] >= target]
            out.append(float(hit[0] if hit else self.steps[-1] + self.every))
        return out


def _step_seconds(nets: dict[str, nn.Module], split: data.Split, batch: int, reps: int) -> dict[str, list[float]]:
    """Seconds of one SGD step of each network on the same batch, ``reps`` rounds taken in turn
    (the order reversing each round), after a warm-up."""
    x, y = split.X_train[:batch], split.y_train[:batch]
    opts = {k: torch.optim.SGD(m.parameters(), lr=0.01) for k, m in nets.items()}
    loss = nn.CrossEntropyLoss()

    def step(k):
        opts[k].zero_grad(set_to_none=True)
        loss(nets[k](x), y).backward()
        opts[k].step()

    for k in nets:
        for _ in range(5):
            step(k)
    times: dict[str, list[float]] = {k: [] for k in nets}
    for r in range(reps):
        for k in (list(nets) if r % 2 == 0 else list(nets)[::-1]):
            t0 = time.perf_counter()
            step(k)
            times[k].append(time.perf_counter() - t0)
    return times


@experiment(
    "learning-rate",
    "BN and the learning rate: larger rates, fewer steps, less time",
    source="the survey “Norm相关总结” (batch normalization); Santurkar et al. (2018)",
    claim="BN smooths the loss surface: with BN training converges faster, larger learning rates do no harm, and "
    "although each step costs more, reaching a given accuracy takes less time.",
    seeds=(20, 50), epochs=(5, 15),
)
def _learning_rate(cfg: Config) -> dict:
    epochs, seeds, batch = cfg.epochs, cfg.seeds, 32
    rates = cfg.pick((0.1, 0.5, 2.0), (0.05, 0.1, 0.5, 1.0, 2.0, 5.0))
    mid, target = 0.5, 0.9
    split = data.load_dataset("digits", seed=0).scaled("zscore")
    every = max(1, len(split.X_train) // batch // 4)  # four times per epoch
    final: dict[tuple[str, float], list[float]] = {}
    tracks = {}
    for kind, norm in (("none", "none"), ("BN", "batch")):
        for lr in rates:
            nets = [models.mlp(split.num_features, 10, depth=3, width=64, activation="sigmoid", norm=norm, seed=seed)
                    for seed in seeds]
            track = _AccuracyTrack(split.X_test.to(cfg.device), split.y_test.to(cfg.device), every)
            hs = train.fit_seeds(nets, split, seeds, epochs=epochs, lr=lr, batch_size=batch, device=cfg.device,
                                 drop_last=True, on_step=track, progress=cfg.progress,
                                 description=f"learning-rate {kind} {lr}")
            final[kind, lr] = [h.test_metric[-1] if not h.diverged else 0.0 for h in hs]
            tracks[kind, lr] = track
    timing = _step_seconds({k: models.mlp(split.num_features, 10, depth=3, width=64, activation="sigmoid", norm=n,
                                          seed=0) for k, n in (("none", "none"), ("BN", "batch"))},
                           split, batch, reps=cfg.pick(40, 200))
    per_step = _ratio(timing["BN"], timing["none"])
    step_ratio = statistics.median(timing["BN"]) / statistics.median(timing["none"])
    reach = {k: tracks[k, mid].steps_to(target) for k in ("none", "BN")}
    big, small = max(rates), min(rates)
    checks = [
        _check("accuracy", f"final test accuracy at lr {big}, BN − none", _diff(final["BN", big], final["none", big]), ">",
                      0.0),
        records.check(f"BN: final test accuracy at lr {big} − at lr {small} (at most 2 points worse)",
                      _diff(final["BN", big], final["BN", small]), ">=", -0.02,
                      "a larger rate does no harm: it may cost at most 2 accuracy points", within=(-1, 1)),
        _check("ratio", f"steps to {target:.0%} test accuracy at lr {mid}, BN / none", _ratio(reach["BN"], reach["none"]),
                      "<", 1.0, f"BN {_mean(reach['BN']):.0f}, none {_mean(reach['none']):.0f} steps (means; a run that "
                      "never got there counts as one check past the end)"),
        records.check("time of one training step, BN / none", per_step, ">", 1.0,
                      f"{len(per_step)} steps of each, taken in turn on this machine (its load moves it); BN computes "
                      "more per step"),
        _check("ratio", f"time to {target:.0%} test accuracy at lr {mid}, BN / none",
                      [r * step_ratio for r in _ratio(reach["BN"], reach["none"])], "<", 1.0,
                      f"steps to the target × the median time of a step (BN's is {step_ratio:.2f}× none's)"),
    ]
    curves = {f"{k}, lr {lr}": [list(c) for c in zip(*tracks[k, lr].accuracy)] for k in ("none", "BN") for lr in rates}
    return {
        "params": {"epochs": epochs, "random seeds": list(seeds), "learning rates": list(rates), "batch_size": batch,
                   "data": "digits (Z-Score)", "model": "sigmoid MLP 64-64-64-64-10, torch's default init, BN before "
                   "each sigmoid"},
        "checks": checks,
        "notes": ["Santurkar et al. (2018) show the smoother loss surface directly (the loss and the gradient along "
                  "the gradient direction vary less with BN); here its consequences are measured: how large a rate BN "
                  "tolerates, how many steps and how much time it takes to a target accuracy.",
                  "Times are of this run on this machine and move with its load; the check compares steps taken in "
                  "turn, so both see the same load."],
        "figures": [
            records.figure("Final test accuracy against the learning rate (mean ± std over random seeds)",
                           records.panel("lines", "final test accuracy", "learning rate (log scale)", "accuracy",
                                         logx=True, series=[records.series(
                                             k, rates, [_mean(final[k, lr]) for lr in rates],
                                             [_mean(final[k, lr]) - _std(final[k, lr]) for lr in rates],
                                             [_mean(final[k, lr]) + _std(final[k, lr]) for lr in rates])
                                             for k in ("none", "BN")]),
                           records.panel("lines", f"test accuracy during training, lr {mid}", "step", "accuracy",
                                         series=[records.series(k, tracks[k, mid].steps,
                                                                *_mean_curve(curves[f"{k}, lr {mid}"]))
                                                 for k in ("none", "BN")],
                                         refs=[{"y": target, "label": f"the target, {target:.0%}"}]),
                           caption="Left: if the claim holds, BN's line stays high as the rate grows while the "
                                   "network without BN falls or never rises. Right: the steps each needs to reach the "
                                   "target accuracy."),
        ],
        "tables": [records.table("Final test accuracy (mean over random seeds)", ["", *[f"lr {lr}" for lr in rates]],
                                 [[k, *[_mean(final[k, lr]) for lr in rates]] for k in ("none", "BN")]),
                   records.table("Cost (this machine, this run)", ["", "median ms per step",
                                                                   f"mean steps to {target:.0%} at lr {mid}"],
                                 [[k, 1e3 * statistics.median(timing[k]), _mean(reach[k])] for k in ("none", "BN")])],
    }


# ----------------------------------------------------------------------------- ics


def _loss_of(stack, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The members' summed cross-entropy on one batch (each member's gradient is its own)."""
    out = stack.split(stack(x))
    return nn.functional.cross_entropy(out.flatten(0, 1), y.repeat_interleave(stack.size), reduction="sum") / len(x)


class _ShiftProbe:
    """Internal covariate shift as Santurkar et al. (2018, §2.2) measure it, for every member: the
    gradient G_i of layer i's weights on a batch, and G'_i, the same gradient after every layer
    below i took its SGD step (all its parameters, lr·gradient) on that batch; ICS_i = ‖G_i − G'_i‖ /
    ‖G_i‖ (relative, so that networks whose gradients differ in scale compare) and cos(G_i, G'_i),
    averaged over the weight layers above the first. Measured every ``every`` steps on copies of
    the Stack's layers in train mode; the Stack itself is not touched."""

    def __init__(self, X: torch.Tensor, y: torch.Tensor, lr: float, every: int):
        self.X, self.y, self.lr, self.every = X, y, lr, every
        self.shift: list[list[float]] = []  # [probe][member]
        self.cosine: list[list[float]] = []

    def _grads(self, stack, layers) -> list[tuple[torch.Tensor, ...]]:
        body = copy.copy(stack)  # the same Stack, computing with these layers
        body.layers = layers
        params = [tuple(layer.parameters()) for layer in layers]
        flat = torch.autograd.grad(_loss_of(body, stack.spread(self.X), self.y), [p for ps in params for p in ps])
        out, k = [], 0
        for ps in params:
            out.append(flat[k: k + len(ps)])
            k += len(ps)
        return out

    def __call__(self, step, stack, losses) -> None:
        if step % self.every:
            return
        layers = copy.deepcopy(stack.layers).train()  # BN normalizes the probe batch by itself
        grads = self._grads(stack, layers)
        weighted = [i for i, layer in enumerate(layers) if hasattr(layer, "direction")]
        shifts, cosines = [], []
        for i in weighted[1:]:
            moved = copy.deepcopy(layers)
            with torch.no_grad():
                for j in range(i):  # every layer below i steps
                    for p, gp in zip(moved[j].parameters(), grads[j]):
                        p.sub_(self.lr * gp)
            w = next(k for k, p in enumerate(layers[i].parameters()) if p is layers[i].direction())
            g1, g2 = grads[i][w].flatten(1), self._grads(stack, moved)[i][w].flatten(1)
            shifts.append((g1 - g2).norm(dim=1) / g1.norm(dim=1).clamp_min(1e-30))
            cosines.append(nn.functional.cosine_similarity(g1, g2, dim=1))
        self.shift.append(torch.stack(shifts).mean(0).tolist())
        self.cosine.append(torch.stack(cosines).mean(0).tolist())


@experiment(
    "ics",
    "Internal covariate shift, measured: with and without BN",
    source="Lesson 14.1 §二.4; the survey “Norm相关总结” (batch normalization); Santurkar et al. (2018), §2.2",
    claim="BN's benefit does not come from reducing internal covariate shift: measured as the change of a layer's "
    "gradient when the layers below it update, BN does not reduce it, and may even increase it.",
    seeds=(20, 50), epochs=(3, 10),
)
def _ics(cfg: Config) -> dict:
    epochs, seeds, batch, lr = cfg.epochs, cfg.seeds, 32, 0.1
    split = data.load_dataset("digits", seed=0).scaled("zscore")
    every = max(1, len(split.X_train) // batch // 2)  # twice per epoch
    g = torch.Generator().manual_seed(1)
    pick = torch.randperm(len(split.X_train), generator=g)[:256]
    inits = {"default": "torch's default init", "kaiming": "He (Kaiming) init"}
    shift, cosine, acc, curves = {}, {}, {}, {}
    for init in inits:
        for kind, norm in (("none", "none"), ("BN", "batch")):
            nets = [models.mlp(split.num_features, 10, depth=4, width=64, activation="relu", init=init, norm=norm,
                               seed=seed) for seed in seeds]
            probe = _ShiftProbe(split.X_train[pick].to(cfg.device), split.y_train[pick].to(cfg.device), lr, every)
            hs = train.fit_seeds(nets, split, seeds, epochs=epochs, lr=lr, batch_size=batch, device=cfg.device,
                                 drop_last=True, on_step=probe, progress=cfg.progress, description=f"ics {init} {kind}")
            key = (init, kind)
            shift[key] = [_mean(v) for v in zip(*probe.shift)]  # per member: mean over the probes
            curves[key] = [list(v) for v in zip(*probe.shift)]  # [member][probe]
            cosine[key] = [_mean(v) for v in zip(*probe.cosine)]
            acc[key] = [h.test_metric[-1] for h in hs]
    ratio = {i: _ratio(shift[i, "BN"], shift[i, "none"]) for i in inits}
    gain = {i: _diff(acc[i, "BN"], acc[i, "none"]) for i in inits}
    checks = [
        records.check("default init: internal covariate shift ‖G − G'‖/‖G‖, BN / none (not reduced: above 0.95)",
                      ratio["default"], ">", 0.95,
                      f"BN {_mean(shift['default', 'BN']):.4g}, none {_mean(shift['default', 'none']):.4g} (means over "
                      "layers, probes and random seeds); below 0.95 would mean BN reduced it by more than 5%"),
        _check("accuracy", "default init: final test accuracy, BN − none (BN helps all the same)", gain["default"], ">", 0.0),
    ]
    k_ratio, k_gain = _mean(ratio["kaiming"]), _mean(gain["kaiming"])
    return {
        "params": {"epochs": epochs, "random seeds": list(seeds), "lr": lr, "batch_size": batch,
                   "probe": f"256 training examples, every {every} steps", "data": "digits (Z-Score)",
                   "model": "ReLU MLP 64-64×4-10, BN before each ReLU; torch's default init, and He init"},
        "checks": checks,
        "notes": ["Santurkar et al. measure ICS on VGG and deep linear networks and find it no smaller, often larger, "
                  "with BN, while BN trains much better; they conclude that BN helps by smoothing the loss landscape "
                  "(see learning-rate). The same measure here, on a small MLP, in two settings.",
                  "With torch's default init the network without BN barely trains and BN rescues it, with "
                  f"{_mean(ratio['default']):.2f}× its shift (the checks). With He init both train; there BN changes the "
                  f"shift by {k_ratio:.2f}× and the accuracy by {k_gain:+.3f}. In neither setting does a smaller shift "
                  "go with BN's benefit: where BN helps, the shift is larger; where it is smaller, BN does not help."],
        "figures": [records.figure(
            "Internal covariate shift during training (mean ± std over random seeds)",
            *[records.panel("lines", f"{label}: ‖G − G'‖ / ‖G‖, mean over layers", "step",
                            "relative change of the gradient",
                            series=[records.series(k, [every * (j + 1) for j in range(len(curves[i, k][0]))],
                                                   *_mean_curve(curves[i, k])) for k in ("none", "BN")])
              for i, label in inits.items()],
            caption="How much a layer's gradient changes when the layers below it take their step, with and without "
                    "BN. If the claim holds, BN's benefit does not come with a lower line.")],
        "tables": [records.table("Summary (mean over random seeds)", ["init", "", "‖G − G'‖ / ‖G‖", "cos(G, G')",
                                                                      "final test accuracy"],
                                 [[i, k, _mean(shift[i, k]), _mean(cosine[i, k]), _mean(acc[i, k])]
                                  for i in inits for k in ("none", "BN")])],
    }


# ----------------------------------------------------------------------------- sequences


class _SentenceNet(nn.Module):
    """Tokens → embedding → Linear → norm → ReLU → mean over the sentence's own tokens → class.

    ``norm``: ``"LN"`` each token over its features (LayerNorm); ``"BN per position"`` BatchNorm1d
    over the flattened (position, feature) vector, each position a feature across the batch, as the
    survey's example (the first words of two sentences normalized together); ``"BN over tokens"``
    BatchNorm1d per feature over the batch and every position, as a convolutional text model would.
    Padding positions are in the tensor the norm sees, as they are in a padded batch; the pooling
    leaves them out.
    """

    def __init__(self, norm: str, vocab: int, length: int, width: int = 32, seed: int = 0):
        super().__init__()
        with models._seeded(seed):
            self.embed = nn.Embedding(vocab, width, padding_idx=0)
            self.linear = nn.Linear(width, width)
            self.norm_kind = norm
            self.norm = {"LN": lambda: nln.LayerNorm(width), "BN per position": lambda: nln.BatchNorm1d(length * width),
                         "BN over tokens": lambda: nln.BatchNorm1d(width)}[norm]()
            self.head = nn.Linear(width, 2)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.linear(self.embed(tokens))  # (N, L, C)
        if self.norm_kind == "LN":
            h = self.norm(h)
        elif self.norm_kind == "BN per position":
            h = self.norm(h.flatten(1)).view_as(h)
        else:
            h = self.norm(h.transpose(1, 2)).transpose(1, 2)
        mask = (tokens != 0).unsqueeze(-1).to(h.dtype)
        return self.head((torch.relu(h) * mask).sum(1) / mask.sum(1))


@experiment(
    "sequences",
    "Sentences of different lengths: BatchNorm vs LayerNorm",
    source="the survey “Norm相关总结” (layer normalization)",
    claim="BN suits images and tabular features, not sentences of different lengths: on padded sentences a model "
    "with LN, which normalizes each token alone, does better than one with BN, whose batch statistics mix words "
    "that stand at the same position in different sentences, and padding.",
    seeds=(20, 50), epochs=(4, 12),
)
def _sequences(cfg: Config) -> dict:
    epochs, seeds = cfg.epochs, cfg.seeds
    # long and short sentences (1 to 40 words); a large test split, as evaluating costs little
    split = data.make_sentences(num_examples=cfg.pick(3600, 8000), lengths=(1, 40), test_size=0.55, seed=0)
    vocab, length = 20, split.X_train.shape[1]
    kinds = ("LN", "BN per position", "BN over tokens")
    curves, final = {}, {}
    for kind in kinds:  # a model the Stack does not know: fit_seeds trains the seeds one by one
        nets = [_SentenceNet(kind, vocab, length, seed=seed) for seed in seeds]
        hs = train.fit_seeds(nets, split, seeds, epochs=epochs, lr=0.05, batch_size=64, device=cfg.device,
                             drop_last=True, optimizer="adam", progress=cfg.progress, description=f"sequences {kind}")
        curves[kind] = [h.test_metric for h in hs]
        final[kind] = [c[-1] for c in curves[kind]]
    checks = [_check("accuracy", f"final test accuracy, LN − {k}", _diff(final["LN"], final[k]), ">", 0.0)
              for k in kinds[1:]]
    lengths = (split.X_train != 0).sum(1).float()
    return {
        "params": {"epochs": epochs, "random seeds": list(seeds), "data": split.name,
                   "sentence lengths": f"{int(lengths.min())}–{int(lengths.max())}, padded to {length}",
                   "model": "embedding 32 → Linear → norm → ReLU → mean over the sentence → Linear, Adam lr 0.05, batch 64"},
        "checks": checks,
        "notes": ["The label is a question about the whole sentence (more words from the lower half of the vocabulary "
                  "than from the upper), so a word counts the same wherever it stands. BN per position normalizes "
                  "the k-th words of the batch's sentences together — and, past a short sentence's end, its padding."],
        "figures": [records.figure("Test accuracy per epoch on padded sentences (mean ± std over random seeds)",
                                   _curves_panel("test accuracy", "accuracy", curves),
                                   caption="If the claim holds, LN's curve lies above both BN curves.")],
        "tables": [records.table("Final test accuracy (mean over random seeds)", ["norm", "test accuracy", "std"],
                                 [[k, _mean(final[k]), _std(final[k])] for k in kinds])],
    }


# ----------------------------------------------------------------------------- train-eval


def _population_stats(model: nn.Module, X: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Exact mean and unbiased variance of every BN layer's input over ``X``, as the layer sees it
    in eval mode (upstream layers normalizing with their running statistics): the statistics its
    running estimates should match for eval to be exact. Nothing is updated."""
    bns = [m for m in model.modules() if isinstance(m, nln._BatchNorm)]
    seen: list[list[torch.Tensor]] = [[] for _ in bns]
    handles = [bn.register_forward_pre_hook(lambda m, a, i=i: seen[i].append(a[0].detach())) for i, bn in enumerate(bns)]
    with train.mode(model, False), torch.no_grad():
        model(X)
    for h in handles:
        h.remove()
    return [(torch.cat(s).mean(0), torch.cat(s).var(0)) for s in seen]


@experiment(
    "train-eval",
    "BatchNorm in training vs testing: running vs batch statistics",
    source="Lesson 14.1 §2.3 (BN in training and testing)",
    claim="At test time BN must use its running statistics (model.eval()): forgetting eval() normalizes each test "
    "batch by its own statistics, which costs accuracy on small test batches and overwrites the running "
    "statistics; the momentum sets how closely the running statistics track the population.",
    seeds=(20, 50), epochs=(5, 20),
)
def _train_eval(cfg: Config) -> dict:
    epochs, seeds = cfg.epochs, cfg.seeds
    split = data.load_dataset("digits", seed=0).scaled("zscore")
    momenta = (0.01, 0.1, 0.5, None)
    test_batches = (4, 16, len(split.X_test))
    acc_rows, mom_rows = {}, {}
    drift = []
    trained = {}
    for momentum in momenta:  # every random seed at once
        nets = [models.mlp(split.num_features, 10, depth=3, width=64, activation="relu", norm="batch", seed=seed)
                for seed in seeds]
        for m in (m for net in nets for m in net.modules()):
            if isinstance(m, nln._BatchNorm):
                m.momentum = momentum
        train.fit_seeds(nets, split, seeds, epochs=epochs, lr=0.05, batch_size=32, device=cfg.device, drop_last=True,
                        progress=cfg.progress, description=f"train-eval momentum {momentum}")
        trained[momentum] = [net.cpu() for net in nets]
    for s in range(len(seeds)):
        for momentum in momenta:
            model = trained[momentum][s]
            pop = _population_stats(model, split.X_train)
            bns = [m for m in model.modules() if isinstance(m, nln._BatchNorm)]
            err = _mean(float(((bn.running_mean - pm).square().sum() / pv.sum()).sqrt()) for bn, (pm, pv) in zip(bns, pop))
            mom_rows.setdefault(momentum, []).append((err, _accuracy(model, split, None)))
            if momentum == 0.1:
                acc_rows.setdefault("eval()", []).append([_accuracy(model, split, None)] * len(test_batches))
                before = [bn.running_mean.clone() for bn in bns]
                acc_rows.setdefault("forgot eval()", []).append([_accuracy(model, split, b, train_mode=True) for b in test_batches])
                drift.append(_mean(float((bn.running_mean - b).norm() / b.norm()) for bn, b in zip(bns, before)))
    acc = {k: [_mean(r[i] for r in v) for i in range(len(test_batches))] for k, v in acc_rows.items()}
    mom = {m: (_mean(e for e, _ in v), _mean(a for _, a in v)) for m, v in mom_rows.items()}
    checks = [
        _check("accuracy", f"test accuracy with batches of {test_batches[0]}, eval() − forgot eval()",
                      _diff([r[0] for r in acc_rows["eval()"]], [r[0] for r in acc_rows["forgot eval()"]]), ">", 0.0),
        _check("ratio", "running-mean error vs population, momentum 0.1 / momentum 0.5",
                      _ratio([e for e, _ in mom_rows[0.1]], [e for e, _ in mom_rows[0.5]]), "<", 1.0,
                      "error = ‖running_mean − population mean‖ / √(Σ population variance), averaged over BN layers"),
        records.check("forgetting eval(): relative change of running_mean after the test passes", drift, ">", 0.01,
                      "‖running_mean after − before‖ / ‖before‖, averaged over BN layers: the test data written into "
                      "the model (more than 1%)"),
    ]
    labels = ["0.01", "0.1", "0.5", "None (cumulative)"]
    return {
        "params": {"epochs": epochs, "random seeds": list(seeds), "momenta": labels, "test_batch_sizes": list(test_batches),
                   "model": "ReLU MLP 64-64-64-64-10 with BN, lr 0.05", "data": "digits (Z-Score)"},
        "checks": checks,
        "figures": [records.figure(
            "BatchNorm at test time: running statistics (eval) vs the test batch's own (train mode)",
            records.panel("lines", "test accuracy by test batch size", "test batch size (log scale)", "accuracy",
                          logx=True, series=[records.series(k, test_batches, v) for k, v in acc.items()]),
            records.panel("bars", "running mean's distance to the population mean", "momentum", "relative error",
                          labels=labels, values=[mom[m][0] for m in momenta]),
            caption="Left: in eval the accuracy is the same for any test batch size; forgetting model.eval() "
                    "normalizes each test batch by itself, which the claim says costs accuracy at small batches. "
                    "Right: how far each momentum's running mean ends from the mean of the whole training set, "
                    "computed with the final weights (lower is nearer). A small momentum (0.01) or the cumulative "
                    "average (None) still remembers the layer inputs of early training, when the weights were "
                    "different; a large one (0.5) follows the last few batches and is noisy.",
        )],
        "tables": [
            records.table("Test accuracy (momentum 0.1)", ["mode", *[f"batch {b}" for b in test_batches]], [[k, *v] for k, v in acc.items()]),
            records.table("Forgetting eval() writes the test data into the model",
                          ["relative change of running_mean after the test passes in train mode"], [[_mean(drift)]]),
            records.table("Effect of momentum", ["momentum", "running-mean error", "test accuracy (eval)"],
                          [[lab, *mom[m]] for lab, m in zip(labels, momenta)]),
        ],
    }


def _accuracy(model: nn.Module, split: data.Split, batch_size: int | None, train_mode: bool = False) -> float:
    """Test accuracy, in eval mode or (the mistake) in train mode with test batches of ``batch_size``."""
    correct = 0
    with train.mode(model, train_mode), torch.no_grad():
        for xb, yb in data.batches(split.X_test, split.y_test, batch_size or len(split.X_test), drop_last=train_mode):
            correct += int((model(xb).argmax(1) == yb).sum())
    n = len(split.X_test)
    return correct / (n - n % batch_size if train_mode and batch_size else n)


TOUR = tuple(EXPERIMENTS)
