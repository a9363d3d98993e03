"""PeftlabCallback under transformers.Trainer: the same lifecycle at the same points."""
import pytest
import torch
from transformers import Trainer, TrainingArguments

import peftlab
from peftlab.integrations import PeftlabCallback

from conftest import adapter_optimizer, first_step_gradients, tiny_llama
from test_trainer import spied
from train_job import lm_dataset


def hf_trainer(model, out, max_steps, **kw):
    args = TrainingArguments(output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=4,
                             gradient_accumulation_steps=2, learning_rate=1e-2, save_steps=2, logging_steps=1,
                             report_to=[], use_cpu=True, disable_tqdm=True, seed=3, **kw)
    return Trainer(model=model, args=args, train_dataset=lm_dataset(), callbacks=[PeftlabCallback(model, prepare_batches=3)])


def test_callback_calls_the_lifecycle_once_per_optimizer_step(tmp_path):
    model = peftlab.wrap(tiny_llama(), "lora", r=4)
    spy = spied(model)
    hf_trainer(model, tmp_path, max_steps=4).train()
    assert spy.calls == [("prepare", 3)] + [c for s in range(4) for c in (("before", s, True), ("after", s))]
    saved = torch.load(tmp_path / "checkpoint-4" / "peftlab_controller.pt", weights_only=True)
    assert saved["controller"]["calls"] == 1 + 4 * 2 and saved["skipped"].tolist() == [0, 0]


def test_callback_restores_controller_state_on_resume(tmp_path):
    model = peftlab.wrap(tiny_llama(), "lora", r=4)
    spied(model)
    hf_trainer(model, tmp_path, max_steps=4).train()
    again = peftlab.wrap(tiny_llama(), "lora", r=4)
    spy = spied(again)
    hf_trainer(again, tmp_path, max_steps=6).train(resume_from_checkpoint=True)
    assert spy.calls[0] == ("load", 9), "state of checkpoint-4 restored, prepare not run again"
    assert [c[1] for c in spy.calls if c[0] == "after"] == [4, 5]


def test_adalora_under_the_hf_trainer_reaches_its_target_budget(tmp_path):
    """With PEFT alone the HF Trainer never calls AdaLoRA's allocator (PEFT #1801); here it does."""
    model = peftlab.wrap(tiny_llama(), "adalora", init_r=6, target_r=2, total_step=12, tinit=2, tfinal=4)
    ctl = peftlab.controller(model)
    assert ctl.report()["budget"] == 6 * 14
    hf_trainer(model, tmp_path, max_steps=12).train()
    assert ctl.report()["budget"] == ctl.target_budget == 2 * 14
    masked = [l for l in model.peftlab.current.layers.values() if not l.active.all()]
    assert masked and all(torch.count_nonzero(l.lora_E[~l.active]) == 0 for l in masked)


def test_callback_refuses_a_schedule_for_another_run_length(tmp_path):
    import pytest

    model = peftlab.wrap(tiny_llama(), "adalora", total_step=50)
    with pytest.raises(ValueError, match="total_step=50 but training runs 4 optimizer steps"):
        hf_trainer(model, tmp_path, max_steps=4).train()


def test_penalty_joins_the_loss_once_per_step_in_every_front_end(tmp_path):
    """AdaLoRA's orthogonality term is part of the loss (so clipping sees it) and counts once per
    optimizer step under gradient accumulation: the gradients at before_optimizer_step agree across
    a hand-written loop, peftlab.Trainer and transformers.Trainer + PeftlabCallback."""
    data = lm_dataset(8)  # an epoch is one optimizer step: 2 micro-batches of 4 equal-length sequences
    settings = dict(init_r=4, target_r=2, orth_reg_weight=0.5, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])

    def model_and_recorder():
        torch.manual_seed(0)
        model = peftlab.wrap(tiny_llama(), "adalora", **settings).train()
        return model, peftlab.controller(model), first_step_gradients(model)

    model, ctl, by_hand = model_and_recorder()
    ctl.expect_total_steps(2)
    adapter_optimizer(model)
    batch = {k: torch.stack([row[k] for row in data]) for k in data[0]}
    (model(**batch).loss + ctl.penalty(0)).backward()
    ctl.before_optimizer_step(0)

    model, _, ours = model_and_recorder()
    peftlab.Trainer(model, peftlab.TrainConfig(output_dir=str(tmp_path / "ours"), max_steps=2, per_device_train_batch_size=4,
                                               gradient_accumulation_steps=2, max_grad_norm=0, disable_tqdm=True),
                    data).train()

    model, _, theirs = model_and_recorder()
    args = TrainingArguments(output_dir=str(tmp_path / "hf"), max_steps=2, per_device_train_batch_size=4,
                             gradient_accumulation_steps=2, max_grad_norm=0, report_to=[], use_cpu=True,
                             disable_tqdm=True, save_strategy="no")
    Trainer(model=model, args=args, train_dataset=data, callbacks=[PeftlabCallback()]).train()

    penalty_only = [n for n in by_hand if "lora_A" in n]  # E starts at 0: A's gradient is the penalty's alone
    assert all(by_hand[n].abs().sum() > 0 for n in penalty_only)
    for name in by_hand:
        torch.testing.assert_close(ours[name], by_hand[name], atol=1e-6, rtol=1e-5, msg=f"peftlab.Trainer {name}")
        torch.testing.assert_close(theirs[name], by_hand[name], atol=1e-6, rtol=1e-5, msg=f"HF Trainer {name}")


