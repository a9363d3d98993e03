"""preset="paper": every method's paper one switch away (README, "Paper presets"), each checked
against an oracle written from the paper's equations, not from peftlab's code."""
import math

import pytest
import torch
from torch import nn

import peftlab
from peftlab.recipes import resolve

from conftest import tiny_llama, tokens
from test_lora import Holder


def test_the_preset_is_one_switch_in_python_on_the_command_line_and_in_recipes(tmp_path):
    assert peftlab.get_config("adalora", preset="paper").init_like_lora is False
    assert resolve("adalora", overrides=["preset=paper"]).adapter.init_like_lora is False
    recipe = tmp_path / "r.yaml"
    recipe.write_text("adapter: increlora\nadapter_config: {preset: paper}\n")
    config = resolve(None, recipe).adapter
    assert (config.init_r, config.init_like_lora, config.scale_by_live_rank, config.orth_reg_weight) == (1, False, True, 0.1)
    assert resolve("increlora", recipe, overrides=["init_r=2"]).adapter.init_r == 2, "an explicit value wins"
    with pytest.raises(ValueError, match="preset must be one of paper or null, got 'papers'"):
        peftlab.get_config("lora", preset="papers")


def test_every_method_has_a_paper_preset():
    for method in peftlab.list_adapters():
        peftlab.get_config(method, preset="paper")


def test_lora_paper_is_the_released_init():
    """LoRA (arXiv:2106.09685 §4.1; loralib): A as nn.Linear's default, U(±1/√d_in), B = 0, s = α/r."""
    torch.manual_seed(0)
    layer = peftlab.wrap(Holder(nn.Linear(400, 300)), "lora", preset="paper", target_modules=["proj"]).proj
    bound = 1 / math.sqrt(400)
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.abs().max() > 0.95 * bound
    assert torch.count_nonzero(layer.lora_B) == 0 and layer.scale == 16 / 8


def test_adalora_paper_starts_at_zero_singular_values_and_trains_e_first():
    """AdaLoRA (arXiv:2303.10512 §3.1): Λ = 0, P and Q random Gaussian (the released code's std 0.02);
    ∂L/∂E_i = c·p_iᵀ G q_i with G = ∂L/∂ΔW, and the task gives P and Q no gradient while Λ = 0."""
    torch.manual_seed(0)
    model = peftlab.wrap(Holder(nn.Linear(256, 128)), "adalora", preset="paper", init_r=12, target_r=8, total_step=10,
                         target_modules=["proj"])
    layer = model.proj
    assert torch.count_nonzero(layer.lora_E) == 0
    for factor in (layer.lora_A, layer.lora_B):
        assert abs(factor.std().item() - 0.02) < 0.002
    x, gy = torch.randn(9, 256), torch.randn(9, 128)
    (model(x) * gy).sum().backward()
    g = gy.t() @ x                                                     # ∂L/∂ΔW, (d_out, d_in)
    c = 16 / (12 + 1e-5)
    expected = c * torch.einsum("oi,oj,ij->i", layer.lora_B.detach(), g, layer.lora_A.detach()).unsqueeze(1)
    torch.testing.assert_close(layer.lora_E.grad, expected, atol=1e-5, rtol=1e-4)
    assert torch.count_nonzero(layer.lora_A.grad) == 0 and torch.count_nonzero(layer.lora_B.grad) == 0


def test_increlora_paper_grows_from_rank_one_at_alpha_over_the_live_rank():
    """IncreLoRA (arXiv:2308.12043, as released): each module starts at rank 1 with E = 0, the update
    is ΔW = α/r_live · B(A ⊙ E), and γ = 0.1 regularizes P and Q."""
    torch.manual_seed(0)
    model = peftlab.wrap(tiny_llama(), "increlora", preset="paper", target_r=4, total_step=20)
    ctl = peftlab.controller(model)
    for layer in model.peftlab.current.layers.values():
        assert layer.rank == 1 and torch.count_nonzero(layer.lora_E) == 0
        with torch.no_grad():
            layer.lora_E.normal_()
        live = layer.live
        expected = 16 / (layer.rank + 1e-5) * layer.lora_B[:, live] @ (layer.lora_A[live] * layer.lora_E[live])
        torch.testing.assert_close(layer.delta_weight(), expected.detach(), atol=1e-6, rtol=1e-5)
    assert float(ctl.penalty(0)) > 0 and ctl.config.orth_reg_weight == 0.1


