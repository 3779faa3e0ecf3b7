"""Exported normlab models: torch.export, torch.jit.trace and ONNX (both exporters), checked
by running what was written (onnxruntime for the ONNX files)."""

import warnings

import pytest
import torch

import normlab.nn as nln

from conftest import assert_rel


def _model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), nln.BatchNorm2d(4), nln.GroupNorm(2, 4), nln.InstanceNorm2d(4, affine=True),
        torch.nn.Flatten(), torch.nn.Linear(144, 8), nln.LayerNorm(8), nln.RMSNorm(8, eps=1e-6),
    )
    model(torch.randn(8, 3, 8, 8) * 3 + 1)  # running statistics that are not the defaults
    return model.eval()


def test_torch_export_records_torch_ops_only():
    model, x = _model(), torch.randn(2, 3, 8, 8)
    ep = torch.export.export(model, (x,))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert not any("normlab" in t for t in targets) and "aten.layer_norm.default" in targets
    assert_rel(ep.module()(x), model(x))


@pytest.mark.parametrize("dynamo", [False, True])
def test_onnx_export_runs_in_onnxruntime_with_the_same_outputs(tmp_path, dynamo):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    model, x = _model(), torch.randn(2, 3, 8, 8) * 2 + 1
    path = tmp_path / "model.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path), dynamo=dynamo)
    session = ort.InferenceSession(str(path))
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    assert_rel(torch.from_numpy(got), model(x).detach(), tol=1e-5)
