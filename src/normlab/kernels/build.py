"""Build and load normlab's compiled core: the C++ operators of ``csrc/`` (``torch.ops.normlab``).

The core is compiled against the torch that is installed, at first use (or ahead of it with
``normlab build``), with the system's C++ compiler (g++ or ``$CXX``), and cached: the shared
library is kept under ``$NORMLAB_CACHE_DIR`` (default ``~/.cache/normlab``) in a folder named by
a hash of the sources (with ``rules.h``, the rulebook of :mod:`normlab.rules` as C++, which
the build writes beside them), the torch version, the compiler and the flags, so later processes only
load it and a new torch or a changed source builds anew. Building takes 30-60 s on two cores and
says so on stderr; processes that start at once build it once (a file lock), the others wait.

The cache is trusted only as far as it can be: its folders are made readable by this user only;
a library is loaded only where it and its folder belong to this user (or root), nobody else can
write to them, and its bytes match the SHA-256 written beside it when it was built. A library
that is missing, cut short, changed or foreign is built again (saying what was found); a cache
folder that cannot be made private is not used, and the core is built in a private temporary
folder instead.

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

__all__ = ["load", "status", "info", "prebuild", "library_path"]

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
    """Vector extensions for at::vec: the width torch's own CPU kernels run at on this machine
    (``torch.backends.cpu.get_cpu_capability()``, which follows ``ATEN_CPU_CAPABILITY``), where the
    compiling machine has them too (the cache key records the flags)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    have = set(line.split())
    try:
        torch_runs = torch.backends.cpu.get_cpu_capability()
    except Exception:  # noqa: BLE001 - an older torch: AVX2 where the machine has it
        torch_runs = "AVX2"
    # at::vec's specialisations, with the flags ATen compiles its own kernels with, per capability
    if torch_runs == "AVX512" and {"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma", "f16c"} <= have:
        return ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
                "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"]
    if torch_runs in ("AVX2", "AVX512") and {"avx2", "fma", "f16c"} <= have:
        return ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    return []


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


def _rules_header() -> str:
    from .. import rules

    return rules.cpp_header()


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
    h.update(_rules_header().encode())
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        version = ""
    h.update(f"{torch.__version__}|{sys.version_info[:2]}|{version}|{_flags()}|{_link_flags()}".encode())
    return _cache_dir() / h.hexdigest()[:16] / "_C.so"


# ------------------------------------------------------------------------- the cache's rules
# Only a library this user (or root) wrote, in folders nobody else can write to, whose bytes
# match the checksum written beside it when it was built, is ever loaded: a library planted by
# another user would run its code in this process, and one cut short (a full disk, a killed
# build) kills the process with SIGBUS when it is mapped.

def _checksum_path(lib: Path) -> Path:
    return lib.with_name(lib.name + ".sha256")


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _trusted(st: os.stat_result) -> str | None:
    """Why a file or folder with this stat must not be trusted, or None."""
    uid = os.getuid() if hasattr(os, "getuid") else None
    if uid is not None and st.st_uid not in (uid, 0):
        return f"it belongs to another user (uid {st.st_uid})"
    if st.st_mode & 0o022:
        return f"other users can write to it (mode {st.st_mode & 0o777:o})"
    return None


def _private_folder(folder: Path) -> str | None:
    """Create ``folder`` (and its missing parents in the cache) readable by this user only; an
    existing one of this user's that others can write to is made private. Returns why the
    folder cannot be used, or None."""
    for d in (folder.parent, folder):
        try:
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
            st = d.stat()
            if hasattr(os, "getuid") and st.st_uid == os.getuid() and st.st_mode & 0o077:
                os.chmod(d, 0o700)  # ours: nobody else may add or replace a file in it
                st = d.stat()
        except OSError as err:
            return f"{d} cannot be made private ({err.strerror or err})"
        if (why := _trusted(st)) is not None:
            return f"{d}: {why}"
    return None


def _problem(lib: Path) -> str | None:
    """What is wrong with the cached library, or None when it can be loaded."""
    if not lib.exists():
        return "missing"
    for path in (lib, _checksum_path(lib)):
        try:
            st = path.stat()
        except OSError:
            return "has no checksum beside it (an older normlab, or a build cut short)"
        if (why := _trusted(st)) is not None:
            return f"is not safe to load: {path.name} {why}"
    recorded = _checksum_path(lib).read_text().split()[:1]
    if recorded != [_digest(lib)]:
        return "does not match its checksum (cut short or changed since it was built)"
    return None


class _Lock:
    """An exclusive lock on ``folder/.lock`` (fcntl; nothing where there is none): concurrent
    first uses build once, the others wait and then load what it built."""

    def __init__(self, folder: Path):
        self.path = folder / ".lock"
        self.fd = None

    def __enter__(self):
        try:
            import fcntl
        except ImportError:  # not POSIX: each process builds into its own file, moved into place
            return self
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _say(f"normlab: waiting for another process that is compiling the C++ core in {self.path.parent} ...")
            fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            os.close(self.fd)  # releases the lock


