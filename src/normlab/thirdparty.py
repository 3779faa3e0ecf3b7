"""The norms of other libraries that :func:`normlab.convert.to_normlab` converts.

Each entry turns one class of timm, torchvision, transformers or diffusers into a normlab layer
that reproduces that class's numerics contract: which dims it normalizes, in which dtype it
computes and in which it returns (transformers' Llama-style RMSNorm returns ``weight · x̂`` in
the promoted dtype of the two, T5's in the weight's half dtype, OLMo's and Cohere's in the
input's). The converted module is an instance of its original class too (see
:func:`normlab.nn.adopted_class`), so code that looks for it by class still finds it.

Classes are named by where they are defined (``module.QualName``): no library is imported to
match them. transformers copies one norm into many models under other names (``# Copied from
...LlamaRMSNorm``), so those are matched by class name; :func:`normlab.convert.to_normlab` checks
every third-party conversion against the original on a probe input before it keeps it.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from . import functional as F, nn as nln
from .nn import retype

__all__: list[str] = []

_HALF = (torch.float16, torch.bfloat16)


def _t5(x: torch.dtype, w: torch.dtype | None) -> torch.dtype:
    # x·rsqrt(var) is float32 (var is), cast to the weight's dtype only when that is half;
    # without a weight (diffusers' RMSNorm(elementwise_affine=False)) back to the input's
    if w is None:
        return x
    if w in _HALF:
        return w
    return torch.promote_types(torch.promote_types(x, torch.float32), w)


def _same_as_input(x: torch.dtype, w: torch.dtype | None) -> torch.dtype:
    return x


def _cast(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return t if t is None or t.dtype == dtype else t.to(dtype)


def _param(t: Tensor | None, compute: torch.dtype) -> Tensor | None:
    """γ or β for input in ``compute``: as it is in that dtype or a wider float one (a float32 γ
    scales fp16/bf16 input unrounded, on every route), else widened to it."""
    if t is None or t.dtype == compute or (compute in _HALF and t.dtype == torch.float32):
        return t
    return t.to(torch.promote_types(compute, torch.float32))


class _Casting:
    """A norm whose output dtype follows the converted class's rule ``_out(input, weight)``;
    computed in the wider of the input's and the output's dtype, parameters included (statistics
    in float32 or wider whatever the dtype, as every normlab norm)."""

    _out: Callable

    def forward(self, input: Tensor) -> Tensor:
        w = self.weight
        out = self._out(input.dtype, None if w is None else w.dtype)
        compute = torch.promote_types(input.dtype, out)
        y = self._normalize(_cast(input, compute), _param(w, compute), _param(getattr(self, "bias", None), compute))
        return y if y.dtype == out else y.to(out)


class _CastingRMSNorm(_Casting, nln.RMSNorm):
    def _normalize(self, x: Tensor, weight: Tensor | None, bias: None) -> Tensor:
        return F.rms_norm(x, self.normalized_shape, weight, self.eps)


class _ChannelsFirst:
    """A norm over dim 1 of ``(N, C, *S)`` (``data_format="channels_first"``, ``LayerNorm2d``):
    the norm over the last dim of a channels-last view, permuted back."""

    def forward(self, input: Tensor) -> Tensor:
        nd = input.dim()
        y = super().forward(input.permute(0, *range(2, nd), 1))
        return y.permute(0, nd - 1, *range(1, nd - 1))


class _RMSNormPromote(nln.RMSNorm):
    """RMSNorm returning ``weight · x̂`` with x̂ in the input's dtype (transformers' Llama family)."""

    def forward(self, input: Tensor) -> Tensor:
        w = self.weight
        if w is None or w.dtype == input.dtype:
            return super().forward(input)
        # x̂ rounded to the input's dtype, then scaled in the promoted one: a float32 weight makes
        # bfloat16 input float32, holding bfloat16's x̂
        return w * F.rms_norm(input, self.normalized_shape, None, self.eps)


class _RMSNormT5(_CastingRMSNorm):
    """RMSNorm returning in the weight's dtype when it is half, else in float32 (T5, diffusers)."""

    _out = staticmethod(_t5)


class _RMSNormAsInput(_CastingRMSNorm):
    """RMSNorm returning in the input's dtype (OLMo 2)."""

    _out = staticmethod(_same_as_input)


