"""falqon_core.fp8: the reference every fp8 kernel and method is checked against.

Bounds come from the formats: a round-to-nearest cast errs by at most half the grid spacing (fp8.ulp) of
the scaled value; fp32 steps (divide by the scale, multiply back) add at most 2^-24 relative each.
"""

import pytest
import torch

from bounds import gemm_bound
from falqon_core import fp8

FORMATS = [fp8.E4M3, fp8.E5M2]
GRANULARITIES = ["tensorwise", "rowwise"]
U_FP32 = 2.0**-24
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def finite_grid(dtype: torch.dtype) -> torch.Tensor:
    """Every finite non-negative value of an fp8 format, ascending (fp64)."""
    bits = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    values = bits.view(dtype).double()
    values = values[torch.isfinite(values) & (values >= 0)]
    return torch.unique(values)


@pytest.mark.parametrize("dtype", FORMATS)
def test_ulp_is_the_spacing_of_the_fp8_grid(dtype):
    """fp8.ulp(v) equals the distance from v to the next representable value, for every finite v >= 0."""
    grid = finite_grid(dtype)
    spacing = grid[1:] - grid[:-1]
    assert torch.equal(fp8.ulp(grid[:-1], dtype), spacing)


@pytest.mark.parametrize("dtype", FORMATS)
def test_relative_ulp_bounds_rounding_of_normal_values(dtype):
    """Half an ulp relative to a normal value is at most relative_ulp (2^-4 for e4m3, 2^-3 for e5m2)."""
    expected = {fp8.E4M3: 2.0**-4, fp8.E5M2: 2.0**-3}[dtype]
    assert fp8.relative_ulp(dtype) == expected
    grid = finite_grid(dtype)
    normal = grid[grid >= 2.0 ** {fp8.E4M3: -6, fp8.E5M2: -14}[dtype]]
    assert float((0.5 * fp8.ulp(normal, dtype) / normal).max()) == expected


def _test_tensor(device: str) -> torch.Tensor:
    """Rows of very different magnitudes, plus tiny values that land in the subnormal range."""
    torch.manual_seed(0)
    x = torch.randn(16, 64, device=device) * torch.logspace(-3, 2, 16, device=device).unsqueeze(1)
    x[0, :4] = torch.tensor([1e-9, -1e-7, 0.0, 3e-6])
    return x


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("dtype", FORMATS)
def test_round_trip_error_within_half_an_ulp(dtype, granularity, device):
    """|dequant(quant(x)) - x| <= ulp(x / scale) / 2 * scale, + 2^-23 |x| for the two fp32 steps."""
    x = _test_tensor(device)
    data, scale = fp8.quantize(x, dtype, granularity)
    back = fp8.dequantize(data, scale, torch.float64)
    scaled = x.double() / scale.double()
    bound = 0.5 * fp8.ulp(scaled, dtype) * scale.double() + 2 * U_FP32 * x.double().abs()
    err = (back - x.double()).abs()
    assert data.dtype == dtype
    assert bool((err <= bound).all()), f"worst err/bound {float((err / bound).max()):.3f}"


@pytest.mark.parametrize("dtype", FORMATS)
def test_cast_saturates_values_past_the_max_instead_of_inf_or_nan(dtype):
    """With a fixed scale, values beyond the format's max clamp to +-max; nothing becomes inf or NaN."""
    m = fp8.fp8_max(dtype)
    x = torch.tensor([0.5, -1.0, 2 * m, -10 * m, 1e30, -1e30])
    data, _ = fp8.quantize(x, dtype, scale=torch.tensor(1.0))
    values = data.float()
    assert bool(torch.isfinite(values).all())
    assert values.tolist() == [0.5, -1.0, m, -m, m, -m]
    assert fp8.saturating_cast(torch.tensor([3 * m]), dtype).float().item() == m


