"""GlorotMonitor: exact statistics against direct computation, the Glorot & Bengio (2010)
effect, saturation, supported layer kinds, and a model left untouched by remove()."""

from __future__ import annotations

import copy
import math
import pickle

import pytest
import torch
from torch import nn

import normlab.nn as nlnn
from normlab.diagnostics import GlorotMonitor


def mlp(widths, act=nn.Tanh):
    mods = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        mods.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            mods.append(act())
    return nn.Sequential(*mods)


def unrolled(model: nn.Sequential, x, loss_fn=lambda y: y.square().mean()):
    """Run ``model`` child by child; return each child's output and ``∂L/∂output`` (the
    oracle: plain autograd, no hooks involved)."""
    outs, h = [], x
    for child in model:
        h = child(h)
        outs.append(h)
    grads = torch.autograd.grad(loss_fn(h), outs)
    return [o.detach() for o in outs], grads


def by_name(mon):
    return {r["name"]: r for r in mon.stats()}


def close(a, b, rtol=1e-5):
    b = float(b.detach()) if isinstance(b, torch.Tensor) else b
    return math.isclose(a, b, rel_tol=rtol, abs_tol=0)


# ------------------------------------------------------------------------------ exactness
def test_statistics_match_direct_computation_over_two_batches():
    model = mlp([6, 8, 8, 3])
    batches = [torch.randn(5, 6), torch.randn(9, 6)]
    ref = copy.deepcopy(model)
    outs, grads = zip(*(unrolled(ref, x) for x in batches))

    with GlorotMonitor(model) as mon:
        for x in batches:
            model(x).square().mean().backward()
    rows = by_name(mon)
    assert list(rows) == ["0", "2", "4"]
    for i, name in enumerate(rows):
        k = int(name)
        y = torch.cat([o[k].flatten() for o in outs]).double()
        g = torch.cat([gr[k].flatten() for gr in grads]).double()
        assert rows[name]["calls"] == 2
        assert close(rows[name]["forward_mean"], y.mean())
        assert close(rows[name]["forward_var"], y.var())  # unbiased, torch.var's default
        assert close(rows[name]["backward_var"], g.var())
        assert close(rows[name]["weight_grad_var"], model[k].weight.grad.double().var())
        if k < 4:
            a = torch.cat([o[k + 1].flatten() for o in outs]).double()
            assert rows[name]["activation"] == "Tanh"
            assert close(rows[name]["activation_var"], a.var())
        else:
            assert "activation" not in rows[name]

    wg = mon.weight_grads()
    assert list(wg) == ["0", "2", "4"]
    assert wg["2"].dtype == torch.float32 and wg["2"].dim() == 1 and not wg["2"].requires_grad
    assert torch.equal(wg["2"], model[2].weight.grad.flatten())
    assert wg["2"].data_ptr() != model[2].weight.grad.data_ptr()


def test_reset_forgets_and_summary_directions():
    model = mlp([4, 4, 4, 4, 4])
    mon = GlorotMonitor(model)
    model(torch.randn(3, 4)).sum().backward()
    mon.reset()
    row = mon.stats()[0]
    assert row["calls"] == 0 and math.isnan(row["forward_var"]) and math.isnan(row["backward_var"])
    assert math.isnan(mon.summary()["forward_end_to_end"])
    model(torch.randn(10, 4)).square().sum().backward()
    rows, s = mon.stats(), mon.summary()
    hidden = rows[:-1]  # the last Linear is the output layer: named, not measured
    assert s["hidden_layers"] == ["0", "2", "4"] and s["output_layer"] == "6"
    end = hidden[-1]["forward_var"] / hidden[0]["forward_var"]
    assert close(s["forward_end_to_end"], end, 1e-12) and close(s["forward_per_layer"], end ** 0.5, 1e-12)
    back = hidden[0]["backward_var"] / hidden[-1]["backward_var"]
    assert close(s["backward_end_to_end"], back, 1e-12) and close(s["backward_per_layer"], back ** 0.5, 1e-12)
    logs = [math.log10(r["forward_var"]) for r in hidden]
    assert close(s["forward_log_spread"], max(logs) - min(logs), 1e-12)
    assert "forward_ratio" not in s  # one name per quantity
    mon.remove()


