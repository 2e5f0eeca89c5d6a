"""torchao's float8 linears (fp8_lora, fp8_base_lora) at token counts that are not multiples of 16.

On CUDA torch._scaled_mm refuses torchao's dW GEMM (reduction over the tokens) unless M % 16 == 0; the
methods pad M with zero rows inside the converted layers, as a user would. The CPU's torch._scaled_mm takes
any M, so a spy checks that every fp8 GEMM gets the shapes the CUDA kernel takes, and the padded step is
compared with torchao's own unpadded step on CPU: zero rows change no tensorwise scale and add exact zeros,
so the two agree up to the summation order of the fp32-accumulated reductions (a bf16 ulp, 2^-8 relative).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from falqon_core import fp8
from falqon_core.methods import AdapterConfig, get_method
from falqon_core.methods.fp8_lora import TOKEN_MULTIPLE

K, N = 64, 96


class OneLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(K, N, bias=False)

    def forward(self, x):
        return self.proj(x)


def converted(method_name: str, rank: int) -> nn.Module:
    torch.manual_seed(0)
    model = get_method(method_name).convert(OneLayer(), AdapterConfig(rank=rank))
    with torch.no_grad():  # a non-zero B, so the adapter path and dA count
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, rank**-0.5)
    return model


def unpadded(model: nn.Module) -> nn.Module:
    """A copy whose float8 linears run torchao's own forward (the class the padding subclass derives from)."""
    twin = copy.deepcopy(model)
    for module in twin.modules():
        if type(module).__name__ == "TokenPaddedFloat8Linear":
            module.__class__ = type(module).__mro__[1]
    return twin


def step(model: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> dict[str, torch.Tensor]:
    x = x.clone().requires_grad_(True)
    out = model(x)
    out.backward(dy)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return {"out": out.detach(), "dx": x.grad, **grads}


@pytest.mark.parametrize("method_name,rank", [("fp8_base_lora", 12), ("fp8_lora", 16)])
def test_odd_token_count_is_padded_to_fp8_gemm_shapes_and_matches_the_unpadded_step(monkeypatch, method_name, rank):
    model = converted(method_name, rank)
    twin = unpadded(model)
    x = torch.randn(7, 11, K, dtype=torch.bfloat16)  # M = 77 tokens
    dy = torch.randn(7, 11, N, dtype=torch.bfloat16)
    want = step(twin, x, dy)

    shapes = []
    real = torch._scaled_mm

    def spy(a, b, *args, **kwargs):
        shapes.append((tuple(a.shape), tuple(b.shape)))
        return real(a, b, *args, **kwargs)

    monkeypatch.setattr(torch, "_scaled_mm", spy)
    got = step(model, x, dy)
    assert shapes, "no fp8 GEMM ran"
    for a, b in shapes:
        assert a[1] % 16 == 0 and b[0] % 16 == 0 and b[1] % 16 == 0, f"_scaled_mm {a} x {b} refused on CUDA"
    assert any(a[1] == 80 for a, _ in shapes), "the dW GEMM should reduce over M padded 77 -> 80"
    assert got.keys() == want.keys()
    for name, value in want.items():
        assert got[name].shape == value.shape, name
        tol = 2.0**-8 * value.abs().max().item()
        assert (got[name].float() - value.float()).abs().max().item() <= tol, name


def test_aligned_token_count_runs_torchaos_own_forward_unchanged(monkeypatch):
    model = converted("fp8_base_lora", 16)
    calls = []
    monkeypatch.setattr(torch.nn.functional, "pad", lambda *a, **k: calls.append(1) or pytest.fail("padded"))
    step(model, torch.randn(4 * TOKEN_MULTIPLE, K, dtype=torch.bfloat16), torch.randn(4 * TOKEN_MULTIPLE, N, dtype=torch.bfloat16))
    assert not calls
    assert fp8.scaled_mm_fits(4 * TOKEN_MULTIPLE, N)
