r"""Measure the Glorot condition of a network: per-layer activation and gradient variance.

**The Glorot condition** (Glorot & Bengio, "Understanding the difficulty of training deep
feedforward neural networks", AISTATS 2010; Lesson 14.1 §3.2). A deep network learns steadily when

* *forward*: the data keep their variance as they flow through each layer — a layer's input and
  output have the same variance;
* *backward*: the gradient keeps its variance as it flows back through each layer — the
  gradient has the same variance before and after the layer.

For a linear layer with ``n_in`` inputs, ``n_out`` outputs and weights of variance ``Var[W]``,
the forward pass multiplies the variance by ``n_in·Var[W]`` and the backward pass by
``n_out·Var[W]``; Xavier (Glorot) initialization picks the compromise
``Var[W] = 2 / (n_in + n_out)``. torch's default ``Linear`` init has ``Var[W] = 1/(3·n_in)``,
so in a deep tanh MLP the signal shrinks by about 3× per layer on the way up and the gradient by
about 3× per layer on the way down. Initialization only fixes the start: once training moves the
weights the condition drifts, which is what normalization layers repair (Lesson 14.1 §3.2, §4).

:class:`GlorotMonitor` makes the condition measurable. It hooks every *layer* (by default each
submodule that owns a weight matrix: ``nn.Linear``, ``nn.Conv*d``, :class:`normlab.nn.CosineLinear`,
weight-normed modules, any module with a ``weight`` Parameter of ndim ≥ 2) and records, over all
forward/backward passes since the last :meth:`~GlorotMonitor.reset`:

============================  ==================================================================
``forward_mean``/``_var``     mean and variance of the layer's output, ``y``
``backward_var``              variance of ``∂L/∂y``, the gradient arriving at the layer's output
``weight_grad_var``           variance of ``∂L/∂W`` as it sits in ``.grad`` now (what the optimizer
                              steps on; the lesson's per-layer gradient box plots)
``activation_var``            variance of the output of the activation module following the layer
``saturation``                fraction of those activations in the flat part of the non-linearity
                              (tanh/sigmoid/hardtanh) or exactly 0 (ReLU: dead units)
============================  ==================================================================

Every statistic pools *all elements* of a tensor (batch, features, positions) as samples of one
scalar variable, as the lesson's box plots do, and every variance is unbiased (divisor
``count − 1``, ``torch.var``'s default). Statistics are merged with :class:`normlab.stats.Moments`
(Chan et al.), in float64 (float32 on devices without float64), so many batches accumulate
exactly. :meth:`~GlorotMonitor.summary` condenses the table of the *hidden* layers (the output
layer is named apart) into end-to-end and per-layer ratios and two spreads: the condition holds
when the per-layer ratios are near 1 and the spreads near 0. An activation is reported with the
layer whose output it receives (directly, or through normalization, dropout or identity modules,
listed in ``activation_via``), so a shared ``nn.ReLU`` or a norm in between pairs correctly.

``DEFAULT_ACTIVATIONS`` (a tuple) lists the activation types watched when ``activations=None``:
Sigmoid, Tanh, ReLU, LeakyReLU, ELU, GELU, SiLU, Softplus, Hardtanh and Mish of ``torch.nn``, and
their subclasses (``nn.ReLU6`` is a Hardtanh). It decides which modules' outputs fill
``activation_var`` and ``saturation``; saturation is defined for Tanh, Sigmoid, Hardtanh and ReLU,
and is NaN for the others. To watch other activations, pass ``activations=`` a sequence of types
(and/or module names), e.g. ``(*DEFAULT_ACTIVATIONS, MyActivation)``.

>>> import torch
>>> from torch import nn
>>> from normlab.diagnostics import GlorotMonitor
>>> _ = torch.manual_seed(0)
>>> model = nn.Sequential(*[m for _ in range(4) for m in (nn.Linear(64, 64), nn.Tanh())])
>>> with GlorotMonitor(model) as mon:          # hooks are removed on exit
...     model(torch.randn(256, 64)).square().mean().backward()
>>> [(r["name"], r["activation"]) for r in mon.stats()]
[('0', 'Tanh'), ('2', 'Tanh'), ('4', 'Tanh'), ('6', 'Tanh')]
>>> s = mon.summary()
>>> s["hidden_layers"], s["output_layer"]
(['0', '2', '4'], '6')
>>> 0.2 < s["forward_per_layer"] < 0.6    # default init: the signal shrinks ~1/3 per layer going up
True
>>> 0.2 < s["backward_per_layer"] < 0.6   # ... and the gradient likewise going down (vanishes)
True
>>> len(model[0]._forward_hooks)
0
"""

