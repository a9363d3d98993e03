"""IncreLoRA (arXiv:2308.12043) against its paper, the released code, and independent oracles."""
import math

import pytest
import torch

import peftlab
from peftlab.adapters.svd import orthogonality_penalty

from conftest import adapter_optimizer, lifecycle_steps, tiny_llama, tokens

TARGETS = ["q_proj", "v_proj", "o_proj"]  # 6 modules in the tiny Llama


def increlora(**kw):
    cfg = dict(total_step=40, init_r=1, target_r=3, rank_step=1, top_h=2, init_warmup=4, incre_interval=3,
               target_modules=TARGETS)
    return peftlab.wrap(tiny_llama(), "increlora", **{**cfg, **kw})


def run(model, steps, start=0, opt=None):
    """The hand-written loop; returns the total rank after every step, and the optimizer."""
    ctl = peftlab.controller(model)
    history = []
    opt = lifecycle_steps(model, steps, opt, start=start, after=lambda t: history.append(ctl.total_rank))
    return history, opt


@pytest.mark.parametrize("advance", [False, True])
def test_step0_reserves_and_identity(advance):
    model = increlora(advance_learn=advance, orth_reg_weight=0.0)
    x = tokens()
    base = tiny_llama()(x).logits
    assert torch.equal(model(x).logits, base)
    model(x, labels=x).loss.backward()
    adapter_optimizer(model)
    peftlab.controller(model).before_optimizer_step(0)
    for layer in model.peftlab.current.layers.values():
        assert int(layer.reserve.sum()) == 1 and layer.rank == 1
        assert layer.singular_values()[layer.reserve].item() == pytest.approx(1e-5 if advance else 0.0, abs=1e-12)
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
    assert ctl.completed and not any(l.reserve.any() or l.scoring for l in model.peftlab.current.layers.values())
    assert ctl.report()["budget"] == 18


def test_last_round_never_overshoots_with_rank_step_above_one():
    model = increlora(init_r=1, target_r=2, rank_step=4, top_h=1, max_rank=6)
    history, _ = run(model, 40)
    assert history[-1] == 12 and max(history) == 12


def test_the_ceiling_is_exact_and_reported():
    model = increlora(init_r=1, target_r=3, rank_step=2, top_h=1, max_rank=4)
    history, _ = run(model, 40)
    ranks = peftlab.controller(model).report()["ranks"]
    assert max(ranks.values()) == 4 and sum(ranks.values()) == history[-1] == 18
    assert sorted(peftlab.controller(model).report()["at_ceiling"]) == sorted(n for n, r in ranks.items() if r == 4)
    # unset, the ceiling is what a module reaches growing in every round (12 modules, 3 per round): never binds
    assert peftlab.get_config("increlora", init_r=2, target_r=8, rank_step=4).for_modules(12).max_rank == 2 + 24


def test_growth_keys_on_the_first_applied_step_not_on_step_zero():
    """A non-finite step 0 is skipped by every front end: the controller first sees step 1."""
    model = increlora()
    history, _ = run(model, 29, start=1)
    assert history[-1] == 18 == peftlab.controller(model).target_total


def test_selection_is_the_top_h_by_smoothed_score():
    model = increlora(orth_reg_weight=0.0)
    ctl = peftlab.controller(model)
    run(model, 1)
    names = list(model.peftlab.current.layers)
    for i, name in enumerate(names):
        ctl.ema[name] = torch.tensor([float(i + 1), 1.0])  # S = Ī·Ū grows with the index
    ctl._grow(step=6)
    ranks = ctl.report()["ranks"]
    assert sorted(n for n in names if ranks[n] == 2) == sorted(names[-2:])


