"""The CLI end to end on a tiny model, its error messages, dry-run, merge/export/eval."""
import json
import re

import pytest
import torch
import yaml

import peftlab
from peftlab.cli import main
from peftlab.run import load_base, read_record

from cases import CASES

METHODS = list(CASES)


def base_of(run_dir):
    """The base model a run directory names, loaded as it was trained."""
    return load_base(read_record(run_dir).config.model)


def run(*argv):
    return main([str(a) for a in argv])


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_train_each_method_end_to_end(method, tiny_bert, reviews, tmp_path, capsys):
    out = tmp_path / method
    code = run("train", "--adapter", method, "--model", tiny_bert, "--dataset", reviews, "--output-dir", out,
               "max_steps=6", "per_device_train_batch_size=8", "logging_steps=2", "eval_steps=0", "disable_tqdm=true")
    assert code == 0, capsys.readouterr().err
    files = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "metrics.jsonl", "loss.png", "run.json"} <= files
    if "ranks" in peftlab.controller(peftlab.load_adapter(base_of(out), out)).report():
        assert "ranks.png" in files
    record = read_record(out)
    assert record.result["step"] == 6 and 0 <= record.result["eval_accuracy"] <= 1
    assert record.config.method == method and record.config.data.dataset == reviews
    assert "eval_accuracy" in capsys.readouterr().out
    loaded = peftlab.load_adapter(base_of(out), out)
    assert loaded.peftlab.current.method.name == method
    assert record.trainable_params == sum(p.numel() for p in loaded.parameters() if p.requires_grad)


def test_a_run_is_reproducible_from_its_seed(tiny_bert, reviews, tmp_path):
    from safetensors.torch import load_file

    for name in ("a", "b"):
        assert run("train", "--adapter", "lora", "--model", tiny_bert, "--dataset", reviews, "--output-dir",
                   tmp_path / name, "max_steps=3", "per_device_train_batch_size=8", "disable_tqdm=true") == 0
    a, b = (load_file(str(tmp_path / n / "adapter_model.safetensors")) for n in ("a", "b"))
    assert all(torch.equal(a[k], b[k]) for k in a), "the head's and adapters' init are seeded too"


def test_dry_run_prints_settings_and_the_trainable_line(tiny_bert, reviews, capsys):
    assert run("train", "--adapter", "eva", "r=4", "--model", tiny_bert, "--dataset", reviews, "--dry-run", "rho=1.5") == 0
    out = capsys.readouterr().out
    settings = yaml.safe_load(out[:out.index("examples:")])
    assert settings["adapter"] == "evalora" and settings["adapter_config"]["r"] == 4
    assert settings["adapter_config"]["rho"] == 1.5, "overrides on both sides of the options"
    assert settings["train"]["learning_rate"] == pytest.approx(1e-3)  # from peftlab/configs/evalora.yaml
    assert settings["model"]["path"] == tiny_bert and settings["data"]["dataset"] == reviews
    assert "trainable params: " in out and "|| all params: " in out
    assert re.search(r"expected peak memory per process: \d+\.\d\d GiB \(base weights .*\), at batches of 16 x \d+ tokens", out)


