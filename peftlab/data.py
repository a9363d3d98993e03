"""Batches for training: a padding collator and a deterministic, resumable batch order."""
from __future__ import annotations

import json
import math
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch


@dataclass
class PadCollator:
    """Pads `input_ids`-style features to the longest sequence in the batch (dynamic padding).

    `labels` that are sequences (causal LM) are padded with -100 so the loss ignores them;
    scalar labels (classification) are stacked.
    """

    pad_token_id: int = 0
    label_pad_id: int = -100

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("cannot collate an empty batch")
        batch: dict[str, torch.Tensor] = {}
        for key in features[0]:
            values = [torch.as_tensor(f[key]) for f in features]
            if values[0].dim() == 0:
                batch[key] = torch.stack(values)
                continue
            pad = self.label_pad_id if key == "labels" else (self.pad_token_id if key == "input_ids" else 0)
            longest = max(v.shape[0] for v in values)
            out = torch.full((len(values), longest), pad, dtype=values[0].dtype)
            for i, v in enumerate(values):
                out[i, : v.shape[0]] = v
            batch[key] = out
        return batch


class EpochBatches:
    """Which examples form micro-batch `i` of `epoch` on process `rank`: a pure function of
    (seed, epoch, i), so a resumed run picks up exactly where the interrupted one stopped.

    Each global batch (per_device * world size examples) is split evenly across processes, so a
    2-process run sees the same examples per optimizer step as a 1-process run with the same
    global batch. The last incomplete global batch of an epoch is dropped.
    """

    def __init__(self, num_examples: int, per_device: int, world_size: int, rank: int, seed: int, shuffle: bool = True,
                 lengths: Sequence[int] | None = None):
        if num_examples < per_device * world_size:
            raise ValueError(
                f"the training set has {num_examples} examples, fewer than one global batch "
                f"({per_device} per device x {world_size} processes); lower per_device_train_batch_size"
            )
        self.num_examples, self.per_device, self.world_size, self.rank = num_examples, per_device, world_size, rank
        self.seed, self.shuffle, self.lengths = seed, shuffle, lengths

    def __len__(self) -> int:
        return self.num_examples // (self.per_device * self.world_size)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[list[int]]:
        """Micro-batches of `epoch` from index `start` on."""
        if self.shuffle:
            order = torch.randperm(self.num_examples, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
        else:
            order = list(range(self.num_examples))
        global_batch = self.per_device * self.world_size
        if self.lengths is not None:  # similar lengths per batch (less padding), order still random
            chunk = 50 * global_batch
            order = [i for c in range(0, len(order), chunk)
                     for i in sorted(order[c:c + chunk], key=lambda i: -self.lengths[i])]
        for i in range(start, len(self)):
            chunk = order[i * global_batch: (i + 1) * global_batch]
            yield chunk[self.rank * self.per_device: (self.rank + 1) * self.per_device]


# ----------------------------------------------------------------------------- the embedded demo task
_POSITIVE = ["wonderful", "brilliant", "delightful", "superb", "moving", "charming", "excellent", "gripping",
             "hilarious", "beautiful", "clever", "heartfelt", "stunning", "enjoyable", "fantastic", "great"]
_NEGATIVE = ["dull", "tedious", "awful", "clumsy", "boring", "dreadful", "bland", "messy", "predictable",
             "forgettable", "painful", "terrible", "lifeless", "shallow", "weak", "bad"]
_SUBJECTS = ["movie", "film", "plot", "acting", "script", "soundtrack", "ending", "cast", "story", "director's work",
             "dialogue", "pacing", "series", "documentary", "sequel", "performance"]
_TEMPLATES = ["The {s} was {a}.", "What a {a} {s}!", "I found the {s} {a}.", "Honestly, the {s} is {a}.",
              "A {a} {s}, start to finish.", "Everyone said the {s} was {a}, and it was.", "{A} {s}.",
              "The {s} felt {a} to me.", "My friends thought the {s} was {a}.", "It is a {a} {s}."]
_NEGATED = ["The {s} was not {a}.", "I would not call the {s} {a}.", "The {s} was anything but {a}.",
            "Nobody could call this {s} {a}."]


def sentiment_dataset(n: int, seed: int) -> list[dict[str, Any]]:
    """A generated two-class sentiment task (label 1 = positive), deterministic in `seed`.

    Short reviews from templates: plain ones, negated ones ("was not dull" is positive) and
    contrasts whose second clause decides ("the plot was dull, but the acting was superb"), so
    spotting one word is not enough. Train and eval splits come from different seeds.
    """
    rng = random.Random(seed)

    def clause(positive: bool) -> str:
        negated = rng.random() < 0.3
        adjective = rng.choice(_NEGATIVE if positive == negated else _POSITIVE)
        template = rng.choice(_NEGATED if negated else _TEMPLATES)
        return template.format(s=rng.choice(_SUBJECTS), a=adjective, A=adjective.capitalize())

    rows = []
    for _ in range(n):
        positive = rng.random() < 0.5
        text = clause(positive)
        if rng.random() < 0.4:  # the verdict comes after "but"
            first = clause(not positive).rstrip(".!")
            text = f"{first[0].upper()}{first[1:]}, but {text[0].lower()}{text[1:]}"
        rows.append({"text": text, "label": int(positive)})
    return rows


# ----------------------------------------------------------------------------- files and hub datasets
def read_records(source: str) -> list[dict[str, Any]]:
    """Rows of a local jsonl / json / csv / parquet file (read by `datasets`, so CSV columns are typed
    and a UTF-8 BOM is fine), or the train split of a Hugging Face dataset."""
    import datasets

    path = Path(source)
    if not path.exists():
        if path.suffix in READERS or "/" not in source and "." in source:
            raise FileNotFoundError(f"dataset file {source} does not exist")
        try:
            return list(datasets.load_dataset(source, split="train"))
        except Exception as e:  # offline, unknown name, gated, ...
            raise ValueError(f"could not load the Hugging Face dataset {source!r} ({type(e).__name__}: {e}); "
                             "pass a local .jsonl/.json/.csv/.parquet file instead") from None
    if path.is_dir():
        raise ValueError(f"{path} is a directory; pass a .jsonl/.json/.csv/.parquet file")
    if path.suffix not in READERS:
        raise ValueError(f"{path}: unknown file type {path.suffix!r}; use .jsonl, .json, .csv or .parquet")
    if path.stat().st_size == 0:
        raise ValueError(f"{path} holds no examples")
    verbosity = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    try:
        with tempfile.TemporaryDirectory() as cache:  # nothing left behind in the user's HF cache
            table = getattr(datasets.Dataset, READERS[path.suffix])(str(path), cache_dir=cache, keep_in_memory=True)
            rows = table.to_list()
    except Exception as e:
        if path.suffix in (".jsonl", ".json"):
            _locate_json_error(path)
        raise ValueError(f"{path} could not be read ({type(e.__cause__ or e).__name__}: {e.__cause__ or e})") from None
    finally:
        datasets.logging.set_verbosity(verbosity)
        datasets.enable_progress_bars()
    if not rows:
        raise ValueError(f"{path} holds no examples")
    return rows


READERS = {".jsonl": "from_json", ".json": "from_json", ".csv": "from_csv", ".parquet": "from_parquet"}


def _locate_json_error(path: Path) -> None:
    """Name the line a JSON-lines file breaks at (the Arrow reader says only that it broke)."""
    if path.suffix != ".jsonl":
        try:
            data = json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path} is not valid JSON ({e})") from None
        if not isinstance(data, list) or not all(isinstance(row, dict) for row in data):
            raise ValueError(f"{path} must hold a list of objects (one per example)")
        return
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {number}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}, line {number}: each line must be a JSON object, got {type(row).__name__}")


