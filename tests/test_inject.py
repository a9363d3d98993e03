"""Target matching, exclusion, modules_to_save, and the errors users hit first."""
import re

import pytest
import torch
from torch import nn

import peftlab

from conftest import minilm_classifier, tiny_gpt2, tiny_llama, tokens


def wrapped_names(model):
    return sorted(model.peftlab.current.layers)


def test_suffix_list_matches_full_names_and_dotted_suffixes():
    model = peftlab.wrap(tiny_llama(), "lora", target_modules=["q_proj", "layers.1.mlp.up_proj"])
    assert wrapped_names(model) == ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.up_proj",
                                    "model.layers.1.self_attn.q_proj"]


def test_regex_string_is_matched_against_the_full_name():
    model = peftlab.wrap(tiny_llama(), "lora", target_modules=r".*\.0\.self_attn\.(k|v)_proj")
    assert wrapped_names(model) == ["model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj"]


def test_all_linear_skips_the_output_head_on_llama_and_gpt2():
    llama = peftlab.wrap(tiny_llama(), "lora")
    assert len(llama.peftlab.current.layers) == 2 * 7 and "lm_head" not in llama.peftlab.current.layers
    gpt2 = peftlab.wrap(tiny_gpt2(), "lora")
    assert all(re.fullmatch(r"transformer\.h\.\d\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)", n)
               for n in gpt2.peftlab.current.layers) and len(gpt2.peftlab.current.layers) == 8


def test_all_linear_on_bert_classifier_trains_the_head_in_full():
    model = minilm_classifier()
    peftlab.wrap(model, "lora", r=4)
    assert "classifier" not in model.peftlab.current.layers and "bert.pooler.dense" in model.peftlab.current.layers
    assert len(model.peftlab.current.layers) == 6 * 6 + 1  # q k v attn-out ffn-in ffn-out per layer, + pooler
    assert model.peftlab.current.modules_to_save == ["classifier"]
    assert model.classifier.weight.requires_grad and not model.bert.embeddings.word_embeddings.weight.requires_grad
    assert model.peftlab.current.config.modules_to_save == ("classifier",)


def test_exclude_modules_wins_over_targets():
    model = peftlab.wrap(tiny_llama(), "lora", exclude_modules=["down_proj", "layers.0.self_attn.q_proj"])
    names = wrapped_names(model)
    assert not any(n.endswith("down_proj") for n in names) and "model.layers.0.self_attn.q_proj" not in names
    assert "model.layers.1.self_attn.q_proj" in names


def test_only_adapters_and_saved_modules_are_trainable():
    model = peftlab.wrap(tiny_llama(), "lora", r=2, modules_to_save=["lm_head"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.{k}" for n, layer in model.peftlab.current.layers.items() for k in ("lora_A", "lora_B")} | {
        "lm_head.weight"}
    x = tokens()
    before = {n: p.clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    for _ in range(2):  # step 1 moves B only; step 2 moves A too
        model(x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == trainable


def test_tied_head_in_modules_to_save_leaves_the_embeddings_alone():
    model = tiny_gpt2()
    embeddings = model.transformer.wte.weight.clone()
    peftlab.wrap(model, "lora", modules_to_save=["lm_head"])
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)
    assert torch.equal(model.transformer.wte.weight, embeddings)


def test_wrapping_twice_under_one_name_is_an_error():
    model = peftlab.wrap(tiny_llama(), "lora")
    with pytest.raises(ValueError, match="already has an adapter named 'default'.*adapter_name=.*delete_adapter"):
        peftlab.wrap(model, "lora")


def test_no_match_lists_modules_that_exist():
    with pytest.raises(ValueError, match=r"matches no adaptable module\. Some that exist: model\.layers\.0\.self_attn\.q_proj"):
        peftlab.wrap(tiny_llama(), "lora", target_modules=["query", "value"])


def test_selecting_a_non_linear_module_is_an_error():
    with pytest.raises(TypeError, match=r"cannot adapt: model\.embed_tokens \(Embedding\)"):
        peftlab.wrap(tiny_llama(), "lora", target_modules=["embed_tokens"])


def test_unknown_modules_to_save_is_an_error():
    with pytest.raises(ValueError, match=r"modules_to_save names modules that do not exist: \['head'\]"):
        peftlab.wrap(tiny_llama(), "lora", modules_to_save=["head"])


def test_overrides_with_a_config_object_are_an_error():
    with pytest.raises(TypeError, match="overrides only with a method name"):
        peftlab.wrap(tiny_llama(), peftlab.get_config("lora"), r=4)


def test_controller_is_reachable_and_default_hooks_are_noops():
    model = peftlab.wrap(tiny_llama(), "lora")
    ctl = peftlab.controller(model)
    assert ctl.state_dict() == {} and ctl.report() == {} and ctl.penalty(0) == 0.0
    with pytest.raises(ValueError, match="no peftlab adapters"):
        peftlab.controller(nn.Linear(2, 2))


def test_an_empty_module_name_to_save_is_an_error():
    with pytest.raises(ValueError, match="modules_to_save has an empty name"):
        peftlab.wrap(tiny_llama(), "lora", modules_to_save=[""])
