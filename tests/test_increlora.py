"""IncreLoRA's spec oracles (specs/lora-adalora-increlora.md §5, IncreLoRA 1-13)."""
import math

import pytest
import torch

import peftlab
from peftlab.adapters.adalora import orthogonality_penalty

from conftest import tiny_llama, tokens

TARGETS = ["q_proj", "v_proj", "o_proj"]  # 6 modules in the tiny Llama


def increlora(**kw):
    cfg = dict(total_step=40, init_r=1, target_r=3, rank_step=1, top_h=2, init_warmup=4, incre_interval=3,
               target_modules=TARGETS)
    return peftlab.wrap(tiny_llama(), "increlora", **{**cfg, **kw})


def run(model, steps, lr=1e-2, start=0, opt=None):
    ctl = peftlab.controller(model)
    x = tokens()
    opt = opt or torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    history = []
    for t in range(start, start + steps):
        model(x, labels=x).loss.backward()
        ctl.before_optimizer_step(t)
        opt.step()
        ctl.after_optimizer_step(t)
        opt.zero_grad()
        history.append(ctl.total_rank)
    return history, opt


@pytest.mark.parametrize("advance", [False, True])
def test_step0_reserves_and_identity(advance):
    model = increlora(advance_learn=advance, orth_reg_weight=0.0)
    x = tokens()
    base = tiny_llama()(x).logits
    assert torch.equal(model(x).logits, base)
    model(x, labels=x).loss.backward()
    peftlab.controller(model).before_optimizer_step(0)
    for layer in model.peftlab.layers.values():
        assert int(layer.reserve.sum()) == 1 and layer.rank == 1
        assert layer.lora_E[layer.reserve].item() == pytest.approx(1e-5 if advance else 0.0, abs=1e-12)
    out = model(x).logits
    if advance:
        assert 0 < (out - base).abs().max() < 1e-3
    else:
        assert torch.equal(out, base)


def test_growth_timing_amount_and_budget():
    model = increlora()
    ctl = peftlab.controller(model)
    history, _ = run(model, 30)
    # six modules start at rank 1 (total 6), target 3 x 6 = 18, two per round, first round at t=6 (> 4, % 3)
    grown = [t for t in range(1, 30) if history[t] > history[t - 1]]
    assert history[0] == 6 and grown[0] == 6 and all(t % 3 == 0 and t > 4 for t in grown)
    assert [history[t] - history[t - 1] for t in grown] == [2] * 6
    assert history[-1] == 18 == ctl.target_total and max(history) == 18
    assert ctl.completed and not any(l.reserve.any() or l.scoring for l in model.peftlab.layers.values())
    assert ctl.report()["budget"] == 18


def test_last_round_never_overshoots_with_rank_step_above_one():
    model = increlora(init_r=1, target_r=2, rank_step=4, top_h=1, max_rank=6)
    history, _ = run(model, 40)
    assert history[-1] == 12 and max(history) == 12


def test_selection_is_the_top_h_by_smoothed_score():
    model = increlora(orth_reg_weight=0.0)
    ctl = peftlab.controller(model)
    run(model, 1)
    names = list(model.peftlab.layers)
    for i, name in enumerate(names):
        ctl.ema[name] = torch.tensor([float(i + 1), 1.0])  # S = Ī·Ū grows with the index
    ctl._grow(step=6)
    ranks = ctl.report()["ranks"]
    assert sorted(n for n in names if ranks[n] == 2) == sorted(names[-2:])


def test_scale_jump_and_warmup_of_new_components():
    model = increlora(orth_reg_weight=0.0, component_warmup=4)
    ctl = peftlab.controller(model)
    run(model, 7)  # t = 0..6; the first growth happens at t = 6
    name = next(n for n, l in model.peftlab.layers.items() if l.rank == 2)
    layer = model.peftlab.layers[name]
    assert layer.scale == pytest.approx(64 / (2 + 1e-5))  # α / ranknum: it was α / 1 before growing
    row = int(torch.nonzero(ctl.e_born[name] == 6)[0])
    # one step later the new component takes (age + 1) / (warmup + 1) = 2/5 of its plain update
    x = tokens()
    model(x, labels=x).loss.backward()
    ctl.before_optimizer_step(7)
    before, grad = layer.lora_E[row].detach().clone(), layer.lora_E.grad[row].clone()
    assert grad.abs().item() > 0
    torch.optim.SGD([layer.lora_E], lr=0.1).step()
    ctl.after_optimizer_step(7)
    torch.testing.assert_close(layer.lora_E[row].detach(), before - 2 / 5 * 0.1 * grad)


