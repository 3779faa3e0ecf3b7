"""Model builders for the lab: an MLP and a small CNN, with any normalization of normlab.

:func:`mlp` is the lesson's ``Sigmoid_class3``/``tanh_class2`` family generalised: ``depth``
hidden layers of ``width`` units, an activation, an initialisation, and a norm placed before
(``Linear → Norm → act``, Ioffe & Szegedy's placement) or after (``Linear → act → Norm``) each
activation. :func:`cnn` is a two-convolution network for 8×8 digits with 2-D norms.

Norm kinds (``NORMS``): ``none``, ``batch``, ``layer``, ``group``, ``instance``, ``rms``,
``weight`` (weight normalization of every hidden layer's weight) and ``cosine`` (hidden layers
become :class:`~normlab.nn.CosineLinear`; MLP only). ``instance`` on a feature vector treats the
vector as one channel whose positions are the features, i.e. LayerNorm with a scalar γ, β.

Initialisations (``init``): ``default`` (torch's), ``xavier`` (Glorot uniform), ``kaiming`` (He
uniform for ReLU), ``normal:STD`` (``N(0, STD²)``). Any non-default init sets biases to 0, as
Glorot & Bengio (2010) did.

>>> import torch
>>> model = mlp(2, 1, depth=3, width=4, activation="sigmoid", init="xavier", norm="batch")
>>> [type(m).__name__ for m in model][:4]
['Linear', 'BatchNorm1d', 'Sigmoid', 'Linear']
>>> model(torch.randn(8, 2)).shape
torch.Size([8, 1])
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from .. import nn as nln
from ..convert import suggest_groups

__all__ = ["mlp", "cnn", "init_weights", "Affine", "NORMS", "CONTROLS", "ACTIVATIONS"]

NORMS = ("none", "batch", "layer", "group", "instance", "rms", "weight", "cosine")
CONTROLS = ("affine",)  # not a normalization: a control for the experiments (Affine)
ACTIVATIONS = {
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
    "leaky_relu": nn.LeakyReLU,
    "elu": nn.ELU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "identity": nn.Identity,
}


class Affine(nn.Module):
    r"""A learnable scale and shift per feature, :math:`y = γ ⊙ x + β` (γ = 1, β = 0 at the start):
    BatchNorm's stage 2 without its stage 1, the control of Lesson 14.1 §二.3's "stage 1 gives
    stage 2 a good starting point". Input ``(N, C, *)``."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))

    def forward(self, x):
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return x * self.weight.view(shape) + self.bias.view(shape)


class _Channel(nn.Module):
    """``(N, F) → (N, 1, F)``, so InstanceNorm1d normalizes each example over its features."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.norm = norm

    def forward(self, x):
        return self.norm(x.unsqueeze(1)).squeeze(1)


def _groups(channels: int, num_groups: int | None, spatial: int = 1) -> int:
    if num_groups is not None:
        if channels % num_groups:
            raise ValueError(f"num_groups={num_groups} does not divide {channels} channels; pick a divisor")
        return num_groups
    return suggest_groups(channels, spatial)  # an MLP has no spatial extent: groups of >= 16 features


def _norm(kind: str, channels: int, *, spatial: tuple[int, ...] = (), num_groups: int | None = None) -> nn.Module:
    dims = len(spatial)
    if kind == "batch":
        return (nln.BatchNorm1d, nln.BatchNorm2d, nln.BatchNorm3d)[max(dims - 1, 0)](channels)
    if kind == "layer":
        return nln.LayerNorm(channels) if dims == 0 else nln.GroupNorm(1, channels)
    if kind == "group":
        return nln.GroupNorm(_groups(channels, num_groups, math.prod(spatial)), channels)
    if kind == "instance":
        if dims == 0:
            return _Channel(nln.InstanceNorm1d(1, affine=True))
        return (nln.InstanceNorm1d, nln.InstanceNorm2d, nln.InstanceNorm3d)[dims - 1](channels, affine=True)
    if kind == "rms":
        return nln.RMSNorm((channels, *spatial))
    if kind == "affine":
        return Affine(channels)
    raise AssertionError(kind)  # pragma: no cover - callers check `kind`


@contextlib.contextmanager
def _seeded(seed: int | None):
    """Draw from a private RNG seeded with ``seed`` (the global one is left alone), or from the
    global RNG as torch does when ``seed`` is None."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _check_kinds(norm: str, activation: str, placement: str, allowed=NORMS) -> None:
    if norm not in allowed:
        raise ValueError(f"norm must be one of {list(allowed)}, got {norm!r}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    if placement not in ("before", "after"):
        raise ValueError(f"placement must be 'before' or 'after' the activation, got {placement!r}")


def init_weights(model: nn.Module, init: str = "default") -> nn.Module:
    """Re-initialise every Linear/Conv weight of ``model`` in place (biases to 0 unless ``default``)."""
    if init == "default":
        return model
    if init.startswith("normal:"):
        std = float(init.split(":", 1)[1])
        fill = lambda w: nn.init.normal_(w, 0.0, std)  # noqa: E731
    elif init == "xavier":
        fill = nn.init.xavier_uniform_
    elif init == "kaiming":
        fill = lambda w: nn.init.kaiming_uniform_(w, nonlinearity="relu")  # noqa: E731
    else:
        raise ValueError(f"init must be 'default', 'xavier', 'kaiming' or 'normal:STD', got {init!r}")
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nln.CosineLinear)):
                fill(m.weight)
                if getattr(m, "bias", None) is not None:
                    m.bias.zero_()
    return model


