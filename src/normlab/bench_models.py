"""``normlab bench --models``: normlab inside real models that nobody here wrote.

Models from transformers (``pip install 'normlab[bench]'``), built from configs with random
weights at two sizes each, run as written (torch.nn's norms, or transformers' own RMSNorm and
ConvNextLayerNorm classes) and after :func:`normlab.convert.to_normlab`, interleaved round by
round in one process:

* ``train`` — forward, a loss, backward (gradients set to ``None`` before each step);
* ``eval`` — forward in ``eval()`` mode under ``torch.no_grad()``.

With ``compile=True`` both models are ``torch.compile``-d (inductor) and the compiled ones are
compared. Reported: median milliseconds of each and the speed-up (torch's time / normlab's; above
1 normlab is faster) as the median of the rounds' ratios, with its 95% interval and the verdict
(:func:`normlab.bench.speedup`): "par" where the interval holds 1, the difference being within the
machine's noise. Timings are for reading, never for a test.
"""

from __future__ import annotations

import copy
import importlib.util
import pathlib
import statistics
import sys
from typing import Callable

import torch

from .bench import speedup, timed, verdict
from .convert import to_normlab

__all__ = ["MODELS", "run", "load_torchvision"]


def load_torchvision() -> None:
    """Make torchvision's Python part importable where its compiled operators do not load.

    timm imports torchvision, and transformers does where it is installed; the torchvision wheel
    on the package index is built for CUDA, and on a CPU-only build of torch its ``_C`` library
    does not load, so ``import torchvision`` fails at its first fake-kernel registration
    ("operator torchvision::nms does not exist"). The models normlab builds need only the
    Python part (layers, model definitions), so where the library is missing this declares the
    two operators that import registers on, with torchvision's schemas and no kernel: calling
    them raises, everything else imports. Does nothing where torchvision is absent or loads.
    """
    spec = importlib.util.find_spec("torchvision")
    if spec is None or "torchvision" in sys.modules or hasattr(load_torchvision, "lib"):
        return
    try:
        torch.ops.load_library(str(pathlib.Path(spec.origin).parent / "_C.so"))
        return
    except (OSError, RuntimeError):
        pass
    lib = torch.library.Library("torchvision", "FRAGMENT")
    for op in ("nms", "qnms"):
        lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    load_torchvision.lib = lib  # kept alive: the definitions go with the Library object


def _lm(config_cls, model_cls, **cfg):
    def build():
        import transformers

        return getattr(transformers, model_cls)(getattr(transformers, config_cls)(**cfg))
    return build


def _timm(name, **cfg):
    def build():
        import timm

        return timm.create_model(name, **cfg)
    return build


def _unet(channels, per_block):
    def build():
        import diffusers

        return diffusers.UNet2DModel(sample_size=32, block_out_channels=channels, layers_per_block=per_block,
                                     norm_num_groups=8, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                     up_block_types=("AttnUpBlock2D", "UpBlock2D"))
    return build


def _image(batch, size):
    return lambda g: torch.randn(batch, 3, size, size, generator=g)


def _noisy(batch, size):
    return lambda g: (torch.randn(batch, 3, size, size, generator=g), torch.randint(0, 1000, (batch,), generator=g))


def _tokens(batch, seq, vocab):
    return lambda g: {"input_ids": torch.randint(0, vocab, (batch, seq), generator=g)}


def _pixels(batch, size):
    return lambda g: {"pixel_values": torch.randn(batch, 3, size, size, generator=g)}


_V = 1000  # vocabulary: the embeddings and the LM head are not what is measured
_DECODER = dict(vocab_size=_V, max_position_embeddings=512)

# name -> size -> (build, inputs(generator))
MODELS: dict[str, dict[str, tuple[Callable, Callable]]] = {
    "gpt2": {
        "small": (_lm("GPT2Config", "GPT2LMHeadModel", n_embd=256, n_layer=4, n_head=4, vocab_size=_V, n_positions=512),
                  _tokens(8, 128, _V)),
        "base": (_lm("GPT2Config", "GPT2LMHeadModel", n_embd=768, n_layer=4, n_head=12, vocab_size=_V, n_positions=512),
                 _tokens(4, 128, _V)),
    },
    "bert": {
        "small": (_lm("BertConfig", "BertForMaskedLM", hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                      intermediate_size=1024, vocab_size=_V), _tokens(8, 128, _V)),
        "base": (_lm("BertConfig", "BertForMaskedLM", hidden_size=768, num_hidden_layers=4, num_attention_heads=12,
                     intermediate_size=3072, vocab_size=_V), _tokens(4, 128, _V)),
    },
    "llama": {
        "small": (_lm("LlamaConfig", "LlamaForCausalLM", hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, **_DECODER), _tokens(8, 128, _V)),
        "base": (_lm("LlamaConfig", "LlamaForCausalLM", hidden_size=768, intermediate_size=2048, num_hidden_layers=4,
                     num_attention_heads=12, num_key_value_heads=4, **_DECODER), _tokens(4, 128, _V)),
    },
    "qwen2": {
        "small": (_lm("Qwen2Config", "Qwen2ForCausalLM", hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, **_DECODER), _tokens(8, 128, _V)),
        "base": (_lm("Qwen2Config", "Qwen2ForCausalLM", hidden_size=768, intermediate_size=2048, num_hidden_layers=4,
                     num_attention_heads=12, num_key_value_heads=4, **_DECODER), _tokens(4, 128, _V)),
    },
    "resnet": {
        "small": (_lm("ResNetConfig", "ResNetForImageClassification", embedding_size=32, hidden_sizes=[32, 64, 128, 256],
                      depths=[1, 1, 1, 1], layer_type="basic", num_labels=10), _pixels(8, 64)),
        "base": (_lm("ResNetConfig", "ResNetForImageClassification", embedding_size=64,
                     hidden_sizes=[64, 128, 256, 512], depths=[2, 2, 2, 2], layer_type="basic", num_labels=10),
                 _pixels(8, 96)),
    },
    "convnext": {
        "small": (_lm("ConvNextConfig", "ConvNextForImageClassification", hidden_sizes=[32, 64, 128, 256],
                      depths=[1, 1, 1, 1], num_labels=10), _pixels(8, 64)),
        "base": (_lm("ConvNextConfig", "ConvNextForImageClassification", hidden_sizes=[64, 128, 256, 512],
                     depths=[2, 2, 2, 2], num_labels=10), _pixels(8, 96)),
    },
    # timm (needs timm, and torchvision's Python part): BatchNormAct2d, LayerNorm2d, timm's LayerNorm
    "timm-efficientnet": {
        "small": (_timm("efficientnet_b0", num_classes=10), _image(8, 64)),
        "base": (_timm("efficientnet_b0", num_classes=10), _image(8, 128)),
    },
    "timm-convnext": {
        "small": (_timm("convnext_atto", num_classes=10), _image(8, 64)),
        "base": (_timm("convnext_nano", num_classes=10), _image(8, 96)),
    },
    "timm-vit": {
        "small": (_timm("vit_tiny_patch16_224", img_size=64, num_classes=10), _image(8, 64)),
        "base": (_timm("vit_small_patch16_224", img_size=96, num_classes=10), _image(8, 96)),
    },
    # diffusers: GroupNorm in every resnet and attention block
    "diffusers-unet": {
        "small": (_unet((32, 64), 1), _noisy(4, 32)),
        "base": (_unet((64, 128), 2), _noisy(4, 32)),
    },
}


