"""LoRA (arXiv:2106.09685): identity at init, gradients at init,
merge equivalence on Linear / GPT-2 Conv1D / 4-bit Linear, Conv1D parity, scaling, dropout."""
import math

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import peftlab
from peftlab.adapters.lora import LoRALinear

from conftest import linear4bit, randomize_adapters, tiny_gpt2, tiny_llama, tokens


class Holder(nn.Module):
    """One wrappable layer under a name, so wrap() has something to select."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.proj = layer

    def forward(self, x):
        return self.proj(x)


def wrapped(layer: nn.Module, **cfg) -> Holder:
    return peftlab.wrap(Holder(layer), "lora", target_modules=["proj"], **cfg)


@pytest.mark.parametrize("make", [lambda: nn.Linear(16, 12), lambda: Conv1D(12, 16), lambda: linear4bit(64, 32)],
                         ids=["linear", "conv1d", "4bit"])
def test_identity_at_init_in_train_and_eval(make):
    base = make()
    x = torch.randn(3, 5, base.weight.shape[0] if isinstance(base, Conv1D) else base.in_features)
    model = wrapped(base, lora_dropout=0.1)
    expected = base(x)  # train mode
    for mode in (True, False):
        model.train(mode)  # a wrapped 4-bit base computes the same in eval (no bf16 repacking)
        assert torch.equal(model(x), expected)


def test_init_gradients_only_reach_B():
    model = wrapped(nn.Linear(16, 12))
    model(torch.randn(4, 16)).pow(2).sum().backward()
    layer = model.proj
    assert torch.count_nonzero(layer.lora_A.grad) == 0
    assert torch.count_nonzero(layer.lora_B.grad) > 0
    assert layer.base_layer.weight.grad is None and not layer.base_layer.weight.requires_grad


@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2], ids=["llama-linear", "gpt2-conv1d"])
def test_merge_equals_unmerged_and_unmerge_restores(factory):
    model = factory()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    peftlab.wrap(model, "lora", r=4, lora_alpha=8)
    randomize_adapters(model)
    x = tokens()
    unmerged = model(x).logits
    assert not torch.allclose(unmerged, factory()(x).logits, atol=1e-3), "adapters must change the output"
    layers = model.peftlab.current.layers.values()
    for layer in layers:
        layer.merge()
    torch.testing.assert_close(model(x).logits, unmerged, atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError, match="already merged"):
        next(iter(layers)).merge()
    for layer in layers:
        layer.unmerge()
    with pytest.raises(RuntimeError, match="not merged"):
        next(iter(layers)).unmerge()
    restored = peftlab.unwrap(model).state_dict()
    assert restored.keys() == original.keys()
    for key in original:
        torch.testing.assert_close(restored[key], original[key], atol=1e-6, rtol=1e-6)


def test_peftlab_merge_returns_plain_model_with_same_outputs():
    model = tiny_gpt2()
    peftlab.wrap(model, "lora", r=4)
    randomize_adapters(model)
    x = tokens()
    expected = model(x).logits
    merged = peftlab.merge(model)
    assert not any(isinstance(m, LoRALinear) for m in merged.modules()) and not hasattr(merged, "peftlab")
    assert isinstance(merged.transformer.h[0].attn.c_attn, Conv1D)
    assert merged.transformer.h[0].attn.c_attn.weight.shape == (32, 96)
    torch.testing.assert_close(merged(x).logits, expected, atol=1e-5, rtol=1e-5)


def test_unwrap_restores_the_original_model_exactly():
    model = tiny_llama()
    x = tokens()
    expected = model(x).logits
    types = {n: type(m) for n, m in model.named_modules()}
    peftlab.wrap(model, "lora", r=4, modules_to_save=["lm_head"])
    randomize_adapters(model)
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)  # a trained head must not survive unwrap either
    peftlab.unwrap(model)
    assert {n: type(m) for n, m in model.named_modules()} == types
    assert torch.equal(model(x).logits, expected)
    assert not hasattr(model, "peftlab")


def test_4bit_merge_is_refused_in_place_and_dequantized_by_peftlab_merge():
    base = linear4bit(64, 32)
    model = wrapped(base, r=4)
    randomize_adapters(model)
    x = torch.randn(5, 64)
    expected = model(x)
    with pytest.raises(RuntimeError, match="peftlab.merge"):
        model.proj.merge()
    model.eval()
    torch.testing.assert_close(model(x), expected, atol=1e-6, rtol=1e-6)  # no bf16 repack in eval
    model.train()
    with pytest.warns(UserWarning, match="dequantized"):
        merged = peftlab.merge(model)
    assert type(merged.proj) is nn.Linear and merged.proj.weight.dtype == torch.float32
    torch.testing.assert_close(merged(x), expected, atol=1e-5, rtol=1e-5)


def test_4bit_backward_reaches_adapters_and_input():
    model = wrapped(linear4bit(64, 32), r=4)
    randomize_adapters(model)
    x = torch.randn(5, 64, requires_grad=True)
    model(x).sum().backward()
    assert x.grad is not None and torch.count_nonzero(x.grad) > 0
    assert torch.count_nonzero(model.proj.lora_A.grad) > 0 and torch.count_nonzero(model.proj.lora_B.grad) > 0


def test_conv1d_matches_linear_with_transposed_weight():
    torch.manual_seed(0)
    conv = Conv1D(12, 16)  # (nf=d_out, nx=d_in): weight (16, 12)
    lin = nn.Linear(16, 12)
    with torch.no_grad():
        lin.weight.copy_(conv.weight.t())
        lin.bias.copy_(conv.bias)
    a, b = wrapped(conv, r=3), wrapped(lin, r=3)
    randomize_adapters(a)
    randomize_adapters(b)
    x = torch.randn(4, 16)
    torch.testing.assert_close(a(x), b(x), atol=1e-6, rtol=1e-6)
    a.proj.merge()
    assert conv.weight.shape == (16, 12)
    torch.testing.assert_close(conv.weight, (lin.weight + b.proj.delta_weight()).t(), atol=1e-6, rtol=1e-6)


def test_scaling_alpha_and_rslora():
    x = torch.randn(4, 16)
    base = nn.Linear(16, 12)
    deltas = []
    for alpha in (4.0, 8.0):
        model = wrapped(nn.Linear(16, 12), r=4, lora_alpha=alpha)
        model.proj.base_layer.load_state_dict(base.state_dict())
        randomize_adapters(model)
        deltas.append(model(x) - base(x))
    torch.testing.assert_close(deltas[1], 2 * deltas[0], atol=1e-6, rtol=1e-5)

    model = wrapped(nn.Linear(16, 12), r=4, lora_alpha=8.0, use_rslora=True)
    randomize_adapters(model)
    layer = model.proj
    assert layer.scale == pytest.approx(8.0 / math.sqrt(4))
    torch.testing.assert_close(layer.delta_weight(), 4.0 * layer.lora_B @ layer.lora_A)


def test_dropout_touches_only_the_branch():
    base = nn.Linear(16, 12)
    model = wrapped(base, lora_dropout=0.5).train()
    x = torch.randn(8, 16)
    assert torch.equal(model(x), base(x))  # B = 0: the base path never sees dropout
    randomize_adapters(model)
    assert not torch.equal(model(x), model(x))  # two draws differ in train mode
    model.eval()
    assert torch.equal(model(x), model(x))
    torch.testing.assert_close(model(x), base(x) + x @ model.proj.delta_weight().t(), atol=1e-6, rtol=1e-6)


def test_branch_agrees_with_delta_weight():
    model = wrapped(nn.Linear(16, 12), r=5, lora_alpha=3.0)
    randomize_adapters(model)
    x = torch.randn(6, 16)
    torch.testing.assert_close(model.proj.branch(x), x @ model.proj.delta_weight().t(), atol=1e-6, rtol=1e-6)


def test_trainable_count_and_summary_line():
    model = tiny_llama()
    peftlab.wrap(model, "lora", r=4, target_modules=["q_proj", "v_proj"])
    # q: 32->32, v: 32->16 (2 kv heads of 8), two layers
    expected = 2 * (4 * (32 + 32) + 4 * (32 + 16))
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected
    total = sum(p.numel() for p in model.parameters())
    assert peftlab.trainable_summary(model) == (
        f"trainable params: {expected:,d} || all params: {total:,d} || trainable%: {100 * expected / total:.4f}"
    )


def test_gaussian_init_and_disable():
    model = wrapped(nn.Linear(64, 12), r=4, init_lora_weights="gaussian")
    assert model.proj.lora_A.std().item() == pytest.approx(1 / 4, rel=0.25)
    randomize_adapters(model)
    x = torch.randn(3, 64)
    model.proj.enabled = False
    assert torch.equal(model(x), model.proj.base_layer(x))


@pytest.mark.parametrize("kwargs, message", [
    ({"r": 0}, "r must be an integer >= 1"),
    ({"lora_dropout": 1.0}, r"lora_dropout must be a number in \[0, 1\), got 1.0"),
    ({"lora_alpha": -1}, "lora_alpha must be a number > 0, got -1"),
    ({"init_lora_weights": "pissa"}, "init_lora_weights must be one of True, False, gaussian, got 'pissa'"),
    ({"rank_pattern": {"q_proj": -2}}, "rank_pattern must be a mapping of integers >= 0"),
    ({"target_modules": 3}, "target_modules must be a string or a list of strings, got 3"),
    ({"r": True}, "r must be an integer, got True"),
    ({"lora_alpha": float("nan")}, "lora_alpha must be a finite number, got nan"),
])
def test_config_errors(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        peftlab.get_config("lora", **kwargs)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("four_bit", [False, True])
def test_merged_model_saves_and_loads_in_its_own_architecture(arch, four_bit, tmp_path):
    """merge -> save_pretrained -> from_pretrained gives base + adapter's logits for nn.Linear and
    GPT-2 Conv1D bases, full precision or 4-bit (merged onto the dequantized weights)."""
    from transformers import AutoModelForCausalLM

    (tiny_llama if arch == "llama" else tiny_gpt2)().save_pretrained(tmp_path / "base")
    model = peftlab.load_model(str(tmp_path / "base"), "causal-lm", load_in_4bit=four_bit)
    peftlab.wrap(model, "lora", r=4)
    randomize_adapters(model)
    x = tokens()
    model.eval()
    expected = model(x).logits
    merged = peftlab.merge(model)
    assert not any(peftlab.quant.is_4bit(m) for m in merged.modules())
    merged.save_pretrained(tmp_path / "merged")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert getattr(loaded.config, "quantization_config", None) is None
    torch.testing.assert_close(loaded(x).logits, expected, atol=1e-4, rtol=1e-4)
