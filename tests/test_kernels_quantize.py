"""The Triton fp8 quantization kernels against their torch reference (CPU: Triton interpreter; GPU: the real thing).

Claim: bit-exact. The reference (falqon_core.fp8.quantize) computes scale = clamp(amax / max, MIN_SCALE)
and data = sat_cast(x / scale) with IEEE fp32 ops and round-to-nearest-even; the kernels do the same
ops, so no tolerance is needed: every fp8 byte and every scale must be equal.
"""

import pytest
import torch

from falqon_core import fp8
from falqon_core.kernels import quantize as q
from falqon_core.kernels._triton_common import fp32, fp32_reciprocal
from falqon_core.kernels.quantize import quantize_fp8, quantize_fp8_reference, quantize_fp8_triton

FORMATS = [fp8.E4M3, fp8.E5M2]
GRANULARITIES = ["tensorwise", "rowwise"]


def assert_bit_exact(got: tuple[torch.Tensor, torch.Tensor], want: tuple[torch.Tensor, torch.Tensor]) -> None:
    data, scale = got
    ref_data, ref_scale = want
    assert data.dtype == ref_data.dtype and data.shape == ref_data.shape
    assert scale.dtype == torch.float32 and scale.shape == ref_scale.shape
    assert torch.equal(scale, ref_scale), f"scales differ: max |diff| {(scale - ref_scale).abs().max().item()}"
    mismatched = (data.view(torch.uint8) != ref_data.view(torch.uint8)).sum().item()
    assert mismatched == 0, f"{mismatched} of {data.numel()} fp8 values differ from the reference"


def fp8_midpoints(dtype: torch.dtype) -> torch.Tensor:
    """Every halfway point between consecutive non-negative finite values of the format (exact in bf16)."""
    fmax = fp8.fp8_max(dtype)
    values = torch.arange(0, 128, dtype=torch.int32).to(torch.uint8).view(dtype).float()
    values = values[values.isfinite() & (values <= fmax)]
    return (values[:-1] + values[1:]) / 2


@pytest.mark.parametrize("dtype", FORMATS)
@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("in_dtype", [torch.bfloat16, torch.float32])
def test_triton_quantize_is_bit_exact_with_reference(dtype, granularity, in_dtype):
    # 37 x 257 = 9509 elements: more blocks than programs (grid-stride loop) and ragged edges everywhere
    x = (torch.randn(37, 257) * 3).to(in_dtype)
    x[5, 7] = 0.0
    x[6, :] = 0.0  # an all-zero row: rowwise scale falls back to MIN_SCALE
    assert_bit_exact(quantize_fp8_triton(x, dtype, granularity), quantize_fp8_reference(x, dtype, granularity))


@pytest.mark.parametrize("dtype", FORMATS)
def test_rowwise_two_pass_path_for_long_rows_is_bit_exact(dtype, monkeypatch):
    # shrink the one-pass limit so a 257-wide row takes the two-pass path in 64-wide chunks
    monkeypatch.setattr(q, "_ROWWISE_MAX_ONE_PASS", 64)
    monkeypatch.setattr(q, "_ROWWISE_CHUNK", 64)
    assert not q._rowwise_config(5, 257)["ONE_PASS"]
    x = (torch.randn(5, 257) * 10).bfloat16()
    assert_bit_exact(quantize_fp8_triton(x, dtype, "rowwise"), quantize_fp8_reference(x, dtype, "rowwise"))


@pytest.mark.parametrize("dtype", FORMATS)
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_halfway_values_round_to_nearest_even_like_torch(dtype, granularity):
    # amax = fp8 max gives scale exactly 1, so x / scale lands exactly on every halfway point
    mids = fp8_midpoints(dtype)
    x = torch.cat([torch.tensor([fp8.fp8_max(dtype)]), mids, -mids]).bfloat16().reshape(1, -1)
    assert torch.equal(x.float()[0, 1 : 1 + mids.numel()], mids), "midpoints must be exact in bf16"
    data, scale = quantize_fp8_triton(x, dtype, granularity)
    assert scale.flatten().tolist() == [1.0]
    assert_bit_exact((data, scale), quantize_fp8_reference(x, dtype, granularity))


def test_all_zero_input_gives_min_scale_and_zero_data():
    data, scale = quantize_fp8_triton(torch.zeros(4, 40, dtype=torch.bfloat16), fp8.E4M3, "tensorwise")
    assert scale.item() == torch.tensor(fp8.MIN_SCALE, dtype=torch.float32).item()
    assert (data.float() == 0).all()


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_shapes_follow_the_reference_for_3d_input(granularity):
    x = torch.randn(2, 3, 40, dtype=torch.bfloat16)
    got = quantize_fp8_triton(x, fp8.E4M3, granularity)
    assert_bit_exact(got, quantize_fp8_reference(x, fp8.E4M3, granularity))
    assert got[1].shape == ((2, 3, 1) if granularity == "rowwise" else ())


def test_host_fp32_constants_match_torch_fp32_arithmetic():
    # the kernels get fp8_max's reciprocal and MIN_SCALE from the host; they must be torch's fp32 values
    values = torch.cat([torch.tensor([448.0, 57344.0, 1e-12, 3.0]), torch.rand(500) * 1e4, torch.rand(500) * 1e-6])
    for v in values.double().tolist():
        assert fp32(v) == torch.tensor(v, dtype=torch.float32).item()
        want = (torch.tensor(1.0) / torch.tensor(v, dtype=torch.float32)).item()
        assert fp32_reciprocal(v) == want, v


