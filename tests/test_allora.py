"""ALLoRA (arXiv:2410.09692): row coefficients, gradient scaling, and the plain-LoRA file."""
import pytest
import torch
from torch import nn

import peftlab
from peftlab.adapters.allora import ALLoRABranch, row_coefficients

from test_lora import Holder


def allora(d_in=6, d_out=5, r=3, eta=2.0, seed=0):
    """The paper's parametrization (preset="paper": scale 1), so the gradient algebra below is the paper's."""
    torch.manual_seed(seed)
    model = peftlab.wrap(Holder(nn.Linear(d_in, d_out)), "allora", r=r, preset="paper", eta=eta, target_modules=["proj"])
    assert model.proj.scale == 1.0
    with torch.no_grad():
        model.proj.lora_B.normal_()
    return model, model.proj


def plain_lora_grads(layer, x, weight):
    """Gradients of the same update as an ordinary scale-1 LoRA, by autograd, in float64."""
    a = layer.lora_A.detach().double().requires_grad_()
    b = layer.lora_B.detach().double().requires_grad_()
    xx = x.detach().double().requires_grad_()
    y = (xx @ a.t()) @ b.t()
    (y * weight.double()).sum().backward()
    return xx.grad, a.grad, b.grad


def test_identity_at_init_for_any_leading_shape():
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    model = peftlab.wrap(Holder(base), "allora", r=3, target_modules=["proj"])
    for shape in [(4, 6), (2, 3, 6), (2, 2, 3, 6)]:
        x = torch.randn(shape)
        assert torch.equal(model(x), base(x))


def test_no_dropout_no_scale():
    model, layer = allora()
    assert not any(isinstance(m, nn.Dropout) for m in model.modules())
    x = torch.randn(4, 6)
    expected = layer.base_layer(x) + x @ layer.lora_A.t() @ layer.lora_B.t()
    torch.testing.assert_close(model(x), expected, atol=1e-6, rtol=1e-6)


def test_gradients_are_the_plain_ones_times_the_row_coefficients():
    model, layer = allora(eta=1.5)
    x = torch.randn(2, 7, 6, requires_grad=True)
    weight = torch.randn(2, 7, 5)
    (layer.branch(x) * weight).sum().backward()
    gx, ga, gb = plain_lora_grads(layer, x, weight)
    d = layer.lora_B.detach().double() @ layer.lora_A.detach().double()
    c = (d.norm(dim=1) + 1 / 1.5 ** 2) ** -0.5                      # float64, independently
    torch.testing.assert_close(layer.lora_B.grad.double(), c[:, None] * gb, atol=1e-6, rtol=1e-5)
    g = (weight.double().reshape(-1, 5)).t() @ x.detach().double().reshape(-1, 6)   # Gᵀ X
    torch.testing.assert_close(layer.lora_A.grad.double(), layer.lora_B.detach().double().t() @ (c[:, None] * g),
                               atol=1e-6, rtol=1e-5)
    assert not torch.allclose(layer.lora_A.grad.double(), c.mean() * ga, atol=1e-4), "A is not row-scaled"
    torch.testing.assert_close(x.grad.double(), gx, atol=1e-6, rtol=1e-5)  # input gradient unscaled


def test_hand_example_coefficients():
    a, b = torch.tensor([[1.0, 0.0]]), torch.tensor([[3.0], [0.0]])
    torch.testing.assert_close(row_coefficients(a, b, 1.0, 1.0), torch.tensor([0.5, 1.0]))
    torch.testing.assert_close(row_coefficients(a, b, 1.0, 0.25), torch.tensor([1 / 3.25 ** 0.5, 2.0]))
    torch.testing.assert_close(row_coefficients(a, b, 2.0, 1.0), torch.tensor([1 / 7 ** 0.5, 1.0]))  # rows of 2·BA


def test_init_step_moves_B_by_eta_times_the_plain_gradient():
    torch.manual_seed(0)
    model = peftlab.wrap(Holder(nn.Linear(6, 5)), "allora", r=3, lora_alpha=3, eta=2.0, target_modules=["proj"])
    layer = model.proj
    x, weight = torch.randn(4, 6), torch.randn(4, 5)
    _, _, gb = plain_lora_grads(layer, x, weight)
    a_before = layer.lora_A.detach().clone()
    (model(x) * weight).sum().backward()
    torch.optim.SGD([layer.lora_A, layer.lora_B], lr=0.1).step()
    torch.testing.assert_close(layer.lora_B.detach().double(), -0.1 * 2.0 * gb, atol=1e-6, rtol=1e-5)
    assert torch.equal(layer.lora_A, a_before)


