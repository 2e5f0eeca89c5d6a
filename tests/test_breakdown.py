"""The profiler breakdown: classify() on real-world kernel/op names, and profile_step on a tiny CPU step."""

import pytest
import torch

from falqon_bench.measure.breakdown import MAX_KERNEL_ROWS, classify, profile_step, residual, summarize
from falqon_bench.data.schema import BREAKDOWN_CATEGORIES
from falqon_core import cublaslt

BF16, FP8, F32 = "c10::BFloat16", "c10::Float8_e4m3fn", "float"
NVJET = "nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NNT"
R = 16

# (kernel or op name, launching op, input shapes, input dtypes, feeds_fp8, expected category)
CASES = [
    # cuBLAS names both GEMM precisions nvjet_*: only the parent op tells them apart
    (NVJET, "aten::_scaled_mm", [[4096, 4096], [4096, 4096], [], []], [FP8, FP8, F32, F32], False, "gemm_fp8"),
    (NVJET, "aten::mm", [[4096, 4096], [4096, 4096]], [BF16, BF16], False, "gemm_bf16"),
    # falqon_core.cublaslt's own cuBLASLt call (ctypes, no aten op) runs in this custom op while profiling
    (NVJET, "falqon::cublaslt_scaled_mm", [[2048, 4096], [], [4096, 4096], [], []], [FP8, F32, FP8, F32, "ScalarType", "Scalar"], False, "gemm_fp8"),
    (NVJET, "falqon::cublaslt_scaled_mm", [[4096, 2048], [], [R, 2048], [], []], [FP8, F32, FP8, F32, "ScalarType", "Scalar"], False, "lora_gemm"),
    (NVJET, "aten::addmm", [[4096], [4096, 4096], [4096, 4096]], [BF16, BF16, BF16], False, "gemm_bf16"),
    ("aten::addmm_", "aten::addmm_", [[48, 96], [48, R], [R, 96]], [BF16, BF16, BF16], False, "lora_gemm"),
    # a GEMM with a dimension equal to the rank is a LoRA GEMM, fp8 or bf16
    (NVJET, "aten::mm", [[4096, 4096], [4096, R]], [BF16, BF16], False, "lora_gemm"),
    (NVJET, "aten::mm", [[R, 4096], [4096, 4096]], [BF16, BF16], False, "lora_gemm"),
    (NVJET, "aten::_scaled_mm", [[4096, R], [R, 4096], [], []], [FP8, FP8, F32, F32], False, "lora_gemm"),
    ("aten::linear", "aten::linear", [[4096, 4096], [R, 4096], []], [BF16, BF16, ""], False, "lora_gemm"),
    ("aten::linear", "aten::linear", [[2, 2048, 4096], [4096, 4096], []], [BF16, BF16, ""], False, "gemm_bf16"),
    ("ampere_bf16_s16816gemm_bf16_128x128_ldg8_f2f_stages_64x3_nn", None, [], [], False, "gemm_bf16"),
    # Triton GEMMs (no aten op around them): fp8 unless the recorded dtypes say otherwise
    ("_melded_fp8_gemm_kernel", None, [], [], False, "gemm_fp8"),
    # inputs of an autograd.Function around a melded GEMM are not its operands: the adapter's r is no LoRA GEMM
    ("_melded_gemm_kernel", "MeldedLinearFunction", [[40, 128], [96, R], [112, 128]], [BF16, BF16, FP8], False, "gemm_fp8"),
    ("matmul_kernel", None, [], [], False, "gemm_fp8"),
    ("matmul_kernel", "matmul_kernel", [[64, 64], [64, 64]], [BF16, BF16], False, "gemm_bf16"),
    ("triton_tem_fused__scaled_mm_0", "triton_tem_fused__scaled_mm_0", [[64, 64], [64, 64]], [FP8, FP8], False, "gemm_fp8"),
    ("triton_tem_fused_mm_0", "triton_tem_fused_mm_0", [[64, 64], [64, 64]], [BF16, BF16], False, "gemm_bf16"),
    # inductor: amax reductions and fused clamp+cast are quantization; other fused pointwise is not
    ("triton_red_fused_abs_amax_0", "triton_red_fused_abs_amax_0", [], [], False, "quantize"),
    ("triton_red_fused_abs_max_1", "triton_red_fused_abs_max_1", [], [], False, "quantize"),
    ("triton_poi_fused__to_copy_clamp_mul_2", "triton_poi_fused__to_copy_clamp_mul_2", [], [], False, "quantize"),
    ("triton_poi_fused__to_copy_3", "triton_poi_fused__to_copy_3", [[64, 64]], [FP8], False, "quantize"),
    ("triton_poi_fused_add_mul_4", "triton_poi_fused_add_mul_4", [], [], False, "elementwise"),
    ("triton_poi_fused_addmm_gelu_5", "triton_poi_fused_addmm_gelu_5", [], [], False, "elementwise"),
    # hand-written Triton / library kernels named for what they do
    ("_quantize_rowwise_kernel", None, [], [], False, "quantize"),
    ("_amax_kernel", None, [], [], False, "quantize"),
    ("hadamard_transform_kernel", None, [], [], False, "quantize"),
    ("_rotate_kernel", None, [], [], False, "quantize"),
    ("_merge_rows_kernel", None, [], [], False, "quantize"),
    ("kDequantizeBlockwise<__nv_bfloat16, 512, 64, 8, 2>", None, [], [], False, "quantize"),
    # aten casts: float8 on one side and a wide float on the other is a (de)quantize; fp8->fp8 is a copy
    ("void at::native::unrolled_elementwise_kernel<float8_copy_kernel_cuda>", "aten::copy_", [[64, 64], [64, 64], []], [FP8, BF16, "Scalar"], False, "quantize"),
    ("void at::native::unrolled_elementwise_kernel<direct_copy_kernel_cuda>", "aten::copy_", [[64, 64], [64, 64], []], [FP8, FP8, "Scalar"], False, "elementwise"),
    ("aten::_to_copy", "aten::_to_copy", [[64, 64]], [FP8], False, "quantize"),
    # amax always belongs to a quantization; abs/clamp/mul only when they feed a float8 cast
    ("void at::native::reduce_kernel<512, 1, MaxNanFunctor>", "aten::amax", [[64, 64]], [BF16], False, "quantize"),
    ("void at::native::vectorized_elementwise_kernel<4, AbsFunctor>", "aten::abs", [[64, 64]], [BF16], True, "quantize"),
    ("void at::native::vectorized_elementwise_kernel<4, AbsFunctor>", "aten::abs", [[64, 64]], [BF16], False, "elementwise"),
    ("void at::native::vectorized_elementwise_kernel<4, MulFunctor>", "aten::mul", [[64, 64], []], [BF16, "Scalar"], False, "elementwise"),
    ("aten::clamp", "aten::clamp", [[64, 64], [], []], [F32, "Scalar", "Scalar"], True, "quantize"),
    # the rest
    ("Memset (Device)", "aten::zero_", [[64, 64]], [BF16], False, "elementwise"),
    ("void at::native::indexFuncLargeIndex<...>", "aten::index_add_", [[64, 64]], [BF16], False, "elementwise"),
    ("aten::sum", "aten::sum", [[64, 64]], [F32], False, "elementwise"),
    ("aten::t", "aten::t", [[64, 64]], [BF16], False, "other"),
    ("autograd::engine::evaluate_function: MmBackward0", "autograd::engine::evaluate_function: MmBackward0", [], [], False, "other"),
    ("matmul_with_hp_or_float8_argsBackward", "matmul_with_hp_or_float8_argsBackward", [], [], False, "other"),
    ("some_custom_kernel", None, [], [], False, "other"),
]


