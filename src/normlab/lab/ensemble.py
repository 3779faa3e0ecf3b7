"""Train the random seeds of an experiment together: S networks of one architecture as one network.

A check is decided from its values over random seeds, and a decision needs many of them (the
tour runs 20). Training 20 small networks one after the other costs 20 times one; stacked, they
cost little more than one: :class:`Stack` holds the S members' weights side by side and computes
all of them in each call, on **channel-stacked** tensors ``(N, S·C, *)`` whose channels
``[s·C, (s+1)·C)`` belong to member ``s``:

=========================  =================================================================
member layer               stacked layer (exactly the S members' computations)
=========================  =================================================================
``Linear(i, o)``           ``S`` matrix products at once (``baddbmm`` of ``(S, N, i)``)
weight-normed ``Linear``   the same, with ``w = g·v/‖v‖`` by :func:`normlab.functional.weight_norm`
``CosineLinear``           :func:`normlab.functional.cosine_rows` (cosine_linear's rows), S products
``Conv2d(i, o, groups=g)`` ``Conv2d(S·i, S·o, groups=S·g)``
``BatchNorm{1,2}d(C)``     ``BatchNorm{1,2}d(S·C)``: BN's statistics are per channel already
``GroupNorm(G, C)``        ``GroupNorm(S·G, S·C)``
``LayerNorm(C)``           ``GroupNorm(S, S·C)``: a group is one member's C features
``RMSNorm(C)``             :func:`normlab.functional.rms_norm` per member, times its γ
``InstanceNorm`` of a      ``GroupNorm(S, S·F)`` without affine, then each member's scalar γ, β
feature vector
``InstanceNorm2d(C)``      ``InstanceNorm2d(S·C)``
the lab's ``Affine(C)``    ``Affine(S·C)``
activations, pooling,      unchanged: they act per channel or per value
``Flatten``
=========================  =================================================================

Every norm above is normlab's own layer. :func:`normlab.lab.train.fit_seeds` trains a Stack with
each member's own batch order (the one :func:`~normlab.lab.train.fit` draws for its seed), the
loss the sum of the members' losses — so each member's gradient, and with SGD or Adam its whole
run, is the one it would have alone (tests/test_lab.py compares them). :meth:`Stack.write_back`
copies the trained weights into the member networks.

>>> import torch
>>> from normlab.lab import models
>>> nets = [models.mlp(3, 2, depth=2, width=4, norm="batch", seed=s) for s in range(5)]
>>> stack = Stack(nets)
>>> x = torch.randn(8, 3)
>>> out = stack.split(stack(stack.spread(x)))        # (N, S, out)
>>> torch.allclose(out[:, 0], nets[0].train()(x), atol=1e-6)
True
"""

from __future__ import annotations

import copy
from typing import Sequence

import torch
from torch import Tensor, nn

from .. import functional as F
from .. import nn as nln
from ..stats import Moments
from .models import Affine, _Channel

__all__ = ["Stack", "stackable", "NOT_STACKED"]

# what Stack raises for networks it cannot hold (RuntimeError: a state the wide layer does not take)
NOT_STACKED = (TypeError, ValueError, RuntimeError)

_ELEMENTWISE = (nn.Sigmoid, nn.Tanh, nn.ReLU, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Identity, nn.MaxPool2d,
                nn.Flatten)


_KNOWN = (nn.Linear, nln.CosineLinear, nln.RMSNorm, nn.Conv2d, nln._BatchNorm, nln.GroupNorm, nln.LayerNorm,
          nln._InstanceNorm, _Channel, Affine, *_ELEMENTWISE)


_FORWARDS = {c.forward for c in (nn.Linear, nln.CosineLinear, nln.RMSNorm, nn.Conv2d, nln.BatchNorm1d, nln.BatchNorm2d,
                                 nln.BatchRenorm1d, nln.BatchRenorm2d, nln.GroupNorm, nln.LayerNorm, nln.InstanceNorm1d,
                                 nln.InstanceNorm2d, _Channel, Affine, *_ELEMENTWISE)}


def _cat(ts: Sequence[Tensor | None]) -> Tensor | None:
    return None if ts[0] is None else torch.cat([t.detach() for t in ts])


