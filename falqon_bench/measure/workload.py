"""The step a point times: one fwd + bwd + SGD update + method hook of a single converted linear layer.

The model is `nn.Sequential(proj=nn.Linear(K, N, bias=False))` in the point's dtype on the device, with
seeded LLM-like weights (N(0, 1/K) plus a few outlier input columns), converted by the point's method.
Inputs (x: tokens x K with requires_grad, dY: tokens x N) are made once. The step has no host syncs,
so it can be captured into a CUDA graph.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from falqon_core.convert import convert_model
from falqon_core.methods import AdapterConfig, Method
from falqon_core.methods.base import StepCost

SEED = 0
LR = 1e-4  # SGD step size of the adapters; small so repeated timed steps keep values in range
OUTLIER_EVERY = 256  # one outlier input column per 256 (at least one)
OUTLIER_SCALE = 8.0  # outlier columns are this many times larger, as in real LLM weights
TARGET = "proj"


@dataclass
class Workload:
    """What the timer needs for one point: the zero-arg step and the facts recorded next to its time."""

    step: Callable[[], None]
    method: Method
    model: nn.Module
    step_cost: StepCost
    memory_bytes: dict[str, int]
    trainable: list[torch.Tensor]
    inputs: dict[str, torch.Tensor] = field(default_factory=dict)


def llm_like_weight(N: int, K: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """An N x K fp32 weight ~ N(0, 1/K) with every OUTLIER_EVERY-th input column (randomly placed) scaled up."""
    w = torch.randn(N, K, generator=generator, device=device) / K**0.5
    n_out = max(1, K // OUTLIER_EVERY)
    cols = torch.randperm(K, generator=generator, device=device)[:n_out]
    w[:, cols] *= OUTLIER_SCALE
    return w


def make_base_model(K: int, N: int, dtype: torch.dtype, device: torch.device, seed: int = SEED) -> nn.Sequential:
    """The frozen one-layer model every method converts: a module named 'proj' = nn.Linear(K, N, bias=False)."""
    generator = torch.Generator(device=device).manual_seed(seed)
    linear = nn.Linear(K, N, bias=False, device=device, dtype=dtype)
    with torch.no_grad():
        linear.weight.copy_(llm_like_weight(N, K, generator, device))
    linear.weight.requires_grad_(False)
    return nn.Sequential(OrderedDict([(TARGET, linear)]))


def build_workload(point: dict[str, Any], device: torch.device | str) -> Workload:
    """Build the model, inputs and step of one point. Raises MethodUnavailable when the method cannot run here
    (convert_model checks it, compile included)."""
    device = torch.device(device)
    dtype = getattr(torch, point.get("dtype", "bfloat16"))
    K, N, rank, tokens = int(point["K"]), int(point["N"]), int(point["rank"]), int(point["tokens"])
    config = AdapterConfig(rank=rank, target_modules=(TARGET,), dtype=dtype, seed=SEED, options=dict(point.get("options") or {}))
    base = make_base_model(K, N, dtype, device)
    model, method = convert_model(base, point["method"], config, compile=bool(point.get("compile")))
    trainable = list(method.trainable_parameters(model))
    forward = torch.compile(model) if point.get("compile") else model

    generator = torch.Generator(device=device).manual_seed(SEED + 1)
    x = torch.randn(tokens, K, generator=generator, device=device).to(dtype).requires_grad_(True)
    dy = torch.randn(tokens, N, generator=generator, device=device).to(dtype)
    wrt = [x, *trainable]

    def step() -> None:
        out = forward(x)
        grads = torch.autograd.grad(out, wrt, grad_outputs=dy)
        with torch.no_grad():
            # one plain add per tensor, not torch._foreach_add_: with one or two N x r tensors the foreach kernel
            # gets one block per 64k elements, and on the H200 it took 9-16 us per step whatever N (results/
            # shapes-levers-h200), 5-15% of a small layer's step that no method's floor contains
            for param, grad in zip(trainable, grads[1:]):
                param.add_(grad, alpha=-LR)
            method.after_optimizer_step(model)

    return Workload(
        step=step,
        method=method,
        model=model,
        step_cost=method.step_cost(K, N, rank, tokens, config.options),
        memory_bytes=dict(method.memory_bytes(model)),
        trainable=trainable,
        inputs={"x": x, "dy": dy},
    )
