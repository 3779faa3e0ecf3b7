"""normlab.convert: folding, scaler folding, precise BN, freezing."""

import copy
import pickle
import warnings

import numpy as np
import sklearn.preprocessing as skp
import pytest
import torch
from torch import nn

import normlab.nn as nln
from normlab.convert import (batchnorm_as_affine, fold_batchnorm, fold_scaler, freeze_norm, recalibrate_bn,
                             to_normlab, to_torch, unfreeze_norm)
from normlab.preprocessing import MinMaxScaler, StandardScaler

from conftest import assert_rel


def _trained(model, shape, steps=3):
    model.train()
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        model(torch.randn(shape, generator=g) * 3 + 2)
    with torch.no_grad():  # non-trivial affine parameters
        for m in model.modules():
            if hasattr(m, "running_mean") and getattr(m, "weight", None) is not None:
                m.weight.uniform_(0.5, 2.0)
                m.bias.normal_()
    return model.eval()


@pytest.mark.parametrize("bn_module", [nn, nln], ids=["torch.nn", "normlab.nn"])
@pytest.mark.parametrize("case", ["linear-bn", "bn-linear", "conv1d-bn", "conv2d-bn", "conv3d-bn", "conv-nobias"])
def test_folding_equals_the_original_in_eval(bn_module, case):
    torch.manual_seed(0)
    layers = {
        "linear-bn": ([nn.Linear(6, 5), bn_module.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3)], (8, 6)),
        "bn-linear": ([bn_module.BatchNorm1d(6), nn.Linear(6, 4)], (8, 6)),
        "conv1d-bn": ([nn.Conv1d(3, 4, 3, padding=1), bn_module.BatchNorm1d(4)], (2, 3, 9)),
        "conv2d-bn": ([nn.Conv2d(3, 4, 3, padding=1), bn_module.BatchNorm2d(4), nn.ReLU()], (2, 3, 7, 7)),
        "conv3d-bn": ([nn.Conv3d(2, 3, 3), bn_module.BatchNorm3d(3)], (2, 2, 5, 5, 5)),
        "conv-nobias": ([nn.Conv2d(3, 4, 3, bias=False), bn_module.BatchNorm2d(4)], (2, 3, 6, 6)),
    }[case]
    model = _trained(nn.Sequential(*layers[0]), layers[1])
    folded = fold_batchnorm(model)
    assert not any(isinstance(m, (nn.modules.batchnorm._BatchNorm, nln._BatchNorm)) for m in folded.modules())
    assert all("folded_into" in r for r in folded.normlab_fold_report)
    x = torch.randn(layers[1]) * 3 + 2
    assert_rel(folded(x), model(x), tol=1e-5)
    assert any(isinstance(m, (nn.modules.batchnorm._BatchNorm, nln._BatchNorm)) for m in model.modules())  # a copy


def test_unfoldable_batchnorms_stay_and_are_named():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Sequential(nn.ReLU(), nn.BatchNorm1d(4)))
    model(torch.randn(8, 4))
    model.eval()
    model[0].train()  # the Linear's mode is irrelevant; the BN's matters
    model[2][1].train()
    with pytest.warns(UserWarning, match=r"'2\.1' \(in training mode"):
        folded = fold_batchnorm(model)
    report = {r["name"]: r for r in folded.normlab_fold_report}
    assert report["1"]["folded_into"] == "0" and "training" in report["2.1"]["reason"]
    no_stats = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3, track_running_stats=False)).eval()
    with pytest.warns(UserWarning, match="no running statistics"):
        fold_batchnorm(no_stats)
    with pytest.raises(ValueError, match="track_running_stats"):
        batchnorm_as_affine(no_stats[1])


def test_batchnorm_is_the_affine_map_of_seed_000():
    bn = _trained(nn.Sequential(nn.BatchNorm2d(3)), (4, 3, 5, 5))[0]
    scale, shift = batchnorm_as_affine(bn)
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    expected = x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
    assert_rel(bn.double()(x), expected, torch.float64)