@pytest.mark.parametrize("name, op, shapes, dtypes, feeds_fp8, expected", CASES, ids=[f"{c[0][:40]}@{c[1]}->{c[5]}" for c in CASES])
def test_classify_table(name, op, shapes, dtypes, feeds_fp8, expected):
    assert classify(name, op, shapes, dtypes, R, feeds_fp8=feeds_fp8) == expected


def test_classify_returns_a_known_category_without_rank_or_shapes():
    assert classify(NVJET, "aten::mm", None, None, None) == "gemm_bf16"
    assert classify("x", None, None, None, 0) in BREAKDOWN_CATEGORIES


def test_residual_is_the_unexplained_percent_of_gpu_time():
    assert residual({"gemm_bf16": 0.6, "other": 0.3}, 1.0) == pytest.approx(10.0)
    assert residual({"gemm_bf16": 1.2}, 1.0) == pytest.approx(-20.0)
    assert residual(None, 1.0) is None
    assert residual({"gemm_bf16": 1.0}, None) is None


def test_summarize_caps_the_raw_kernel_list_and_reports_per_step_times():
    rows = [{"name": f"k{i}", "op": None, "input_shapes": [], "input_dtypes": [], "category": "other", "us": float(i + 1)} for i in range(100)]
    out = summarize(rows, total_us=sum(r["us"] for r in rows), steps=2)
    assert len(out["kernels"]) == MAX_KERNEL_ROWS
    assert out["kernels"][0]["name"] == "k99" and out["kernels"][0]["ms"] == pytest.approx(100 / 1e3 / 2)
    assert out["kernel_ms"]["other"] == pytest.approx(out["total_ms"])
    assert set(out["kernel_ms"]) == set(BREAKDOWN_CATEGORIES)


