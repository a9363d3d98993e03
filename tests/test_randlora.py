"""RandLoRA (arXiv:2502.00987): shared bases, full rank, regeneration, and PEFT export."""
import math
import warnings

import pytest
import torch
from torch import nn

import peftlab
from peftlab.adapters.randlora import RandomBases, ScaleBases
from peftlab.io import export_peft

from conftest import randomize_adapters, tiny_llama, tokens
from test_lora import Holder


class Pair(nn.Module):
    def __init__(self, *layers):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x):
        return sum(layer(x) for layer in self.layers)


def randlora(layer, **kw):
    return peftlab.wrap(Holder(layer), "randlora", target_modules=["proj"], **{"r": 8, "randlora_alpha": 16.0, **kw})


def test_parameter_count_of_llama_3b_q_v():
    blocks = nn.ModuleList()
    for _ in range(28):
        block = nn.Module()
        block.q_proj = nn.Linear(3072, 3072, bias=False, device="meta")
        block.v_proj = nn.Linear(3072, 1024, bias=False, device="meta")
        blocks.append(block)
    model = peftlab.wrap(Holder(blocks), "randlora", r=32, target_modules=["q_proj", "v_proj"])
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == 9_289_728  # PEFT's logged count for this configuration
    q = model.proj[0].q_proj
    assert q.randlora_lambda.shape == (32, 96) and q.randlora_gamma.shape == (96, 3072)


def test_bases_are_shared_seeded_and_unit_std():
    model = peftlab.wrap(tiny_llama(), "randlora", r=8)
    layers = list(model.peftlab.current.layers.values())
    assert len({l.bases.A.data_ptr() for l in layers}) == 1 and len({l.bases.B.data_ptr() for l in layers}) == 1
    assert len({l.randlora_lambda.data_ptr() for l in layers}) == len(layers)
    bases = layers[0].bases
    assert bases.A.shape == (8, 1, 32) and bases.B.shape == (64, 4, 8)  # max of per-layer min / max dimension
    again, other = RandomBases(8, 32, 64, seed=0), RandomBases(8, 32, 64, seed=1)
    assert torch.equal(again.A, bases.A.cpu()) and torch.equal(again.B, bases.B.cpu())
    assert not torch.equal(other.A, again.A)
    for t in (again.A, again.B):
        assert abs(t.std().item() - 1) < 1e-6 and t.abs().max() <= 1.1 * math.sqrt(3)  # sample std: ~±√3
    assert "bases" not in str(list(model.state_dict())), "bases never reach a state dict"


def test_zero_init_gradients_reach_gamma_only_and_files_hold_pefts_lambda():
    """γ starts at 0 and moves first, like LoRA's B; λ holds PEFT's constant 1/d (stored divided by k)."""
    model = randlora(nn.Linear(24, 40))
    layer = model.proj
    x = torch.randn(5, 24)
    assert torch.count_nonzero(layer.delta_weight()) == 0
    model(x).pow(2).sum().backward()
    assert torch.count_nonzero(layer.randlora_lambda.grad) == 0
    assert torch.count_nonzero(layer.randlora_gamma.grad) > 0
    torch.testing.assert_close(layer.peft_state()["randlora_lambda"], torch.full((layer.r, layer.n), 1 / 24))


@pytest.mark.parametrize("d_out, d_in, r", [(64, 64, 8), (48, 80, 7), (80, 48, 7)])
def test_update_is_full_rank_when_bases_cover_the_small_side(d_out, d_in, r):
    model = randlora(nn.Linear(d_in, d_out), r=r)
    layer = model.proj
    assert layer.randlora_gamma.shape[1] == min(d_in, d_out)
    lam, gam = torch.randn_like(layer.randlora_lambda).double(), torch.randn_like(layer.randlora_gamma).double()
    layer.bases.A.data, layer.bases.B.data = layer.bases.A.double(), layer.bases.B.double()
    assert torch.linalg.matrix_rank(layer.canonical_delta(lam, gam)) == min(d_in, d_out)
    constant = torch.full_like(gam, 0.3)
    assert torch.linalg.matrix_rank(layer.canonical_delta(lam, constant)) <= r


def test_scale_bases_backward_matches_autograd():
    a = torch.randn(3, 1, 5, dtype=torch.double)
    lam = torch.randn(3, 4, dtype=torch.double, requires_grad=True)
    gam = torch.randn(4, 5, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(lambda l, g: ScaleBases.apply(a, l, g), (lam, gam))


@pytest.mark.parametrize("d_out, d_in", [(40, 24), (24, 40)])
def test_folded_path_equals_plain_autograd(d_out, d_in):
    model = randlora(nn.Linear(d_in, d_out))
    layer = model.proj
    randomize_adapters(model, std=0.3)
    x = torch.randn(2, 3, d_in, requires_grad=True)
    w = torch.randn(2, 3, d_out)
    (model(x) * w).sum().backward()
    folded = [t.grad.clone() for t in (x, layer.randlora_lambda, layer.randlora_gamma)]
    for t in (x, layer.randlora_lambda, layer.randlora_gamma):
        t.grad = None
    ((layer.base_layer(x) + layer.branch(x)) * w).sum().backward()   # the unfused, autograd path
    for got, want in zip(folded, (x.grad, layer.randlora_lambda.grad, layer.randlora_gamma.grad)):
        torch.testing.assert_close(got, want, atol=5e-5, rtol=1e-4)  # fp32, other summation order


def test_saved_file_holds_diagonals_not_bases_and_reloads_bit_identically(tmp_path):
    model = peftlab.wrap(tiny_llama(), "randlora", r=8)
    randomize_adapters(model)
    x = tokens()
    expected = model(x).logits
    peftlab.save_adapter(model, tmp_path)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert (tmp_path / "adapter_model.safetensors").stat().st_size < 4 * trainable + 8192
    torch.manual_seed(123)  # the reload must not depend on the global generator
    loaded = peftlab.load_adapter(tiny_llama(), tmp_path)
    assert torch.equal(loaded(x).logits, expected)
    import json
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["bases_checksum"] = "0" * 16
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    (tmp_path / "peftlab.json").unlink()  # as another tool would write it (no manifest)
    with pytest.raises(ValueError, match="regenerated random bases do not match the saved checksum"):
        peftlab.load_adapter(tiny_llama(), tmp_path)


def test_export_to_peft_randlora_gives_identical_outputs(tmp_path):
    from peft import PeftModel

    model = peftlab.wrap(tiny_llama(), "randlora", r=8, randlora_alpha=32.0)
    randomize_adapters(model)
    x = tokens()
    expected = model(x).logits
    export_peft(model, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no "missing adapter keys", no unknown config keys
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        theirs = PeftModel.from_pretrained(tiny_llama(), str(tmp_path)).eval()
    torch.testing.assert_close(theirs(x).logits, expected, atol=1e-5, rtol=1e-5)
