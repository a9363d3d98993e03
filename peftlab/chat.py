"""Conversations for causal-LM training: rows as chat messages, chat templates (the tokenizer's own,
a named one, or a Jinja file), the system prompt, and token ids with the loss on the assistant
turns only; packed into blocks without attention across examples when asked."""
from __future__ import annotations

import difflib
import math
from pathlib import Path
from typing import Any

import torch

from .data import cell_text

ROLES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant"}

# Named templates for base models without one; each renders a conversation as its model family's chat
# format and, with add_generation_prompt, opens an assistant turn. `end` closes an assistant turn.
TEMPLATES = {
    "chatml": ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
               "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}", "<|im_end|>"),
    "llama3": ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
               "{{ m['content'] }}<|eot_id|>{% endfor %}"
               "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}", "<|eot_id|>"),
    "mistral": ("{{ bos_token }}{% set system = messages[0]['content'] + '\n\n' if messages[0]['role'] == 'system' "
                "else '' %}{% for m in messages if m['role'] != 'system' %}{% if m['role'] == 'user' %}[INST] "
                "{{ system if loop.first else '' }}{{ m['content'] }} [/INST]{% else %}{{ m['content'] }}</s>{% endif %}"
                "{% endfor %}", "</s>"),
    "gemma": ("{{ bos_token }}{% set system = messages[0]['content'] + '\n\n' if messages[0]['role'] == 'system' "
              "else '' %}{% for m in messages if m['role'] != 'system' %}<start_of_turn>"
              "{{ 'model' if m['role'] == 'assistant' else 'user' }}\n{{ system if loop.first else '' }}"
              "{{ m['content'] }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n"
              "{% endif %}", "<end_of_turn>"),
    "phi3": ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
             "{% if add_generation_prompt %}<|assistant|>\n{% endif %}", "<|end|>"),
}


def use_chat_template(tokenizer, name_or_file: str) -> None:
    """Give the tokenizer a named template (chatml, llama3, mistral, gemma, phi3) or one read from a
    Jinja file. When the template's end-of-turn marker is one token of the vocabulary it becomes the
    EOS token, so generation stops where training taught the model to stop."""
    if name_or_file in TEMPLATES:
        template, end = TEMPLATES[name_or_file]
    elif Path(name_or_file).is_file():
        template, end = Path(name_or_file).read_text(), None
    else:
        raise ValueError(f"chat_template={name_or_file!r} is neither a template name ({', '.join(TEMPLATES)}) nor a "
                         "Jinja file")
    tokenizer.chat_template = template
    if end is not None and tokenizer.convert_tokens_to_ids(end) not in (None, tokenizer.unk_token_id):
        tokenizer.eos_token = end