@pytest.mark.parametrize("scaler", [
    StandardScaler(), MinMaxScaler(feature_range=(-1, 2)), StandardScaler(with_mean=False),
    skp.StandardScaler(with_std=False), skp.MaxAbsScaler(), skp.RobustScaler(), skp.RobustScaler(with_centering=False),
    skp.RobustScaler(with_scaling=False, quantile_range=(10, 90)),
])
def test_fold_scaler_takes_raw_features(scaler):
    X = np.random.default_rng(0).normal(size=(50, 4)) * [1, 10, 100, 1000] + [5, -3, 1e3, 0]
    scaler.fit(X)
    linear = nn.Linear(4, 3).double()
    folded = fold_scaler(scaler, linear)
    x = torch.as_tensor(X[:7])
    assert_rel(folded(x), linear(torch.as_tensor(scaler.transform(X[:7]))), torch.float64)
    with pytest.raises(ValueError, match="features"):
        fold_scaler(scaler, nn.Linear(5, 3))
    with pytest.raises(ValueError, match="clip"):
        fold_scaler(MinMaxScaler(clip=True).fit(X), linear)
    with pytest.raises(TypeError, match="QuantileTransformer"):
        fold_scaler(skp.QuantileTransformer(n_quantiles=10).fit(X), linear)


def test_recalibration_equals_statistics_over_all_the_data():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nln.BatchNorm1d(6, momentum=0.3), nn.ReLU(), nn.Linear(6, 4),
                          nn.BatchNorm1d(4))
    data = [torch.randn(n, 5) * 2 + 1 for n in (7, 16, 3, 10)]  # uneven batches
    model(torch.randn(8, 5) * 9)  # stale statistics from another distribution
    model.eval()
    inputs = []
    hook = model[1].register_forward_pre_hook(lambda m, a: inputs.append(a[0].detach()))
    report = recalibrate_bn(model, data)
    hook.remove()
    seen = torch.cat(inputs)
    assert_rel(model[1].running_mean, seen.mean(0), tol=1e-5)
    assert_rel(model[1].running_var, seen.var(0), tol=1e-5)  # unbiased, over all 36 values
    assert not model.training and model[1].momentum == 0.3 and int(model[1].num_batches_tracked) == 4
    assert [r["name"] for r in report] == ["1", "4"] and report[0]["mean_shift"] > 0.1
    recalibrate_bn(model, [(x, None) for x in data], num_batches=2)
    assert int(model[4].num_batches_tracked) == 2
    with pytest.raises(ValueError, match="no batches"):
        recalibrate_bn(model, [])
    with pytest.raises(ValueError, match="no BatchNorm"):
        recalibrate_bn(nn.Linear(2, 2), data)


def test_freeze_survives_train_and_unfreeze_restores():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nln.BatchNorm2d(4), nn.GroupNorm(2, 4), nn.Flatten(), nn.Linear(4 * 25, 2))
    model(torch.randn(2, 3, 7, 7))
    before = model[1].running_mean.clone()
    model[1].bias.requires_grad_(False)
    freeze_norm(model)
    model.train()
    out = model(torch.randn(4, 3, 7, 7) * 5 + 3)
    out.sum().backward()
    assert torch.equal(model[1].running_mean, before) and not model[1].training
    assert model[1].weight.grad is None and model[2].weight.grad is None and model[0].weight.grad is not None
    clone = pickle.loads(pickle.dumps(copy.deepcopy(model)))
    clone.train()
    clone(torch.randn(4, 3, 7, 7) * 5 + 3)
    assert not clone[1].training and torch.equal(clone[1].running_mean, before)
    unfreeze_norm(model)
    model.train()
    assert model[1].training and model[1].weight.requires_grad and not model[1].bias.requires_grad
    model(torch.randn(4, 3, 7, 7))
    assert not torch.equal(model[1].running_mean, before)