from __future__ import annotations

import collections
import math
import weakref
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from normlab.stats import Moments

__all__ = ["GlorotMonitor", "DEFAULT_ACTIVATIONS"]

#: Module types whose outputs count as activations when ``activations=None``.
DEFAULT_ACTIVATIONS: tuple[type, ...] = (
    nn.Sigmoid,
    nn.Tanh,
    nn.ReLU,
    nn.LeakyReLU,
    nn.ELU,
    nn.GELU,
    nn.SiLU,
    nn.Softplus,
    nn.Hardtanh,
    nn.Mish,
)

# every variance reported: torch.var's default divisor, count - 1
_CORRECTION = 1
_NAN = float("nan")


def _pass_through() -> tuple[type, ...]:
    """Modules between a layer and its activation that keep the pairing (conv → BN → ReLU):
    torch's and normlab's norms (normlab.nn's subclass torch.nn's, BatchRenorm aside), dropout, identity."""
    from normlab import nn as nln

    return (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.modules.dropout._DropoutNd,
            nn.Identity, nln._NormBase)


_ORIGINS_KEPT = 4096  # live outputs remembered (weakly) for pairing an activation with its layer


# ------------------------------------------------------------------------------ helpers
def _weight_source(module: nn.Module) -> Tensor | None:
    """The parameter behind ``module.weight``, found without computing ``weight``.

    A plain ``weight`` Parameter; for a weight-normed module (normlab's or torch's
    parametrization) the direction ``v`` = ``parametrizations.weight.original1``, or
    ``.original`` for a single-tensor parametrization; ``weight_v`` for the deprecated hook form
    of ``torch.nn.utils.weight_norm``. ``hasattr(module, "weight")`` is avoided on purpose: on a
    parametrized module it runs the parametrization.
    """
    p = module._parameters.get("weight")
    if p is not None:
        return p
    wn = module._modules.get("parametrizations")
    holder = wn._modules.get("weight") if wn is not None else None
    if holder is not None:
        for key in ("original1", "original"):
            t = holder._parameters.get(key)
            if t is not None:
                return t
    return module._parameters.get("weight_v")


def _owns_weight_matrix(module: nn.Module) -> bool:
    w = _weight_source(module)
    return w is not None and w.is_floating_point() and w.dim() >= 2


def _is_default_activation(module: nn.Module) -> bool:
    return isinstance(module, DEFAULT_ACTIVATIONS)


def _saturated(module: nn.Module, y: Tensor, s: float) -> Tensor | None:
    """Boolean mask of saturated outputs, or None where saturation does not apply."""
    if isinstance(module, nn.Hardtanh):
        # the outer (1 - s) of each half range; [-1, 1] (the default) gives |y| >= s, as tanh.
        # ReLU6 is a Hardtanh on [0, 6]: both flat ends count.
        slack = (1 - s) * (module.max_val - module.min_val) / 2
        return (y <= module.min_val + slack) | (y >= module.max_val - slack)
    if isinstance(module, nn.Tanh):
        return y.abs() >= s
    if isinstance(module, nn.Sigmoid):
        return (y <= 1 - s) | (y >= s)
    if isinstance(module, nn.ReLU):
        return y == 0  # dead: zero output, zero gradient
    return None


def _first_float_tensor(output) -> Tensor | None:
    if isinstance(output, Tensor):
        return output if output.is_floating_point() else None
    if isinstance(output, (tuple, list)):
        for t in output:
            if isinstance(t, Tensor) and t.is_floating_point():
                return t
    return None


def _whole(t: Tensor) -> Moments:
    """Moments of every element of ``t`` as samples of one variable, ready to merge."""
    m = Moments.from_data(t.detach(), tuple(range(t.dim())))
    # float64 so that thousands of merged batches stay exact; MPS has no float64
    return m.to(torch.float32 if t.device.type == "mps" else torch.float64)


def _merge(acc: Moments | None, new: Moments) -> Moments:
    return new if acc is None else acc + new


def _var(m: Moments | None) -> float:
    return _NAN if m is None else float(m.var(_CORRECTION))


def _mean(m: Moments | None) -> float:
    return _NAN if m is None or float(m.count) == 0 else float(m.mean)


