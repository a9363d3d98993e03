"""The fused LoRA-family kernel against the eager path: outputs, gradients, dropout, 4-bit bases,
shared-input groups, saved memory, and the fallback notice."""
from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn

import peftlab
from peftlab import kernels
from peftlab.adapters.layer import AdapterLayer
from peftlab.adapters.registry import get_method
from peftlab.settings import field_names as config_fields
from peftlab.kernels import fusion

from cases import CASES
from conftest import linear4bit, randomize_adapters, tiny_gpt2, tiny_llama, tokens

# the methods the fused kernel runs (their layers describe a low-rank product), and those with dropout
LORA_FAMILY = [m for m in CASES if get_method(m).layer.low_rank_product is not AdapterLayer.low_rank_product]
WITH_DROPOUT = [m for m in LORA_FAMILY if "lora_dropout" in config_fields(get_method(m).config)]


def fixed_mask(shape: torch.Size, p: float, device: torch.device) -> tuple[torch.Tensor, float]:
    """The same keep-mask for every call with the same shape, so fused and eager can share masks."""
    gen = torch.Generator().manual_seed(shape.numel())
    return torch.rand(shape, generator=gen) >= p, 1.0 / (1.0 - p)


class FixedDropout(nn.Module):
    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training:
            return x
        keep, scale = fixed_mask(x.shape, self.p, x.device)
        return x * keep * scale