def default_system_prompt(tokenizer) -> str | None:
    """The system prompt the tokenizer's chat template adds to a conversation that has none, if any
    (SmolLM2's "You are a helpful AI assistant named SmolLM..."): what rendering without a system
    turn adds over rendering with an empty one."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    user = [{"role": "user", "content": "\x00"}]
    bare = tokenizer.apply_chat_template(user, tokenize=False)
    empty = tokenizer.apply_chat_template([{"role": "system", "content": ""}] + user, tokenize=False)
    added = "".join(bare[i:j] for op, _, _, i, j in difflib.SequenceMatcher(None, empty, bare).get_opcodes()
                    if op in ("insert", "replace")).strip()
    return added if len(bare) > len(empty) and added else None


def conversation(row: dict[str, Any], source: str, number: int, prompt_column: str = "prompt",
                 response_column: str = "response", messages_column: str = "messages") -> list[dict[str, str]] | None:
    """A row as chat messages: OpenAI `messages` (role/content), ShareGPT `conversations`
    (from/value), alpaca `instruction` [+ `input`] + `output`, or `prompt` + `response` (the three
    column names are settings); None for a plain `text` row."""
    where = f"{source}, row {number}"
    if messages_column in row or "conversations" in row:
        key = messages_column if messages_column in row else "conversations"
        turns = row[key]
        if not isinstance(turns, list) or not turns:
            raise ValueError(f"{where}: {key!r} must be a non-empty list of turns")
        messages = []
        for turn in turns:
            role, content = (turn.get("role"), turn.get("content")) if "role" in turn else (turn.get("from"), turn.get("value"))
            if role not in ROLES or not isinstance(content, str):
                raise ValueError(f"{where}: each turn needs a role in {sorted(ROLES)} and text content, got "
                                 f"{str(turn)[:120]}")
            messages.append({"role": ROLES[role], "content": content})
    elif "instruction" in row or "output" in row:
        instruction, output = cell_text(row, "instruction", source, number), cell_text(row, "output", source, number)
        extra = str(row.get("input") or "")
        messages = [{"role": "user", "content": f"{instruction}\n\n{extra}" if extra else instruction},
                    {"role": "assistant", "content": output}]
    elif prompt_column in row or response_column in row:
        messages = [{"role": "user", "content": cell_text(row, prompt_column, source, number)},
                    {"role": "assistant", "content": cell_text(row, response_column, source, number)}]
    else:
        return None
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError(f"{where}: the conversation has no assistant turn, so nothing to learn")
    empty = [i for i, m in enumerate(messages, 1) if m["role"] == "assistant" and not m["content"].strip()]
    if empty:
        raise ValueError(f"{where}: turn {empty[0]} is an empty assistant turn; give it an answer or remove it")
    return messages


def encode_chat(messages: list[dict[str, str]], tokenizer, where: str) -> tuple[list[int], list[int]]:
    """(input_ids, labels) with the loss on the assistant turns only. With a chat template each
    assistant turn's tokens are found by rendering the conversation up to it (the template must
    render a prefix of a conversation as a prefix of its tokens); without one the turns are
    joined as plain text, each assistant turn followed by EOS."""
    if getattr(tokenizer, "chat_template", None):
        full = list(_ids(tokenizer.apply_chat_template(messages, tokenize=True)))
        labels = [-100] * len(full)
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            head = list(_ids(tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True, tokenize=True)))
            upto = list(_ids(tokenizer.apply_chat_template(messages[:i + 1], tokenize=True)))
            if full[:len(upto)] != upto or upto[:len(head)] != head:
                raise ValueError(f"{where}: the tokenizer's chat template does not render the conversation up to "
                                 "a turn as a prefix of the whole, so the assistant tokens cannot be located")
            labels[len(head):len(upto)] = upto[len(head):]
        return full, labels
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids: list[int] = []
    labels: list[int] = []
    for message in messages:
        piece = tokenizer(message["content"], add_special_tokens=not ids)["input_ids"]
        if message["role"] == "assistant":
            piece = piece + eos
        ids += piece
        labels += piece if message["role"] == "assistant" else [-100] * len(piece)
    return ids, labels


def causal_lm_features(rows: list[dict[str, Any]], tokenizer, source: str, max_length: int, packing: bool = False,
                       drop_truncated: bool = False, max_truncated_fraction: float = 1.0,
                       system_prompt: str | None = None, columns: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Plain `text` rows train on every token; conversations (see `conversation`) on the assistant
    turns only, those without a system turn getting `system_prompt` when it is set ("" = an empty
    one, which keeps a template from adding its default). Truncation is reported: an example whose
    every target token falls beyond max_length is an error (or, with `drop_truncated`, dropped with
    a note), and examples that lose some of their targets (the end of an answer, its end-of-turn
    token) are counted and refused above `max_truncated_fraction`. With `packing`, whole examples
    are packed into blocks of at most max_length (see `pack`)."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    features, emptied = [], []
    cut_rows = cut_tokens = targets = 0
    for number, row in enumerate(rows, 1):
        messages = conversation(row, source, number, **(columns or {}))
        if messages is None:
            full = tokenizer(cell_text(row, "text", source, number))["input_ids"] + eos
            labels = list(full)
        else:
            if system_prompt is not None and messages[0]["role"] != "system":
                messages = [{"role": "system", "content": system_prompt}, *messages]
            full, labels = encode_chat(messages, tokenizer, f"{source}, row {number}")
        total, kept = sum(x != -100 for x in labels), sum(x != -100 for x in labels[:max_length])
        targets += total
        if kept == 0:
            emptied.append((number, len(full)))
            continue
        if kept < total:
            cut_rows, cut_tokens = cut_rows + 1, cut_tokens + total - kept
        features.append((full[:max_length], labels[:max_length]))
    if emptied:
        number, length = emptied[0]
        message = (f"{source}: {len(emptied)} of {len(rows)} examples have no target tokens within max_length={max_length} "
                   f"(e.g. row {number}, {length} tokens): their responses were truncated away")
        if not drop_truncated:
            raise ValueError(f"{message}. Raise max_length, or drop them with drop_truncated=true")
        print(f"peftlab: {message}; dropped (drop_truncated=true)")
        if not features:
            raise ValueError(f"{source}: every example lost its target tokens to truncation; raise max_length")
    if cut_rows:
        message = (f"{source}: {cut_rows} of {len(rows)} examples ({cut_rows / len(rows):.1%}) lose the end of their "
                   f"targets to max_length={max_length} ({cut_tokens:,} of {targets:,} target tokens, the end-of-turn "
                   "token among them)")
        if cut_rows / len(rows) > max_truncated_fraction:
            raise ValueError(f"{message}, more than max_truncated_fraction={max_truncated_fraction}; raise max_length, "
                             f"or accept it with max_truncated_fraction={math.ceil(100 * cut_rows / len(rows)) / 100}")
        print(f"peftlab: note: {message}")
    if packing:
        return pack(features, max_length)
    return [{"input_ids": torch.tensor(ids), "attention_mask": torch.ones(len(ids), dtype=torch.long),
             "labels": torch.tensor(labels)} for ids, labels in features]


def encode_response(prompt: list[dict[str, str]], response: list[dict[str, str]], tokenizer,
                    where: str) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of a prompt's conversation followed by one response, the loss on the
    response alone (however many assistant turns the prompt holds)."""
    if getattr(tokenizer, "chat_template", None):
        head = list(_ids(tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)))
        full = list(_ids(tokenizer.apply_chat_template(prompt + response, tokenize=True)))
        if full[:len(head)] != head:
            raise ValueError(f"{where}: the tokenizer's chat template does not render the prompt as a prefix of the "
                             "prompt with its response, so the response tokens cannot be located")
        return full, [-100] * len(head) + full[len(head):]
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    head = tokenizer("\n".join(m["content"] for m in prompt))["input_ids"]
    tail = tokenizer("\n".join(m["content"] for m in response), add_special_tokens=False)["input_ids"] + eos
    return head + tail, [-100] * len(head) + tail


