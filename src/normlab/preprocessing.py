"""Min-Max and Z-Score scalers with the scikit-learn contract, on numpy arrays and torch tensors.

The classic per-feature normalizations of Lesson 14.1 (§1.1 and §1.2), as estimators that drop into
a scikit-learn ``Pipeline`` and also scale torch tensors where they live:

* :class:`MinMaxScaler` — ``(x − min) / (max − min)``, mapped onto ``feature_range``.
* :class:`StandardScaler` (alias :class:`ZScoreScaler`) — ``(x − μ) / σ``.

The contract is scikit-learn's: ``__init__`` only stores its arguments; ``fit`` forgets what was
seen before and is ``partial_fit`` on a fresh state; learned attributes end in ``_`` and carry
scikit-learn's names, so code written against ``sklearn.preprocessing`` reads them unchanged.
Every statistic comes from :mod:`normlab.stats` (:class:`~normlab.stats.Moments` merged with
Chan's formulae, :func:`~normlab.stats.extrema`), so streaming ``partial_fit`` over chunks gives
the same scaler as one ``fit`` on all of them, up to rounding.

Shared rules (written once here, referenced by both classes):

* **Fit on training data only.** The statistics are parameters of the model: compute them on
  the training set, then apply the *same* fitted scaler to validation and test data (Lesson 14.1,
  §2: the per-column mean and variance "must come from the training set, never from the test
  set").
* **Types.** numpy (or lists, DataFrames) in → numpy out: float32 and float16 stay as they
  are, anything else becomes float64 (scikit-learn's rule). Tensor in → tensor out on the same
  device with the same floating dtype; integer and bool tensors come back in
  ``torch.get_default_dtype()``, torch's own promotion rule for ``int_tensor * 1.0``.
  Arithmetic is done in float64 and cast back at the end. Fitted attributes are always numpy
  float64 arrays, whatever the input.
* **Missing values.** NaN is ignored by ``fit`` and passed through by ``transform``;
  ±inf is rejected with a ``ValueError``. Sparse inputs are rejected with a ``TypeError``.
* **Constant features** get scale 1 instead of a division by zero (see :func:`_safe_scale`).
* **Failures change nothing.** Input is validated before any fitted attribute is touched, so a
  failed ``fit``/``partial_fit`` leaves the scaler as it was.
* **Checkpoints.** :meth:`state_dict` holds only the data statistics (plain tensors, ints and
  strings, loadable with ``torch.load(weights_only=True)``); the hyper-parameters come from the
  instance that loads it, as with ``torch.nn.Module``.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable

import numpy as np
import torch
from scipy import sparse
from sklearn.base import BaseEstimator, OneToOneFeatureMixin, TransformerMixin
from sklearn.utils.validation import check_array, check_is_fitted, validate_data
from torch import Tensor

from normlab.stats import Moments, extrema  # absolute: `python -m doctest` runs this file alone

try:  # scikit-learn >= 1.9: fit callbacks (progress bars, monitors), as on its own StandardScaler
    from sklearn.callback import CallbackSupportMixin as _CallbackSupport
    from sklearn.callback import with_callbacks as _with_callbacks
except ImportError:  # older scikit-learn has no callbacks: nothing to support
    class _CallbackSupport:  # noqa: D101 - empty stand-in
        pass

    def _with_callbacks(method):
        return method

__all__ = ["MinMaxScaler", "StandardScaler", "ZScoreScaler"]

# Statistics are float64 whatever the input, so one eps serves every tolerance below.
_EPS = float(np.finfo(np.float64).eps)
# numpy dtypes kept as they are (scikit-learn's `supported_float_dtypes` for numpy).
_NUMPY_FLOATS = (np.float64, np.float32, np.float16)


def _safe_scale(scale: Tensor, constant: Tensor | None = None) -> Tensor:
    """``scale`` with near-constant features set to 1, so they are shifted but never divided by ~0.

    A feature is near-constant where the mask ``constant`` is true; without a mask, where
    ``scale < 10·eps`` (rounding noise of a range or deviation that is really zero). NaN scales
    (features never observed) stay NaN.
    """
    if constant is None:
        constant = scale < 10 * _EPS
    return torch.where(constant, torch.ones_like(scale), scale)


class _Scaler(_CallbackSupport, OneToOneFeatureMixin, TransformerMixin, BaseEstimator):
    """Plumbing shared by the scalers; a subclass only supplies its maths.

    Subclass hooks, all on float64 tensors:

    * ``_batch_stats(x)`` — sufficient statistics of one batch, a dict of tensors;
    * ``_merge(old, new)`` — statistics of the union of two batches;
    * ``_attributes(stats)`` — the public learned attributes (numpy) from the statistics;
    * ``_forward(x)`` / ``_inverse(x)`` — the map and its inverse, given fitted attributes.

    Everything else (numpy/tensor/list conversion, validation, feature names, fitted checks,
    failure atomicity, checkpoints) lives here once.
    """

    def fit(self, X, y=None):
        """Learn the statistics of ``X`` (training data only), forgetting earlier fits.

        Parameters
        ----------
        X : array-like or Tensor of shape (n_samples, n_features)
            Training data; NaN entries are ignored.
        y : None
            Ignored; present for the scikit-learn API.

        Returns
        -------
        self
        """
        return self._fit(X, reset=True)

    def partial_fit(self, X, y=None):
        """Add the batch ``X`` to the statistics seen so far (streaming ``fit``).

        Any split of the data into batches gives the same statistics as one :meth:`fit` on all
        of it, up to rounding.

        Parameters
        ----------
        X : array-like or Tensor of shape (n_samples, n_features)
            One batch of training data; NaN entries are ignored.
        y : None
            Ignored.

        Returns
        -------
        self
        """
        return self._fit(X, reset=not self.__sklearn_is_fitted__())

    def transform(self, X, copy=None):
        """Scale ``X`` with the fitted statistics; NaN stays NaN.

        Parameters
        ----------
        X : array-like or Tensor of shape (n_samples, n_features)
        copy : bool or None, default=None
            ``None``: the scaler's ``copy``; ``False``: the result is written into ``X`` where
            ``X`` is a floating-point array or tensor of the output's dtype, and ``X`` returned.

        Returns
        -------
        ndarray or Tensor of the same shape (see the module notes on types)
        """
        return self._apply(X, self._forward, copy=copy)

    def inverse_transform(self, X, copy=None):
        """Undo :meth:`transform`: map scaled data back to the original units.

        Parameters
        ----------
        X : array-like or Tensor of shape (n_samples, n_features)
        copy : bool or None, default=None
            As in :meth:`transform`.

        Returns
        -------
        ndarray or Tensor of the same shape
        """
        return self._apply(X, self._inverse, check_names=False, copy=copy)

    def state_dict(self) -> dict[str, Any]:
        """The fitted statistics as plain tensors and values, ready for ``torch.save``.

        Keys: the statistics of the subclass, ``"n_features_in"`` and ``"feature_names_in"``
        (a list of strings, or None). Hyper-parameters are not included; they belong to the
        instance that calls :meth:`load_state_dict`.
        """
        check_is_fitted(self)
        names = getattr(self, "feature_names_in_", None)
        return {
            **{k: v.clone() for k, v in self._stats.items()},
            "n_features_in": int(self.n_features_in_),
            "feature_names_in": None if names is None else [str(n) for n in names],
        }

    def load_state_dict(self, state_dict: dict[str, Any]):
        """Restore a scaler fitted elsewhere from :meth:`state_dict`; returns ``self``.

        The learned attributes are recomputed from the statistics with this instance's
        hyper-parameters, so ``transform`` is identical to the saving scaler's when the
        hyper-parameters match.
        """
        sd = dict(state_dict)
        n = sd.pop("n_features_in", None)
        names = sd.pop("feature_names_in", None)
        if set(sd) != set(self._stat_keys) or not isinstance(n, int):
            needed = sorted({*self._stat_keys, "n_features_in", "feature_names_in"})
            raise ValueError(
                f"state_dict for {type(self).__name__} needs keys {needed}, got "
                f"{sorted(state_dict)}; pass the dict returned by "
                f"{type(self).__name__}.state_dict()."
            )
        if n <= 0:
            raise ValueError(f"state_dict has n_features_in={n}; a fitted scaler has at least one feature")
        stats = {}
        for k in self._stat_keys:
            try:
                stats[k] = torch.as_tensor(sd[k]).detach().to("cpu", copy=True)
            except (TypeError, ValueError, RuntimeError):
                raise ValueError(f"state_dict['{k}'] must be a number or a tensor, got {type(sd[k]).__name__}; "
                                 "pass the dict returned by state_dict()") from None
        # every entry is checked before anything is written: a rejected dict leaves the scaler as it was
        for k, t in stats.items():
            numeric = t.is_floating_point() or t.dtype in (torch.int32, torch.int64)
            if t.dim() > 1 or (t.dim() == 1 and t.shape[0] != (1 if k in self._scalar_keys else n)) or not numeric:
                what = "one number" if k in self._scalar_keys else f"a number or a 1-D tensor of n_features_in={n} values"
                raise ValueError(
                    f"state_dict['{k}'] must be {what}, got "
                    f"{'shape ' + str(tuple(t.shape)) if numeric else 'dtype ' + str(t.dtype)}; "
                    "was it edited or saved by another scaler?"
                )
            if k in self._count_keys and not bool(((t >= 0) & torch.isfinite(t.double())).all()):
                raise ValueError(f"state_dict['{k}'] counts samples and must be finite and >= 0, got {t.tolist()}")
            if k in self._scalar_keys and t.double().item() != round(t.double().item()):
                raise ValueError(f"state_dict['{k}'] counts samples and must be a whole number, got {t.item()}")
            if k in self._nonnegative_keys and bool((t < 0).any()):
                raise ValueError(f"state_dict['{k}'] is a sum of squares and cannot be negative, got {t.tolist()}")
            # the shapes and dtypes a fit gives: one count, or a float64 value per feature
            stats[k] = t.reshape(()).to(torch.int64) if k in self._scalar_keys else t.double().expand(n).clone()
        if (why := self._state_problem(stats)) is not None:
            raise ValueError(f"state_dict: {why}; was it edited or saved by another scaler?")
        if names is not None and len(names) != n:
            raise ValueError(f"state_dict['feature_names_in'] has {len(names)} names for n_features_in={n}")
        self._check_params()
        self._commit(stats)  # all or nothing
        self.n_features_in_ = n
        if names is None:
            self.__dict__.pop("feature_names_in_", None)
        else:
            self.feature_names_in_ = np.asarray(names, dtype=object)
        return self

    def __sklearn_is_fitted__(self) -> bool:
        return hasattr(self, "_stats")

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.allow_nan = True
        tags.input_tags.sparse = False
        tags.transformer_tags.preserves_dtype = ["float64", "float32"]
        return tags

    # -- plumbing ------------------------------------------------------------------------------

    def _check_params(self) -> None:
        """Validate hyper-parameters: at fit time, as ``__init__`` and ``set_params`` only store."""

    @_with_callbacks
    def _fit(self, X, *, reset: bool, sample_weight=None):
        self._check_params()
        # Validation records feature names and counts (on reset) only once X has passed every
        # check, and nothing after it can fail on user input: a failed call keeps the old fit.
        w = None if sample_weight is None else _sample_weight(sample_weight, X, type(self).__name__)
        x, _ = self._validate(X, reset=reset)
        task = {"estimator": self, "X": X, "y": None, "metadata": {"sample_weight": sample_weight}}
        callbacks = self._init_callback_context() if hasattr(self, "_init_callback_context") else None
        if callbacks is not None:
            callbacks.call_on_fit_task_begin(**task)
        stats = self._batch_stats(x.detach()) if w is None else self._batch_stats(x.detach(), w.to(x.device))
        batch = {k: v.cpu() for k, v in stats.items()}
        self.n_features_in_ = x.shape[1]  # also for inputs validate_data cannot count
        self._commit(batch if reset else self._merge(self._stats, batch))
        if callbacks is not None:  # one task, no iterations: the fitted scaler is self as it is
            callbacks.call_on_fit_task_end(**task, reconstruction_attributes={})
        return self

    def _commit(self, stats: dict[str, Tensor]) -> None:
        """The statistics and every attribute derived from them, all set or (on an error) none."""
        attributes = self._attributes(stats)
        self._stats = stats
        for name, value in attributes.items():
            setattr(self, name, value)

    _scalar_keys: tuple[str, ...] = ()  # statistics that are one number, not one per feature

    def _state_problem(self, stats: dict[str, Tensor]) -> str | None:
        """What makes loaded statistics impossible for this scaler, in words; None if nothing."""
        return None

    def _apply(self, X, fn: Callable[[Tensor], Tensor], *, check_names: bool = True, copy=None):
        check_is_fitted(self)
        x, back = self._validate(X, reset=False, check_names=check_names)
        y = fn(x)
        # never hand back the caller's own buffer (scikit-learn's transform copies too) unless
        # copy=False asks for the result in X itself
        out = back(y.clone() if y is x else y)
        if (getattr(self, "copy", True) if copy is None else copy):
            return out
        if isinstance(X, np.ndarray) and X.dtype == out.dtype and X.flags.writeable:
            np.copyto(X, out)
            return X
        if isinstance(X, Tensor) and X.dtype == out.dtype and not X.requires_grad:
            return X.copy_(out)
        return out

    def _param(self, value: np.ndarray, like: Tensor) -> Tensor:
        """A fitted numpy attribute as a float64 tensor on ``like``'s device."""
        return torch.from_numpy(value).to(like.device)

    def _validate(self, X, *, reset: bool, check_names: bool = True):
        """``X`` as a 2-D float64 tensor, and the function that returns results in ``X``'s type.

        Content checks (sparse, shape, emptiness, inf) run before feature names and counts are
        checked or, on ``reset``, recorded by scikit-learn's ``validate_data``.
        """
        name = type(self).__name__
        if sparse.issparse(X) or (isinstance(X, Tensor) and X.layout != torch.strided):
            raise TypeError(
                f"{name} does not support sparse input (got {type(X).__name__}); densify it "
                "first, e.g. X.toarray() for scipy or X.to_dense() for torch."
            )
        if isinstance(X, Tensor):
            x = _check_tensor(X, name)
            out_dtype = X.dtype if X.is_floating_point() else torch.get_default_dtype()
        else:
            x = _from_numpy(
                check_array(X, dtype=_NUMPY_FLOATS, ensure_all_finite="allow-nan", estimator=self)
            )
            out_dtype = x.dtype
        to_numpy = not isinstance(X, Tensor)

        def back(y: Tensor):
            y = y.to(out_dtype)
            return y.numpy() if to_numpy else y

        if check_names:
            # Column names live on X itself; inputs without a shape (lists, array wrappers)
            # have none, and their features are counted on the converted array.
            validate_data(self, X if hasattr(X, "shape") else x, reset=reset, skip_check_array=True)
        elif x.shape[1] != self.n_features_in_:
            raise ValueError(
                f"X has {x.shape[1]} features, but {name} is expecting "
                f"{self.n_features_in_} features as input."
            )
        return x.to(torch.float64), back


