"""The registry: names, aliases, configs, and errors that name the closest valid choice."""
import dataclasses

import pytest
from torch import nn

import peftlab
from peftlab.adapters import config, layer, registry

from cases import CASES


def test_every_registered_method_has_a_case_config_layer_and_peft_type():
    assert sorted(CASES) == peftlab.list_adapters(), "add new methods to tests/cases.py"
    for name in peftlab.list_adapters():
        method = registry.get_method(name)
        assert dataclasses.is_dataclass(method.config) and issubclass(method.layer, layer.AdapterLayer)
        assert method.peft_type and isinstance(peftlab.get_config(name, **CASES[name].config), method.config)


def test_unknown_adapter_names_the_closest():
    with pytest.raises(ValueError, match=r"unknown adapter 'lorra'; did you mean 'lora'\? Known adapters: .*lora"):
        peftlab.get_config("lorra")


def test_unknown_field_names_the_closest():
    with pytest.raises(TypeError, match=r"lora has no config field 'lora_alfa'; did you mean 'lora_alpha'\?"):
        peftlab.get_config("lora", lora_alfa=8)


def test_overrides_are_applied_and_configs_are_frozen():
    cfg = peftlab.get_config("lora", r=16, target_modules=["q_proj"])
    assert cfg.r == 16 and cfg.target_modules == ("q_proj",)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.r = 4


def test_registration_is_validated():
    with pytest.raises(ValueError, match="lowercase identifier"):
        registry.register("Bad-Name", layer=layer.AdapterLayer, peft_type="X")
    with pytest.raises(ValueError, match="'lora' is already registered"):
        @registry.register("lora", layer=layer.AdapterLayer, peft_type="X")
        @dataclasses.dataclass(frozen=True, kw_only=True)
        class Again(config.AdapterConfig):
            pass
    with pytest.raises(TypeError, match="must be a dataclass extending AdapterConfig"):
        registry.register("fresh", layer=layer.AdapterLayer, peft_type="X")(nn.Linear)


def test_every_per_method_table_in_the_tests_covers_the_registry():
    """A new method cannot slip past the shared tests: every table keyed by method is complete."""
    from test_trainer import QLORA
    from train_job import JOB_CONFIGS

    from cases import CASES

    registered = set(peftlab.list_adapters())
    assert set(CASES) == set(QLORA) == set(JOB_CONFIGS) == registered
