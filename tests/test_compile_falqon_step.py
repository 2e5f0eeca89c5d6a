"""A FALQON layer step compiles whole (fullgraph=True) with its Triton kernels as `falqon::` custom ops, and
computes what the eager step computes, bit for bit.

On CPU the Triton kernels run in the interpreter; FALQON's dispatchers take their Triton path when
`triton_fp8_ok` says so, which this test forces. The backend is aot_eager: AOTAutograd traces forward and
backward through the ops' fake implementations and functionalizes the proxy update's in-place writes (the
part where a wrong fake or an undeclared mutation shows); inductor's code generation is left to the GPU run.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from falqon_core.kernels import _triton_common as tc
from falqon_core.methods.falqon import FalqonLinear


@pytest.fixture
def triton_path(monkeypatch):
    monkeypatch.setattr(tc, "triton_fp8_ok", lambda t: True)


def _layer(db_path: str = "auto") -> FalqonLinear:
    torch.manual_seed(0)
    layer = FalqonLinear(nn.Linear(64, 96, bias=False), 16, init_svd="exact", db_path=db_path)
    return layer


def _step(layer: FalqonLinear, forward, update, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    out = forward(x)
    out.float().square().mean().backward()
    grad = layer.lora_B.grad.clone()
    with torch.no_grad():
        layer.lora_B -= 50.0 * grad  # large enough that merged rows change W8
    rows = update()
    return out.detach(), grad, rows


@pytest.mark.parametrize("db_path", ["transpose", "fused"])  # dY8^T + dB GEMM, or the falqon::quantize_db op
def test_compiled_falqon_step_has_no_graph_break_and_matches_eager(triton_path, db_path):
    x = torch.randn(32, 64, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    eager_layer = _layer(db_path)
    compiled_layer = copy.deepcopy(eager_layer)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(compiled_layer.forward)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    # the autograd.Function's forward is a subgraph of the graph: look into every submodule
    ops = {str(n.target) for g in explanation.graphs for m in g.modules() if hasattr(m, "graph") for n in m.graph.nodes}
    assert any("falqon.partial_amax" in t for t in ops), ops  # the quantize kernels are ops in the graph
    torch._dynamo.reset()

    before = eager_layer.melded.view(torch.uint8).clone()
    e_out, e_grad, e_rows = _step(eager_layer, eager_layer, eager_layer.proxy_update, x)
    forward = torch.compile(compiled_layer, fullgraph=True, backend="aot_eager")
    update = torch.compile(compiled_layer.proxy_update, fullgraph=True, backend="aot_eager")
    c_out, c_grad, c_rows = _step(compiled_layer, forward, update, x)

    assert torch.equal(e_out, c_out) and torch.equal(e_grad, c_grad)
    assert torch.equal(torch.sort(e_rows).values, torch.sort(c_rows).values)
    assert not torch.equal(eager_layer.melded.view(torch.uint8), before), "the update changed nothing: vacuous"
    assert torch.equal(eager_layer.melded.view(torch.uint8), compiled_layer.melded.view(torch.uint8))
    assert torch.count_nonzero(compiled_layer.lora_B) == 0  # the op's declared write to B happened


LAUNCHERS = {
    "partial_amax": ("falqon_core.kernels.quantize", "partial_amax"),
    "cast_tensorwise_from_partials": ("falqon_core.kernels.quantize", "cast_tensorwise_from_partials"),
    "quantize_rowwise": ("falqon_core.kernels.quantize", "_quantize_rowwise_triton"),
    "melded_gemm": ("falqon_core.kernels.melded", "_melded_triton"),
    "transpose_fp8": ("falqon_core.kernels.transpose", "transpose_fp8_triton"),
    "proxy_update_": ("falqon_core.kernels.proxy_update", "proxy_update_triton_"),
    "partial_amax_2d": ("falqon_core.kernels.quantize_transpose", "partial_amax_2d"),
    "cast_transpose_from_partials": ("falqon_core.kernels.quantize_transpose", "cast_transpose_from_partials"),
    "quantize_db": ("falqon_core.kernels.cast_db", "quantize_db_triton"),
    "amax_copy_transpose": ("falqon_core.kernels.quantize_transpose", "amax_copy_transpose_triton"),
    "grad_prepass_oa": ("falqon_core.kernels.grad_prepass", "grad_prepass_oa"),
}


def _parameter_names(fn) -> list[str]:
    import inspect

    fn = getattr(fn, "_init_fn", fn)  # a torch.library CustomOpDef keeps the function it was made from
    return list(inspect.signature(getattr(fn, "__wrapped__", fn)).parameters)


@pytest.mark.parametrize("name", sorted(LAUNCHERS))
def test_each_compile_op_takes_exactly_its_launchers_arguments(name):
    """The H200 e2e run failed to compile falqon ("RuntimeError when making fake tensor call"): the transpose
    launcher had gained `pad_to` and its custom op had not. On the GPU the op is called with the launcher's
    arguments, so any launcher parameter the op lacks breaks torch.compile there (the CPU path never calls it)."""
    import importlib

    module, attr = LAUNCHERS[name]
    launcher = getattr(importlib.import_module(module), attr)
    op = launcher.compile_op_slot.get("op")
    assert op is not None, f"{attr} has no compile op"
    assert _parameter_names(op) == _parameter_names(launcher)


def test_transpose_op_fake_gives_the_padded_shape():
    from torch._subclasses.fake_tensor import FakeTensorMode

    from falqon_core.kernels import compile_ops

    with FakeTensorMode():
        x = torch.empty(77, 64, dtype=torch.float8_e4m3fn)
        assert tuple(compile_ops.transpose_fp8(x, 16).shape) == (64, 80)
        assert tuple(compile_ops.transpose_fp8(x).shape) == (64, 77)


def test_cast_transpose_op_fake_gives_the_padded_transpose_and_an_empty_row_copy_when_not_kept():
    from torch._subclasses.fake_tensor import FakeTensorMode

    from falqon_core.kernels import compile_ops

    with FakeTensorMode():
        x = torch.empty(77, 48, dtype=torch.bfloat16)
        partials = torch.empty(4, dtype=torch.float32)
        out, out_t, scale = compile_ops.cast_transpose_from_partials(x, partials, torch.float8_e5m2, 16, False)
        assert tuple(out.shape) == (0,) and tuple(out_t.shape) == (48, 80) and scale.dim() == 0
        out, _, _ = compile_ops.cast_transpose_from_partials(x, partials, torch.float8_e5m2, 16, True)
        assert tuple(out.shape) == (77, 48) and out.dtype == torch.float8_e5m2


def test_o_a_ops_fakes_give_the_eager_shapes():
    """The forward's O_A launch and the backward's first launch with O_A's cast: the fakes' shapes and dtypes are
    those the launchers return (the eager call runs the kernels under the interpreter)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from falqon_core.kernels import compile_ops
    from falqon_core.kernels import grad_prepass as gp
    from falqon_core.kernels.quantize_transpose import amax_copy_transpose_triton

    o_a = torch.randn(77, 96 + 48).bfloat16()[:, 96:]
    dy = torch.randn(77, 64).bfloat16()
    weight = torch.zeros(64, 32, dtype=torch.float8_e4m3fn)
    oa_t, oa_partials = amax_copy_transpose_triton(o_a, 16)
    eager = gp.grad_prepass_oa(dy, weight, oa_t, oa_partials)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake_oa = compile_ops.amax_copy_transpose(mode.from_tensor(o_a), 16)
        fake = compile_ops.grad_prepass_oa(*(mode.from_tensor(t) for t in (dy, weight, oa_t, oa_partials)))
    for got, want in zip((*fake_oa, *fake), (oa_t, oa_partials, *eager)):
        assert (tuple(got.shape), got.dtype) == (tuple(want.shape), want.dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: the compiled graph of the GPU kernels")
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_falqon_layer_gets_the_eager_gradients_on_the_gpu(backend):
    """On an H200 (torch 2.11) the compiled layer once returned its output as a view of the melded GEMM's result,
    and the backward torch.compile built read zeros for grad_out: dX and dB were all zero while the loss looked
    right. Gradients must match eager (same fp8 operands, so up to the GEMMs' accumulation order)."""
    torch.manual_seed(0)
    layer = FalqonLinear(nn.Linear(256, 384), 16).cuda()
    x = torch.randn(128, 256, device="cuda", dtype=torch.bfloat16)
    grads = []
    for model in (layer, torch.compile(copy.deepcopy(layer), backend=backend)):
        torch._dynamo.reset()
        xi = x.clone().requires_grad_()
        model(xi).float().square().mean().backward()
        b = model.lora_B if isinstance(model, FalqonLinear) else model._orig_mod.lora_B
        grads.append((xi.grad.float(), b.grad.float()))
    (dx_e, db_e), (dx_c, db_c) = grads
    for name, eager, compiled in (("dX", dx_e, dx_c), ("dB", db_e, db_c)):
        assert eager.abs().max() > 0, f"eager {name} is zero: the test is vacuous"
        rel = ((compiled - eager).norm() / eager.norm()).item()
        assert rel < 1e-2, f"compiled {name} differs from eager by {rel:.3g} (relative norm)"
