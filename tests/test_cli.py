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
