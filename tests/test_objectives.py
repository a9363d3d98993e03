"""What the trainer minimizes: the mean over every target token of an optimizer step (whatever the
accumulation, in every front end), computed in chunks from the last hidden state with the same loss
and gradients as the full logits."""
import pytest
import torch
from transformers import Trainer, TrainingArguments

import peftlab
from peftlab.integrations import PeftlabCallback
from peftlab.trainers.objectives import CausalLM

from cases import CASES
from conftest import first_step_gradients, tiny_llama


def ragged_chat(lengths=(1, 12, 2, 9), prompt=6, seed=0) -> list[dict]:
    """Examples whose answers (the target tokens) differ a lot in length, after a masked prompt."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for answer in lengths:
        ids = torch.randint(0, 96, (prompt + answer,), generator=gen)
        labels = torch.cat([torch.full((prompt,), -100), ids[prompt:]])
        rows.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return rows


def reference_gradients(data: list[dict]) -> dict[str, torch.Tensor]:
    """One forward over every example, padded: the mean over all target tokens, the textbook loss."""
    model = wrapped()
    batch = peftlab.data.PadCollator()(data)
    model(**batch).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def wrapped():
    torch.manual_seed(0)
    return peftlab.wrap(tiny_llama(), "lora", r=4, init_lora_weights=False).train()


@pytest.mark.parametrize("batch, accumulation", [(4, 1), (1, 4), (2, 2)])
def test_every_target_token_weighs_the_same_whatever_the_accumulation(batch, accumulation, tmp_path):
    """Answers of 1 and 12 tokens: averaging micro-batch means (the pre-4.46 transformers bug) would
    weigh the 1-token answer's token 12x more under batch 1 x 4 than under batch 4 x 1."""
    data = ragged_chat()
    expected = reference_gradients(data)
    model = wrapped()
    grads = first_step_gradients(model)
    config = peftlab.TrainConfig(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=batch,
                                 gradient_accumulation_steps=accumulation, max_grad_norm=0, disable_tqdm=True,
                                 do_eval=False)
    peftlab.Trainer(model, config, data).train()
    for name in expected:
        torch.testing.assert_close(grads[name], expected[name], atol=1e-6, rtol=1e-5, msg=name)


def test_the_transformers_trainer_path_weighs_tokens_the_same(tmp_path):
    data = ragged_chat()
    expected = reference_gradients(data)
    model = wrapped()
    grads = first_step_gradients(model)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=1,
                             gradient_accumulation_steps=4, max_grad_norm=0, report_to=[], use_cpu=True,
                             disable_tqdm=True, save_strategy="no")
    Trainer(model=model, args=args, train_dataset=data, callbacks=[PeftlabCallback()]).train()
    for name in expected:
        torch.testing.assert_close(grads[name], expected[name], atol=1e-6, rtol=1e-5, msg=name)


def losses_and_gradients(model, batch, chunked: bool, chunk: int = 5):
    model.zero_grad()
    if chunked:
        objective = CausalLM()
        with objective.context(model):
            objective.stand_in.chunk = chunk  # several chunks, one of them partial
            loss, _ = objective.losses(model, batch)
        loss = loss / objective.count(batch)
    else:
        loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("method", sorted(CASES))
@pytest.mark.parametrize("four_bit", [False, True], ids=["float", "nf4"])
def test_the_chunked_loss_equals_the_full_logits(method, four_bit, tmp_path):
    base = tiny_llama()
    if four_bit:
        base.save_pretrained(tmp_path)
        base = peftlab.load_model(str(tmp_path), "causal-lm", load_in_4bit=True)
    model = peftlab.wrap(base, method, **CASES[method].config).train()
    batch = peftlab.data.PadCollator()(ragged_chat())
    plain_loss, plain = losses_and_gradients(model, batch, chunked=False)
    loss, grads = losses_and_gradients(model, batch, chunked=True)
    assert model.lm_head.__class__.__name__ != "TokenLogProbs", "the model's own head is back"
    torch.testing.assert_close(loss, plain_loss, atol=1e-5, rtol=1e-5)
    assert grads.keys() == plain.keys() and grads
    for name in plain:
        torch.testing.assert_close(grads[name], plain[name], atol=1e-5, rtol=1e-4, msg=name)


def test_a_trained_head_gets_its_gradient_through_the_chunks():
    """modules_to_save on the output head: its own gradient comes through the checkpointed chunks."""
    torch.manual_seed(0)
    model = peftlab.wrap(tiny_llama(), "lora", r=2, modules_to_save=["lm_head"]).train()
    batch = peftlab.data.PadCollator()(ragged_chat())
    plain_loss, plain = losses_and_gradients(model, batch, chunked=False)
    loss, grads = losses_and_gradients(model, batch, chunked=True)
    assert any("lm_head" in n for n in grads)
    for name in plain:
        torch.testing.assert_close(grads[name], plain[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.slow
def test_two_processes_weigh_tokens_as_one(tmp_path):
    """Answers of 1 to 12 tokens spread over two processes: each process's token sum is divided by the
    step's token count over both, so two processes equal one with the same global batch."""
    from train_job import assert_same_training, run_job

    one = run_job(tmp_path / "one", "lora", "--per-device", "4", "--ragged")
    two = run_job(tmp_path / "two", "lora", "--per-device", "2", "--ragged", processes=2)
    assert_same_training("lora", one, two)