def test_folding_warns_nothing_when_everything_folds():
    model = _trained(nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)), (6, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fold_batchnorm(model, inplace=True)
    assert isinstance(model[1], nn.Identity)


@pytest.mark.parametrize("bn_module", [nn, nln], ids=["torch.nn", "normlab.nn"])
def test_finite_guard_skips_and_counts_bad_updates(bn_module):
    from normlab.convert import guard_finite, unguard_finite

    model = nn.Sequential(nn.Linear(3, 4), bn_module.BatchNorm1d(4))
    guard_finite(model)
    model(torch.randn(8, 3))
    good = (model[1].running_mean.clone(), model[1].running_var.clone(), int(model[1].num_batches_tracked))
    bad = torch.randn(8, 3)
    bad[2, 0] = float("inf")
    assert torch.isnan(model(bad)).any()  # the batch itself is lost ...
    bn = model[1]
    assert torch.equal(bn.running_mean, good[0]) and torch.equal(bn.running_var, good[1])  # ... the state is not
    assert int(bn.num_batches_tracked) == good[2] and bn.nonfinite_skips == 1
    clone = pickle.loads(pickle.dumps(copy.deepcopy(model)))
    clone(bad)
    assert clone[1].nonfinite_skips == 2 and torch.isfinite(clone[1].running_var).all()
    model(torch.randn(8, 3))
    assert int(bn.num_batches_tracked) == good[2] + 1
    unguard_finite(model)
    model(bad)
    assert not torch.isfinite(bn.running_mean).all() and bn.nonfinite_skips == 1


class _Block(nn.Module):
    """torchvision's BasicBlock, small: conv-bn-relu-conv-bn plus a projection shortcut."""

    def __init__(self, c_in, c_out, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.down = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)) \
            if stride != 1 or c_in != c_out else nn.Identity()

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.down(x))


def _resnet():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                         _Block(16, 16), _Block(16, 32, 2), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.BatchNorm1d(32), nn.Linear(32, 10))


@pytest.mark.parametrize("target", ["group", "layer", "instance", "batchrenorm"])
def test_replace_norm_on_a_small_resnet(target):
    from normlab.convert import replace_norm

    model = _resnet()
    model(torch.randn(4, 3, 8, 8))
    if target == "instance":  # a BatchNorm1d on (N, C) has no spatial dims to normalize over
        with pytest.raises(ValueError, match="spatial"):
            replace_norm(model, target)
        model[7] = nn.Identity()
    swapped = replace_norm(model, target)
    norms = [m for m in swapped.modules() if isinstance(m, (nn.modules.batchnorm._NormBase, nln._NormBase, nln.GroupNorm))]
    assert len(norms) == (6 if target == "instance" else 7)
    if target == "batchrenorm":
        assert all(isinstance(m, nln._BatchRenorm) for m in norms)
        assert torch.equal(swapped[1].running_mean, model[1].running_mean)
    else:
        assert all(isinstance(m, nln.GroupNorm) for m in norms)
        expected = {"group": 8, "layer": 1, "instance": 16}[target]
        assert swapped[1].num_groups == expected and torch.equal(swapped[1].weight, model[1].weight)
    out = swapped(torch.randn(2, 3, 8, 8))
    assert torch.isfinite(out).all()
    assert replace_norm(model, "group", num_groups=4)[1].num_groups == 4
    with pytest.raises(ValueError, match="divide"):
        replace_norm(model, "group", num_groups=3)
    with pytest.raises(ValueError, match="target"):
        replace_norm(model, "spectral")


def test_replace_norm_keeps_a_shared_batchnorm_shared_and_fails_without_a_change():
    from normlab.convert import replace_norm

    shared = nn.BatchNorm2d(8)
    model = nn.Sequential(nn.Conv2d(3, 8, 1), shared, nn.Sequential(nn.Conv2d(8, 8, 1), shared), nn.BatchNorm2d(6))
    model.alias = shared  # one parent, two names for one module
    swapped = replace_norm(model, "group", num_groups=2, inplace=False)
    assert swapped[1] is swapped[2][1] is swapped.alias and isinstance(swapped[1], nln.GroupNorm)
    assert sum(1 for _ in swapped.parameters()) == len(list(model.parameters()))
    # 6 channels do not split in 4 groups: the error comes before any swap, even in place
    with pytest.raises(ValueError, match="divide the 6 channels of '3'"):
        replace_norm(model, "group", num_groups=4, inplace=True)
    assert model[1] is shared and model[2][1] is shared and isinstance(model[3], nn.BatchNorm2d)