def _lora_step_with_quantization(K=64, N=32, r=R, M=24):
    """A bf16 LoRA step plus a tensorwise e4m3 quantization of the input, as the FP8 methods do."""
    w = torch.randn(N, K, dtype=torch.bfloat16)
    a = torch.randn(r, K, dtype=torch.bfloat16, requires_grad=True)
    b = torch.zeros(N, r, dtype=torch.bfloat16, requires_grad=True)
    x = torch.randn(M, K, dtype=torch.bfloat16)

    def step():
        scale = x.abs().amax().float() / 448.0
        q = (x.float() / scale).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
        y = x @ w.t() + (x @ a.t()) @ b.t() + q.float().sum() * 0
        ga, gb = torch.autograd.grad(y.float().square().sum(), [a, b])
        with torch.no_grad():
            a.sub_(ga, alpha=1e-3)
            b.sub_(gb, alpha=1e-3)

    return step


def test_profile_step_on_cpu_groups_op_time_into_categories_summing_to_about_the_total():
    out = profile_step(_lora_step_with_quantization(), rank=R, device="cpu", steps=2)
    cats = out["kernel_ms"]
    assert set(cats) == set(BREAKDOWN_CATEGORIES)
    # CPU: categories hold op self time; only the Python glue between ops (the step's own self time) is outside them
    assert 0.3 * out["total_ms"] <= sum(cats.values()) <= out["total_ms"] * 1.001
    assert cats["gemm_bf16"] > 0 and cats["lora_gemm"] > 0 and cats["quantize"] > 0 and cats["elementwise"] > 0
    assert 0 < len(out["kernels"]) <= MAX_KERNEL_ROWS
    by_name = {}
    for k in out["kernels"]:
        assert set(k) == {"name", "op", "input_shapes", "input_dtypes", "category", "ms", "count"}
        by_name.setdefault(k["name"], set()).add(k["category"])
    assert by_name["aten::abs"] == {"quantize"}  # abs feeds the float8 cast
    assert by_name["aten::amax"] == {"quantize"}
    mm_shapes = {tuple(map(tuple, k["input_shapes"][:2])): k["category"] for k in out["kernels"] if k["name"] == "aten::mm"}
    assert mm_shapes.get(((24, 64), (64, 32))) == "gemm_bf16"
    assert mm_shapes.get(((24, 64), (64, R))) == "lora_gemm"


def test_profile_step_rejects_zero_steps():
    with pytest.raises(ValueError, match="steps"):
        profile_step(lambda: None, rank=R, device="cpu", steps=0)