def preference_pair(row: dict[str, Any], source: str, number: int) -> tuple[list, list, list]:
    """(prompt, chosen, rejected) as messages from a preference row as TRL accepts it: `prompt`,
    `chosen`, `rejected` as strings or message lists, or `chosen`/`rejected` whole conversations whose
    shared beginning is the prompt."""
    where = f"{source}, row {number}"

    def messages(value: Any, role: str) -> list[dict[str, str]]:
        if isinstance(value, str):
            return [{"role": role, "content": value}]
        if isinstance(value, list) and value and all(isinstance(m, dict) and m.get("role") in ROLES for m in value):
            return [{"role": ROLES[m["role"]], "content": str(m.get("content", ""))} for m in value]
        raise ValueError(f"{where}: a preference row's prompt, chosen and rejected are text or lists of role/content "
                         f"turns, got {str(value)[:120]}")

    for key in ("chosen", "rejected"):
        if row.get(key) in (None, "", []):
            raise ValueError(f"{where}: no {key!r} response (columns: {', '.join(row)})")
    chosen, rejected = messages(row["chosen"], "assistant"), messages(row["rejected"], "assistant")
    if row.get("prompt") not in (None, "", []):
        prompt = messages(row["prompt"], "user")
    else:  # an implicit prompt: what the two conversations share
        shared = 0
        while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
            shared += 1
        prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
        if not prompt:
            raise ValueError(f"{where}: no 'prompt', and the chosen and rejected conversations share no beginning")
    if chosen == rejected:
        raise ValueError(f"{where}: the chosen and rejected responses are the same, so there is no preference")
    return prompt, chosen, rejected