def _sample_weight(sample_weight, X, name: str) -> Tensor:
    """``sample_weight`` as a float64 ``(n_samples, 1)`` tensor: a number (the same weight for
    every sample) or one finite, non-negative weight per sample."""
    w = torch.as_tensor(np.asarray(sample_weight.detach().cpu() if isinstance(sample_weight, Tensor)
                                   else sample_weight, dtype=np.float64))
    shape = X.shape if isinstance(X, Tensor) else np.asarray(X).shape
    # X that is no array at all (sparse, a scalar) is refused by the validation that follows
    n = shape[0] if len(shape) else (w.shape[0] if w.dim() == 1 else 1)
    if w.dim() == 0:
        w = w.expand(n)
    if w.dim() != 1 or w.shape[0] != n:
        raise ValueError(f"{name}: sample_weight must be a number or have one weight per sample, "
                         f"shape ({n},), got shape {tuple(w.shape)}")
    if not bool((torch.isfinite(w) & (w >= 0)).all()):
        raise ValueError(f"{name}: sample_weight must be finite and >= 0, got {w.min().item()} .. {w.max().item()}")
    if n and not bool((w > 0).any()):
        raise ValueError(f"{name}: sample_weight must contain at least one non-zero weight, got all zeros")
    return w.reshape(-1, 1)