def test_audit_names_small_batches_frozen_but_updating_and_non_finite_stats():
    from normlab.convert import audit

    model = _resnet()
    model(torch.randn(4, 3, 8, 8))
    model.train()
    for p in model[3].bn1.parameters():
        p.requires_grad_(False)  # the classic "frozen" BN that still updates its statistics
    model[4].bn2.running_var[0] = float("nan")
    report = audit(model, batch_size=2, input_shape=(3, 8, 8))
    rows = {r["name"]: r for r in report["layers"]}
    assert rows["1"]["values_per_statistic"] == 2 * 64 and rows["7"]["values_per_statistic"] == 2
    assert rows["3.bn1"]["frozen_but_updating"] and not rows["4.bn2"]["finite_stats"]
    text = "\n".join(report["recommendations"])
    assert "7 sees 2 values per channel at batch 2: use GroupNorm or BatchRenorm" in text
    assert "3.bn1" in text and "freeze_norm" in text and "4.bn2" in text and "recalibrate_bn" in text
    assert model.training  # modes restored
    clean = audit(freeze_norm(_resnet()))
    assert clean["recommendations"] == [] and all(r["frozen"] for r in clean["layers"])


def test_fold_batchnorm_follows_the_data_flow_of_a_resnet():
    model = _resnet()
    model(torch.randn(4, 3, 8, 8) * 2 + 1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 2)
                m.bias.normal_()
    model.eval()
    folded = fold_batchnorm(model)
    report = {r["name"]: r for r in folded.normlab_fold_report}
    assert report["3.bn1"]["folded_into"] == "3.conv1" and report["4.down.1"]["folded_into"] == "4.down.0"
    assert report["7"]["folded_into"] == "8"  # BN1d before the classifier
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    x = torch.randn(3, 3, 8, 8)
    assert_rel(folded(x), model(x), tol=1e-5)


def test_a_layer_output_used_twice_is_not_folded():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y  # folding would change the second use

    model = Twice()
    model(torch.randn(4, 2, 3, 3))
    model.eval()
    with pytest.warns(UserWarning, match="bn"):
        folded = fold_batchnorm(model)
    x = torch.randn(2, 2, 3, 3)
    assert_rel(folded(x), model(x))


def test_folding_refuses_shared_modules_and_traces_normlab_layers():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.bn = nn.Linear(4, 4), nln.BatchNorm1d(4)

        def forward(self, x):
            return self.bn(self.lin(x)) + self.lin(x)  # the Linear is used twice

    class Block(nn.Module):  # not a Sequential: only the fx graph shows conv -> bn
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(2, 3, 3, padding=1), nln.BatchNorm2d(3)

        def forward(self, x):
            return torch.relu(self.bn(self.conv(x)))

    act = nn.ReLU()  # one activation object reused: the Sequential walk must not skip over it
    reused = nn.Sequential(nn.Linear(4, 4), act, nn.Linear(4, 4), act, nln.BatchNorm1d(4))
    for model, shape in ((Shared(), (8, 4)), (Block(), (4, 2, 5, 5)), (reused, (8, 4))):
        model(torch.randn(shape) * 2 + 1)
        model.eval()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            folded = fold_batchnorm(model)
        x = torch.randn(shape)
        assert_rel(folded(x), model(x), tol=1e-5)
    assert isinstance(fold_batchnorm(Block().eval()).bn, nn.Identity)


def test_batchnorm1d_on_sequences_is_not_folded_when_the_example_shows_it():
    model = nn.Sequential(nn.Linear(6, 6), nln.BatchNorm1d(6))
    model(torch.randn(4, 6, 6))
    model.eval()
    with pytest.warns(UserWarning):
        folded = fold_batchnorm(model, example_input=torch.randn(2, 6, 6))
    x = torch.randn(3, 6, 6)
    assert_rel(folded(x), model(x))