def test_output_dir_comes_from_the_option_an_override_or_the_recipe_else_runs_adapter(tiny_bert, reviews, tmp_path,
                                                                                       capsys):
    def output_dir(*argv):
        assert run("train", "--adapter", "lora", "--model", tiny_bert, "--dataset", reviews, "--dry-run", *argv) == 0
        out = capsys.readouterr().out
        return yaml.safe_load(out[:out.index("examples:")])["train"]["output_dir"]

    recipe = tmp_path / "r.yaml"
    recipe.write_text("adapter: lora\ntrain: {output_dir: from-recipe}\n")
    assert output_dir() == "runs/lora"
    assert output_dir("output_dir=elsewhere") == "elsewhere"  # the default runs/lora once overrode it, silently
    assert output_dir("--output-dir", "flag") == "flag"
    assert output_dir("--output-dir", "same", "output_dir=same") == "same"
    assert output_dir("--config", recipe) == "from-recipe"
    assert run("compare", "--adapters", "lora,sara", "output_dir=x") == 2
    assert "pass --output-dir, not output_dir=" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["lerning_rate=1e-3"], "unknown key 'lerning_rate'; did you mean 'learning_rate'"),
    (["learning_rate=-1"], "learning_rate=-1 (command line): TrainConfig: learning_rate must be a number > 0, got -1"),
    (["r=0"], "r must be an integer >= 1"),
    (["max_length"], "must look like key=value"),
    (["--adapter", "lorra"], "unknown adapter 'lorra'; did you mean 'lora'"),
    (["lora_alpha=abc"], "lora_alpha must be a number, got 'abc'"),
    (["learning_rate=abc"], "learning_rate must be a number, got 'abc'"),
    (["r=true"], "r must be an integer, got True"),
    (["lora_alpha=nan"], "lora_alpha must be a finite number, got nan"),
    (["eval_fraction=0"], "eval_fraction must be a number in (0, 1), got 0"),
    (["eval_fraction=1.5"], "eval_fraction must be a number in (0, 1), got 1.5"),
    (["max_length=0"], "max_length=0 (command line): data: max_length must be an integer >= 1, got 0"),
    (["seed=-1"], "seed=-1 (command line): TrainConfig: seed must be an integer in [0, 4294967296), got -1"),
    (["r=4", "r=16"], "r is given twice (r=4, r=16); give it once"),
    (["target_r=8"], "unknown key 'target_r'"),
    (["task=chat"], "task must be one of seq-cls, causal-lm, dpo, got 'chat'"),
    (["--output-dir", "a", "output_dir=b"], "output_dir=b and --output-dir a disagree; give it once"),
    (["path=elsewhere"], "path=elsewhere and --model "),
])
def test_bad_settings_name_the_problem(argv, message, tiny_bert, reviews, capsys):
    adapter = [] if "--adapter" in argv else ["--adapter", "lora"]
    assert run("train", *adapter, "--model", tiny_bert, "--dataset", reviews, "--dry-run", *argv) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("content, suffix, message", [
    ('{"txt": "great", "label": 1}\n' * 20, ".jsonl", "row 1: no value in column 'text' (columns: txt, label)"),
    ('{"text": "great", "label": 1}\n' * 9 + '{"text": "bad", "label": 7}\n' * 11, ".jsonl",
     "row 10: label 7 in column 'label' is out of range [0, 2)"),
    ('{"text": "great", "label": 1}\n{"text": oops}\n', ".jsonl", "line 2: not valid JSON"),
    ("", ".jsonl", "holds no examples"),
    ("text,label\ngreat,yes\n" * 12, ".csv", "label 'yes' in column 'label' is not an integer"),
    ('{"text": "great", "label": 1}\n' * 9 + '{"text": "fine", "label": 0.95}\n' * 11, ".jsonl",
     "row 10: label 0.95 in column 'label' is not an integer class id"),
    ('{"text": {"body": "great"}, "label": 1}\n' * 20, ".jsonl", "row 1: column 'text' holds a dict, not text"),
    ("whatever", ".txt", "unknown file type '.txt'"),
])
def test_bad_data_names_file_row_and_column(content, suffix, message, tiny_bert, tmp_path, capsys):
    path = tmp_path / f"data{suffix}"
    path.write_text(content)
    assert run("train", "--adapter", "lora", "--model", tiny_bert, "--dataset", path, "--dry-run") == 2
    err = capsys.readouterr().err
    assert message in err and str(path) in err


def test_missing_dataset_file_is_an_error(tiny_bert, capsys):
    assert run("train", "--adapter", "lora", "--model", tiny_bert, "--dataset", "nowhere.jsonl", "--dry-run") == 2
    assert "nowhere.jsonl does not exist" in capsys.readouterr().err