def fused_and_eager(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    eager = copy.deepcopy(model)
    for layer in eager.peftlab.current.layers.values():
        layer.fusion = None
    return model, eager


def wrapped(method: str, build=tiny_llama, **overrides) -> nn.Module:
    model = peftlab.wrap(build(), method, **{**CASES[method].config, **overrides})
    randomize_adapters(model)
    for layer in model.peftlab.current.layers.values():
        if hasattr(layer, "set_scoring"):
            layer.set_scoring(False)  # IncreLoRA's growth phase needs its eager dense-ΔW score
    return model


def assert_same_training_step(fused: nn.Module, eager: nn.Module, x: torch.Tensor, atol: float = 1e-5) -> None:
    fused.train(), eager.train()
    for _ in range(2):  # the second pass runs with the groups' pending outputs already used once
        for model in (fused, eager):
            model.zero_grad(set_to_none=True)
        torch.manual_seed(0)  # the base model's own dropout (GPT-2) draws alike in both
        out_f = fused(x, labels=x)
        torch.manual_seed(0)
        out_e = eager(x, labels=x)
        torch.testing.assert_close(out_f.logits, out_e.logits, atol=atol, rtol=atol)
        out_f.loss.backward()
        out_e.loss.backward()
        grads = [(n, p.grad, q.grad) for (n, p), q in zip(fused.named_parameters(), eager.parameters())
                 if p.requires_grad]
        assert grads
        for name, g_f, g_e in grads:
            torch.testing.assert_close(g_f, g_e, atol=atol, rtol=atol, msg=name)


@pytest.mark.parametrize("method", LORA_FAMILY)
def test_fused_equals_eager_on_llama(method):
    fused, eager = fused_and_eager(wrapped(method))
    groups = {len(g) for g in next(iter(fused.peftlab.current.layers.values())).fusion.groups.values()}
    assert groups == {2, 3}  # q/k/v and gate/up run as stacked groups
    assert_same_training_step(fused, eager, tokens())


@pytest.mark.parametrize("method", WITH_DROPOUT)
def test_fused_equals_eager_with_dropout(method, monkeypatch):
    monkeypatch.setattr(fusion, "dropout_keep_mask", fixed_mask)
    fused, eager = fused_and_eager(wrapped(method, lora_dropout=0.1))
    for layer in eager.peftlab.current.layers.values():
        layer.dropout = FixedDropout(0.1)
    assert_same_training_step(fused, eager, tokens())
    fused.eval(), eager.eval()  # no dropout in eval
    torch.testing.assert_close(fused(tokens()).logits, eager(tokens()).logits, atol=1e-5, rtol=1e-5)


def test_fused_equals_eager_on_gpt2_conv1d():
    fused, eager = fused_and_eager(wrapped("lora", tiny_gpt2))
    assert_same_training_step(fused, eager, tokens())


@pytest.mark.parametrize("method", LORA_FAMILY)
def test_fused_equals_eager_on_4bit_base(method):
    torch.manual_seed(0)
    model = nn.Sequential(linear4bit(64, 32), nn.GELU(), linear4bit(32, 16, seed=1))
    model = peftlab.wrap(model, method, **CASES[method].config, target_modules=["0", "2"])
    randomize_adapters(model)
    for layer in model.peftlab.current.layers.values():
        if hasattr(layer, "set_scoring"):
            layer.set_scoring(False)
    fused, eager = fused_and_eager(model)
    x = torch.randn(3, 5, 64, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    y_f, y_e = fused(x), eager(x2)
    torch.testing.assert_close(y_f, y_e, atol=1e-5, rtol=1e-5)
    y_f.square().sum().backward()
    y_e.square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, atol=1e-5, rtol=1e-5)
    for (name, p), q in zip(fused.named_parameters(), eager.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-5, msg=name)


def saved_bytes(layer_output_fn) -> tuple[int, list[tuple[tuple[int, ...], torch.dtype]]]:
    """Bytes of tensors autograd keeps for backward (each storage once), and their shapes."""
    storages, shapes = {}, []

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        shapes.append((tuple(t.shape), t.dtype))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer_output_fn()
    return sum(storages.values()), shapes


def test_fused_keeps_a_byte_mask_not_a_dropped_copy():
    model = peftlab.wrap(nn.Sequential(nn.Linear(256, 256)), "lora", r=8, target_modules=["0"], lora_dropout=0.1)
    fused, eager = fused_and_eager(model.train())
    x = torch.randn(64, 256, requires_grad=True)
    fused_bytes, fused_shapes = saved_bytes(lambda: fused(x))
    eager_bytes, _ = saved_bytes(lambda: eager(x))
    floats_like_x = [s for s in fused_shapes if s == ((64, 256), torch.float32)]
    assert floats_like_x == [((64, 256), torch.float32)]          # x itself, nothing dropped
    assert ((64, 256), torch.bool) in fused_shapes                # the keep-mask, one byte per element
    assert fused_bytes < eager_bytes - 64 * 256 * 4               # at least one float copy of x fewer


def test_fused_4bit_keeps_no_dense_weight():
    model = peftlab.wrap(nn.Sequential(linear4bit(64, 48)), "lora", r=4, target_modules=["0"])
    x = torch.randn(5, 64, requires_grad=True)
    _, shapes = saved_bytes(lambda: model(x))
    assert not [s for s in shapes if s[0] in ((48, 64), (64, 48))], shapes


def test_dropout_mask_distribution_and_reproducibility():
    torch.manual_seed(0)
    keep, scale = kernels.dropout_keep_mask(torch.Size([1000, 1000]), 0.1, torch.device("cpu"))
    kept = keep.float().mean().item()
    assert abs(kept - 0.9) < 3e-3                         # 1e6 Bernoulli draws: std 3e-4
    assert abs(kept * scale - 1.0) < 3e-3                 # E[drop(x)] = x
    assert scale == pytest.approx(1 / 0.9, rel=1e-4)      # p rounded to 16 bits
    rows = keep.float().mean(1)
    assert rows.std() < 0.02                              # no stuck bit patterns across the tensor
    torch.manual_seed(0)
    again, _ = kernels.dropout_keep_mask(torch.Size([1000, 1000]), 0.1, torch.device("cpu"))
    assert torch.equal(keep, again)
    assert not torch.equal(keep, kernels.dropout_keep_mask(torch.Size([1000, 1000]), 0.1, torch.device("cpu"))[0])


def test_gradient_checkpointing_regenerates_the_same_masks():
    def run(checkpointing):
        model = wrapped("lora", lora_dropout=0.1).train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        torch.manual_seed(5)
        model(tokens(), labels=tokens()).loss.backward()
        return [p.grad for p in model.parameters() if p.requires_grad]

    for plain, recomputed in zip(run(False), run(True)):
        torch.testing.assert_close(plain, recomputed, atol=1e-6, rtol=1e-6)


class CrossAttention(nn.Module):
    """q reads one tensor, k and v another: named like a shared-input group, but not one."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16)

    def forward(self, x, memory):
        return self.q(x).sum(1) + (self.k(memory) * self.v(memory)).sum(1)


def test_a_group_whose_members_read_different_inputs_dissolves_and_stays_exact():
    torch.manual_seed(0)
    model = peftlab.wrap(CrossAttention(), "lora", r=4)
    randomize_adapters(model)
    fused, eager = fused_and_eager(model)
    assert len(fused.peftlab.current.layers["q"].fusion.groups) == 3
    x, memory = torch.randn(2, 3, 16), torch.randn(2, 5, 16)
    for _ in range(2):
        torch.testing.assert_close(fused(x, memory), eager(x, memory), atol=1e-6, rtol=1e-6)
    assert fused.peftlab.current.layers["q"].fusion.groups == {}


def test_bf16_autocast_runs_fused_in_bf16():
    fused, eager = fused_and_eager(wrapped("lora"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_f, y_e = fused(tokens()).logits, eager(tokens()).logits
    assert y_f.dtype == y_e.dtype
    torch.testing.assert_close(y_f.float(), y_e.float(), atol=0.05, rtol=0.05)


def test_fallback_notice_for_a_hooked_base(caplog):
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    calls = []
    model[0].register_forward_hook(lambda *a: calls.append(1))
    with caplog.at_level(logging.WARNING, logger="peftlab"):
        model = peftlab.wrap(model, "lora", r=2)
    notices = [r.getMessage() for r in caplog.records]
    assert len(notices) == 1 and "1 layer(s) use the eager path" in notices[0] and "forward hooks" in notices[0]
    assert model.peftlab.current.layers["0"].fusion is None and model.peftlab.current.layers["1"].fusion is not None
    model(torch.randn(2, 8))
    assert calls == [1]  # the hook still runs


def test_no_notice_when_every_layer_fuses(caplog):
    with caplog.at_level(logging.INFO, logger="peftlab"):
        peftlab.wrap(tiny_llama(), "lora", r=2)
    assert not caplog.records


def test_fused_false_is_rejected_for_folded_methods():
    with pytest.raises(ValueError, match="fused=False applies to the LoRA family; sara"):
        peftlab.wrap(tiny_llama(), "sara", total_step=10, fused=False)
    model = peftlab.wrap(tiny_llama(), "lora", fused=False)
    assert all(layer.fusion is None for layer in model.peftlab.current.layers.values())


def test_fused_is_not_written_to_the_adapter_config(tmp_path):
    import json

    peftlab.save_adapter(peftlab.wrap(tiny_llama(), "lora", fused=False), tmp_path)
    assert "fused" not in json.loads((tmp_path / "adapter_config.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(CASES))
def test_no_graph_breaks_from_our_layers(method):
    """torch.compile sees one graph for every method's layers in training mode (IncreLoRA scoring too)."""
    torch._dynamo.reset()
    model = peftlab.wrap(tiny_llama(), method, **{**CASES[method].config, "target_modules": "all-linear"}).train()
    x = tokens()
    peftlab.controller(model).prepare([{"input_ids": x, "labels": x}])
    explanation = torch._dynamo.explain(model)(x, labels=x)
    assert explanation.graph_break_count == 0, [str(b.reason)[:200] for b in explanation.break_reasons]


@pytest.mark.slow
def test_compiled_op_equals_the_eager_kernel():
    """The opaque op torch.compile runs gives the eager kernel's outputs and gradients."""
    fused, eager = fused_and_eager(wrapped("allora", tiny_gpt2))  # Conv1D base and ALLoRA's row scale
    compiled = torch.compile(fused, backend="aot_eager")
    assert_same_training_step(compiled, eager, tokens())


@pytest.mark.parametrize("dropout", [0.0, 0.2])
@pytest.mark.parametrize("conv1d", [False, True])
def test_compiled_op_passes_opcheck(dropout, conv1d):
    """The custom op torch.compile sees: fake shapes/strides, schema and autograd registration agree."""
    torch.manual_seed(0)
    weight = torch.randn(12, 10) if conv1d else torch.randn(10, 12)    # Conv1D stores (d_in, d_out)
    x = torch.randn(3, 4, 12, requires_grad=True)
    a, b = torch.randn(4, 12, requires_grad=True), torch.randn(10, 4, requires_grad=True)
    args = (x, weight, torch.randn(10), a, b, None, 2.0, dropout, conv1d)
    # the op draws its dropout mask, so opcheck's repeated calls cannot compare outputs when dropout > 0
    tests = ("test_schema", "test_faketensor", "test_aot_dispatch_static") + (("test_autograd_registration",)
                                                                                if dropout == 0 else ())
    torch.library.opcheck(torch.ops.peftlab.lora_linear.default, args, test_utils=tests)
    y, keep, u = torch.ops.peftlab.lora_linear(*args)
    backward_args = (torch.randn_like(y), x.detach(), weight, keep, u.detach(), a.detach(), b.detach(), None, 2.0,
                     dropout, conv1d, True)
    torch.library.opcheck(torch.ops.peftlab.lora_linear_backward.default, backward_args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


def test_fast_dropout_replaces_the_models_dropout_only_while_the_trainer_trains(tmp_path):
    """Wrapping leaves the user's own Dropout modules alone; peftlab.Trainer swaps them for
    FastDropout while it trains (fast_dropout=True, the default) and puts them back, also when
    training fails; fast_dropout=False keeps torch's."""
    from peftlab.kernels import FastDropout
    from train_job import lm_dataset

    def kinds(model):
        return {type(m) for m in model.modules() if isinstance(m, nn.Dropout)}

    model = peftlab.wrap(tiny_gpt2(), "lora", r=2)
    assert kinds(model) == {nn.Dropout}
    seen = []
    model.register_forward_hook(lambda *a: seen.append(kinds(model)))
    config = dict(max_steps=2, per_device_train_batch_size=4, disable_tqdm=True, do_eval=False)
    peftlab.Trainer(model, peftlab.TrainConfig(output_dir=str(tmp_path / "a"), **config), lm_dataset()).train()
    assert seen and all(k == {FastDropout} for k in seen) and kinds(model) == {nn.Dropout}
    seen.clear()
    peftlab.Trainer(model, peftlab.TrainConfig(output_dir=str(tmp_path / "b"), fast_dropout=False, **config),
                    lm_dataset()).train()
    assert seen and all(k == {nn.Dropout} for k in seen)

    def fail(*args):
        raise RuntimeError("boom")

    model.register_forward_hook(fail)
    with pytest.raises(RuntimeError, match="boom"):
        peftlab.Trainer(model, peftlab.TrainConfig(output_dir=str(tmp_path / "c"), **config), lm_dataset()).train()
    assert kinds(model) == {nn.Dropout}


def test_fast_dropout_masks_forward_and_backward_alike():
    from peftlab.kernels import FastDropout

    layer = FastDropout(0.25).train()
    x = torch.randn(64, 300, requires_grad=True)
    y = layer(x)
    y.backward(torch.ones_like(y))
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.75) < 0.01
    torch.testing.assert_close(y[kept], x[kept] / 0.75)                  # scaled by 1/(1 - p)
    torch.testing.assert_close(x.grad, kept.float() / 0.75)               # the same mask in backward
    assert torch.equal(layer.eval()(x), x)
