"""The lab: data splits, model builders, the training loop, the experiment registry and `normlab run`."""

import json
import math

import numpy as np
import textwrap

import pytest
import torch
from torch import nn

from normlab.cli import main
from normlab.lab import data, experiments, models, records, train
from normlab.preprocessing import StandardScaler

# ----------------------------------------------------------------------------- data


def test_scaler_is_fitted_on_the_training_split_only():
    split = data.make_regression(num_examples=400, num_inputs=3, loc=(5.0, -2.0, 100.0), scale=(1.0, 3.0, 10.0), seed=1)
    z = split.scaled("zscore")
    ref = StandardScaler().fit(split.X_train.numpy())
    np.testing.assert_allclose(z.scaler.mean_, ref.mean_, rtol=1e-6)
    assert z.scaler.n_samples_seen_ == len(split.X_train)
    np.testing.assert_allclose(z.X_test.numpy(), ref.transform(split.X_test.numpy()), rtol=1e-5, atol=1e-5)
    # The test half is not standardized exactly: its own statistics were never used.
    assert z.X_test.mean(0).abs().max() > 1e-3
    assert torch.equal(z.y_train, split.y_train) and torch.equal(z.y_test, split.y_test)
    mm = split.scaled("minmax")
    assert float(mm.X_train.min()) == pytest.approx(0.0, abs=1e-6) and float(mm.X_train.max()) == pytest.approx(1.0, abs=1e-6)


def test_scaling_twice_or_with_an_unknown_kind_is_refused():
    split = data.make_regression(num_examples=100, seed=0)
    assert split.scaled(None) is split
    with pytest.raises(ValueError, match="already scaled"):
        split.scaled().scaled()
    with pytest.raises(ValueError, match="zscore"):
        split.scaled("robust")


def test_generators_are_seeded_and_follow_their_definition():
    a, b = data.make_regression(seed=3, noise=0.0, degree=2, bias=False), data.make_regression(seed=3, noise=0.0, degree=2, bias=False)
    assert torch.equal(a.X_train, b.X_train)
    assert not torch.equal(a.X_train, data.make_regression(seed=4).X_train)
    # noise 0, loc 0, scale 1: y = 2·x1² − x2² exactly
    x = a.X_train
    torch.testing.assert_close(a.y_train[:, 0], 2 * x[:, 0] ** 2 - x[:, 1] ** 2)
    c = data.make_classification(num_examples=300, num_class=3, deg_dispersion=(10.0, 0.5), seed=0)
    assert c.task == "classification" and c.num_outputs == 3
    for k in range(3):  # class centres at k·d − d·(K−1)/2
        centre = c.X_train[c.y_train == k].mean()
        assert float(centre) == pytest.approx(10.0 * k - 10.0, abs=0.2)


@pytest.mark.parametrize("name", sorted(data.DATASETS))
def test_bundled_datasets_load_offline_and_raw(name):
    split = data.load_dataset(name, seed=0)
    assert split.X_train.dtype == torch.float32 and len(split.X_test) > 0
    assert split.task == data.DATASETS[name][1]
    if name == "diabetes":  # scaled=False: ages in years, not centred
        assert float(split.X_train[:, 0].mean()) > 20
    if split.task == "classification":
        assert split.y_train.dtype == torch.int64 and split.num_outputs == int(split.y_train.max()) + 1


def test_digits_as_images_and_flattened():
    split = data.load_dataset("digits", images=True)
    assert split.input_shape == (1, 8, 8) and split.num_features == 64
    assert split.flat().input_shape == (64,)
    assert split.scaled().X_train.shape[1:] == (1, 8, 8)
    with pytest.raises(ValueError, match="digits"):
        data.load_dataset("wine", images=True)