@pytest.mark.parametrize("dtype", FORMATS)
def test_rowwise_scale_maps_each_row_amax_to_the_format_max(dtype):
    """Rowwise: one scale per row (rows x 1) and each row's largest element lands on +-fp8_max;
    tensorwise: a 0-dim scale and only the global amax lands there."""
    x = _test_tensor("cpu")
    rdata, rscale = fp8.quantize(x, dtype, "rowwise")
    tdata, tscale = fp8.quantize(x, dtype, "tensorwise")
    assert rscale.shape == (16, 1) and tscale.dim() == 0
    assert torch.equal(rdata.float().abs().amax(dim=1), torch.full((16,), fp8.fp8_max(dtype)))
    assert tdata.float().abs().amax().item() == fp8.fp8_max(dtype)
    assert torch.allclose(rscale.squeeze(1), x.abs().amax(dim=1) / fp8.fp8_max(dtype), rtol=U_FP32 * 4, atol=0)


def test_rowwise_keeps_small_rows_that_tensorwise_flushes():
    """Rows 10^7 times smaller than the largest: tensorwise e4m3 puts them below half the smallest subnormal
    (2^-10 of the scale, about 2^-18 of the amax), so they flush to zero; rowwise keeps them within e4m3's
    2^-4 relative error."""
    torch.manual_seed(0)
    big = torch.rand(1, 64) + 1.0
    small = (torch.rand(1, 64) + 1.0) * 1e-7
    x = torch.cat([big, small])
    t_back = fp8.fake_quantize(x, fp8.E4M3, "tensorwise")
    r_back = fp8.fake_quantize(x, fp8.E4M3, "rowwise")
    assert bool((t_back[1] == 0).all())
    rel = ((r_back - x).abs() / x.abs()).max().item()
    assert rel <= fp8.relative_ulp(fp8.E4M3) * (1 + 4 * U_FP32)


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("dtype", FORMATS)
def test_all_zero_input_quantizes_to_zeros_with_a_finite_scale(dtype, granularity):
    """amax = 0 must not give a 0 scale (0/0 = NaN): the scale floors at MIN_SCALE and data is all zero."""
    x = torch.zeros(4, 32)
    data, scale = fp8.quantize(x, dtype, granularity)
    assert bool(torch.isfinite(scale).all()) and bool((scale == fp8.MIN_SCALE).all())
    assert bool((data.float() == 0).all())
    assert bool((fp8.dequantize(data, scale) == 0).all())


def _scaled_mm_case(dtypes, granularity, device, seed=0):
    """Quantized operands a (M x K), b (N x K) and their fp64 dequantized values."""
    torch.manual_seed(seed)
    M, N, K = 32, 48, 64
    a = torch.randn(M, K, device=device)
    b = torch.randn(N, K, device=device) * 0.1
    qa = fp8.quantize(a, dtypes[0], granularity)
    qb = fp8.quantize(b, dtypes[1], granularity)
    return a, qa, qb, fp8.dequantize(*qa, torch.float64), fp8.dequantize(*qb, torch.float64)


def _scaled_mm_bound(da, db, device, fp8_gemm: bool, out_dtype) -> torch.Tensor:
    """tests/bounds.py's GEMM bound (K 2^-24 on CPU, K 2^-13 on CUDA's fp8 tensor cores) plus the two fp32
    scale multiplies (2 * 2^-24 of |a|.|b|^T) and, for a bf16 result, one bf16 rounding."""
    mag = da.abs() @ db.abs().T
    return gemm_bound(mag, (da @ db.T).abs(), da.shape[1], device, fp8_gemm, out_dtype) + 2 * U_FP32 * mag


def _assert_bound_catches_mistakes(a, qa, db, dtypes, granularity, bound):
    """Negative controls: the bound must reject (1) a's dequant scale off by 2^-4 relative and (2) a rounded to
    the other fp8 format (e5m2 for e4m3 and vice versa). On CPU (K 2^-24) both miss by orders of magnitude;
    on CUDA (K 2^-13 = 2^-7 of sum|a||b| at K = 64) each still lands outside the bound on about half of the
    1536 elements, up to 5x beyond it (CUDA bound applied to CPU data, seeds 0-4, every case here)."""
    other = fp8.E5M2 if dtypes[0] == fp8.E4M3 else fp8.E4M3
    ref = fp8.dequantize(*qa, torch.float64) @ db.T
    wrong_scale = fp8.dequantize(qa[0], qa[1] * (1 + 2.0**-4), torch.float64) @ db.T
    wrong_format = fp8.dequantize(*fp8.quantize(a, other, granularity), torch.float64) @ db.T
    for what, wrong in (("scale off by 2^-4", wrong_scale), ("other fp8 format", wrong_format)):
        assert not bool(((wrong - ref).abs() <= bound).all()), f"the bound cannot tell {what} apart"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("dtypes", [(fp8.E4M3, fp8.E4M3), (fp8.E5M2, fp8.E4M3)], ids=["e4m3xe4m3", "e5m2xe4m3"])
