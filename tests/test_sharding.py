"""FSDP2: the base sharded over two CPU processes (torchrun, gloo) trains every method exactly as
one unsharded process does, in fp32 and in 4-bit, compiled, and across a kill -9 and resume."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

import peftlab
from peftlab.sharding import is_sharded, shard

from cases import CASES
from conftest import tiny_gpt2, tiny_llama
from train_job import HERE, assert_same_training, free_port, job_env, lm_dataset, run_job

QLORA_METHODS = list(CASES)  # sara trains the 4-bit base's own entries; the others are LoRA-family


def frozen_bytes(run) -> list[int]:
    return [json.loads(p.read_text())["frozen"] for p in sorted(run.glob("storage_*.json"))]


def sharded(out, method, *args):
    return run_job(out, method, "--per-device", "2", "--fsdp", *args, processes=2, launcher="torchrun")


@pytest.mark.slow
@pytest.mark.parametrize("method", list(CASES))
def test_sharded_training_matches_one_process(method, one_process, tmp_path):
    one, two = one_process(method), sharded(tmp_path / "two", method)
    assert_same_training(method, one, two)
    whole, shards = frozen_bytes(one)[0], frozen_bytes(two)
    assert len(shards) == 2 and all(s <= 0.55 * whole for s in shards), (whole, shards)  # each holds half the base


@pytest.mark.slow
@pytest.mark.parametrize("method", QLORA_METHODS)
def test_sharded_4bit_base_trains_as_the_unsharded_4bit_run(method, tmp_path):
    tiny_llama().save_pretrained(tmp_path / "base")
    one = run_job(tmp_path / "one", method, "--per-device", "4", "--four-bit")
    two = sharded(tmp_path / "two", method, "--four-bit")
    # EVA's PCA on 4-bit activations has a smaller eigengap than in fp32 (see assert_same_training)
    assert_same_training(method, one, two, atol=1e-3 if method == "evalora" else 1e-5)
    whole, shards = frozen_bytes(one)[0], frozen_bytes(two)
    assert all(s <= 0.55 * whole for s in shards), (whole, shards)  # the packed NF4 bytes are sharded too


@pytest.mark.slow
def test_compiled_sharded_training_matches_one_process(one_process, tmp_path):
    """LoRA's fused kernel under torch.compile, on a sharded base."""
    assert_same_training("lora", one_process("lora"), sharded(tmp_path / "two", "lora", "--compile"))


@pytest.mark.slow
def test_bf16_sharded_training_matches_ddp_in_bf16(tmp_path):
    """bf16 rounds a batch of 2 differently from a batch of 4, so the oracle is DDP on the same shards."""
    ddp = run_job(tmp_path / "ddp", "lora", "--per-device", "2", "--bf16", processes=2)
    assert_same_training("lora", ddp, sharded(tmp_path / "fsdp", "lora", "--bf16"))


@pytest.mark.slow
def test_a_killed_sharded_run_resumes_to_the_same_adapter(tmp_path):
    full = sharded(tmp_path / "full", "adalora", "--steps", "10")
    job = [str(HERE / "train_job.py"), str(tmp_path / "cut"), "--method", "adalora", "--dropout", "0", "--steps", "10",
           "--per-device", "2", "--fsdp"]
    torchrun = [str(Path(sys.executable).with_name("torchrun")), "--nproc_per_node", "2"]
    killed = subprocess.run(torchrun + ["--master_port", str(free_port())] + job + ["--kill-at", "5"],
                            env=job_env(tmp_path), capture_output=True, text=True)
    assert killed.returncode != 0 and not (tmp_path / "cut" / "adapter_model.safetensors").exists()
    resumed = subprocess.run(torchrun + ["--master_port", str(free_port())] + job + ["--resume"],
                             env=job_env(tmp_path), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "checkpoint-4 at step 4" in resumed.stdout
    first, second = (load_file(str(d / "adapter_model.safetensors")) for d in (full, tmp_path / "cut"))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


@pytest.fixture
def process_group():
    """A one-process gloo group in this process: enough to shard (each 'shard' is the whole tensor)."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_an_adapter_loaded_then_sharded_gives_the_same_outputs(tmp_path, process_group):
    model = peftlab.wrap(tiny_llama(), "adalora", init_r=4, target_r=2, total_step=10)
    for layer in model.peftlab.current.layers.values():
        torch.nn.init.normal_(layer.lora_E, std=0.5)
    peftlab.save_adapter(model, tmp_path / "adapter")
    batch = {"input_ids": torch.stack([row["input_ids"] for row in lm_dataset(4)])}
    expected = model(**batch).logits
    loaded = shard(peftlab.load_adapter(tiny_llama(), tmp_path / "adapter"))
    assert is_sharded(loaded) and type(loaded.model.layers[0].mlp.up_proj.base_layer.weight).__name__ == "DTensor"
    assert all(type(p).__name__ == "Parameter" for p in loaded.parameters() if p.requires_grad), "the adapter stays whole"
    torch.testing.assert_close(loaded(**batch).logits, expected, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="already sharded"):
        shard(loaded)
    with pytest.raises(ValueError, match="cannot merge a sharded model.*peftlab merge RUN_DIR"):
        peftlab.merge(loaded)


def test_a_model_with_tied_embeddings_shards_and_computes_the_same(process_group):
    """GPT-2 ties its output head to the input embeddings: one parameter, kept in the root unit."""
    model = peftlab.wrap(tiny_gpt2(), "lora", r=2, init_lora_weights=False)
    batch = {"input_ids": torch.stack([row["input_ids"] for row in lm_dataset(2)])}
    expected = model(**batch).logits
    shard(model)
    assert model.lm_head.weight is model.transformer.wte.weight
    torch.testing.assert_close(model(**batch).logits, expected, atol=1e-6, rtol=1e-5)


def test_an_adapter_sharded_by_fully_shard_itself_is_refused_with_the_fix(process_group):
    from torch.distributed.fsdp import fully_shard

    model = peftlab.wrap(tiny_llama(), "sara", target_fraction=0.1, total_step=4)
    fully_shard(model)  # what a user of plain FSDP2 would write: the adapter becomes DTensors too
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    with pytest.raises(ValueError, match="shard with peftlab.shard\\(model\\) instead"):
        peftlab.controller(model).bind_optimizer(optimizer)


def test_sharding_without_a_process_group_says_how_to_launch():
    with pytest.raises(RuntimeError, match="needs a process group: launch with `torchrun --nproc_per_node N`"):
        shard(peftlab.wrap(tiny_llama(), "lora", r=2))


def test_sharding_a_model_without_transformer_blocks_is_refused(process_group):
    model = peftlab.wrap(torch.nn.Sequential(torch.nn.Linear(4, 4)), "lora", r=2, target_modules=["0"])
    with pytest.raises(ValueError, match="names no transformer block class"):
        shard(model)
