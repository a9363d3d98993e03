"""Several named adapters on one model (PEFT's names and layout): switching, training only the
active one, deleting, saving and loading all of them (also from and to PEFT), weighted
combinations against PEFT's add_weighted_adapter and their exactness, and mixed-adapter batches."""
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

import peftlab
from peftlab.adapters.inject import adapters_of

from cases import CASES
from conftest import randomize_adapters, tiny_llama, tokens
from train_job import lm_dataset

METHODS = sorted(CASES)


def two_adapters(first="lora", second="adalora", seed=1):
    """A model with `first` as "default" (active) and `second` as "b", both non-trivial."""
    model = peftlab.wrap(tiny_llama(), first, **CASES[first].config)
    peftlab.wrap(model, second, adapter_name="b", **CASES[second].config)
    for i, state in enumerate(adapters_of(model).states.values()):
        peftlab.set_adapter(model, state.name)
        randomize_adapters(model, seed=seed + i)
    peftlab.set_adapter(model, "default")
    return model


def alone(method, seed):
    model = peftlab.wrap(tiny_llama(), method, **CASES[method].config)
    randomize_adapters(model, seed=seed)
    return model


@pytest.mark.parametrize("second", ["adalora", "sara", "randlora"])
@torch.no_grad()
def test_each_adapter_computes_as_if_it_were_alone_and_switching_copies_nothing(second):
    model, x = two_adapters("lora", second), tokens()
    assert peftlab.adapter_names(model) == ["default", "b"] and peftlab.active_adapter(model) == "default"
    weights = {p.data_ptr() for p in model.parameters()}
    torch.testing.assert_close(model(x).logits, alone("lora", 1)(x).logits, rtol=0, atol=0)
    peftlab.set_adapter(model, "b")
    torch.testing.assert_close(model(x).logits, alone(second, 2)(x).logits, rtol=0, atol=0)
    b_parameters = {id(p) for layer in adapters_of(model).states["b"].layers.values()
                    for p in layer.adapter_parameters().values()}
    assert {id(p) for p in model.parameters() if p.requires_grad} == b_parameters
    with peftlab.disable_adapters(model):
        assert torch.equal(model(x).logits, tiny_llama()(x).logits)
    peftlab.set_adapter(model, "default")
    torch.testing.assert_close(model(x).logits, alone("lora", 1)(x).logits, rtol=0, atol=0)
    base = {p.data_ptr() for p in peftlab.unwrap(model).parameters()}
    assert base <= weights  # the base weights were never copied
    assert torch.equal(model(x).logits, tiny_llama()(x).logits)


def test_only_the_active_adapter_trains_and_only_its_controller_runs(tmp_path):
    model = two_adapters("lora", "adalora")
    peftlab.set_adapter(model, "b")
    lora_before = {n: t.clone() for n, t in peftlab.io.adapter_state_dict(model, "default").items()}
    b_before = {n: t.clone() for n, t in peftlab.io.adapter_state_dict(model, "b").items()}
    config = peftlab.TrainConfig(output_dir=str(tmp_path), max_steps=20, learning_rate=1e-2,
                                 per_device_train_batch_size=4, disable_tqdm=True, logging_steps=1)
    peftlab.Trainer(model, config, lm_dataset()).train()
    for name, tensor in peftlab.io.adapter_state_dict(model, "default").items():
        assert torch.equal(tensor, lora_before[name]), name
    after = peftlab.io.adapter_state_dict(model, "b")
    assert any(not torch.equal(after[n], b_before[n]) for n in b_before if n in after)
    state = adapters_of(model).states["b"]
    assert sum(layer.rank for layer in state.layers.values()) == 2 * len(state.layers)  # AdaLoRA's budget ran
    # the run directory holds the trained adapter, AdaLoRA, at its root
    assert peftlab.io.read_config(tmp_path)[0].name == "adalora"


def test_delete_and_bad_names():
    model, x = two_adapters(), tokens()
    with pytest.raises(KeyError, match="no adapter named 'c'.*'default', 'b'"):
        peftlab.set_adapter(model, "c")
    with pytest.raises(ValueError, match="already has an adapter named 'b'"):
        peftlab.wrap(model, "lora", adapter_name="b")
    for bad in ("", "a/b", "x.y", "__base__"):
        with pytest.raises(ValueError, match="not usable"):
            peftlab.wrap(model, "lora", adapter_name=bad)
    peftlab.delete_adapter(model, "default")  # the active one: the first remaining takes over
    assert peftlab.adapter_names(model) == ["b"] and peftlab.active_adapter(model) == "b"
    torch.testing.assert_close(model(x).logits, alone("adalora", 2)(x).logits, rtol=0, atol=0)
    with pytest.raises(ValueError, match="only adapter.*unwrap"):
        peftlab.delete_adapter(model, "b")
    layer = next(iter(adapters_of(model).current.layers.values()))
    layer.merge()
    with pytest.raises(RuntimeError, match="merged"):
        peftlab.wrap(model, "lora", adapter_name="c")