def test_recalibrate_leaves_unreached_layers_and_other_buffers_alone():
    class Heads(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.used, self.unused = nn.Linear(3, 4), nn.BatchNorm1d(4), nn.BatchNorm1d(4)
            self.inorm = nn.InstanceNorm1d(4, track_running_stats=True)

        def forward(self, x):
            return self.inorm(self.used(self.body(x)).unsqueeze(-1).expand(-1, -1, 3))

    model = Heads()
    before = {n: b.clone() for n, b in model.named_buffers()}
    report = recalibrate_bn(model, [torch.randn(8, 3)])
    assert {r["name"]: r["reached"] for r in report} == {"used": True, "unused": False}
    for n, b in model.named_buffers():
        if not n.startswith("used."):
            assert torch.equal(b, before[n]), n


# -- folding inside models nobody wrote for fx: plain Modules, control flow, transformers ---------
class _ConvLayer(nn.Module):  # conv -> BN -> activation, as transformers' ResNetConvLayer
    def __init__(self, cin, cout, stride=1, checked=False, bn=nn):
        super().__init__()
        self.convolution = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.normalization = bn.BatchNorm2d(cout)
        self.activation = nn.ReLU()
        self.checked = checked

    def forward(self, x):
        if self.checked and x.shape[1] != self.convolution.in_channels:  # control flow on the input
            raise ValueError("wrong channel count")
        return self.activation(self.normalization(self.convolution(x)))


class _Residual(nn.Module):
    def __init__(self, cin, cout, stride, checked, bn):
        super().__init__()
        self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), bn.BatchNorm2d(cout))
        self.layer = nn.Sequential(_ConvLayer(cin, cout, stride, checked, bn), _ConvLayer(cout, cout, 1, checked, bn))

    def forward(self, x):
        return torch.relu(self.layer(x) + self.shortcut(x))


class _PlainResNet(nn.Module):
    def __init__(self, checked=False, bn=nn):
        super().__init__()
        self.embedder = _ConvLayer(3, 8, 2, checked, bn)
        self.stages = nn.ModuleList([_Residual(8, 8, 1, checked, bn), _Residual(8, 16, 2, checked, bn)])
        self.head = nn.Linear(16, 3)

    def forward(self, pixel_values, return_hidden=False):
        if pixel_values.shape[1] != 3:  # the top-level forward fx cannot trace
            raise ValueError("three channels expected")
        hidden = [self.embedder(pixel_values)]
        for stage in self.stages:
            hidden.append(stage(hidden[-1]))
        logits = self.head(hidden[-1].mean((2, 3)))
        return (logits, hidden) if return_hidden else logits


def _bns(model):
    return [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
            or isinstance(m, nln._BatchNorm)]


@pytest.mark.parametrize("bn", [nn, nln], ids=["torch.nn", "normlab.nn"])
@pytest.mark.parametrize("checked", [False, True], ids=["blocks-trace", "blocks-with-control-flow"])
def test_fold_batchnorm_folds_every_bn_of_a_model_fx_cannot_trace(bn, checked):
    model = _trained(_PlainResNet(checked, bn), (4, 3, 16, 16))
    x = torch.randn(2, 3, 16, 16)
    names = _bns(model)
    assert len(names) == 7
    if checked:  # the blocks' own forwards do not trace: only a run shows the data flow
        with pytest.raises(ValueError, match=r"embedder\.normalization.*cannot trace.*example_input="):
            fold_batchnorm(model)
        assert _bns(model) == names  # a refused call changes nothing
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # everything folds: no warning
        folded = fold_batchnorm(model, example_input=x if checked else None)
    report = {r["name"]: r for r in folded.normlab_fold_report}
    assert sorted(report) == sorted(names)
    assert report["embedder.normalization"]["folded_into"] == "embedder.convolution"
    assert report["stages.1.shortcut.1"]["folded_into"] == "stages.1.shortcut.0"
    # the shortcuts are Sequentials, which trace; the blocks with control flow are watched running
    assert {n for n, r in report.items() if r["found_by"] == "observation"} == (
        {n for n in names if n.endswith("normalization")} if checked else set())
    assert _bns(folded) == [] and model.training is False and _bns(model) == names
    assert_rel(folded(x), model(x), tol=1e-5)