def _check_tensor(X: Tensor, name: str) -> Tensor:
    """The checks ``check_array`` does for numpy, with its wording, for a dense tensor."""
    if X.is_complex():
        raise TypeError(f"{name} scales real data; got a complex tensor ({X.dtype}).")
    if X.dim() != 2:
        fix = ("Reshape it with X.reshape(-1, 1) if it has a single feature or X.reshape(1, -1) if "
               "it contains a single sample." if X.dim() < 2 else
               "Put the features last and flatten the rest, X.reshape(-1, X.shape[-1]), or the "
               "features after the first dimension with X.flatten(1).")
        raise ValueError(
            f"Expected a 2D tensor of shape (n_samples, n_features), got shape {tuple(X.shape)}. {fix}"
        )
    for n, what in zip(X.shape, ("sample", "feature")):
        if n == 0:
            raise ValueError(
                f"Found array with 0 {what}(s) (shape={tuple(X.shape)}) while a minimum of 1 "
                f"is required by {name}."
            )
    if X.is_floating_point() and torch.isinf(X).any():
        raise ValueError(
            f"Input X contains infinity; {name} ignores NaN but cannot scale inf. Mark such "
            "values missing first, e.g. X.masked_fill(X.isinf(), float('nan'))."
        )
    return X


def _from_numpy(a: np.ndarray) -> Tensor:
    """Zero-copy view of ``a`` as a tensor where torch allows one."""
    if not a.dtype.isnative or any(s < 0 for s in a.strides):
        a = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("="))
    if a.flags.writeable:
        return torch.from_numpy(a)
    # read-only input (e.g. a memmap) is safe to view: nothing here writes into it
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(a)


