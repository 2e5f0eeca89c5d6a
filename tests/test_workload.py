"""The timed layer step (falqon_bench.measure.workload): fwd + bwd + one SGD update of every trainable tensor."""

from __future__ import annotations

import torch

from falqon_bench.measure.workload import LR, build_workload


def test_the_step_moves_every_trainable_tensor_by_minus_lr_times_its_gradient():
    point = {"method": "bf16_lora", "K": 64, "N": 32, "rank": 8, "tokens": 16, "dtype": "float32"}
    work = build_workload(point, "cpu")
    x, dy = work.inputs["x"], work.inputs["dy"]
    for p in work.trainable:  # PEFT starts B at zero: give both a nonzero value so both get a gradient
        with torch.no_grad():
            p.normal_(generator=torch.Generator().manual_seed(1))
    before = [p.detach().clone() for p in work.trainable]
    out = work.model(x)
    grads = torch.autograd.grad(out, work.trainable, grad_outputs=dy)
    work.step()
    assert len(work.trainable) == 2
    for p, b, g in zip(work.trainable, before, grads):
        assert g.abs().sum() > 0
        torch.testing.assert_close(p.detach(), b - LR * g, rtol=0, atol=1e-6)
