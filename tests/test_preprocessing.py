"""Scalers against scikit-learn, the oracle nobody here wrote.

Same attributes and outputs as ``sklearn.preprocessing`` on awkward data (NaN, constant and
near-constant features, a 1e6 offset), for every hyper-parameter combination; streaming equals
one fit; numpy stays numpy and tensors stay tensors; ``check_estimator`` passes; errors name
the problem and never leave a half-updated scaler.
"""

from __future__ import annotations

import copy
import io
import itertools
import pickle

import numpy as np
import pytest
import scipy.sparse
import sklearn.preprocessing as skp
import torch
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.utils import estimator_checks
from sklearn.utils.estimator_checks import parametrize_with_checks

from normlab.preprocessing import MinMaxScaler, StandardScaler, ZScoreScaler

RTOL = ATOL = 1e-10
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

# ours -> (scikit-learn's class, the learned attributes to compare)
ORACLES = {
    MinMaxScaler: (
        skp.MinMaxScaler,
        ("min_", "scale_", "data_min_", "data_max_", "data_range_", "n_samples_seen_"),
    ),
    StandardScaler: (skp.StandardScaler, ("mean_", "var_", "scale_", "n_samples_seen_")),
}
PARAMS = [
    (StandardScaler, dict(with_mean=m, with_std=s))
    for m, s in itertools.product([True, False], repeat=2)
] + [
    (MinMaxScaler, dict(feature_range=r, clip=c))
    for r, c in itertools.product([(0, 1), (-1, 1), (2.5, 7.0)], [False, True])
]
IDS = [f"{cls.__name__}-{'-'.join(f'{k}={v}' for k, v in p.items())}" for cls, p in PARAMS]


def make_data(seed: int, n: int = 200, *, all_nan_column: bool = False) -> np.ndarray:
    """Features chosen to break naive scalers."""
    rng = np.random.default_rng(seed)
    x = np.column_stack(
        [
            rng.normal(3.0, 2.0, n),  # ordinary
            1e6 + rng.normal(0.0, 1.0, n),  # |mean| >> std: E[x²]−E[x]² would lose it all
            np.full(n, -4.0),  # constant
            1e6 + rng.integers(0, 2, n) * np.spacing(1e6),  # constant up to one ulp
            1.0 + rng.integers(0, 2, n) * np.spacing(1.0),  # range below 10·eps
            rng.uniform(-5.0, 5.0, n),  # gets NaN holes below
        ]
    )
    x[rng.random(n) < 0.25, 5] = np.nan
    x[rng.random(n) < 0.05, 0] = np.nan
    if all_nan_column:
        x = np.column_stack([x, np.full(n, np.nan)])
    return x


def assert_fitted_like(ours, theirs, attrs):
    for name in attrs:
        a, b = getattr(ours, name), getattr(theirs, name)
        if b is None:
            assert a is None, name
        elif name == "n_samples_seen_":
            # scikit-learn reports float counts from StandardScaler; the values must agree
            np.testing.assert_array_equal(a, b, err_msg=name)
            assert np.issubdtype(np.asarray(a).dtype, np.integer), name
            assert np.ndim(a) == np.ndim(b), name
        else:
            assert isinstance(a, np.ndarray) and a.dtype == np.float64, name
            np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL, equal_nan=True, err_msg=name)
    assert ours.n_features_in_ == theirs.n_features_in_


def assert_close(a, b, floor=0.0):
    a, b = np.asarray(a), np.asarray(b)
    np.testing.assert_array_equal(np.isnan(a), np.isnan(b))
    err = np.where(np.isnan(a), 0, np.abs(a - b) - RTOL * np.abs(b) - ATOL - floor)
    worst = np.unravel_index(err.argmax(), err.shape)
    assert (err <= 0).all(), f"off by {err.max():.3g} beyond tolerance at {worst}"


def input_resolution(scaler, x) -> np.ndarray:
    """Per feature, 16 ulps of the largest |x| in output units: no two implementations can agree
    more closely than the input is represented (a 1e6 offset is only known to 1.2e-10)."""
    if isinstance(scaler, MinMaxScaler):
        slope = scaler.scale_
    else:
        slope = 1 / scaler.scale_ if scaler.with_std else np.ones(x.shape[1])
    mag = np.nanmax(np.where(np.isnan(x), 0, np.abs(x)), axis=0)
    return np.nan_to_num(16 * np.finfo(np.float64).eps * mag * np.abs(slope))


