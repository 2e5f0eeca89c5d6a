"""Every Triton launcher is opaque to torch.compile: a `falqon::` custom op in the graph, or a graph break.

Why: inductor infers which buffers a user Triton kernel writes; where the inference misses a store, the
launch is dead code to it and is dropped, so a compiled step returns garbage and times too fast (a compiled
halo_lora returned zeros on the H100). Here each launcher runs under torch.compile (Dynamo with the eager
backend, on CPU through the Triton interpreter): no graph may hold a raw Triton launch, FALQON's launchers
must be one custom-op node each with no graph break, and the results must equal the uncompiled call's, bit
for bit.
"""

from __future__ import annotations

import pytest
import torch

from falqon_core import fp8
from falqon_core.kernels.hadamard import block_hadamard_quantize, block_hadamard_triton
from falqon_core.kernels.melded import melded_matmul_triton
from falqon_core.kernels.proxy_update import proxy_update_triton_
from falqon_core.kernels.quantize import quantize_fp8_triton
from falqon_core.kernels.quantize_transpose import quantize_transpose_fp8_triton
from falqon_core.kernels.topk import topk_indices_triton
from falqon_core.kernels.transpose import transpose_fp8_triton


def _inputs() -> dict[str, tuple]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 64, generator=g).to(torch.bfloat16)
    x8, xs = fp8.quantize(x, fp8.E4M3, "tensorwise")
    w8, ws = fp8.quantize(torch.randn(48 + 8, 64, generator=g), fp8.E4M3, "tensorwise")
    a8 = w8[48:]
    b = (torch.randn(48, 8, generator=g) * 0.01).to(torch.bfloat16)
    return {
        "quantize tensorwise": (lambda t: quantize_fp8_triton(t, fp8.E4M3, "tensorwise"), (x,)),
        "quantize rowwise": (lambda t: quantize_fp8_triton(t, fp8.E5M2, "rowwise"), (x,)),
        "hadamard quantize": (lambda t: block_hadamard_quantize(t, 16, fp8.E4M3, "tensorwise"), (x,)),
        "hadamard rotate": (lambda t: block_hadamard_triton(t, 16), (x,)),
        "melded gemm": (lambda a, s, w, ws_: melded_matmul_triton(a, s, w, ws_, 48), (x8, xs, w8, ws)),
        "transpose": (transpose_fp8_triton, (x8,)),
        "proxy update": (lambda w, a, bb: (proxy_update_triton_(w, a, bb, 4), w), (w8[:48].clone(), a8, b)),
        "quantize transpose": (lambda t: quantize_transpose_fp8_triton(t, fp8.E5M2, 16)[:2], (x[:30],)),
        "topk select": (lambda v: topk_indices_triton(v, 5), (torch.rand(40, generator=g),)),
    }


# FALQON's launchers are torch.library custom ops under compile (falqon_core.kernels.compile_ops)
AS_CUSTOM_OPS = ("quantize tensorwise", "quantize rowwise", "melded gemm", "transpose", "proxy update", "quantize transpose")


def _flat(out) -> list[torch.Tensor]:
    return [t for t in (out if isinstance(out, tuple) else (out,))]


def _clone(args: tuple) -> tuple:
    return tuple(a.clone() for a in args)


@pytest.mark.parametrize("name", list(_inputs()))
def test_launcher_runs_outside_compiled_graphs_and_matches_eager(name):
    fn, args = _inputs()[name]
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(fn)(*_clone(args))
    targets = [str(n.target) for g in explanation.graphs for n in g.graph.nodes]
    traced = [t for t in targets if "triton_kernel" in t]
    assert not traced, f"{name}: Dynamo put a Triton launch into a graph: {traced}"
    if name in AS_CUSTOM_OPS:
        assert explanation.graph_break_count == 0, f"{name}: {explanation.break_reasons}"
        assert any("falqon." in t for t in targets), f"{name}: no falqon:: op in the graph: {targets}"
    eager = _flat(fn(*_clone(args)))
    compiled = _flat(torch.compile(fn, backend="eager")(*_clone(args)))
    assert len(eager) == len(compiled)
    for e, c in zip(eager, compiled):
        assert torch.equal(e.view(torch.uint8) if e.element_size() == 1 else e, c.view(torch.uint8) if c.element_size() == 1 else c)