def test_inplace_activation_downstream_reports_grad_of_layer_output():
    # a module full-backward hook would fail here; the tensor hook sees the pre-ReLU gradient
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(inplace=True), nn.Linear(5, 2))
    x = torch.randn(7, 4)
    with GlorotMonitor(model) as mon:
        model(x).square().sum().backward()
    h = model[0](x)
    (g,) = torch.autograd.grad(model[2](torch.relu(h)).square().sum(), h)
    assert close(mon.stats()[0]["backward_var"], g.double().var())


# ------------------------------------------------------------------------------ Glorot & Bengio
def _deep_tanh(xavier: bool):
    torch.manual_seed(0)
    model = mlp([256] * 9)  # 8 Linear(256, 256) with tanh between
    if xavier:
        for m in model:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
    with GlorotMonitor(model) as mon:
        model(torch.randn(512, 256)).square().mean().backward()
    return mon


def test_glorot_bengio_default_init_shrinks_xavier_keeps():
    default, xavier = _deep_tanh(False).summary(), _deep_tanh(True).summary()
    assert len(default["hidden_layers"]) == len(xavier["hidden_layers"]) == 7 and default["output_layer"] == "14"
    # torch's default Var[W] = 1/(3 n_in): the variance shrinks ~1/3 per layer both ways
    # (measured 0.43 forward, 0.32 backward per layer; 7e-3 and 1e-3 end to end)
    assert 0.25 < default["forward_per_layer"] < 0.55 and default["backward_per_layer"] < 0.45
    assert default["forward_end_to_end"] < 0.03 and default["backward_end_to_end"] < 0.01  # vanishing
    # Xavier (measured 0.67 forward, 0.76 backward per layer): far closer to 1
    assert xavier["forward_per_layer"] > default["forward_per_layer"] + 0.15
    assert xavier["backward_per_layer"] > 0.6 > 0.45 > default["backward_per_layer"]
    assert xavier["forward_log_spread"] < default["forward_log_spread"] - 0.5
    assert xavier["backward_log_spread"] < 1.5 < 2.5 < default["backward_log_spread"]


# ------------------------------------------------------------------------------ saturation
@pytest.mark.parametrize("scale, lo, hi", [(30.0, 0.9, 1.0), (1e-3, 0.0, 0.01)])
def test_sigmoid_saturation(scale, lo, hi):
    model = mlp([32, 64, 64, 1], act=nn.Sigmoid)
    with torch.no_grad():
        for m in model:
            if isinstance(m, nn.Linear):
                m.weight.normal_(0, scale)
                m.bias.zero_()
    with GlorotMonitor(model) as mon:
        model(torch.randn(256, 32))
    sat = [r["saturation"] for r in mon.stats()[:2]]
    assert all(lo <= s <= hi for s in sat), sat


def test_tanh_saturation_threshold_and_relu_dead_fraction():
    model = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 1), nn.GELU())
    with torch.no_grad():
        model[0].weight.fill_(1.0)
        model[0].bias.zero_()
        model[2].weight.copy_(torch.eye(4))
        model[2].bias.fill_(-10.0)  # every pre-activation < 0: every ReLU unit dead
    x = torch.tensor([[0.0, 0.0], [0.1, 0.1], [5.0, 5.0], [-5.0, -5.0]])
    with GlorotMonitor(model, saturation=0.99) as mon:
        model(x)
    rows = mon.stats()
    assert rows[0]["saturation"] == 0.5  # tanh(10) and tanh(-10) saturate, tanh(0), tanh(0.2) do not
    assert rows[1]["activation"] == "ReLU" and rows[1]["saturation"] == 1.0
    assert rows[2]["activation"] == "GELU" and math.isnan(rows[2]["saturation"])


def test_bad_saturation_threshold():
    with pytest.raises(ValueError, match="saturation"):
        GlorotMonitor(mlp([2, 2]), saturation=1.5)


# ------------------------------------------------------------------------------ layer kinds
def test_conv2d_model():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 3), nn.Flatten(), nn.Linear(2 * 6 * 6, 5)
    )
    x = torch.randn(4, 3, 8, 8)
    ref = copy.deepcopy(model)
    outs, grads = unrolled(ref, x)
    with GlorotMonitor(model) as mon:
        model(x).square().mean().backward()
    rows = by_name(mon)
    assert [(n, r["type"]) for n, r in rows.items()] == [("0", "Conv2d"), ("2", "Conv2d"), ("4", "Linear")]
    for name, r in rows.items():
        assert close(r["forward_var"], outs[int(name)].double().var())
        assert close(r["backward_var"], grads[int(name)].double().var())
        assert close(r["weight_grad_var"], model[int(name)].weight.grad.double().var())
    assert rows["0"]["activation"] == "ReLU"