def pair(cls, params):
    sk_cls, attrs = ORACLES[cls]
    return cls(**params), sk_cls(**params), attrs


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # scikit-learn's nanmin of an all-NaN column
@pytest.mark.parametrize("all_nan_column", [False, True])
@pytest.mark.parametrize("cls, params", PARAMS, ids=IDS)
def test_matches_sklearn(cls, params, all_nan_column):
    ours, theirs, attrs = pair(cls, params)
    train = make_data(0, all_nan_column=all_nan_column)
    test = make_data(1, 50, all_nan_column=all_nan_column)
    test[:5] *= 10  # outside the training range: exercises clip
    fitted, expected = ours.fit_transform(train), theirs.fit_transform(train)
    assert_fitted_like(ours, theirs, attrs)
    assert_close(fitted, expected, input_resolution(ours, train))
    for x in (train, test):
        out = ours.transform(x)
        assert_close(out, theirs.transform(x), input_resolution(ours, x))  # NaN where x is NaN
        assert_close(ours.inverse_transform(out), theirs.inverse_transform(out))


def random_cuts(n: int, rng: np.random.Generator) -> np.ndarray:
    """2 to 7 cut points, at multiples of 10 so no chunk is all-NaN by chance."""
    return 10 * np.sort(rng.choice(np.arange(1, n // 10), size=rng.integers(2, 8), replace=False))


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("cls, params", PARAMS, ids=IDS)
def test_streaming_equals_one_fit(cls, params, seed):
    ours, theirs, attrs = pair(cls, params)
    x = make_data(seed)
    cuts = random_cuts(len(x), np.random.default_rng(seed))
    # scikit-learn's partial_fit is the oracle while every chunk sees every feature
    for chunk in np.split(x, cuts):
        ours.partial_fit(chunk)
        theirs.partial_fit(chunk)
    assert_fitted_like(ours, theirs, attrs)
    assert_fitted_like(ours, cls(**params).fit(x), attrs)

    # A chunk blind to a feature (all NaN there) must change nothing, so compare with one fit
    # on all rows: scikit-learn's partial_fit turns such a feature into NaN for good.
    x[: cuts[0], 5] = np.nan
    x[cuts[-1] :, 0] = np.nan
    streamed = cls(**params)
    for i, chunk in enumerate(np.split(x, cuts)):
        streamed.partial_fit(torch.from_numpy(chunk) if i % 2 else chunk)  # types may mix
    once = theirs.__class__(**params).fit(x)
    assert_fitted_like(streamed, once, attrs)
    assert_close(streamed.transform(x), once.transform(x), input_resolution(streamed, x))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.bool]
)
@pytest.mark.parametrize("cls", [MinMaxScaler, StandardScaler])
def test_tensor_in_tensor_out(cls, dtype, device):
    x = torch.from_numpy(make_data(2)[:, [0, 2, 5]])  # no 1e6 column: float16 cannot hold it
    if dtype == torch.bool:
        x = x > 3
    elif not dtype.is_floating_point:
        x = x.nan_to_num().round()
    x = x.to(device=device, dtype=dtype)
    x_np = x.cpu().double().numpy()
    scaler, ref = cls().fit(x), cls().fit(x_np)  # ref: the same values through the numpy path
    for name in ORACLES[cls][1][:-1]:
        attr = getattr(scaler, name)
        assert isinstance(attr, np.ndarray) and attr.dtype == np.float64, name
        assert_close(attr, getattr(ref, name))
    out_dtype = dtype if dtype.is_floating_point else torch.get_default_dtype()
    out = scaler.transform(x)
    assert isinstance(out, torch.Tensor) and (out.dtype, out.device) == (out_dtype, x.device)
    expected = torch.from_numpy(ref.transform(x_np)).to(out_dtype)  # float64 maths, one rounding
    torch.testing.assert_close(out.cpu(), expected, equal_nan=True)
    back = scaler.inverse_transform(out)
    assert isinstance(back, torch.Tensor) and (back.dtype, back.device) == (out_dtype, x.device)


@pytest.mark.parametrize(
    "dtype, out_dtype",
    [(np.float64,) * 2, (np.float32,) * 2, (np.float16,) * 2, (np.int64, np.float64)],
)
@pytest.mark.parametrize("cls", [MinMaxScaler, StandardScaler])
def test_numpy_in_numpy_out(cls, dtype, out_dtype):
    x = np.nan_to_num(make_data(3)[:, [0, 2, 5]]).round(2).astype(dtype)  # float16-sized values
    ours, theirs, _ = pair(cls, {})
    out = ours.fit(x).transform(x)
    assert isinstance(out, np.ndarray) and out.dtype == out_dtype
    # float64 maths, rounded once: exactly the float64 result cast down
    np.testing.assert_array_equal(out, ours.transform(x.astype(np.float64)).astype(out_dtype))
    # scikit-learn does float32 maths in float32, so it is only close
    tol = {np.float64: RTOL, np.float32: 1e-6, np.float16: 1e-3}[out_dtype]
    np.testing.assert_allclose(out, theirs.fit(x).transform(x), rtol=tol, atol=tol)
    assert ours.inverse_transform(out).dtype == out_dtype
    assert ours.transform(x.tolist()).dtype == np.float64  # lists become float64, as in sklearn


@pytest.mark.parametrize("cls", [MinMaxScaler, StandardScaler])
def test_numpy_layouts_torch_cannot_view(cls):
    x = make_data(4)
    readonly = x.copy()
    readonly.flags.writeable = False
    scaler = cls().fit(x)
    for odd in (x[::-1], x.astype(">f8"), np.asfortranarray(x), readonly):
        expected = scaler.transform(np.ascontiguousarray(odd, dtype=np.float64))
        np.testing.assert_array_equal(scaler.transform(odd), expected)
        refit = cls().fit(odd)  # reversed rows sum in another order: equal up to rounding
        assert_close(refit.transform(x), scaler.transform(x), input_resolution(scaler, x))


def test_output_never_aliases_input():
    x = make_data(4)
    keep = x.copy()
    identity = StandardScaler(with_mean=False, with_std=False).fit(x)
    for inp in (x, torch.from_numpy(x)):
        for out in (identity.transform(inp), identity.inverse_transform(inp)):
            assert not np.shares_memory(np.asarray(out), x)
    np.testing.assert_array_equal(x, keep)


def test_zscore_alias():
    assert ZScoreScaler is StandardScaler


# --- the scikit-learn estimator contract ----------------------------------------------------

ESTIMATORS = [
    MinMaxScaler(),
    MinMaxScaler(feature_range=(-1, 2), clip=True),
    StandardScaler(),
    StandardScaler(with_mean=False),
    StandardScaler(with_mean=False, with_std=False),
]


@parametrize_with_checks(ESTIMATORS)
def test_check_estimator(estimator, check):
    check(estimator)


# checks check_estimator does not yield; the pandas ones skip themselves without pandas
EXTRA_CHECKS = [
    "check_transformer_get_feature_names_out",
    "check_set_output_transform",
    "check_transformer_get_feature_names_out_pandas",
    "check_dataframe_column_names_consistency",
    "check_set_output_transform_pandas",
    "check_global_output_transform_pandas",
]


@pytest.mark.filterwarnings("ignore:X (does not have valid|has) feature names")
@pytest.mark.parametrize("check", EXTRA_CHECKS)
@pytest.mark.parametrize("estimator", ESTIMATORS[::2], ids=repr)
def test_extra_sklearn_checks(estimator, check):
    getattr(estimator_checks, check)(type(estimator).__name__, estimator)


@pytest.mark.parametrize("cls, params", PARAMS, ids=IDS)
def test_pickle_clone_params(cls, params):
    x = make_data(5)
    fitted = cls(**params).fit(x)
    restored = pickle.loads(pickle.dumps(fitted))
    np.testing.assert_array_equal(restored.transform(x), fitted.transform(x))
    fresh = clone(fitted)
    assert fresh.get_params() == {"copy": True, **params} and not hasattr(fresh, "scale_")
    other = {"with_mean": False} if cls is StandardScaler else {"feature_range": (-3, 3)}
    assert fresh.set_params(**other).get_params() == {"copy": True, **params, **other}


@pytest.mark.parametrize("cls, params", PARAMS, ids=IDS)
def test_state_dict_round_trip(cls, params):
    x = make_data(6)
    fitted = cls(**params).partial_fit(x[:70]).partial_fit(x[70:])
    buf = io.BytesIO()
    torch.save(fitted.state_dict(), buf)
    buf.seek(0)
    loaded = cls(**params).load_state_dict(torch.load(buf, weights_only=True))
    np.testing.assert_array_equal(loaded.transform(x), fitted.transform(x))
    np.testing.assert_array_equal(loaded.inverse_transform(x), fitted.inverse_transform(x))
    for name in ORACLES[cls][1] + ("n_features_in_",):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(fitted, name))
    # the restored scaler keeps streaming exactly like the original
    np.testing.assert_array_equal(
        loaded.partial_fit(x[:9]).transform(x), fitted.partial_fit(x[:9]).transform(x)
    )


