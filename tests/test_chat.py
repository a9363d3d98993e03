"""The LLM journey: chat formats with loss on assistant turns only (token by token), truncation
that would leave nothing to learn, generation equal across base + adapter, merged model and HF
PEFT, and the README's walkthrough end to end."""
import json
import re
import shlex
from pathlib import Path

import pytest
import torch

import peftlab
from peftlab.cli import main
from peftlab.chat import causal_lm_features

from conftest import chat_rows, tiny_chat_llm

README = Path(__file__).resolve().parent.parent / "README.md"


@pytest.fixture(scope="module")
def chat_llm(tmp_path_factory):
    return tiny_chat_llm(tmp_path_factory.mktemp("tiny-chat-llm"))


@pytest.fixture(scope="module")
def tokenizer(chat_llm):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(chat_llm)


def targets(feature, tokenizer) -> list[str]:
    """The text of each run of labelled tokens."""
    ids, labels = feature["input_ids"].tolist(), feature["labels"].tolist()
    runs, current = [], []
    for token, label in zip(ids, labels):
        if label != -100:
            assert label == token
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    return runs + ([tokenizer.decode(current)] if current else [])


@pytest.mark.parametrize("row", [
    {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"},
                  {"role": "assistant", "content": "hi"}, {"role": "user", "content": "how are you"},
                  {"role": "assistant", "content": "very well"}]},
    {"conversations": [{"from": "human", "value": "hello there"}, {"from": "gpt", "value": "hi"},
                       {"from": "human", "value": "how are you"}, {"from": "gpt", "value": "very well"}]},
])
def test_loss_falls_on_every_assistant_turn_and_nothing_else(row, tokenizer):
    (feature,) = causal_lm_features([row], tokenizer, "mem", max_length=256)
    assert targets(feature, tokenizer) == ["hi [SEP]", "very well [SEP]"]
    prompt_tokens = [t for t, l in zip(feature["input_ids"].tolist(), feature["labels"].tolist()) if l == -100]
    assert "hello there" in tokenizer.decode(prompt_tokens) and "how are you" in tokenizer.decode(prompt_tokens)


def test_alpaca_and_prompt_response_rows(tokenizer):
    rows = [{"instruction": "name a fruit", "input": "red ones", "output": "cherry"},
            {"instruction": "name a colour", "output": "blue"},
            {"prompt": "say yes", "response": "yes"}]
    features = causal_lm_features(rows, tokenizer, "mem", max_length=256)
    assert [targets(f, tokenizer) for f in features] == [["cherry [SEP]"], ["blue [SEP]"], ["yes [SEP]"]]
    assert "red ones" in tokenizer.decode(features[0]["input_ids"])


def test_without_a_chat_template_turns_are_plain_text_and_the_eos_closes_answers(tokenizer):
    plain = type(tokenizer).from_pretrained(tokenizer.name_or_path)
    plain.chat_template = None
    (feature,) = causal_lm_features(chat_rows(1), plain, "mem", max_length=256)
    assert targets(feature, plain)[-1].endswith("[SEP]") and len(targets(feature, plain)) == 2


@pytest.mark.parametrize("row, message", [
    ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "each turn needs a role"),
    ({"messages": "hi"}, "must be a non-empty list"),
])
def test_malformed_conversations_name_the_row(row, message, tokenizer):
    with pytest.raises(ValueError, match=f"mem, row 1: .*{message}"):
        causal_lm_features([row], tokenizer, "mem", max_length=64)


def test_truncation_that_leaves_no_target_is_an_error_or_dropped(tokenizer, capsys):
    long = {"prompt": "word " * 60, "response": "the answer"}
    rows = [long, {"prompt": "short", "response": "fine"}]
    with pytest.raises(ValueError, match=r"1 of 2 examples have no target tokens within max_length=32 "
                                         r"\(e\.g\. row 1, \d+ tokens\).*drop_truncated=true"):
        causal_lm_features(rows, tokenizer, "mem", max_length=32)
    kept = causal_lm_features(rows, tokenizer, "mem", max_length=32, drop_truncated=True)
    assert len(kept) == 1 and "dropped" in capsys.readouterr().out


