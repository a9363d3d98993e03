"""AdaLoRA (arXiv:2303.10512) against its paper's equations, the released code, and HF PEFT step by step."""
import json

import pytest
import torch
from peft import AdaLoraConfig, PeftModel, get_peft_model

import peftlab
from peftlab.adapters.svd import orthogonality_penalty, update_sensitivity

from conftest import adapter_optimizer, lifecycle_steps, randomize_adapters, tiny_llama, tokens


def adalora(model=None, **kw):
    cfg = dict(total_step=20, init_r=6, target_r=2, tinit=2, tfinal=5, target_modules=["q_proj", "v_proj"])
    return peftlab.wrap(model if model is not None else tiny_llama(), "adalora", **{**cfg, **kw})




@pytest.mark.parametrize("like_lora", [True, False])
def test_identity_at_init_and_init_gradients(like_lora):
    """Both starts leave the model at the base. The paper's (E = 0) moves only E first; the default
    (B = 0) moves only B first, against A ⊙ E = LoRA's kaiming A times one constant."""
    x = tokens()
    base = tiny_llama()
    model = adalora(orth_reg_weight=0.0, init_like_lora=like_lora)
    assert torch.equal(model(x).logits, base(x).logits)
    model(x, labels=x).loss.backward()
    for layer in model.peftlab.current.layers.values():
        moving, still = (("lora_B",), ("lora_A", "lora_E")) if like_lora else (("lora_E",), ("lora_A", "lora_B"))
        assert all(torch.count_nonzero(getattr(layer, k).grad) > 0 for k in moving)
        assert all(torch.count_nonzero(getattr(layer, k).grad) == 0 for k in still)
        if like_lora:  # c·E = α/target_r: each triplet's first steps are those of a LoRA rank-one term
            assert torch.all(layer.lora_E == layer.lora_E[0])
            assert (layer.scale * layer.lora_E[0, 0]).item() == pytest.approx(16 / 2, rel=1e-4)
            assert layer.lora_A.abs().max() <= 1 / 32 ** 0.5  # kaiming-uniform bound 1/√d_in


def test_regularizer_is_the_formula_over_every_module_and_its_gradient_reaches_A_and_B():
    model = adalora(orth_reg_weight=0.3)
    layers = list(model.peftlab.current.layers.values())
    penalty = peftlab.controller(model).penalty(0)
    # independent oracle: 0.3 x the mean of the unsquared Frobenius norms, written out by hand
    terms = [torch.sqrt(((l.lora_A @ l.lora_A.t() - torch.eye(6)) ** 2).sum()) for l in layers]
    terms += [torch.sqrt(((l.lora_B.t() @ l.lora_B - torch.eye(6)) ** 2).sum()) for l in layers]
    expected = 0.3 * sum(terms) / len(terms)
    assert penalty.item() == pytest.approx(expected.item(), rel=1e-6)
    penalty.backward()
    a, b = layers[0].lora_A.detach().requires_grad_(), layers[0].lora_B.detach().requires_grad_()
    pairs = [(a, b)] + [(l.lora_A.detach(), l.lora_B.detach()) for l in layers[1:]]
    ga, gb = torch.autograd.grad(0.3 * orthogonality_penalty(pairs), (a, b))
    torch.testing.assert_close(layers[0].lora_A.grad, ga)
    torch.testing.assert_close(layers[0].lora_B.grad, gb)


def test_regularizer_is_zero_for_orthonormal_factors_and_matches_the_formula():
    q, _ = torch.linalg.qr(torch.randn(8, 5))
    assert orthogonality_penalty([(q.t(), q)]).item() == pytest.approx(0.0, abs=1e-6)
    a, b = torch.randn(3, 7), torch.randn(6, 3)
    expected = ((a @ a.t() - torch.eye(3)).norm() + (b.t() @ b - torch.eye(3)).norm()) / 2  # unsquared, averaged
    assert orthogonality_penalty([(a, b)]).item() == pytest.approx(expected.item(), rel=1e-6)


