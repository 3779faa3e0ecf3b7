from __future__ import annotations

import copy
import warnings

import numpy as np
import torch
from torch import Tensor, nn

from ._common import (_LAYERS, _bn_role, _call, _check, _foldable, _frozen_rest, _is_bn1d, _left_in_place, _names_of,
                      _norm_modules, _outputs, _prefixes, _set_submodule, _unknown_bns, is_batchnorm, module_label)
from .freeze import _frozen_pre_hook, _guard_post, _guard_pre


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

