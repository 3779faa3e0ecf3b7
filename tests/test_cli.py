import subprocess
import sys

import normlab
from normlab.cli import main


def test_version(capsys):
    try:
        main(["--version"])
    except SystemExit as e:
        assert e.code == 0
    assert normlab.__version__ in capsys.readouterr().out


def test_list_names_every_public_layer(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in ("BatchNorm2d", "GroupNorm", "weight_norm", "rms_norm", "StandardScaler", "MinMaxScaler"):
        assert name in out


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "usage" in capsys.readouterr().out


def test_python_dash_m():
    out = subprocess.run([sys.executable, "-m", "normlab", "list"], capture_output=True, text=True, check=True)
    assert "LayerNorm" in out.stdout


def test_submodules_load_on_first_use():
    assert normlab.nn.BatchNorm2d(2).num_features == 2
    assert set(normlab.__all__) >= {"stats", "functional", "nn", "preprocessing"}
    try:
        normlab.nope
    except AttributeError as e:
        assert "nope" in str(e)
    else:
        raise AssertionError("unknown attribute did not raise")


_WITHOUT_EXTRAS = """
import sys
for name in ("matplotlib", "rich", "transformers", "onnx", "onnxruntime", "triton"):
    sys.modules[name] = None  # as in an environment where `pip install normlab` installed no extra
import normlab.cli
sys.exit(normlab.cli.main(sys.argv[1:]))
"""


def _bare(*argv, cwd=None):
    return subprocess.run([sys.executable, "-c", _WITHOUT_EXTRAS, *argv], capture_output=True, text=True, cwd=cwd)


def test_without_the_lab_extra_run_and_report_say_how_to_get_it(tmp_path):
    for argv in (["run"], ["run", "zscore", "--out", str(tmp_path / "r")], ["report", str(tmp_path)]):
        done = _bare(*argv)
        assert done.returncode == 2, done.stderr
        assert done.stderr.strip().count("\n") == 0 and "pip install 'normlab[lab]'" in done.stderr
        assert "Traceback" not in done.stderr and not (tmp_path / "r").exists()
    listed = _bare("list")
    assert listed.returncode == 0 and "BatchNorm2d" in listed.stdout and "zscore" in listed.stdout
    library = subprocess.run([sys.executable, "-c", _WITHOUT_EXTRAS.split("import normlab.cli")[0] + (
        "import torch, normlab.nn as N, normlab.convert as C, normlab.preprocessing as P, normlab.diagnostics, "
        "normlab.distributed\n"
        "m = C.fold_batchnorm(torch.nn.Sequential(torch.nn.Linear(3, 3), N.BatchNorm1d(3)).eval())\n"
        "print(P.StandardScaler().fit(torch.randn(8, 3)).transform(torch.randn(2, 3)).shape)\n")],
        capture_output=True, text=True)
    assert library.returncode == 0 and "torch.Size([2, 3])" in library.stdout, library.stderr


def test_bench_prints_a_plain_table_without_rich(monkeypatch, capsys):
    from normlab import bench

    monkeypatch.setitem(sys.modules, "rich", None)
    monkeypatch.setitem(sys.modules, "rich.console", None)
    monkeypatch.setattr(bench, "SHAPES", {"rows": ([(8, 16)], [(8, 16)]), "nchw": ([(2, 4, 3, 3)], [(2, 4, 3, 3)])})
    monkeypatch.setattr(bench, "_retain_freed_memory", lambda: True)
    assert main(["bench", "rms_norm", "--quick", "--no-compile"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:2] == ["method", "shape"]
    assert out[1].split()[0] == "rms_norm" and any("median speed-up vs torch" in line for line in out)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main(["bench", "rms_norm", "--quick", "--plot", "x.png"]) == 2
    assert "pip install 'normlab[lab]'" in capsys.readouterr().err
