"""PEFT-format save/load: cross-over with HF PEFT in both directions, strictness, atomic writes."""
import json
import os
import warnings

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

import peftlab
from peftlab.io import CONFIG_NAME, PEFTLAB_NAME, WEIGHTS_NAME

from conftest import randomize_adapters, tiny_gpt2, tiny_llama, tokens

FACTORIES = {"llama": tiny_llama, "gpt2": tiny_gpt2}


@pytest.mark.parametrize("arch", FACTORIES)
@pytest.mark.parametrize("rslora", [False, True])
def test_peftlab_lora_loads_in_peft_with_identical_logits(arch, rslora, tmp_path):
    make = FACTORIES[arch]
    saved = ["lm_head"] if arch == "llama" else []  # GPT-2 ties its head to the embeddings
    model = peftlab.wrap(make(), "lora", r=4, lora_alpha=12, use_rslora=rslora, modules_to_save=saved)
    randomize_adapters(model)
    with torch.no_grad():
        model.lm_head.weight.mul_(1.5 if saved else 1.0)  # a trained head travels with the adapter
    x = tokens()
    expected = model(x).logits
    peftlab.save_adapter(model, tmp_path)

    assert sorted(os.listdir(tmp_path)) == sorted([CONFIG_NAME, WEIGHTS_NAME, PEFTLAB_NAME])
    keys = load_file(str(tmp_path / WEIGHTS_NAME)).keys()
    assert all(k.startswith("base_model.model.") for k in keys)
    assert not any("base_layer" in k or "default" in k for k in keys), "no base weights, no adapter name"

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # PEFT must not complain about our config
        warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*|.*is_gradient_checkpointing.*")
        peft_model = PeftModel.from_pretrained(make(), str(tmp_path)).eval()
    torch.testing.assert_close(peft_model(x).logits, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", FACTORIES)
def test_peft_lora_loads_in_peftlab_with_identical_logits(arch, tmp_path):
    make = FACTORIES[arch]
    targets = ["q_proj", "v_proj", "down_proj"] if arch == "llama" else ["c_attn", "c_fc"]
    cfg = LoraConfig(r=6, lora_alpha=10, target_modules=targets, init_lora_weights=False, fan_in_fan_out=arch == "gpt2",
                     rank_pattern={"v_proj" if arch == "llama" else "c_fc": 3})
    peft_model = get_peft_model(make(), cfg)
    x = tokens()
    # one real training step so A and B are both non-trivial
    opt = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=0.1)
    peft_model(x, labels=x).loss.backward()
    opt.step()
    peft_model.eval()
    expected = peft_model(x).logits
    peft_model.save_pretrained(str(tmp_path))

    model = peftlab.load_adapter(make(), tmp_path)
    torch.testing.assert_close(model(x).logits, expected, atol=1e-5, rtol=1e-5)
    ranks = {name.rsplit(".", 1)[-1]: layer.r for name, layer in model.peftlab.current.layers.items()}
    assert ranks == ({"q_proj": 6, "v_proj": 3, "down_proj": 6} if arch == "llama" else {"c_attn": 6, "c_fc": 3})


def test_round_trip_reproduces_outputs_and_merge_after_load(tmp_path):
    model = peftlab.wrap(tiny_llama(), "lora", r=4, rank_pattern={"o_proj": 2}, alpha_pattern={"q_proj": 3.0})
    randomize_adapters(model)
    x = tokens()
    expected = model(x).logits
    peftlab.save_adapter(model, tmp_path)
    loaded = peftlab.load_adapter(tiny_llama(), tmp_path)
    assert torch.equal(loaded(x).logits, expected)
    torch.testing.assert_close(peftlab.merge(loaded)(x).logits, expected, atol=1e-5, rtol=1e-5)


def _saved(tmp_path):
    model = peftlab.wrap(tiny_llama(), "lora", r=4, target_modules=["q_proj", "v_proj"])
    randomize_adapters(model)
    peftlab.save_adapter(model, tmp_path)
    return tmp_path


