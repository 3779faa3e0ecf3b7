from __future__ import annotations


import torch
from torch import nn

from ..nn import retype
from ._common import _defines_forward, _difference, _keeps, _not_known, module_label, replace_modules


_TO_NORMLAB: dict = {}  # class, or class name for code normlab does not import


def register_conversion(cls, convert) -> None:
    """Teach to_normlab to convert one more norm class.

    ``convert(module)`` returns the normlab module that replaces ``module`` (usually built with
    :func:`retype`, so that its parameters and buffers stay the same objects), or ``None`` to
    leave it; it says why a module cannot be converted by raising ``ValueError``, whose message
    the report of :func:`to_normlab` lists under ``"left"``. ``cls`` is a class, matched exactly
    (not its subclasses), or, for code normlab should not import, a class name; registering it
    again replaces its conversion, and a registration comes before the built-in ones (the
    README lists those). The converted module stays an instance of ``cls``, :func:`to_torch`
    gives it its class back, and :func:`to_normlab` keeps it only when it computes what the
    original did on a probe input.

    Args:
        cls (type or str): the class to convert, or its ``__name__``.
        convert (callable): ``convert(module)`` → the replacing ``nn.Module``, or ``None``.

    Example::

        >>> from normlab import nn as nln
        >>> class MyLayerNorm(nn.LayerNorm):      # a forward of its own: to_normlab leaves it ...
        ...     def forward(self, x):
        ...         return super().forward(x)
        >>> print(to_normlab(MyLayerNorm(4), report=True)[1]["left"][0][2])
        normlab.convert.adopt.MyLayerNorm subclasses LayerNorm with methods of its own (its forward, or one it calls), so normlab cannot know that it computes the class it subclasses; register_conversion, then to_normlab, teaches it
        >>> register_conversion(MyLayerNorm, lambda m: retype(m, nln.LayerNorm))  # ... until taught
        >>> converted = to_normlab(MyLayerNorm(4))
        >>> isinstance(converted, MyLayerNorm), type(to_torch(converted)) is MyLayerNorm
        (True, True)
    """
    _TO_NORMLAB[cls] = convert


def _torch_pairs() -> dict:
    from .. import nn as nln

    return {nn.BatchNorm1d: nln.BatchNorm1d, nn.BatchNorm2d: nln.BatchNorm2d, nn.BatchNorm3d: nln.BatchNorm3d,
            nn.InstanceNorm1d: nln.InstanceNorm1d, nn.InstanceNorm2d: nln.InstanceNorm2d,
            nn.InstanceNorm3d: nln.InstanceNorm3d, nn.LayerNorm: nln.LayerNorm, nn.GroupNorm: nln.GroupNorm,
            nn.RMSNorm: nln.RMSNorm}


def _conversion(cls: type):
    """How to_normlab converts a class, and whether the result needs no probe: a registered
    conversion, torch.nn's own (for a subclass only where it keeps every method), a built-in one,
    or ``(None, False)``."""
    from .. import thirdparty

    registered = _TO_NORMLAB.get(cls) or _TO_NORMLAB.get(cls.__name__)
    if registered is not None:
        return registered, False
    pairs = _torch_pairs()
    base = next((c for c in cls.__mro__ if c in pairs), None)
    if base is not None and _keeps(cls, base):  # torch.nn's forward and all it calls: normlab's suite tests those
        return (lambda m: retype(m, pairs[base])), True
    return thirdparty.conversion_for(cls), False


def _is_norm(m: nn.Module) -> bool:
    """A module whose class says it normalizes and that holds no such module (not a container)."""
    def says(mod):
        return "norm" in type(mod).__name__.lower()
    return says(m) and not any(says(c) for c in m.modules() if c is not m)


@torch.no_grad()
def _probe(original: nn.Module, new: nn.Module) -> str | None:
    """How ``new`` differs from ``original`` on a probe input, in eval mode, float32 and bfloat16
    (and the parameters' dtype), or None; neither module's state changes."""
    from .. import thirdparty

    xs = thirdparty.probe_input(new)
    like = next(iter(original.parameters()), None)
    if xs is None or (like is not None and like.device.type == "meta"):
        return None
    dtypes = [torch.float32, torch.bfloat16] + ([like.dtype] if like is not None and like.is_floating_point() else [])
    modes = [(m, m.training) for m in (*original.modules(), *new.modules())]
    try:
        for m, _ in modes:
            m.training = False
        for dtype in dict.fromkeys(dtypes):
            xd = [x.to(device=like.device if like is not None else None, dtype=dtype) for x in xs]
            try:
                want = original.forward(*xd)
            except Exception:  # noqa: BLE001 - the original does not take this dtype: nothing to match
                continue
            try:
                got = new.forward(*xd)
            except Exception as err:  # noqa: BLE001 - the original took this input, the conversion must too
                return f"it raises {type(err).__name__} on a {dtype} probe input the original takes: {err}"
            if (why := _difference([got], [want], floor=dtype)) is not None:
                return f"it would compute something else than the original on a {dtype} probe input: {why}"
    finally:
        for m, was in modes:
            m.training = was
    return None


