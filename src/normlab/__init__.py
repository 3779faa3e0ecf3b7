"""normlab — the normalization toolkit and lab for PyTorch.

Layers (imports point down only): ``stats`` (the one moments core) → ``autograd`` (written-out
backward passes) → ``functional`` (the ops) → ``nn`` (modules) and ``preprocessing`` (scalers).
"""

from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("normlab")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

from . import stats  # noqa: E402

__all__ = ["__version__", "stats"]