def test_norm_is_over_rows_of_BA_and_not_squared():
    _, layer = allora()
    a, b = layer.lora_A.detach(), layer.lora_B.detach()
    rho = lambda a, b: (row_coefficients(a, b, 1.0, 0.0) ** -2)  # c⁻² = ρ when 1/η² = 0
    torch.testing.assert_close(rho(a, 3 * b), 3 * rho(a, b), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(row_coefficients(2 * a, b / 2, 1.0, 0.25), row_coefficients(a, b, 1.0, 0.25))
    torch.testing.assert_close(rho(a, b), (b @ a).norm(dim=1), rtol=1e-5, atol=1e-6)  # the fast form


def test_gradient_accumulation_is_exact():
    _, layer = allora()
    x, w = torch.randn(8, 6), torch.randn(8, 5)
    (layer.branch(x) * w).sum().backward()
    full = layer.lora_A.grad.clone(), layer.lora_B.grad.clone()
    layer.zero_grad()
    for half in (slice(0, 4), slice(4, 8)):
        (layer.branch(x[half]) * w[half]).sum().backward()
    torch.testing.assert_close(layer.lora_A.grad, full[0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(layer.lora_B.grad, full[1], atol=1e-6, rtol=1e-5)


def test_gradcheck_with_c_forced_to_one_is_plain_lora():
    x = torch.randn(3, 4, dtype=torch.double, requires_grad=True)
    a = torch.randn(2, 4, dtype=torch.double, requires_grad=True)
    b = torch.zeros(5, 2, dtype=torch.double, requires_grad=True)  # B = 0 and η = 1 with ρ = 0: c ≡ 1
    assert torch.autograd.gradcheck(lambda x, a: ALLoRABranch.apply(x, a, b.detach(), 1.0, 1.0), (x, a))
    b2 = torch.randn(5, 2, dtype=torch.double, requires_grad=True)
    assert not torch.autograd.gradcheck(lambda b: ALLoRABranch.apply(x.detach(), a.detach(), b, 1.0, 1.0), (b2,),
                                        raise_exception=False), "c depends on B, but no gradient flows through it"


@pytest.mark.parametrize("preset", [None, "paper"])
def test_backward_equals_the_papers_formula_away_from_zero(preset):
    """B ≠ 0 (a gradcheck at B = 0 sees zero outputs and would pass a backward wrong by any factor):
    ∂L/∂B = s·diag(c) Gᵀ (X Aᵀ), ∂L/∂A = s·Bᵀ diag(c) Gᵀ X with c_i = (‖(s·BA)_i‖ + 1/η²)^(-1/2), in
    float64 from the paper's listing (arXiv:2410.09692, appendix F), at the default scale α/r and at the paper's 1."""
    torch.manual_seed(3)
    model = peftlab.wrap(Holder(nn.Linear(6, 5)), "allora", r=4, eta=1.5, preset=preset, target_modules=["proj"])
    layer = model.proj
    with torch.no_grad():
        layer.lora_B.normal_()
    x, weight = torch.randn(7, 6), torch.randn(7, 5)
    (layer.branch(x) * weight).sum().backward()
    s, a, b = layer.scale, layer.lora_A.detach().double(), layer.lora_B.detach().double()
    c = ((s * b @ a).norm(dim=1) + 1 / 1.5 ** 2) ** -0.5
    g, h = weight.double(), x.double()
    torch.testing.assert_close(layer.lora_B.grad.double(), s * (c[:, None] * g.t()) @ (h @ a.t()), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(layer.lora_A.grad.double(), s * b.t() @ (c[:, None] * g.t()) @ h, atol=1e-6, rtol=1e-5)
    assert s == (1.0 if preset else peftlab.get_config("allora").lora_alpha / 4)


def test_bf16_autocast_gradients_are_close_to_fp32():
    _, layer = allora(d_in=32, d_out=16, r=4)
    x, w = torch.randn(8, 32), torch.randn(8, 16)
    (layer.branch(x) * w).sum().backward()
    ref = layer.lora_B.grad.clone()
    layer.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (layer.branch(x) * w).float().sum().backward()
    assert torch.isfinite(layer.lora_B.grad).all()
    assert ((layer.lora_B.grad - ref).norm() / ref.norm()).item() < 2e-2


def test_default_scale_is_loras_and_scales_output_and_every_gradient():
    torch.manual_seed(0)
    model = peftlab.wrap(Holder(nn.Linear(6, 5)), "allora", r=4, target_modules=["proj"])
    layer = model.proj
    assert layer.scale == 16 / 4 == peftlab.wrap(Holder(nn.Linear(6, 5)), "lora", r=4, target_modules=["proj"]).proj.scale
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(3, 6, requires_grad=True)
    weight = torch.randn(3, 5)
    (layer.branch(x) * weight).sum().backward()
    grads = [t.grad.clone() for t in (x, layer.lora_A, layer.lora_B)]
    for t in (x, layer.lora_A, layer.lora_B):
        t.grad = None
    (ALLoRABranch.apply(x, layer.lora_A, layer.lora_B, layer.scale, layer.inv_eta_sq) * weight).sum().backward()
    for scaled, plain in zip(grads, (x.grad, layer.lora_A.grad, layer.lora_B.grad)):
        torch.testing.assert_close(scaled, 4.0 * plain, atol=1e-6, rtol=1e-5)


def test_saves_as_plain_lora_and_reloads_as_allora(tmp_path):
    import json

    model = peftlab.wrap(Holder(nn.Linear(6, 5)), "allora", r=3, lora_alpha=7.0, eta=1.25, target_modules=["proj"])
    peftlab.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["lora_alpha"] == 7 and config["r"] == 3
    loaded = peftlab.load_adapter(Holder(nn.Linear(6, 5)), tmp_path)
    assert loaded.peftlab.current.method.name == "allora" and loaded.proj.inv_eta_sq == pytest.approx(1 / 1.25 ** 2)
    assert loaded.proj.scale == pytest.approx(7 / 3)