def test_observation_leaves_what_it_cannot_prove():
    class Leaky(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2)  # conv output also returned
            self.conv2, self.bn2 = nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2)  # conv output read by an op too
            self.bn3 = nn.BatchNorm2d(2)  # called twice
            self.lin, self.bn4, self.out = nn.Linear(2, 2), nn.BatchNorm1d(2), nn.Linear(2, 2)  # BN1d on (N, C)
            self.seq, self.bn5 = nn.Linear(3, 3), nn.BatchNorm1d(2)  # BN1d on (N, C, L): other axis

        def forward(self, x, z):
            if x.shape[0] == 0:
                return x
            y = self.conv(x)
            w = self.conv2(x)
            u = self.bn3(self.bn3(self.bn2(w) + w))
            v = self.out(self.bn4(self.lin(x.mean((2, 3)))))
            return self.bn(y) + u + v[..., None, None], y, self.bn5(self.seq(z))

    model = _trained(Leaky(), (4, 2, 3, 3), steps=0)
    ex = (torch.randn(4, 2, 3, 3), torch.randn(4, 2, 3))
    model.train()
    model(*ex)
    model.eval()
    with pytest.warns(UserWarning, match="fold_batchnorm left in place"):
        folded = fold_batchnorm(model, example_input=ex)
    report = {r["name"]: r for r in folded.normlab_fold_report}
    assert {n for n, r in report.items() if "folded_into" in r} == {"bn4"}
    assert report["bn4"]["folded_into"] in ("lin", "out")
    for got, want in zip(folded(*ex), model(*ex)):
        assert_rel(got, want, tol=1e-5)


def test_fold_batchnorm_on_transformers_resnet():
    transformers = pytest.importorskip("transformers")
    config = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="bottleneck",
                                       num_labels=3)
    model = _trained(transformers.ResNetForImageClassification(config), (2, 3, 32, 32), steps=1)
    names = _bns(model)
    folded = fold_batchnorm(model)  # its top-level forward does not trace; each block does
    assert len(names) >= 8 and all("folded_into" in r for r in folded.normlab_fold_report) and _bns(folded) == []
    x = torch.randn(2, 3, 32, 32)
    assert_rel(folded(x).logits, model(x).logits, tol=1e-5)


def test_fold_scaler_into_the_first_layer_of_a_model():
    X = torch.randn(64, 4, dtype=torch.float64) * torch.tensor([1.0, 10, 100, 1000], dtype=torch.float64) + 7
    scaler = StandardScaler().fit(X)

    class Net(nn.Module):  # a forward fx cannot trace
        def __init__(self):
            super().__init__()
            self.first, self.act, self.last = nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 1)

        def forward(self, x):
            if x.shape[-1] != 4:
                raise ValueError("four features expected")
            return self.last(self.act(self.first(x)))

    seq = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 1)).double()
    net = Net().double()
    for model, ex in ((seq, None), (net, X[:2])):
        raw = fold_scaler(scaler, model, example_input=ex)
        assert_rel(raw(X), model(torch.as_tensor(scaler.transform(X))), torch.float64)
        assert model(X).shape == (64, 1)  # the model itself is untouched
    with pytest.raises(ValueError, match="example_input="):
        fold_scaler(scaler, net)

    class Skip(nn.Module):  # the input feeds the Linear and a skip connection: not foldable
        def __init__(self):
            super().__init__()
            self.first = nn.Linear(4, 4)

        def forward(self, x):
            return self.first(x) + x

    with pytest.raises(ValueError, match=r"read by 'first' \(Linear\), add\(\) in the forward of Skip, not by one"):
        fold_scaler(scaler, Skip().double())

    class Branchy(Skip):  # fx cannot trace it: the readers come from one run
        def forward(self, x):
            return self.first(x) if x.sum() > 0 else -x

    with pytest.raises(ValueError, match=r"read by 'first' \(Linear\), the forward of the model \(Branchy\) itself"):
        fold_scaler(scaler, Branchy().double(), example_input=torch.ones(2, 4, dtype=torch.float64))
    conv_first = nn.Sequential(nn.Conv1d(4, 4, 1), nn.Flatten(), nn.Linear(4, 1))  # messages name modules by path
    with pytest.raises(ValueError, match=r"read by '0' \(Conv1d\), not by one nn.Linear alone.*scaler.transform"):
        fold_scaler(scaler, conv_first)
    with pytest.raises(TypeError, match="nn.Linear or a model"):
        fold_scaler(scaler, "first")


