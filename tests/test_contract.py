"""Oracles every method must pass, run over tests/cases.py (style-examples.md §e)."""
import pytest
import torch

import peftlab

from cases import CASES
from conftest import randomize_adapters, tiny_gpt2, tiny_llama, tokens

METHODS = sorted(CASES)


def wrapped(name, factory=tiny_llama):
    return peftlab.wrap(factory(), name, **CASES[name].config)


@pytest.mark.parametrize("name", METHODS)
def test_identity_at_init(name):
    x = tokens()
    assert torch.equal(wrapped(name)(x).logits, tiny_llama()(x).logits)


@pytest.mark.parametrize("name", METHODS)
def test_branch_agrees_with_delta_weight(name):
    model = wrapped(name)
    randomize_adapters(model)
    for layer in model.peftlab.current.layers.values():
        layer.eval()
        x = torch.randn(3, layer.in_features)
        torch.testing.assert_close(layer.branch(x), x @ layer.delta_weight().t(), atol=CASES[name].atol, rtol=1e-4)


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2], ids=["linear", "conv1d"])
def test_merge_round_trip(name, factory):
    model = wrapped(name, factory)
    randomize_adapters(model)
    x = tokens()
    expected = model(x).logits
    assert not torch.allclose(expected, factory()(x).logits, atol=1e-3)
    for layer in model.peftlab.current.layers.values():
        layer.merge()
    torch.testing.assert_close(model(x).logits, expected, atol=CASES[name].atol, rtol=1e-4)
    with pytest.raises(RuntimeError, match="already merged"):
        next(iter(model.peftlab.current.layers.values())).merge()
    for layer in model.peftlab.current.layers.values():
        layer.unmerge()
    base = peftlab.unwrap(model).state_dict()
    for key, value in factory().state_dict().items():
        torch.testing.assert_close(base[key], value, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("name", METHODS)
def test_one_step_changes_only_adapter_parameters(name):
    model = wrapped(name)
    adapter = {id(p) for layer in model.peftlab.current.layers.values() for p in layer.adapter_parameters().values()}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == adapter
    before = {n: p.clone() for n, p in model.named_parameters()}
    x = tokens()
    model(x, labels=x).loss.backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0).step()
    for n, p in model.named_parameters():
        if id(p) not in adapter:
            assert torch.equal(p, before[n]), n
    moved = [n for n, p in model.named_parameters() if id(p) in adapter and not torch.equal(p, before[n])]
    assert moved, "the step moved the adapter"


@pytest.mark.parametrize("name", METHODS)
def test_save_load_round_trip(name, tmp_path):
    model = wrapped(name)
    randomize_adapters(model)
    x = tokens()
    expected = model(x).logits
    peftlab.save_adapter(model, tmp_path)
    loaded = peftlab.load_adapter(tiny_llama(), tmp_path)
    assert type(loaded.peftlab.current.config) is type(model.peftlab.current.config)
    torch.testing.assert_close(loaded(x).logits, expected, atol=CASES[name].atol, rtol=1e-5)


@pytest.mark.parametrize("name", METHODS)
def test_export_as_plain_lora_gives_identical_outputs_in_peft(name, tmp_path):
    from peft import PeftModel

    model = wrapped(name)
    randomize_adapters(model)
    x = tokens()
    expected = model(x).logits
    errors = peftlab.io.export_lora(model, tmp_path, rank=CASES[name].export_rank)
    assert max(errors.values()) < 1e-5
    theirs = PeftModel.from_pretrained(tiny_llama(), str(tmp_path)).eval()
    torch.testing.assert_close(theirs(x).logits, expected, atol=CASES[name].atol, rtol=1e-4)


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("four_bit", [False, True], ids=["float", "nf4"])
def test_disabled_adapters_give_exactly_the_base_and_come_back(name, four_bit, tmp_path):
    """Bitwise the base's outputs (SaRA's in-place sparse update and RandLoRA's folded one included, and
    a classification head saved with the adapter), then the adapter's again, also after an exception."""
    from conftest import minilm_classifier

    def build():
        if four_bit:
            tiny_llama().save_pretrained(tmp_path / "base")
            return peftlab.load_model(str(tmp_path / "base"), "causal-lm", load_in_4bit=True).eval()
        return tiny_llama().eval()

    base, model = build(), peftlab.wrap(build(), name, **CASES[name].config).eval()
    randomize_adapters(model)
    x = tokens()
    adapted = model(x).logits
    with peftlab.disable_adapters(model):
        assert torch.equal(model(x).logits, base(x).logits)
    assert torch.equal(model(x).logits, adapted)
    with pytest.raises(RuntimeError, match="inside"):
        with peftlab.disable_adapters(model):
            raise RuntimeError("inside")
    assert torch.equal(model(x).logits, adapted)
    if name == "lora":  # a trained head (modules_to_save) is the original again while disabled
        classifier = peftlab.wrap(minilm_classifier(), "lora", r=2)
        with torch.no_grad():
            classifier.classifier.weight.add_(1.0)
        ids = {"input_ids": torch.tensor([[101, 2204, 102]])}
        with peftlab.disable_adapters(classifier):
            assert torch.equal(classifier(**ids).logits, minilm_classifier()(**ids).logits)