@torch.no_grad()
def test_all_adapters_save_in_peft_layout_and_load_back(tmp_path):
    model, x = two_adapters("lora", "sara"), tokens()
    expected = {}
    for name in ("default", "b"):
        peftlab.set_adapter(model, name)
        expected[name] = model(x).logits
    peftlab.save_adapter(model, tmp_path)
    assert (tmp_path / "adapter_config.json").is_file() and (tmp_path / "b" / "adapter_config.json").is_file()
    loaded = peftlab.load_adapter(tiny_llama(), tmp_path)
    assert peftlab.adapter_names(loaded) == ["default", "b"] and peftlab.active_adapter(loaded) == "default"
    for name in ("default", "b"):
        peftlab.set_adapter(loaded, name)
        torch.testing.assert_close(loaded(x).logits, expected[name], rtol=1e-5, atol=1e-6)
    # one adapter, under a name, beside others; a damaged second adapter leaves the model as it was
    peftlab.load_adapter(loaded, tmp_path / "b", adapter_name="again")
    assert peftlab.adapter_names(loaded) == ["default", "b", "again"]
    (tmp_path / "b" / "adapter_model.safetensors").write_bytes(b"damaged")
    fresh = tiny_llama()
    with pytest.raises(ValueError, match="b/peftlab.json|cannot be read|not the file"):
        peftlab.load_adapter(fresh, tmp_path)
    assert not hasattr(fresh, "peftlab") and torch.equal(fresh(x).logits, tiny_llama()(x).logits)


@torch.no_grad()
def test_peft_multi_adapter_directories_cross_over_both_ways(tmp_path):
    x = tokens()
    theirs = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    theirs.add_adapter("b", LoraConfig(r=2, lora_alpha=2, target_modules=["up_proj"]))
    gen = torch.Generator().manual_seed(0)
    for name, p in theirs.named_parameters():
        if "lora_" in name:
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    expected = {}
    for name in ("default", "b"):
        theirs.set_adapter(name)
        expected[name] = theirs(x).logits
    theirs.save_pretrained(tmp_path / "peft")
    ours = peftlab.load_adapter(tiny_llama(), tmp_path / "peft")
    for name in ("default", "b"):
        peftlab.set_adapter(ours, name)
        torch.testing.assert_close(ours(x).logits, expected[name], atol=1e-6, rtol=1e-5)
    peftlab.save_adapter(ours, tmp_path / "ours")
    back = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "ours"))
    back.load_adapter(str(tmp_path / "ours" / "b"), adapter_name="b")
    for name in ("default", "b"):
        back.set_adapter(name)
        torch.testing.assert_close(back(x).logits, expected[name], atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------------ weighted combinations
@pytest.mark.parametrize("mode", ["cat", "linear", "svd"])
@torch.no_grad()
def test_combinations_equal_peft_add_weighted_adapter(mode):
    x, weights = tokens(batch=3), [0.7, -1.3]
    ours = peftlab.wrap(tiny_llama(), "lora", r=4, lora_alpha=8, target_modules=("q_proj", "v_proj"))
    peftlab.wrap(ours, "lora", r=4, lora_alpha=4, target_modules=("q_proj", "down_proj"), adapter_name="b")
    theirs = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    theirs.add_adapter("b", LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "down_proj"]))
    gen = torch.Generator().manual_seed(0)
    for state in adapters_of(ours).states.values():
        for name, layer in state.layers.items():
            peft_layer = theirs.base_model.model.get_submodule(name)
            for key in ("lora_A", "lora_B"):
                value = torch.randn(getattr(layer, key).shape, generator=gen)
                getattr(layer, key).copy_(value)
                getattr(peft_layer, key)[state.name].weight.copy_(value)
    peftlab.add_weighted_adapter(ours, ["default", "b"], weights, "mix", combination_type=mode)
    theirs.add_weighted_adapter(["default", "b"], weights, "mix", combination_type=mode)
    peftlab.set_adapter(ours, "mix")
    theirs.set_adapter("mix")
    torch.testing.assert_close(ours(x).logits, theirs(x).logits, atol=2e-5, rtol=1e-5)
    assert adapters_of(ours).current.method.name == "lora"


def deltas(model, name):
    return {n: layer.delta_weight() for n, layer in adapters_of(model).states[name].layers.items()}


