"""normlab's compiled core and the switch between backends.

Every norm of :mod:`normlab.functional` is one call to a torch operator of namespace
``normlab`` (``torch.ops.normlab.layer_norm``, ``rms_norm``, ``group_norm``, ``batch_norm``,
``instance_norm``), compiled from ``csrc/`` at first use (:mod:`normlab.kernels.build`). Each
operator checks its input, picks one of three canonical forms of the data and runs the fused
kernel of that form, with autograd in C++:

* **rows** — ``x`` viewed as ``(R, D)``, one statistic per row: LayerNorm and RMSNorm (γ, β per
  column), GroupNorm and InstanceNorm on contiguous input (γ, β per segment of ``seg`` columns:
  parameter ``(r % groups)·(D/seg) + j // seg``);
* **channels** — BatchNorm, ``x`` viewed as ``(N, C, S)``, one statistic per channel (``S == 1``:
  the ``(M, C)`` layout of 2-D and ``channels_last`` input); in eval the map
  ``(x − μ)·γ/√(σ²+ε) + β`` per channel from the running statistics (the lesson's affine view of
  BN in inference);
* **groups** — GroupNorm and InstanceNorm on ``channels_last`` input, ``x`` viewed as
  ``(N, S, C)``, one statistic per sample and group of ``C/groups`` adjacent channels (CPU).

BatchNorm also comes in parts, for the layers that act between its statistics and its map:
``batch_stats`` (μ and σ² per channel, float64, differentiable), ``batch_norm_apply`` (the map
with statistics given, their gradients flowing back) and ``update_running`` (the running
statistics' rule). :class:`~normlab.distributed.SyncBatchNorm` is statistics → all-reduce of
the moments → map, :class:`~normlab.nn.BatchRenorm2d` statistics → corrections r, d → map.

The kernels of the forms are operators too (``torch.ops.normlab.rows_forward``, ...), with the
signatures of :mod:`normlab.kernels.reference`, their oracle (the tests call both alike through
``tests/cpu_kernels.py``). On CUDA their implementation is the Triton kernels of
:mod:`normlab.kernels.triton` (:mod:`normlab.kernels.ops` registers them).

Backends: ``"auto"`` (the default: the compiled core; where it cannot be built, torch's native
ops), ``"reference"`` (:mod:`normlab.autograd`: plain torch ops and the written-out backward,
the oracle) or ``"torch"`` (torch's native ops after normlab's checks: a baseline and an escape
hatch). Set it with :func:`set_backend`, for a block with ``with use_backend("reference"):``,
or for a whole process with the environment variable ``NORMLAB_BACKEND``. ``torch.func``
transforms (``vmap``, ``grad``, ``jacrev``) take the reference path.

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
import os
from typing import Iterator

import torch

__all__ = ["BACKENDS", "COMPILE_MODES", "get_backend", "set_backend", "use_backend", "get_compile_mode",
           "set_compile_mode", "core"]

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


# ------------------------------------------------------------------------- the compiled core


_LOADED: bool | None = None


def load_core() -> bool:
    """Build (first time) or load the compiled core, and register its CUDA kernels; ``True``
    when it is there. :mod:`normlab.functional` calls it on import, so that code compiled by
    torch.compile finds the answer in place (dynamo cannot trace a build)."""
    global _LOADED
    if _LOADED is None:
        from . import build

        _LOADED = build.load()
        if _LOADED:
            # the CUDA implementation of the kernels (where Triton is), and the reference as the
            # operators the core falls back on (normlab::formula, formula_backward)
            from . import ops, reference  # noqa: F401
    return _LOADED


# What torch.compile gets: "fuse" — normlab's reference formula (normlab.autograd, plain torch ops
# and the written-out backward), which dynamo traces and inductor lowers and fuses with the norm's
# neighbours; "operators" — normlab's operators, which inductor calls as they are; "auto" (the
# default) — per norm, the one measured faster inside compiled models (README "Performance"):
# the formula for every norm today (_AUTO_FUSES).
COMPILE_MODES = ("auto", "fuse", "operators")
_AUTO_FUSES = ("layer_norm", "rms_norm", "group_norm", "batch_norm", "instance_norm")


def _check_compile(mode: str, where: str = "compile mode") -> str:
    if mode not in COMPILE_MODES:
        raise ValueError(f"{where} {mode!r}: choose one of {', '.join(COMPILE_MODES)}")
    return mode


COMPILE = _check_compile(os.environ.get("NORMLAB_COMPILE", "auto").strip().lower() or "auto", "NORMLAB_COMPILE=")


def get_compile_mode() -> str:
    """What code compiled by ``torch.compile`` runs for each norm: ``"auto"``, ``"fuse"`` or
    ``"operators"`` (:func:`set_compile_mode`)."""
    return COMPILE


def set_compile_mode(mode: str) -> str:
    """Choose what ``torch.compile`` gets for the norms, for the whole process; returns the previous
    mode. ``"fuse"``: normlab's reference formula in plain torch ops, which inductor fuses with
    the norm's neighbours (its statistics one pass over the shifted data, in float32 for float32
    and half-precision input); ``"operators"``: normlab's operators, opaque to inductor (float64
    statistics);
    ``"auto"`` (the default, or ``NORMLAB_COMPILE``): per norm, the one measured faster. It applies
    to code compiled after the call: ``torch._dynamo.reset()`` recompiles what was compiled before.
    """
    global COMPILE
    previous, COMPILE = COMPILE, _check_compile(mode)
    return previous


def _fuse(op: str) -> bool:
    return COMPILE == "fuse" or (COMPILE == "auto" and op in _AUTO_FUSES)


class _Traced:
    """The core as ``torch.ops.normlab`` calls, for code that torch.compile traces in the
    ``"operators"`` mode (dynamo understands operators, not the eager entry points of
    ``normlab._C``)."""

    @staticmethod
    def layer_norm(x, shape, weight, bias, eps):
        return torch.ops.normlab.layer_norm(x, _ints(shape), weight, bias, eps)

    @staticmethod
    def rms_norm(x, shape, weight, eps):
        return torch.ops.normlab.rms_norm(x, _ints(shape), weight, eps)

    @staticmethod
    def group_norm(x, groups, weight, bias, eps):
        return torch.ops.normlab.group_norm(x, groups, weight, bias, eps)

    @staticmethod
    def batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps):
        return torch.ops.normlab.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)

    @staticmethod
    def instance_norm(x, running_mean, running_var, weight, bias, use_input_stats, momentum, eps):
        return torch.ops.normlab.instance_norm(x, running_mean, running_var, weight, bias, use_input_stats,
                                               momentum, eps)


def keep_format(y: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Return ``y`` in the memory format of ``like`` where that is channels_last (reshapes lose
    it), else contiguous (as the core returns it for any other strides)."""
    for fmt in (torch.channels_last, torch.channels_last_3d):
        try:
            if like.is_contiguous(memory_format=fmt) and not like.is_contiguous():
                return y.contiguous(memory_format=fmt)
        except RuntimeError:  # format does not apply to this ndim
            continue
    return y.contiguous()