class _Linear(nn.Module):
    """S Linear (optionally weight-normed or cosine) layers on (N, S·i) → (N, S·o)."""

    def __init__(self, layers: Sequence[nn.Module]):
        super().__init__()
        first = layers[0]
        self.kind = "cosine" if isinstance(first, nln.CosineLinear) else (
            "weight" if "parametrizations" in first._modules else "plain")
        if self.kind == "weight":
            wn = [m.parametrizations.weight for m in layers]
            self.dim = wn[0].dim
            if self.dim != 0:
                raise TypeError("only weight_norm(dim=0) of a Linear is stacked")
            self.g = nn.Parameter(torch.stack([w.original0.detach() for w in wn]).clone())
            self.v = nn.Parameter(torch.stack([w.original1.detach() for w in wn]).clone())
        else:
            self.weight = nn.Parameter(torch.stack([m.weight.detach() for m in layers]).clone())
        if self.kind == "cosine":
            self.centered, self.eps = first.centered, first.eps
        bias = getattr(first, "bias", None)
        self.bias = nn.Parameter(torch.stack([m.bias.detach() for m in layers]).clone()) if bias is not None else None

    def matrix(self) -> Tensor:
        """The weights (S, o, i) as the members compute them."""
        if self.kind == "weight":
            S, o, i = self.v.shape
            return F.weight_norm(self.v.reshape(S * o, i), self.g.reshape(S * o, 1), 0).view(S, o, i)
        return self.weight

    def direction(self) -> Tensor:
        """The parameter the optimizer moves for the weight: ``v`` when weight-normed."""
        return self.v if self.kind == "weight" else self.weight

    def forward(self, x: Tensor) -> Tensor:
        S = self.direction().shape[0]
        N = x.shape[0]
        xs = x.view(N, S, -1)
        if self.kind == "cosine":  # cosine_linear's normalized rows, S matrix products at once
            xh, wh, n = F.cosine_rows(xs.transpose(0, 1), self.weight, self.centered, self.eps)
            y = torch.bmm(xh.contiguous(), wh.transpose(1, 2)).div(n).transpose(0, 1)
        else:
            y = torch.baddbmm(self.bias.unsqueeze(1), xs.transpose(0, 1).contiguous(), self.matrix().transpose(1, 2)).transpose(0, 1)
        return y.reshape(N, -1)

    def write_back(self, layers: Sequence[nn.Module]) -> None:
        with torch.no_grad():
            for s, m in enumerate(layers):
                if self.kind == "weight":
                    m.parametrizations.weight.original0.copy_(self.g[s])
                    m.parametrizations.weight.original1.copy_(self.v[s])
                else:
                    m.weight.copy_(self.weight[s])
                if self.bias is not None:
                    m.bias.copy_(self.bias[s])


class _Scaled(nn.Module):
    """A norm without affine on (N, S·C, *), then each member's own γ, β (RMSNorm, and InstanceNorm
    of a feature vector, whose γ is one scalar per member)."""

    def __init__(self, layers: Sequence[nn.Module]):
        super().__init__()
        first, self.size = layers[0], len(layers)
        if isinstance(first, nln.RMSNorm):
            self.kind, self.eps = "rms", first.eps
            w = [m.weight for m in layers] if first.weight is not None else None
            b = None
        else:  # _Channel(InstanceNorm1d(1)): each example over its features, scalar γ, β
            inorm = first.norm
            self.kind, self.eps = "instance", inorm.eps
            w = [m.norm.weight for m in layers] if inorm.affine else None
            b = [m.norm.bias for m in layers] if inorm.affine else None
        self.weight = nn.Parameter(torch.stack([t.detach() for t in w]).clone()) if w else None
        self.bias = nn.Parameter(torch.stack([t.detach() for t in b]).clone()) if b else None

    def forward(self, x: Tensor) -> Tensor:
        S, N = self.size, x.shape[0]
        xs = x.view(N, S, -1)
        if self.kind == "rms":
            y = F.rms_norm(xs, (xs.shape[-1],), None, self.eps)  # over all of a member's (C, *) values
            if self.weight is not None:
                y = y * self.weight.reshape(S, -1)
        else:
            y = F.group_norm(x, S, None, None, self.eps).view(N, S, -1)
            if self.weight is not None:
                y = y * self.weight.view(1, S, 1) + self.bias.view(1, S, 1)
        return y.reshape(x.shape)

    def write_back(self, layers: Sequence[nn.Module]) -> None:
        with torch.no_grad():
            for s, m in enumerate(layers):
                target = m if self.kind == "rms" else m.norm
                if self.weight is not None:
                    target.weight.copy_(self.weight[s])
                if self.bias is not None:
                    target.bias.copy_(self.bias[s])


