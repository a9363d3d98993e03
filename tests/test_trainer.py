"""The Accelerate trainer: hook placement, exact resume after a kill, 2-process equality, NaN
handling, QLoRA training, checkpoints, config validation."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import peftlab
from peftlab.adapters.controller import Controller
from peftlab.trainers import NonFiniteLossError
from peftlab.trainers.checkpoint import checkpoints

from cases import CASES
from conftest import tiny_llama
from train_job import HERE, assert_same_training, job_env, lm_dataset, run_job

STATELESS = {"randlora", "allora"}  # no controller state to resume (LoRA stays: it is the baseline)



class Spy(Controller):
    """Records every lifecycle call, and the gradient state it saw."""

    def __init__(self, base: Controller):
        super().__init__(base.model, base.config, base.layers)
        self.calls = []

    def prepare(self, batches):
        self.calls.append(("prepare", len(batches)))

    def before_optimizer_step(self, step):
        grads = [l.lora_B.grad for l in self.layers.values()]
        self.calls.append(("before", step, all(g is not None for g in grads)))

    def after_optimizer_step(self, step):
        self.calls.append(("after", step))

    def state_dict(self):
        return {"calls": torch.tensor(len(self.calls))}

    def load_state_dict(self, state):
        self.calls.append(("load", int(state["calls"])))


def spied(model):
    model.peftlab.current.controller = Spy(model.peftlab.current.controller)
    return model.peftlab.current.controller


def config(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), learning_rate=1e-2, per_device_train_batch_size=4, logging_steps=1,
                disable_tqdm=True, seed=3)
    return peftlab.TrainConfig(**{**base, **kw})


def test_hooks_run_once_per_optimizer_step_after_accumulation(tmp_path):
    model = peftlab.wrap(tiny_llama(), "lora", r=4)
    spy = spied(model)
    forwards = []
    model.register_forward_hook(lambda *a: forwards.append(1))
    peftlab.Trainer(model, config(tmp_path, max_steps=4, gradient_accumulation_steps=3, prepare_batches=2),
                    lm_dataset()).train()
    assert spy.calls == [("prepare", 2)] + [c for s in range(4) for c in (("before", s, True), ("after", s))]
    assert len(forwards) == 4 * 3
    metrics = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics[:4]] == [1, 2, 3, 4] and (tmp_path / "adapter_model.safetensors").is_file()


def test_learning_rate_follows_transformers_schedule(tmp_path):
    from transformers import get_scheduler

    model = peftlab.wrap(tiny_llama(), "lora", r=4)
    peftlab.Trainer(model, config(tmp_path, max_steps=10, warmup_steps=3, lr_scheduler_type="cosine"), lm_dataset()).train()
    logged = [json.loads(line)["learning_rate"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()[:10]]
    sgd = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1e-2)
    reference = get_scheduler("cosine", sgd, num_warmup_steps=3, num_training_steps=10)
    expected = []
    for _ in range(10):
        sgd.step()
        reference.step()
        expected.append(reference.get_last_lr()[0])
    assert logged == pytest.approx(expected)


@pytest.mark.slow
@pytest.mark.parametrize("method", [m for m in CASES if m not in STATELESS])
def test_interrupted_run_resumes_to_the_bitwise_same_adapter(method, tmp_path):
    job = [sys.executable, str(HERE / "train_job.py"), "--method", method, "--steps", "10"]
    subprocess.run(job + [str(tmp_path / "full")], check=True, env=job_env(tmp_path), capture_output=True)
    killed = subprocess.run(job + [str(tmp_path / "cut"), "--kill-at", "5"], env=job_env(tmp_path), capture_output=True)
    assert killed.returncode == -9  # SIGKILL after step 5: checkpoint-4 is the newest
    assert [p.name for p in checkpoints(tmp_path / "cut")] == ["checkpoint-2", "checkpoint-4"]
    # the kill lands while AdaLoRA prunes (steps 2-7), IncreLoRA grows (steps 2-8) and right after SaRA
    # re-selects (after step 5, which checkpoint-4 precedes): their state must resume
    assert not (tmp_path / "cut" / "adapter_model.safetensors").exists()
    resumed = subprocess.run(job + [str(tmp_path / "cut"), "--resume"], check=True, env=job_env(tmp_path),
                             capture_output=True, text=True)
    assert "resumed from" in resumed.stdout and "checkpoint-4 at step 4" in resumed.stdout
    full, cut = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("full", "cut"))
    assert full.keys() == cut.keys() and all(torch.equal(full[k], cut[k]) for k in full)
    steps = [json.loads(line)["step"] for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert steps[:10] == list(range(1, 11)), "one series: what the killed run logged after checkpoint-4 is gone"


@pytest.mark.slow
@pytest.mark.parametrize("method", list(CASES))
def test_two_processes_match_one_process_with_the_same_global_batch(method, one_process, tmp_path):
    two = run_job(tmp_path / "two", method, "--per-device", "2", processes=2)
    assert_same_training(method, one_process(method), two)


def test_nonfinite_steps_are_skipped_and_counted_then_stop(tmp_path):
    model = peftlab.wrap(tiny_llama(), "lora", r=4)
    spy = spied(model)
    poisoned = {2}
    calls = []

    def poison(module, args, output):
        calls.append(1)
        return output * float("nan") if len(calls) in poisoned else output

    model.model.norm.register_forward_hook(poison)
    trainer = peftlab.Trainer(model, config(tmp_path, max_steps=4), lm_dataset())
    trainer.train()
    assert trainer.lifecycle.skipped_total == 1
    assert [c[1] for c in spy.calls if c[0] == "before"] == [0, 2, 3], "no hook sees the NaN step"

    poisoned.update(range(100))
    calls.clear()
    model2 = peftlab.wrap(tiny_llama(), "lora", r=4)
    model2.model.norm.register_forward_hook(poison)
    with pytest.raises(NonFiniteLossError, match=r"3 optimizer steps in a row had a non-finite loss"):
        peftlab.Trainer(model2, config(tmp_path / "b", max_steps=10, max_nonfinite_steps=3), lm_dataset()).train()


def test_checkpoints_rotate_and_resume_rejects_changed_settings(tmp_path):
    model = peftlab.wrap(tiny_llama(), "lora", r=4)
    peftlab.Trainer(model, config(tmp_path, max_steps=6, save_steps=2, save_total_limit=2), lm_dataset()).train()
    assert [p.name for p in checkpoints(tmp_path)] == ["checkpoint-4", "checkpoint-6"]
    assert not list(tmp_path.glob(".checkpoint-*")), "no temp checkpoint left behind"
    again = peftlab.wrap(tiny_llama(), "lora", r=4)
    with pytest.raises(ValueError, match=r"other settings \{'learning_rate': \(0.01, 0.02\)\}"):
        peftlab.Trainer(again, config(tmp_path, max_steps=6, save_steps=2, learning_rate=2e-2), lm_dataset()).train(True)
    with pytest.raises(FileNotFoundError, match="holds no checkpoint-N directory"):
        peftlab.Trainer(again, config(tmp_path / "empty", max_steps=6), lm_dataset()).train(True)


def test_evaluate_reports_accuracy_for_classification(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1,
                                                     num_attention_heads=2, intermediate_size=64, num_labels=3))
    peftlab.wrap(model, "lora", r=2)
    gen = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(1, 50, (int(n),), generator=gen), "labels": torch.tensor(i % 3)}
            for i, n in enumerate(torch.randint(3, 9, (10,), generator=gen))]
    for row in data:
        row["attention_mask"] = torch.ones_like(row["input_ids"])
    trainer = peftlab.Trainer(model, config(tmp_path, per_device_eval_batch_size=4), data[:4], eval_dataset=data)
    result = trainer.evaluate()
    model.eval()
    with torch.no_grad():
        logits = torch.cat([model(**{k: v[None] for k, v in row.items() if k != "labels"}).logits for row in data])
    labels = torch.stack([row["labels"] for row in data])
    assert result["eval_accuracy"] == pytest.approx((logits.argmax(-1) == labels).float().mean().item())
    assert result["eval_loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, labels).item(), rel=1e-5)


QLORA = {"lora": {"r": 8}, "adalora": {"init_r": 8, "target_r": 4},
         "increlora": {"init_r": 2, "target_r": 6}, "allora": {"r": 8},
         "sara": {"target_fraction": 0.1}, "evalora": {"r": 8},
         "randlora": {"r": 8, "randlora_alpha": 32.0}}


@pytest.mark.slow
@pytest.mark.parametrize("method", QLORA)
def test_qlora_4bit_base_trains(method, tmp_path):
    tiny_llama().save_pretrained(tmp_path / "base")
    model = peftlab.load_model(str(tmp_path / "base"), "causal-lm", load_in_4bit=True)
    assert any(peftlab.quant.is_4bit(m) for m in model.modules())
    peftlab.wrap(model, method, **QLORA[method])
    assert all(peftlab.quant.is_4bit(l.base_layer) for l in model.peftlab.current.layers.values())
    trainer = peftlab.Trainer(model, config(tmp_path / "run", max_steps=30, learning_rate=1e-2, warmup_steps=0),
                              lm_dataset(num_starts=4), eval_dataset=lm_dataset(8, seed=1, num_starts=4))
    before = trainer.evaluate()["eval_loss"]
    after = trainer.train()["eval_loss"]
    assert after < before - 0.3, (before, after)


@pytest.mark.parametrize("kwargs, message", [
    ({"learning_rate": 0}, "learning_rate must be a number > 0, got 0"),
    ({"per_device_train_batch_size": 0}, "per_device_train_batch_size must be an integer >= 1, got 0"),
    ({"max_steps": 0}, r"max_steps must be an integer -1 \(use num_train_epochs\) or >= 1, got 0"),
    ({"warmup_ratio": 1.5}, r"warmup_ratio must be a number in \[0, 1\), got 1.5"),
    ({"lr_scheduler_type": "cosin"}, "lr_scheduler_type must be one of linear, cosine, .*, got 'cosin'"),
    ({"report_to": "tensorbored"}, "report_to must be one of auto, none, tensorboard"),
    ({"optim": "sgd"}, "optim must be one of"),
    ({"max_grad_norm": -1}, "max_grad_norm must be a number >= 0, got -1"),
    ({"num_train_epochs": 0}, "num_train_epochs must be a number > 0, got 0"),
    ({"seed": -1}, r"seed must be an integer in \[0, 4294967296\), got -1"),
    ({"per_device_train_batch_size": 2.5}, "per_device_train_batch_size must be an integer, got 2.5"),
])
def test_config_validation_names_the_value(kwargs, message):
    with pytest.raises(ValueError, match="TrainConfig: " + message):
        peftlab.TrainConfig(**kwargs)


def test_trainer_needs_a_wrapped_model_and_data(tmp_path):
    with pytest.raises(ValueError, match="no peftlab adapters"):
        peftlab.Trainer(tiny_llama(), config(tmp_path), lm_dataset())
    with pytest.raises(ValueError, match="train_dataset is empty"):
        peftlab.Trainer(peftlab.wrap(tiny_llama(), "lora"), config(tmp_path), [])


@pytest.mark.parametrize("option", ["adamw_8bit", "gradient_checkpointing", "bf16"])
def test_training_options_learn(option, tmp_path):
    kw = {"optim": "adamw_8bit"} if option == "adamw_8bit" else {option: True}
    model = peftlab.wrap(tiny_llama(), "lora", r=8, lora_dropout=0.0)
    trainer = peftlab.Trainer(model, config(tmp_path, max_steps=25, learning_rate=2e-2, **kw),
                              lm_dataset(num_starts=4), eval_dataset=lm_dataset(8, seed=1, num_starts=4))
    before = trainer.evaluate()["eval_loss"]
    after = trainer.train()["eval_loss"]
    assert after < before - 0.3, (before, after)
    if option == "adamw_8bit":
        import bitsandbytes as bnb
        assert isinstance(trainer._optimizer(), bnb.optim.AdamW8bit)


@pytest.mark.parametrize("method", ["lora", "adalora"])
def test_gradient_checkpointing_on_a_4bit_base_trains_identically_with_one_dequantization_per_pass(
        method, tmp_path, monkeypatch):
    """Fused kernel + dropout + NF4 base: the checkpointed run equals the plain one step for step
    (the recomputed forward draws the same dropout masks), and it dequantizes no more often: the
    recomputed forward's weights serve its backward."""
    tiny_llama().save_pretrained(tmp_path / "base")
    calls = []
    dequantize = peftlab.quant.dequantize
    monkeypatch.setattr(peftlab.quant, "dequantize", lambda module: calls.append(1) or dequantize(module))
    results = []
    for checkpointing in (False, True):
        model = peftlab.load_model(str(tmp_path / "base"), "causal-lm", load_in_4bit=True)
        torch.manual_seed(0)
        peftlab.wrap(model, method, **{"lora": {"r": 4}, "adalora": {"init_r": 4, "target_r": 2}}[method],
                     lora_dropout=0.1)
        calls.clear()
        peftlab.Trainer(model, config(tmp_path / str(checkpointing), max_steps=3, gradient_checkpointing=checkpointing),
                        lm_dataset()).train()
        results.append(({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}, len(calls)))
    (plain, plain_calls), (checkpointed, checkpointed_calls) = results
    layers = 2 * 7  # two blocks, seven projections each
    assert plain_calls == checkpointed_calls == 3 * 2 * layers, (plain_calls, checkpointed_calls)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)