def test_budget_schedule():
    ctl = peftlab.controller(adalora(total_step=100, tinit=10, tfinal=30, deltaT=5))
    b0, bT = ctl.initial_budget, ctl.target_budget
    assert (b0, bT) == (4 * 6, 4 * 2)
    budgets = [ctl.budget(t)[0] for t in range(100)]
    assert budgets[:11] == [b0] * 11 and budgets[70] == bT and budgets[71:] == [bT] * 29
    assert all(x >= y for x, y in zip(budgets, budgets[1:]))
    for t in (20, 40, 55):  # closed form of eq. 12
        assert budgets[t] == int(bT + (b0 - bT) * (1 - (t - 10) / 60) ** 3)
    masks = [t for t in range(100) if ctl.budget(t)[1]]
    assert masks == [15, 20, 25, 30, 35, 40, 45, 50, 55, 60, 65, 70] + list(range(71, 100))


def test_sensitivity_ema_matches_the_recurrence():
    w = torch.nn.Parameter(torch.tensor([2.0]))
    ema = {"I": torch.zeros(1), "U": torch.zeros(1)}
    i_bar = u_bar = 0.0
    for value, grad in [(2.0, 0.5), (1.5, -1.0), (-3.0, 0.25)]:
        w.data.fill_(value)
        w.grad = torch.tensor([grad])
        update_sensitivity(ema, w, 0.85, 0.7)
        sens = abs(value * grad)
        i_bar = 0.85 * i_bar + 0.15 * sens
        u_bar = 0.7 * u_bar + 0.3 * abs(sens - i_bar)  # uses the updated Ī
        assert ema["I"].item() == pytest.approx(i_bar) and ema["U"].item() == pytest.approx(u_bar)


def test_triplet_score_is_E_plus_row_and_column_means():
    model = adalora()
    ctl = peftlab.controller(model)
    name = next(iter(model.peftlab.current.layers))
    s = {k: torch.rand_like(ctl.ema[f"{name}.{k}"]["I"]) for k in ("lora_A", "lora_E", "lora_B")}
    for k, v in s.items():
        ctl.ema[f"{name}.{k}"]["I"].copy_(v)
        ctl.ema[f"{name}.{k}"]["U"].fill_(2.0)
    expected = 2 * (s["lora_E"][:, 0] + s["lora_A"].mean(1) + s["lora_B"].mean(0))
    torch.testing.assert_close(ctl.triplet_scores(name), expected)


def test_masking_follows_the_budget_zeroes_only_E_and_freezes_in_the_final_phase():
    model = adalora(deltaT=1, lora_dropout=0.0)
    ctl = peftlab.controller(model)
    x = tokens()
    opt = adapter_optimizer(model)
    final_pattern = None
    for t in range(20):
        (model(x, labels=x).loss + ctl.penalty(t)).backward()
        ctl.before_optimizer_step(t)
        opt.step()
        snapshot = {n: (l.lora_A.clone(), l.lora_B.clone()) for n, l in model.peftlab.current.layers.items()}
        opt_state = [s["exp_avg"].clone() for s in opt.state.values()]
        ctl.after_optimizer_step(t)
        budget, mask_now = ctl.budget(t)
        live = sum(l.rank for l in model.peftlab.current.layers.values())
        if mask_now:
            assert live == budget, (t, live, budget)
            for n, l in model.peftlab.current.layers.items():
                assert torch.count_nonzero(l.lora_E[~l.active]) == 0
                assert torch.equal(l.lora_A, snapshot[n][0]) and torch.equal(l.lora_B, snapshot[n][1])
            assert all(torch.equal(a, s["exp_avg"]) for a, s in zip(opt_state, opt.state.values()))
        if t >= 15:
            pattern = [l.active.clone() for l in model.peftlab.current.layers.values()]
            final_pattern = final_pattern or pattern
            assert all(torch.equal(a, b) for a, b in zip(pattern, final_pattern)), "frozen after T - tfinal"
        opt.zero_grad()
    assert ctl.report()["budget"] == ctl.target_budget == 4 * 2
    # masked triplets get no task gradient on A and B
    layer = next(l for l in model.peftlab.current.layers.values() if not l.active.all())
    model(x, labels=x).loss.backward()
    assert torch.count_nonzero(layer.lora_A.grad[~layer.active]) == 0
    assert torch.count_nonzero(layer.lora_B.grad[:, ~layer.active]) == 0