def test_data_errors_name_the_fix():
    with pytest.raises(ValueError, match="breast_cancer"):
        data.load_dataset("mnist")
    with pytest.raises(ValueError, match="test_size"):
        data.make_regression(test_size=1.5)
    with pytest.raises(ValueError, match="weights"):
        data.make_regression(num_inputs=2, weights=[1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="num_class"):
        data.make_classification(num_class=1)
    with pytest.raises(ValueError, match="batch_size"):
        next(data.batches(torch.zeros(3), torch.zeros(3), 0))


def test_batches_cover_every_example_once_and_drop_last():
    X, y = torch.arange(10.0), torch.arange(10)
    got = torch.cat([xb for xb, _ in data.batches(X, y, 4, shuffle=True, generator=torch.Generator().manual_seed(0))])
    assert sorted(got.tolist()) == X.tolist()
    assert [len(xb) for xb, _ in data.batches(X, y, 4, drop_last=True)] == [4, 4]


# ----------------------------------------------------------------------------- models


@pytest.mark.parametrize("norm", models.NORMS)
@pytest.mark.parametrize("placement", ["before", "after"])
def test_mlp_with_every_norm_trains_a_step(norm, placement):
    model = models.mlp(5, 3, depth=2, width=8, activation="tanh", norm=norm, placement=placement, init="xavier", seed=0)
    out = model(torch.randn(6, 5))
    out.square().mean().backward()
    assert out.shape == (6, 3)
    assert all(p.grad is not None for p in model.parameters())
    kinds = {type(m).__name__ for m in model.modules()}
    expected = {"batch": "BatchNorm1d", "layer": "LayerNorm", "group": "GroupNorm", "instance": "InstanceNorm1d",
                "rms": "RMSNorm", "cosine": "CosineLinear", "weight": "WeightNormLinear"}.get(norm)
    assert expected is None or expected in kinds, kinds


def test_norm_placement_before_and_after_the_activation():
    before = [type(m).__name__ for m in models.mlp(2, 1, depth=1, norm="batch", placement="before")]
    after = [type(m).__name__ for m in models.mlp(2, 1, depth=1, norm="batch", placement="after")]
    assert before == ["Linear", "BatchNorm1d", "Sigmoid", "Linear"]
    assert after == ["Linear", "Sigmoid", "BatchNorm1d", "Linear"]


@pytest.mark.parametrize("norm", [n for n in models.NORMS if n != "cosine"])
def test_cnn_with_every_2d_norm(norm):
    model = models.cnn(10, norm=norm, seed=0)
    out = model(torch.randn(4, 1, 8, 8))
    out.sum().backward()
    assert out.shape == (4, 10)


@torch.no_grad()
def test_initialisations():
    torch.manual_seed(0)
    state = torch.random.get_rng_state()
    a = models.mlp(100, 1, depth=1, width=100, init="xavier", seed=7)
    assert torch.equal(torch.random.get_rng_state(), state)  # a seeded build leaves the global RNG alone
    assert torch.equal(a[0].weight, models.mlp(100, 1, depth=1, width=100, init="xavier", seed=7)[0].weight)
    assert float(a[0].weight.abs().max()) <= math.sqrt(6 / 200) and float(a[0].bias.abs().max()) == 0.0
    n = models.mlp(100, 1, depth=1, width=100, init="normal:0.5", seed=0)
    assert float(n[0].weight.std()) == pytest.approx(0.5, rel=0.05)
    k = models.mlp(100, 1, depth=1, width=100, init="kaiming", seed=0)
    assert float(k[0].weight.abs().max()) <= math.sqrt(6 / 100)
    d = models.mlp(100, 1, depth=1, width=100, seed=0)
    assert float(d[0].weight.abs().max()) <= 1 / math.sqrt(100) and float(d[0].bias.abs().max()) > 0


def test_group_count_rule_and_model_errors():
    assert models.mlp(4, 2, width=64, norm="group")[1].num_groups == 4  # 16 features per group
    assert models.mlp(4, 2, width=64, norm="group", num_groups=8)[1].num_groups == 8
    for kwargs, match in [({"norm": "spectral"}, "norm must be"), ({"activation": "swish2"}, "activation"),
                          ({"placement": "inside"}, "placement"), ({"init": "orthogonal"}, "init"),
                          ({"norm": "group", "num_groups": 3}, "divide"), ({"depth": -1}, "depth")]:
        with pytest.raises(ValueError, match=match):
            models.mlp(4, 2, width=64, **kwargs)
    with pytest.raises(ValueError, match="norm must be"):
        models.cnn(norm="cosine")


# ----------------------------------------------------------------------------- training


def test_fit_is_deterministic_and_learns():
    split = data.make_classification(num_examples=100, num_class=3, seed=0)
    runs = [train.fit(models.mlp(2, 3, depth=2, width=16, activation="relu", norm="batch", seed=1), split,
                      epochs=4, lr=0.1, batch_size=16, seed=5, drop_last=True) for _ in range(2)]
    assert runs[0].to_dict() | {"seconds": None} == runs[1].to_dict() | {"seconds": None}
    h = runs[0]
    assert h.metric == "accuracy" and len(h.test_metric) == 4 and h.steps == 4 * (225 // 16)
    assert h.test_metric[-1] > 0.8
    json.dumps(h.to_dict())


def test_fit_measures_in_eval_mode_and_leaves_the_model_training():
    split = data.make_regression(num_examples=64, seed=0)
    model = models.mlp(2, 1, depth=1, width=4, norm="batch", seed=0)
    seen = []
    model[1].register_forward_hook(lambda m, a, o: seen.append(m.training))
    train.fit(model, split, epochs=1, batch_size=16, seed=0)
    assert seen[:3] == [True] * 3 and seen[-1] is False  # 3 training steps, then measurement
    assert model.training


def test_fit_refuses_a_last_batch_of_one_for_batchnorm_and_says_why():
    split = data.make_regression(num_examples=68, seed=0)  # 51 training examples: 51 % 10 == 1
    model = models.mlp(2, 1, norm="batch", seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="drop_last=True"):
        train.fit(model, split, epochs=1, batch_size=10)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    h = train.fit(model, split, epochs=1, batch_size=10, drop_last=True)
    assert h.steps == 5
    train.fit(models.mlp(2, 1, norm="layer"), split, epochs=1, batch_size=10)  # no batch statistics: fine


def test_fit_stops_when_the_loss_diverges_and_checks_its_arguments():
    split = data.make_regression(num_examples=100, loc=1e3, scale=1e3, seed=0)
    h = train.fit(models.mlp(2, 1, activation="identity", seed=0), split, epochs=5, lr=10.0)
    assert h.diverged and len(h.test_loss) < 5
    for kwargs, match in [({"optimizer": "lbfgs"}, "optimizer"), ({"loss": "hinge"}, "loss"), ({"epochs": -1}, "epochs")]:
        with pytest.raises(ValueError, match=match):
            train.fit(models.mlp(2, 1), split, **kwargs)


def test_fit_accepts_any_module_with_adam_and_callbacks():
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(2, 1))

        def forward(self, x):
            return x @ self.w

    split = data.make_regression(num_examples=200, noise=0.0, bias=False, seed=0)
    steps, epochs = [], []
    h = train.fit(Tiny(), split, epochs=30, lr=0.1, optimizer="adam", on_step=lambda s, m, l: steps.append(s),
                  on_epoch=lambda e, m, hist: epochs.append(e), progress=False)
    assert h.test_metric[-1] < 1e-2 and epochs == list(range(1, 31)) and steps[-1] == h.steps


# ----------------------------------------------------------------------------- records


def test_checks_decide_with_their_95_percent_interval():
    from scipy import stats

    values = [0.1, 0.3, 0.2, 0.25]
    c = records.check("d", values, ">", 0)
    mean, sem = np.mean(values), stats.sem(values)
    lo, hi = stats.t.interval(0.95, len(values) - 1, loc=mean, scale=sem)  # scipy's own t-interval
    assert c["value"] == pytest.approx(mean) and c["ci"] == pytest.approx([lo, hi]) and c["status"] == "holds"
    assert records.check("d", values, "<", 0)["status"] == "fails"
    assert records.check("d", values, ">", 0.2)["status"] == "undecided"  # the interval contains 0.2
    assert records.check("d", [0.3], ">", 0)["status"] == "undecided"  # one seed: no interval
    assert records.check("d", [0.3, 0.31, math.inf], ">", 0)["status"] == "holds"  # judged seed by seed
    assert records.check("d", [0.3, math.nan], ">", 0)["status"] == "fails"  # a diverged run
    v = records.verdict([records.check("a", [1.0, 1.1], ">", 0), records.check("b", [-0.1, 0.2], ">", 0)], hint="more")
    assert v["status"] == "inconclusive" and "b is 0.05 (95% CI" in v["summary"] and v["summary"].endswith("more")
    assert "not distinguishable from 0 with 2 random seeds" in v["summary"]


def test_a_margin_decides_no_practical_effect_and_must_be_cleared():
    small = [0.01, -0.02, 0.03, 0.0, -0.01]  # an interval inside ±0.1
    assert records.check("d", small, "<", 0)["status"] == "undecided"  # without a margin: more seeds
    c = records.check("d", small, "<", 0, margin=0.1)
    assert c["status"] == "fails" and c["margin"] == 0.1 and "no practical effect" in records.explain(c)
    assert records.check("d", [-0.3, -0.25, -0.35], "<", 0, margin=0.1)["status"] == "holds"
    assert records.check("d", [-0.05, -0.15, -0.12, -0.2], "<", 0, margin=0.1)["status"] == "undecided"  # across −0.1
    assert records.check("d", [-0.02, -0.03, -0.025], "<", 0, margin=0.1)["status"] == "fails"  # real but too small
    assert records.check("d", [0.3, 0.5, 0.4], ">", 0, margin=0.1)["status"] == "holds"
    assert records.check("d", 0.05, ">", 0, margin=0.1)["status"] == "fails"  # exact, short of the margin
    assert "margin" not in records.check("d", small, "<", 0)
    with pytest.raises(ValueError, match="margin"):
        records.check("d", small, "<", 0, margin=-1)
    assert records.problem({"name": "n", "title": "t", "claim": "c", "verdict": {"status": "supported"},
                            "checks": [{**c, "margin": "big"}]}).startswith("checks[0].margin")


def test_record_helpers():
    assert records.check("x", float("nan"), "<", 1)["status"] == "fails"
    assert records.verdict([records.check("a", 1, ">", 0)])["status"] == "supported"  # exact: no interval
    v = records.verdict([records.check("a", 1, ">", 0), records.check("b", 1, "<", 0)])
    assert v["status"] == "not supported" and "b is 1: not below 0, against the claim" in v["summary"]
    assert records.verdict([])["status"] == "inconclusive"
    b = records.box("L1", torch.arange(101.0), group="g")
    assert (b["whislo"], b["q1"], b["med"], b["q3"], b["whishi"]) == (5.0, 25.0, 50.0, 75.0, 95.0)
    assert math.isnan(records.box("empty", [float("nan")])["med"])
    assert records.to_json({"a": torch.tensor([1.0]), "b": np.float32(2.0), "c": np.arange(2), "d": (1,)}) == \
        {"a": [1.0], "b": 2.0, "c": [0, 1], "d": [1]}
    for bad in (lambda: records.check("x", 1, "==", 1), lambda: records.panel("pie", "t"),
                lambda: records.series("s", [1, 2], [1]), lambda: records.series("s", [1], [1], lo=[0])):
        with pytest.raises(ValueError):
            bad()


# ----------------------------------------------------------------------------- experiments and CLI

TINY = experiments.Config(epochs=1, seeds=(0,))


@pytest.mark.parametrize("name", list(experiments.EXPERIMENTS))
def test_every_experiment_returns_a_complete_json_record(name):
    rec = experiments.run(name, TINY)
    assert rec["name"] == name and rec["claim"] and rec["checks"] and rec["figures"]
    status = {c["status"] for c in rec["checks"]}
    assert rec["verdict"]["status"] == ("not supported" if "fails" in status else "inconclusive" if "undecided" in status
                                        else "supported")
    assert all(len(c["ci"]) == 2 for c in rec["checks"])
    assert json.loads(json.dumps(rec)) == json.loads(json.dumps(rec))  # plain JSON, NaN included
    for fig in rec["figures"]:
        for pan in fig["panels"]:
            assert pan["kind"] in records.PANEL_KINDS
    from normlab.lab.claims import CLAIMS, decide

    for claim in CLAIMS:  # every check a claim names exists in its experiment's record
        for exp, words in claim.tests:
            if exp == name:
                assert any(words is None or words in c["name"] for c in rec["checks"]), (claim.number, words)
                assert decide(claim, {name: rec})["status"] in ("supported", "not supported", "inconclusive")


def test_every_claim_of_the_texts_is_tested_by_a_registered_experiment_or_says_why():
    from normlab.lab.claims import CLAIMS

    assert [c.number for c in CLAIMS] == list(range(1, 26))
    for claim in CLAIMS:
        assert claim.tests or claim.note, claim.number
        assert all(exp in experiments.EXPERIMENTS for exp, _ in claim.tests), claim.number
    assert {exp for c in CLAIMS for exp, _ in c.tests} == set(experiments.EXPERIMENTS)  # no experiment tests nothing


def test_verdicts_are_computed_from_the_numbers():
    rec = experiments.run("affine", experiments.Config())
    assert rec["verdict"]["status"] == "supported"
    assert all(c["value"] < 1e-5 for c in rec["checks"])


def test_registering_a_user_experiment(monkeypatch):
    monkeypatch.setattr(experiments, "EXPERIMENTS", dict(experiments.EXPERIMENTS))

    @experiments.experiment("mine", "Mine", source="me", claim="2 > 1")
    def mine(cfg):
        return {"checks": [records.check("two minus one", 2 - 1, ">", 0)]}

    rec = experiments.run("mine")
    assert rec["verdict"]["status"] == "supported" and rec["source"] == "me"
    with pytest.raises(ValueError, match="already registered"):
        experiments.experiment("mine", "again", source="", claim="")(mine)
    with pytest.raises(KeyError, match="zscore"):
        experiments.run("nope")


def test_the_module_docstring_example_registers_and_runs(monkeypatch):
    monkeypatch.setattr(experiments, "EXPERIMENTS", dict(experiments.EXPERIMENTS))
    code = experiments.__doc__.split("::", 1)[1]
    exec(compile(textwrap.dedent(code), "experiments.__doc__", "exec"), {})
    e = experiments.EXPERIMENTS["my-ln"]
    assert (e.seeds, e.epochs) == ((3, 5), (5, 20))
    rec = experiments.run("my-ln", experiments.Config(seeds=(0, 1), epochs=1))
    assert rec["checks"][0]["values"] is not None and len(rec["checks"][0]["values"]) == 2


@pytest.mark.parametrize("returns, error, says", [
    ({"checks": [], "params": {"model": object()}}, TypeError, r"'bad': record\['params'\]\['model'\] is a object"),
    ({"checks": [], "params": {(1, 2): 3}}, TypeError, r"key \(1, 2\) of type tuple"),
    ({"checks": [], "tables": [{"title": "t", "rows": [[1]]}]}, ValueError, r"'bad' returned a record .*tables\[0\]"),
    ({"checks": [], "seconds_left": float("nan"), "notes": [3]}, ValueError, "notes must be a list of text"),
    ([1], TypeError, "'bad' returned a list; it must return a dict"),
])
def test_a_record_json_cannot_hold_is_refused_when_its_experiment_ends(monkeypatch, returns, error, says):
    monkeypatch.setattr(experiments, "EXPERIMENTS", dict(experiments.EXPERIMENTS))
    experiments.experiment("bad", "Bad", source="me", claim="c")(lambda cfg: returns)
    with pytest.raises(error, match=says):
        experiments.run("bad")


def test_cli_run_writes_the_report_and_rebuilds_it(tmp_path, capsys):
    out = tmp_path / "rep"
    assert main(["run", "affine", "glorot", "--out", str(out), "--seeds", "1", "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "affine" in text and "report:" in text
    page = (out / "index.html").read_text()
    assert 'id="affine"' in page and 'id="glorot"' in page and "data:image/png;base64," in page
    saved = json.loads((out / "records.json").read_text())
    assert [r["name"] for r in saved["records"]] == ["affine", "glorot"]
    assert saved["meta"]["command"] == "normlab run affine glorot --out " + str(out) + " --seeds 1 --quiet"
    (out / "index.html").unlink()
    assert main(["report", str(out)]) == 0 and (out / "index.html").exists()


def test_cli_errors_have_meaningful_exit_codes(tmp_path, capsys, monkeypatch):
    assert main(["run", "zscor", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "zscor" in err and "zscore" in err and "batch-size" in err
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "normlab run" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["run", "--seeds", "0"])
    assert e.value.code == 2
    if not torch.cuda.is_available():
        assert main(["run", "affine", "--device", "cuda", "--out", str(tmp_path)]) == 2
    monkeypatch.setattr(experiments, "EXPERIMENTS", dict(experiments.EXPERIMENTS))

    @experiments.experiment("broken", "Broken", source="", claim="")
    def broken(cfg):
        raise RuntimeError("boom")

    assert main(["run", "broken", "affine", "--out", str(tmp_path / "b"), "--quiet"]) == 1
    assert "broken" in capsys.readouterr().err
    assert (tmp_path / "b" / "index.html").exists()  # the experiments that ran are still reported


def test_cli_run_keeps_every_result_and_never_touches_the_users_files(tmp_path, capsys, monkeypatch):
    out = tmp_path / "rep"
    assert main(["run", "affine", "--out", str(out), "--seeds", "1", "--quiet"]) == 0
    assert main(["run", "glorot", "--out", str(out), "--seeds", "1", "--quiet"]) == 0  # adds to the report
    saved = json.loads((out / "records.json").read_text())
    assert [r["name"] for r in saved["records"]] == ["affine", "glorot"]
    page = (out / "index.html").read_text()
    assert 'id="affine"' in page and 'id="glorot"' in page
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "index.html").write_text("my page")
    capsys.readouterr()
    assert main(["run", "affine", "--out", str(mine), "--quiet"]) == 2  # refused before anything runs
    err = capsys.readouterr().err
    assert "index.html" in err and "--force" in err and "affine" not in capsys.readouterr().out
    assert (mine / "index.html").read_text() == "my page" and len(list(mine.iterdir())) == 1
    assert main(["run", "affine", "--out", "", "--quiet"]) == 2 and "empty" in capsys.readouterr().err
    monkeypatch.setattr(experiments, "EXPERIMENTS", dict(experiments.EXPERIMENTS))

    @experiments.experiment("interrupted", "Interrupted", source="", claim="")
    def interrupted(cfg):
        raise KeyboardInterrupt

    fresh = tmp_path / "fresh"
    with pytest.raises(KeyboardInterrupt):
        main(["run", "affine", "interrupted", "--out", str(fresh), "--seeds", "1", "--quiet"])
    assert [r["name"] for r in json.loads((fresh / "records.json").read_text())["records"]] == ["affine"]
    assert main(["report", str(fresh)]) == 0 and 'id="affine"' in (fresh / "index.html").read_text()


def test_list_names_every_experiment(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in experiments.EXPERIMENTS)


def test_the_lab_is_not_imported_by_the_library():
    import subprocess
    import sys

    code = "import sys, normlab.nn, normlab.functional, normlab.preprocessing, normlab.diagnostics; " \
           "print(any(m.startswith('normlab.lab') for m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"


def test_unseeded_models_draw_from_the_global_rng():
    torch.manual_seed(0)
    a, b = models.mlp(2, 1), models.mlp(2, 1)
    assert not torch.equal(a[0].weight, b[0].weight)
    torch.manual_seed(0)
    assert torch.equal(models.mlp(2, 1)[0].weight, a[0].weight)


def test_fit_is_deterministic_with_dropout_and_leaves_the_global_rng_alone():
    split = data.make_regression(num_examples=100, seed=0)

    first = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 1))
    second = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 1))
    second.load_state_dict(first.state_dict())
    state = torch.random.get_rng_state()
    assert train.fit(first, split, epochs=2, seed=3).train_loss == train.fit(second, split, epochs=2, seed=3).train_loss
    assert torch.equal(torch.random.get_rng_state(), state)


