"""The Triton melded GEMM against the exact product and the cuBLASLt/torch reference.

Error bound (per output element), from the formats: fp8 x fp8 products are exact in fp32 (4 + 4
significant bits); a K-term fp32 sum in any order is off by at most (K-1) * 2^-24 * S, S = sum |x8 w8|
(scaled); the two fp32 scale multiplies add 2 * 2^-24 relative; rounding to bf16 adds 2^-8 relative.
So |out - exact| <= 2^-8 |exact| + (K + 3) * 2^-24 * S. Both backends must meet it; they may differ from
each other only by the sum of their two errors.
"""

import pytest
import torch

from falqon_core import fp8
from falqon_core.kernels import melded as md
from falqon_core.kernels.melded import (
    melded_matmul,
    melded_matmul_quantized_oa,
    melded_matmul_quantized_oa_reference,
    melded_matmul_quantized_oa_triton,
    melded_matmul_reference,
    melded_matmul_triton,
)
from falqon_core.kernels.quantize import quantize_fp8_reference

# (M, K, N, r): ragged M, K not a multiple of BLOCK_K (32 in the interpreter), an o_a tile straddling N,
# and a grid where one program gets no o_a tile
SHAPES = [(32, 64, 72, 8), (33, 48, 100, 12), (32, 32, 64, 8)]


def make_inputs(m, k, n, r, granularity="tensorwise", device="cpu"):
    x8, xs = fp8.quantize(torch.randn(m, k, device=device, dtype=torch.bfloat16) * 2, fp8.E4M3, granularity)
    w8, ws = fp8.quantize(torch.randn(n + r, k, device=device, dtype=torch.bfloat16), fp8.E4M3, granularity)
    return x8, xs, w8, ws, n


def exact_and_bound(x8, xs, w8, ws):
    """(exact M x (N+r) product in fp64, the per-element error bound from the module docstring)."""
    k = x8.shape[1]
    sx = xs.double().reshape(-1, 1) if xs.numel() > 1 else xs.double()
    sw = ws.double().reshape(1, -1) if ws.numel() > 1 else ws.double()
    exact = (x8.double() @ w8.double().t()) * sx * sw
    s = (x8.double().abs() @ w8.double().abs().t()) * sx.abs() * sw.abs()
    return exact, 2.0**-8 * exact.abs() + (k + 3) * 2.0**-24 * s


def assert_within_bound(out, o_a, exact, bound, n):
    got = torch.cat([out.double(), o_a.double()], dim=1)
    excess = (got - exact).abs() - bound
    assert excess.max().item() <= 0, f"worst excess over the bound: {excess.max().item()}"


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("granularity", ["tensorwise", "rowwise"])
def test_triton_melded_is_within_fp32_accumulation_bound_of_exact_product(shape, granularity):
    x8, xs, w8, ws, n = make_inputs(*shape, granularity=granularity)
    exact, bound = exact_and_bound(x8, xs, w8, ws)
    out, o_a = melded_matmul_triton(x8, xs, w8, ws, n)
    assert out.shape == (shape[0], n) and o_a.shape == (shape[0], shape[3])
    assert out.dtype == o_a.dtype == torch.bfloat16
    assert_within_bound(out, o_a, exact, bound, n)
    # the reference meets the same bound, so the two agree within twice of it
    ref_out, ref_oa = melded_matmul_reference(x8, xs, w8, ws, n)
    assert_within_bound(ref_out, ref_oa, exact, bound, n)


def test_triton_writes_two_contiguous_buffers_where_the_reference_returns_views():
    x8, xs, w8, ws, n = make_inputs(*SHAPES[0])
    out, o_a = melded_matmul_triton(x8, xs, w8, ws, n)
    assert out.is_contiguous() and o_a.is_contiguous()
    assert out.data_ptr() != o_a.data_ptr()
    _, ref_oa = melded_matmul_reference(x8, xs, w8, ws, n)
    assert not ref_oa.is_contiguous()  # what the Triton backend saves the caller from copying


@pytest.mark.parametrize("shape", SHAPES)
def test_fused_oa_quantization_is_bit_exact_with_quantizing_oa(shape):
    x8, xs, w8, ws, n = make_inputs(*shape)
    out, o_a, o_a8, o_a_scale = melded_matmul_quantized_oa_triton(x8, xs, w8, ws, n)
    plain_out, plain_oa = melded_matmul_triton(x8, xs, w8, ws, n)
    assert torch.equal(out, plain_out) and torch.equal(o_a, plain_oa)
    ref_oa8, ref_scale = quantize_fp8_reference(o_a, fp8.E4M3, "tensorwise")
    assert torch.equal(o_a_scale, ref_scale)
    assert torch.equal(o_a8.view(torch.uint8), ref_oa8.view(torch.uint8))


def test_quantized_oa_reference_returns_contiguous_oa_and_its_quantization():
    x8, xs, w8, ws, n = make_inputs(*SHAPES[1])
    out, o_a, o_a8, o_a_scale = melded_matmul_quantized_oa_reference(x8, xs, w8, ws, n)
    ref_out, ref_oa = melded_matmul_reference(x8, xs, w8, ws, n)
    assert o_a.is_contiguous() and torch.equal(o_a, ref_oa) and torch.equal(out, ref_out)
    want8, want_scale = quantize_fp8_reference(ref_oa, fp8.E4M3, "tensorwise")
    assert torch.equal(o_a_scale, want_scale) and torch.equal(o_a8.view(torch.uint8), want8.view(torch.uint8))