def _forward(model, inputs) -> torch.Tensor:
    """The model's main output for keyword (transformers), positional or single inputs."""
    if isinstance(inputs, dict):
        out = model(**inputs)
    else:
        out = model(*inputs) if isinstance(inputs, tuple) else model(inputs)
    for key in ("logits", "sample"):
        out = getattr(out, key, out)
    return out[0] if isinstance(out, tuple) else out


def _steps(model, inputs) -> dict[str, Callable[[], None]]:
    def train():
        model.train()
        for p in model.parameters():
            p.grad = None
        _forward(model, inputs).float().square().mean().backward()

    def evaluate():
        model.eval()
        with torch.no_grad():
            _forward(model, inputs)

    return {"train": train, "eval": evaluate}


def _to(inputs, dtype: torch.dtype):
    """The floating tensors of ``inputs`` in ``dtype`` (token ids and timesteps stay)."""
    return torch.utils._pytree.tree_map(
        lambda t: t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t, inputs)


def _library(name: str) -> str:
    return {"timm": "timm", "diffusers": "diffusers"}.get(name.split("-")[0], "transformers")


def run(models=None, sizes=("small", "base"), compile: bool = False, reps: int = 10,
        progress: Callable[[str], None] | None = None, dtype: torch.dtype = torch.float32) -> list[dict]:
    """One row per model × size × step: ``{"model", "size", "step", "dtype", "torch ms", "normlab ms",
    "speed-up", "low", "high", "verdict", "converted"}``; models and inputs in ``dtype``. Without
    ``models``, every model whose library is installed (transformers, timm, diffusers)."""
    names = list(models or [n for n in MODELS if importlib.util.find_spec(_library(n))])
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        raise ValueError(f"unknown model(s) {unknown}; choose from {list(MODELS)}")
    missing = sorted({_library(n) for n in names if importlib.util.find_spec(_library(n)) is None})
    if missing or not names:
        raise ValueError(f"the model benchmark needs {', '.join(missing) or 'transformers'}: pip install "
                         f"'normlab[bench]' (transformers); timm and diffusers for their models")
    load_torchvision()  # before transformers or timm import it
    rows = []
    for name in names:
        for size in sizes:
            build, make_inputs = MODELS[name][size]
            torch.manual_seed(0)
            model = build().to(dtype)
            fast, report = to_normlab(copy.deepcopy(model), report=True)
            inputs = _to(make_inputs(torch.Generator().manual_seed(0)), dtype)
            if compile:
                torch._dynamo.reset()
                model, fast = torch.compile(model), torch.compile(fast)
            theirs, ours = _steps(model, inputs), _steps(fast, inputs)
            for step in ("train", "eval"):
                if progress:
                    progress(f"{name} {size} {step}{' compiled' if compile else ''}")
                # two warm-up calls each (compiled: the compilation); then paired rounds
                t = timed({"torch": theirs[step], "normlab": ours[step]}, reps, warmup=2)
                ratio, low, high = speedup(t["torch"], t["normlab"])
                rows.append({"model": name, "size": size, "step": step, "compiled": compile, "dtype": str(dtype)[6:],
                             "torch ms": statistics.median(t["torch"]) * 1e3,
                             "normlab ms": statistics.median(t["normlab"]) * 1e3, "speed-up": ratio,
                             "low": low, "high": high, "verdict": verdict(low, high),
                             "converted": len(report["converted"])})
    return rows


def table(rows: list[dict]) -> str:
    """The rows as a Markdown table (what the README's performance section shows)."""
    lines = ["| model | size | step | dtype | torch.nn ms | normlab ms | speed-up | 95% interval | | norms converted |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['size']} | {r['step']}{' (compiled)' if r['compiled'] else ''} | "
                     f"{r['dtype']} | {r['torch ms']:.1f} | {r['normlab ms']:.1f} | {r['speed-up']:.2f} | "
                     f"{r['low']:.2f}–{r['high']:.2f} | {r['verdict']} | {r['converted']} |")
    return "\n".join(lines)
