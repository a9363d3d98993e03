"""GGUF files for llama.cpp, ollama and LM Studio, written with the `gguf` package: the merged model
(`peftlab export RUN --as gguf`) or a llama.cpp LoRA adapter for the base (`--as gguf-lora`).

The layout is llama.cpp's own (its convert_hf_to_gguf.py and convert_lora_to_gguf.py): tensor names
from gguf's name map, weights as [out, in] (GPT-2's Conv1D transposed), Llama's q/k rows
interleaved per head for its rotary embedding, norms and biases in float32, the tokenizer's
vocabulary, merges, special tokens and chat template in the metadata. Architectures: Llama, Mistral
(written as llama, as llama.cpp does), Qwen2 and GPT-2; others are refused by name.
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

OUTTYPES = ("f32", "f16", "bf16", "q8_0")
ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "gpt2": "gpt2"}


def _gguf():
    try:
        import gguf
    except ImportError as e:
        raise ImportError("GGUF export needs the gguf package: pip install gguf") from e
    return gguf


def _architecture(config: Any) -> str:
    arch = ARCHITECTURES.get(config.model_type)
    if arch is None:
        raise ValueError(f"GGUF export knows the {', '.join(sorted(ARCHITECTURES))} architectures; this model is "
                         f"{config.model_type!r}: merge it (peftlab merge) and convert it with llama.cpp's "
                         "convert_hf_to_gguf.py")
    scaling = getattr(config, "rope_scaling", None)
    if scaling and scaling.get("rope_type", scaling.get("type")) not in (None, "default"):
        raise ValueError(f"this model's rope_scaling {scaling} is not written by peftlab's GGUF export; merge it "
                         "(peftlab merge) and convert it with llama.cpp's convert_hf_to_gguf.py")
    return arch


def _architecture_and_names(gguf: Any, config: Any) -> tuple[str, Any]:
    """The GGUF architecture and gguf's map from this model's tensor names to llama.cpp's."""
    arch = _architecture(config)
    blocks = config.n_layer if arch == "gpt2" else config.num_hidden_layers
    return arch, gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], blocks)


def _permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """HF Llama's q/k rows (each head's two rotary halves apart) to llama.cpp's (interleaved pairs)."""
    return (weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def _in_gguf_layout(name: str, weight: np.ndarray, config: Any, arch: str) -> np.ndarray:
    if arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
        heads = config.num_attention_heads if "q_proj" in name else config.num_key_value_heads
        return _permute(weight, heads)
    if arch == "gpt2" and weight.ndim == 2 and name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
        return weight.T  # Conv1D stores [in, out]
    return weight


def _tensor_name(names: Any, name: str) -> str:
    mapped = names.get_name(name, try_suffixes=(".weight", ".bias"))
    if mapped is None:
        raise ValueError(f"{name} has no GGUF tensor name for this architecture; convert with llama.cpp's "
                         "convert_hf_to_gguf.py")
    return mapped


def _encode(gguf: Any, data: np.ndarray, outtype: str, name: str) -> tuple[np.ndarray, Any]:
    """The tensor's bytes and type: norms, biases and other vectors stay float32 (as llama.cpp keeps
    them); Q8_0 needs rows in blocks of 32 and falls back to F16 otherwise."""
    kinds = gguf.GGMLQuantizationType
    kind = {"f32": kinds.F32, "f16": kinds.F16, "bf16": kinds.BF16, "q8_0": kinds.Q8_0}[outtype]
    if data.ndim < 2 or name.endswith(".bias") or "norm" in name:
        kind = kinds.F32
    if kind == kinds.Q8_0 and data.shape[-1] % 32:
        kind = kinds.F16
    if kind == kinds.F32:
        return data.astype(np.float32), kind
    return gguf.quants.quantize(data.astype(np.float32), kind), kind


def _hyperparameters(writer: Any, config: Any, arch: str) -> None:
    if arch == "gpt2":
        writer.add_context_length(config.n_positions)
        writer.add_embedding_length(config.n_embd)
        writer.add_feed_forward_length(config.n_inner or 4 * config.n_embd)
        writer.add_block_count(config.n_layer)
        writer.add_head_count(config.n_head)
        writer.add_layer_norm_eps(config.layer_norm_epsilon)
        return
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(getattr(config, "rope_theta", None) or config.rope_parameters["rope_theta"])
    writer.add_rope_dimension_count(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
    writer.add_vocab_size(config.vocab_size)


def _tokenizer(writer: Any, gguf: Any, tokenizer: Any, config: Any) -> None:
    """The vocabulary of a byte-level BPE tokenizer (GPT-2, Llama 3, Qwen, SmolLM) as llama.cpp's
    "gpt2" tokenizer model, with its special tokens and chat template."""
    backend = json.loads(tokenizer.backend_tokenizer.to_str()) if getattr(tokenizer, "is_fast", False) else {}
    model = backend.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        kind = model.get("type") or type(tokenizer).__name__
        raise ValueError(f"GGUF export writes byte-level BPE tokenizers (GPT-2, Llama 3, Qwen, SmolLM); this one is "
                         f"{kind}{' with byte fallback (SentencePiece)' if model.get('byte_fallback') else ''}: merge "
                         "the model (peftlab merge) and convert it with llama.cpp's convert_hf_to_gguf.py")
    vocab_size = config.vocab_size
    if len(tokenizer) > vocab_size:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the model's embedding only {vocab_size}")
    added = {token.content: token.special for token in tokenizer.added_tokens_decoder.values()}
    tokens, types = [], []
    for token in tokenizer.convert_ids_to_tokens(list(range(len(tokenizer)))):
        tokens.append(token)
        types.append(gguf.TokenType.NORMAL if token not in added else
                     gguf.TokenType.CONTROL if added[token] else gguf.TokenType.USER_DEFINED)
    for i in range(len(tokens), vocab_size):  # an embedding padded past the vocabulary, as llama.cpp pads
        tokens.append(f"[PAD{i}]")
        types.append(gguf.TokenType.UNUSED)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer(backend, config.model_type))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in model["merges"]])
    for token_id, add in ((tokenizer.bos_token_id, writer.add_bos_token_id), (tokenizer.eos_token_id, writer.add_eos_token_id),
                          (tokenizer.pad_token_id, writer.add_pad_token_id), (tokenizer.unk_token_id, writer.add_unk_token_id)):
        if token_id is not None:
            add(token_id)
    writer.add_add_bos_token(bool(getattr(tokenizer, "add_bos_token", False)))
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def _pre_tokenizer(backend: dict, model_type: str) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenization (tokenizer.ggml.pre): GPT-2's byte-level
    split, SmolLM's (digits one by one, then byte-level), Llama 3's regex (numbers in threes) or
    Qwen2's (digits one by one); "default" otherwise, with a warning."""
    pre = backend.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre])
    kinds = [step.get("type") for step in steps]
    if kinds == ["ByteLevel"]:
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return "smollm"
    if kinds[:1] == ["Split"] and "ByteLevel" in kinds:
        pattern = json.dumps(steps[0].get("pattern"))
        if "{1,3}" in pattern:
            return "llama-bpe"
        if model_type == "qwen2":
            return "qwen2"
    warnings.warn(f"llama.cpp has no name for this tokenizer's pre-tokenization ({kinds}); written as 'default'",
                  stacklevel=3)
    return "default"


