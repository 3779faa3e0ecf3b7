"""Build and load normlab's compiled core: the C++ operators of ``csrc/`` (``torch.ops.normlab``).

The core is compiled against the torch that is installed, at first use, with the system's C++
compiler (g++ or ``$CXX``), and cached: the shared library is kept under
``$NORMLAB_CACHE_DIR`` (default ``~/.cache/normlab``) in a folder named by a hash of the
sources, the torch version, the compiler and the flags, so later processes only load it (a few
milliseconds) and a new torch or a changed source builds anew. Building takes about 20 s on two
cores. Several processes may build at once: each writes its own file and moves it into place.

Where no compiler is found or the build fails, :func:`load` returns ``False`` and warns once,
naming the reason and the fix; normlab then runs on torch's own ops (see
:mod:`normlab.kernels`). ``NORMLAB_NO_BUILD=1`` skips the compiled core on purpose.

>>> from normlab.kernels import build
>>> build.load() in (True, False)
True
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
import warnings
from pathlib import Path

import torch

__all__ = ["load", "status", "library_path"]

SOURCES = tuple(Path(__file__).parent / "csrc" / name for name in ("norm_cpu.cpp", "norm_ops.cpp", "python.cpp"))
HEADERS = tuple(Path(__file__).parent / "csrc" / name for name in ("errors.h",))

_lock = threading.Lock()
_state: dict = {}


def _compiler() -> str | None:
    cxx = os.environ.get("CXX")
    if cxx:
        return cxx
    for name in ("g++", "c++", "clang++"):
        found = shutil.which(name)
        if found:
            return found
    return None


def _cpu_flags() -> list[str]:
    """Vector extensions the compiling machine has (the cache key records them)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    have = set(line.split())
    # at::vec's AVX2 specialisations (ATen compiles its own kernels so, once per capability)
    return (["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
            if {"avx2", "fma", "f16c"} <= have else [])


def _flags() -> list[str]:
    from torch.utils import cpp_extension

    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    return ["-fPIC", "-std=c++17", "-O3",
            # at::parallel_for is compiled here: with OpenMP it runs on torch's own thread pool
            # (the libgomp torch loads is the one the core binds to); no FMA contraction: the
            # backward's cancellations must be exact where they are 0
            "-fopenmp", "-ffp-contract=off", "-fno-math-errno", *_cpu_flags(),
            f"-D_GLIBCXX_USE_CXX11_ABI={abi}", "-w", *[f"-I{p}" for p in cpp_extension.include_paths()],
            f"-I{sysconfig.get_paths()['include']}"]


def _link_flags() -> list[str]:
    from torch.utils import cpp_extension

    lib = cpp_extension.library_paths()[0]
    return ["-shared", "-fopenmp", f"-L{lib}", f"-Wl,-rpath,{lib}", "-lc10", "-ltorch_cpu", "-ltorch", "-ltorch_python"]


def _cache_dir() -> Path:
    root = os.environ.get("NORMLAB_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "normlab")
    return Path(root)


def library_path(cxx: str | None = None) -> Path | None:
    """Where the compiled core for this torch, source and compiler lives (``None``: no compiler)."""
    cxx = cxx or _compiler()
    if cxx is None:
        return None
    h = hashlib.sha256()
    for src in SOURCES + HEADERS:
        h.update(src.read_bytes())
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        version = ""
    h.update(f"{torch.__version__}|{sys.version_info[:2]}|{version}|{_flags()}|{_link_flags()}".encode())
    return _cache_dir() / h.hexdigest()[:16] / "_C.so"


def _build(cxx: str, target: Path) -> None:
    """Compile each source in its own process (in parallel), link, and move into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=target.parent))
    try:
        objs = [work / f"{src.stem}.o" for src in SOURCES]
        jobs = [subprocess.Popen([cxx, "-c", str(src), "-o", str(obj), *_flags()], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for src, obj in zip(SOURCES, objs)]
        for job in jobs:
            _, err = job.communicate()
            if job.returncode != 0:
                raise RuntimeError(err.strip()[-2000:] or f"{cxx} exited with {job.returncode}")
        so = work / target.name
        run = subprocess.run([cxx, *map(str, objs), "-o", str(so), *_link_flags()], capture_output=True, text=True)
        if run.returncode != 0:
            raise RuntimeError(run.stderr.strip()[-2000:] or f"{cxx} exited with {run.returncode}")
        os.replace(so, target)  # atomic: a concurrent loader sees the old file or the whole new one
    finally:
        shutil.rmtree(work, ignore_errors=True)


def load() -> bool:
    """Load the compiled core, building it first if it is not cached; ``True`` when the
    ``torch.ops.normlab`` operators are there. Never raises: a failure warns once."""
    if "ok" in _state:
        return _state["ok"]
    with _lock:
        if "ok" not in _state:
            _state["ok"] = _load()
    return _state["ok"]


def _load() -> bool:
    if os.environ.get("NORMLAB_NO_BUILD", "").strip() not in ("", "0"):
        _state["why"] = "NORMLAB_NO_BUILD is set"
        return False
    if "normlab._C" in sys.modules:  # already loaded in this process
        return True
    cxx = _compiler()
    if cxx is None:
        return _fail("no C++ compiler found (looked for $CXX, g++, c++, clang++)",
                     "install one (e.g. `apt-get install g++`), or set CXX")
    target = library_path(cxx)
    try:
        if not target.exists():
            _build(cxx, target)
        _import(target)
    except Exception as err:  # a failed build or load: normlab still runs, on torch's ops
        return _fail(f"building it with {cxx} failed: {str(err).splitlines()[-1] if str(err) else err!r}",
                     f"see the full message with `python -c \"from normlab.kernels import build; "
                     f"build._build('{cxx}', build.library_path())\"`")
    _state["path"] = str(target)
    return True


def _import(path: Path) -> None:
    """Load the library as the extension module ``normlab._C`` (its static initialisers register
    the ``torch.ops.normlab`` operators)."""
    spec = importlib.util.spec_from_file_location("normlab._C", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules["normlab._C"] = module


def _fail(why: str, fix: str) -> bool:
    _state["why"] = why
    warnings.warn(f"normlab: the compiled core is not available ({why}); normlab runs on torch's own ops "
                  f"instead. To get it: {fix}.", RuntimeWarning, stacklevel=4)
    return False


def status() -> dict:
    """``{"loaded": bool, "path": ..., "why": ...}``: whether the core is in use, from where, or why not."""
    return {"loaded": load(), "path": _state.get("path"), "why": _state.get("why")}
