"""Block-Hadamard rotation: the torch reference is the orthonormal block-diagonal H_K; the Triton kernel
(interpreted on CPU) reproduces it to fp32 rounding and its fp8 output bit for bit except at ties.

Bounds used below:
- fp64 reference: every entry of H_b / sqrt(b) is rounded once (relative 2^-53) and a product entry sums b
  terms, so |H H^T - I| <= b * 2^-51 (generous by 4x).
- fp32 rotation: the +-1 products are exact, a sum of b terms in fp32 is off by at most b * 2^-24 * sum|x_j|,
  and the 1/sqrt(b) multiply adds one rounding: two fp32 evaluations in different orders differ by at most
  2 * (b + 1) * 2^-24 * sum_j |x_j| / sqrt(b).
- fp8 codes: the kernel and the reference cast the same value up to that fp32 difference (the scale too, it is
  the amax of those values), so a code may differ only by one fp8 step, and only where the exact value lies
  within that difference (in fp8 units, plus the scale's relative difference) of the midpoint of two codes.
"""

import math

import numpy as np
import pytest
import scipy.linalg
import torch

from falqon_core import fp8
from falqon_core.kernels.hadamard import (
    block_hadamard_quantize,
    block_hadamard_reference,
    block_hadamard_triton,
    hadamard_block_size,
    hadamard_matrix,
    hadamard_quantize,
    hadamard_quantize_reference,
)

# (rows, K, block): a full 128 block with rows not a multiple of the tile; K = 192 and 48, not multiples of 128,
# get the largest power of two dividing them (64, 16)
KERNEL_SHAPES = [(40, 256, 128), (17, 192, 64), (8, 48, 16)]


