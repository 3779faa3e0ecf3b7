from __future__ import annotations

import copy
import warnings

import torch
from torch import Tensor, nn



_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _plain_bns() -> tuple[type, ...]:
    """The classes whose forward computes BatchNorm and nothing else: torch.nn's and normlab's."""
    from .. import distributed, nn as nln

    return (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nln.BatchNorm1d, nln.BatchNorm2d,
            nln.BatchNorm3d, nln.BatchRenorm1d, nln.BatchRenorm2d, nln.BatchRenorm3d, distributed.SyncBatchNorm)


def _dotted(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _defines_forward(cls: type) -> type:
    """The class of ``cls``'s MRO whose ``forward`` ``cls`` runs."""
    return next(c for c in cls.__mro__ if "forward" in c.__dict__)


# what a subclass may define and still compute what its base does
_HARMLESS = frozenset({"__init__", "extra_repr", "reset_parameters", "reset_running_stats", "__repr__",
                       "__reduce_ex__", "__init_subclass__"})


def _keeps(cls: type, known: type) -> bool:
    """``cls`` computes what ``known`` (a base of it) does: the classes between them define no
    method but harmless ones, so neither the forward nor anything it calls (``_check_input_dim``,
    ``_apply_instance_norm``, ...) is their own."""
    for c in cls.__mro__:
        if c is known:
            return True
        if any(callable(v) and k not in _HARMLESS for k, v in vars(c).items() if not isinstance(v, type)):
            return False
    return False


class _Unknown(str):
    """Why a norm subclass is not known: a method of its own (the forward, or one it calls)."""


def _bn_role(m: nn.Module):
    """How normlab knows a module as a BatchNorm: ``None`` (not a BatchNorm), ``"plain"``, a
    function giving what its forward applies after the normalization (``thirdparty.BN_THEN``), or a string
    saying why a BatchNorm subclass is not known (an ``_Unknown``: methods of its own)."""
    from .. import nn as nln
    from ..thirdparty import BN_THEN

    if (not isinstance(m, (nn.modules.batchnorm._NormBase, nln._NormBase))
            or isinstance(m, (nn.modules.instancenorm._InstanceNorm, nln._InstanceNorm))):
        return None
    cls = type(m)
    known = next((c for c in cls.__mro__ if c in _plain_bns()), None)
    if known is not None and _keeps(cls, known):
        return "plain"
    impl = _defines_forward(cls)
    then = BN_THEN.get(_dotted(impl))
    if then is not None and _keeps(cls, impl):
        return then
    return _Unknown(_not_known(m, "BatchNorm"))


def _not_known(m: nn.Module, what: str = "the class it subclasses") -> str:
    from ..nn import torch_base

    base = torch_base(type(m))
    if base is not None:
        return (f"{_dotted(type(m))} subclasses {base.__name__} with methods of its own (its forward, or one it "
                f"calls), so normlab cannot know that it computes {what}; register_conversion, then to_normlab, "
                "teaches it")
    return "no conversion is registered for this class; register_conversion teaches one"


def is_batchnorm(m: nn.Module) -> bool:
    """Tell whether a module is a BatchNorm whose forward normlab knows.

    True for torch.nn's BatchNorm1d/2d/3d and SyncBatchNorm, normlab.nn's BatchNorm and
    BatchRenorm layers, :class:`normlab.distributed.SyncBatchNorm`, subclasses of these that keep
    their forward, and BatchNorms that apply a known activation after the normalization (timm's
    ``BatchNormAct2d``: the normalization is folded, the dropout and activation stay). False for
    every other module, and for a BatchNorm subclass with methods of its own (its forward, or
    one that forward calls, such as ``_check_input_dim``): normlab cannot know what it computes, so no function of this module treats it as a BatchNorm
    (each one that acts on BatchNorms finds them with this one, and says which it left and why).

    Args:
        m (nn.Module): the module to test.

    Returns:
        bool: whether ``m`` is a BatchNorm normlab knows.

    Example::

        >>> class Scaled(nn.BatchNorm2d):            # a forward of its own: not a known BatchNorm
        ...     def forward(self, x):
        ...         return 2 * super().forward(x)
        >>> is_batchnorm(nn.BatchNorm2d(3)), is_batchnorm(Scaled(3)), is_batchnorm(nn.LayerNorm(3))
        (True, False, False)
    """
    role = _bn_role(m)
    return role is not None and not isinstance(role, _Unknown)


def _frozen_rest(m: nn.Module):
    """For a frozen BatchNorm (torchvision's FrozenBatchNorm2d, timm's FrozenBatchNormAct2d): what
    stays when it is folded; None for any other module."""
    from ..thirdparty import FROZEN_BN

    return FROZEN_BN.get(_dotted(_defines_forward(type(m))))


def _foldable(m: nn.Module) -> bool:
    """A known BatchNorm, or a frozen one: an affine map per channel in eval mode."""
    return is_batchnorm(m) or _frozen_rest(m) is not None


def _unknown_bns(model: nn.Module) -> dict[str, str]:
    """The BatchNorm subclasses of ``model`` whose forward normlab does not know, with the reason."""
    return {n: role for n, m in model.named_modules() if isinstance(role := _bn_role(m), _Unknown)}


def _norm_modules() -> tuple[type, ...]:
    from .. import nn as nln

    # normlab.nn's layers subclass these, but BatchRenorm (not torch's BatchNorm: it trains otherwise)
    return (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nln._NormBase)


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _prefixes(name: str) -> list[str]:
    """``"a.b"`` → ``["", "a", "a.b"]``: the module and its ancestors."""
    parts = name.split(".") if name else []
    return [""] + [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def _names_of(model: nn.Module) -> dict[int, str]:
    """``id(module) → name`` for the modules reachable under one name only; shared ones (the
    same object under two names) are left out, so they are never folded."""
    count: dict[int, int] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        count[id(m)] = count.get(id(m), 0) + 1
    return {id(m): n for n, m in model.named_modules() if count[id(m)] == 1}


def _is_bn1d(m: nn.Module) -> bool:
    # only a plain BatchNorm folds into the Linear after it: an activation after it would be skipped
    return isinstance(m, nn.BatchNorm1d) and _bn_role(m) == "plain"


def _warn_unknown(tool: str, model: nn.Module) -> None:
    if unknown := _unknown_bns(model):
        warnings.warn(_left_in_place(tool, unknown), stacklevel=3)


def module_label(name: str, module: nn.Module | None = None) -> str:
    """How every message names a module: its path in the model as ``named_modules`` gives it,
    quoted (``'features.0'``; the model itself is "the model"), with its class where given."""
    kind = f" ({type(module).__name__})" if module is not None else ""
    return (repr(name) if name else "the model") + kind


def _left_in_place(tool: str, why: dict[str, str]) -> str:
    """One line per reason, naming the modules (the first five, and how many more)."""
    by_reason: dict[str, list[str]] = {}
    for name, reason in why.items():
        by_reason.setdefault(reason, []).append(module_label(name))
    lines = []
    for reason, names in by_reason.items():
        more = f" and {len(names) - 5} more" if len(names) > 5 else ""
        lines.append(f"{', '.join(names[:5])}{more} ({reason})")
    return f"{tool} left in place {len(why)} BatchNorm(s):\n  " + "\n  ".join(lines)


def _check(model: nn.Module, example_input, names, before: dict) -> str | None:
    """Where the changed model departs from ``before`` on ``example_input``, or why it could not
    run it, in words; None where it computes the same."""
    try:
        after = _outputs(model, example_input, names)
    except Exception as err:  # noqa: BLE001 - whatever the changed model raises, the change is undone
        return f"the changed model raised {type(err).__name__}: {err}"
    return _first_difference(before, after)


# ------------------------------------------------------------- the same function, checked
# relative to the largest value of the original's output: rounding, not a different function
_TOLERANCE = {torch.float64: 1e-7, torch.float32: 1e-3, torch.float16: 2e-2, torch.bfloat16: 5e-2}


def _call(model: nn.Module, example_input):
    if isinstance(example_input, dict):
        return model(**example_input)
    return model(*example_input) if isinstance(example_input, tuple) else model(example_input)


def _tensors(out) -> list[Tensor]:
    return [t.detach().clone() for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, Tensor)]


@torch.no_grad()
def _outputs(model: nn.Module, example_input, names=()) -> dict[str, list[Tensor]]:
    """The tensors each module of ``names`` returns at its first call, in the order they ran,
    and the model's under ``""``, for one run of ``example_input`` in the model's modes, with
    a fixed random seed (dropout draws the same masks every run); every buffer is restored."""
    got: dict[str, list[Tensor]] = {}

    def record(name):
        def hook(module, args, out) -> None:  # returns None: the output stays as it is
            if name not in got:
                got[name] = _tensors(out)
        return hook

    handles = [model.get_submodule(n).register_forward_hook(record(n)) for n in names if n]
    buffers = [(b, b.clone()) for b in model.buffers()]
    cuda = sorted({t.device.index or 0 for t in (*model.parameters(), *model.buffers()) if t.device.type == "cuda"})
    try:
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(0)
            got[""] = _tensors(_call(model, example_input))
    finally:
        for h in handles:
            h.remove()
        for b, saved in buffers:
            b.copy_(saved)
    return got


def _difference(new: list[Tensor], old: list[Tensor], floor: torch.dtype | None = None) -> str | None:
    """How ``new`` differs from ``old`` beyond rounding, in words, or None; rounding in the output's
    dtype, or in ``floor`` (the input's) where that is coarser: a float32 output computed from
    bfloat16 values is exact to bfloat16's rounding only."""
    if len(new) != len(old):
        return f"{len(new)} output tensors where the original gave {len(old)}"
    for x, y in zip(new, old):
        dtype = y.dtype
        if x.shape != y.shape:
            return f"an output of shape {tuple(x.shape)} where the original's is {tuple(y.shape)}"
        if x.dtype != y.dtype:
            return f"a {x.dtype} output where the original's is {y.dtype}"
        if not y.is_floating_point():
            if not torch.equal(x, y):
                return "other values"
            continue
        x, y = x.double(), y.double()
        finite = torch.isfinite(y)
        if not torch.equal(finite, torch.isfinite(x)) or not torch.equal(x[~finite].nan_to_num(), y[~finite].nan_to_num()):
            return "NaN or infinity where the original has other values"
        if finite.any():
            err, scale = float((x - y)[finite].abs().max()), float(y[finite].abs().max())
            tol = max(_TOLERANCE.get(dtype, 1e-3), _TOLERANCE.get(floor, 0.0))
            if err > tol * scale:
                return (f"values that differ by up to {err:.3g} ({err / max(scale, 1e-300):.2g} of the largest, "
                        f"{scale:.3g}; rounding stays under {tol:g})")
    return None


def _first_difference(before: dict, after: dict) -> str | None:
    """Where the second run first departs from the first: the module, in the order they ran."""
    for name in after:
        if name not in before:
            return f"{module_label(name)} ran where it did not before"
        if (why := _difference(after[name], before[name])) is not None:
            return f"the output of {module_label(name)} changed: {why}"
    return None


def replace_modules(tool: str, model: nn.Module, choose, *, inplace: bool, example_input=None) -> tuple[nn.Module, dict]:
    """The one walker every tool that swaps modules uses (to_normlab, to_torch, replace_norm,
    convert_sync_batchnorm): ``choose(module, name, report)`` returns the module to put where
    ``module`` is (the model itself included, name ``""``), or None to keep it. A module shared by
    several parents stays shared, and every replacement is built before any is put in place, so a
    ``choose`` that raises leaves the model as it was. With ``example_input`` the new model is run
    against the old one, and a replaced module whose output differs beyond rounding puts every
    module back and raises, naming it. Returns the new model and ``report`` (``"converted"`` and
    ``"left"`` lists that ``choose`` fills)."""
    model = model if inplace else copy.deepcopy(model)
    report = {"converted": [], "left": []}
    top = choose(model, "", report)  # the model itself is a norm
    built: dict[int, nn.Module | None] = {}
    sites = []
    for parent_name, parent in ([] if top is not None else list(model.named_modules())):
        for child_name, child in list(parent._modules.items()):
            if child is None:
                continue
            if id(child) not in built:
                built[id(child)] = choose(child, f"{parent_name}.{child_name}".lstrip("."), report)
            if built[id(child)] is not None:
                sites.append((parent, child_name, child, built[id(child)]))
    names = [name for name, *_ in report["converted"]]
    before = _outputs(model, example_input, names) if example_input is not None and names else None
    for parent, child_name, _, new in sites:
        parent._modules[child_name] = new
    result = top if top is not None else model
    if before is not None and (where := _check(result, example_input, names, before)):
        for parent, child_name, old, _ in sites:
            parent._modules[child_name] = old
        raise ValueError(f"{tool}: {where}; the model is left as it was")
    return result, report


def adopt_state(new: nn.Module, old: nn.Module) -> nn.Module:
    """Give ``new`` the Parameter objects and buffers of ``old`` where they have the same name and
    shape: the values carry over, and so does an optimizer's hold on the parameters (and their
    ``requires_grad``). Returns ``new``."""
    for table, theirs in ((new._parameters, old._parameters), (new._buffers, old._buffers)):
        for name, mine in table.items():
            t = theirs.get(name)
            if mine is not None and t is not None and t.shape == mine.shape:
                table[name] = t
    return new