def test_export_merge_and_eval(tiny_bert, reviews, tmp_path, capsys):
    from peft import PeftModel

    out = tmp_path / "run"
    assert run("train", "--adapter", "adalora", "--model", tiny_bert, "--dataset", reviews, "--output-dir", out,
               "max_steps=8", "per_device_train_batch_size=8", "disable_tqdm=true", "init_r=4", "target_r=2") == 0
    model = peftlab.load_adapter(base_of(out), out).eval()
    x = {"input_ids": torch.tensor([[101, 2204, 3185, 102]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    expected = model(**x).logits

    assert run("export", out, "--as", "lora", "--output-dir", tmp_path / "as-lora") == 0
    assert "relative error" in capsys.readouterr().out
    theirs = PeftModel.from_pretrained(base_of(out), str(tmp_path / "as-lora")).eval()
    torch.testing.assert_close(theirs(**x).logits, expected, atol=1e-5, rtol=1e-5)

    assert run("merge", out, "--output-dir", tmp_path / "merged") == 0
    from transformers import AutoModelForSequenceClassification
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(merged(**x).logits, expected, atol=1e-5, rtol=1e-5)

    assert run("eval", out) == 0
    printed = capsys.readouterr().out
    assert "eval_accuracy" in printed and f"examples of {reviews} (held-out tail)" in printed
    assert run("export", out, "--output-dir", out) == 2, "an export must never overwrite its source"
    assert "writing there would damage it" in capsys.readouterr().err
    assert run("export", out, "--rank", "-1", "--output-dir", tmp_path / "x") == 2


def test_help_of_every_command_has_an_example(capsys):
    for command in ("train", "keys", "adapters", "merge", "export", "eval", "compare"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert "example:" in capsys.readouterr().out


def test_adapters_table_lists_every_method_and_its_recipe(capsys):
    assert run("adapters") == 0
    out = capsys.readouterr().out
    assert all(m in out and f"configs/{m}.yaml" in out for m in METHODS) and "eva" in out
    assert run("keys", "--adapter", "sara") == 0
    out = capsys.readouterr().out
    assert "adapter_config (sara):" in out and "target_fraction = 0.05" in out and "learning_rate = 0.001" in out
    assert run("keys", "--adapter", "sara", "--task", "causal-lm") == 0
    assert "learning_rate = 0.0002" in capsys.readouterr().out


def test_the_catalog_is_the_registry_and_the_help_imports_no_torch():
    """`peftlab --help` and `peftlab adapters` answer without torch, transformers or bitsandbytes (the
    catalog they print is checked here against the registry)."""
    import subprocess
    import sys

    from peftlab.adapters.registry import get_method, list_adapters
    from peftlab.catalog import METHODS

    registry = [(m, get_method(m).aliases, get_method(m).peft_type, get_method(m).config.__doc__.strip().splitlines()[0])
                for m in list_adapters()]
    assert METHODS == registry
    probe = ("import sys; from peftlab.cli import main\nfor argv in (['--help'], ['adapters']):\n    try: main(argv)\n"
             "    except SystemExit: pass\nprint(sorted({'torch', 'transformers', 'bitsandbytes'} & set(sys.modules)))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout.strip().splitlines()[-1] == "[]" and "sara" in done.stdout


def test_every_registered_method_ships_a_recipe_and_a_missing_one_is_an_error(monkeypatch):
    from peftlab import recipes as runlib

    assert runlib.recipe_names() == sorted(peftlab.list_adapters())
    for method in METHODS:
        assert runlib.resolve(method).method == method
    monkeypatch.setattr(runlib, "recipe_names", lambda: [])
    with pytest.raises(FileNotFoundError, match="ships no recipe for 'nope'"):
        runlib.load_recipe(None, "nope")


@pytest.mark.parametrize("text, message", [
    ("a: &x [1]\nb: *x\n", "may not use YAML aliases"),
    ("adapter: lora\ntrain:\n  seed: 1\n  seed: 2\n", "duplicate key 'seed'"),
    ("- adapter: lora\n", "must be a mapping"),
    ("adapter: lora\ntrain: [1, 2]\n", "section 'train' must be a mapping"),
    ("adapter: lora\ntrainn: {}\n", "unknown section 'trainn'"),
    ("adapter: lora\ntrain: {learning_rat: 1.0}\n", "did you mean 'learning_rate'"),
    ("adapter: lora\ntrain: {seed: !!python/object:os.system {}}\n", "not valid YAML"),
])
def test_bad_recipes_are_one_line_errors(text, message, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text)
    assert run("train", "--adapter", "lora", "--config", recipe, "--dry-run") == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err) < 800


def test_every_method_sizes_itself_to_a_budget(tiny_bert):
    from peftlab.adapters.inject import target_shapes

    model = base_of_model(tiny_bert)
    for method in METHODS:
        config_cls = peftlab.adapters.get_method(method).config
        shapes = target_shapes(model, method)
        budget = 3 * sum(d_out + d_in for d_out, d_in in shapes) * 4  # LoRA r=12
        settings = config_cls.for_budget(shapes, budget)
        count = config_cls(**settings).final_parameter_count(shapes)
        assert abs(count - budget) / budget < 0.25, (method, settings, count)
    shapes = target_shapes(model, "lora")
    assert peftlab.adapters.get_method("lora").config.for_budget(shapes, sum(4 * (o + i) for o, i in shapes)) == {"r": 4}


def base_of_model(path):
    from peftlab.run import ModelConfig

    return load_base(ModelConfig(path=path))


@pytest.mark.slow
def test_compare_sizes_methods_to_one_budget_and_writes_a_table(tiny_bert, reviews, tmp_path, capsys):
    budget = 4 * sum(o + i for o, i in peftlab.adapters.inject.target_shapes(base_of_model(tiny_bert), "lora"))
    assert run("compare", "--adapters", "lora,sara", "--budget", budget, "--model", tiny_bert, "--dataset", reviews,
               "--output-dir", tmp_path, "max_steps=4", "per_device_train_batch_size=8") == 0
    table = json.loads((tmp_path / "compare.json").read_text())
    assert [r["adapter"] for r in table["rows"]] == ["lora", "sara"] and table["metric"] == "eval_accuracy"
    rows = table["rows"]  # trainable counts include the classifier head, the same for both
    assert rows[0]["r"] == 4 and abs(rows[1]["trainable"] - rows[0]["trainable"]) <= 1
    assert all(r["step_ms"] > 0 and r["peak_rss_mib"] > 0 for r in table["rows"])
    assert (tmp_path / "compare.png").is_file() and "eval_accuracy" in capsys.readouterr().out


def test_merge_of_a_4bit_run_goes_onto_the_dequantized_base(tiny_bert, reviews, tmp_path, capsys):
    from transformers import AutoModelForSequenceClassification

    out = tmp_path / "q"
    assert run("train", "--adapter", "lora", "--model", tiny_bert, "--dataset", reviews, "--output-dir", out,
               "--load-in-4bit", "max_steps=4", "per_device_train_batch_size=8", "disable_tqdm=true") == 0
    base = base_of(out)
    assert any(peftlab.quant.is_4bit(m) for m in base.modules()), "the run's 4-bit setting is remembered"
    model = peftlab.load_adapter(base, out)
    x = {"input_ids": torch.tensor([[101, 2204, 3185, 102]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    expected = model(**x).logits
    assert run("merge", out, "--output-dir", tmp_path / "merged") == 0
    assert "dequantized" in capsys.readouterr().out
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged")
    assert not any(peftlab.quant.is_4bit(m) for m in merged.modules())
    torch.testing.assert_close(merged(**x).logits, expected, atol=1e-4, rtol=1e-4)


def test_errors_are_one_line_with_exit_codes_and_debug_shows_the_traceback(tiny_bert, reviews, tmp_path, capsys):
    bad_regex = ["train", "--adapter", "lora", "--model", tiny_bert, "--dataset", reviews, "--dry-run", "target_modules=q[("]
    assert run(*bad_regex) == 2
    err = capsys.readouterr().err
    assert err.startswith("peftlab: error:") and "Traceback" not in err
    assert run("--debug", *bad_regex) == 2
    assert "Traceback" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert run("train", "--adapter", "lora", "--model", tiny_bert, "--dataset", reviews, "--output-dir",
               tmp_path / "file" / "run", "max_steps=1", "disable_tqdm=true") == 2
    assert "file" in capsys.readouterr().err
    assert run("eval", tmp_path / "nowhere") == 2
    assert "no adapter_config.json" in capsys.readouterr().err


def test_ctrl_c_says_how_to_resume(tiny_bert, reviews, tmp_path, capsys, monkeypatch):
    def interrupt(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(peftlab.Trainer, "_after_step", interrupt)
    code = run("train", "--adapter", "lora", "--model", tiny_bert, "--dataset", reviews, "--output-dir", tmp_path,
               "max_steps=4", "disable_tqdm=true")
    assert code == 130
    assert "interrupted at step 1; resume with --resume" in capsys.readouterr().err
    assert not (tmp_path / ".peftlab.lock").exists()


def test_recipes_and_python_defaults_are_one_source():
    """What `peftlab train --adapter X` uses is what `peftlab.wrap(model, X)` uses, and every method
    trains at the same learning rate: swapping methods needs no re-tuning."""
    from dataclasses import fields

    from peftlab import recipes as runlib
    from peftlab.settings import default_of

    for method in METHODS:
        recipe = runlib.load_recipe(None, method)
        assert set(recipe) == {"adapter", "adapter_config"}, "training settings are the task's, one for every method"
        config_cls = peftlab.adapters.get_method(method).config
        defaults = {f.name: default_of(f) for f in fields(config_cls)}
        for key, value in (recipe.get("adapter_config") or {}).items():
            expected = defaults[key]
            assert value == (list(expected) if isinstance(expected, tuple) else expected), (method, key, value, expected)
        assert runlib.resolve(method).train.learning_rate == 1e-3
        assert runlib.resolve(method, overrides=["task=causal-lm"]).train.learning_rate == 2e-4


def test_a_command_leaves_the_process_group_it_ran_in(capsys):
    """Under a launcher the CLI destroys the process group before exiting (gloo's threads otherwise
    race the interpreter's teardown and abort a rank), whether the command succeeds or fails."""
    import torch.distributed as dist

    for argv, code in ((["adapters"], 0), (["train", "--adapter", "no-such-method"], 2)):
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        assert main(argv) == code
        assert not dist.is_initialized()
    capsys.readouterr()
