"""GGUF export: the merged model read back by transformers' own GGUF loader computes what the merged
model computes (tensor names, shapes, metadata, tokenizer and chat template too), and a llama.cpp
LoRA file's B·A, at llama.cpp's alpha / rank scale, is exactly the merged GGUF minus the base GGUF."""
import copy
import json
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch

import peftlab
from conftest import CHATML, TEXT, bpe_tokenizer, randomize_adapters
from peftlab.gguf_export import write_gguf, write_gguf_lora

gguf = pytest.importorskip("gguf")
from gguf import GGUFReader  # noqa: E402


def tiny_lm(kind: str, vocab: int):
    import transformers as t

    torch.manual_seed(0)
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False)
    # Mistral with tied embeddings (as SmolLM2 and small Qwens have); GPT-2 at its 1024 positions, since
    # transformers' GGUF reader sets n_ctx from the file but leaves n_positions at GPT-2's 1024
    config = {"llama": lambda: t.LlamaConfig(**common),
              "mistral": lambda: t.MistralConfig(**{**common, "tie_word_embeddings": True}, sliding_window=None),
              "qwen2": lambda: t.Qwen2Config(**common), "gpt2": lambda: t.GPT2Config(
                  vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, tie_word_embeddings=False)}[kind]()
    return t.AutoModelForCausalLM.from_config(config).eval()


def trained(kind: str, tokenizer, method: str = "lora", **overrides):
    """(base, wrapped model with a non-zero update) of one tiny architecture."""
    base = tiny_lm(kind, vocab=len(tokenizer) + 3)  # an embedding padded past the vocabulary
    model = peftlab.wrap(copy.deepcopy(base), method, target_modules="all-linear", **overrides)
    randomize_adapters(model, std=0.2)
    return base, model


def prompt_ids(tokenizer, text: str) -> torch.Tensor:
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
    return torch.tensor([tokenizer(rendered, add_special_tokens=False)["input_ids"]])


