"""The lab's data: seeded synthetic generators and small real datasets, as train/test splits.

Everything comes back as a :class:`Split` — the training and test tensors of one task. A split
is the only way the lab hands data to a model, and :meth:`Split.scaled` is the only way to scale
it: the scaler is fitted on the training half and then applied, unchanged, to both halves. The
test set can never leak into the statistics (Lesson 14.1, §2: the per-column mean and standard
deviation "are model parameters and must come from the training set").

Generators, in the spirit of the lesson's helpers:

* :func:`make_regression` — ``tensorGenReg``: a target that is a polynomial of the inputs.
  Inputs are an affine image ``z·scale + loc`` of standard normal ``z`` and the target is a
  function of ``z``, so ``loc``/``scale`` change how the task *looks* to the network, not the
  task — exactly what Z-Score scaling undoes.
* :func:`make_classification` — ``tensorGenCla``: ``num_class`` Gaussian clouds whose centres
  are ``deg_dispersion[0]`` apart, each with standard deviation ``deg_dispersion[1]``.

Real data that ships inside scikit-learn and loads offline (:func:`load_dataset`): ``digits``
(8×8 images, 10 classes; flat or as ``(N, 1, 8, 8)``), ``breast_cancer`` and ``wine``
(classification, features on wildly different scales) and ``diabetes`` (regression, unscaled).

>>> split = make_regression(num_examples=200, num_inputs=2, loc=5.0, scale=3.0, seed=0)
>>> split.X_train.shape, split.X_test.shape
(torch.Size([150, 2]), torch.Size([50, 2]))
>>> z = split.scaled("zscore")
>>> bool(z.X_train.mean(0).abs().max() < 1e-5), int(z.scaler.n_samples_seen_)
(True, 150)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch import Tensor

from ..preprocessing import MinMaxScaler, StandardScaler

__all__ = ["Split", "make_regression", "make_classification", "load_dataset", "DATASETS", "batches"]

_SCALERS = {"zscore": StandardScaler, "minmax": MinMaxScaler}


@dataclass(frozen=True)
class Split:
    """A train/test split of one task.

    ``task`` is ``"regression"`` (``y`` float of shape ``(N, 1)``) or ``"classification"``
    (``y`` int64 class indices of shape ``(N,)``). ``scaler`` is the fitted scaler when the
    features were scaled with :meth:`scaled`, else ``None``.
    """

    name: str
    task: str
    X_train: Tensor
    y_train: Tensor
    X_test: Tensor
    y_test: Tensor
    num_classes: int = 0
    scaler: object | None = None

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one example, e.g. ``(2,)`` or ``(1, 8, 8)``."""
        return tuple(self.X_train.shape[1:])

    @property
    def num_features(self) -> int:
        return self.X_train[0].numel()

    @property
    def num_outputs(self) -> int:
        """Width of the model's last layer: 1 for regression, the class count otherwise."""
        return self.num_classes if self.task == "classification" else 1

    def scaled(self, kind: str | None = "zscore") -> "Split":
        """This split with features scaled by a scaler fitted on the training half only.

        ``kind`` is ``"zscore"`` (:class:`~normlab.preprocessing.StandardScaler`), ``"minmax"``
        (:class:`~normlab.preprocessing.MinMaxScaler`) or ``None`` (unchanged). Images are
        scaled per pixel. Scaling an already scaled split is refused.
        """
        if kind is None:
            return self
        if kind not in _SCALERS:
            raise ValueError(f"scaler kind must be one of {sorted(_SCALERS)} or None, got {kind!r}")
        if self.scaler is not None:
            raise ValueError(f"split {self.name!r} is already scaled by {self.scaler!r}; scale the raw split instead")
        flat_train = self.X_train.reshape(len(self.X_train), -1)
        scaler = _SCALERS[kind]().fit(flat_train)

        def apply(X: Tensor) -> Tensor:
            return scaler.transform(X.reshape(len(X), -1)).reshape(X.shape)

        return dataclasses.replace(
            self, name=f"{self.name}+{kind}", X_train=apply(self.X_train), X_test=apply(self.X_test), scaler=scaler
        )

    def to(self, device) -> "Split":
        return dataclasses.replace(
            self, **{f: getattr(self, f).to(device) for f in ("X_train", "y_train", "X_test", "y_test")}
        )

    def flat(self) -> "Split":
        """Images flattened to feature vectors (for MLPs)."""
        n_train, n_test = len(self.X_train), len(self.X_test)
        return dataclasses.replace(
            self, X_train=self.X_train.reshape(n_train, -1), X_test=self.X_test.reshape(n_test, -1)
        )


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


