"""Fast backends for the normalization core, and the switch between them.

Every norm of :mod:`normlab.functional` goes through :class:`normlab.autograd.NormalizeAffine`
(statistics over reduction dims, then an affine map). Its work reduces to two canonical forms,
which the fast kernels implement:

* **rows** — ``x`` viewed as ``(R, D)``, one statistic per row: LayerNorm and RMSNorm (γ, β per
  column), GroupNorm and InstanceNorm on contiguous input (γ, β per segment of ``seg`` columns:
  parameter ``(r % groups)·(D/seg) + j // seg``);
* **channels** — BatchNorm in training, ``x`` viewed as ``(N, C, S)``, one statistic per
  channel (``S == 1``: the ``(M, C)`` layout of 2-D and ``channels_last`` input);
* **groups** — GroupNorm and InstanceNorm on ``channels_last`` input, ``x`` viewed as
  ``(N, S, C)``, one statistic per sample and group of ``C/groups`` adjacent channels (CPU).

A last, small form is BatchNorm in eval, ``(x − μ)·γ/√(σ²+ε) + β`` per channel with the
running statistics (seed 000 §2.2's affine view): ``channels_eval`` builds the per-channel map
from the running statistics in one call, ``channels_affine`` applies a given one (statistics
in another dtype than x, or while compiling), and ``channels_affine_backward`` gives ``dx`` and
the per-channel sums (float32 or wider) from which γ and β get their gradients.

Backends, each a module with the same functions (``rows_*``, ``groups_*`` and
``channels_forward``/``channels_backward`` for the three forms, ``channels_eval``,
``channels_affine`` and its backward; see :mod:`normlab.kernels.reference`). The backward
functions take the statistics the forward returned (mean and biased variance, float64) and
recompute ``rstd`` exactly as the forward did:

* ``reference`` — :mod:`normlab.kernels.reference`: the oracle, plain torch ops through the core;
* ``cpu`` — :mod:`normlab.kernels.cpu`: the compiled C++ kernels (float32/float64, and
  float16/bfloat16 computed in float32; :mod:`normlab.kernels.build` compiles them at first use);
* ``triton`` — :mod:`normlab.kernels.triton`: Triton kernels (float32/float16/bfloat16 on CUDA).

:mod:`normlab.kernels.ops` registers them as ``torch.library`` custom ops (``torch.compile``
traces through them without graph breaks).

Which one runs is :func:`get_backend`: ``"auto"`` (the default: a kernel when one supports the
device, dtype and layout, the reference otherwise), ``"reference"`` (always the reference) or
``"torch"`` (torch's native ops, decided in :mod:`normlab.functional`: a baseline and an escape
hatch). Set it with :func:`set_backend`, for a block with ``with use_backend("reference"):``, or
for a whole process with the environment variable ``NORMLAB_BACKEND``.

>>> import torch, normlab.functional as F
>>> x = torch.randn(64, 128)
>>> with use_backend("reference"):
...     ref = F.layer_norm(x, (128,))
>>> torch.allclose(F.layer_norm(x, (128,)), ref, atol=1e-5)
True
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import importlib.util
import math
import os
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import Tensor

__all__ = ["BACKENDS", "get_backend", "set_backend", "use_backend", "plan", "Plan"]

BACKENDS = ("auto", "reference", "torch")


def _check(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown normlab backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return name


_backend = _check(os.environ.get("NORMLAB_BACKEND", "auto").strip().lower() or "auto")
# use_backend() overrides per thread / asyncio task, on top of the process-wide _backend
_override: contextvars.ContextVar[str | None] = contextvars.ContextVar("normlab_backend", default=None)


def get_backend() -> str:
    """The backend in force: ``"auto"``, ``"reference"`` or ``"torch"``.

    Code being compiled by ``torch.compile`` sees the process-wide choice (:func:`set_backend`,
    ``NORMLAB_BACKEND``): dynamo cannot trace a per-thread override.
    """
    if torch.compiler.is_compiling():
        return _backend
    return _override.get() or _backend


def set_backend(name: str) -> str:
    """Choose the backend for the whole process; returns the previous one."""
    global _backend
    previous, _backend = _backend, _check(name)
    return previous


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[str]:
    """``with use_backend("reference"): ...`` — the backend for one block in this thread (or
    asyncio task), restored after; other threads keep theirs."""
    token = _override.set(_check(name))
    try:
        yield name
    finally:
        _override.reset(token)


# ------------------------------------------------------------------------------- planning


@dataclass(frozen=True)
class Plan:
    """How one ``NormalizeAffine`` call maps onto a canonical form.

    ``form`` is ``"rows"``, ``"channels"`` or ``"groups"``; ``shape`` the canonical view of
    ``x`` (``(R, D)``, ``(N, C, S)`` or ``(N, S, C)``); ``groups``/``seg`` the parameter layout
    (rows, groups); ``permute`` the dims that make a ``channels_last`` input contiguous for the
    channels form (``None`` when it already is); ``stats`` the shape of the statistics as
    :class:`~normlab.autograd.NormalizeAffine` returns them (x's shape, reduced dims kept as 1).
    """

    form: str
    shape: tuple[int, ...]
    groups: int = 1
    seg: int = 1
    permute: tuple[int, ...] | None = None
    stats: tuple[int, ...] | None = None

    def view(self, t: Tensor) -> Tensor:
        """``t`` (shaped like ``x``) in the canonical layout, without a copy."""
        if self.permute is not None:
            t = t.permute(self.permute)
        elif t.shape == self.shape:
            return t
        return t.reshape(self.shape)


# Which devices may have kernels, found without importing anything (building or loading the
# compiled core, or importing Triton, costs time, and torch.compile cannot trace either).
_ENGINES = {"cpu": True, "cuda": importlib.util.find_spec("triton") is not None}
_DTYPES = {"cpu": (torch.float32, torch.float64, torch.float16, torch.bfloat16),
           "cuda": (torch.float32, torch.float16, torch.bfloat16)}


def _supported(x: Tensor) -> bool:
    kind = x.device.type
    return x.dtype in _DTYPES.get(kind, ()) and _ENGINES.get(kind, False) and _imports(kind)


def _imports(kind: str) -> bool:
    """The engine is there: the compiled core builds or loads (:mod:`normlab.kernels.build`),
    and on CUDA Triton imports; tried once per process, outside tracing."""
    if kind not in _IMPORTED and not torch.compiler.is_compiling():
        try:
            importlib.import_module(f"{__name__}.ops")  # the operators (the core, built or loaded)
            importlib.import_module(f"{__name__}.{'cpu' if kind == 'cpu' else 'triton'}")
            _IMPORTED[kind] = True
        except ImportError:
            _IMPORTED[kind] = _ENGINES[kind] = False
    return _IMPORTED.get(kind, True)


_IMPORTED: dict[str, bool] = {}


def _traced() -> bool:
    """A tracer the eager kernels would be invisible to: torch.jit.trace, forward-mode AD,
    or a dispatch mode (FakeTensorMode, FlopCounterMode, ...) outside torch.compile."""
    if torch.jit.is_tracing() or torch.autograd.forward_ad._current_level >= 0:
        return True
    return not torch.compiler.is_compiling() and torch._C._len_torch_dispatch_stack() > 0


def _transformed(t: Tensor | None = None) -> bool:
    """A torch.func transform (vmap, grad, jacrev) is active, or ``t`` is a batched tensor of
    ``autograd.grad(..., is_grads_batched=True)``: wrapped tensors have no storage a kernel
    could read, and vmap refuses ``out=``."""
    return torch._C._are_functorch_transforms_active() or (  # (dynamo cannot trace the second)
        t is not None and not torch.compiler.is_compiling() and torch._C._functorch.is_legacy_batchedtensor(t))


def plan(x: Tensor, dims: tuple[int, ...], weight: Tensor | None, bias: Tensor | None,
         batch_stats: bool, center: bool = True):
    """``(ops, Plan)`` when a kernel computes this call exactly, else ``None`` (the reference).

    Called on every norm, so the eager path is one cache look-up by tensor metadata after the
    checks that can change between calls with the same metadata (backend, tracers, functorch
    wrappers)."""
    if torch.compiler.is_compiling():
        if _backend != "auto" or x.numel() == 0 or not _supported(x) or _traced() or _transformed():
            return None
        return _plan(x, dims, weight, bias, batch_stats, center)
    if (_override.get() or _backend) != "auto" or _traced() or _transformed():
        return None
    key = (x.shape, x.stride(), x.dtype, x.device, dims, _meta(weight), _meta(bias), batch_stats, center)
    found = _PLANS.get(key, _MISSING)
    if found is _MISSING:
        if len(_PLANS) > 4096:  # shapes that never repeat: do not grow without bound
            _PLANS.clear()
        found = _PLANS[key] = (None if x.numel() == 0 or not _supported(x)
                               else _plan(x, dims, weight, bias, batch_stats, center))
    return found


_PLANS: dict = {}
_MISSING = object()


def _meta(t: Tensor | None):
    return None if t is None else (t.shape, t.stride(), t.dtype, t.device)


def _plan(x, dims, weight, bias, batch_stats, center):
    from . import ops as backend

    for t in (weight, bias):
        if t is not None and (t.dtype != x.dtype or t.device != x.device):
            return None
    dims = tuple([d % x.dim() for d in dims])
    if not batch_stats:  # fixed statistics (BatchNorm in eval): one affine map per channel
        p = _channels_plan(x, dims, weight, bias) if center else None
    else:
        p = (_rows_plan(x, dims, weight, bias) or (_channels_plan(x, dims, weight, bias) if center else None)
             or (_groups_plan(x, dims, weight, bias) if center else None))
    if p is None:
        return None
    return backend, dataclasses.replace(p, stats=tuple([1 if d in dims else n for d, n in enumerate(x.shape)]))


def _aligned(t: Tensor | None, nd: int) -> tuple[int, ...] | None:
    if t is None:
        return None
    if t.dim() > nd:
        return ()
    return (1,) * (nd - t.dim()) + tuple(t.shape)


def _rows_layout(x: Tensor, k: int, shape: tuple[int, ...] | None) -> tuple[int, int] | None:
    """``(groups, K)`` when a parameter of ``shape`` indexes rows by ``r % groups`` and columns
    by ``j // seg`` (ones, then x's trailing row dims | x's leading reduced dims, then ones)."""
    nd = x.dim()
    lead, tail = shape[: nd - k], shape[nd - k:]
    i = 0  # plain loops: torch.compile traces this function
    while i < len(lead) and lead[i] == 1:
        i += 1
    t = len(tail)
    while t > 0 and tail[t - 1] == 1:
        t -= 1
    if list(lead[i:]) != list(x.shape[i: nd - k]) or list(tail[:t]) != list(x.shape[nd - k: nd - k + t]):
        return None
    return math.prod(lead[i:]), math.prod(tail[:t])


def _rows_plan(x, dims, weight, bias) -> Plan | None:
    nd = x.dim()
    k = len(dims)
    if dims != tuple(range(nd - k, nd)) or not x.is_contiguous():
        return None
    layouts = [_rows_layout(x, k, _aligned(t, nd)) for t in (weight, bias) if t is not None]
    if None in layouts or (len(layouts) == 2 and layouts[0] != layouts[1]):
        return None
    R, D = math.prod(x.shape[: nd - k]), math.prod(x.shape[nd - k:])
    groups, K = layouts[0] if layouts else (1, D)
    if R % groups or D % K:
        return None
    return Plan("rows", (R, D), groups, D // K)


def _groups_plan(x, dims, weight, bias) -> Plan | None:
    """GroupNorm/InstanceNorm on channels_last input, as ``(N, S, G, C/G)`` reduced over (1, 3)."""
    if x.device.type != "cpu" or x.dim() != 4 or dims != (1, 3) or not x.is_contiguous():
        return None
    n, s, g, cg = x.shape
    for t in (weight, bias):
        if t is not None and _aligned(t, 4) != (1, 1, g, cg):
            return None
    return Plan("groups", (n, s, g * cg), groups=g)


def _channels_plan(x, dims, weight, bias) -> Plan | None:
    nd = x.dim()
    if nd < 2 or dims != (0, *range(2, nd)):
        return None
    c = x.shape[1]
    for t in (weight, bias):
        if t is not None and _aligned(t, nd) != (1, c) + (1,) * (nd - 2):
            return None
    if x.is_contiguous():
        return Plan("channels", (x.shape[0], c, math.prod(x.shape[2:])))
    fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(nd)
    if fmt is not None and x.is_contiguous(memory_format=fmt):
        return Plan("channels", (x.numel() // c, c, 1), permute=(0, *range(2, nd), 1))
    return None