def test_folding_never_rewrites_a_weight_something_else_uses():
    class Tied(nn.Module):  # a tied autoencoder: the decoder reads the encoder's weight
        def __init__(self):
            super().__init__()
            self.enc, self.bn = nn.Linear(8, 4), nn.BatchNorm1d(4)

        def forward(self, x):
            return nn.functional.linear(torch.relu(self.bn(self.enc(x))), self.enc.weight.t())

    class StdConv(nn.Conv2d):  # weight standardization: a forward of its own
        def forward(self, x):
            w = (self.weight - self.weight.mean((1, 2, 3), keepdim=True)) / self.weight.std((1, 2, 3), keepdim=True)
            return nn.functional.conv2d(x, w, self.bias)

    class Outer(nn.Module):  # a traceable block whose conv the untraceable parent also calls alone
        def __init__(self):
            super().__init__()
            self.block = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3))

        def forward(self, x):
            if x.sum() > -1e9:
                return self.block(x) + self.block[0](x)
            return x

    shared = nn.Conv2d(3, 3, 1)
    cases = [(Tied(), (4, 8), "tied"), (nn.Sequential(StdConv(3, 4, 3), nn.BatchNorm2d(4)), (2, 3, 6, 6), None),
             (nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Conv2d(3, 4, 3)), nn.BatchNorm2d(4)), (2, 3, 6, 6),
              "parametrized"),
             (nn.Sequential(shared, nn.BatchNorm2d(3), nn.Conv2d(3, 3, 1)), (2, 3, 6, 6), None),
             (Outer(), (2, 3, 6, 6), "another use")]
    cases[3][0][2].weight = shared.weight  # two convs, one Parameter
    for model, shape, reason in cases:
        model = _trained(model, shape, steps=2)
        x = torch.randn(shape)
        with pytest.warns(UserWarning, match="left in place"):
            folded = fold_batchnorm(model, example_input=x)
        assert all("reason" in r for r in folded.normlab_fold_report), folded.normlab_fold_report
        assert reason is None or reason in folded.normlab_fold_report[0]["reason"]
        assert_rel(folded(x), model(x), tol=1e-6)
    with pytest.raises(ValueError, match="the model is a BatchNorm itself"):
        fold_batchnorm(nn.BatchNorm2d(3).eval())


# ------------------------------------------------- a tool never returns a silently different model
def test_torchs_own_sync_conversion_leaves_batchrenorm():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nln.BatchRenorm2d(4), nln.BatchNorm2d(4))
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert isinstance(synced[1], nln.BatchRenorm2d) and isinstance(synced[2], nn.SyncBatchNorm)


def test_a_subclass_that_overrides_what_torchs_forward_calls_is_not_known():
    class TwiceInstanceNorm(nn.InstanceNorm2d):  # torch's forward, calling a helper of its own
        def _apply_instance_norm(self, x):
            return 2 * super()._apply_instance_norm(x)

    class AnyRankBatchNorm(nn.BatchNorm1d):
        def _check_input_dim(self, x):
            pass

    from normlab.convert import to_normlab

    _, rep = to_normlab(nn.Sequential(TwiceInstanceNorm(4), AnyRankBatchNorm(4)), report=True)
    assert rep["converted"] == []
    assert [r[:2] for r in rep["left"]] == [("0", "TwiceInstanceNorm"), ("1", "AnyRankBatchNorm")]
    assert all("methods of its own" in r[2] for r in rep["left"])


def test_a_registered_conversion_is_probed_even_where_the_class_keeps_torchs_forward():
    from normlab.convert import register_conversion, retype, to_normlab

    class PlainLN(nn.LayerNorm):
        pass

    register_conversion(PlainLN, lambda m: retype(m, nln.RMSNorm))  # wrong: no centring
    (name, cls, why), = to_normlab(nn.Sequential(PlainLN(8)), report=True)[1]["left"]
    assert cls == "PlainLN" and "probe" in why