@pytest.mark.parametrize("live_rank, advance", [(True, False), (False, False), (False, True)])
def test_growth_scales_the_old_components_output_by_r_over_r_plus_m_only_in_the_released_codes_scale(live_rank, advance):
    """The released code's α/live rank drops a module's trained output by r/(r+m) when it grows;
    the default α/target_r keeps it, and a joining component (E = 1e-5 after advance learning, or 0)
    starts at the start value of E with its b shrunk by as much, so the output does not move."""
    model = increlora(orth_reg_weight=0.0, advance_learn=advance, rank_step=2, scale_by_live_rank=live_rank)
    ctl = peftlab.controller(model)
    run(model, 3)  # the rank-1 components have trained; the reserves exist (at E = 0)
    layers = model.peftlab.current.layers
    x = torch.randn(3, 32)
    torch.set_grad_enabled(False)
    before = {name: layer.branch(x) for name, layer in layers.items()}
    was_active = {name: layer.active.clone() for name, layer in layers.items()}
    ctl._grow(step=3)
    grown = [name for name, layer in layers.items() if layer.rank == 3]
    assert len(grown) == 2
    for name, layer in layers.items():  # α/(r + m): the old component's contribution drops by r/(r+m)
        m = layer.rank - 1
        drop = (1 + 1e-5) / (1 + m + 1e-5) if live_rank else 1.0
        # the fresh reserves drawn after growth add terms at E = 1e-5 under advance learning
        torch.testing.assert_close(layer.branch(x), before[name] * drop, atol=1e-6 if advance else 1e-7, rtol=1e-5)
        joined = layer.active & ~was_active[name]  # a joining component starts as LoRA's: E at the start value
        assert joined.any() == (name in grown)
        assert torch.all(layer.lora_E[joined] == layer.start_value)
        assert torch.all(layer.lora_B[:, joined].abs() < (1e-5 if advance else 1e-12))
    torch.set_grad_enabled(True)


def test_a_new_component_trains_like_a_fresh_adamw_parameter_group():
    """From its birth at step 6, a grown component's A row, E entry and B column move exactly as a
    torch.optim.AdamW group created at step 6 fed the same gradients, under the component's own
    schedule (linear warm-up over component_warmup steps, then linear decay to 0 at total_step)."""
    total, warmup, lr, wd = 40, 3, 1e-2, 0.01
    model = increlora(orth_reg_weight=0.1, advance_learn=False, component_warmup=warmup, total_step=total)
    ctl = peftlab.controller(model)
    optimizer = adapter_optimizer(model, lr=lr, weight_decay=wd)
    run(model, 7, opt=optimizer)  # growth at t = 6
    name = next(n for n, born in ctl.e_born.items() if (born == 6).any())
    layer, row = model.peftlab.current.layers[name], int(torch.nonzero(ctl.e_born[name] == 6)[0])
    views = {"lora_A": lambda t: t[row], "lora_E": lambda t: t[row], "lora_B": lambda t: t[:, row]}
    fresh = {k: view(getattr(layer, k)).detach().clone().requires_grad_() for k, view in views.items()}
    fresh_opt = torch.optim.AdamW(list(fresh.values()), lr=lr, weight_decay=wd)
    x = tokens()
    for t in range(7, 15):
        age = t - 6
        factor = age / warmup if age < warmup else (total - 6 - age) / (total - 6 - warmup)
        fresh_opt.param_groups[0]["lr"] = lr * factor
        (model(x, labels=x).loss + ctl.penalty(t)).backward()
        ctl.before_optimizer_step(t)
        for key, view in views.items():
            fresh[key].grad = view(getattr(layer, key).grad).clone()
        fresh_opt.step()
        optimizer.step()
        ctl.after_optimizer_step(t)
        optimizer.zero_grad()
        for key, view in views.items():
            torch.testing.assert_close(view(getattr(layer, key)).detach(), fresh[key].detach(), atol=1e-6, rtol=0,
                                       msg=f"{key} at step {t}")


def test_score_formula_matches_the_analytic_gradient():
    model = increlora(orth_reg_weight=0.0)
    layer = model.peftlab.current.layers["model.layers.0.self_attn.q_proj"]
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


def test_regularizer_covers_reserves_and_matches_an_independent_formula():
    model = increlora(orth_reg_weight=0.5)
    ctl = peftlab.controller(model)
    run(model, 1)  # step 0 draws the reserves
    layers = [l for l in model.peftlab.current.layers.values()]
    penalty = ctl.penalty(1)
    norms = []
    for l in layers:  # over active and reserve rows: rank 1 + 1 reserve = 2 rows each
        a, b = l.lora_A[:2].detach(), l.lora_B[:, :2].detach()
        norms += [torch.sqrt(((a @ a.t() - torch.eye(2)) ** 2).sum()), torch.sqrt(((b.t() @ b - torch.eye(2)) ** 2).sum())]
    assert penalty.item() == pytest.approx(0.5 * sum(norms).item() / len(norms), rel=1e-6)
    penalty.backward()
    layer = layers[0]
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
    opt2 = adapter_optimizer(second)
    opt2.load_state_dict(opt_state)
    torch.set_rng_state(rng)  # fresh reserves are drawn from the global generator
    run(second, 11, start=9, opt=opt2)
    for (n, a), b in zip(full.named_parameters(), second.parameters()):
        assert torch.equal(a, b), n


