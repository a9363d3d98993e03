"""QLoRA on CPU: a 4-bit NF4 base (bitsandbytes) with a LoRA adapter, trained by peftlab.Trainer,
then merged onto the dequantized base (never re-quantized).

    python examples/qlora.py
"""
import tempfile

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import peftlab
from peftlab import load_model

torch.manual_seed(0)
with tempfile.TemporaryDirectory() as tmp:
    LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(tmp)
    model = load_model(tmp, "causal-lm", load_in_4bit=True)
peftlab.wrap(model, "lora", r=8, lora_alpha=16)
print(peftlab.trainable_summary(model))
rows = [{"input_ids": torch.arange(s, s + 16) % 96, "attention_mask": torch.ones(16, dtype=torch.long),
         "labels": torch.arange(s, s + 16) % 96} for s in range(0, 64, 2)]
with tempfile.TemporaryDirectory() as out:
    trainer = peftlab.Trainer(model, peftlab.TrainConfig(output_dir=out, max_steps=40, learning_rate=2e-2,
                                                         per_device_train_batch_size=8, disable_tqdm=True),
                              rows, eval_dataset=rows[:8])
    print("perplexity before:", round(trainer.evaluate()["eval_perplexity"], 1))
    print("perplexity after: ", round(trainer.train()["eval_perplexity"], 1))
merged = peftlab.merge(model)  # warns: merged onto the dequantized float32 weights
print(type(merged.model.layers[0].self_attn.q_proj).__name__, merged.model.layers[0].self_attn.q_proj.weight.dtype)