def preference_features(rows: list[dict[str, Any]], tokenizer, source: str, max_length: int,
                        drop_truncated: bool = False, system_prompt: str | None = None) -> list[dict[str, Any]]:
    """DPO examples: the prompt with the chosen and with the rejected response, each trained on the
    response tokens only. A pair with a response cut away entirely by max_length is an error (or, with
    `drop_truncated`, dropped with a note)."""
    features, emptied = [], []
    for number, row in enumerate(rows, 1):
        prompt, chosen, rejected = preference_pair(row, source, number)
        if system_prompt is not None and prompt[0]["role"] != "system":
            prompt = [{"role": "system", "content": system_prompt}, *prompt]
        feature = {}
        for side, response in (("chosen", chosen), ("rejected", rejected)):
            ids, labels = encode_response(prompt, response, tokenizer, f"{source}, row {number}")
            feature.update({f"{side}_input_ids": torch.tensor(ids[:max_length]),
                            f"{side}_attention_mask": torch.ones(min(len(ids), max_length), dtype=torch.long),
                            f"{side}_labels": torch.tensor(labels[:max_length])})
        if any((feature[f"{side}_labels"][1:] == -100).all() for side in ("chosen", "rejected")):
            emptied.append(number)
            continue
        features.append(feature)
    if emptied:
        message = (f"{source}: {len(emptied)} of {len(rows)} pairs have a response cut away by max_length={max_length} "
                   f"(e.g. row {emptied[0]})")
        if not drop_truncated or not features:
            raise ValueError(f"{message}. Raise max_length, or drop them with drop_truncated=true")
        print(f"peftlab: {message}; dropped (drop_truncated=true)")
    return features


def pack(features: list[tuple[list[int], list[int]]], max_length: int) -> list[dict[str, Any]]:
    """Whole examples, in order, into blocks of at most max_length tokens. Each example keeps its own
    positions (position_ids restart at 0) and there is no attention mask, which makes transformers
    attend within each example only; an example's first token is no target (nothing of it precedes
    it), so a packed block trains on exactly the tokens its examples train on alone."""
    blocks: list[list[tuple[list[int], list[int]]]] = [[]]
    for ids, labels in features:
        if sum(len(i) for i, _ in blocks[-1]) + len(ids) > max_length:
            blocks.append([])
        blocks[-1].append((ids, labels))
    out = []
    for block in blocks:
        out.append({"input_ids": torch.tensor([t for ids, _ in block for t in ids]),
                    "position_ids": torch.tensor([p for ids, _ in block for p in range(len(ids))]),
                    "labels": torch.tensor([t for _, labels in block for t in [-100, *labels[1:]]])})
    return out


def chat_notes(tokenizer, chat: bool, system_prompt: str | None) -> list[str]:
    """What is worth saying before training a causal LM with this tokenizer."""
    notes = []
    if tokenizer.eos_token_id is None:
        notes.append("the tokenizer has no EOS token: examples end without one, so the model will not learn to stop")
    if not chat:
        return notes
    if not getattr(tokenizer, "chat_template", None):
        notes.append("the tokenizer has no chat template: conversation turns are joined as plain text, each assistant "
                     "turn followed by EOS (chat_template=chatml, llama3, mistral, gemma, phi3 or a Jinja file sets one)")
    default = default_system_prompt(tokenizer) if system_prompt is None else None
    if default:
        notes.append(f"the chat template adds its default system prompt to every conversation without one, and it is "
                     f"trained on: {default[:120]!r}; system_prompt=TEXT sets your own, system_prompt='' an empty one")
    return notes


def marked(tokenizer, example: dict[str, Any], limit: int = 1200) -> str:
    """An example as the model sees it, the tokens it is trained on between ⟦ and ⟧."""
    ids, labels = example["input_ids"].tolist(), example["labels"].tolist()
    pieces, inside = [], False
    for position, token in enumerate(ids):
        target = position > 0 and labels[position] != -100
        if target != inside:
            pieces.append("⟦" if target else "⟧")
            inside = target
        pieces.append(tokenizer.decode([token]))
    text_ = "".join(pieces) + ("⟧" if inside else "")
    return text_ if len(text_) <= limit else text_[:limit] + f" ... ({len(ids)} tokens)"


def _ids(encoded: Any) -> list[int]:
    return encoded["input_ids"] if isinstance(encoded, dict) or hasattr(encoded, "keys") else encoded