def test_set_output_pandas_and_feature_names():
    pd = pytest.importorskip("pandas")
    df = pd.DataFrame(make_data(7)[:, :3], columns=["a", "b", "c"])
    for cls in (MinMaxScaler, StandardScaler):
        scaler = cls().set_output(transform="pandas").fit(df)
        out = scaler.transform(df)
        assert isinstance(out, pd.DataFrame) and list(out.columns) == ["a", "b", "c"]
        assert list(scaler.feature_names_in_) == ["a", "b", "c"]
        buf = io.BytesIO()
        torch.save(scaler.state_dict(), buf)
        buf.seek(0)
        loaded = cls().load_state_dict(torch.load(buf, weights_only=True))
        assert list(loaded.feature_names_in_) == ["a", "b", "c"]


# --- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["transform", "inverse_transform", "state_dict"])
@pytest.mark.parametrize("cls", [MinMaxScaler, StandardScaler])
def test_not_fitted(cls, method):
    args = () if method == "state_dict" else (np.ones((2, 2)),)
    with pytest.raises(NotFittedError, match="not fitted") as info:
        getattr(cls(), method)(*args)
    assert isinstance(info.value, ValueError) and isinstance(info.value, AttributeError)


def snapshot(est) -> dict:
    return copy.deepcopy(vars(est))