class MinMaxScaler(_Scaler):
    r"""Scale each feature linearly so that its training range maps onto feature_range.

    .. math::

        x' = (x - \min x) \cdot s + a, \qquad s = \frac{b - a}{\max x - \min x}

    with ``(a, b) = feature_range``; in attribute form ``x' = x * scale_ + min_``. Min and max
    are taken per feature over the training samples, ignoring NaN. A constant feature has range
    0 and gets ``scale_ = b - a`` (``x' = a``) instead of a division by zero. Data outside the
    training range maps outside ``feature_range`` unless ``clip=True``. See the module notes:
    fit on training data only, then apply to test data.

    Source: Lesson 14.1 §1.1 (0-1 normalization) and §2 (statistics from the training set only);
    the API of scikit-learn's ``MinMaxScaler``.

    Parameters
    ----------
    feature_range : tuple (min, max), default=(0, 1)
        Target range; ``min < max`` is checked at fit time.
    clip : bool, default=False
        Clip transformed values to ``feature_range`` (``inverse_transform`` never clips).
    copy : bool, default=True
        ``False``: ``transform``/``inverse_transform`` write the result into a floating-point
        ``X`` (numpy array or tensor of the output's dtype) and return ``X`` itself, as
        scikit-learn's; other inputs are converted, so a copy is made anyway.

    Attributes
    ----------
    min_ : ndarray of shape (n_features,)
        Per-feature shift, ``a - data_min_ * scale_``.
    scale_ : ndarray of shape (n_features,)
        Per-feature factor, ``(b - a) / data_range_`` (range 0 treated as 1).
    data_min_, data_max_ : ndarray of shape (n_features,)
        Per-feature minimum and maximum seen in fit (NaN for a feature that was all NaN).
    data_range_ : ndarray of shape (n_features,)
        ``data_max_ - data_min_``.
    n_samples_seen_ : int
        Number of rows seen (rows with NaN included, as in scikit-learn).
    n_features_in_ : int
    feature_names_in_ : ndarray of str, only when fitted on data with string column names.

    Examples
    --------
    >>> import numpy as np, torch
    >>> train = np.array([[0., 10.], [5., 20.], [10., 30.]])
    >>> scaler = MinMaxScaler().fit(train)
    >>> scaler.transform(np.array([[5., 40.]]))
    array([[0.5, 1.5]])
    >>> MinMaxScaler(clip=True).fit(train).transform(torch.tensor([[5., 40.]]))
    tensor([[0.5000, 1.0000]])
    """

    _stat_keys = ("data_min", "data_max", "n_samples_seen")
    _count_keys = ("n_samples_seen",)
    _scalar_keys = ("n_samples_seen",)
    _nonnegative_keys = ()

    def _state_problem(self, stats: dict[str, Tensor]) -> str | None:
        below = (stats["data_max"] < stats["data_min"]).nonzero().flatten().tolist()  # NaN: a feature never seen
        if below:
            return f"data_max is below data_min for feature(s) {below}"
        return None

    def __init__(self, feature_range=(0, 1), clip=False, *, copy=True):
        self.feature_range = feature_range
        self.clip = clip
        self.copy = copy

    def _check_params(self) -> None:
        fr = self.feature_range
        try:
            ok = len(fr) == 2 and float(fr[0]) < float(fr[1])
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ValueError(
                f"feature_range must be a pair (min, max) with min < max, got {fr!r}; "
                "for example feature_range=(0, 1) or (-1, 1)."
            )

    def _batch_stats(self, x: Tensor) -> dict[str, Tensor]:
        lo, hi = extrema(x, (0,), ignore_nan=True)
        return {"data_min": lo, "data_max": hi, "n_samples_seen": torch.tensor(x.shape[0])}

    @staticmethod
    def _merge(old: dict[str, Tensor], new: dict[str, Tensor]) -> dict[str, Tensor]:
        # fmin/fmax: a batch where a feature is all NaN carries no information about it
        return {
            "data_min": torch.fmin(old["data_min"], new["data_min"]),
            "data_max": torch.fmax(old["data_max"], new["data_max"]),
            "n_samples_seen": old["n_samples_seen"] + new["n_samples_seen"],
        }

    def _attributes(self, stats: dict[str, Tensor]) -> dict[str, Any]:
        a, b = (float(v) for v in self.feature_range)
        lo, hi = stats["data_min"], stats["data_max"]
        scale = (b - a) / _safe_scale(hi - lo)
        return {
            "min_": (a - lo * scale).numpy(),
            "scale_": scale.numpy(),
            # copies: the public attributes must not alias the running statistics
            "data_min_": lo.numpy().copy(),
            "data_max_": hi.numpy().copy(),
            "data_range_": (hi - lo).numpy(),
            "n_samples_seen_": int(stats["n_samples_seen"]),
        }

    def _forward(self, x: Tensor) -> Tensor:
        y = x * self._param(self.scale_, x) + self._param(self.min_, x)
        return y.clamp(*(float(v) for v in self.feature_range)) if self.clip else y

    def _inverse(self, x: Tensor) -> Tensor:
        return (x - self._param(self.min_, x)) / self._param(self.scale_, x)