def _column(row: dict[str, Any], column: str, source: str, number: int) -> Any:
    if column not in row or row[column] is None:
        raise ValueError(f"{source}, row {number}: no value in column {column!r} (columns: {', '.join(row)})")
    return row[column]


def _text(row: dict[str, Any], column: str, source: str, number: int) -> str:
    value = _column(row, column, source, number)
    if isinstance(value, (dict, list, bool)):
        raise ValueError(f"{source}, row {number}: column {column!r} holds a {type(value).__name__}, not text; "
                         "name the text column with text_column=")
    return str(value)


def classification_features(rows: list[dict[str, Any]], tokenizer, source: str, num_labels: int,
                            max_length: int, text_column: str = "text", pair_column: str | None = None,
                            label_column: str = "label") -> list[dict[str, Any]]:
    """Tokenized (text[, pair], label) examples; labels must be integers in [0, num_labels)."""
    features = []
    for number, row in enumerate(rows, 1):
        text = _text(row, text_column, source, number)
        pair = _text(row, pair_column, source, number) if pair_column else None
        label = _integer_label(_column(row, label_column, source, number))
        if label is None:
            raise ValueError(f"{source}, row {number}: label {_column(row, label_column, source, number)!r} in column "
                             f"{label_column!r} is not an integer class id (0 .. num_labels-1)")
        if not 0 <= label < num_labels:
            raise ValueError(f"{source}, row {number}: label {label} in column {label_column!r} is out of range "
                             f"[0, {num_labels}); set num_labels=")
        encoded = tokenizer(text, pair, truncation=True, max_length=max_length)
        features.append({**{k: torch.tensor(v) for k, v in encoded.items()}, "labels": torch.tensor(label)})
    return features


