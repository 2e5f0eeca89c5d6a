"""quantize_transpose_fp8: one cast pass writes x8 and x8^T, bit-identical to quantize_fp8 then transpose_fp8;
and a FALQON step that runs it (Triton kernels forced on, under the interpreter) is bit-identical to the
step on the torch references."""

import pytest
import torch
from torch import nn

from falqon_core import fp8
from falqon_core.kernels import _triton_common as tc
from falqon_core.kernels.quantize import cast_tensorwise_from_partials
from falqon_core.kernels.quantize_configs import TileConfig
from falqon_core.kernels.quantize_transpose import (
    amax_copy_transpose, amax_copy_transpose_reference, amax_copy_transpose_triton, launch_amax_copy_transpose,
    quantize_transpose_fp8, quantize_transpose_fp8_reference, quantize_transpose_fp8_triton,
)
from falqon_core.methods.falqon import FalqonLinear


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float32], ids=str)  # fp32: the transposed-load path
@pytest.mark.parametrize("dtype", [fp8.E4M3, fp8.E5M2], ids=str)
@pytest.mark.parametrize("shape,pad_to", [((77, 112), 16), ((64, 48), 16), ((130, 70), 1), ((1, 16), 16)])
def test_cast_pass_writes_x8_and_its_padded_transpose_bit_identical_to_the_reference(shape, pad_to, dtype, x_dtype):
    x = (torch.randn(*shape) * 30).to(x_dtype)
    x[0, 0] = 0.0  # a zero and a tiny value next to the padding zeros
    x[-1, -1] = 1e-30
    got = quantize_transpose_fp8_triton(x, dtype, pad_to)
    want = quantize_transpose_fp8_reference(x, dtype, pad_to)
    assert same_bytes(got[0], want[0]) and same_bytes(got[1], want[1])
    assert torch.equal(got[2], want[2])
    rows_out = -(-shape[0] // pad_to) * pad_to
    assert got[1].shape == (shape[1], rows_out) and int(got[1][:, shape[0] :].view(torch.uint8).count_nonzero()) == 0


def test_reads_a_strided_column_slice_in_place_and_can_skip_the_row_major_copy():
    """FALQON's O_A is columns N.. of the melded GEMM's M x (N + r_pad) output: a view with row stride N + r_pad."""
    full = (torch.randn(100, 96 + 32) * 5).bfloat16()
    o_a = full[:, 96:]
    assert not o_a.is_contiguous()
    x8, x8_t, scale = quantize_transpose_fp8_triton(o_a, fp8.E4M3, 16, keep_rows=False)
    _, want_t, want_scale = quantize_transpose_fp8_reference(o_a, fp8.E4M3, 16)
    assert x8 is None and same_bytes(x8_t, want_t) and torch.equal(scale, want_scale)


@pytest.mark.parametrize("where", ["first", "last"])
def test_contiguous_and_strided_inputs_take_their_own_amax_pass_and_agree(where):
    """A contiguous x takes the flat amax pass, a strided one the 2-D tiled pass: same scale, same bytes."""
    x = torch.randn(130, 70).bfloat16()
    x.view(-1)[0 if where == "first" else -1] = 500.0  # the amax at either end of the flat walk
    strided = torch.empty(70, 130).bfloat16().t()
    strided.copy_(x)
    assert x.is_contiguous() and not strided.is_contiguous()
    flat = quantize_transpose_fp8_triton(x, fp8.E5M2, 16)
    tiled = quantize_transpose_fp8_triton(strided, fp8.E5M2, 16)
    assert same_bytes(flat[0], tiled[0]) and same_bytes(flat[1], tiled[1]) and torch.equal(flat[2], tiled[2])
    assert torch.equal(flat[2], quantize_transpose_fp8_reference(x, fp8.E5M2, 16)[2])


def test_saturates_and_scales_like_quantize_fp8():
    x = torch.tensor([[1e4, -3.0], [0.5, -1e4]], dtype=torch.float32)
    x8, x8_t, scale = quantize_transpose_fp8_triton(x, fp8.E4M3, 16)
    ref8, ref_scale = fp8.quantize(x, fp8.E4M3, "tensorwise")
    assert same_bytes(x8, ref8) and torch.equal(scale, ref_scale) and x8_t.shape == (2, 16)


@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("m,r_pad,pad_to", [(77, 48, 16), (64, 16, 16), (130, 24, 1), (1, 16, 16)])
def test_amax_copy_transpose_then_the_flat_cast_equals_the_transposed_cast(monkeypatch, m, r_pad, pad_to, x_dtype):
    """FALQON's O_A path: one launch (max |x| per program + x^T padded, unscaled) on the strided column slice, then
    the flat e4m3 cast of that copy, gives quantize_transpose_fp8's x8^T and scale bit for bit. Outputs start as
    garbage, so a skipped store (a padding column, a tile) shows."""
    from test_grad_prepass import garbage_empty

    full = (torch.randn(m, 96 + r_pad) * 7).to(x_dtype)
    full[m // 2, 96 + r_pad // 3] = -300.0  # the amax inside one tile
    o_a = full[:, 96:]
    want_copy, want_max = amax_copy_transpose_reference(o_a, pad_to)
    _, want8_t, want_scale = quantize_transpose_fp8_reference(o_a, fp8.E4M3, pad_to)
    garbage_empty(monkeypatch)
    copy_t, partials = amax_copy_transpose_triton(o_a, pad_to)
    assert copy_t.is_contiguous() and copy_t.dtype == x_dtype and torch.equal(copy_t, want_copy)
    assert float(partials.max()) == float(want_max) == 300.0
    x8_t, scale = cast_tensorwise_from_partials(copy_t, partials, fp8.E4M3)
    assert same_bytes(x8_t, want8_t) and torch.equal(scale, want_scale)


def test_amax_copy_transpose_with_few_programs_and_small_tiles_covers_every_tile():
    x = torch.randn(70, 45).bfloat16()
    copy_t, partials = launch_amax_copy_transpose(x, 16, TileConfig(block_r=16, block_c=8, programs_per_sm=1))
    assert torch.equal(copy_t, amax_copy_transpose_reference(x, 16)[0])
    assert float(partials.max()) == float(x.float().abs().max())


def test_amax_copy_transpose_takes_the_reference_off_cuda_and_rejects_bad_input():
    x = torch.randn(20, 8)
    copy_t, amax = amax_copy_transpose(x, 16)
    assert copy_t.shape == (8, 32) and torch.equal(copy_t[:, :20], x.t()) and int(copy_t[:, 20:].count_nonzero()) == 0
    assert torch.equal(amax, x.abs().amax().reshape(1))
    with pytest.raises(ValueError, match="2-D float"):
        amax_copy_transpose(torch.zeros(3, 4, 5))
    with pytest.raises(ValueError, match="2-D float"):
        amax_copy_transpose(torch.zeros(0, 4))


def test_bad_input_raises_a_clear_error():
    with pytest.raises(ValueError, match="2-D float"):
        quantize_transpose_fp8(torch.zeros(3, 4, 5), fp8.E4M3)
    with pytest.raises(ValueError, match="fp8 dtype"):
        quantize_transpose_fp8(torch.zeros(3, 4), torch.bfloat16)


@pytest.mark.parametrize("r,M,x_grad", [(8, 77, True), (24, 40, True), (16, 64, True), (24, 77, False)])
def test_falqon_step_on_the_triton_kernels_is_bit_identical_to_the_reference_step(monkeypatch, r, M, x_grad):
    """Forward out, dX, dB bit-identical, W8 after the proxy update within 1 ulp: every fp8 kernel on Triton."""
    torch.manual_seed(r + M)
    linear = nn.Linear(64, 48, bias=False)
    x = torch.randn(M, 64)
    g = torch.randn(M, 48)

    def step():
        layer = FalqonLinear(linear, r)
        xi = x.clone().requires_grad_(x_grad)  # without dX the cast writes only dY8^T
        out = layer(xi)
        out.backward(g)
        grads = (out.detach(), xi.grad if x_grad else out.new_zeros(0), layer.lora_B.grad.clone())
        with torch.no_grad():
            layer.lora_B.copy_(-layer.lora_B.grad * 50.0)  # a step large enough to move W8
        layer.proxy_update()
        return grads, layer.melded.clone()

    (ref_grads, ref_melded) = step()
    calls, oa_calls = [], []
    real, real_oa = quantize_transpose_fp8_triton, amax_copy_transpose_triton

    def counted(*args, **kwargs):
        calls.append(args[1])
        return real(*args, **kwargs)

    monkeypatch.setattr(tc, "triton_fp8_ok", lambda t: True)
    monkeypatch.setattr("falqon_core.kernels.quantize_transpose.quantize_transpose_fp8_triton", counted)
    monkeypatch.setattr("falqon_core.kernels.quantize_transpose.amax_copy_transpose_triton",
                        lambda *a: oa_calls.append(1) or real_oa(*a))
    (tri_grads, tri_melded) = step()
    assert calls == [fp8.E5M2], "dY in the backward goes through the fused cast"
    assert oa_calls == [1], "O_A's amax and transposed copy in the forward's one launch"
    for got, want, name in zip(tri_grads, ref_grads, ("out", "dX", "dB")):
        assert torch.equal(got, want), name
    # the merge's fp32 sums may run in another order (proxy_update's docstring): at most 1 e4m3 ulp apart
    a, b = tri_melded.float(), ref_melded.float()
    assert ((a - b).abs() <= fp8.ulp(torch.maximum(a.abs(), b.abs()), fp8.E4M3).float()).all()
    assert not same_bytes(ref_melded, FalqonLinear(linear, r).melded), "the update must have moved W8"


@pytest.mark.gpu
@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("shape", [(4096, 4096), (3000, 11008), (9999, 1024), (4096, 80), (32, 96)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_cuda_cast_pass_is_bit_identical_to_quantize_then_transpose_at_llama_shapes(shape, x_dtype):
    """fp32 x with the row-major copy is the case Triton 3.6 miscompiled on an H200 (the kernel's docstring)."""
    from falqon_core.kernels import quantize_fp8, transpose_fp8

    x = (torch.randn(*shape, device="cuda") * 3).to(x_dtype)
    for dtype in (fp8.E4M3, fp8.E5M2):
        want8, want_scale = quantize_fp8(x, dtype, "tensorwise")
        for keep_rows in (True, False):
            x8, x8_t, scale = quantize_transpose_fp8(x, dtype, 16, keep_rows=keep_rows)
            assert torch.equal(scale, want_scale)
            assert same_bytes(x8_t, transpose_fp8(want8, 16)), f"x8^T differs (keep_rows={keep_rows})"
            assert x8 is None if not keep_rows else same_bytes(x8, want8)


@pytest.mark.gpu
@pytest.mark.parametrize("m,r_pad", [(2048, 48), (3000, 32), (4096, 64), (9999, 112), (512, 16)])
def test_cuda_amax_copy_transpose_then_cast_is_bit_identical_to_the_transposed_cast(m, r_pad):
    full = (torch.randn(m, 4096 + r_pad, device="cuda") * 3).bfloat16()
    o_a = full[:, 4096:]
    copy_t, partials = amax_copy_transpose(o_a, 16)
    assert torch.equal(copy_t, amax_copy_transpose_reference(o_a, 16)[0])
    x8_t, scale = cast_tensorwise_from_partials(copy_t, partials, fp8.E4M3)
    _, want8_t, want_scale = quantize_transpose_fp8(o_a, fp8.E4M3, 16, keep_rows=False)
    assert same_bytes(x8_t, want8_t) and torch.equal(scale, want_scale)


@pytest.mark.gpu
def test_cuda_cast_pass_can_be_captured_in_a_cuda_graph():
    x = torch.randn(3000, 4096, device="cuda").bfloat16()
    quantize_transpose_fp8(x, fp8.E5M2, 16)  # compile the kernels outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = quantize_transpose_fp8(x, fp8.E5M2, 16)
    x.copy_(torch.randn_like(x) * 7)
    graph.replay()
    torch.cuda.synchronize()
    want = quantize_transpose_fp8_reference(x, fp8.E5M2, 16)
    assert same_bytes(got[0], want[0]) and same_bytes(got[1], want[1]) and torch.equal(got[2], want[2])