def _split(name, task, X, y, test_size, seed, num_classes=0) -> Split:
    if not 0 < test_size < 1:
        raise ValueError(f"test_size must be in (0, 1), got {test_size!r}")
    n = len(X)
    n_test = int(round(n * test_size))
    if n_test < 1 or n - n_test < 2:
        raise ValueError(f"{n} examples with test_size={test_size} leave an empty split; use more examples")
    perm = torch.randperm(n, generator=_generator(seed + 1))
    test, train = perm[:n_test], perm[n_test:]
    return Split(name, task, X[train], y[train], X[test], y[test], num_classes)


def make_regression(
    num_examples: int = 1000,
    num_inputs: int = 2,
    degree: int = 1,
    bias: bool = True,
    noise: float = 0.01,
    loc: float = 0.0,
    scale: float = 1.0,
    weights: Sequence[float] | None = None,
    test_size: float = 0.25,
    seed: int = 0,
) -> Split:
    """Seeded regression data: ``y = Σ_j w_j · z_j^degree (+ b) + noise·ε``, inputs ``x = z·scale + loc``.

    ``z`` and ``ε`` are standard normal; ``w`` defaults to ``(2, -1, 1, -1, …)`` as in the lesson
    (``w=[2, -1]``) and ``b = 1`` when ``bias``. ``loc`` and ``scale`` (scalars or per-feature
    sequences) only change the representation of the inputs: Z-Score scaling recovers ``z`` up to
    the sampling error of the training statistics.
    """
    if num_inputs < 1 or degree < 1:
        raise ValueError(f"num_inputs and degree must be >= 1, got {num_inputs} and {degree}")
    g = _generator(seed)
    z = torch.randn(num_examples, num_inputs, generator=g)
    if weights is None:
        weights = [2.0 if j == 0 else (-1.0) ** j for j in range(num_inputs)]
    w = torch.as_tensor(weights, dtype=torch.float32)
    if w.shape != (num_inputs,):
        raise ValueError(f"weights must have {num_inputs} entries (one per input), got {tuple(w.shape)}")
    y = (z**degree) @ w + (1.0 if bias else 0.0) + noise * torch.randn(num_examples, generator=g)
    X = z * torch.as_tensor(scale, dtype=torch.float32) + torch.as_tensor(loc, dtype=torch.float32)
    return _split(f"regression(deg={degree})", "regression", X, y.unsqueeze(1), test_size, seed)


def make_classification(
    num_examples: int = 500,
    num_inputs: int = 2,
    num_class: int = 3,
    deg_dispersion: tuple[float, float] = (4.0, 2.0),
    loc: float = 0.0,
    test_size: float = 0.25,
    seed: int = 0,
) -> Split:
    """Seeded Gaussian clouds: class ``i`` is ``N(i·d − d·(num_class − 1)/2 + loc, s²)`` in every input.

    ``num_examples`` per class; ``deg_dispersion = (d, s)`` sets how far apart the class centres
    are and how wide each cloud is (the lesson's ``tensorGenCla``). Larger ``s/d`` is harder.
    """
    if num_class < 2:
        raise ValueError(f"num_class must be >= 2, got {num_class}")
    d, s = (float(v) for v in deg_dispersion)
    g = _generator(seed)
    centre = d * (num_class - 1) / 2
    X = torch.cat([torch.randn(num_examples, num_inputs, generator=g) * s + (i * d - centre + loc) for i in range(num_class)])
    y = torch.arange(num_class).repeat_interleave(num_examples)
    return _split(f"clouds({num_class} classes)", "classification", X, y, test_size, seed, num_class)