def test_score_formula_matches_the_analytic_gradient():
    model = increlora(orth_reg_weight=0.0)
    layer = model.peftlab.layers["model.layers.0.self_attn.q_proj"]
    with torch.no_grad():
        layer.lora_E[0] = 0.7
    x = torch.randn(5, 32)
    c = torch.randn(5, 32)
    (layer.branch(x) * c).sum().backward()
    layer.update_score()
    delta = layer.delta_weight()
    grad = c.t() @ x                                # ∂⟨x ΔWᵀ, C⟩/∂ΔW
    expected = (delta * grad).abs().sum() / math.sqrt(delta.numel())
    assert layer.score.item() == pytest.approx(expected.item(), rel=1e-5)


def test_regularizer_covers_reserves():
    model = increlora(orth_reg_weight=0.5)
    ctl = peftlab.controller(model)
    run(model, 1)  # step 0 creates the reserves; they train from step 1 on
    ctl.before_optimizer_step(1)  # no backward: the gradient is γR's alone
    layer = model.peftlab.layers["model.layers.0.self_attn.q_proj"]
    assert torch.count_nonzero(layer.lora_A.grad[layer.reserve]) > 0
    assert torch.count_nonzero(layer.lora_A.grad[~layer.live]) == 0
    q, _ = torch.linalg.qr(torch.randn(32, 2))
    assert orthogonality_penalty([(q.t(), q)]).item() == pytest.approx(0.0, abs=1e-6)


def test_grown_model_saves_and_loads_with_its_ranks(tmp_path):
    model = increlora()
    run(model, 12)
    x = tokens()
    model.eval()
    expected = model(x).logits
    ranks = peftlab.controller(model).report()["ranks"]
    peftlab.save_adapter(model, tmp_path)
    loaded = peftlab.load_adapter(tiny_llama(), tmp_path)
    assert peftlab.controller(loaded).report()["ranks"] == ranks
    torch.testing.assert_close(loaded(x).logits, expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(peftlab.merge(loaded)(x).logits, expected, atol=1e-5, rtol=1e-5)


def test_resume_continues_exactly():
    torch.manual_seed(0)
    full = increlora()
    run(full, 20)
    torch.manual_seed(0)
    first = increlora()
    _, opt1 = run(first, 9)
    params = {n: p.detach().clone() for n, p in first.named_parameters() if p.requires_grad}
    state, opt_state, rng = peftlab.controller(first).state_dict(), opt1.state_dict(), torch.get_rng_state()
    second = increlora()
    with torch.no_grad():
        for n, p in second.named_parameters():
            if p.requires_grad:
                p.copy_(params[n])
    peftlab.controller(second).load_state_dict(state)
    opt2 = torch.optim.AdamW([p for p in second.parameters() if p.requires_grad], lr=1e-2)
    opt2.load_state_dict(opt_state)
    torch.set_rng_state(rng)  # fresh reserves are drawn from the global generator
    run(second, 11, start=9, opt=opt2)
    for (n, a), b in zip(full.named_parameters(), second.parameters()):
        assert torch.equal(a, b), n


@pytest.mark.parametrize("kwargs, message", [
    ({}, "increlora needs total_step"),
    ({"total_step": 10, "init_r": 4, "target_r": 2}, "init_r=4 <= target_r=2"),
    ({"total_step": 10, "target_r": 8, "max_rank": 4}, "target_r=8 <= max_rank=4"),
])
def test_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        peftlab.get_config("increlora", **kwargs)