def test_normlab_layers_and_batchnorm_in_between():
    model = nn.Sequential(
        nn.Linear(5, 8), nlnn.BatchNorm1d(8), nn.ReLU(), nlnn.CosineLinear(8, 6), nlnn.LayerNorm(6), nn.Linear(6, 2)
    )
    x = torch.randn(16, 5)
    ref = copy.deepcopy(model)
    outs, grads = unrolled(ref, x)
    with GlorotMonitor(model) as mon:
        model(x).square().mean().backward()
    rows = by_name(mon)
    assert list(rows) == ["0", "3", "5"]  # BatchNorm1d and LayerNorm have 1-D weights
    assert rows["0"]["activation"] == "ReLU" and rows["0"]["activation_via"] == ["BatchNorm1d"]  # data flow
    assert rows["3"]["type"] == "CosineLinear"
    for name, r in rows.items():
        assert close(r["forward_var"], outs[int(name)].double().var())
        assert close(r["backward_var"], grads[int(name)].double().var(), 1e-4)


@pytest.mark.parametrize("wn", [nlnn.weight_norm, torch.nn.utils.parametrizations.weight_norm])
def test_weight_normed_layers(wn):
    model = nn.Sequential(wn(nn.Linear(4, 6)), nn.Tanh(), nn.Linear(6, 1))
    x = torch.randn(8, 4)
    with GlorotMonitor(model) as mon:
        model(x).square().mean().backward()
    rows = mon.stats()
    assert [r["name"] for r in rows] == ["0", "2"]  # not the parametrization holders
    v = model[0].parametrizations.weight.original1
    assert close(rows[0]["weight_grad_var"], v.grad.double().var())
    assert torch.equal(mon.weight_grads()["0"], v.grad.flatten())
    assert close(rows[0]["forward_var"], model[0](x).double().var())


def test_custom_module_with_weight_parameter():
    class Bilinear(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(3, 4))
            self.scale = nn.Parameter(torch.ones(3))

        def forward(self, x):
            return (x @ self.weight.t()) * self.scale

    model = nn.Sequential(Bilinear(), nn.Sigmoid())
    x = torch.randn(10, 4)
    with GlorotMonitor(model) as mon:
        model(x).sum().backward()
    (row,) = mon.stats()
    assert row["name"] == "0" and row["type"] == "Bilinear" and row["activation"] == "Sigmoid"
    assert close(row["weight_grad_var"], model[0].weight.grad.double().var())


def test_no_grad_records_forward_only():
    model = mlp([4, 8, 8, 2])
    with GlorotMonitor(model) as mon:
        with torch.no_grad():
            y = model(torch.randn(6, 4))
    (first, _, last) = mon.stats()
    assert close(last["forward_var"], y.double().var())
    assert first["calls"] == 1
    assert math.isnan(first["backward_var"]) and math.isnan(first["weight_grad_var"])
    s = mon.summary()
    assert math.isnan(s["backward_end_to_end"]) and math.isnan(s["backward_log_spread"])
    assert s["forward_end_to_end"] > 0
    assert mon.weight_grads() == {}


# ------------------------------------------------------------------------------ selection
def test_layers_by_names_and_types():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Tanh(), nn.Linear(4, 2))
    by_names = GlorotMonitor(model, layers=["3", "1"])
    assert by_names.layers == ["1", "3"]  # named_modules() order, not the order given
    by_types = GlorotMonitor(model, layers=[nn.LayerNorm])
    assert by_types.layers == ["1"]
    model(torch.randn(5, 4)).sum().backward()
    (ln,) = by_types.stats()
    assert ln["activation"] == "Tanh"
    assert close(ln["weight_grad_var"], model[1].weight.grad.double().var())
    assert "layers=2" in repr(by_names) and "active" in repr(by_names)
    by_names.remove()
    by_types.remove()
    assert "removed" in repr(by_types)
    none = GlorotMonitor(model, activations=[])
    assert "activation" not in none.stats()[0]
    none.remove()


def test_clear_errors():
    with pytest.raises(ValueError, match=r"no layer found.*layers="):
        GlorotMonitor(nn.Sequential(nn.Tanh(), nn.LayerNorm(3)))
    with pytest.raises(ValueError, match=r"no layer found.*Conv2d"):
        GlorotMonitor(mlp([2, 2]), layers=[nn.Conv2d])
    with pytest.raises(ValueError, match=r"no submodule named 'fc'.*'0'"):
        GlorotMonitor(mlp([2, 2]), layers=["fc"])
    with pytest.raises(TypeError, match="module names"):
        GlorotMonitor(mlp([2, 2]), layers=[3])
    with pytest.raises(TypeError, match="nn.Module"):
        GlorotMonitor(lambda x: x)