@pytest.mark.parametrize("method, settings", [("lora", {"r": 4}), ("adalora", {"init_r": 4, "target_r": 2})])
def test_hf_checkpoints_and_save_model_hold_the_adapter_once_in_peft_format_and_resume(method, settings, tmp_path):
    """Not the wrapped model under peftlab's names: a PEFT adapter that PeftModel loads, and a
    checkpoint that transformers' own resume continues from exactly, holding the adapter once."""
    from peft import PeftModel
    from safetensors.torch import load_file

    from conftest import tokens

    torch.manual_seed(0)
    model = peftlab.wrap(tiny_llama(), method, **settings)
    trainer = hf_trainer(model, tmp_path, max_steps=6)
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    for directory in (tmp_path / "checkpoint-4", tmp_path / "final"):
        assert (directory / "adapter_config.json").is_file() and (directory / "adapter_model.safetensors").is_file()
        weights = load_file(str(directory / "adapter_model.safetensors"))
        assert not any("base_layer" in k for k in weights), "no peftlab-internal names"
    assert not (tmp_path / "final" / "model.safetensors").exists()
    rest = load_file(str(tmp_path / "checkpoint-4" / "model.safetensors"))
    if method == "lora":  # the adapter file holds every trainable tensor: nothing twice
        assert rest == {}
    else:  # AdaLoRA's file holds the live ranks only; the full triplets are kept for exact resume
        assert rest and all(k.endswith(("lora_A", "lora_E", "lora_B")) for k in rest)
    x = tokens()
    model.eval()
    theirs = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "final")).eval()
    torch.testing.assert_close(theirs(x).logits, model(x).logits, atol=1e-5, rtol=1e-5)

    torch.manual_seed(0)
    again = peftlab.wrap(tiny_llama(), method, **settings)
    resumed = hf_trainer(again, tmp_path, max_steps=6)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))
    for (name, a), b in zip(model.named_parameters(), again.parameters()):
        if a.requires_grad:
            torch.testing.assert_close(b, a, atol=1e-6, rtol=0, msg=name)


def test_both_front_ends_take_the_same_steps_including_a_skipped_one():
    """peftlab.Trainer and transformers.Trainer + PeftlabCallback run one lifecycle: on the same data
    (one batch per step), with the third step's loss NaN, both skip exactly that step (no hook, no
    weight, no optimizer state moves; the schedule moves on), AdaLoRA prunes alike, and the adapters
    end equal."""
    import tempfile

    data = lm_dataset(4)
    settings = dict(init_r=4, target_r=2, total_step=8, tinit=1, tfinal=2, lora_dropout=0.0)

    def poisoned_model():
        torch.manual_seed(0)
        model = peftlab.wrap(tiny_llama(), "adalora", **settings)
        seen = []

        def poison(module, args, output):
            if module.training:
                seen.append(1)
                return output * float("nan") if len(seen) == 3 else output
        model.model.norm.register_forward_hook(poison)
        steps = []
        ctl = peftlab.controller(model)
        before = ctl.before_optimizer_step
        ctl.before_optimizer_step = lambda step: steps.append(step) or before(step)
        return model, steps

    with tempfile.TemporaryDirectory() as out:
        ours, our_steps = poisoned_model()
        trainer = peftlab.Trainer(ours, peftlab.TrainConfig(output_dir=out, max_steps=8, per_device_train_batch_size=4,
                                                            learning_rate=1e-2, disable_tqdm=True, do_eval=False), data)
        trainer.train()
        theirs, their_steps = poisoned_model()
        args = TrainingArguments(output_dir=out + "/hf", max_steps=8, per_device_train_batch_size=4, learning_rate=1e-2,
                                 report_to=[], use_cpu=True, disable_tqdm=True, save_strategy="no")
        callback = PeftlabCallback()
        Trainer(model=theirs, args=args, train_dataset=data, callbacks=[callback]).train()
    assert our_steps == their_steps == [0, 1, 3, 4, 5, 6, 7], "step 2 skipped by both"
    assert trainer.lifecycle.skipped_total == callback.lifecycle.skipped_total == 1
    assert peftlab.controller(ours).report() == peftlab.controller(theirs).report()
    for (name, a), b in zip(ours.named_parameters(), theirs.parameters()):
        if a.requires_grad:
            torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5, msg=name)