@pytest.mark.parametrize("second", ["adalora", "increlora", "evalora", "allora"])
@torch.no_grad()
def test_cat_is_exact_for_every_low_rank_method(second):
    model = two_adapters("lora", second)
    peftlab.add_weighted_adapter(model, ["default", "b"], [0.5, 2.0], "mix", combination_type="cat")
    a, b, mix = deltas(model, "default"), deltas(model, "b"), deltas(model, "mix")
    for name in set(a) | set(b):
        expected = 0.5 * a.get(name, 0) + 2.0 * b.get(name, 0)
        torch.testing.assert_close(mix[name], expected, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_svd_is_exact_at_full_rank_and_the_best_approximation_below_it():
    model = two_adapters("lora", "sara")
    peftlab.add_weighted_adapter(model, ["default", "b"], [1.0, -0.5], "full", combination_type="svd", svd_rank=64)
    peftlab.add_weighted_adapter(model, ["default", "b"], [1.0, -0.5], "low", combination_type="svd", svd_rank=3)
    a, b = deltas(model, "default"), deltas(model, "b")
    for name, full in deltas(model, "full").items():
        expected = a.get(name, 0) - 0.5 * b.get(name, 0)
        torch.testing.assert_close(full, expected, atol=1e-5, rtol=1e-4)
        tail = torch.linalg.svdvals(expected)[3:]   # Eckart–Young: the error is the dropped singular values
        error = (deltas(model, "low")[name] - expected).norm()
        torch.testing.assert_close(error, tail.norm(), atol=1e-4, rtol=1e-3)


def test_combinations_refuse_what_has_no_meaning():
    model = two_adapters("lora", "adalora")
    with pytest.raises(ValueError, match="'linear' mixes the A and B factors.*'b' is adalora"):
        peftlab.add_weighted_adapter(model, ["default", "b"], [1, 1], "x", combination_type="linear")
    folded = two_adapters("lora", "randlora")
    with pytest.raises(ValueError, match="'cat' concatenates.*'b' is randlora.*svd"):
        peftlab.add_weighted_adapter(folded, ["default", "b"], [1, 1], "x", combination_type="cat")
    with pytest.raises(ValueError, match="randlora, whose update has no rank.*svd_rank"):
        peftlab.add_weighted_adapter(folded, ["default", "b"], [1, 1], "x", combination_type="svd")
    with pytest.raises(ValueError, match="one weight per adapter"):
        peftlab.add_weighted_adapter(model, ["default", "b"], [1], "x")
    with pytest.raises(ValueError, match="ties"):
        peftlab.add_weighted_adapter(model, ["default", "b"], [1, 1], "x", combination_type="ties")
    assert peftlab.adapter_names(model) == ["default", "b"]  # nothing half-added


# ------------------------------------------------------------------------ mixed-adapter batches
@pytest.mark.parametrize("second", METHODS)
@torch.no_grad()
def test_mixed_batch_rows_equal_each_adapter_alone(second):
    model = two_adapters("lora", second)
    names = ["b", "__base__", "default", "b"]
    x = tokens(batch=4)
    mixed = model(x, adapter_names=names).logits
    for name in ("default", "b"):
        peftlab.set_adapter(model, name)
        expected = model(x).logits
        rows = [i for i, n in enumerate(names) if n == name]
        torch.testing.assert_close(mixed[rows], expected[rows], atol=1e-5, rtol=1e-5)
    with peftlab.disable_adapters(model):
        torch.testing.assert_close(mixed[1], model(x).logits[1], atol=1e-6, rtol=1e-6)


@torch.no_grad()
def test_mixed_batch_generate_and_errors_leave_the_model_as_it_was():
    model, x = two_adapters("lora", "adalora"), tokens(batch=3)
    names = ["b", "default", "__base__"]
    out = model.generate(x, adapter_names=names, max_new_tokens=5, do_sample=False, pad_token_id=0)
    for i, name in enumerate(names):
        if name == "__base__":
            with peftlab.disable_adapters(model):
                expected = model.generate(x, max_new_tokens=5, do_sample=False, pad_token_id=0)
        else:
            peftlab.set_adapter(model, name)
            expected = model.generate(x, max_new_tokens=5, do_sample=False, pad_token_id=0)
        assert out[i].tolist() == expected[i].tolist()
    peftlab.set_adapter(model, "default")
    before = model(x).logits
    with pytest.raises(ValueError, match="does not have: \\['nope'\\]"):
        model(x, adapter_names=["nope", "b", "b"])
    with pytest.raises(ValueError, match="2 entries but the batch has 3 rows"):
        model(x, adapter_names=["b", "b"])
    assert torch.equal(model(x).logits, before)