class StandardScaler(_Scaler):
    r"""Standardize each feature to zero mean and unit variance (Z-Score).

    .. math::

        x' = \frac{x - \mu}{\sigma}, \qquad
        \mu = \frac{1}{n}\sum_i x_i, \quad \sigma^2 = \frac{1}{n}\sum_i (x_i - \mu)^2

    per feature over the training samples, NaN ignored (so ``n`` is per feature). ``σ²`` is
    the population (biased) variance, as in scikit-learn. Streaming ``partial_fit`` merges
    :class:`~normlab.stats.Moments` with Chan's formulae, so chunks give the same ``μ, σ²`` as
    one pass. A feature whose variance is at rounding level,
    ``σ² ≤ n·eps·σ² + (n·μ·eps)²`` (the error bound of the two-pass variance), is treated
    as constant and gets ``scale_ = 1``. See the module notes: fit on training data only, then
    apply to test data.

    Source: Lesson 14.1 §1.2 (Z-Score standardization) and §2 (statistics from the training set
    only); the API of scikit-learn's ``StandardScaler``.

    Parameters
    ----------
    with_mean : bool, default=True
        Subtract ``mean_``.
    with_std : bool, default=True
        Divide by ``scale_``.
    copy : bool, default=True
        ``False``: ``transform``/``inverse_transform`` write the result into a floating-point
        ``X`` (numpy array or tensor of the output's dtype) and return ``X`` itself, as
        scikit-learn's; other inputs are converted, so a copy is made anyway.

    Attributes
    ----------
    mean_ : ndarray of shape (n_features,) or None
        Per-feature mean; None when both ``with_mean`` and ``with_std`` are False (the mean is
        still needed for the variance when only ``with_mean`` is False). NaN for an all-NaN
        feature.
    var_ : ndarray of shape (n_features,) or None
        Per-feature population variance; None when ``with_std=False``.
    scale_ : ndarray of shape (n_features,) or None
        ``sqrt(var_)``, 1 for constant features; None when ``with_std=False``.
    n_samples_seen_ : int or ndarray of int of shape (n_features,)
        Non-NaN values seen per feature; a single int when all features agree.
    n_features_in_ : int
    feature_names_in_ : ndarray of str, only when fitted on data with string column names.

    Examples
    --------
    >>> import numpy as np, torch
    >>> train = np.array([[0., 5.], [2., 5.]])  # the second feature is constant
    >>> scaler = StandardScaler().fit(train)
    >>> scaler.mean_, scaler.var_, scaler.scale_
    (array([1., 5.]), array([1., 0.]), array([1., 1.]))
    >>> scaler.transform(np.array([[4., 5.]]))
    array([[3., 0.]])
    >>> scaler.transform(torch.tensor([[4., 5.]], dtype=torch.float64))
    tensor([[3., 0.]], dtype=torch.float64)
    """

    _stat_keys = ("count", "mean", "m2")
    _count_keys = ("count",)
    _nonnegative_keys = ("m2",)

    def __init__(self, with_mean=True, with_std=True, *, copy=True):
        self.with_mean = with_mean
        self.with_std = with_std
        self.copy = copy

    def fit(self, X, y=None, sample_weight=None):
        """Learn the per-feature mean and variance of ``X``, forgetting earlier fits.

        Parameters
        ----------
        X : array-like or Tensor of shape (n_samples, n_features)
            Training data; NaN entries are ignored.
        y : None
            Ignored.
        sample_weight : array-like of shape (n_samples,) or float, default=None
            Non-negative weight per sample (scikit-learn's): the weighted mean and variance,
            and ``n_samples_seen_`` the sum of the weights.

        Returns
        -------
        self
        """
        return self._fit(X, reset=True, sample_weight=sample_weight)

    def partial_fit(self, X, y=None, sample_weight=None):
        """Add the batch ``X`` (weighted by ``sample_weight``, as in :meth:`fit`) to the
        statistics seen so far; any split into batches gives one :meth:`fit`'s statistics."""
        return self._fit(X, reset=not self.__sklearn_is_fitted__(), sample_weight=sample_weight)

    def _batch_stats(self, x: Tensor, weight: Tensor | None = None) -> dict[str, Tensor]:
        return vars(Moments.from_data(x, (0,), ignore_nan=True, dtype=torch.float64, weight=weight))

    @staticmethod
    def _merge(old: dict[str, Tensor], new: dict[str, Tensor]) -> dict[str, Tensor]:
        return vars(Moments(**old).merge(Moments(**new)))

    def _attributes(self, stats: dict[str, Tensor]) -> dict[str, Any]:
        m = Moments(**stats)
        n = m.count
        mean = torch.where(n > 0, m.mean, float("nan"))  # an unseen feature has no mean
        var = m.var(correction=0)
        constant = var <= n * _EPS * var + (n * mean * _EPS).square()
        # the number of values seen, or with sample weights their sum (a float, as scikit-learn's)
        counts = n.to(torch.int64).numpy() if bool((n == n.round()).all()) else n.numpy()
        return {
            "mean_": mean.numpy() if self.with_mean or self.with_std else None,
            "var_": var.numpy() if self.with_std else None,
            "scale_": _safe_scale(var.sqrt(), constant).numpy() if self.with_std else None,
            # one int when every feature saw the same number of values, as scikit-learn reports
            "n_samples_seen_": counts[0] if (counts == counts[0]).all() else counts,
        }

    def _forward(self, x: Tensor) -> Tensor:
        if self.with_mean:
            x = x - self._param(self.mean_, x)
        if self.with_std:
            x = x / self._param(self.scale_, x)
        return x

    def _inverse(self, x: Tensor) -> Tensor:
        if self.with_std:
            x = x * self._param(self.scale_, x)
        if self.with_mean:
            x = x + self._param(self.mean_, x)
        return x


ZScoreScaler = StandardScaler
"""Z-Score scaling, the lesson's name for :class:`StandardScaler` (the same class)."""
