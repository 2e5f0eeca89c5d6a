"""torch.compile traces a whole tiny-llama FALQON training step (forward, loss, backward) in one graph, through
the `falqon::` custom ops, and the compiled step computes eager's loss and gradients.

This is what the e2e `compile` and `compile_cuda_graph` modes run on the GPU (the model under torch.compile,
its stacked layers' B and melded matrices being views of the group stacks). On CPU the Triton kernels run in the
interpreter and the backend is aot_eager (AOTAutograd traces the backward through the ops' fake
implementations); that takes 1-3 minutes on 2 cores, so CPU runs it only with FALQON_SLOW_TESTS=1. On a GPU it
runs always, with inductor.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

from falqon_core.kernels import _triton_common as tc

ON_GPU = torch.cuda.is_available()
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not ON_GPU and os.environ.get("FALQON_SLOW_TESTS") != "1",
                       reason="1-3 min on CPU (Triton interpreter + AOTAutograd): set FALQON_SLOW_TESTS=1 to run it"),
]


@pytest.fixture
def triton_path(monkeypatch):
    monkeypatch.setattr(tc, "triton_fp8_ok", lambda t: True)  # what the GPU takes; on CPU under the interpreter


def _falqon_tiny_llama(device: torch.device):
    from falqon_bench.suites.models import make_model
    from falqon_core.convert import LLAMA_TARGET_MODULES, convert_model
    from falqon_core.methods import AdapterConfig

    model = make_model("tiny-llama", device, torch.bfloat16, num_layers=2, seed=0)
    model, method = convert_model(model, "falqon", AdapterConfig(rank=4, target_modules=LLAMA_TARGET_MODULES, seed=0))
    return model, method


def _loss(model, tokens):
    return model(input_ids=tokens, labels=tokens).loss


def test_compiled_tiny_llama_falqon_step_has_no_graph_break_and_matches_eager(triton_path):
    device = torch.device("cuda" if ON_GPU else "cpu")
    model, method = _falqon_tiny_llama(device)
    assert model.model.layers[0].self_attn.q_proj.proxy_group is not None  # the stacked layout is what is traced
    tokens = ((torch.arange(32).reshape(2, 16) * 3) % 256).to(device)

    torch._dynamo.reset()
    explanation = torch._dynamo.explain(_loss)(copy.deepcopy(model), tokens)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    ops = {str(n.target) for g in explanation.graphs for m in g.modules() if hasattr(m, "graph") for n in m.graph.nodes}
    assert any("falqon.melded_gemm" in t or "falqon.partial_amax" in t for t in ops), sorted(ops)[:20]
    torch._dynamo.reset()

    twin = copy.deepcopy(model)
    eager = _loss(model, tokens)
    eager.backward()
    compiled = torch.compile(twin, fullgraph=True, backend="inductor" if ON_GPU else "aot_eager")
    loss = compiled(input_ids=tokens, labels=tokens).loss
    loss.backward()
    torch._dynamo.reset()

    grads = [(a.grad, b.grad) for a, b in zip(method.trainable_parameters(model), method.trainable_parameters(twin))]
    assert len(grads) == 14 and all(g is not None for pair in grads for g in pair)
    if ON_GPU:  # inductor fuses the bf16 elementwise work around the linears: close, not bit-equal
        torch.testing.assert_close(loss, eager, rtol=2e-2, atol=2e-2)
        for a, b in grads:
            torch.testing.assert_close(b, a, rtol=0.1, atol=1e-3 * float(a.abs().max()) + 1e-6)
    else:  # aot_eager runs the same kernels in the same order
        assert torch.equal(loss, eager)
        assert all(torch.equal(a, b) for a, b in grads)
