"""The compiled core: cached builds, and normlab without it (no compiler, or opted out)."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from normlab.kernels import build

PROBE = textwrap.dedent("""
    import warnings, torch
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import normlab.functional as F
        from normlab import kernels
        x = torch.randn(4, 6, 3, 3)
        ok = all([
            torch.equal(F.layer_norm(x, (3,)), torch.nn.functional.layer_norm(x, (3,))),
            torch.equal(F.group_norm(x, 3), torch.nn.functional.group_norm(x, 3)),
            torch.equal(F.batch_norm(x, None, None, training=True),
                        torch.nn.functional.batch_norm(x, None, None, training=True)),
            kernels.core() is None, kernels.native(),
        ])
        F.rms_norm(x, (3,))
    print(ok, sum("compiled core is not available" in str(w.message) for w in caught))
""")


def _probe(tmp_path, **env):
    run = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "NORMLAB_CACHE_DIR": str(tmp_path), **env})
    assert run.returncode == 0, run.stderr
    return run.stdout.split()


def test_without_a_compiler_normlab_runs_on_torch_and_says_so_once(tmp_path):
    assert _probe(tmp_path, CXX=str(tmp_path / "no-such-compiler")) == ["True", "1"]
    assert not list(tmp_path.rglob("*.so"))


def test_opting_out_runs_on_torch_silently(tmp_path):
    assert _probe(tmp_path, NORMLAB_NO_BUILD="1") == ["True", "0"]


def test_the_core_is_cached_by_source_torch_and_compiler():
    status = build.status()
    assert status["loaded"] and os.path.exists(status["path"])
    assert str(build.library_path()) == status["path"]  # what this process loaded is what a new one finds
    assert torch.__version__  # part of the key, with the sources, the compiler and the flags


# ------------------------------------------------------------------------ the cache's safety
# A stand-in for the compiler: "compiles" nothing and "links" by copying the core this process
# loaded, so that every scenario builds in milliseconds; each build is logged.
FAKE_CXX = textwrap.dedent("""\
    #!/bin/sh
    [ "$1" = "--version" ] && { echo "fake-cxx 1.0"; exit 0; }
    out=""; prev=""
    for a in "$@"; do [ "$prev" = "-o" ] && out="$a"; prev="$a"; done
    case "$out" in
      *.o) : > "$out" ;;
      *) sleep "${FAKE_SLEEP:-0}"; echo link >> "$FAKE_LOG"; cp "$REAL_CORE" "$out" ;;
    esac
    """)

CORE_PROBE = textwrap.dedent("""
    import normlab.functional as F, torch
    from normlab import kernels
    from normlab.kernels import build
    x = torch.randn(4, 6)
    assert torch.allclose(F.layer_norm(x, (6,)), torch.nn.functional.layer_norm(x, (6,)), atol=1e-6)
    print(kernels.core() is not None, build.status()["path"])