def test_fit_refuses_a_batch_larger_than_the_data_with_drop_last():
    split = data.make_regression(num_examples=100, seed=0)
    with pytest.raises(ValueError, match="no batch"):
        train.fit(models.mlp(2, 1), split, batch_size=500, drop_last=True)


def test_evaluation_restores_each_submodules_mode():
    split = data.make_regression(num_examples=100, seed=0)
    model = models.mlp(2, 1, norm="batch", seed=0)
    model[1].eval()  # a frozen BN inside a training model
    train.evaluate(model, split.X_test, split.y_test, nn.MSELoss(), lambda out, y: 0.0)
    assert model.training and not model[1].training


def test_failed_and_vanished_runs_count_against_their_configuration():
    mean, lo, hi = experiments._mean_curve([[0.9, 0.9, 0.9], [0.1]])
    assert mean[0] == pytest.approx(0.5) and math.isnan(mean[1]) and math.isnan(hi[2])
    assert experiments._log10_spread([1.0, 100.0]) == pytest.approx(2.0)
    assert experiments._log10_spread([0.0, 1.0]) == math.inf
    assert math.isnan(experiments._log10_spread([1.0]))


def test_cli_deduplicates_names_refuses_a_file_as_out_and_imports_user_experiments(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(experiments, "EXPERIMENTS", dict(experiments.EXPERIMENTS))
    assert main(["run", "affine", "affine", "--out", str(tmp_path / "r"), "--quiet"]) == 0
    assert len(json.loads((tmp_path / "r" / "records.json").read_text())["records"]) == 1
    (tmp_path / "f").write_text("")
    assert main(["run", "affine", "--out", str(tmp_path / "f")]) == 2
    assert "is a file" in capsys.readouterr().err
    (tmp_path / "my_lab_plugin.py").write_text(
        "from normlab.lab.experiments import experiment\n"
        "from normlab.lab import records\n"
        "@experiment('plugged', 'Plugged', source='me', claim='1 > 0')\n"
        "def plugged(cfg):\n"
        "    return {'checks': [records.check('one', 1, '>', 0)]}\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.path", [p for p in __import__("sys").path if p not in ("", ".")])
    assert main(["run", "--import", "my_lab_plugin", "plugged", "--out", "p", "--quiet"]) == 0
    assert main(["run", "--import", "no_such_module_here", "plugged"]) == 2
    assert "no_such_module_here" in capsys.readouterr().err
    (tmp_path / "raising_plugin.py").write_text("raise RuntimeError('my bug')\n")
    assert main(["run", "--import", "raising_plugin", "plugged"]) == 2
    assert "RuntimeError: my bug" in capsys.readouterr().err
    (tmp_path / "twice_plugin.py").write_text((tmp_path / "my_lab_plugin.py").read_text())  # 'plugged' again
    assert main(["run", "--import", "twice_plugin", "plugged"]) == 2
    assert "already registered" in capsys.readouterr().err
    for bad in ("../evil", "", "a b", "-x"):
        with pytest.raises(ValueError, match="letters, digits"):
            experiments.experiment(bad, "Bad", source="", claim="")


def test_quick_may_be_inconclusive_where_full_decides_never_the_opposite(monkeypatch):
    monkeypatch.setattr(experiments, "EXPERIMENTS", dict(experiments.EXPERIMENTS))
    per_seed = [0.02, 0.2, 0.1, 0.15, 0.12]  # what each random seed would measure

    @experiments.experiment("seedy", "Seedy", source="", claim="the difference is positive", seeds=(2, 5))
    def seedy(cfg):
        seeds = cfg.seeds
        return {"params": {"random seeds": list(seeds)},
                "checks": [records.check("difference", [per_seed[s] for s in seeds], ">", 0.0)]}

    quick, full = experiments.run("seedy"), experiments.run("seedy", experiments.Config(full=True))
    assert quick["verdict"]["status"] == "inconclusive" and "`normlab run seedy --full`" in quick["verdict"]["summary"]
    assert full["verdict"]["status"] == "supported" and full["checks"][0]["values"] == per_seed
    assert full["checks"][0]["ci"][0] > 0 > quick["checks"][0]["ci"][0]


def _double_bn_mlp(seed):
    return models.mlp(64, 10, depth=2, width=16, activation="relu", norm="batch", seed=seed).double()


def test_data_parallel_training_with_syncbn_equals_one_process():
    import dataclasses
    import functools

    from normlab.lab.parallel import fit_parallel

    split = data.load_dataset("digits", seed=0).scaled("zscore")
    split = dataclasses.replace(split, X_train=split.X_train.double(), X_test=split.X_test.double())
    kwargs = dict(epochs=2, lr=0.05, batch_size=32, seed=0, drop_last=True)
    h2, state = fit_parallel(functools.partial(_double_bn_mlp, 0), split, 2, **kwargs)
    one = _double_bn_mlp(0)
    h1 = train.fit(one, split, **kwargs)
    np.testing.assert_allclose(h2.test_loss, h1.test_loss, rtol=1e-12)
    for k, v in one.state_dict().items():
        torch.testing.assert_close(state[k], v, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="divisible"):
        fit_parallel(functools.partial(_double_bn_mlp, 0), split, 3, **kwargs)


def test_sharded_training_needs_batches_that_split_evenly():
    split = data.make_regression(num_examples=12, seed=0)  # 9 training examples
    with pytest.raises(ValueError, match="split evenly"):
        train.fit(models.mlp(2, 1), split, epochs=1, batch_size=4, shard=(0, 2))


def test_checks_take_tensors_arrays_and_identical_seeds():
    assert records.check("t", torch.tensor(0.5), ">", 0)["status"] == "holds"  # 0-d: one exact number
    assert records.check("a", np.array([0.2, 0.3, 0.25]), ">", 0)["status"] == "holds"
    same = records.check("s", [1.0, 1.0, 1.0], ">", 1.0)  # no spread: more seeds cannot move it
    assert same["status"] == "fails" and same["ci"] == [1.0, 1.0]
    assert "1.001" in records.explain(records.check("r", [1.0004, 1.0005, 1.0006], ">", 1))  # digits to see it


def test_bands_on_a_log_axis_stay_above_zero():
    # an MSE's mean − std can be negative; on a log axis the band is the geometric one, ×/÷ its std
    mean, lo, hi = experiments._mean_curve([[1.0, 0.1], [100.0, 0.2], [1.0, 50.0]], log=True)
    assert all(v > 0 for v in lo) and all(a < m < b for a, m, b in zip(lo, mean, hi))
    assert mean[0] == pytest.approx(100 ** (1 / 3))
    arithmetic = experiments._mean_curve([[1.0, 0.1], [100.0, 0.2], [1.0, 50.0]])
    assert min(arithmetic[1]) < 0  # what was drawn before


def test_an_interval_is_cut_to_the_range_the_quantity_can_take():
    wide = records.check("accuracy difference", [0.9, 0.1, 0.95], ">", 0.2, within=(-1, 1))
    assert wide["ci"][1] == 1.0 and "cut to the possible range" in wide["ci_method"]
    assert records.check("same", [0.9, 0.1, 0.95], ">", 0.2)["ci"][1] > 1.0  # without it: past 1
    narrow = records.check("inside", [0.5, 0.51, 0.52], ">", 0.2, within=(-1, 1))
    assert "cut" not in narrow["ci_method"] and narrow["status"] == "holds"
