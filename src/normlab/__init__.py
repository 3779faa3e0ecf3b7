"""normlab — the normalization toolkit and lab for PyTorch.

Layers (imports point down only): ``stats`` (the one moments core) → ``kernels`` (fast
backends; ``normlab.set_backend``) → ``autograd`` (written-out backward passes) → ``functional``
(the ops) → ``nn`` (modules) and ``preprocessing`` (scalers) → ``diagnostics`` → ``lab``.
Submodules load on first use: ``import normlab; normlab.nn.BatchNorm2d(8)`` works.
"""

import importlib
from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("normlab")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

_SUBMODULES = ("errors", "stats", "autograd", "kernels", "functional", "nn", "preprocessing", "convert", "distributed", "diagnostics", "lab", "cli")
_BACKEND = ("set_backend", "get_backend", "use_backend", "set_compile_mode", "get_compile_mode")  # normlab.kernels
_ERRORS = ("ShapeError", "StateError", "DTypeError")  # from normlab.errors
__all__ = ["__version__", *_ERRORS, *_SUBMODULES, *_BACKEND]


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    if name in _ERRORS:
        return getattr(importlib.import_module(f"{__name__}.errors"), name)
    if name in _BACKEND:
        return getattr(importlib.import_module(f"{__name__}.kernels"), name)
    raise AttributeError(f"module 'normlab' has no attribute {name!r}")
