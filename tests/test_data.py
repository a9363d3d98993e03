"""The data pipeline: collation, batch order, causal-LM masking and packing, file formats."""
import json

import pytest
import torch

from peftlab.chat import causal_lm_features
from peftlab.data import EpochBatches, PadCollator, read_records, sentiment_dataset


class CharTokenizer:
    """One id per character (+1), eos = 0; enough to check masks and lengths by hand."""

    eos_token_id = 0
    chat_template = None

    def __call__(self, text, pair=None, add_special_tokens=True, truncation=False, max_length=None):
        return {"input_ids": [ord(c) - 96 for c in text]}


def test_prompt_tokens_are_masked_and_text_is_not():
    rows = [{"prompt": "ab", "response": "cd"}, {"text": "xyz"}]
    first, second = causal_lm_features(rows, CharTokenizer(), "mem", max_length=16)
    assert first["input_ids"].tolist() == [1, 2, 3, 4, 0] and first["labels"].tolist() == [-100, -100, 3, 4, 0]
    assert second["labels"].tolist() == second["input_ids"].tolist() == [24, 25, 26, 0]


def test_chat_template_is_used_when_the_tokenizer_has_one():
    class Chat(CharTokenizer):
        chat_template = "yes"

        def apply_chat_template(self, messages, add_generation_prompt=False, tokenize=True):
            ids = [9] + [ord(c) - 96 for c in messages[0]["content"]] + [9]
            if len(messages) > 1:
                ids += [ord(c) - 96 for c in messages[1]["content"]] + [8]
            return ids

    (row,) = causal_lm_features([{"prompt": "ab", "response": "c"}], Chat(), "mem", max_length=16)
    assert row["input_ids"].tolist() == [9, 1, 2, 9, 3, 8] and row["labels"].tolist() == [-100] * 4 + [3, 8]


def test_packing_puts_whole_examples_in_blocks_with_their_own_positions():
    rows = [{"text": "ab"}, {"text": "cde"}, {"text": "fghij"}, {"text": "k"}]
    blocks = causal_lm_features(rows, CharTokenizer(), "mem", max_length=8, packing=True)
    assert [b["input_ids"].tolist() for b in blocks] == [[1, 2, 0, 3, 4, 5, 0], [6, 7, 8, 9, 10, 0, 11, 0]]
    assert [b["position_ids"].tolist() for b in blocks] == [[0, 1, 2, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 0, 1]]
    assert blocks[0]["labels"].tolist() == [-100, 2, 0, -100, 4, 5, 0], "no example's first token is a target"
    assert "attention_mask" not in blocks[0], "without a mask transformers attends within each example"


def test_a_packed_batch_has_the_loss_of_its_examples_alone():
    """Position ids that restart per example and no attention mask: transformers attends within each
    example, so a packed block's token losses are its examples' own (Llama, eager and sdpa)."""
    from conftest import tiny_llama

    gen = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(1, 96, (n,), generator=gen).tolist()} for n in (5, 9, 3, 7)]
    features = [(r["input_ids"], r["input_ids"]) for r in rows]
    from peftlab.chat import pack

    (block,) = pack(features, max_length=32)
    for attention in ("eager", "sdpa"):
        model = tiny_llama()
        model.config._attn_implementation = attention
        packed = model(input_ids=block["input_ids"][None], position_ids=block["position_ids"][None],
                       use_cache=False).logits  # (a cache turns the packed-sequence masks off, as the trainer knows)
        alone = torch.cat([model(input_ids=torch.tensor([ids])).logits[0] for ids, _ in features])
        torch.testing.assert_close(packed[0], alone, atol=1e-5, rtol=1e-5)


def test_collator_pads_inputs_and_labels_differently():
    batch = PadCollator(pad_token_id=5)([
        {"input_ids": torch.tensor([1, 2, 3]), "attention_mask": torch.ones(3, dtype=torch.long), "labels": torch.tensor([1, 2, 3])},
        {"input_ids": torch.tensor([4]), "attention_mask": torch.ones(1, dtype=torch.long), "labels": torch.tensor([4])}])
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 5, 5]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[1, 2, 3], [4, -100, -100]]
    scalar = PadCollator()([{"labels": torch.tensor(1)}, {"labels": torch.tensor(0)}])
    assert scalar["labels"].tolist() == [1, 0]


def test_batch_order_is_a_function_of_seed_epoch_and_position():
    order = EpochBatches(40, 4, world_size=1, rank=0, seed=3)
    full = list(order.epoch(1))
    assert list(order.epoch(1, start=6)) == full[6:] and full != list(order.epoch(2))
    ranks = [list(EpochBatches(40, 2, world_size=2, rank=r, seed=3).epoch(1)) for r in (0, 1)]
    assert [a + b for a, b in zip(*ranks)] == full, "two processes split each global batch of one"
    lengths = [i % 7 for i in range(40)]
    grouped = list(EpochBatches(40, 4, 1, 0, seed=3, lengths=lengths).epoch(0))
    assert sorted(i for b in grouped for i in b) == list(range(40))
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in grouped)
    assert spread < sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in full)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        EpochBatches(3, 4, 1, 0, seed=0)


def test_file_formats_read_the_same_rows(tmp_path):
    rows = sentiment_dataset(6, 0)
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "a.json").write_text(json.dumps(rows))
    (tmp_path / "a.csv").write_text("text,label\n" + "".join(f"\"{r['text']}\",{r['label']}\n" for r in rows))
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet")
    for suffix in ("jsonl", "json", "parquet"):
        assert read_records(str(tmp_path / f"a.{suffix}")) == rows
    assert [(r["text"], int(r["label"])) for r in read_records(str(tmp_path / "a.csv"))] == [(r["text"], r["label"]) for r in rows]


def test_the_embedded_task_is_deterministic_balanced_and_has_held_out_text():
    train, held_out = sentiment_dataset(640, 42), sentiment_dataset(1000, 43)
    assert train == sentiment_dataset(640, 42)
    assert 0.4 < sum(r["label"] for r in train) / len(train) < 0.6
    assert any(", but " in r["text"] for r in train) and any(" not " in r["text"] for r in train)
    assert len({r["text"] for r in held_out} - {r["text"] for r in train}) > 500


def test_a_csv_with_a_utf8_byte_order_mark_reads_its_first_column(tmp_path):
    path = tmp_path / "bom.csv"
    path.write_bytes("\ufefftext,label\ngreat,1\nbad,0\n".encode("utf-8"))
    assert read_records(str(path)) == [{"text": "great", "label": 1}, {"text": "bad", "label": 0}]