@pytest.mark.gpu
def test_profile_step_on_gpu_attributes_nvjet_kernels_by_parent_op():
    dev = torch.device("cuda")
    M, K, N = 256, 512, 512
    x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
    w = torch.randn(N, K, device=dev, dtype=torch.bfloat16)
    a = torch.randn(R, K, device=dev, dtype=torch.bfloat16)
    x8 = x.to(torch.float8_e4m3fn)
    w8 = w.to(torch.float8_e4m3fn)
    one = torch.ones((), device=dev)

    def step():
        torch.mm(x, w.t())
        torch._scaled_mm(x8, w8.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
        torch.mm(x, a.t())
        (x.float() / x.abs().amax().float()).clamp(-448, 448).to(torch.float8_e4m3fn)

    out = profile_step(step, rank=R, device=dev, steps=3)
    cats = out["kernel_ms"]
    assert cats["gemm_bf16"] > 0 and cats["gemm_fp8"] > 0 and cats["lora_gemm"] > 0 and cats["quantize"] > 0
    # on a GPU every kernel lands in exactly one category: they sum to the device time
    assert sum(cats.values()) == pytest.approx(out["total_ms"], rel=1e-6)


@pytest.mark.gpu
def test_profile_step_on_gpu_files_the_cublaslt_gemms_of_a_falqon_step_as_fp8():
    """falqon's GEMMs run through falqon_core.cublaslt (a ctypes call, no aten op): none lands in gemm_bf16, and the
    device time still sums up."""
    from falqon_core import fp8
    from falqon_core.methods.falqon import FalqonLinear

    assert fp8.WORKSPACE_FREE_GEMM and cublaslt.available()
    dev = torch.device("cuda")
    layer = FalqonLinear(torch.nn.Linear(1024, 1024, bias=False).to(dev), R)
    x = torch.randn(512, 1024, device=dev, dtype=torch.bfloat16, requires_grad=True)

    def step():
        layer(x).sum().backward()

    out = profile_step(step, rank=R, device=dev, steps=3)
    cats = out["kernel_ms"]
    assert cats["gemm_fp8"] > 0 and cats["gemm_bf16"] == 0
    gemms = [k for k in out["kernels"] if k["name"].startswith("nvjet")]
    assert gemms and all(k["op"] == cublaslt.PROFILER_OP for k in gemms)
    assert sum(cats.values()) == pytest.approx(out["total_ms"], rel=1e-6)


def _fake_event(name, start, end, device="CPU", kernels=(), shapes=None, dtypes=None, parent=None, corr=0, linked=0):
    """A stand-in for torch.profiler's FunctionEvent with just what _collect_rows reads.

    Like torch's: an op's `kernels` are profiler_util.Kernel(name, device, duration) tuples (no times);
    a device event carries the correlation id of the op that launched it in `linked_correlation_id`.
    """
    from types import SimpleNamespace

    from torch.autograd.profiler_util import Kernel

    return SimpleNamespace(
        name=name, device_type=f"DeviceType.{device}", is_async=False,
        kernels=[Kernel(k.name, 0, k.time_range.end - k.time_range.start) for k in kernels],
        cpu_parent=parent, cpu_children=[], input_shapes=shapes or [], input_dtypes=dtypes or [], id=corr,
        linked_correlation_id=linked,
        time_range=SimpleNamespace(start=start, end=end, elapsed_us=lambda: end - start),
        duration=end - start, self_cpu_time_total=0,
    )


def _profile_with_cupti_duplicate(with_correlation_ids: bool):
    from types import SimpleNamespace

    from falqon_bench.measure.breakdown import STEP_LABEL

    gemm = _fake_event("nvjet_sm90_tst_256x128", 10, 110, device="CUDA", linked=7)
    add = _fake_event("vectorized_elementwise_kernel", 120, 140, device="CUDA", linked=8)
    gemm_again = _fake_event("nvjet_sm90_tst_256x128", 10, 110, device="CUDA", linked=7)  # a second record
    bf16 = ["c10::BFloat16"] * 2
    mm = _fake_event("aten::mm", 0, 5, kernels=[gemm], shapes=[[64, 64], [64, 64]], dtypes=bf16, corr=7)
    addop = _fake_event("aten::add", 6, 8, kernels=[add], shapes=[[64, 64], [64, 64]], dtypes=bf16, corr=8)
    buffer = _fake_event("Activity Buffer Request", 9, 9, kernels=[gemm], corr=7)  # shares the mm's id
    label = _fake_event(STEP_LABEL, 0, 200)
    events = [buffer, label, mm, addop, gemm, add, gemm_again]
    if with_correlation_ids:  # a kernel whose launching op the profile does not hold
        events.append(_fake_event("_cast_tensorwise_kernel", 150, 160, device="CUDA", linked=99))
    if not with_correlation_ids:
        for e in events:
            del e.linked_correlation_id
    return SimpleNamespace(events=lambda: events)


@pytest.mark.parametrize("with_correlation_ids", [True, False], ids=["correlation-ids", "kernel-lists"])
def test_a_kernel_cupti_also_files_under_activity_buffer_request_is_counted_once(with_correlation_ids):
    """On the H100 one bf16 GEMM per three steps also appeared under CUPTI's 'Activity Buffer Request'
    pseudo-op; counting it twice made bf16 kernel sums exceed gpu_ms by ~11%."""
    from falqon_bench.measure.breakdown import _collect_rows

    rows, total_us = _collect_rows(_profile_with_cupti_duplicate(with_correlation_ids), rank=8, on_gpu=True)
    linked = [r for r in rows if r["op"] is not None]
    assert sorted(r["us"] for r in linked) == [20, 100], rows
    assert {r["op"] for r in linked} == {"aten::mm", "aten::add"}
    if with_correlation_ids:  # the unlinked Triton kernel is still counted, and classified by its name
        assert [(r["name"], r["category"], r["us"]) for r in rows if r["op"] is None] == [("_cast_tensorwise_kernel", "quantize", 10)]
        assert total_us == 130
    else:
        assert total_us == 120