def test_bad_arguments_raise_clear_errors():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="granularity must be"):
        quantize_fp8_triton(x, fp8.E4M3, "blockwise")
    with pytest.raises(ValueError, match="fp8 dtype must be"):
        quantize_fp8_triton(x, torch.bfloat16, "tensorwise")
    with pytest.raises(ValueError, match="non-empty"):
        quantize_fp8_triton(torch.empty(0, 8), fp8.E4M3, "tensorwise")


def test_dispatcher_uses_reference_off_cuda(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the Triton path must not run on CPU tensors")

    monkeypatch.setattr(q, "quantize_fp8_triton", fail)
    x = torch.randn(8, 16, dtype=torch.bfloat16)
    assert_bit_exact(quantize_fp8(x, fp8.E5M2, "rowwise"), quantize_fp8_reference(x, fp8.E5M2, "rowwise"))


# ---------------------------------------------------------------- GPU (run by the lead on the H100)


def _amax_where_reciprocal_differs() -> float:
    """A bf16 value a with fp32(a / 448) != fp32(a * fp32(1/448)): tells torch-CUDA's scale op from a true division."""
    inv = torch.tensor(fp32_reciprocal(448.0), dtype=torch.float32)
    cand = torch.linspace(100, 500, 2000).bfloat16().float()
    differs = (cand / 448.0) != (cand * inv)
    assert differs.any()
    return float(cand[differs][0])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", FORMATS)
@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("software_round", [False, True])
def test_triton_quantize_is_bit_exact_on_cuda_4096(dtype, granularity, software_round):
    x = (torch.randn(4096, 4096, device="cuda") * 3).bfloat16()
    x[0, 0] = _amax_where_reciprocal_differs()  # row 0's (and the tensor's) amax
    ref = quantize_fp8_reference(x, dtype, granularity)
    assert_bit_exact(quantize_fp8_triton(x, dtype, granularity, software_round=software_round), ref)


@pytest.mark.gpu
def test_cuda_reference_scale_is_a_reciprocal_multiply():
    # the reason the kernel multiplies by fp32(1/max) on CUDA: torch does (ATen BinaryDivTrueKernel.cu)
    a = _amax_where_reciprocal_differs()
    x = torch.tensor([[a]], device="cuda", dtype=torch.bfloat16)
    ref = quantize_fp8_reference(x, fp8.E4M3, "tensorwise")
    assert ref[1].item() == (torch.tensor(a) * torch.tensor(fp32_reciprocal(448.0))).item()
    assert_bit_exact(quantize_fp8_triton(x, fp8.E4M3, "tensorwise"), ref)


@pytest.mark.gpu
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_quantize_is_cuda_graph_capturable(granularity):
    x = torch.randn(1024, 4096, device="cuda", dtype=torch.bfloat16)
    quantize_fp8_triton(x, fp8.E4M3, granularity)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        data, scale = quantize_fp8_triton(x, fp8.E4M3, granularity)
    x.copy_(torch.randn_like(x) * 7)  # new values: the replay must recompute amax on device
    graph.replay()
    torch.cuda.synchronize()
    assert_bit_exact((data, scale), quantize_fp8_reference(x, fp8.E4M3, granularity))


@pytest.mark.gpu
def test_dispatcher_takes_triton_on_cuda(monkeypatch):
    calls = []
    real = q.quantize_fp8_triton
    monkeypatch.setattr(q, "quantize_fp8_triton", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = torch.randn(256, 512, device="cuda", dtype=torch.bfloat16)
    assert_bit_exact(quantize_fp8(x, fp8.E4M3, "tensorwise"), quantize_fp8_reference(x, fp8.E4M3, "tensorwise"))
    assert calls == [1]


def _division_flips(amax: float, dtype: torch.dtype) -> torch.Tensor:
    """fp32 values x (with a max |x| of amax in the tensor) whose fp8 value differs between x / scale and
    x * RN(1 / scale): within a few fp32 ulps of the format's rounding midpoints."""
    scale = torch.clamp(torch.tensor(amax) / fp8.fp8_max(dtype), min=fp8.MIN_SCALE)
    inv = torch.reciprocal(scale)
    candidates = (fp8_midpoints(dtype) * scale).view(torch.int32)
    xs = torch.cat([(candidates + d).view(torch.float32) for d in range(-3, 4)])
    by_division = fp8.saturating_cast(xs / scale, dtype).view(torch.uint8)
    flips = by_division != fp8.saturating_cast(xs * inv, dtype).view(torch.uint8)
    return xs[flips & (xs.abs() <= amax)]


@pytest.mark.parametrize("dtype", FORMATS)
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_casts_multiply_by_the_reciprocal_of_the_scale_not_divide(dtype, granularity):
    # the documented contract (inverse_scale): data = sat_cast(x * RN(1 / scale)). On the values where that and
    # x / scale round to different fp8 values, kernel and reference must both give the multiply's
    xs = _division_flips(3.7, dtype)
    assert xs.numel() >= 10, "the search found too few values where the two differ"
    x = torch.cat([torch.tensor([3.7]), xs])[None, :]
    data, scale = quantize_fp8_triton(x, dtype, granularity)
    assert_bit_exact((data, scale), quantize_fp8_reference(x, dtype, granularity))
    by_multiply = fp8.saturating_cast(x * torch.reciprocal(scale), dtype)
    by_division = fp8.saturating_cast(x / scale, dtype)
    assert torch.equal(data.view(torch.uint8), by_multiply.view(torch.uint8))
    assert not torch.equal(data.view(torch.uint8), by_division.view(torch.uint8))