def _generate(model, tokenizer, prompt, tokens=12):
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        out = model.eval().generate(ids, max_new_tokens=tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def walkthrough_commands() -> list[list[str]]:
    """The `peftlab` lines of the README's chat walkthrough."""
    text = README.read_text()
    section = text[text.index("### Walkthrough: a chat LLM"):]
    block = section[section.index("```bash") + 7: section.index("```", section.index("```bash") + 7)]
    return [shlex.split(line.split("#")[0]) for line in block.splitlines() if line.startswith("peftlab ")]


@pytest.mark.slow
@pytest.mark.parametrize("four_bit", [False, True])
def test_readme_walkthrough_chat_train_generate_merge(four_bit, chat_llm, tmp_path, monkeypatch, capsys):
    """The README's commands on a tiny Llama: the generated text is the same from base + adapter
    (the CLI), from HF PEFT with the same adapter, and from the merged model loaded by transformers."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.chdir(tmp_path)
    Path("tiny-llama").symlink_to(chat_llm)
    Path("chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chat_rows(48)))
    commands = walkthrough_commands()
    assert [c[1] for c in commands] == ["train", "generate", "merge"]
    printed = {}
    for command in commands:
        if four_bit and command[1] == "train":
            command = command + ["--load-in-4bit"]
        if command[1] == "generate":
            command = command + ["--max-new-tokens", "12"]
        assert main(command[1:] + (["max_steps=20", "disable_tqdm=true"] if command[1] == "train" else [])) == 0
        printed[command[1]] = capsys.readouterr().out
    prompt = commands[1][commands[1].index("--prompt") + 1]
    generated = printed["generate"].strip().splitlines()[-1].strip()
    tokenizer = AutoTokenizer.from_pretrained("merged")
    merged = AutoModelForCausalLM.from_pretrained("merged")
    assert getattr(merged.config, "quantization_config", None) is None
    assert _generate(merged, tokenizer, prompt) == generated
    if not four_bit:  # PEFT's own loader on the same adapter
        theirs = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(chat_llm), "runs/chat")
        assert _generate(theirs, tokenizer, prompt) == generated
    assert re.search(r"\w", generated), "it generated something"
    record = json.loads(Path("runs/chat/run.json").read_text())
    assert record["model"]["task"] == "causal-lm" and record["result"]["eval_loss"] < 11


def test_interactive_generation_keeps_the_conversation_and_ends_on_an_empty_line(chat_llm, monkeypatch, capsys):
    """--interactive: each answer is the greedy reply to the whole conversation so far."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peftlab.generate import converse, reply

    tokenizer = AutoTokenizer.from_pretrained(chat_llm)
    model = peftlab.wrap(AutoModelForCausalLM.from_pretrained(chat_llm), "lora", r=2)
    typed = iter(["which fruit is red?", "and its colour?", ""])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(typed))
    converse(model, tokenizer, None, system="answer with one fruit", max_new_tokens=6)
    printed = capsys.readouterr().out
    history = [{"role": "system", "content": "answer with one fruit"}, {"role": "user", "content": "which fruit is red?"}]
    first = reply(model, tokenizer, history, 6, stream=False)
    history.append({"role": "user", "content": "and its colour?"})
    second = reply(model, tokenizer, history, 6, stream=False)
    assert "interactive" in printed and first.strip() in printed and second.strip() in printed
    assert printed.index(first.strip()) < printed.rindex(second.strip())


@pytest.mark.slow
def test_readme_data_and_templates_run_verbatim(tmp_path, monkeypatch, capsys):
    """The README's data-and-templates commands: a save_to_disk directory trains exactly as the same
    rows in a .jsonl file (bitwise equal adapters), and renamed columns on a base without a chat
    template render through ChatML with the user's system prompt, the answer and its end of turn
    trained."""
    from datasets import Dataset, DatasetDict
    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from conftest import bpe_tokenizer

    monkeypatch.chdir(tmp_path)
    tokenizer = bpe_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    for directory, template in (("tiny-llama", tokenizer.chat_template), ("base-llama", None)):
        model.save_pretrained(directory)
        tokenizer.chat_template = template
        tokenizer.save_pretrained(directory)
    rows = chat_rows(24)
    DatasetDict({"train": Dataset.from_list(rows)}).save_to_disk("chat-ds")
    Path("chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    Path("qa.jsonl").write_text("".join(json.dumps({"question": f"which fruit is {c}?", "answer": f"a {f}"}) + "\n"
                                        for c, f in [("red", "cherry"), ("yellow", "banana")] * 4))
    text = README.read_text()
    section = text[text.index("### Data and templates as you have them"):]
    block = section[section.index("```bash") + 7: section.index("```", section.index("```bash") + 7)]
    commands = [shlex.split(line) for line in block.splitlines() if line.startswith("peftlab ")]
    assert len(commands) == 2 and "--dry-run" in commands[1]
    quick = ["max_steps=4", "disable_tqdm=true"]
    assert main(commands[0][1:] + quick) == 0
    same_rows = [a if a != "chat-ds" else "chat.jsonl" for a in commands[0][1:] if a != "split=train"]
    assert main([a if a != "runs/ds" else "runs/jsonl" for a in same_rows] + quick) == 0
    from_directory, from_file = (load_file(f"runs/{d}/adapter_model.safetensors") for d in ("ds", "jsonl"))
    assert from_directory.keys() == from_file.keys()
    assert all(torch.equal(from_directory[k], from_file[k]) for k in from_file)
    capsys.readouterr()
    assert main(commands[1][1:]) == 0
    shown = capsys.readouterr().out
    assert "<|im_start|>system\nAnswer with one fruit.<|im_end|>" in shown
    assert "<|im_start|>user\nwhich fruit is red?<|im_end|>" in shown and "⟦a cherry<|im_end|>" in shown