""")


def _fake(tmp_path):
    cxx = tmp_path / "fake-cxx"
    cxx.write_text(FAKE_CXX)
    cxx.chmod(0o755)
    real = build.status()["path"]
    env = {**os.environ, "CXX": str(cxx), "NORMLAB_CACHE_DIR": str(tmp_path / "cache"), "REAL_CORE": real,
           "FAKE_LOG": str(tmp_path / "log")}
    return env


def _core(env, umask=None):
    """(loaded, path, stderr) of a fresh process that imports normlab and runs a LayerNorm."""
    run = subprocess.run([sys.executable, "-c", CORE_PROBE], capture_output=True, text=True, timeout=300, env=env,
                         preexec_fn=(lambda: os.umask(umask)) if umask is not None else None)
    assert run.returncode == 0, run.stderr  # never a crash (SIGBUS, SIGSEGV), whatever the cache holds
    loaded, path = run.stdout.split()
    return loaded == "True", path, run.stderr


def _builds(tmp_path):
    log = tmp_path / "log"
    return len(log.read_text().split()) if log.exists() else 0


def test_a_first_use_says_it_builds_and_later_ones_load_what_it_checked(tmp_path):
    env = _fake(tmp_path)
    loaded, path, err = _core(env, umask=0)  # even with a umask of 000: private folders and files
    assert loaded and "compiling its C++ core" in err and "built in" in err and _builds(tmp_path) == 1
    lib = Path(path)
    for p in (lib.parent, lib.parent.parent):
        assert p.stat().st_mode & 0o077 == 0, oct(p.stat().st_mode)
    assert lib.stat().st_mode & 0o077 == 0 and (lib.parent / "_C.so.sha256").exists()
    assert _core(env) == (True, path, "") and _builds(tmp_path) == 1  # silent, no second build


@pytest.mark.parametrize("damage", ["truncated", "zeroed", "empty", "garbage", "no checksum"])
def test_a_damaged_cached_core_is_built_again_never_loaded(tmp_path, damage):
    env = _fake(tmp_path)
    _, path, _ = _core(env)
    lib = Path(path)
    data = lib.read_bytes()
    if damage == "truncated":
        lib.write_bytes(data[: len(data) // 2])
    elif damage == "zeroed":
        lib.write_bytes(data[:4096] + bytes(len(data) - 4096))
    elif damage == "empty":
        lib.write_bytes(b"")
    elif damage == "garbage":
        lib.write_bytes(b"not a library\n" * 100)
    else:
        (lib.parent / "_C.so.sha256").unlink()
    loaded, again, err = _core(env)
    assert loaded and again == path and _builds(tmp_path) == 2
    assert ("checksum" in err) and "building it again" in err, err


def test_a_cache_folder_other_users_can_write_is_made_private_or_not_used(tmp_path):
    env = _fake(tmp_path)
    _, path, _ = _core(env)
    folder = Path(path).parent
    folder.chmod(0o777)  # ours, but opened up (a umask of 000 under an older normlab)
    loaded, again, err = _core(env)
    assert loaded and again == path and folder.stat().st_mode & 0o777 == 0o700 and _builds(tmp_path) == 1
    if os.getuid() != 0:
        pytest.skip("another user's files need root to make")
    os.chown(path, 4242, 4242)  # a library planted by another user is never loaded
    loaded, again, err = _core(env)
    assert loaded and again == path and "another user" in err and _builds(tmp_path) == 2
    assert Path(path).stat().st_uid == 0
    os.chown(folder.parent, 4242, 4242)  # a cache folder of another user's: build privately instead
    loaded, elsewhere, err = _core(env)
    assert loaded and not elsewhere.startswith(str(folder.parent)) and "not using the cache folder" in err
    assert _builds(tmp_path) == 3


def test_processes_starting_at_once_build_the_core_once(tmp_path):
    env = {**_fake(tmp_path), "FAKE_SLEEP": "3"}
    procs = [subprocess.Popen([sys.executable, "-c", CORE_PROBE], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert len({out.split()[1] for out, _ in outs}) == 1 and all(out.split()[0] == "True" for out, _ in outs)
    assert _builds(tmp_path) == 1


def test_normlab_build_and_info(tmp_path):
    env = _fake(tmp_path)
    cmd = [sys.executable, "-m", "normlab"]
    run = subprocess.run([*cmd, "build"], capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0 and "ready" in run.stdout and _builds(tmp_path) == 1, run.stderr
    run = subprocess.run([*cmd, "build", "--force"], capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0 and _builds(tmp_path) == 2
    run = subprocess.run([*cmd, "info"], capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0 and "loaded" in run.stdout and "fake-cxx" in run.stdout, run.stdout
    bad = {**env, "CXX": str(tmp_path / "no-such-compiler")}
    run = subprocess.run([*cmd, "build"], capture_output=True, text=True, timeout=300, env=bad)
    assert run.returncode == 1 and "could not be built" in run.stderr


@pytest.mark.parametrize("torch_runs, machine, expected", [
    ("AVX512", "avx2 fma f16c avx512f avx512bw avx512vl avx512dq", "AVX512"),
    ("AVX2", "avx2 fma f16c avx512f avx512bw avx512vl avx512dq", "AVX2"),  # ATEN_CPU_CAPABILITY=avx2
    ("AVX512", "avx2 fma f16c", "AVX2"),  # a machine without the extensions never gets them
    ("DEFAULT", "avx2 fma f16c", None),
])
def test_the_kernels_are_compiled_for_the_vector_width_torch_runs_at(monkeypatch, torch_runs, machine, expected):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: torch_runs)
    monkeypatch.setattr(build.Path, "read_text", lambda self: f"processor\t: 0\nflags\t\t: fpu sse2 {machine}\n")
    flags = build._cpu_flags()
    assert (f"-DCPU_CAPABILITY={expected}" in flags) if expected else flags == []
