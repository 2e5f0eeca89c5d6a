"""How a training loop runs FALQON's proxy update: once after every optimizer step, never more.

Two ways; use exactly one per loop (both together would run two updates per step: the second finds B
zero and changes no weight, but it advances each layer's k schedule a second time):
- a plain PyTorch loop: `attach_falqon_hook(optimizer, model)` (torch's optimizer step post-hook);
- a transformers Trainer: `Trainer(..., callbacks=[FalqonTrainerCallback()])`. Its `on_optimizer_step`
  event (added in transformers 4.42, present in 5.x) fires right after `optimizer.step()` and before the
  gradients are zeroed, once per real step (so gradient accumulation is respected).
"""

from __future__ import annotations

from torch import nn
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

from falqon_core.methods.base import Method
from falqon_core.methods.falqon import Falqon


def attach_falqon_hook(optimizer: Optimizer, model: nn.Module, method: Method | None = None) -> RemovableHandle:
    """Make every `optimizer.step()` run `method.after_optimizer_step(model)` (default: FALQON's update).

    Returns the handle; `handle.remove()` detaches it.
    """
    method = method if method is not None else Falqon()

    def _after_step(_optimizer: Optimizer, _args: tuple, _kwargs: dict) -> None:
        method.after_optimizer_step(model)

    return optimizer.register_step_post_hook(_after_step)


def _make_trainer_callback_class() -> type:
    """Define FalqonTrainerCallback on first use: importing transformers' Trainer stack takes seconds
    (it pulls in peft and accelerate), a cost a plain PyTorch loop should not pay."""
    from transformers import TrainerCallback

    class FalqonTrainerCallback(TrainerCallback):
        """transformers callback: FALQON's proxy update after each optimizer step of a Trainer.

        model: the model to update; default the `model` the Trainer passes to its callbacks.
        method: the Method whose after_optimizer_step runs (default FALQON).
        """

        def __init__(self, model: nn.Module | None = None, method: Method | None = None):
            self.model = model
            self.method = method if method is not None else Falqon()

        def on_optimizer_step(self, args, state, control, model: nn.Module | None = None, **kwargs):
            target = self.model if self.model is not None else model
            if target is None:
                raise ValueError(
                    "FalqonTrainerCallback got no model: pass one to the constructor or run it inside a Trainer"
                )
            self.method.after_optimizer_step(target)
            return control

    FalqonTrainerCallback.__module__ = __name__
    return FalqonTrainerCallback


def __getattr__(name: str):
    """`from falqon_core.training import FalqonTrainerCallback` builds the class once, on first access."""
    if name == "FalqonTrainerCallback":
        cls = _make_trainer_callback_class()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