@pytest.mark.parametrize("kwargs, message", [
    ({"total_step": 0}, "increlora: total_step must be an integer >= 1, got 0"),
    ({"total_step": 10, "init_r": 4, "target_r": 2}, "init_r=4 <= target_r=2"),
    ({"total_step": 10, "target_r": 8, "max_rank": 4}, "target_r=8 <= max_rank=4"),
])
def test_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        peftlab.get_config("increlora", **kwargs)


@pytest.mark.parametrize("front_end", ["trainer", "callback"])
def test_new_components_train_like_fresh_adamw_groups_under_every_front_end(front_end, tmp_path):
    """Record every step's gradients and weights under peftlab.Trainer or transformers.Trainer +
    PeftlabCallback, then replay a fresh torch.optim.AdamW from a component's birth on: the
    component's rows must follow it step by step (the optimizers' own settings and schedules)."""
    from transformers import Trainer, TrainingArguments

    from peftlab.integrations import PeftlabCallback
    from train_job import lm_dataset

    total, lr, wd = 16, 1e-2, 0.01
    model = increlora(total_step=None, orth_reg_weight=0.1, advance_learn=False, component_warmup=2)
    ctl = peftlab.controller(model)
    grads, weights = {}, {}
    before, after = ctl.before_optimizer_step, ctl.after_optimizer_step

    def record_before(step):
        before(step)
        grads[step] = {n: l.lora_E.grad.clone() for n, l in model.peftlab.current.layers.items()}

    def record_after(step):
        after(step)
        weights[step] = {n: l.lora_E.detach().clone() for n, l in model.peftlab.current.layers.items()}

    ctl.before_optimizer_step, ctl.after_optimizer_step = record_before, record_after
    if front_end == "trainer":
        cfg = peftlab.TrainConfig(output_dir=str(tmp_path), max_steps=total, per_device_train_batch_size=8,
                                  learning_rate=lr, weight_decay=wd, max_grad_norm=0, disable_tqdm=True)
        peftlab.Trainer(model, cfg, lm_dataset()).train()
    else:
        args = TrainingArguments(output_dir=str(tmp_path), max_steps=total, per_device_train_batch_size=8,
                                 learning_rate=lr, weight_decay=wd, max_grad_norm=0, report_to=[], use_cpu=True,
                                 disable_tqdm=True, save_strategy="no", warmup_steps=0)
        Trainer(model=model, args=args, train_dataset=lm_dataset(), callbacks=[PeftlabCallback()]).train()
    group = ctl.optimizer.param_groups[0]
    born = [(n, int(row), int(ctl.e_born[n][row])) for n in ctl.e_born for row in torch.nonzero(ctl.e_born[n] >= 0)[:, 0]]
    assert born, "the run grew"
    for name, row, birth in born[:3]:
        value = weights[birth][name][row].clone().requires_grad_()
        fresh = torch.optim.AdamW([value], lr=lr, betas=group["betas"], eps=group["eps"], weight_decay=wd)
        for step in range(birth + 1, total):
            age = step - birth
            remaining = ctl.config.total_step - birth
            fresh.param_groups[0]["lr"] = lr * (age / 2 if age < 2 else max(0.0, (remaining - age) / (remaining - 2)))
            value.grad = grads[step][name][row].clone()
            fresh.step()
            torch.testing.assert_close(weights[step][name][row], value.detach(), atol=1e-6, rtol=0,
                                       msg=f"{name} row {row} born at {birth}, step {step}")


def test_regularizer_weight_follows_the_start():
    """No orthogonality pull under the LoRA-like start (it would grow A's rows from 1/√3 to unit norm);
    the released code's 0.1 under the paper's start; an explicit weight wins either way."""
    assert peftlab.get_config("increlora").orth_reg_weight == 0.0
    assert peftlab.get_config("increlora", init_like_lora=False).orth_reg_weight == 0.1
    assert peftlab.get_config("increlora", orth_reg_weight=0.3).orth_reg_weight == 0.3
    model = increlora()
    assert peftlab.controller(model).penalty(0) == 0.0


def test_the_default_ceiling_is_what_a_module_reaches_growing_in_every_round():
    """The released MNLI settings (72 modules, rank 1 -> 2 on average, one component per round, top_h = 2)
    let a module reach 1 + 36 = 37; a ceiling that assumed a quarter of the modules per round was 5."""
    config = peftlab.get_config("increlora", init_r=1, target_r=2, rank_step=1, top_h=2).for_modules(72)
    assert config.max_rank == 37
    assert peftlab.get_config("increlora", init_r=1, target_r=2, rank_step=1).for_modules(72).max_rank == 5