def mlp(
    in_features: int,
    out_features: int,
    *,
    depth: int = 3,
    width: int = 4,
    activation: str = "sigmoid",
    init: str = "default",
    norm: str = "none",
    placement: str = "before",
    num_groups: int | None = None,
    seed: int | None = None,
) -> nn.Sequential:
    """``depth`` hidden layers of ``width`` units with ``activation``, then a Linear output layer.

    ``seed`` makes the initial weights reproducible without touching the global RNG.
    """
    _check_kinds(norm, activation, placement, allowed=NORMS + CONTROLS)
    if depth < 0 or width < 1:
        raise ValueError(f"depth must be >= 0 and width >= 1, got depth={depth}, width={width}")
    with _seeded(seed):
        layers: list[nn.Module] = []
        fan_in = in_features
        for _ in range(depth):
            if norm == "cosine":
                linear = nln.CosineLinear(fan_in, width)
            else:
                linear = nn.Linear(fan_in, width)
            layers.append(linear)
            act = ACTIVATIONS[activation]()
            if norm in ("none", "weight", "cosine"):
                layers.append(act)
            else:
                n = _norm(norm, width, num_groups=num_groups)
                layers.extend([n, act] if placement == "before" else [act, n])
            fan_in = width
        layers.append(nn.Linear(fan_in, out_features))
        model = init_weights(nn.Sequential(*layers), init)
    if norm == "weight":  # after init, so g = ‖v‖ starts at the initialised norm
        for m in list(model)[:-1]:
            if isinstance(m, nn.Linear):
                nln.weight_norm(m)
    return model


def cnn(
    num_classes: int = 10,
    *,
    in_channels: int = 1,
    channels: tuple[int, int] = (16, 32),
    image_size: int = 8,
    activation: str = "relu",
    norm: str = "batch",
    placement: str = "before",
    num_groups: int | None = None,
    init: str = "default",
    seed: int | None = None,
) -> nn.Sequential:
    """``Conv3×3 → Norm2d → act → Conv3×3 → Norm2d → act → MaxPool2 → Linear`` for small images."""
    _check_kinds(norm, activation, placement, allowed=tuple(k for k in NORMS if k != "cosine"))
    with _seeded(seed):
        layers: list[nn.Module] = []
        c_in = in_channels
        for c in channels:
            layers.append(nn.Conv2d(c_in, c, 3, padding=1))
            act = ACTIVATIONS[activation]()
            if norm in ("none", "weight"):
                layers.append(act)
            else:
                n = _norm(norm, c, spatial=(image_size, image_size), num_groups=num_groups)
                layers.extend([n, act] if placement == "before" else [act, n])
            c_in = c
        pooled = math.ceil(image_size / 2)
        layers += [nn.MaxPool2d(2, ceil_mode=True), nn.Flatten(), nn.Linear(c_in * pooled * pooled, num_classes)]
        model = init_weights(nn.Sequential(*layers), init)
    if norm == "weight":
        for m in model:
            if isinstance(m, nn.Conv2d):
                nln.weight_norm(m)
    return model