@pytest.mark.parametrize("backend", ["auto", "cublas", "triton"])
def test_dispatchers_use_the_reference_off_cuda_for_every_backend(backend, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the Triton path must not run on CPU tensors")

    monkeypatch.setattr(md, "melded_matmul_triton", fail)
    monkeypatch.setattr(md, "melded_matmul_quantized_oa_triton", fail)
    args = make_inputs(*SHAPES[0])
    out, o_a = melded_matmul(*args, backend=backend)
    ref_out, ref_oa = melded_matmul_reference(*args)
    assert torch.equal(out, ref_out) and torch.equal(o_a, ref_oa)
    assert len(melded_matmul_quantized_oa(*args, backend=backend)) == 4


def test_bad_arguments_raise_clear_errors():
    x8, xs, w8, ws, n = make_inputs(*SHAPES[0])
    with pytest.raises(ValueError, match="backend must be one of"):
        melded_matmul(x8, xs, w8, ws, n, backend="cutlass")
    with pytest.raises(ValueError, match="n_out must be"):
        melded_matmul_triton(x8, xs, w8, ws, w8.shape[0])
    with pytest.raises(ValueError, match=r"M x K and w8_melded \(N\+r\) x K"):
        melded_matmul_triton(x8[:, :32], xs, w8, ws, n)
    with pytest.raises(ValueError, match="rowwise"):
        melded_matmul_triton(x8, torch.ones(3), w8, ws, n)


# ---------------------------------------------------------------- GPU (run by the lead on the H100)

LLAMA_SHAPES = [(4096, 4096, 4096, 64), (4096, 4096, 11008, 64), (4096, 11008, 4096, 64)]


@pytest.mark.gpu
@pytest.mark.parametrize("shape", LLAMA_SHAPES)
def test_triton_melded_on_cuda_is_within_bound_at_llama_shapes(shape):
    x8, xs, w8, ws, n = make_inputs(*shape, device="cuda")
    exact, bound = exact_and_bound(x8, xs, w8, ws)
    out, o_a = melded_matmul(x8, xs, w8, ws, n, backend="triton")
    assert out.is_contiguous() and o_a.is_contiguous()
    assert_within_bound(out, o_a, exact, bound, n)
    ref_out, ref_oa = melded_matmul(x8, xs, w8, ws, n, backend="cublas")
    assert_within_bound(ref_out, ref_oa, exact, bound, n)


@pytest.mark.gpu
def test_triton_melded_rowwise_scales_on_cuda_within_bound():
    x8, xs, w8, ws, n = make_inputs(1024, 4096, 4096, 64, granularity="rowwise", device="cuda")
    exact, bound = exact_and_bound(x8, xs, w8, ws)
    assert_within_bound(*melded_matmul_triton(x8, xs, w8, ws, n), exact, bound, n)


@pytest.mark.gpu
def test_fast_accum_on_cuda_within_reduced_precision_bound():
    # Hopper's fp8 MMA accumulator keeps at least 13 mantissa bits (DeepSeek-V3 report: ~14): each of the
    # K/32 MMA steps may lose 2^-13 of a running sum bounded by S, so |err| <= 2^-8 |exact| + (K/32) 2^-13 S
    x8, xs, w8, ws, n = make_inputs(4096, 4096, 4096, 64, device="cuda")
    exact, _ = exact_and_bound(x8, xs, w8, ws)
    s = (x8.double().abs() @ w8.double().abs().t()) * xs.double() * ws.double()
    bound = 2.0**-8 * exact.abs() + (4096 / 32) * 2.0**-13 * s
    assert_within_bound(*melded_matmul_triton(x8, xs, w8, ws, n, fast_accum=True), exact, bound, n)


@pytest.mark.gpu
def test_fused_oa_quantization_on_cuda_is_bit_exact():
    x8, xs, w8, ws, n = make_inputs(4096, 4096, 4096, 64, device="cuda")
    out, o_a, o_a8, o_a_scale = melded_matmul_quantized_oa(x8, xs, w8, ws, n, backend="triton")
    ref_oa8, ref_scale = quantize_fp8_reference(o_a, fp8.E4M3, "tensorwise")
    assert torch.equal(o_a_scale, ref_scale)
    assert torch.equal(o_a8.view(torch.uint8), ref_oa8.view(torch.uint8))


@pytest.mark.gpu
def test_triton_melded_is_cuda_graph_capturable_after_autotuning():
    x8, xs, w8, ws, n = make_inputs(1024, 4096, 4096, 64, device="cuda")
    melded_matmul_quantized_oa_triton(x8, xs, w8, ws, n)  # autotune + compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, o_a, o_a8, o_a_scale = melded_matmul_quantized_oa_triton(x8, xs, w8, ws, n)
    graph.replay()
    torch.cuda.synchronize()
    want = melded_matmul_quantized_oa_triton(x8, xs, w8, ws, n)
    assert torch.equal(out, want[0]) and torch.equal(o_a, want[1]) and torch.equal(o_a_scale, want[3])
    assert torch.equal(o_a8.view(torch.uint8), want[2].view(torch.uint8))