def _edit_json(path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def _as_written_by_peft(path, tensors):
    """Replace the weights and drop peftlab.json, as an adapter another tool wrote would look."""
    save_file(tensors, str(path / WEIGHTS_NAME))
    (path / PEFTLAB_NAME).unlink()


def test_missing_keys_are_an_error_that_lists_them(tmp_path):
    path = _saved(tmp_path)
    tensors = load_file(str(path / WEIGHTS_NAME))
    dropped = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    del tensors[dropped]
    _as_written_by_peft(path, tensors)
    base = tiny_llama()
    with pytest.raises(ValueError, match=r"missing keys \(1\): " + dropped.replace(".", r"\.")):
        peftlab.load_adapter(base, path)
    assert not hasattr(base, "peftlab"), "a failed load must leave the base model untouched"
    assert not any("LoRA" in type(m).__name__ for m in base.modules())


def test_unexpected_keys_are_an_error(tmp_path):
    path = _saved(tmp_path)
    tensors = load_file(str(path / WEIGHTS_NAME))
    tensors["base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"] = torch.zeros(4, 32)
    _as_written_by_peft(path, tensors)
    with pytest.raises(ValueError, match=r"unexpected keys \(1\): .*up_proj\.lora_A\.weight"):
        peftlab.load_adapter(tiny_llama(), path)


def test_base_model_that_does_not_fit_is_an_error(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    path = _saved(tmp_path)
    wider = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(ValueError, match=r"shapes that do not fit.*file \(4, 32\) vs model \(4, 48\)"):
        peftlab.load_adapter(wider, path)
    from conftest import tiny_gpt2
    with pytest.raises(ValueError, match="matches no adaptable module"):
        peftlab.load_adapter(tiny_gpt2(), path)


def test_newer_format_is_an_error(tmp_path):
    path = _saved(tmp_path)
    _edit_json(path / PEFTLAB_NAME, format_version=99)
    with pytest.raises(ValueError, match=r"format_version=99, newer than this peftlab reads \(1\); upgrade"):
        peftlab.load_adapter(tiny_llama(), path)


def test_unknown_peft_keys_warn_and_risky_features_raise(tmp_path):
    path = _saved(tmp_path)
    (path / PEFTLAB_NAME).unlink()  # as if PEFT had written it
    _edit_json(path / CONFIG_NAME, some_future_option={"x": 1})
    with pytest.warns(UserWarning, match="ignoring keys peftlab does not know: some_future_option"):
        peftlab.load_adapter(tiny_llama(), path)
    _edit_json(path / CONFIG_NAME, use_dora=True)
    with pytest.raises(ValueError, match="use_dora=True.*peft.PeftModel.from_pretrained"):
        peftlab.load_adapter(tiny_llama(), path)
    _edit_json(path / CONFIG_NAME, use_dora=False, peft_type="LOHA")
    with pytest.raises(ValueError, match="peft_type='LOHA'"):
        peftlab.load_adapter(tiny_llama(), path)


def test_missing_files_and_pickles_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="no adapter_config.json"):
        peftlab.load_adapter(tiny_llama(), tmp_path / "nowhere")
    path = _saved(tmp_path)
    (path / WEIGHTS_NAME).rename(path / "adapter_model.bin")
    with pytest.raises(FileNotFoundError, match="never loads pickled adapter_model.bin"):
        peftlab.load_adapter(tiny_llama(), path)
    (path / CONFIG_NAME).write_text("{not json")
    (path / "adapter_model.bin").rename(path / WEIGHTS_NAME)
    with pytest.raises(ValueError, match="is not valid JSON"):
        peftlab.load_adapter(tiny_llama(), path)


def test_interrupted_save_leaves_the_previous_adapter_intact(tmp_path, monkeypatch):
    path = _saved(tmp_path)
    before = {name: (path / name).read_bytes() for name in os.listdir(path)}
    model = peftlab.wrap(tiny_llama(), "lora", r=4, target_modules=["q_proj", "v_proj"])

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr("peftlab.io.save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        peftlab.save_adapter(model, path)
    after = {name: (path / name).read_bytes() for name in os.listdir(path)}
    assert after == before, "no temp file left behind, no file replaced"


def test_an_adapter_directory_is_loaded_only_as_the_set_it_was_written_as(tmp_path):
    """A crash between writing the weights and the config leaves new weights beside the old config
    and manifest: refused, instead of loading with the wrong scale."""
    path = _saved(tmp_path)
    model = peftlab.wrap(tiny_llama(), "lora", r=4, lora_alpha=32, target_modules=["q_proj", "v_proj"])
    randomize_adapters(model, seed=5)
    save_file(peftlab.io.adapter_state_dict(model), str(path / WEIGHTS_NAME))  # the weights only: then the crash
    with pytest.raises(ValueError, match="not the file .*peftlab.json was written with"):
        peftlab.load_adapter(tiny_llama(), path)


@pytest.mark.parametrize("damage, message", [
    ("nan", "holds NaN/inf values in 4 tensors"),
    ("truncate", "cannot be read .* truncated or not safetensors"),
    ("no_method", "names no method"),
    ("wrong_method", "says method 'sara' .* but .* has peft_type 'LORA'"),
])
def test_damaged_adapters_are_refused_with_the_file_named(damage, message, tmp_path):
    path = _saved(tmp_path)
    if damage == "nan":
        tensors = {k: v * float("nan") if "lora_B" in k else v for k, v in load_file(str(path / WEIGHTS_NAME)).items()}
        _as_written_by_peft(path, tensors)
    elif damage == "truncate":
        data = (path / WEIGHTS_NAME).read_bytes()
        (path / WEIGHTS_NAME).write_bytes(data[: len(data) // 2])
        (path / PEFTLAB_NAME).unlink()
    else:
        sidecar = json.loads((path / PEFTLAB_NAME).read_text())
        sidecar.pop("method") if damage == "no_method" else sidecar.update(method="sara")
        (path / PEFTLAB_NAME).write_text(json.dumps(sidecar))
    with pytest.raises(ValueError, match=message):
        peftlab.load_adapter(tiny_llama(), path)


def test_nothing_non_finite_is_ever_written(tmp_path):
    with pytest.raises(ValueError, match="lora_alpha must be a finite number, got nan"):
        peftlab.wrap(tiny_llama(), "lora", lora_alpha=float("nan"))
    model = peftlab.wrap(tiny_llama(), "lora", r=4)
    with torch.no_grad():
        next(iter(model.peftlab.current.layers.values())).lora_A.fill_(float("inf"))
    with pytest.raises(ValueError, match="refusing to save an adapter with NaN/inf values"):
        peftlab.save_adapter(model, tmp_path / "out")
    assert not (tmp_path / "out" / WEIGHTS_NAME).exists()


# ------------------------------------------------------------------- files HF PEFT writes itself
def tiny_classifier(seed=0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    return BertForSequenceClassification(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1,
                                                    num_attention_heads=2, intermediate_size=64, num_labels=3)).eval()


@pytest.mark.parametrize("kind", ["lora", "eva", "adalora"])
def test_peft_sequence_classification_adapters_load_with_equal_outputs(kind, tmp_path):
    """PEFT writes modules_to_save=["classifier", "score"] for SEQ_CLS, one of which never exists."""
    from peft import AdaLoraConfig, EvaConfig

    configs = {"lora": LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query", "value"]),
               "eva": LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query", "value"],
                                 init_lora_weights="eva", eva_config=EvaConfig()),
               "adalora": AdaLoraConfig(task_type="SEQ_CLS", init_r=4, target_r=2, total_step=10,
                                        target_modules=["query", "value"])}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = get_peft_model(tiny_classifier(), configs[kind]).eval()
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.normal_(0, 0.2)
    theirs.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert set(saved["modules_to_save"]) >= {"classifier", "score"}
    if kind == "adalora":
        assert saved["tinit"] == 0 and saved["tfinal"] == 0, "PEFT's default schedule"
    ours = peftlab.load_adapter(tiny_classifier(), tmp_path).eval()
    x = torch.randint(0, 64, (2, 7))
    torch.testing.assert_close(ours(x).logits, theirs(x).logits, atol=1e-5, rtol=1e-5)


def test_peft_randlora_files_import_and_keep_their_bases(tmp_path):
    from peft import RandLoraConfig

    torch.manual_seed(0)
    theirs = get_peft_model(tiny_llama(), RandLoraConfig(r=8, randlora_alpha=64, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "randlora_lambda" in name or "randlora_gamma" in name:
                p.normal_(0, 0.05)
    theirs.eval().save_pretrained(tmp_path / "peft")
    x = tokens()
    ours = peftlab.load_adapter(tiny_llama(), tmp_path / "peft").eval()
    assert ours.peftlab.current.method.name == "randlora"
    torch.testing.assert_close(ours(x).logits, theirs(x).logits, atol=1e-5, rtol=1e-5)
    peftlab.save_adapter(ours, tmp_path / "ours")  # PEFT's bases cannot be regenerated: they travel along
    again = peftlab.load_adapter(tiny_llama(), tmp_path / "ours").eval()
    torch.testing.assert_close(again(x).logits, theirs(x).logits, atol=1e-5, rtol=1e-5)


def test_peft_reads_peftlab_adalora_without_unknown_keys(tmp_path):
    from peft import PeftConfig

    peftlab.save_adapter(peftlab.wrap(tiny_llama(), "adalora", init_r=4, target_r=2, total_step=10), tmp_path)
    assert "init_like_lora" not in json.loads((tmp_path / CONFIG_NAME).read_text())
    assert json.loads((tmp_path / PEFTLAB_NAME).read_text())["fields"] == {"init_like_lora": True}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        PeftConfig.from_pretrained(str(tmp_path))
    assert peftlab.load_adapter(tiny_llama(), tmp_path).peftlab.current.config.init_like_lora is True


def test_increlora_files_from_before_the_fixed_scale_load_at_the_scale_they_trained_at(tmp_path):
    model = peftlab.wrap(tiny_llama(), "increlora", init_r=2, target_r=4, total_step=10)
    randomize_adapters(model)
    peftlab.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    del config["scale_by_live_rank"]  # as written before the key existed (scale alpha / live rank)
    (tmp_path / CONFIG_NAME).write_text(json.dumps(config))
    (tmp_path / PEFTLAB_NAME).unlink()
    loaded = peftlab.load_adapter(tiny_llama(), tmp_path)
    layer = next(iter(loaded.peftlab.current.layers.values()))
    assert loaded.peftlab.current.config.scale_by_live_rank and layer.scale == pytest.approx(16 / (layer.rank + 1e-5))
