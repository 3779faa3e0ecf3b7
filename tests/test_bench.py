"""`normlab bench`: the rows it reports and the files it writes (no timing is asserted)."""

import importlib.util
import json
import platform
import subprocess
import sys

import pytest
import torch

from normlab import bench
from normlab.cli import main

TINY = {"layer_norm": [(8, 16)], "rms_norm": [(8, 16)], "batch_norm": [(2, 4, 3, 3), (2, 4, 3, 3, "cl")],
        "batch_norm_eval": [(2, 4, 3, 3)], "group_norm": [(2, 32, 2, 2)], "instance_norm": [(2, 4, 3, 3), (6, 4)]}


def test_every_method_gives_a_row_per_shape_and_pass():
    rows = bench.run(quick=True, shapes=TINY, reps=2)
    got = {(r["method"], r["shape"], r["pass"]) for r in rows}
    assert ("batch_norm", "2×4×3×3 cl", "fwd+bwd") in got and ("layer_norm", "8×16", "fwd") in got
    assert not any(r["method"] == "instance_norm" and r["shape"] == "6×4" for r in rows)  # IN needs spatial dims
    assert len(rows) == 2 * (len(sum(TINY.values(), [])) - 1)
    for r in rows:
        assert set(r) == set(bench.COLUMNS) and r["ms"] > 0 and r["GB/s"] > 0 and r["vs compiled"] is None
        assert r["vs torch low"] <= r["vs torch"] <= r["vs torch high"]
    s = bench.summary(rows)
    assert set(s) == {"fwd", "fwd+bwd", "per method"} and s["fwd"]["min vs torch"] > 0
    assert s["per method"]["layer_norm fwd"]["min"] == next(r["vs torch"] for r in rows
                                                            if r["method"] == "layer_norm" and r["pass"] == "fwd")


@pytest.mark.parametrize("n", [5, 10, 31, 51, 100])
def test_speedup_interval_is_the_binomial_order_statistics_of_the_median(n):
    binom = pytest.importorskip("scipy.stats").binom
    ours = [1.01 + 0.01 * ((7 * i) % n) for i in range(n)]  # every ratio distinct, all below 1
    theirs = [1.0] * n
    ratios = sorted(a / b for a, b in zip(theirs, ours))
    mid, low, high = bench.speedup(theirs, ours)
    # scipy's binomial: the widest symmetric pair of order statistics covering the median at 95%
    k = max(1, max(j for j in range(n // 2 + 1) if binom.cdf(j - 1, n, 0.5) <= 0.025))
    assert mid == pytest.approx(sorted(ratios)[n // 2] if n % 2 else (ratios[n // 2 - 1] + ratios[n // 2]) / 2)
    assert (low, high) == (ratios[k - 1], ratios[n - k])
    assert binom.cdf(n - k, n, 0.5) - binom.cdf(k - 1, n, 0.5) >= 0.95 or k == 1
    assert bench.verdict(low, high) == "slower" and bench.verdict(0.9, 1.1) == "par"
    assert bench.verdict(*bench.speedup(ours, theirs)[1:]) == "faster"


def test_compiled_column_when_asked():
    rows = bench.run(quick=True, methods=["rms_norm"], shapes={"rms_norm": [(4, 8)]}, reps=1, compiled=True)
    assert all(r["vs compiled"] > 0 for r in rows)


def test_cli_writes_json_and_plot(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(bench, "SHAPES", {"rows": ([(8, 16)], [(8, 16)]), "nchw": ([(2, 4, 3, 3)], [(2, 4, 3, 3)])})
    calls = []
    monkeypatch.setattr(bench, "_retain_freed_memory", lambda: calls.append(1) or True)  # process-wide: not here
    out, png = tmp_path / "b.json", tmp_path / "b.png"
    assert main(["bench", "layer_norm", "batch_norm", "--quick", "--json", str(out), "--plot", str(png)]) == 0
    data = json.loads(out.read_text())
    assert calls == [1] and data["meta"]["malloc"] == "retain freed memory"
    assert {r["method"] for r in data["rows"]} == {"layer_norm", "batch_norm"} and "fwd+bwd" in data["summary"]
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert "median speed-up vs torch" in capsys.readouterr().out
    assert main(["bench", "conv_norm", "--quick"]) == 2
    with pytest.raises(SystemExit):
        main(["bench", "--dtype", "int8"])


def test_system_malloc_keeps_the_defaults(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "SHAPES", {"rows": ([(8, 16)], [(8, 16)]), "nchw": ([(2, 4, 3, 3)], [(2, 4, 3, 3)])})
    monkeypatch.setattr(bench, "_retain_freed_memory", lambda: pytest.fail("mallopt called"))
    out = tmp_path / "b.json"
    assert main(["bench", "rms_norm", "--quick", "--system-malloc", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["meta"]["malloc"] == "system"


def test_retaining_freed_memory_works_on_glibc():
    code = "from normlab.bench import _retain_freed_memory; print(_retain_freed_memory())"
    got = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert got == str(platform.libc_ver()[0] == "glibc")


def test_model_bench_runs_models_of_each_library_in_a_dtype():
    from normlab import bench_models

    pytest.importorskip("diffusers")
    names = ["gpt2", "diffusers-unet"] + (["timm-convnext"] if importlib.util.find_spec("timm") else [])
    rows = bench_models.run(names, sizes=("small",), reps=1, dtype=torch.bfloat16)
    assert [(r["model"], r["step"]) for r in rows] == [(n, s) for n in names for s in ("train", "eval")]
    assert all(r["dtype"] == "bfloat16" and r["converted"] > 0 and r["speed-up"] > 0 for r in rows)
    assert all(r["low"] <= r["speed-up"] <= r["high"] and r["verdict"] in ("faster", "par", "slower") for r in rows)
    assert "| bfloat16 |" in bench_models.table(rows)
    with pytest.raises(ValueError, match="unknown model"):
        bench_models.run(["nope"])


@pytest.mark.parametrize("rich", [True, False])
def test_printed_table_fits_a_terminal_and_says_what_it_compares(capsys, monkeypatch, rich):
    monkeypatch.setattr(bench, "SHAPES", {"rows": ([(8, 16)], [(8, 16)]), "nchw": ([(2, 4, 3, 3, "cl")], [])})
    monkeypatch.setattr(bench, "_retain_freed_memory", lambda: True)
    if not rich:
        monkeypatch.setitem(sys.modules, "rich.console", None)  # import fails: the plain-text table
    assert main(["bench", "layer_norm", "batch_norm", "--quick"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert max(map(len, lines)) <= 100, max(lines, key=len)
    assert "torch.nn.functional" in out and "target" not in out
    assert "vs compiled" not in out and "× compiled" in out  # named in the caption, no empty column
    head = next(line for line in lines if "method" in line)
    assert "peak MB" not in head and "× torch" in head
    assert not any(line.count("–") > 0 for line in lines if "layer_norm" in line)
    assert any(line.strip().startswith("layer_norm fwd ") and "shapes" in line for line in lines)