def _ratio(num: float, den: float) -> float:
    if math.isnan(num) or math.isnan(den):
        return _NAN
    if den == 0:
        return _NAN if num == 0 else math.inf
    return num / den


def _log_spread(values: list[float]) -> float:
    logs = [math.log10(v) if v > 0 else -math.inf for v in values if not math.isnan(v)]
    return max(logs) - min(logs) if logs else _NAN


def _show(names: list[str], limit: int = 30) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return f"[{shown}{', ...' if len(names) > limit else ''}]"


def _select(
    named: list[tuple[str, nn.Module]],
    spec,
    default: Callable[[nn.Module], bool],
    what: str,
) -> list[str]:
    """Names (in ``named_modules()`` order) chosen by ``spec``: None (``default``), or names
    and/or module types."""
    if spec is None:
        return [n for n, m in named if default(m)]
    items = [spec] if isinstance(spec, (str, type)) else list(spec)
    names = {n for n, _ in named}
    wanted, types = set(), []
    for item in items:
        if isinstance(item, str):
            if item not in names:
                raise ValueError(
                    f"GlorotMonitor: no submodule named {item!r} for {what}=; valid names "
                    f"(from model.named_modules()): {_show([n for n, _ in named])}"
                )
            wanted.add(item)
        elif isinstance(item, type) and issubclass(item, nn.Module):
            types.append(item)
        else:
            raise TypeError(
                f"GlorotMonitor: {what}= takes module names (str) or nn.Module subclasses, "
                f"got {item!r} of type {type(item).__name__}"
            )
    return [n for n, m in named if n in wanted or (types and isinstance(m, tuple(types)))]


@dataclass
class _Record:
    forward: Moments | None = None
    backward: Moments | None = None
    saturated: Moments | None = None  # Moments of the 0/1 mask: its mean is the fraction
    calls: int = 0

    def clear(self) -> None:
        self.forward = self.backward = self.saturated = None
        self.calls = 0


