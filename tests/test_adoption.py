"""to_normlab / to_torch: every norm of a model, torch.nn's and third-party, in one call and back."""

import copy

import pytest
import torch
from torch import nn

import normlab.nn as nln
from normlab.convert import register_conversion, retype, to_normlab, to_torch

from conftest import assert_rel


def _zoo():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.GroupNorm(2, 8), nn.InstanceNorm2d(8, affine=True),
        nn.Flatten(1), nn.Linear(8 * 36, 16), nn.BatchNorm1d(16), nn.LayerNorm(16), nn.RMSNorm(16, eps=1e-6),
    )


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_every_torch_norm_converts_with_its_state_and_back(mode):
    torch.manual_seed(0)
    model = _zoo()
    model(torch.randn(4, 3, 8, 8))  # running statistics that are not the defaults
    getattr(model, mode)()
    fast, rep = to_normlab(model, report=True)
    assert [r[1] for r in rep["converted"]] == ["BatchNorm2d", "GroupNorm", "InstanceNorm2d", "BatchNorm1d",
                                                "LayerNorm", "RMSNorm"] and rep["left"] == []
    assert all(type(m).__module__ == "normlab.nn" for m in fast if "Norm" in type(m).__name__)
    assert list(fast.state_dict()) == list(model.state_dict())
    ref = copy.deepcopy(model)
    x = torch.randn(5, 3, 8, 8, requires_grad=True)
    xr = x.detach().clone().requires_grad_()
    y, yr = fast(x), ref(xr)
    assert_rel(y, yr)
    probe = torch.randn(y.shape)  # (not ‖y‖²: an RMSNorm output's norm does not depend on x)
    (y * probe).sum().backward()
    (yr * probe).sum().backward()
    assert_rel(x.grad, xr.grad, tol=1e-4)
    for (name, a), b in zip(fast.state_dict().items(), ref.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)  # the running statistics moved alike
    back = to_torch(fast)
    assert [type(m) for m in back] == [type(m) for m in model]


def test_parameters_stay_the_same_objects_so_optimizers_keep_working():
    model = _zoo()
    params = list(model.parameters())
    fast = to_normlab(model, inplace=True)
    assert fast is model and [id(p) for p in fast.parameters()] == [id(p) for p in params]
    assert to_torch(fast, inplace=True) is model and type(model[1]) is nn.BatchNorm2d


def test_shared_norms_stay_shared_and_hooks_come_along():
    ln = nn.LayerNorm(4)
    seen = []
    ln.register_forward_hook(lambda m, a, out: seen.append(type(m).__name__))
    model = nn.Sequential(ln, nn.Linear(4, 4), ln)
    fast = to_normlab(model)
    assert fast[0] is fast[2] and isinstance(fast[0], nln.LayerNorm)
    fast(torch.randn(2, 4))
    assert seen == ["LayerNorm", "LayerNorm"]


def test_unknown_norms_are_left_and_listed_and_the_registry_extends():
    class ScaleNorm(nn.Module):  # ‖x‖-scaled: no normlab formula
        def __init__(self):
            super().__init__()
            self.g = nn.Parameter(torch.ones(()))

        def forward(self, x):
            return self.g * x / x.norm(dim=-1, keepdim=True)

    class MyRMSNorm(nn.Module):
        def __init__(self, n):
            super().__init__()
            self.weight, self.variance_epsilon = nn.Parameter(torch.randn(n)), 1e-6

        def forward(self, x):  # in the input's dtype, as normlab's RMSNorm
            return (self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)).to(x.dtype)

    class PromotingRMSNorm(MyRMSNorm):  # in the promoted dtype: a float32 weight makes bfloat16 input float32
        def forward(self, x):
            return self.weight * x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.variance_epsilon)

    model = nn.Sequential(ScaleNorm(), MyRMSNorm(4), PromotingRMSNorm(4))
    _, rep = to_normlab(model, report=True)
    assert [r[:2] for r in rep["left"]] == [("0", "ScaleNorm"), ("1", "MyRMSNorm"), ("2", "PromotingRMSNorm")]

    def convert(m):
        return retype(m, nln.RMSNorm, normalized_shape=tuple(m.weight.shape), eps=m.variance_epsilon,
                      elementwise_affine=True)
    register_conversion(MyRMSNorm, convert)
    register_conversion(PromotingRMSNorm, convert)  # wrong in bfloat16: the probe refuses it
    fast, rep = to_normlab(model, report=True)
    assert [r[1] for r in rep["converted"]] == ["MyRMSNorm"]
    assert rep["left"][1][:2] == ("2", "PromotingRMSNorm") and "bfloat16" in rep["left"][1][2], rep["left"]
    assert isinstance(fast[1], MyRMSNorm) and isinstance(fast[1], nln.RMSNorm)
    assert type(to_torch(fast)[1]) is MyRMSNorm and "normalized_shape" not in to_torch(fast)[1].__dict__
    x = torch.randn(3, 4)
    assert_rel(fast(x), model(x))


transformers = pytest.importorskip("transformers")


def _models():
    t = transformers
    return {
        "llama": lambda: t.LlamaForCausalLM(t.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                          num_attention_heads=4, num_key_value_heads=2, vocab_size=97)),
        "qwen2": lambda: t.Qwen2ForCausalLM(t.Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                          num_attention_heads=4, num_key_value_heads=2, vocab_size=97)),
        "gpt2": lambda: t.GPT2LMHeadModel(t.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=97, n_positions=32,
                                                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)),
        "bert": lambda: t.BertForMaskedLM(t.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                       intermediate_size=128, vocab_size=97, hidden_dropout_prob=0.0,
                                                       attention_probs_dropout_prob=0.0)),
        "resnet": lambda: t.ResNetForImageClassification(t.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32],
                                                                        depths=[1, 1], num_labels=5)),
        "convnext": lambda: t.ConvNextForImageClassification(t.ConvNextConfig(hidden_sizes=[16, 32], depths=[1, 1],
                                                                              num_stages=2, num_labels=5)),
    }


@pytest.mark.parametrize("name", ["llama", "qwen2", "gpt2", "bert", "resnet", "convnext"])
def test_real_models_convert_every_norm_and_train_alike(name):
    torch.manual_seed(0)
    model = _models()[name]()
    fast, rep = to_normlab(model, report=True)
    assert rep["converted"] and rep["left"] == [], rep["left"]
    if name in ("resnet", "convnext"):
        inputs = {"pixel_values": torch.randn(2, 3, 32, 32)}
    else:
        inputs = {"input_ids": torch.randint(0, 97, (2, 12))}
    for m in (model, fast):
        m.train()
    out, ref = fast(**inputs).logits, model(**inputs).logits
    assert_rel(out, ref, tol=1e-5)
    out.square().mean().backward()
    ref.square().mean().backward()
    scale = max(float(q.grad.abs().max()) for q in model.parameters() if q.grad is not None)
    for (pname, p), q in zip(fast.named_parameters(), model.parameters()):
        if q.grad is not None:  # (some are 0 but for rounding: BERT's key bias, by softmax's shift invariance)
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6 * scale, msg=pname)
    assert type(to_torch(fast).get_submodule(rep["converted"][0][0])) is type(model.get_submodule(rep["converted"][0][0]))