TRACED = _Traced  # what core() gives code being compiled: functional runs normlab's Python checks first


def _ints(shape):
    return [shape] if isinstance(shape, int) else list(shape)


_C = None


def core(op: str | None = None):
    """The compiled core's entry points (``layer_norm``, ``rms_norm``, ``group_norm``,
    ``batch_norm``, ``instance_norm``, torch.nn.functional's arguments, all positional) when
    the backend is ``"auto"`` and the core is there, else ``None``.

    Called by every norm (``op``: its name), so it is a few attribute reads: eager calls get
    ``normlab._C``, whose functions take their arguments directly (``torch.ops``' schema parsing
    costs as much as a small norm), code being compiled gets :class:`_Traced` (the
    ``torch.ops.normlab`` operators) or, where :data:`COMPILE` fuses ``op``, ``None`` (the
    reference formula, which inductor fuses with its neighbours), and ``torch.func``
    transforms get ``None`` (the reference, whose autograd.Function they can transform), and so
    do exporters — ``torch.export`` (and the ONNX exporter on top of it) and ``torch.jit.trace``
    (and ``torch.onnx.export(dynamo=False)``) — which then record torch's native ops (see
    :func:`native`): the exported program runs wherever torch does, without normlab."""
    global _C
    if torch.compiler.is_compiling():
        if (_backend != "auto" or torch._C._are_functorch_transforms_active() or torch.compiler.is_exporting()
                or (op is not None and _fuse(op))):
            return None
        return _Traced if _LOADED else None
    if ((_override.get() or _backend) != "auto" or torch._C._are_functorch_transforms_active()
            or torch.jit.is_tracing()):
        return None
    if _C is None:
        if not load_core():
            return None
        import normlab._C as entry

        _C = entry
    return _C


def native() -> bool:
    """Whether the Python path should call torch's native ops: the ``"torch"`` backend, or
    ``"auto"`` without the compiled core or while a model is exported (the reference runs only
    when asked for, and under ``torch.func`` transforms where the core is there)."""
    backend = get_backend()
    return backend == "torch" or (backend == "auto" and (not _LOADED or torch.jit.is_tracing()
                                                         or torch.compiler.is_exporting()))