class _LastDimRMSNorm(nln.RMSNorm):
    """RMSNorm without weight over the last dim, whatever its size (Llama 4's QK norm)."""

    def forward(self, input: Tensor) -> Tensor:
        return F.rms_norm(input, input.shape[-1:], None, self.eps)


class _LayerNormAsInput(_Casting, nln.LayerNorm):
    """LayerNorm computed in float32 or wider, returning in the input's dtype (Cohere, OLMo, diffusers)."""

    _out = staticmethod(_same_as_input)

    def _normalize(self, x: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
        return F.layer_norm(x, self.normalized_shape, weight, bias, self.eps)


class _ChannelsFirstLayerNorm(_ChannelsFirst, nln.LayerNorm):
    """LayerNorm over dim 1 (transformers' ConvNext, timm's and torchvision's LayerNorm2d)."""


class _ChannelsFirstRMSNorm(_ChannelsFirst, _RMSNormPromote):
    """RMSNorm over dim 1, returning in the promoted dtype (timm's RmsNorm2d)."""


class _GatedRMSNorm(nln.RMSNorm):
    """transformers' Mamba 2 gated RMSNorm: x·silu(gate) in float32, RMSNorm over groups of
    ``group_size`` values of the last dim, rounded to the input's dtype, then scaled by γ."""

    def forward(self, hidden_states: Tensor, gate: Tensor | None = None) -> Tensor:
        h = hidden_states.float()
        if gate is not None:
            h = h * torch.nn.functional.silu(gate.float())
        y = F.rms_norm(h.view(*h.shape[:-1], -1, self.group_size), (self.group_size,), None, self.eps)
        return self.weight * y.view(h.shape).to(hidden_states.dtype)


class _BatchNormAct2d(nln.BatchNorm2d):
    """timm's BatchNormAct2d: BatchNorm2d, then its ``drop``, then its ``act``."""

    def forward(self, input: Tensor) -> Tensor:
        return self.act(self.drop(super().forward(input)))


class _AdaGroupNorm(nln.GroupNorm):
    """diffusers' AdaGroupNorm: GroupNorm without γ, β, then ``x·(1 + scale) + shift`` with
    ``(scale, shift) = linear(act(emb))`` per sample and channel (a timestep embedding)."""

    def forward(self, input: Tensor, emb: Tensor) -> Tensor:
        if self.act:
            emb = self.act(emb)
        scale, shift = self.linear(emb)[:, :, None, None].chunk(2, dim=1)
        return super().forward(input) * (1 + scale) + shift


def _ada_group_norm(m: nn.Module) -> nn.Module:
    linear = getattr(m, "linear", None)
    if not isinstance(linear, nn.Linear) or linear.out_features % 2 or linear.out_features // 2 % m.num_groups:
        raise ValueError(f"expected a Linear of 2·C outputs, C divisible by num_groups={m.num_groups}, got {linear}")
    return retype(m, _AdaGroupNorm, num_channels=linear.out_features // 2, affine=False, weight=None, bias=None)


def _drop_act(m: nn.Module) -> nn.Module:
    return nn.Sequential(m.drop, m.act)


# BatchNorms whose forward applies more after the normalization, by the dotted name of the class
# that defines that forward: what stays in the model when the normalization is folded away or
# replaced (timm's forward is BN, then ``self.drop``, then ``self.act``)
BN_THEN: dict[str, Callable[[nn.Module], nn.Module]] = {
    "timm.layers.norm_act.BatchNormAct2d": _drop_act,
    "timm.layers.norm_act.SyncBatchNormAct": _drop_act,
    f"{__name__}._BatchNormAct2d": _drop_act,
}


# BatchNorms frozen into a fixed affine map (buffers, no training mode), by the dotted name of the
# class: what stays when fold_batchnorm folds them (the only tool that acts on them)
FROZEN_BN: dict[str, Callable[[nn.Module], nn.Module]] = {
    "torchvision.ops.misc.FrozenBatchNorm2d": lambda m: nn.Identity(),
    "timm.layers.norm_act.FrozenBatchNormAct2d": _drop_act,
}


# ------------------------------------------------------------------------------ conversions
def _weight(m: nn.Module, required: bool = True) -> Tensor | None:
    w = getattr(m, "weight", None)
    if w is None and not required:
        return None
    if not isinstance(w, nn.Parameter) or w.dim() != 1:
        raise ValueError(f"expected `weight` to be a 1-D Parameter, got {type(w).__name__}"
                         + (f" of shape {tuple(w.shape)}" if isinstance(w, Tensor) else ""))
    return w


def _eps(m: nn.Module, *names: str) -> float:
    for name in names:
        if isinstance(getattr(m, name, None), (int, float)):
            return float(getattr(m, name))
    raise ValueError(f"expected a float attribute {' or '.join(names)}")


def _rms(cls: type, *eps_names: str, offset: float = 0.0) -> Callable:
    """An RMSNorm with a 1-D ``weight`` (or none), ε under one of ``eps_names``, scaled by
    ``offset + weight``."""
    def convert(m: nn.Module) -> nn.Module:
        if getattr(m, "bias", None) is not None:
            raise ValueError("it adds a bias after the RMS norm, which normlab's RMSNorm has not")
        w = _weight(m, required=False)
        shape = tuple(w.shape) if w is not None else tuple(getattr(m, "normalized_shape", getattr(m, "dim", ())))
        if len(shape) != 1:
            raise ValueError(f"it normalizes over the last dim only, but its shape is {shape}")
        return retype(m, cls, normalized_shape=shape, eps=_eps(m, *eps_names), elementwise_affine=w is not None,
                      offset=offset)
    return convert


def _layer_norm_last_dim(cls: type) -> Callable:
    """A LayerNorm over the last dim with a 1-D weight and no bias (Cohere), ε as variance_epsilon."""
    def convert(m: nn.Module) -> nn.Module:
        w = _weight(m)
        return retype(m, cls, normalized_shape=tuple(w.shape), eps=_eps(m, "variance_epsilon"),
                      elementwise_affine=True, bias=None)
    return convert


def _olmo_layer_norm(m: nn.Module) -> nn.Module:
    """OLMo's LayerNorm: no parameters, ε = 1e-5 written in its forward, computed in float32."""
    shape = tuple(getattr(m, "normalized_shape", ()))
    if len(shape) != 1:
        raise ValueError(f"expected a 1-D normalized_shape, got {shape}")
    return retype(m, _LayerNormAsInput, eps=1e-5, elementwise_affine=False, weight=None, bias=None)


def _gated_rms(m: nn.Module) -> nn.Module:
    w = _weight(m)
    group = getattr(m, "group_size", None)
    if not isinstance(group, int) or group <= 0 or w.numel() % group:
        raise ValueError(f"expected a group_size that divides the {w.numel()} channels, got {group!r}")
    return retype(m, _GatedRMSNorm, normalized_shape=tuple(w.shape), eps=_eps(m, "variance_epsilon"),
                  elementwise_affine=True)


def _weightless_rms(m: nn.Module) -> nn.Module:
    return retype(m, _LastDimRMSNorm, normalized_shape=(), eps=_eps(m, "variance_epsilon"),
                  elementwise_affine=False, weight=None)


def _as(cls: type) -> Callable:
    """A class whose forward computes what ``cls`` does, on the same attributes. timm's norms
    take APEX's kernels or autocast's dtype where its ``fast_norm`` is on: those are refused."""
    def convert(m: nn.Module) -> nn.Module:
        if getattr(m, "_fast_norm", False):
            raise ValueError("timm's fast_norm is on (APEX kernels, or autocast's own dtype): its numerics are "
                             "not normlab's; call timm.layers.set_fast_norm(False) before building the model")
        return retype(m, cls)
    return convert


def _convnext_layernorm(m: nn.Module) -> nn.Module:
    """transformers' ConvNextLayerNorm: LayerNorm over the last dim, or over dim 1 (channels_first)."""
    cls = {"channels_last": nln.LayerNorm, "channels_first": _ChannelsFirstLayerNorm}.get(m.data_format)
    if cls is None:
        raise ValueError(f"data_format {m.data_format!r} is neither channels_last nor channels_first")
    return retype(m, cls)


_LLAMA_STYLE = ("LlamaRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "Qwen3MoeRMSNorm", "MistralRMSNorm",
                "MixtralRMSNorm", "Phi3RMSNorm", "Llama4TextRMSNorm", "GraniteRMSNorm", "MambaRMSNorm",
                "Mamba2RMSNorm")

_GEMMA_STYLE = ("GemmaRMSNorm", "Gemma2RMSNorm", "Gemma3RMSNorm", "T5GemmaRMSNorm", "VaultGemmaRMSNorm",
                "Qwen3NextRMSNorm")

# class -> conversion: a dotted name matches the class defined there, a bare name any class so
# named (transformers' copies); each conversion returns the normlab module (made with retype, so
# parameters and buffers stay the same objects) or raises ValueError saying why it cannot
CONVERSIONS: dict[str, Callable[[nn.Module], nn.Module]] = {
    **{name: _rms(_RMSNormPromote, "variance_epsilon") for name in _LLAMA_STYLE},
    "T5LayerNorm": _rms(_RMSNormT5, "variance_epsilon"),
    # x̂·(1 + w) in float32, returned in the input's dtype: normlab's RMSNorm with offset 1
    **{name: _rms(nln.RMSNorm, "eps", offset=1.0) for name in _GEMMA_STYLE},
    "Olmo2RMSNorm": _rms(_RMSNormAsInput, "variance_epsilon"),
    "OlmoLayerNorm": _olmo_layer_norm,
    "Mamba2RMSNormGated": _gated_rms,
    "CohereLayerNorm": _layer_norm_last_dim(_LayerNormAsInput),
    "Llama4TextWeightlessRMSNorm": _weightless_rms,
    "ConvNextLayerNorm": _convnext_layernorm,
    "ConvNextV2LayerNorm": _convnext_layernorm,
    # diffusers
    "diffusers.models.normalization.RMSNorm": _rms(_RMSNormT5, "eps"),
    "diffusers.models.normalization.FP32LayerNorm": _as(_LayerNormAsInput),
    "diffusers.models.normalization.AdaGroupNorm": _ada_group_norm,
    # timm
    "timm.layers.norm.LayerNorm": _as(nln.LayerNorm),
    "timm.layers.norm.LayerNorm2d": _as(_ChannelsFirstLayerNorm),
    "timm.layers.norm.GroupNorm": _as(nln.GroupNorm),
    "timm.layers.norm.GroupNorm1": _as(nln.GroupNorm),
    "timm.layers.norm.RmsNorm": _as(nln.RMSNorm),  # torch's rms_norm where torch has it: the input's dtype
    "timm.layers.norm.RmsNorm2d": _as(_ChannelsFirstRMSNorm),
    "timm.layers.norm_act.BatchNormAct2d": _as(_BatchNormAct2d),
    # torchvision
    "torchvision.models.convnext.LayerNorm2d": _as(_ChannelsFirstLayerNorm),
    "torchvision.models.swin_transformer.LayerNorm2d": _as(_ChannelsFirstLayerNorm),
}


def conversion_for(cls: type) -> Callable | None:
    """The built-in conversion of ``cls``: by where it is defined, else by its name."""
    return CONVERSIONS.get(f"{cls.__module__}.{cls.__qualname__}") or CONVERSIONS.get(cls.__name__)


# ------------------------------------------------------------------------------ probe inputs
def probe_input(new: nn.Module) -> tuple[Tensor, ...] | None:
    """Float32 inputs of the shapes a converted norm takes, or None where normlab cannot tell."""
    g = torch.Generator().manual_seed(0)
    if isinstance(new, _AdaGroupNorm):
        return (torch.randn(2, new.num_channels, 3, 3, generator=g) * 3 + 1,
                torch.randn(2, new.linear.in_features, generator=g))
    if isinstance(new, nn.modules.batchnorm._NormBase):
        shape = (4, new.num_features, *(3,) * (max(getattr(new, "_ndims", (4,))) - 2))
    elif isinstance(new, nn.GroupNorm):
        shape = (2, new.num_channels, 3, 3)
    elif isinstance(new, _ChannelsFirst):
        shape = (2, new.normalized_shape[0], 3, 3)
    elif isinstance(new, _LastDimRMSNorm):
        shape = (2, 3, 8)
    elif isinstance(new, (nn.LayerNorm, nn.RMSNorm)):
        shape = (2, 3, *new.normalized_shape)
    else:
        return None
    return (torch.randn(shape, generator=g) * 3 + 1,)