def test_a_change_that_raises_on_example_input_is_undone():
    from normlab.convert import register_conversion, retype, to_normlab

    class Picky(nln.LayerNorm):  # passes the probe (batch of 2), raises on a batch of 3
        def forward(self, x):
            if x.shape[0] == 3:
                raise RuntimeError("picky")
            return super().forward(x)

    class MyLN(nn.LayerNorm):
        def forward(self, x):
            return super().forward(x)

    register_conversion(MyLN, lambda m: retype(m, Picky))
    model = nn.Sequential(nn.Linear(4, 4), MyLN(4))
    with pytest.raises(ValueError, match="to_normlab: the changed model raised RuntimeError: picky; the model is left"):
        to_normlab(model, inplace=True, example_input=torch.randn(3, 4))
    assert type(model[1]) is MyLN


def test_freezing_and_guarding_survive_conversion_both_ways():
    from normlab.convert import guard_finite, to_normlab, to_torch, unfreeze_norm, unguard_finite

    model = guard_finite(freeze_norm(nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3))))
    for converted in (to_normlab(model), to_torch(to_normlab(model))):
        copy.deepcopy(converted)
        pickle.loads(pickle.dumps(converted))
        unguard_finite(unfreeze_norm(converted)).train()
        converted(torch.randn(4, 2))
        bn = converted[1]
        assert bn.training and int(bn.num_batches_tracked) == 1 and bn.weight.requires_grad
        assert not bn._forward_pre_hooks and not bn._forward_hooks


def test_folding_leaves_a_batchnorm_with_hooks_and_keeps_requires_grad():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1, bias=False),
                          nn.BatchNorm2d(4)).eval()
    model[1].register_forward_hook(lambda mod, args, out: out * 2)
    model[2].weight.requires_grad_(False)
    with pytest.warns(UserWarning, match="hooks"):
        folded = fold_batchnorm(model)
    assert isinstance(folded[1], nn.BatchNorm2d) and isinstance(folded[3], nn.Identity)
    assert folded[2].bias.requires_grad is False
    x = torch.randn(2, 3, 8, 8)
    assert_rel(folded(x), model(x), tol=1e-5)


def test_fx_symbolic_trace_names_the_way_out_and_normlab_layers_trace_as_leaves():
    import torch.fx

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.LayerNorm(64)).eval()
    fast = to_normlab(model)
    with pytest.raises(TypeError, match="to_torch"):
        torch.fx.symbolic_trace(fast)

    class Leaves(torch.fx.Tracer):
        def is_leaf_module(self, m, name):
            return type(m).__module__.startswith("normlab") or super().is_leaf_module(m, name)

    graph = torch.fx.GraphModule(fast, Leaves().trace(fast))
    x = torch.randn(2, 3, 6, 6)
    assert torch.equal(graph(x), fast(x))
    assert type(graph.get_submodule("1")) is type(fast[1])  # normlab's layer runs inside the graph
    assert torch.fx.symbolic_trace(to_torch(fast))(x).shape == (2, 64)


@pytest.mark.parametrize("tool", ["replace_norm group", "replace_norm batchrenorm", "convert_sync_batchnorm"])
def test_swapping_tools_keep_the_parameter_objects_and_replace_the_model_itself(tool):
    """One walker: the new norm holds the BatchNorm's own γ and β (an optimizer built on the model
    keeps working with replace_norm(inplace=True)), a BatchNorm shared by two parents stays shared,
    and a model that is a BatchNorm itself is replaced too."""
    from normlab.convert import replace_norm
    from normlab.distributed import convert_sync_batchnorm

    def run(model):
        if tool == "convert_sync_batchnorm":
            return convert_sync_batchnorm(model)
        return replace_norm(model, tool.split()[1], inplace=True)

    bn = nn.BatchNorm2d(4)
    bn.weight.requires_grad_(False)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), bn, nn.Sequential(bn))
    weight = bn.weight
    new = run(model)
    assert new[1] is new[2][0] and type(new[1]) is not nn.BatchNorm2d
    if tool != "convert_sync_batchnorm":  # a deep copy otherwise: its own objects, carried the same way
        assert new[1].weight is weight and new[1].bias is bn.bias
    assert not new[1].weight.requires_grad
    alone = run(nn.BatchNorm2d(4))
    assert type(alone) is not nn.BatchNorm2d, type(alone)