def make_sentences(num_examples: int = 2000, vocab: int = 20, lengths: tuple[int, int] = (2, 24),
                   test_size: float = 0.25, seed: int = 0) -> Split:
    """Seeded "sentences" of different lengths, padded: token ids ``(N, max length)`` with 0 as the
    padding after each sentence's end. Tokens ``1..vocab-1`` are drawn uniformly; the label says
    whether the sentence holds more tokens from the lower half of the vocabulary than from the upper
    (a question about the whole sentence, whatever its length or where its words stand).
    """
    lo, hi = lengths
    if not 1 <= lo <= hi or vocab < 3:
        raise ValueError(f"need 1 <= lengths[0] <= lengths[1] and vocab >= 3, got lengths={lengths}, vocab={vocab}")
    g = _generator(seed)
    n_len = torch.randint(lo, hi + 1, (num_examples,), generator=g)
    tokens = torch.randint(1, vocab, (num_examples, hi), generator=g)
    tokens[torch.arange(hi)[None, :] >= n_len[:, None]] = 0
    half = vocab // 2
    lower = ((tokens > 0) & (tokens < half)).sum(1)
    upper = (tokens >= half).sum(1)
    y = (lower > upper).long()
    return _split(f"sentences({vocab} tokens, {lo}-{hi} long)", "classification", tokens, y, test_size, seed, 2)


# name -> (sklearn loader name, task, one line)
DATASETS = {
    "digits": ("load_digits", "classification", "8×8 handwritten digits, 10 classes, 1797 images (pixels 0..16)"),
    "breast_cancer": ("load_breast_cancer", "classification", "30 unscaled features (areas ~1e3, smoothness ~1e-1), 2 classes"),
    "wine": ("load_wine", "classification", "13 unscaled features (proline ~1e3, hue ~1), 3 classes"),
    "diabetes": ("load_diabetes", "regression", "10 unscaled features (scaled=False), disease progression target"),
}


def load_dataset(name: str, *, test_size: float = 0.25, seed: int = 0, images: bool = False) -> Split:
    """A real dataset bundled with scikit-learn (no download), as a seeded train/test split.

    ``images=True`` gives digits as ``(N, 1, 8, 8)`` for CNNs; otherwise features are flat.
    Features are float32 and raw (``diabetes`` is loaded with ``scaled=False``): scale them with
    :meth:`Split.scaled`.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)}")
    import sklearn.datasets

    loader, task, _ = DATASETS[name]
    kwargs = {"scaled": False} if name == "diabetes" else {}
    bunch = getattr(sklearn.datasets, loader)(**kwargs)
    X = torch.as_tensor(bunch.data, dtype=torch.float32)
    if task == "classification":
        y = torch.as_tensor(bunch.target, dtype=torch.int64)
        num_classes = int(y.max()) + 1
    else:
        y = torch.as_tensor(bunch.target, dtype=torch.float32).unsqueeze(1)
        num_classes = 0
    if images:
        if name != "digits":
            raise ValueError(f"images=True needs an image dataset ('digits'), got {name!r}")
        X = X.reshape(-1, 1, 8, 8)
    return _split(name, task, X, y, test_size, seed, num_classes)


def batches(
    X: Tensor, y: Tensor, batch_size: int, *, shuffle: bool = False, generator: torch.Generator | None = None,
    drop_last: bool = False,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Mini-batches of ``(X, y)`` by slicing (a ``DataLoader`` without per-item overhead).

    With ``drop_last`` the last, smaller batch is skipped — what BatchNorm needs when the last
    batch would hold a single example (one value per channel has no variance).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = len(X)
    order = torch.randperm(n, generator=generator, device="cpu").to(X.device) if shuffle else None
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        if order is None:
            yield X[start : start + batch_size], y[start : start + batch_size]
        else:
            idx = order[start : start + batch_size]
            yield X[idx], y[idx]