def write_gguf(model: nn.Module, tokenizer: Any, path: str | os.PathLike, outtype: str = "f16") -> dict[str, str]:
    """Write a plain (merged) transformers causal LM and its tokenizer as one GGUF file; returns each
    GGUF tensor's type. The file is written beside `path` and renamed into place."""
    gguf = _gguf()
    if outtype not in OUTTYPES:
        raise ValueError(f"outtype={outtype!r}; GGUF export writes {', '.join(OUTTYPES)}")
    config = model.config
    arch, names = _architecture_and_names(gguf, config)
    tied = getattr(config, "tie_word_embeddings", False)
    kinds: dict[str, str] = {}

    def write(tmp: str) -> None:
        writer = gguf.GGUFWriter(tmp, arch)
        writer.add_name(Path(str(getattr(config, "_name_or_path", "")) or "model").name)
        writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                              "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype])
        _hyperparameters(writer, config, arch)
        _tokenizer(writer, gguf, tokenizer, config)
        for name, tensor in model.state_dict().items():
            if (tied and name == "lm_head.weight") or name.endswith((".attn.bias", ".masked_bias", "rotary_emb.inv_freq")):
                continue  # tied head, GPT-2's causal-mask buffers, recomputed rotary frequencies
            data = _in_gguf_layout(name, tensor.detach().float().cpu().numpy(), config, arch)
            gguf_name = _tensor_name(names, name)
            encoded, kind = _encode(gguf, data, outtype, gguf_name)
            writer.add_tensor(gguf_name, encoded, raw_dtype=kind)
            kinds[gguf_name] = kind.name
        _finish(writer)

    from .io import atomic_write

    atomic_write(path, write)
    return kinds


def write_gguf_lora(model: nn.Module, path: str | os.PathLike, rank: int | None = None) -> dict[str, float]:
    """Write a wrapped model's adapter as a llama.cpp LoRA adapter (`llama-cli -m BASE.gguf --lora
    FILE`): each module's factors in GGUF layout, their scale folded into B (the file's one alpha is
    the top rank). Exact for low-rank methods; with `rank`, or for full-rank methods, the truncated
    SVD of each update. Returns each module's relative error ‖BA − ΔW‖ / ‖ΔW‖."""
    gguf = _gguf()
    from .adapters.inject import state_of
    from .io import atomic_write

    if rank is not None and rank < 1:
        raise ValueError(f"the export rank must be >= 1, got {rank}")
    state = state_of(model)
    if state.modules_to_save:
        raise ValueError(f"this adapter also trains whole modules ({', '.join(state.modules_to_save)}), which a "
                         "llama.cpp LoRA cannot carry; export the merged model with --as gguf")
    config = model.config
    arch, names = _architecture_and_names(gguf, config)
    factors, errors = {}, {}
    for name, layer in state.layers.items():
        a, b = layer.lora_factors(rank)
        delta = layer.delta_weight()
        errors[name] = ((b @ a - delta).norm() / delta.norm()).item() if delta.any() else 0.0
        if a.shape[0]:
            factors[name] = (a.detach().float().cpu().numpy(), b.detach().float().cpu().numpy())
    if not factors:
        raise ValueError("every adapted module has a zero update; there is nothing to export")
    alpha = max(a.shape[0] for a, _ in factors.values())

    def write(tmp: str) -> None:
        writer = gguf.GGUFWriter(tmp, arch)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
        for name, (a, b) in factors.items():
            gguf_name = _tensor_name(names, f"{name}.weight")
            if arch == "llama" and name.endswith(("q_proj", "k_proj")):
                b = _permute(b, config.num_attention_heads if name.endswith("q_proj") else config.num_key_value_heads)
            b = b * (a.shape[0] / alpha)  # llama.cpp scales B·A by alpha / rank
            writer.add_tensor(f"{gguf_name}.lora_a", np.ascontiguousarray(a, dtype=np.float32))
            writer.add_tensor(f"{gguf_name}.lora_b", np.ascontiguousarray(b, dtype=np.float32))
        _finish(writer)

    atomic_write(path, write)
    return errors


def _finish(writer: Any) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
