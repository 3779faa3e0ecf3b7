"""pytest's collection from the repository root (testpaths: tests and src/normlab, with doctests)."""

import importlib.util

# the Triton kernels import triton at the top: where it is not installed (the test extra does
# not bring it; CPU-only machines need none) their module is not collected, and
# tests/test_kernels_triton.py skips
collect_ignore = [] if importlib.util.find_spec("triton") else ["src/normlab/kernels/triton.py"]