# ------------------------------------------------------------------------------ leaves no trace
_HOOK_DICTS = [
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
]


def _grads(model):
    return [p.grad.clone() for p in model.parameters()]


def test_remove_leaves_model_untouched():
    torch.manual_seed(1)
    model = nn.Sequential(
        nlnn.weight_norm(nn.Conv2d(2, 3, 3)), nlnn.BatchNorm2d(3), nn.ReLU(inplace=True),
        nn.Flatten(), nn.Linear(3 * 4 * 4, 2),
    )
    twin = copy.deepcopy(model)
    keys = list(model.state_dict())
    x = torch.randn(4, 2, 6, 6)

    y_twin = twin(x)
    y_twin.square().sum().backward()
    with GlorotMonitor(model) as mon:
        assert len(model[0]._forward_hooks) == 1
        y = model(x)
        y.square().sum().backward()
    assert torch.equal(y, y_twin)  # the hooks changed neither outputs ...
    assert all(torch.equal(a, b) for a, b in zip(_grads(model), _grads(twin)))  # ... nor grads
    mon.remove()  # twice: a no-op

    for m in model.modules():
        for d in _HOOK_DICTS:
            assert len(getattr(m, d)) == 0, (m, d)
    assert list(model.state_dict()) == keys
    # BN's running stats moved in both, by the same batch
    assert all(torch.equal(v, twin.state_dict()[k]) for k, v in model.state_dict().items())
    pickle.loads(pickle.dumps(model))
    clone = copy.deepcopy(model)
    twin.load_state_dict(model.state_dict())
    for m in (model, clone, twin):
        m.zero_grad()
        m(x).square().sum().backward()
    assert torch.equal(model(x), clone(x))
    assert all(torch.equal(a, b) for a, b in zip(_grads(model), _grads(clone)))
    assert all(torch.equal(a, b) for a, b in zip(_grads(model), _grads(twin)))


def test_tensor_hooks_do_not_outlive_remove():
    model = mlp([3, 4, 1])
    mon = GlorotMonitor(model)
    y = model(torch.randn(5, 3))  # tensor hooks now pending on the outputs
    mon.remove()
    y.sum().backward()
    assert all(math.isnan(r["backward_var"]) for r in mon.stats())
    assert mon.stats()[0]["calls"] == 1


def test_activations_pair_with_the_layer_that_feeds_them():
    class Block(nn.Module):  # torchvision's BasicBlock: one ReLU object used after two convs
        def __init__(self):
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)
            self.relu = nn.ReLU()
            self.conv2, self.bn2 = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)
            self.head = nn.Linear(3, 2)

        def forward(self, x):
            y = self.relu(self.bn1(self.conv1(x)))
            y = self.relu(self.bn2(self.conv2(y)) + x)  # after the residual sum: fed by no layer
            return self.head(self.relu(y).mean((2, 3)))

    model = Block()
    x = torch.randn(4, 3, 6, 6)
    with GlorotMonitor(model) as mon:
        model(x).sum().backward()
    rows = by_name(mon)
    assert rows["conv1"]["activation"] == "ReLU" and rows["conv1"]["activation_via"] == ["BatchNorm2d"]
    want = torch.relu(model.bn1(model.conv1(x))).detach().double()
    assert close(rows["conv1"]["activation_var"], want.var(), 1e-6)
    assert close(rows["conv1"]["saturation"], float((want == 0).double().mean()), 1e-6)  # dead ReLUs of conv1
    assert "activation" not in rows["conv2"] and "activation" not in rows["head"]
    s = mon.summary()
    assert s["hidden_layers"] == ["conv1", "conv2"] and s["output_layer"] == "head"


def test_layers_never_called_are_not_the_first_hidden_layer():
    model = nn.Sequential(nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), 2),
                          nn.Linear(16, 4))
    with GlorotMonitor(model) as mon:
        model(torch.randn(3, 5, 16)).square().mean().backward()
    s = mon.summary()
    assert not any("out_proj" in n for n in s["hidden_layers"]) and s["output_layer"] == "1"
    assert math.isfinite(s["forward_per_layer"]) and math.isfinite(s["backward_per_layer"])