def test_scaled_mm_matches_fp64_matmul_of_dequantized_operands(dtypes, granularity, out_dtype, device):
    """scaled_mm(a, b) = dequant(a) . dequant(b)^T up to accumulation over K (tests/bounds.py: K 2^-24 on CPU,
    K 2^-13 on CUDA's fp8 tensor cores, of |a|.|b|^T), the two scale multiplies (2 * 2^-24) and, for a bf16
    result, one bf16 rounding (2^-8 of |result|). On the H100 the fp32 bound K 2^-24 was exceeded up to 50x."""
    if device == "cuda" and granularity == "rowwise" and (dtypes[0] != fp8.E4M3 or out_dtype != torch.bfloat16):
        pytest.skip("torch._scaled_mm rowwise scaling on CUDA takes e4m3 operands and a bf16 output only")
    a, qa, qb, da, db = _scaled_mm_case(dtypes, granularity, device)
    out = fp8.scaled_mm(*qa, *qb, out_dtype=out_dtype).double()
    ref = da @ db.T
    bound = _scaled_mm_bound(da, db, device, True, out_dtype)
    assert out.shape == ref.shape
    assert bool(((out - ref).abs() <= bound).all()), f"worst err/bound {float(((out - ref).abs() / bound).max()):.3f}"
    _assert_bound_catches_mistakes(a, qa, db, dtypes, granularity, bound)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("dtypes", [(fp8.E4M3, fp8.E4M3), (fp8.E5M2, fp8.E4M3)], ids=["e4m3xe4m3", "e5m2xe4m3"])
def test_scaled_mm_fallback_matches_fp64_with_fp32_accumulation(dtypes, granularity, out_dtype, device):
    """The upcast fallback (forced here; scaled_mm takes it for K or N not multiples of 16): the fp8 values are
    exact in bf16 and fp32 and accumulate in fp32, so the fp32 bound K 2^-24 |a|.|b|^T holds on every device."""
    a, qa, qb, da, db = _scaled_mm_case(dtypes, granularity, device)
    out = fp8.scaled_mm(*qa, *qb, out_dtype=out_dtype, fallback=True)
    ref = da @ db.T
    bound = _scaled_mm_bound(da, db, device, False, out_dtype)
    assert out.dtype == out_dtype and out.shape == ref.shape
    err = (out.double() - ref).abs()
    assert bool((err <= bound).all()), f"worst err/bound {float((err / bound).max()):.3f}"
    _assert_bound_catches_mistakes(a, qa, db, dtypes, granularity, bound)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("M,N,K", [(20, 60, 96), (20, 56, 40), (7, 12, 24)])
def test_scaled_mm_takes_shapes_that_are_not_multiples_of_16(M, N, K, granularity, device):
    """cuBLASLt's fp8 GEMM needs K and N multiples of 16 ("mat2 shape (96x60) must be divisible by 16" on the
    H100): scaled_mm falls back to the upcast GEMM there; fp32 accumulation, one bf16 output rounding."""
    torch.manual_seed(1)
    qa = fp8.quantize(torch.randn(M, K, device=device), fp8.E4M3, granularity)
    qb = fp8.quantize(torch.randn(N, K, device=device), fp8.E4M3, granularity)
    assert not fp8.scaled_mm_fits(K, N)
    out = fp8.scaled_mm(*qa, *qb, out_dtype=torch.bfloat16)
    da, db = fp8.dequantize(*qa, torch.float64), fp8.dequantize(*qb, torch.float64)
    bound = _scaled_mm_bound(da, db, device, False, torch.bfloat16)
    err = (out.double() - da @ db.T).abs()
    assert out.shape == (M, N) and bool((err <= bound).all())