def test_eva_paper_rows_are_orthonormal_principal_directions():
    """EVA (arXiv:2410.07170 §3): A's rows are the unit-norm top principal directions of the layer's
    inputs, A Aᵀ = I; peftlab's default scales them to answer the inputs as a LoRA A does."""
    torch.manual_seed(0)
    batches = [{"input_ids": tokens(batch=4, length=16, seed=s)} for s in range(6)]
    for preset, unit in (("paper", True), (None, False)):
        model = peftlab.wrap(tiny_llama(), "evalora", r=2, rho=1.0, preset=preset)
        peftlab.controller(model).prepare(batches)
        a = model.model.layers[0].self_attn.q_proj.lora_A.detach()
        gram = a @ a.t()
        assert torch.allclose(gram, torch.eye(len(a)), atol=1e-5) == unit


def test_randlora_paper_starts_as_peft_and_scales_by_twenty():
    """RandLoRA (arXiv:2502.00987; PEFT's RandLoraConfig): λ = 0, γ = 1/max(n, d), no learning-rate
    multiplier on λ, s = α/r = 20; at step 0 only λ gets a gradient (γ's is λ-weighted, so 0)."""
    from peft import RandLoraConfig, get_peft_model

    torch.manual_seed(0)
    ours = peftlab.wrap(tiny_llama(), "randlora", preset="paper", r=8, target_modules=["q_proj"])
    theirs = get_peft_model(tiny_llama(), RandLoraConfig(r=8, randlora_alpha=160, target_modules=["q_proj"]))
    for name, layer in ours.peftlab.current.layers.items():
        peft_layer = theirs.base_model.model.get_submodule(name)
        state = layer.peft_state()
        torch.testing.assert_close(state["randlora_lambda"], peft_layer.randlora_lambda["default"].detach())
        torch.testing.assert_close(state["randlora_gamma"], peft_layer.randlora_gamma["default"].detach())
        assert layer.lambda_scale == 1.0 and layer.scale == 20.0
    x = tokens()
    ours(x, labels=x).loss.backward()
    layer = next(iter(ours.peftlab.current.layers.values()))
    assert torch.count_nonzero(layer.randlora_gamma.grad) == 0 and torch.count_nonzero(layer.randlora_lambda.grad) > 0


def test_allora_paper_has_no_alpha_over_r():
    """ALLoRA (arXiv:2410.09692 §4): W + BA, no α/r; with B = 0 every row's coefficient is η, so the
    first SGD step moves B by η times LoRA's gradient (test_allora.py checks the gradients at B ≠ 0)."""
    layer = peftlab.wrap(Holder(nn.Linear(6, 5)), "allora", r=4, preset="paper", target_modules=["proj"]).proj
    assert layer.scale == 1.0


def test_sara_paper_moves_each_selected_weight_by_the_learning_rate():
    """SaRA (arXiv:2409.06633 §3): the selected weights themselves train (AdamW's first step moves
    each by lr·sign(g)), with λ = 5e-3 on the nuclear norm; peftlab's default moves them 2·lr."""
    for preset, step in (("paper", 1e-3), (None, 2e-3)):
        torch.manual_seed(0)
        model = peftlab.wrap(Holder(nn.Linear(96, 80)), "sara", preset=preset, total_step=10, target_fraction=0.1,
                             target_modules=["proj"])
        layer = model.proj
        assert layer.step_scale == (1.0 if preset else 2.0)
        assert peftlab.controller(model).config.lambda_rank == (5e-3 if preset else 5e-4)
        before = layer.base_layer.weight.detach().reshape(-1)[layer.idx].clone()
        (model(torch.randn(8, 96)) ** 2).sum().backward()
        torch.optim.AdamW([layer.values], lr=1e-3, weight_decay=0.0).step()
        moved = (layer.effective_values() - before).abs()
        assert torch.allclose(moved[moved > 0], torch.full_like(moved[moved > 0], step), rtol=1e-3)
