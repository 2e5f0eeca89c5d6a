"""One falqon layer step per setting, for GPU tests that switch an implementation path on and off."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch


def falqon_steps(n: int, rank: int, m: int, settings: Iterable[Callable[[], None]]):
    """A seeded FalqonLinear (K 1024 -> n, rank r, bf16, CUDA), an input x (m x 1024) and an output gradient dy;
    for each setting (called first) one forward and backward from the same layer state. Returns (layer, x, dy,
    [(y, dX, dB) per setting])."""
    from falqon_core.methods import falqon as fm

    torch.manual_seed(0)
    layer = fm.FalqonLinear(torch.nn.Linear(1024, n, bias=False, device="cuda", dtype=torch.bfloat16), rank)
    x = torch.randn(m, 1024, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn(m, n, device="cuda", dtype=torch.bfloat16) * 0.01
    results = []
    for apply in settings:
        apply()
        xi = x.clone().requires_grad_()
        layer.lora_B.grad = None
        y = layer(xi)
        y.backward(dy)
        results.append((y.detach().clone(), xi.grad.clone(), layer.lora_B.grad.clone()))
    return layer, x, dy, results