def test_gradient_checkpointing_gives_the_same_gradients(tmp_path):
    x = lm_dataset(4)
    batch = {k: torch.stack([r[k] for r in x]) for k in x[0]}
    grads = []
    for checkpointing in (False, True):
        model = peftlab.wrap(tiny_llama(), "lora", r=4, init_lora_weights=False).train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model(**batch).loss.backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.slow
def test_torch_compile_trains_like_eager_with_the_lifecycle_intact(tmp_path):
    """AdaLoRA under torch.compile (inductor, CPU): same weights and the same pruned ranks as eager."""
    from torch._dynamo.utils import counters

    results = []
    for compiled in (False, True):
        torch._dynamo.reset()
        counters.clear()
        model = peftlab.wrap(tiny_llama(), "adalora", total_step=8, init_r=4, target_r=2, tinit=1, tfinal=2,
                             deltaT=1, lora_dropout=0.0)
        trainer = peftlab.Trainer(model, config(tmp_path / str(compiled), max_steps=8, torch_compile=compiled),
                                  lm_dataset(num_starts=4))
        trainer.train()
        if compiled:  # it really compiled, in one graph: no breaks from our layers
            assert counters["stats"]["unique_graphs"] >= 1 and not counters["graph_break"], dict(counters["graph_break"])
        results.append(({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad},
                        peftlab.controller(model).report()))
    (eager, eager_report), (compiled, compiled_report) = results
    assert eager_report == compiled_report and eager_report["budget"] < 4 * len(model.peftlab.current.layers)
    for name in eager:
        torch.testing.assert_close(compiled[name], eager[name], atol=1e-5, rtol=1e-4, msg=name)