def _integer_label(value: Any) -> int | None:
    """An integer class id from 1, 1.0 or "1"; None for 0.95, "yes", True and the like."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    return None


ROLES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant"}


def conversation(row: dict[str, Any], source: str, number: int) -> list[dict[str, str]] | None:
    """A row as chat messages: OpenAI `messages` (role/content), ShareGPT `conversations`
    (from/value), alpaca `instruction` [+ `input`] + `output`, or `prompt` + `response`; None for
    a plain `text` row."""
    where = f"{source}, row {number}"
    if "messages" in row or "conversations" in row:
        key = "messages" if "messages" in row else "conversations"
        turns = row[key]
        if not isinstance(turns, list) or not turns:
            raise ValueError(f"{where}: {key!r} must be a non-empty list of turns")
        messages = []
        for turn in turns:
            role, content = (turn.get("role"), turn.get("content")) if key == "messages" else (turn.get("from"), turn.get("value"))
            if role not in ROLES or not isinstance(content, str):
                raise ValueError(f"{where}: each turn needs a role in {sorted(ROLES)} and text content, got "
                                 f"{str(turn)[:120]}")
            messages.append({"role": ROLES[role], "content": content})
    elif "instruction" in row or "output" in row:
        instruction, output = _text(row, "instruction", source, number), _text(row, "output", source, number)
        extra = str(row.get("input") or "")
        messages = [{"role": "user", "content": f"{instruction}\n\n{extra}" if extra else instruction},
                    {"role": "assistant", "content": output}]
    elif "prompt" in row or "response" in row:
        messages = [{"role": "user", "content": _text(row, "prompt", source, number)},
                    {"role": "assistant", "content": _text(row, "response", source, number)}]
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


def causal_lm_features(rows: list[dict[str, Any]], tokenizer, source: str, max_length: int,
                       packing: bool = False, drop_truncated: bool = False,
                       max_truncated_fraction: float = 1.0) -> list[dict[str, Any]]:
    """Plain `text` rows train on every token; conversations (see `conversation`) on the assistant
    turns only. Truncation is reported: an example whose every target token falls beyond max_length
    is an error (or, with `drop_truncated`, dropped with a note), and examples that lose some of
    their targets (the end of an answer, its end-of-turn token) are counted and refused above
    `max_truncated_fraction`. With `packing`, examples are concatenated and cut into blocks of
    max_length (no padding, nothing truncated)."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    features, emptied = [], []
    cut_rows = cut_tokens = targets = 0
    for number, row in enumerate(rows, 1):
        messages = conversation(row, source, number)
        if messages is None:
            full = tokenizer(_text(row, "text", source, number))["input_ids"] + eos
            labels = list(full)
        else:
            full, labels = encode_chat(messages, tokenizer, f"{source}, row {number}")
        limit = None if packing else max_length  # packed examples are cut into blocks below, not truncated
        total, kept = sum(x != -100 for x in labels), sum(x != -100 for x in labels[:limit])
        targets += total
        if kept == 0:
            emptied.append((number, len(full)))
            continue
        if kept < total:
            cut_rows, cut_tokens = cut_rows + 1, cut_tokens + total - kept
        features.append({"input_ids": full[:limit], "labels": labels[:limit]})
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
        ids = [t for f in features for t in f["input_ids"]]
        labels = [t for f in features for t in f["labels"]]
        features = [{"input_ids": ids[i:i + max_length], "labels": labels[i:i + max_length]}
                    for i in range(0, len(ids) - max_length + 1, max_length)]
        if not features:
            raise ValueError(f"{source}: fewer than max_length={max_length} tokens in total; nothing to pack")
    return [{"input_ids": torch.tensor(f["input_ids"]), "attention_mask": torch.ones(len(f["input_ids"]), dtype=torch.long),
             "labels": torch.tensor(f["labels"])} for f in features]


def check_tokenizer_for_chat(tokenizer) -> list[str]:
    """Warnings worth printing before training a causal LM with this tokenizer."""
    notes = []
    if tokenizer.eos_token_id is None:
        notes.append("the tokenizer has no EOS token: examples end without one, so the model will not learn to stop")
    if not getattr(tokenizer, "chat_template", None):
        notes.append("the tokenizer has no chat template: conversation turns are joined as plain text, each assistant "
                     "turn followed by EOS (give the tokenizer a chat template for a chat format)")
    return notes


def _ids(encoded: Any) -> list[int]:
    return encoded["input_ids"] if isinstance(encoded, dict) or hasattr(encoded, "keys") else encoded