def test_merge_with_masked_triplets_and_save_load_round_trip(tmp_path):
    model = adalora()
    randomize_adapters(model)
    ctl = peftlab.controller(model)
    layers = list(model.peftlab.current.layers.values())
    layers[0].mask(torch.tensor([True, False, True, False, False, False]))
    layers[1].mask(torch.zeros(6, dtype=torch.bool))  # rank 0 must save and load (PEFT #1539)
    x = tokens()
    expected = model(x).logits
    peftlab.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "ADALORA" and sum(config["rank_pattern"][f"{next(iter(model.peftlab.current.layers))}.lora_E"]) == 2
    loaded = peftlab.load_adapter(tiny_llama(), tmp_path)
    assert torch.equal(loaded(x).logits, expected)
    assert [l.rank for l in loaded.peftlab.current.layers.values()][:2] == [2, 0]
    assert all(l.scale == pytest.approx(16 / (6 + 1e-5)) for l in loaded.peftlab.current.layers.values())  # α / r0
    torch.testing.assert_close(peftlab.merge(model)(x).logits, expected, atol=1e-5, rtol=1e-5)
    assert ctl.report()["budget"] == 2 + 0 + 6 + 6


def test_peftlab_adalora_loads_in_peft_and_back(tmp_path):
    model = adalora(total_step=12, tinit=1, tfinal=3)
    x = tokens()
    lifecycle_steps(model, 12, lr=5e-2)
    assert peftlab.controller(model).report()["budget"] == 8
    model.eval()
    expected = model(x).logits
    peftlab.save_adapter(model, tmp_path)
    theirs = PeftModel.from_pretrained(tiny_llama(), str(tmp_path)).eval()
    torch.testing.assert_close(theirs(x).logits, expected, atol=1e-5, rtol=1e-5)


def test_peft_adalora_loads_in_peftlab(tmp_path):
    cfg = AdaLoraConfig(init_r=6, target_r=2, total_step=10, tinit=1, tfinal=3, target_modules=["q_proj", "v_proj"],
                        lora_alpha=12)
    theirs = get_peft_model(tiny_llama(), cfg)
    x = tokens()
    opt = torch.optim.AdamW([p for p in theirs.parameters() if p.requires_grad], lr=5e-2)
    for t in range(10):
        theirs(input_ids=x, labels=x).loss.backward()
        opt.step()
        theirs.base_model.update_and_allocate(t)
        opt.zero_grad()
    theirs.eval()
    expected = theirs(x).logits
    theirs.save_pretrained(str(tmp_path))
    ours = peftlab.load_adapter(tiny_llama(), tmp_path)
    torch.testing.assert_close(ours(x).logits, expected, atol=1e-5, rtol=1e-5)