class _Wide(nn.Module):
    """A layer whose S copies are one wider layer of the same kind (convolutions, BatchNorm,
    GroupNorm, LayerNorm as GroupNorm, InstanceNorm2d): parameters and buffers concatenated."""

    def __init__(self, layers: Sequence[nn.Module]):
        super().__init__()
        first, S = layers[0], len(layers)
        if isinstance(first, nn.Conv2d):
            if "parametrizations" in first._modules:
                raise TypeError("a weight-normed Conv2d is not stacked")
            wide = nn.Conv2d(S * first.in_channels, S * first.out_channels, first.kernel_size, first.stride,
                             first.padding, first.dilation, S * first.groups, first.bias is not None, first.padding_mode)
        elif isinstance(first, nln._BatchNorm):
            extra = dict(rmax=first.rmax, dmax=first.dmax, warmup_steps=first.warmup_steps) \
                if isinstance(first, nln._BatchRenorm) else {}
            wide = type(first)(S * first.num_features, first.eps, first.momentum, first.affine, first.track_running_stats,
                               bias=not first.affine or first.bias is not None, **extra)
        elif isinstance(first, nln.GroupNorm):
            wide = nln.GroupNorm(S * first.num_groups, S * first.num_channels, first.eps, first.affine)
        elif isinstance(first, nln.LayerNorm):
            if len(first.normalized_shape) != 1:
                raise TypeError("only a LayerNorm over the last dim is stacked")
            wide = nln.GroupNorm(S, S * first.normalized_shape[0], first.eps, first.elementwise_affine)
            if first.elementwise_affine and first.bias is None:
                raise TypeError("a LayerNorm without bias is not stacked")
        elif isinstance(first, Affine):
            wide = Affine(S * first.num_features)
        elif isinstance(first, nln._InstanceNorm):
            wide = type(first)(S * first.num_features, first.eps, first.momentum, first.affine, first.track_running_stats)
        else:
            raise TypeError(f"{type(first).__name__} is not stacked")
        with torch.no_grad():
            state = {k: _cat([m.state_dict()[k] for m in layers]) for k in first.state_dict()
                     if k != "num_batches_tracked"}
            if "num_batches_tracked" in first.state_dict():
                state["num_batches_tracked"] = first.num_batches_tracked.detach().clone()
            wide.load_state_dict(state)
        self.wide = wide

    def forward(self, x: Tensor) -> Tensor:
        return self.wide(x)

    def write_back(self, layers: Sequence[nn.Module]) -> None:
        own = self.wide.state_dict()
        S = len(layers)
        with torch.no_grad():
            for s, m in enumerate(layers):
                for k, t in m.state_dict().items():
                    t.copy_(own[k] if k == "num_batches_tracked" else own[k].chunk(S)[s])


def _stack_layer(layers: Sequence[nn.Module]) -> nn.Module:
    first = layers[0]
    if any(type(m) is not type(first) for m in layers):
        raise TypeError("the members differ in their layers")
    if isinstance(first, _KNOWN) and type(first).forward not in _FORWARDS:  # a subclass computing something else
        raise TypeError(f"{type(first).__name__} has a forward of its own, which a Stack does not know")
    if len(layers) == 1 and not isinstance(first, _KNOWN):  # a Stack of one: the member's own layer
        return first
    if isinstance(first, (nn.Linear, nln.CosineLinear)):
        return _Linear(layers)
    if isinstance(first, nln.RMSNorm) or isinstance(first, _Channel):
        return _Scaled(layers)
    if isinstance(first, _ELEMENTWISE):
        if isinstance(first, nn.Flatten) and first.start_dim != 1:
            raise TypeError("only Flatten(start_dim=1) is stacked")
        return copy.deepcopy(first)
    return _Wide(layers)