# ------------------------------------------------------------------------------ monitor
class GlorotMonitor:
    r"""Record, per layer, the variance of outputs, of output gradients and of weight gradients.

    A monitor of the Glorot condition (Glorot & Bengio 2010, "Understanding the difficulty of
    training deep feedforward neural networks"; Lesson 14.1 §3.2): a deep network learns steadily
    when each layer keeps the variance of the data on the way forward and of the gradient on the
    way back,

    .. math::

        \mathrm{Var}[y_l] = \mathrm{Var}[y_{l-1}], \qquad
        \mathrm{Var}\Big[\frac{\partial L}{\partial y_{l-1}}\Big]
        = \mathrm{Var}\Big[\frac{\partial L}{\partial y_l}\Big],

    which for a linear layer means ``n_in·Var[W] = 1`` and ``n_out·Var[W] = 1``, hence Xavier's
    compromise ``Var[W] = 2 / (n_in + n_out)``. :meth:`summary` says how far a network is from it.

    Args:
        model (nn.Module): the network to watch. Nothing in it is changed; hooks are added and
            :meth:`remove` takes them all away again.
        layers (str, type or sequence of them, optional): which submodules are layers. ``None``:
            every submodule that owns a floating-point weight matrix (``weight`` Parameter with
            ndim ≥ 2, or the ``v`` of a weight-normed ``weight``). Otherwise names as in
            ``model.named_modules()`` and/or module types, e.g. ``["0", "fc.2"]`` or
            ``[nn.Linear, nn.LayerNorm]``. Layers are always ordered as ``named_modules()`` lists
            them (registration order): "first" and "last" below refer to that order.
            Default: ``None``.
        activations (str, type or sequence of them, optional): which submodules are
            activations, in the same forms. ``None``: every instance of ``DEFAULT_ACTIVATIONS``
            (see the module docstring). An activation is reported with the layer whose output it
            receives, directly or through normalization, dropout and identity modules (their
            class names in ``activation_via``); one that receives anything else (a residual sum,
            the model's input) is reported with no layer. Default: ``None``.
        saturation (float): threshold ``s`` in (0, 1) for ``stats()["saturation"]``: the
            fraction of outputs with ``|y| ≥ s`` for Tanh (Hardtanh: within ``(1 − s)`` of a
            bound, in units of the half range), ``y ≤ 1 − s`` or ``y ≥ s`` for Sigmoid,
            ``y == 0`` (dead) for ReLU; NaN for the other activations, which have no flat region
            in that sense. Default: ``0.99``.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, or ``layers``/``activations`` holds
            something that is neither a name nor an ``nn.Module`` subclass.
        ValueError: ``saturation`` is not in (0, 1), a name is not a submodule of ``model``, or
            no layer was found.

    What is recorded (all accumulated until :meth:`reset`):

    * every forward call of a layer — also under ``torch.no_grad()`` — adds its output to
      ``forward_mean``/``forward_var`` and counts in ``calls``;
    * when that output requires grad, a hook on the output *tensor* adds ``∂L/∂y`` to
      ``backward_var`` once the backward pass reaches it (a tensor hook rather than a module
      full-backward hook: it also works when an in-place op such as ``ReLU(inplace=True)``
      follows, and reports the gradient of the layer's own output);
    * ``weight_grad_var`` is read from ``.grad`` when :meth:`stats` is called.

    Hooks never change outputs or gradients. A module applied several times per forward (one
    shared ``nn.Tanh()`` instance, say) pools all its calls; activations called as functions
    (``torch.tanh``) are invisible to module hooks. Used as a context manager, the monitor
    removes its hooks on exit. Typical use::

        with GlorotMonitor(model) as mon:
            for x, y in loader:
                loss_fn(model(x), y).backward()
        print(mon.summary())

    Example::

        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
        >>> with GlorotMonitor(model) as mon:
        ...     model(torch.randn(32, 8)).square().mean().backward()
        >>> [(r["name"], r["type"], r.get("activation"), r["calls"]) for r in mon.stats()]
        [('0', 'Linear', 'ReLU', 1), ('2', 'Linear', None, 1)]
        >>> mon.layers, mon.summary()["output_layer"]
        (['0', '2'], '2')
        >>> 0 <= mon.stats()[0]["saturation"] <= 1     # the fraction of dead ReLU outputs
        True
        >>> len(model[0]._forward_hooks)               # hooks removed on exit
        0
    """

    def __init__(self, model: nn.Module, layers=None, activations=None, saturation: float = 0.99):
        if not isinstance(model, nn.Module):
            raise TypeError(f"GlorotMonitor: model must be a torch.nn.Module, got {type(model).__name__}")
        if isinstance(saturation, bool) or not isinstance(saturation, (int, float)) or not 0 < saturation < 1:
            raise ValueError(f"GlorotMonitor: saturation must be a number in (0, 1), got {saturation!r}")
        named = list(model.named_modules())
        layer_names = _select(named, layers, _owns_weight_matrix, "layers")
        if not layer_names:
            looked = (
                "submodules owning a floating-point `weight` Parameter with ndim >= 2 (nn.Linear, "
                "nn.Conv1d/2d/3d, normlab.nn.CosineLinear, weight-normed modules)"
                if layers is None
                else f"layers={layers!r}"
            )
            raise ValueError(
                f"GlorotMonitor: no layer found in {type(model).__name__}: looked for {looked}. "
                f"Pass layers= a list of module names from model.named_modules() "
                f"(here: {_show([n for n, _ in named])}) or of module types, "
                f"e.g. layers=[nn.LayerNorm]"
            )
        act_names = _select(named, activations, _is_default_activation, "activations")
        modules = dict(named)

        self.saturation = float(saturation)
        self._removed = False
        self._modules = {n: modules[n] for n in layer_names}
        self._layers = layer_names
        self._records = {n: _Record() for n in layer_names}
        # Activations are paired with the layer whose output they receive (data flow, not
        # registration order), through normalization, dropout and identity modules in between.
        self._act_records: dict[str, _Record] = {}
        self._act_of: dict[str, tuple[str, tuple[str, ...]]] = {}  # layer -> (activation type, via)
        self._origin: collections.OrderedDict[int, tuple[weakref.ref, str, tuple[str, ...]]] = collections.OrderedDict()
        self._handles = []
        for name in layer_names:
            hook = self._layer_hook(name)
            self._handles.append(modules[name].register_forward_hook(hook))
        for name, m in named:
            if name not in self._records and name not in act_names and isinstance(m, _pass_through()):
                self._handles.append(m.register_forward_hook(self._pass_hook))
        for name in act_names:
            self._handles.append(modules[name].register_forward_hook(self._activation_hook))

    # -------------------------------------------------------------------------- hooks
    def _remember(self, y: Tensor, layer: str, via: tuple[str, ...]) -> None:
        """``y`` came from ``layer`` (through the ``via`` modules); kept weakly, the last few only."""
        self._origin[id(y)] = (weakref.ref(y), layer, via)
        self._origin.move_to_end(id(y))
        if len(self._origin) > _ORIGINS_KEPT:  # forget the outputs that no longer exist first
            for key in [k for k, (ref, _, _) in self._origin.items() if ref() is None]:
                del self._origin[key]
        while len(self._origin) > _ORIGINS_KEPT:
            self._origin.popitem(last=False)

    def _source(self, args) -> tuple[str, tuple[str, ...]] | None:
        x = args[0] if args and isinstance(args[0], Tensor) else None
        entry = self._origin.get(id(x)) if x is not None else None
        if entry is None or entry[0]() is not x:
            return None
        return entry[1], entry[2]

    def _pass_hook(self, module, args, output):
        src = self._source(args)
        y = _first_float_tensor(output)
        if src is not None and y is not None and not self._removed:
            self._remember(y, src[0], (*src[1], type(module).__name__))

    def _layer_hook(self, name: str):
        rec = self._records[name]

        def on_forward(module, args, output):
            y = _first_float_tensor(output)
            if y is None or self._removed:
                return None
            self._remember(y, name, ())
            rec.calls += 1
            rec.forward = _merge(rec.forward, _whole(y))
            if y.requires_grad:  # False under no_grad/inference_mode: then forward only

                def on_grad(grad):
                    # the tensor may outlive remove(): then it must record nothing
                    if not self._removed:
                        rec.backward = _merge(rec.backward, _whole(grad))
                    return None

                y.register_hook(on_grad)
            return None

        return on_forward

    def _activation_hook(self, module, args, output):
        src = self._source(args)
        y = _first_float_tensor(output)
        if src is None or y is None or self._removed:
            return None
        layer, via = src
        self._act_of.setdefault(layer, (type(module).__name__, via))
        rec = self._act_records.setdefault(layer, _Record())
        y = y.detach()
        rec.calls += 1
        rec.forward = _merge(rec.forward, _whole(y))
        mask = _saturated(module, y, self.saturation)
        if mask is not None:
            rec.saturated = _merge(rec.saturated, _whole(mask.float()))
        return None

    # -------------------------------------------------------------------------- results
    def stats(self) -> list[dict]:
        """Return the recorded statistics as one dict per layer, in the order of named_modules().

        Keys: ``name``, ``type`` (class name), ``forward_mean``, ``forward_var``,
        ``backward_var``, ``weight_grad_var`` (floats, NaN where nothing was recorded, e.g.
        ``backward_var`` after forward passes under ``torch.no_grad()``, or
        ``weight_grad_var`` while ``.grad`` is None), ``calls`` (forward calls recorded); and,
        when an activation module received the layer's output, ``activation`` (class name),
        ``activation_via`` (class names of the modules in between), ``activation_var`` and
        ``saturation`` (see the class docstring).

        For a weight-normed layer ``weight_grad_var`` is that of the direction ``v``
        (``parametrizations.weight.original1``), the parameter the optimizer updates.

        Returns:
            list of dict: one per watched layer.
        """
        rows = []
        for name in self._layers:
            rec = self._records[name]
            module = self._modules[name]
            row = {
                "name": name,
                "type": type(module).__name__,
                "forward_mean": _mean(rec.forward),
                "forward_var": _var(rec.forward),
                "backward_var": _var(rec.backward),
                "weight_grad_var": _grad_var(_weight_source(module)),
                "calls": rec.calls,
            }
            if name in self._act_of:
                arec = self._act_records[name]
                row["activation"], via = self._act_of[name]
                row["activation_via"] = list(via)
                row["activation_var"] = _var(arec.forward)
                row["saturation"] = _mean(arec.saturated)
            rows.append(row)
        return rows

    def summary(self) -> dict:
        """The Glorot condition of the hidden layers in six numbers, and which layers they are.

        The layers measured are the *hidden* layers: every watched layer but the last, which is
        the output layer (its width and its variance are the task's, e.g. logits) and is named
        in ``output_layer`` instead. With ``L`` hidden layers, first to last in order:

        * ``forward_end_to_end = forward_var[last] / forward_var[first]``: how much the signal's
          variance changes across the whole hidden stack (data flow first → last); < 1 shrinks.
        * ``forward_per_layer = forward_end_to_end ** (1 / (L − 1))``: the same as a geometric
          mean per layer, the number Glorot's condition sets to 1 (≈ 1/3 per tanh layer with
          torch's default init).
        * ``backward_end_to_end = backward_var[first] / backward_var[last]``: the gradient flows
          last → first, so this is again arrival over departure; < 1 vanishes, > 1 explodes.
        * ``backward_per_layer``: its geometric mean per layer.
        * ``forward_log_spread``, ``backward_log_spread``: ``max − min`` of ``log10`` of the
          variance over the hidden layers: how many orders of magnitude separate the loudest
          layer from the quietest, which also catches a wobble the end-to-end ratio hides. A
          zero variance counts as ``-inf`` (spread ``inf``); layers with nothing recorded are
          skipped.
        * ``hidden_layers`` (their names) and ``output_layer`` (None when only one layer is
          watched: it is then measured as the only hidden layer). Layers whose forward was never
          called (a module whose weight another module reads, as ``nn.MultiheadAttention`` does
          with its ``out_proj``) are left out of both.

        The condition holds when the per-layer ratios are near 1 and the spreads near 0. NaN
        where the needed variances were not recorded (per-layer ratios need two hidden layers).

        Returns:
            dict: the eight entries above.
        """
        rows = [r for r in self.stats() if r["calls"]]  # layers never called (MHA's out_proj) do not count
        hidden, output = (rows[:-1], rows[-1]["name"]) if len(rows) > 1 else (rows, None)
        if not rows:
            return {k: _NAN for k in ("forward_end_to_end", "forward_per_layer", "backward_end_to_end",
                                      "backward_per_layer", "forward_log_spread", "backward_log_spread")} | {
                "hidden_layers": [], "output_layer": None}
        fv = [r["forward_var"] for r in hidden]
        bv = [r["backward_var"] for r in hidden]
        forward, backward = _ratio(fv[-1], fv[0]), _ratio(bv[0], bv[-1])
        steps = len(hidden) - 1
        return {
            "forward_end_to_end": forward,
            "forward_per_layer": _per_layer(forward, steps),
            "backward_end_to_end": backward,
            "backward_per_layer": _per_layer(backward, steps),
            "forward_log_spread": _log_spread(fv),
            "backward_log_spread": _log_spread(bv),
            "hidden_layers": [r["name"] for r in hidden],
            "output_layer": output,
        }

    def weight_grads(self) -> dict[str, Tensor]:
        """Return each layer's flattened weight gradient, as a detached float32 CPU copy.

        For the per-layer box plots of Lesson 14.1 (its ``weights_vp(model, att="grad")``).
        Layers whose weight has no ``.grad`` yet are left out; weight-normed layers give the
        gradient of ``v``.

        Returns:
            dict: ``{layer name: 1-D float32 Tensor}``.
        """
        out = {}
        for name in self._layers:
            w = _weight_source(self._modules[name])
            if w is not None and w.grad is not None:
                out[name] = w.grad.detach().flatten().to("cpu", torch.float32, copy=True)
        return out

    # -------------------------------------------------------------------------- lifecycle
    def reset(self) -> None:
        """Forget everything recorded so far; the hooks stay.

        A gradient that arrives later, even one from a forward pass made before ``reset()``, is
        recorded."""
        for rec in (*self._records.values(), *self._act_records.values()):
            rec.clear()

    def remove(self) -> None:
        """Remove every hook, leaving the model as it was; the statistics remain readable.

        Module hooks are removed now; tensor hooks still pending on live outputs go quiet.
        Idempotent."""
        self._removed = True
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> "GlorotMonitor":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    @property
    def layers(self) -> list[str]:
        """Names of the watched layers, in order."""
        return list(self._layers)

    def __repr__(self) -> str:
        state = "removed" if self._removed else "active"
        return (
            f"GlorotMonitor(layers={len(self._layers)}, paired activations={len(self._act_of)}, "
            f"saturation={self.saturation}, {state})"
        )


def _per_layer(ratio: float, steps: int) -> float:
    """The geometric mean per layer of an end-to-end ratio over ``steps`` layer-to-layer steps."""
    if steps < 1 or not ratio >= 0:
        return _NAN
    return ratio ** (1.0 / steps)


def _grad_var(w: Tensor | None) -> float:
    if w is None or w.grad is None:
        return _NAN
    return _var(_whole(w.grad))
