"""A step whose backward skips work is an error, not a fast step (e2e_step.check_adapter_grads)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from falqon_bench.measure.e2e_step import PhaseClock, Training, check_adapter_grads


class Trainable:
    """The part of a Method the check uses."""

    @staticmethod
    def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
        return [p for p in model.parameters() if p.requires_grad]


def _training(used: bool) -> Training:
    model = nn.ModuleDict({"a": nn.Linear(4, 4), "b": nn.Linear(4, 4)})
    x = torch.randn(3, 4)
    loss = model["a"](x).sum() + (model["b"](x).sum() if used else 0.0 * model["b"].weight.sum())
    loss.backward()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return Training(model, model, Trainable(), opt, PhaseClock(torch.device("cpu")))


def test_every_trainable_tensor_with_a_nonzero_gradient_passes():
    check_adapter_grads(_training(used=True), "eager")


def test_a_zero_gradient_names_the_tensor_and_the_mode():
    with pytest.raises(RuntimeError, match=r"compile step left 2 of 4 .*b\.weight"):
        check_adapter_grads(_training(used=False), "compile")


def test_a_missing_gradient_counts_too():
    training = _training(used=True)
    training.base["b"].bias.grad = None
    with pytest.raises(RuntimeError, match=r"left 1 of 4 .*b\.bias"):
        check_adapter_grads(training, "compile_cuda_graph")