def assert_unchanged(est, before: dict):
    after = vars(est)
    assert after.keys() == before.keys()
    for k, v in before.items():
        if k == "_stats":
            for name, t in v.items():
                torch.testing.assert_close(after[k][name], t, rtol=0, atol=0, equal_nan=True)
        else:
            np.testing.assert_array_equal(after[k], v, err_msg=k)


_GOOD = make_data(8)[:, :4]
BAD_INPUTS = {
    "features": (_GOOD[:, :3], ValueError, "X has 3 features, but .* is expecting 4 features"),
    "features-tensor": (torch.ones(5, 3), ValueError, "X has 3 features, but .* is expecting 4"),
    "empty": (np.ones((0, 4)), ValueError, "0 sample"),
    "empty-tensor": (torch.ones(0, 4), ValueError, "0 sample"),
    "no-features": (np.ones((5, 0)), ValueError, "0 feature"),
    "no-features-tensor": (torch.ones(5, 0), ValueError, "0 feature"),
    "1d": (np.ones(4), ValueError, "2D"),
    "1d-tensor": (torch.ones(4), ValueError, "2D"),
    "inf": (np.where(np.eye(5, 4) > 0, np.inf, _GOOD[:5]), ValueError, "infinity"),
    "inf-tensor": (torch.tensor([[1.0, -float("inf"), 2.0, 3.0]]), ValueError, "infinity"),
    "sparse": (scipy.sparse.csr_matrix(np.eye(5, 4)), TypeError, "sparse.*toarray"),
    "sparse-tensor": (torch.eye(5, 4).to_sparse(), TypeError, "sparse.*to_dense"),
    "complex-tensor": (torch.ones(5, 4, dtype=torch.complex64), TypeError, "complex"),
}


# fit starts afresh, so a new feature count is no error for it (test_fit_starts_afresh)
BAD_CALLS = [
    (bad, method)
    for bad in BAD_INPUTS
    for method in ("partial_fit", "fit", "transform", "inverse_transform")
    if not (method == "fit" and bad.startswith("features"))
]


@pytest.mark.parametrize("bad, method", BAD_CALLS)
@pytest.mark.parametrize("cls", [MinMaxScaler, StandardScaler])
def test_bad_input_raises_and_changes_nothing(cls, bad, method):
    x, error, match = BAD_INPUTS[bad]
    scaler = cls().partial_fit(_GOOD[:100]).partial_fit(_GOOD[100:])
    before = snapshot(scaler)
    with pytest.raises(error, match=match):
        getattr(scaler, method)(x)
    assert_unchanged(scaler, before)


