"""normlab — the normalization toolkit and lab for PyTorch.

Layers (imports point down only): ``stats`` (the one moments core) → ``autograd`` (written-out
backward passes) → ``functional`` (the ops) → ``nn`` (modules) and ``preprocessing`` (scalers).
Submodules load on first use: ``import normlab; normlab.nn.BatchNorm2d(8)`` works.
"""

import importlib
from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("normlab")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

_SUBMODULES = ("stats", "autograd", "functional", "nn", "preprocessing", "diagnostics", "lab", "cli")
__all__ = ["__version__", *_SUBMODULES]


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'normlab' has no attribute {name!r}")