def stackable(models: Sequence[nn.Module]) -> str | None:
    """Why ``models`` cannot be stacked (a sentence), or None when they can."""
    try:
        Stack(models)
    except NOT_STACKED as e:
        return str(e)
    return None


class Stack(nn.Module):
    """S networks of one architecture (``nn.Sequential`` of the layers above) as one network.

    Args:
        members: the networks, one per random seed; their weights are copied in (the members
            are not changed until :meth:`write_back`).

    Shape:
        - Input: ``(N, S·C, *)``, member ``s`` reading channels ``[s·C, (s+1)·C)``
          (:meth:`spread` makes it from one ``(N, C, *)`` batch all members see).
        - Output: ``(N, S·O)``; :meth:`split` views it as ``(N, S, O)``.
    """

    def __init__(self, members: Sequence[nn.Module]):
        super().__init__()
        members = list(members)
        self.members = members
        self.size = len(members)
        if self.size == 1 and not isinstance(members[0], nn.Sequential):  # a Stack of one: the network itself
            self.layers = nn.ModuleList([members[0]])
            return
        if not members or not all(isinstance(m, nn.Sequential) for m in members):
            raise TypeError("a Stack is made of nn.Sequential networks")
        if len({len(m) for m in members}) != 1:
            raise TypeError("the members differ in their number of layers")
        self.layers = nn.ModuleList(_stack_layer([m[i] for m in members]) for i in range(len(members[0])))

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer(x)
        return x

    def spread(self, x: Tensor) -> Tensor:
        """One batch ``(N, C, *)`` for every member: ``(N, S·C, *)``."""
        return x.repeat(1, self.size, *([1] * (x.dim() - 2)))

    def split(self, y: Tensor) -> Tensor:
        """The output ``(N, S·O, *)`` as ``(N, S, O, *)``."""
        return y.view(y.shape[0], self.size, -1, *y.shape[2:])

    def write_back(self) -> list[nn.Module]:
        """Copy the stacked weights and running statistics into the members; returns them."""
        for i, layer in enumerate(self.layers):
            if hasattr(layer, "write_back"):
                layer.write_back([m[i] for m in self.members])
        return self.members

    def weight_grads(self) -> dict[str, Tensor]:
        """Each weight-matrix layer's gradient per member, ``{layer index: (S, k)}`` float32 on the
        CPU — what :meth:`normlab.diagnostics.GlorotMonitor.weight_grads` gives for one network
        (the gradient of ``v`` for a weight-normed layer)."""
        out = {}
        for i, layer in enumerate(self.layers):
            if isinstance(layer, _Linear) or (isinstance(layer, _Wide) and isinstance(layer.wide, nn.Conv2d)):
                w = layer.direction() if isinstance(layer, _Linear) else layer.wide.weight
                if w.grad is not None:
                    out[str(i)] = w.grad.detach().reshape(self.size, -1).to("cpu", torch.float32, copy=True)
        return out

    def watch_backward(self) -> "BackwardWatch":
        """Start recording, per member, the variance of ∂loss/∂(output) of every weight-matrix layer."""
        return BackwardWatch(self)


class BackwardWatch:
    """Per member and weight-matrix layer, the moments of the gradient reaching the layer's output,
    pooled over every backward pass while attached (GlorotMonitor's ``backward_var``, S at once)."""

    def __init__(self, stack: Stack):
        self.size = stack.size
        self.moments: dict[int, Moments] = {}
        self.handles = []
        for i, layer in enumerate(stack.layers):
            if isinstance(layer, _Linear):
                self.handles.append(layer.register_forward_hook(lambda m, a, y, i=i: self._watch(i, y)))

    def _watch(self, i: int, y: Tensor) -> None:
        if y.requires_grad:  # a tensor hook: the gradient reaching the output, as GlorotMonitor reads it
            y.register_hook(lambda g: self._add(i, g))

    def _add(self, i: int, g: Tensor) -> None:
        new = Moments.from_data(g.detach().reshape(g.shape[0], self.size, -1).double(), (0, 2))
        self.moments[i] = new if i not in self.moments else self.moments[i] + new

    def variances(self) -> list[list[float]]:
        """``[member][layer]`` unbiased variance of the gradient values."""
        per_layer = [self.moments[i].var(1) for i in sorted(self.moments)]
        return [[float(v[s]) for v in per_layer] for s in range(self.size)]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
