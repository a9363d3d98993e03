"""Batches for training: a padding collator and a deterministic, resumable batch order."""
from __future__ import annotations

import json
import random
import tempfile
from contextlib import contextmanager
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
            # chosen_/rejected_ inputs of preference pairs pad as the plain ones do
            pad = self.label_pad_id if key.endswith("labels") else self.pad_token_id if key.endswith("input_ids") else 0
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
def read_records(source: str, split: str = "train", subset: str | None = None) -> list[dict[str, Any]]:
    """Rows of a local jsonl / json / csv / parquet / arrow file (read by `datasets`, so CSV columns
    are typed and a UTF-8 BOM is fine), of a directory written by `datasets.save_to_disk` (its `split`
    when it holds several), or of a Hugging Face dataset (`subset`, `split`)."""
    import datasets

    path = Path(source)
    if not path.exists():
        if path.suffix in READERS or source.startswith((".", "/", "~")):
            raise FileNotFoundError(f"dataset file {source} does not exist")
        try:
            with _quiet(datasets):
                return list(datasets.load_dataset(source, subset, split=split))
        except Exception as e:  # offline, unknown name, gated, ...
            raise ValueError(f"could not load the Hugging Face dataset {source!r} ({type(e).__name__}: {e}); "
                             "pass a local file or a datasets.save_to_disk directory instead") from None
    if path.is_dir():
        if not any((path / name).is_file() for name in ("dataset_dict.json", "dataset_info.json", "state.json")):
            raise ValueError(f"{path} is a directory but not one datasets.save_to_disk wrote; pass a "
                             ".jsonl/.json/.csv/.parquet/.arrow file or such a directory")
        with _quiet(datasets):
            table = datasets.load_from_disk(str(path))
        if isinstance(table, datasets.DatasetDict):
            if split not in table:
                raise ValueError(f"{path} holds the splits {', '.join(table)}, not {split!r}; choose one with "
                                 "split= (eval_split= for eval_dataset)")
            table = table[split]
        rows = table.to_list()
    elif path.suffix not in READERS:
        raise ValueError(f"{path}: unknown file type {path.suffix!r}; use .jsonl, .json, .csv, .parquet or .arrow")
    elif path.stat().st_size == 0:
        raise ValueError(f"{path} holds no examples")
    else:
        try:
            with _quiet(datasets), tempfile.TemporaryDirectory() as cache:  # nothing left in the user's HF cache
                reader = getattr(datasets.Dataset, READERS[path.suffix])
                table = reader(str(path), in_memory=True) if path.suffix == ".arrow" else \
                    reader(str(path), cache_dir=cache, keep_in_memory=True)
                rows = table.to_list()
        except Exception as e:
            if path.suffix in (".jsonl", ".json"):
                _locate_json_error(path)
            raise ValueError(f"{path} could not be read ({type(e.__cause__ or e).__name__}: {e.__cause__ or e})") from None
    if not rows:
        raise ValueError(f"{path} holds no examples")
    return rows


@contextmanager
def _quiet(datasets) -> Iterator[None]:
    verbosity = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        datasets.logging.set_verbosity(verbosity)
        datasets.enable_progress_bars()


READERS = {".jsonl": "from_json", ".json": "from_json", ".csv": "from_csv", ".parquet": "from_parquet",
           ".arrow": "from_file"}


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


def cell(row: dict[str, Any], column: str, source: str, number: int) -> Any:
    if column not in row or row[column] is None:
        raise ValueError(f"{source}, row {number}: no value in column {column!r} (columns: {', '.join(row)})")
    return row[column]


def cell_text(row: dict[str, Any], column: str, source: str, number: int) -> str:
    value = cell(row, column, source, number)
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
        text = cell_text(row, text_column, source, number)
        pair = cell_text(row, pair_column, source, number) if pair_column else None
        label = _integer_label(cell(row, label_column, source, number))
        if label is None:
            raise ValueError(f"{source}, row {number}: label {cell(row, label_column, source, number)!r} in column "
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
