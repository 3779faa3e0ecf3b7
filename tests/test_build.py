"""The compiled core: cached builds, and normlab without it (no compiler, or opted out)."""

import os
import subprocess
import sys
import textwrap

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