def _say(line: str) -> None:
    """One line of progress on stderr (a first build takes tens of seconds: say what is going on)."""
    print(line, file=sys.stderr, flush=True)


def _build(cxx: str, target: Path) -> None:
    """Compile each source in its own process (in parallel), link, move into place, and write the
    checksum beside it (each file written whole, then renamed: a reader sees all or nothing)."""
    target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=target.parent))
    try:
        (work / "rules.h").write_text(_rules_header())  # the rulebook, from normlab/rules.py
        objs = [work / f"{src.stem}.o" for src in SOURCES]
        jobs = [subprocess.Popen([cxx, "-c", str(src), "-o", str(obj), f"-I{work}", *_flags()], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for src, obj in zip(SOURCES, objs)]
        for job in jobs:
            _, err = job.communicate()
            if job.returncode != 0:
                raise RuntimeError(err.strip()[-2000:] or f"{cxx} exited with {job.returncode}")
        so = work / target.name
        run = subprocess.run([cxx, *map(str, objs), "-o", str(so), *_link_flags()], capture_output=True, text=True)
        if run.returncode != 0:
            raise RuntimeError(run.stderr.strip()[-2000:] or f"{cxx} exited with {run.returncode}")
        os.chmod(so, 0o700)
        digest = _digest(so)
        with open(so, "rb") as f:
            os.fsync(f.fileno())
        sums = work / "sha256"
        sums.write_text(f"{digest}  {target.name}\n")
        os.chmod(sums, 0o600)
        os.replace(so, target)
        os.replace(sums, _checksum_path(target))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _ready(cxx: str, target: Path, force: bool = False) -> Path:
    """The path of a library safe to load: the cached one, checked, or one built now (in the
    cache, or in a private temporary folder where the cache cannot be trusted)."""
    unsafe = _private_folder(target.parent)
    if unsafe is None and not force and _problem(target) is None:
        return target
    if unsafe is not None:
        private = Path(tempfile.mkdtemp(prefix="normlab-core-")) / target.name  # 0700, this process's
        _say(f"normlab: not using the cache folder ({unsafe}); building the C++ core in {private.parent} "
             "instead. Set NORMLAB_CACHE_DIR to a folder only you can write to, to build it once")
        _announce_build(cxx, private)
        return private
    with _Lock(target.parent):
        problem = "asked for" if force else _problem(target)  # another process may have built it meanwhile
        if problem is None:
            return target
        if problem not in ("missing", "asked for"):
            _say(f"normlab: the cached C++ core {target} {problem}; building it again")
        _announce_build(cxx, target)
    return target


def _announce_build(cxx: str, target: Path) -> None:
    import time

    _say(f"normlab: compiling its C++ core for torch {torch.__version__} with {cxx} (once per torch and "
         f"compiler; about 30-60 s on 2 cores) into {target.parent} ... `normlab build` does this ahead of use")
    start = time.perf_counter()
    _build(cxx, target)
    _say(f"normlab: C++ core built in {time.perf_counter() - start:.0f} s")


def prebuild(force: bool = False) -> Path:
    """Build the compiled core now, if it is not cached and intact (``force``: anew), and return
    its path: for images and CI, so that no later process compiles. Raises ``RuntimeError`` with
    the compiler's whole message where it cannot be built."""
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (looked for $CXX, g++, c++, clang++); install one "
                           "(e.g. `apt-get install g++`), or set CXX")
    return _ready(cxx, library_path(cxx), force=force)


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
    _state["compiler"] = cxx
    target = library_path(cxx)
    try:
        target = _ready(cxx, target)
    except Exception as err:  # a failed build: normlab still runs, on torch's ops
        return _fail(f"building it with {cxx} failed: {str(err).splitlines()[-1] if str(err) else err!r}",
                     "see the compiler's whole message with `normlab build`")
    try:
        _import(target)
    except Exception as err:  # noqa: BLE001 - e.g. a library built against another torch
        return _fail(f"loading {target} failed: {err}", f"delete {target.parent} and run `normlab build`")
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


def info() -> dict:
    """What a bug report needs: torch, the core (loaded or not, and why), its path, the compiler
    and flags, the cache folder, and the backend and compile mode in force."""
    from . import get_backend, get_compile_mode

    st = status()
    return {"torch": torch.__version__, "core": "loaded" if st["loaded"] else f"not loaded: {st['why']}",
            "library": st["path"], "compiler": st["compiler"] or _compiler(), "flags": " ".join(f for f in _flags() if not f.startswith("-I")),
            "cache folder": str(_cache_dir()), "backend": get_backend(),
            "compile mode": get_compile_mode()}


def status() -> dict:
    """``{"loaded": bool, "path": ..., "why": ..., "compiler": ...}``: whether the core is in use,
    from where, or why not."""
    return {"loaded": load(), "path": _state.get("path"), "why": _state.get("why"), "compiler": _state.get("compiler")}