def test_a_checkpoint_of_another_process_count_is_refused(tmp_path):
    """The data order depends on the process count (sharded or not), so exact resume needs the same one."""
    peftlab.Trainer(peftlab.wrap(tiny_llama(), "lora", r=4), config(tmp_path, max_steps=2, save_steps=2),
                    lm_dataset()).train()
    state = tmp_path / "checkpoint-2" / "trainer_state.json"
    state.write_text(state.read_text().replace('"world_size": 1', '"world_size": 2'))
    with pytest.raises(ValueError, match="written by 2 processes but this run has 1; exact resume needs the same"):
        peftlab.Trainer(peftlab.wrap(tiny_llama(), "lora", r=4), config(tmp_path, max_steps=4, save_steps=2),
                        lm_dataset()).train(resume_from_checkpoint=True)


def test_a_fresh_run_never_mixes_with_an_earlier_runs_checkpoints(tmp_path):
    peftlab.Trainer(peftlab.wrap(tiny_llama(), "lora", r=4), config(tmp_path, max_steps=4, save_steps=2, save_total_limit=0),
                    lm_dataset()).train()
    assert [p.name for p in checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-4"]
    with pytest.raises(ValueError, match=r"holds an earlier run \(checkpoint-2, checkpoint-4, adapter_config.json.*--resume"):
        peftlab.Trainer(peftlab.wrap(tiny_llama(), "lora", r=4), config(tmp_path, max_steps=2, save_steps=1), lm_dataset()).train()
    assert [p.name for p in checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-4"], "nothing deleted"
    peftlab.Trainer(peftlab.wrap(tiny_llama(), "lora", r=4), config(tmp_path, max_steps=3, save_steps=1, save_total_limit=2,
                                                                    overwrite_output_dir=True), lm_dataset()).train()
    assert [p.name for p in checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-3"]
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 3], "a fresh run starts its own metrics series (3 steps, then the final record)"


@pytest.mark.parametrize("change, message", [
    ("data", "written for other training data"),
    ("base", "written for another base model"),
    ("alpha", r"other adapter settings \{'lora_alpha': \(16.0, 32.0\)\}"),
])
def test_resume_refuses_another_run(change, message, tmp_path):
    peftlab.Trainer(peftlab.wrap(tiny_llama(), "lora", r=4), config(tmp_path, max_steps=4, save_steps=2), lm_dataset()).train()
    model = peftlab.wrap(tiny_llama(seed=1 if change == "base" else 0), "lora", r=4,
                         lora_alpha=32.0 if change == "alpha" else 16.0)
    data = lm_dataset(seed=5) if change == "data" else lm_dataset()
    with pytest.raises(ValueError, match=message):
        peftlab.Trainer(model, config(tmp_path, max_steps=4, save_steps=2), data).train(resume_from_checkpoint=True)


def test_an_output_dir_is_locked_by_its_run(tmp_path):
    """An flock held while the run lives: another live holder is refused by pid, a dead holder's lock
    is free at once (the kernel released it), and a lock file naming an unrelated live pid is no lock."""
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_CREAT | os.O_RDWR); "
        "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, str(os.getpid()).encode()); print('held', flush=True); "
        "time.sleep(60)"), str(tmp_path / ".peftlab.lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RuntimeError, match=rf"in use by another peftlab run \(pid {holder.pid}\)"):
            peftlab.Trainer(peftlab.wrap(tiny_llama(), "lora", r=4), config(tmp_path, max_steps=2), lm_dataset()).train()
    finally:
        holder.kill()
        holder.wait()
    (tmp_path / ".peftlab.lock").write_text(str(os.getppid()))  # alive, but not a peftlab run holding it
    peftlab.Trainer(peftlab.wrap(tiny_llama(), "lora", r=4), config(tmp_path, max_steps=2), lm_dataset()).train()
    assert not (tmp_path / ".peftlab.lock").exists(), "released when the run ends"


def test_skipped_steps_are_not_logged_as_a_loss_and_an_all_skipped_run_fails(tmp_path):
    model = peftlab.wrap(tiny_llama(), "lora", r=4)
    model.model.norm.register_forward_hook(lambda module, args, output: output * float("nan"))
    with pytest.raises(NonFiniteLossError, match="every one of the 3 optimizer steps"):
        peftlab.Trainer(model, config(tmp_path, max_steps=3, max_nonfinite_steps=10), lm_dataset()).train()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records and all("loss" not in r and r["skipped_steps"] == r["step"] for r in records)


def test_report_to_a_tracker_that_is_not_installed_says_how_to_get_it(tmp_path):
    import importlib.util

    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    with pytest.raises(ValueError, match="report_to=wandb needs the wandb package: pip install wandb"):
        peftlab.Trainer(peftlab.wrap(tiny_llama(), "lora"), config(tmp_path, report_to="wandb"), lm_dataset())


@pytest.mark.slow
def test_a_launch_that_asked_for_two_processes_but_started_one_stops(tmp_path):
    """Without a GPU, `accelerate launch --num_processes 2 --cpu` starts ONE process: refused, with the fix."""
    launcher = Path(sys.executable).with_name("accelerate")
    run = subprocess.run([str(launcher), "launch", "--num_processes", "2", "--cpu", str(HERE / "train_job.py"),
                          str(tmp_path), "--steps", "2"], env=job_env(tmp_path), capture_output=True, text=True)
    assert run.returncode != 0
    assert "asked for 2 processes but this run sees one" in run.stderr and "--multi_gpu" in run.stderr
    assert not (tmp_path / "adapter_model.safetensors").exists()


@pytest.mark.slow
def test_progress_bars_follow_tqdm_environment_variables():
    """TQDM_DISABLE=1 silences every bar (an explicit disable=False would override it); quiet=True
    silences a bar whatever the environment says (the non-main processes)."""
    code = ("from peftlab.progress import progress; "
            "print(progress(range(2)).disable, progress(range(2), quiet=True).disable)")

    def disabled(**env):
        base = {k: v for k, v in os.environ.items() if not k.startswith("TQDM_")}
        return subprocess.run([sys.executable, "-c", code], env={**base, **env}, capture_output=True,
                              text=True, check=True).stdout.split()

    assert disabled(TQDM_DISABLE="1") == ["True", "True"]
    assert disabled() == ["False", "True"]