def _dense_block_hadamard(k: int, block: int) -> np.ndarray:
    """The explicit K x K fp64 matrix blockdiag(H_b / sqrt(b)) built with scipy alone."""
    h = scipy.linalg.hadamard(block).astype(np.float64) / math.sqrt(block)
    return scipy.linalg.block_diag(*([h] * (k // block)))


# ---------------------------------------------------------------------------------------------------------
# block size


@pytest.mark.parametrize(
    "dim, expected", [(4096, 128), (11008, 128), (192, 64), (320, 64), (48, 16), (16, 16), (1024 + 32, 32)]
)
def test_block_size_is_largest_power_of_two_dividing_dim_capped_at_128(dim, expected):
    assert hadamard_block_size(dim) == expected


def test_block_size_honours_smaller_max_block():
    assert hadamard_block_size(4096, max_block=32) == 32


@pytest.mark.parametrize("dim", [40, 100, 8])
def test_block_size_rejects_dims_without_a_power_of_two_factor_of_16(dim):
    with pytest.raises(ValueError, match="multiples of 16"):
        hadamard_block_size(dim)


def test_reference_rejects_a_block_that_does_not_divide_k():
    with pytest.raises(ValueError, match="does not divide"):
        block_hadamard_reference(torch.randn(4, 192), 128)


# ---------------------------------------------------------------------------------------------------------
# torch reference


@pytest.mark.parametrize("k, block", [(128, 128), (192, 64), (256, 128), (48, 16), (64, 32)])
def test_reference_is_orthonormal_to_fp64_precision(k, block):
    """Rotating the identity gives H_K itself; H_K H_K^T = I within b * 2^-51."""
    h = block_hadamard_reference(torch.eye(k, dtype=torch.float64), block)
    err = (h @ h.T - torch.eye(k, dtype=torch.float64)).abs().max().item()
    assert err <= block * 2.0**-51


@pytest.mark.parametrize("k, block", [(256, 128), (192, 64)])
def test_reference_is_involutive_because_sylvester_blocks_are_symmetric(k, block):
    """H_b from scipy is symmetric, so H_K H_K = I: rotating twice gives x back (fp64, bound b * 2^-51 * |x|max)."""
    x = torch.randn(6, k, dtype=torch.float64)
    back = block_hadamard_reference(block_hadamard_reference(x, block), block)
    assert torch.allclose(back, x, rtol=0, atol=block * 2.0**-51 * x.abs().max().item())
    h = hadamard_matrix(block)
    assert torch.equal(h, h.T)


@pytest.mark.parametrize("k, block", [(256, 128), (192, 64), (48, 16)])
def test_reference_matches_explicit_dense_scipy_matrix(k, block):
    """(2, 3, K) fp64 input, leading dims kept; both sum b products with entries rounded once in fp64, so they
    agree within (b + 2) 2^-51 sum|x| / sqrt(b)."""
    x = torch.randn(2, 3, k, dtype=torch.float64)
    dense = torch.from_numpy(_dense_block_hadamard(k, block))
    expected = x @ dense
    got = block_hadamard_reference(x, block)
    assert got.shape == x.shape and got.dtype == torch.float64
    bound = (block + 2) * 2.0**-51 * x.abs().sum(-1, keepdim=True) / math.sqrt(block)
    assert ((got - expected).abs() <= bound).all()


def test_reference_computes_low_precision_input_in_fp32():
    """bf16 in -> fp32 out, equal to the fp64 rotation of the same (exactly upcast) values to fp32 rounding."""
    x = torch.randn(5, 128).to(torch.bfloat16)
    got = block_hadamard_reference(x, 128)
    assert got.dtype == torch.float32
    exact = block_hadamard_reference(x.double(), 128)
    bound = 2 * 129 * 2.0**-24 * x.double().abs().sum(-1, keepdim=True) / math.sqrt(128)
    assert ((got.double() - exact).abs() <= bound).all()


def test_rotation_preserves_gemm_products():
    """(x H)(W H)^T = x W^T: the identity HALO relies on (fp64, bound K * 2^-50 * sum |x||w|)."""
    x, w = torch.randn(7, 192, dtype=torch.float64), torch.randn(9, 192, dtype=torch.float64)
    rotated = block_hadamard_reference(x, 64) @ block_hadamard_reference(w, 64).T
    assert ((rotated - x @ w.T).abs() <= 192 * 2.0**-50 * (x.abs() @ w.abs().T)).all()


# ---------------------------------------------------------------------------------------------------------
# Triton kernel (TRITON_INTERPRET=1 on CPU)


def _fp32_rotation_bound(x: torch.Tensor, block: int) -> torch.Tensor:
    """Per element: 2 (b + 1) 2^-24 sum_j |x_j| / sqrt(b) over the element's block (see module docstring)."""
    k = x.shape[-1]
    sums = x.double().abs().reshape(*x.shape[:-1], k // block, block).sum(-1, keepdim=True)
    bound = 2 * (block + 1) * 2.0**-24 * sums / math.sqrt(block)
    return bound.expand(*x.shape[:-1], k // block, block).reshape(x.shape)


@pytest.mark.parametrize("rows, k, block", KERNEL_SHAPES)
@pytest.mark.parametrize("in_dtype", [torch.bfloat16, torch.float32])
def test_triton_rotation_matches_reference_to_fp32_rounding(rows, k, block, in_dtype):
    assert hadamard_block_size(k) == block
    x = torch.randn(rows, k).to(in_dtype)
    got = block_hadamard_triton(x, block)
    ref = block_hadamard_reference(x, block)
    assert got.dtype == torch.float32 and got.shape == x.shape
    assert ((got.double() - ref.double()).abs() <= _fp32_rotation_bound(x, block)).all()


def _fp8_grid_neighbours(v: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(lower, upper) fp8 values around fp64 v (v in fp8 units, within range): floor and ceil on the grid."""
    step = fp8.ulp(v, dtype)
    lower = torch.floor(v / step) * step
    return lower, lower + step


def _assert_codes_equal_except_near_ties(got8, ref8, exact, tol, dtype):
    """got8 == ref8 bitwise, except elements whose exact value (fp8 units) is within tol of a midpoint
    between two adjacent fp8 values and where got8, ref8 are those two values."""
    differ = got8.view(torch.uint8) != ref8.view(torch.uint8)
    if not differ.any():
        return
    v, t = exact[differ], tol[differ]
    g, r = got8.double()[differ], ref8.double()[differ]
    lower, upper = _fp8_grid_neighbours(v, dtype)
    midpoint = (lower + upper) / 2
    assert ((v - midpoint).abs() <= t).all(), "codes differ away from a tie"
    pair = torch.stack([torch.minimum(g, r), torch.maximum(g, r)])
    assert torch.equal(pair, torch.stack([lower, upper])), "codes differ by more than one fp8 step"


@pytest.mark.parametrize("rows, k, block", KERNEL_SHAPES)
@pytest.mark.parametrize("in_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("dtype", [fp8.E4M3, fp8.E5M2])
@pytest.mark.parametrize("granularity", ["tensorwise", "rowwise"])
def test_triton_quantize_matches_reference_bits_except_ties(rows, k, block, in_dtype, dtype, granularity):
    x = (torch.randn(rows, k) * 3).to(in_dtype)
    got8, got_scale = block_hadamard_quantize(x, block, dtype, granularity)
    ref8, ref_scale = hadamard_quantize_reference(x, block, dtype, granularity)
    assert got8.dtype == dtype and got8.shape == x.shape
    assert got_scale.shape == ref_scale.shape and got_scale.dtype == torch.float32

    rot_bound = _fp32_rotation_bound(x, block)  # absolute, in x's units
    # the scale is amax / fp8_max of those values: relative difference <= max rotation error / amax
    amax = ref_scale.double() * fp8.fp8_max(dtype)
    scale_rel = (rot_bound.amax(dim=-1, keepdim=True) if granularity == "rowwise" else rot_bound.max()) / amax
    assert ((got_scale.double() - ref_scale.double()).abs() <= scale_rel * ref_scale.double()).all()

    exact = block_hadamard_reference(x.double(), block) / ref_scale.double()  # fp8 units
    tol = rot_bound / ref_scale.double() + exact.abs() * (scale_rel + 2.0**-23)
    _assert_codes_equal_except_near_ties(got8, ref8, exact, tol, dtype)


@pytest.mark.parametrize("granularity", ["tensorwise", "rowwise"])
def test_triton_quantize_keeps_leading_dims_and_zero_rows(granularity):
    """(2, 5, 64) input with an all-zero row: that row's rowwise scale is fp8.MIN_SCALE and its codes are 0."""
    x = torch.randn(2, 5, 64).to(torch.bfloat16)
    x[1, 3] = 0
    got8, got_scale = block_hadamard_quantize(x, 64, fp8.E4M3, granularity)
    ref8, ref_scale = hadamard_quantize_reference(x, 64, fp8.E4M3, granularity)
    assert got8.shape == x.shape and got_scale.shape == ref_scale.shape
    assert (got8[1, 3].float() == 0).all()
    if granularity == "rowwise":
        assert got_scale.shape == (2, 5, 1)
        assert got_scale[1, 3].item() == pytest.approx(fp8.MIN_SCALE)


def test_triton_quantize_saturates_like_the_reference():
    """Rowwise scales put each row's largest rotated value exactly at fp8_max: the code is 448 (0x7E), not NaN."""
    x = torch.randn(16, 32).to(torch.bfloat16)
    got8, _ = block_hadamard_quantize(x, 32, fp8.E4M3, "rowwise")
    assert got8.float().abs().amax(dim=1).eq(448.0).all()
    assert not got8.float().isnan().any()


def test_triton_kernels_reject_unsupported_inputs():
    with pytest.raises(ValueError, match="does not divide"):
        block_hadamard_quantize(torch.randn(4, 192), 128)
    with pytest.raises(ValueError, match="blocks 16..128"):
        block_hadamard_quantize(torch.randn(4, 256), 256)
    with pytest.raises(ValueError, match="float64"):
        block_hadamard_quantize(torch.randn(4, 64, dtype=torch.float64), 64)
    with pytest.raises(ValueError, match="granularity"):
        block_hadamard_quantize(torch.randn(4, 64), 64, fp8.E4M3, "blockwise")


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the dispatcher takes the Triton path")
def test_dispatcher_uses_the_reference_off_gpu():
    x = torch.randn(8, 128).to(torch.bfloat16)
    got8, got_scale = hadamard_quantize(x, 128, fp8.E5M2, "tensorwise")
    ref8, ref_scale = hadamard_quantize_reference(x, 128, fp8.E5M2, "tensorwise")
    assert torch.equal(got8.view(torch.uint8), ref8.view(torch.uint8)) and torch.equal(got_scale, ref_scale)


# ---------------------------------------------------------------------------------------------------------
# GPU (the lead runs these on an H100)


@pytest.mark.gpu
@pytest.mark.parametrize("rows, k, block", [(4096, 4096, 128), (1000, 11008, 128), (333, 192, 64)])
@pytest.mark.parametrize("dtype", [fp8.E4M3, fp8.E5M2])
@pytest.mark.parametrize("granularity", ["tensorwise", "rowwise"])
def test_gpu_triton_quantize_matches_reference_bits_except_ties(rows, k, block, dtype, granularity):
    x = (torch.randn(rows, k, device="cuda") * 3).to(torch.bfloat16)
    got8, got_scale = hadamard_quantize(x, block, dtype, granularity)  # the dispatcher picks Triton here
    ref8, ref_scale = hadamard_quantize_reference(x, block, dtype, granularity)
    rot_bound = _fp32_rotation_bound(x, block)
    amax = ref_scale.double() * fp8.fp8_max(dtype)
    scale_rel = (rot_bound.amax(dim=-1, keepdim=True) if granularity == "rowwise" else rot_bound.max()) / amax
    assert ((got_scale.double() - ref_scale.double()).abs() <= scale_rel * ref_scale.double()).all()
    exact = block_hadamard_reference(x.double(), block) / ref_scale.double()
    tol = rot_bound / ref_scale.double() + exact.abs() * (scale_rel + 2.0**-23)
    _assert_codes_equal_except_near_ties(got8, ref8, exact, tol, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("granularity", ["tensorwise", "rowwise"])
def test_gpu_triton_quantize_is_cuda_graph_capturable(granularity):
    """Capture after one warm-up call, replay on new data in the same buffer: same result as eager."""
    x = torch.randn(512, 1024, device="cuda").to(torch.bfloat16)
    hadamard_quantize(x, 128, fp8.E4M3, granularity)  # builds the cached H_b before capture
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        data, scale = hadamard_quantize(x, 128, fp8.E4M3, granularity)
    torch.cuda.current_stream().wait_stream(stream)
    x.copy_(torch.randn_like(x, dtype=torch.float32).to(torch.bfloat16))
    graph.replay()
    eager_data, eager_scale = hadamard_quantize(x, 128, fp8.E4M3, granularity)
    torch.cuda.synchronize()
    assert torch.equal(data.view(torch.uint8), eager_data.view(torch.uint8)) and torch.equal(scale, eager_scale)


@pytest.mark.gpu
def test_gpu_triton_rotation_matches_reference():
    x = torch.randn(300, 4096, device="cuda").to(torch.bfloat16)
    got = block_hadamard_triton(x, 128)
    ref = block_hadamard_reference(x, 128)
    assert ((got.double() - ref.double()).abs() <= _fp32_rotation_bound(x, 128)).all()