@pytest.mark.parametrize("bad_range", [(1, 0), (2, 2), (0, 1, 2), "ab", (0, float("nan"))])
def test_feature_range_is_checked_before_anything_changes(bad_range):
    scaler = MinMaxScaler().fit(_GOOD)
    before = snapshot(scaler)
    scaler.set_params(feature_range=bad_range)
    for method in ("fit", "partial_fit"):
        with pytest.raises(ValueError, match=r"feature_range .*min < max, got"):
            getattr(scaler, method)(_GOOD)
    assert_unchanged(scaler, {**before, "feature_range": bad_range})


def test_state_dict_carries_feature_names():
    sd = {**StandardScaler().fit(_GOOD).state_dict(), "feature_names_in": ["a", "b", "c", "d"]}
    loaded = StandardScaler().load_state_dict(sd)
    assert list(loaded.get_feature_names_out()) == ["a", "b", "c", "d"]
    assert loaded.state_dict()["feature_names_in"] == ["a", "b", "c", "d"]
    assert not hasattr(loaded.fit(_GOOD), "feature_names_in_")  # numpy data has no names


def test_load_state_dict_rejects_foreign_dicts():
    sd = StandardScaler().fit(_GOOD).state_dict()
    with pytest.raises(ValueError, match="needs keys"):
        MinMaxScaler().load_state_dict(sd)
    with pytest.raises(ValueError, match="n_features_in=3"):
        StandardScaler().load_state_dict({**sd, "n_features_in": 3})


@pytest.mark.parametrize("cls", [MinMaxScaler, StandardScaler])
def test_fit_starts_afresh(cls):
    scaler = cls().fit(_GOOD)
    refit = scaler.fit(torch.from_numpy(_GOOD[:50, :3]))
    assert refit is scaler and scaler.n_features_in_ == 3
    assert_fitted_like(scaler, ORACLES[cls][0]().fit(_GOOD[:50, :3]), ORACLES[cls][1])


@pytest.mark.parametrize("make, key, value", [
    (lambda: StandardScaler(), "mean", torch.zeros(3, 1)),              # wrong dims
    (lambda: StandardScaler(), "count", torch.tensor([5.0, -1.0, 5.0])),  # a negative count
    (lambda: StandardScaler(), "m2", torch.tensor([1.0, -1.0, 1.0])),     # a negative sum of squares
    (lambda: StandardScaler(), "mean", "abc"),
    (lambda: MinMaxScaler(), "data_min", torch.zeros(4)),                # wrong length
    (lambda: MinMaxScaler(), "n_samples_seen", torch.tensor(-3)),
    (lambda: MinMaxScaler(), "n_features_in", 0),
    (lambda: MinMaxScaler(), "n_samples_seen", torch.tensor([4, 4])),   # one count, not one per feature
    (lambda: MinMaxScaler(), "n_samples_seen", torch.tensor(4.5)),      # not a whole number
    (lambda: MinMaxScaler(), "data_max", torch.full((3,), -1e3)),      # below data_min
])
def test_a_rejected_scaler_state_dict_keeps_the_fit(make, key, value):
    x = np.random.default_rng(0).normal(size=(20, 3))
    scaler = make().fit(x)
    before = scaler.transform(x)
    sd = scaler.state_dict()
    sd[key] = value
    with pytest.raises(ValueError, match=key.replace("_", ".")):
        make().fit(x[:5] * 3).load_state_dict(sd)
    with pytest.raises(ValueError):
        scaler.load_state_dict(sd)
    np.testing.assert_array_equal(scaler.transform(x), before)


@pytest.mark.parametrize("make, key, value", [
    (StandardScaler, "count", 5), (StandardScaler, "count", torch.tensor(5.0)), (StandardScaler, "mean", 2.0),
    (MinMaxScaler, "data_max", torch.tensor(30.0)), (MinMaxScaler, "n_samples_seen", torch.tensor([7])),
])
def test_a_number_for_every_feature_loads_in_the_shape_a_fit_gives(make, key, value):
    """A number stands for every feature: loaded, state_dict() and the attributes agree, and the
    next partial_fit merges with it (it raised midway, or kept a 0-d statistic, before)."""
    x = np.arange(30.0).reshape(-1, 3)
    fitted = make().fit(x)
    sd = fitted.state_dict()
    sd[key] = value
    got = make().fit(x[:2]).load_state_dict(sd)
    want = fitted.state_dict()
    for k, v in got.state_dict().items():
        if isinstance(v, torch.Tensor):
            assert v.shape == want[k].shape and v.dtype == want[k].dtype, k
    if make is StandardScaler:
        assert got.mean_.shape == (3,)
        got.partial_fit(x)
        assert np.isfinite(got.mean_).all()
    else:
        assert got.data_max_.shape == (3,) and got.state_dict()["data_max"].tolist() == got.data_max_.tolist()