def read_back(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return (AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval(),
            AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name))


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2", "gpt2"])
def test_merged_gguf_reads_back_as_the_merged_model(kind, tmp_path):
    tokenizer = bpe_tokenizer()
    _, model = trained(kind, tokenizer)
    merged = peftlab.merge(model)
    kinds = write_gguf(merged, tokenizer, tmp_path / "model.gguf", outtype="f32")
    assert set(kinds.values()) == {"F32"}

    reader = GGUFReader(str(tmp_path / "model.gguf"))
    fields = {name: field.contents() for name, field in reader.fields.items()
              if not name.startswith("tokenizer.ggml.") or name.endswith("_id") or name.endswith(".model")}
    assert fields["general.architecture"] == ("gpt2" if kind == "gpt2" else "qwen2" if kind == "qwen2" else "llama")
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.chat_template"] == CHATML
    assert fields["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    assert len(tokens) == merged.config.vocab_size and tokens[-1] == f"[PAD{merged.config.vocab_size - 1}]"
    assert tokens[:len(tokenizer)] == tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    names = {t.name for t in reader.tensors}
    assert "token_embd.weight" in names and "blk.1.ffn_down.weight" in names
    assert ("output.weight" in names) == (kind != "mistral")  # a tied head is the embedding

    loaded, loaded_tokenizer = read_back(tmp_path / "model.gguf")
    with torch.no_grad():
        for text in TEXT[:2]:
            ids = prompt_ids(tokenizer, text)
            torch.testing.assert_close(loaded(ids).logits, merged(ids).logits, atol=1e-5, rtol=1e-5)
    if kind != "qwen2":  # transformers reads a qwen2 file's tokenizer with Qwen2's own pre-tokenizer regex
        for text in TEXT:
            assert loaded_tokenizer(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert loaded_tokenizer.chat_template == CHATML


@pytest.mark.parametrize("outtype,expected", [("f16", "F16"), ("bf16", "BF16"), ("q8_0", "Q8_0")])
def test_smaller_types_quantize_matrices_and_keep_vectors_float32(outtype, expected, tmp_path):
    """Every matrix read back is exactly gguf's quantize-dequantize of the merged weight (Q8_0's
    blocks run along rows, which Llama's q/k row permutation leaves whole); vectors are exact."""
    from gguf.quants import dequantize, quantize

    tokenizer = bpe_tokenizer()
    _, model = trained("llama", tokenizer)
    merged = peftlab.merge(model)
    kinds = write_gguf(merged, tokenizer, tmp_path / "model.gguf", outtype=outtype)
    assert kinds["blk.0.attn_q.weight"] == expected and kinds["token_embd.weight"] == expected
    assert kinds["blk.0.attn_norm.weight"] == "F32" and kinds["output_norm.weight"] == "F32"
    loaded, _ = read_back(tmp_path / "model.gguf")
    kind = getattr(gguf.GGMLQuantizationType, expected)
    for name, weight in merged.state_dict().items():
        if name.endswith("inv_freq"):
            continue
        w = weight.numpy()
        expected_weight = dequantize(quantize(w, kind), kind).reshape(w.shape) if w.ndim == 2 else w
        np.testing.assert_array_equal(loaded.state_dict()[name].numpy(), expected_weight, err_msg=name)


@pytest.mark.parametrize("kind,method", [("llama", "lora"), ("qwen2", "adalora"), ("gpt2", "lora"), ("mistral", "sara")])
def test_lora_gguf_is_the_merged_gguf_minus_the_base_gguf(kind, method, tmp_path):
    """llama.cpp adds (alpha / rank) · B·A to each base tensor; that must be exactly the merged
    model's tensor, in GGUF layout (Llama's permuted q/k rows, GPT-2's transposed Conv1D)."""
    tokenizer = bpe_tokenizer()
    overrides = {"init_r": 6, "target_r": 4} if method == "adalora" else {}
    base, model = trained(kind, tokenizer, method, **overrides)
    rank = 8 if method == "sara" else None  # a full-rank method exports its truncated SVD
    errors = write_gguf_lora(model, tmp_path / "adapter.gguf", rank=rank)
    write_gguf(base, tokenizer, tmp_path / "base.gguf", outtype="f32")
    write_gguf(peftlab.merge(model), tokenizer, tmp_path / "merged.gguf", outtype="f32")
    if method != "sara":
        assert max(errors.values()) < 1e-5

    def tensors(name: str) -> dict[str, np.ndarray]:
        return {t.name: np.asarray(t.data).reshape(list(reversed(t.shape.tolist())))
                for t in GGUFReader(str(tmp_path / name)).tensors}

    lora_reader = GGUFReader(str(tmp_path / "adapter.gguf"))
    assert lora_reader.fields["general.type"].contents() == "adapter"
    assert lora_reader.fields["adapter.type"].contents() == "lora"
    alpha = lora_reader.fields["adapter.lora.alpha"].contents()
    lora, base_t, merged_t = tensors("adapter.gguf"), tensors("base.gguf"), tensors("merged.gguf")
    targets = sorted({n.rsplit(".", 1)[0] for n in lora})
    assert len(targets) == len(errors)
    for target in targets:
        a, b = lora[f"{target}.lora_a"], lora[f"{target}.lora_b"]
        update = (alpha / a.shape[0]) * (b.astype(np.float64) @ a.astype(np.float64))
        delta = merged_t[target].astype(np.float64) - base_t[target]
        if method == "sara":
            assert np.linalg.norm(update - delta) <= 1.01 * max(errors.values()) * np.linalg.norm(delta) + 1e-5
        else:
            np.testing.assert_allclose(update, delta, atol=2e-5, rtol=0)


def test_what_gguf_cannot_hold_is_refused_by_name(tmp_path, tiny_bert):
    from transformers import AutoTokenizer, BertConfig, BertLMHeadModel

    tokenizer = bpe_tokenizer()
    bert = BertLMHeadModel(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, intermediate_size=32, is_decoder=True))
    with pytest.raises(ValueError, match="'bert'.*convert_hf_to_gguf"):
        write_gguf(bert, tokenizer, tmp_path / "bert.gguf")
    _, model = trained("llama", tokenizer)
    merged = peftlab.merge(model)
    wordpiece = AutoTokenizer.from_pretrained(tiny_bert)
    with pytest.raises(ValueError, match="byte-level BPE.*WordPiece"):
        write_gguf(merged, wordpiece, tmp_path / "x.gguf")
    with pytest.raises(ValueError, match="outtype='q4_k'.*f32, f16, bf16, q8_0"):
        write_gguf(merged, tokenizer, tmp_path / "x.gguf", outtype="q4_k")
    saving = peftlab.wrap(tiny_lm("llama", len(tokenizer)), "lora", modules_to_save=["lm_head"])
    with pytest.raises(ValueError, match="lm_head.*--as gguf"):
        write_gguf_lora(saving, tmp_path / "x.gguf")
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*"))  # nothing half-written


def readme_export_commands() -> list[list[str]]:
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = text[text.index("### Export to llama.cpp (GGUF)"):]
    block = section[section.index("```bash") + 7: section.index("```", section.index("```bash") + 7)]
    return [shlex.split(line.split("#")[0]) for line in block.splitlines() if line.startswith("peftlab ")]


@pytest.mark.slow
def test_readme_gguf_commands_run_verbatim(tmp_path, monkeypatch, capsys):
    """The README's GGUF section on a tiny BPE Llama: the file transformers reads back generates the
    same greedy tokens as the run's base + adapter."""
    from conftest import chat_rows
    from transformers import AutoModelForCausalLM

    from peftlab.cli import main
    from peftlab.run import load_trained

    monkeypatch.chdir(tmp_path)
    tokenizer = bpe_tokenizer()
    tiny_lm("llama", len(tokenizer)).save_pretrained("tiny-llama")
    tokenizer.save_pretrained("tiny-llama")
    Path("chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chat_rows(24)))
    commands = readme_export_commands()
    assert [c[1] for c in commands] == ["train", "export", "export"]
    for command in commands:
        extra = ["max_steps=6", "disable_tqdm=true", "system_prompt=", "max_length=128"] if command[1] == "train" else []
        assert main(command[1:] + extra) == 0, capsys.readouterr()
    printed = capsys.readouterr().out
    assert "gguf/model-q8_0.gguf" in printed and "gguf/adapter-f32.gguf" in printed
    _, model, _ = load_trained("runs/chat")
    loaded = AutoModelForCausalLM.from_pretrained("gguf", gguf_file="model-q8_0.gguf", dtype=torch.float32)
    ids = prompt_ids(tokenizer, "which fruit is red?")
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert loaded.generate(ids, **kwargs).tolist() == model.generate(ids, **kwargs).tolist()