def test_equals_peft_step_by_step_with_its_regularizer():
    """E, A, B, the masks and the importance averages Ī, Ū equal HF PEFT's AdaLoRA after every one of
    24 steps, with PEFT built with a task_type so that its orthogonality regularizer joins the loss (it
    does so inside forward). The schedule masks every 4 steps and forces the final mask at T - t_f = 18,
    between two of them, where neither library updates the averages any more."""
    settings = dict(init_r=6, target_r=2, total_step=24, tinit=3, tfinal=6, deltaT=4, beta1=0.85, beta2=0.85,
                    orth_reg_weight=0.3, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    theirs = get_peft_model(tiny_llama(), AdaLoraConfig(task_type="CAUSAL_LM", **settings)).train()
    ours = adalora(**settings).train()
    names = list(ours.peftlab.current.layers)
    ema = peftlab.controller(ours).ema
    with torch.no_grad():
        for name in names:
            peft_layer = theirs.base_model.model.get_submodule(name)
            for key in ("lora_A", "lora_E", "lora_B"):
                getattr(peft_layer, key)["default"].normal_(0, 0.1)  # E non-zero from the start
                getattr(ours.peftlab.current.layers[name], key).copy_(getattr(peft_layer, key)["default"])
    their_opt = torch.optim.AdamW([p for p in theirs.parameters() if p.requires_grad], lr=2e-2)
    x = tokens(batch=4, length=12)
    averages = {}  # PEFT's Ī and Ū after its step (it drops them once the pattern is final)

    def compare(step):
        for name in names:
            peft_layer, layer = theirs.base_model.model.get_submodule(name), ours.peftlab.current.layers[name]
            for key in ("lora_A", "lora_E", "lora_B"):
                torch.testing.assert_close(getattr(layer, key), getattr(peft_layer, key)["default"],
                                           atol=1e-5, rtol=1e-4, msg=f"{name}.{key} after step {step}")
                if step <= 18:
                    for part in ("I", "U"):
                        torch.testing.assert_close(ema[f"{name}.{key}"][part], averages[f"{name}.{key}.default", part],
                                                   atol=1e-7, rtol=1e-4, msg=f"{part} of {name}.{key} after step {step}")
            assert torch.equal(layer.lora_E[:, 0] != 0, peft_layer.lora_E["default"][:, 0] != 0), (name, step)

    def their_step(step):
        theirs(input_ids=x, labels=x).loss.backward()  # PEFT adds γ·R to the loss in forward
        their_opt.step()
        allocator = theirs.base_model.rankallocator
        if step == 18:  # this call forces the mask without updating the averages, then drops them
            averages.update({(n, "I"): v.clone() for n, v in allocator.exp_avg_ipt.items()})
            averages.update({(n, "U"): v.clone() for n, v in allocator.exp_avg_unc.items()})
        theirs.base_model.update_and_allocate(step)
        if step < 18:
            averages.update({(n, "I"): v.clone() for n, v in allocator.exp_avg_ipt.items()})
            averages.update({(n, "U"): v.clone() for n, v in allocator.exp_avg_unc.items()})
        their_opt.zero_grad()

    def both(step):
        their_step(step)
        compare(step)

    lifecycle_steps(ours, 24, batch=x, lr=2e-2, after=both)
    assert peftlab.controller(ours).report()["budget"] == 2 * len(names)


def test_resume_continues_exactly(tmp_path):
    torch.manual_seed(0)
    full = adalora()
    lifecycle_steps(full, 20)

    torch.manual_seed(0)
    first = adalora()
    opt1 = lifecycle_steps(first, 9)
    params = {n: p.detach().clone() for n, p in first.named_parameters() if p.requires_grad}
    ctl_state, opt_state = peftlab.controller(first).state_dict(), opt1.state_dict()

    second = adalora()
    with torch.no_grad():
        for n, p in second.named_parameters():
            if p.requires_grad:
                p.copy_(params[n])
    opt2 = adapter_optimizer(second)
    opt2.load_state_dict(opt_state)
    peftlab.controller(second).load_state_dict(ctl_state)
    lifecycle_steps(second, 11, opt2, start=9)
    for (n, a), b in zip(full.named_parameters(), second.parameters()):
        assert torch.equal(a, b), n
    assert peftlab.controller(full).report() == peftlab.controller(second).report()


@pytest.mark.parametrize("kwargs, message", [
    ({"total_step": 0}, "adalora: total_step must be an integer >= 1, got 0"),
    ({"total_step": 10, "tinit": 5, "tfinal": 5}, r"tinit=5 \+ tfinal=5 must be < total_step=10"),
    ({"total_step": 10, "init_r": 4, "target_r": 6}, "target_r=6 must be between 1 and init_r=4"),
])
def test_inconsistent_schedules_are_errors_with_the_numbers(kwargs, message):
    with pytest.raises(ValueError, match=message):
        peftlab.get_config("adalora", **kwargs)


def test_run_length_comes_from_the_front_end_when_unset():
    model = adalora(total_step=None, tinit=None, tfinal=None)
    ctl = peftlab.controller(model)
    with pytest.raises(RuntimeError, match="expect_total_steps"):
        lifecycle_steps(model, 1)
    ctl.expect_total_steps(40)  # the schedule, and the saved config, now follow the run's length
    assert (ctl.config.total_step, ctl.config.tinit, ctl.config.tfinal) == (40, 6, 14)
    assert model.peftlab.current.config.total_step == 40
    with pytest.raises(ValueError, match="total_step=40 but training runs 30"):
        ctl.expect_total_steps(30)


def test_trainer_refuses_a_schedule_for_another_run_length(tmp_path):
    from train_job import lm_dataset

    model = adalora(total_step=50)
    cfg = peftlab.TrainConfig(output_dir=str(tmp_path), max_steps=20, disable_tqdm=True)
    with pytest.raises(ValueError, match="total_step=50 but training runs 20 optimizer steps"):
        peftlab.Trainer(model, cfg, lm_dataset()).train()


@pytest.mark.parametrize("method, low, high", [
    ("adalora", 0.5, 2), ("increlora", 0.5, 2), ("allora", 0.5, 2),  # both factors turn, as LoRA's do
    ("randlora", 2, 4.5), ("sara", 2, 4.5),  # fixed bases / coordinates: larger steps to keep LoRA's pace
])
def test_default_first_steps_change_the_update_as_lora_needs(method, low, high):
    """The drop-in property behind the defaults, on a 384-wide layer (MiniLM's): three AdamW steps at
    the same learning rate from the initial state move ΔW about as far as LoRA's defaults do when
    the method, like LoRA, learns both the directions and the size of its update. RandLoRA (fixed
    random bases) and SaRA (fixed coordinates) cannot turn their steps toward the gradient as
    LoRA's A does later on; they start ~3x larger (randlora_alpha's default, SaRA's step_scale).
    PEFT's parametrizations move ~100x less (AdaLoRA: E = 0) or ~7x more (RandLoRA: alpha 640)."""
    torch.manual_seed(0)
    x, target = torch.randn(64, 384), torch.randn(64, 384)

    def first_step_change(name, **kwargs):
        model = torch.nn.Sequential()
        model.add_module("proj", torch.nn.Linear(384, 384))
        peftlab.wrap(model, name, target_modules=["proj"], **kwargs)
        ctl = peftlab.controller(model)
        ctl.expect_total_steps(100)
        optimizer = adapter_optimizer(model, lr=1e-3)
        ctl.bind_optimizer(optimizer)
        layer = model.peftlab.current.layers["proj"]
        before = layer.delta_weight()
        for step in range(3):  # AdaLoRA's and IncreLoRA's A, B move once E is non-zero
            ((model(x) - target) ** 2).mean().backward()
            ctl.before_optimizer_step(step)
            optimizer.step()
            ctl.after_optimizer_step(step)
            optimizer.zero_grad()
        return (layer.delta_weight() - before).norm().item()

    lora = first_step_change("lora")
    assert low < first_step_change(method) / lora < high, method
    paper = {"adalora": (dict(init_like_lora=False), 0, 0.2), "sara": (dict(step_scale=1.0), 0.5, 2),
             "randlora": (dict(randlora_alpha=640.0), 4.5, 20)}.get(method)
    if paper:  # the paper's or PEFT's setting, for contrast
        settings, low, high = paper
        assert low < first_step_change(method, **settings) / lora < high, (method, settings)