def test_standard_scaler_sample_weight_is_scikit_learns_and_streams():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(30, 4)) * [1, 10, 100, 1e4] + 5
    X[3, 1] = np.nan
    w = rng.uniform(0, 3, size=30)
    want = skp.StandardScaler().fit(X, sample_weight=w)
    got = StandardScaler().fit(X, sample_weight=w)
    chunks = StandardScaler()
    for i in range(0, 30, 7):
        chunks.partial_fit(torch.from_numpy(X[i:i + 7]), sample_weight=torch.from_numpy(w[i:i + 7]))
    for fitted in (got, chunks):
        for attr in ("mean_", "var_", "scale_", "n_samples_seen_"):
            np.testing.assert_allclose(getattr(fitted, attr), getattr(want, attr), rtol=1e-10)
    # integer weights are repeated rows; a number weighs every sample alike
    reps = np.array([1, 0, 2] * 10)
    np.testing.assert_allclose(StandardScaler().fit(X, sample_weight=reps).var_,
                               StandardScaler().fit(np.repeat(X, reps, axis=0)).var_, rtol=1e-10)
    np.testing.assert_allclose(StandardScaler().fit(X, sample_weight=2.0).mean_, want.mean_ * 0 + np.nanmean(X, 0))
    for bad in (np.ones(29), -np.ones(30), np.full(30, np.nan)):
        with pytest.raises(ValueError, match="sample_weight"):
            got.fit(X, sample_weight=bad)
    np.testing.assert_allclose(got.mean_, want.mean_)  # a refused call keeps the fit


@pytest.mark.parametrize("make, theirs", [(StandardScaler, skp.StandardScaler), (MinMaxScaler, skp.MinMaxScaler)])
def test_copy_false_writes_into_x_as_scikit_learn(make, theirs):
    X = np.random.default_rng(0).normal(size=(6, 3)) * 4 + 2
    # scikit-learn's MinMaxScaler has copy= only in its constructor; normlab's has both
    for ctor, call in [({"copy": False}, {})] + ([({}, {"copy": False})] if make is StandardScaler else []):
        ours_x, their_x = X.copy(), X.copy()
        ours, ref = make(**ctor).fit(X), theirs(**ctor).fit(X)
        got, want = ours.transform(ours_x, **call), ref.transform(their_x, **call)
        assert (got is ours_x) == (want is their_x) and np.allclose(ours_x, their_x)
        back = ours.inverse_transform(ours_x, **call)
        assert back is ours_x and np.allclose(ours_x, X)
        t = torch.from_numpy(X.copy())
        assert ours.transform(t, **call) is t and np.allclose(t.numpy(), want)
    x = X.copy()
    assert make().fit(X).transform(x) is not x and np.array_equal(x, X)  # the default copies


class _Recorder:
    """A scikit-learn fit callback (its FitCallback protocol) that records the hooks it sees."""

    def __init__(self):
        self.hooks, self.fitted = [], None

    def setup(self, estimator, context):
        self.hooks.append("setup")

    def teardown(self, estimator, context):
        self.hooks.append("teardown")

    def on_fit_task_begin(self, estimator, context, *, X=None, y=None, metadata=None):
        self.hooks.append("begin")

    def on_fit_task_end(self, estimator, context, *, X=None, y=None, metadata=None, fitted_estimator=None):
        self.hooks.append("end")
        self.fitted = fitted_estimator


@pytest.mark.skipif(not hasattr(StandardScaler, "set_callbacks"), reason="scikit-learn < 1.9 has no fit callbacks")
@pytest.mark.parametrize("cls", [StandardScaler, MinMaxScaler])
@pytest.mark.parametrize("method", ["fit", "partial_fit"])
def test_fit_callbacks_as_scikit_learn(cls, method):
    X = np.random.default_rng(0).random((10, 2))
    cb = _Recorder()
    scaler = cls().set_callbacks(cb)
    getattr(scaler, method)(X)
    assert cb.hooks == ["setup", "begin", "end", "teardown"]
    np.testing.assert_allclose(cb.fitted.transform(X), scaler.transform(X))
    cb.hooks.clear()
    with pytest.raises(ValueError):  # refused before its task begins, as scikit-learn's
        scaler.fit(np.full((3, 2), np.inf))
    assert cb.hooks == [] and cb.fitted is not None