def to_normlab(model: nn.Module, *, inplace: bool = False, report: bool = False, example_input=None):
    """Convert every norm of a model to normlab's implementation, keeping its parameters.

    Converted: torch.nn's BatchNorm1d/2d/3d, InstanceNorm1d/2d/3d, LayerNorm, GroupNorm and
    RMSNorm, subclasses of them that keep their forward, and the norms of timm, torchvision,
    transformers and diffusers that the README lists, each with its original's dtype rules
    (:mod:`normlab.thirdparty`), plus those of the registry (:func:`register_conversion`). A
    module is converted only where normlab knows what its forward computes: a subclass with a
    method of its own is left, and so is a third-party conversion that does not reproduce the
    original on a probe input (float32 and bfloat16, eval mode), which guards against an upstream
    change of that class. Each module is re-typed (:func:`retype`): parameters and buffers are
    the same objects, so ``state_dict`` keys, optimizers and tied weights are unchanged; a module
    shared by several parents stays shared; and the converted module is still an instance of its
    original class (:func:`normlab.nn.adopted_class`), so ``isinstance`` checks elsewhere find it.
    :func:`to_torch` goes back.

    Args:
        model (nn.Module): any module (a norm itself is converted too).
        inplace (bool, keyword-only): change ``model`` itself instead of a deep copy.
            Default: ``False``.
        report (bool, keyword-only): also return
            ``{"converted": [(name, from, to)], "left": [(name, class, why)]}``, ``left`` listing
            every norm module (a module whose class name says it normalizes and that holds no
            such module) that was not converted, with the reason. Default: ``False``.
        example_input (optional, keyword-only): an input of the model (a tensor, a tuple of
            positional arguments or a dict of keyword arguments): the converted model is run
            against the original on it, in the model's mode, and a converted module whose output
            differs beyond rounding (1e-3 of the output's scale in float32, 5e-2 in bfloat16)
            makes the call raise a ``ValueError`` naming it, with the model left as it was.
            Default: ``None``.

    Returns:
        nn.Module, or ``(nn.Module, dict)`` with ``report=True``: the converted model.

    Example::

        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8))
        >>> fast, done = to_normlab(model, report=True, example_input=torch.randn(3, 4))
        >>> done["converted"]
        [('1', 'LayerNorm', 'normlab.nn.LayerNorm')]
        >>> isinstance(fast[1], torch.nn.LayerNorm)
        True
    """
    from .. import nn as nln

    def choose(m, name, rep):
        if _is_normlab(m):
            return None
        convert, trusted = _conversion(type(m))
        if convert is None:
            if _is_norm(m):
                rep["left"].append((name, type(m).__name__, _not_known(m)))
            return None
        try:
            new = convert(m)
        except (ValueError, AttributeError, TypeError) as err:
            rep["left"].append((name, type(m).__name__, str(err)))
            return None
        if new is None:
            return None
        impl = type(new)
        try:
            new.__class__ = nln.adopted_class(impl, type(m))
        except TypeError as err:  # no class can derive from both
            rep["left"].append((name, type(m).__name__, f"its class cannot be kept as a base: {err}"))
            return None
        added = tuple(k for k in new.__dict__ if k not in m.__dict__)
        if added:
            new.__dict__[nln._ADDED] = added
        if not trusted and (why := _probe(m, new)) is not None:
            rep["left"].append((name, type(m).__name__, why))
            return None
        public = next(c for c in impl.__mro__ if not c.__name__.startswith("_") and _is_normlab_class(c))
        summary = " ".join((impl.__doc__ or "").replace("``", "").split()).split(". ")[0].rstrip(".")
        how = "" if impl is public else f" ({summary})"
        rep["converted"].append((name, type(m).__name__, f"normlab.nn.{public.__name__}{how}"))
        return new

    model, rep = replace_modules("to_normlab", model, choose, inplace=inplace, example_input=example_input)
    return (model, rep) if report else model


def _is_normlab_class(cls: type) -> bool:
    return cls.__module__ in ("normlab.nn", "normlab.thirdparty", "normlab.distributed")


def _is_normlab(m: nn.Module) -> bool:
    """A module that computes with normlab already (its forward is normlab's)."""
    return _is_normlab_class(_defines_forward(type(m)))


def to_torch(model: nn.Module, *, inplace: bool = False, example_input=None) -> nn.Module:
    """Convert normlab's norms back to torch.nn's, undoing to_normlab.

    normlab.nn's BatchNorm1d/2d/3d, InstanceNorm1d/2d/3d, LayerNorm, GroupNorm and RMSNorm become
    torch.nn's again, and every module :func:`to_normlab` converted gets its own class back
    (third-party and registered classes included); parameters and buffers stay the same objects
    (:func:`retype`). Other modules are left alone.

    Args:
        model (nn.Module): any module (a norm itself is converted too).
        inplace (bool, keyword-only): change ``model`` itself instead of a deep copy.
            Default: ``False``.
        example_input (optional, keyword-only): as for :func:`to_normlab`: the result is run
            against the model on it, and a difference beyond rounding raises. Default: ``None``.

    Returns:
        nn.Module: the converted model.

    Example::

        >>> import torch
        >>> bn = torch.nn.BatchNorm2d(3)
        >>> back = to_torch(to_normlab(bn))
        >>> type(back)
        <class 'torch.nn.modules.batchnorm.BatchNorm2d'>
        >>> torch.equal(back.weight, bn.weight)
        True
    """
    from .. import nn as nln

    back = set(_torch_pairs().values())

    def choose(m, name, rep):
        if getattr(type(m), nln._ORIGIN, None) is None and type(m) not in back:
            return None
        try:
            new = nln._as_original(m)
        except ValueError as err:  # raised before any module is replaced: the model is as it was
            raise ValueError(f"to_torch: {module_label(name, m)}: {err}") from None
        rep["converted"].append((name, type(m).__name__, type(new).__name__))
        return new

    return replace_modules("to_torch", model, choose, inplace=inplace, example_input=example_input)[0]

