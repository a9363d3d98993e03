"""The Triton kernels against the eager path, run by Triton's interpreter on CPU (small shapes)."""
from __future__ import annotations

import importlib
import os

import pytest
import torch
from torch import nn

pytest.importorskip("triton")


@pytest.fixture(scope="module")
def triton_lora():
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("needs CUDA or TRITON_INTERPRET=1 set before triton is imported (tests/conftest.py does)")
    return importlib.import_module("peftlab.kernels.triton_lora")


@pytest.mark.parametrize("mask", ["", "a", "b", "c"])
@pytest.mark.parametrize("accumulate", [False, True])
def test_masked_matmul_equals_torch(triton_lora, mask, accumulate):
    torch.manual_seed(0)
    x = torch.randn(20, 24)                      # the tensor the dropout mask belongs to
    keep = triton_lora.keep_mask(x.shape, 7, 0.3, x.device)
    assert 0.5 < keep.float().mean() < 0.9
    shapes = {"": ((20, 24), (24, 5)), "a": ((20, 24), (24, 5)), "b": ((5, 20), (20, 24)), "c": ((20, 5), (5, 24))}
    (m, k), (_, n) = shapes[mask]
    a, b = (x if mask == "a" else torch.randn(m, k)), (x if mask == "b" else torch.randn(k, n))
    out = torch.randn(m, n)
    expected = 1.5 * ((a * keep if mask == "a" else a) @ (b * keep if mask == "b" else b))
    if mask == "c":
        expected = expected * keep
    if accumulate:
        expected = expected + out
    got = triton_lora.matmul(a, b, out.clone(), 1.5, seed=7, p=0.3, mask_cols=24, mask=mask, accumulate=accumulate)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("p", [0.0, 0.25])
def test_triton_lora_equals_eager_forward_and_gradients(triton_lora, p):
    torch.manual_seed(0)
    base = nn.Linear(24, 20).requires_grad_(False)
    a = torch.randn(4, 24, requires_grad=True)
    b = torch.randn(20, 4, requires_grad=True)
    x = torch.randn(2, 9, 24, requires_grad=True)

    torch.manual_seed(3)  # the kernel draws its seed from the global generator
    y = triton_lora.TritonLoRA.apply(x, base, a, b, 2.0, p)
    grad = torch.randn_like(y)
    gx, ga, gb = torch.autograd.grad(y, (x, a, b), grad)

    torch.manual_seed(3)
    seed = int(torch.randint(0, 2 ** 31 - 1, ()))
    keep = triton_lora.keep_mask((18, 24), seed, p, x.device).view(2, 9, 24) if p else torch.ones(2, 9, 24, dtype=torch.bool)
    y_ref = base(x) + ((x * keep / (1 - p)) @ a.t() @ b.t()) * 2.0
    gx_ref, ga_ref, gb_ref = torch.autograd.grad(y_ref, (x, a, b), grad)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    for got, ref in ((gx, gx_ref), (ga, ga_ref), (gb, gb_ref)):
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-5)


def test_the_dispatcher_runs_single_layers_through_triton(triton_lora, monkeypatch):
    """What CUDA gets automatically, forced here on CPU tensors: a wrapped model through TritonLoRA."""
    import peftlab
    from peftlab.kernels import fusion

    from conftest import randomize_adapters, tiny_gpt2, tokens

    calls = []
    monkeypatch.setattr(fusion, "use_triton", lambda x: True)
    monkeypatch.setattr(triton_lora.TritonLoRA, "forward", _counting(triton_lora.TritonLoRA.forward, calls))
    model = peftlab.wrap(tiny_gpt2(), "lora", r=4, target_modules=["c_attn", "c_fc"])
    randomize_adapters(model)
    eager = peftlab.wrap(tiny_gpt2(), "lora", r=4, target_modules=["c_attn", "c_fc"], fused=False)
    eager.load_state_dict(model.state_dict())
    x = tokens(1, 6)
    torch.testing.assert_close(model(x).logits, eager(x).logits, atol=1e-5, rtol=1e-5)
    assert len(calls) == 4  # two blocks, two adapted Conv1D layers each


def _counting(forward, calls):
    def wrapped(ctx, *args):
        calls.append(1)
        return forward(ctx, *args)
    return staticmethod(wrapped)
