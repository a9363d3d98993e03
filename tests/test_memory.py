"""estimate_memory: the fake-tensor trace counts what a real step allocates; the parts it adds
(4-bit weights, FSDP shards) follow the real model; bad calls are refused."""
import os

import pytest
import torch

import peftlab
from peftlab.kernels import lora as kernels
from peftlab.memory import _LiveBytes, estimate_memory

from conftest import tiny_llama
from train_job import lm_dataset


def real_peak(model, batch, checkpointing: bool) -> int:
    """Peak live tensor bytes of two real training steps, counted as the estimate counts fake ones."""
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)
    live = _LiveBytes()
    for tensor in [*model.parameters(), *model.buffers(), *batch.values()]:
        live.track(tensor)
    model.train()
    with live:
        for _ in range(2):
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return live.peak


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("method, settings", [("lora", {"r": 4, "lora_dropout": 0.1}), ("adalora", {"init_r": 6, "target_r": 2})])
def test_the_fake_trace_counts_what_a_real_step_allocates(method, settings, checkpointing):
    rows = lm_dataset(8, length=32)
    batch = {"input_ids": torch.stack([r["input_ids"] for r in rows]), "labels": torch.stack([r["labels"] for r in rows])}
    model = peftlab.wrap(tiny_llama(), method, target_modules="all-linear", **settings)
    estimate = estimate_memory(model, batch_size=8, seq_len=32, gradient_checkpointing=checkpointing)
    frozen = sum(p.numel() * 4 for p in model.parameters() if not p.requires_grad)
    traced = estimate.base_weights + estimate.adapter + estimate.activations
    kernels._SCRATCH.clear()  # the kernels' reused buffers count, as in a fresh process
    measured = real_peak(model, batch, checkpointing)
    assert estimate.base_weights == frozen
    # without checkpointing within 2 KB; with it the trace holds a fixed 70 KB more here (6-8% of
    # this tiny model), not yet traced to its tensor (on a 134M Llama it came out 3% under instead)
    assert traced == pytest.approx(measured, rel=0.10 if checkpointing else 0.005), (traced, measured)


@pytest.mark.parametrize("method", ["increlora", "evalora", "randlora", "allora", "sara"])
def test_every_method_is_estimated_from_its_wrapped_model(method):
    """The trace wraps a fake copy as the real adapter's file would rebuild it, so choices made from
    the weights (SaRA's selected entries) come as sizes: no method needs real values to be estimated."""
    rows = lm_dataset(8, length=32)
    batch = {"input_ids": torch.stack([r["input_ids"] for r in rows]), "labels": torch.stack([r["labels"] for r in rows])}
    model = peftlab.wrap(tiny_llama(), method, target_modules="all-linear")
    estimate = estimate_memory(model, batch_size=8, seq_len=32)
    kernels._SCRATCH.clear()
    measured = real_peak(model, batch, checkpointing=False)
    assert estimate.base_weights + estimate.adapter + estimate.activations == pytest.approx(measured, rel=0.10)


def test_estimate_follows_batch_checkpointing_4bit_and_fsdp(tmp_path):
    model = peftlab.wrap(tiny_llama(), "lora", r=4)
    one = estimate_memory(model, batch_size=2, seq_len=32)
    assert estimate_memory(model, batch_size=4, seq_len=32).activations == pytest.approx(2 * one.activations, rel=0.25)
    assert estimate_memory(model, batch_size=2, seq_len=32, gradient_checkpointing=True).activations < one.activations
    sharded = estimate_memory(model, batch_size=2, seq_len=32, fsdp=True, processes=2)
    block = sum(p.numel() * 4 for p in model.model.layers[0].parameters() if not p.requires_grad)
    head = model.lm_head.weight.numel() * 4
    # its half, plus the largest unit gathered while it runs and two blocks (the running one, the prefetched one)
    assert sharded.base_weights == one.base_weights // 2 + head + 2 * block
    assert sharded.activations == one.activations and sharded.adapter == one.adapter  # the adapter stays whole

    tiny_llama().save_pretrained(tmp_path / "base")
    four_bit = peftlab.wrap(peftlab.load_model(str(tmp_path / "base"), "causal-lm", load_in_4bit=True), "lora", r=4)
    packed = sum(p.numel() * p.element_size() + (p.quant_state.absmax.numel() * 4 if hasattr(p, "quant_state") else 0)
                 for p in four_bit.parameters() if not p.requires_grad)
    assert estimate_memory(four_bit, batch_size=2, seq_len=32).base_weights == packed < one.base_weights


def test_estimate_from_a_config_needs_the_method():
    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    estimate = estimate_memory(config, method="lora", r=4, batch_size=2, seq_len=16)
    assert estimate.base_weights == sum(p.numel() * 4 for p in tiny_llama().parameters())
    assert "expected peak memory per process:" in str(estimate)
    with pytest.raises(ValueError, match="give the adapter to estimate"):
        estimate_memory(config)
    with pytest.raises(ValueError, match="wrapped already"):
        estimate_memory(peftlab.wrap(tiny_llama(), "lora"), method="lora")


SCENARIO = """
import os, sys, torch
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
if sys.argv[1] == "trainer":
    sys.path.insert(0, sys.argv[2])
    import peftlab
    from conftest import tiny_llama
    peftlab.Trainer(peftlab.wrap(tiny_llama(), "lora", r=2), peftlab.TrainConfig(output_dir=sys.argv[3]),
                    [{"input_ids": torch.arange(4), "labels": torch.arange(4)}])
start = rss()
for i in range(30):  # a 64 MB block freed raises glibc's dynamic threshold; then 4-16 MB tensors come and go
    big = torch.ones(16 * 2 ** 20)
    del big
    kept = [torch.ones(int((4 + i * 7 % 13) * 2 ** 18)) for _ in range(20)]
    del kept
print(rss() - start)
"""


@pytest.mark.slow
def test_the_trainer_lets_freed_tensors_return_their_memory(tmp_path):
    """Without a fixed mmap threshold RSS stays ~200 MiB above the live tensors after this churn; with
    the one the Trainer sets (no environment variable needed), it comes back."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    tests = os.path.dirname(__file__)

    def growth(mode):
        done = subprocess.run([sys.executable, "-c", SCENARIO, mode, tests, str(tmp_path / mode)], env=env,
                              capture_output=True, text=True, check=True)
        return float(done.stdout.split()[-1])

    assert growth("plain") > 100, "the scenario shows glibc's creep"
    assert growth("trainer") < 30
