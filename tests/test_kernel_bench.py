"""What one kernel point does (falqon_bench.measure.kernel_bench): its row in the store format, its derived metrics,
a failing variant as an error row; the suite kind that drives it is tested in tests/test_kernels_suite.py."""

import json

import pytest
import torch

from falqon_bench.measure import kernel_bench as kb
from falqon_bench.data.schema import REQUIRED_KEYS, row_problem

TINY = kb.KernelShapes(quantize=((8, 64),), proxy=((16, 64, 4, 4),), gemm=((32, 64, 64, 8),))
PEAKS = {"copy_gb_per_s": 1000.0, "fp8_tflops": 500.0}
CPU = torch.device("cpu")


def fake_timer(step, cache):
    """Runs the step once (so every kernel really executes) and reports fixed samples, ms."""
    step()
    return [0.5, 0.7, 0.6], "events"


def measure_all(shapes, timer, caches=("warm", "cold")):
    """Every case of `shapes` at every cache state, measured on the CPU (Triton under TRITON_INTERPRET=1)."""
    return [kb.measure_point(case, cache, timer, CPU, "CPU", PEAKS)
            for case in kb.kernel_cases(shapes, compile_reference=False) for cache in caches]  # fmt: skip


def test_with_a_fake_timer_every_point_has_the_required_keys():
    points = measure_all(TINY, fake_timer)
    # quantize: 2 formats x 2 granularities x (triton, torch); proxy: 2; gemm: 4 variants; each warm + cold
    assert len(points) == (8 + 2 + 4) * 2
    for p in points:
        missing = [k for k in (*REQUIRED_KEYS, "gbps", "pct_of_copy_bw", "tflops") if k not in p]
        assert not missing, f"{p['method']} lacks {missing}"
        assert p["status"] == "ok", p["error"]
        assert p["gpu_ms"] == 0.6 and p["wall_ms"] == 0.6 and p["gpu_samples_ms"] == [0.5, 0.7, 0.6]
        assert p["gpu_timing"] == "events" and p["kernel_ms"] == {} and p["error"] is None
        assert p["method"].startswith("kernel.") and p["cache"] in ("warm", "cold")
        assert row_problem(json.loads(json.dumps(p, default=str))) is None  # what every reader accepts
    assert len({p["point_id"] for p in points}) == len(points)

    by_method = {(p["method"], p["cache"]): p for p in points}
    q = by_method[("kernel.quantize_e4m3_tensorwise.triton", "warm")]
    # 8 x 64 bf16 read (1024 B) + 512 fp8 written + one fp32 scale = 1540 bytes in 0.6 ms
    assert q["gbps"] == pytest.approx(1540 / 0.6e-3 / 1e9)
    assert q["pct_of_copy_bw"] == pytest.approx(100 * q["gbps"] / 1000.0)
    assert q["floor_ms"] == pytest.approx(1540 / 1000e9 * 1e3)
    assert q["tflops"] is None and (q["K"], q["N"], q["layer"]) == (64, 8, "8x64")
    g = by_method[("kernel.melded_gemm.triton", "cold")]
    flops = 2 * 32 * (64 + 8) * 64
    assert g["tflops"] == pytest.approx(flops / 0.6e-3 / 1e12)
    assert g["floor_ms"] == pytest.approx(flops / 500e12 * 1e3)
    assert (g["tokens"], g["rank"], g["gbps"]) == (32, 8, None)
    assert by_method[("kernel.proxy_update.triton", "warm")]["options"] == {"topk": 4}


def test_a_failing_variant_is_recorded_as_an_error_and_the_others_are_not():
    def timer(step, cache):
        if getattr(step, "func", None) is kb.melded_matmul_triton:
            raise RuntimeError("out of resources: shared memory\nsecond line")
        return fake_timer(step, cache)

    points = {p["method"]: p for p in measure_all(TINY, timer, caches=("warm",))}
    bad = points["kernel.melded_gemm.triton"]
    assert bad["status"] == "error" and bad["error"] == "RuntimeError: out of resources: shared memory"
    assert bad["error_type"] == "RuntimeError" and bad["gpu_ms"] is None and bad["tflops"] is None
    assert points["kernel.melded_gemm.cublas"]["status"] == "ok"


def test_a_step_that_cannot_be_built_is_an_error_row_not_a_crash():
    case = kb.cases_of("transpose", (8, 64))[0]
    case.kernel = "no_such_kernel"
    row = kb.measure_point(case, "warm", fake_timer, CPU, "CPU", None)
    assert row["status"] == "error" and "unknown kernel 'no_such_kernel'" in row["error"]


def test_the_cpu_timer_records_wall_time_only():
    case = kb.cases_of("transpose", (8, 64))[1]  # the torch reference: no Triton needed
    row = kb.measure_point(case, "warm", kb.cpu_wall_timer(warmup_ms=0, budget_ms=1, min_samples=3), CPU, "CPU", None)
    assert row["status"] == "ok", row["error"]
    assert row["gpu_ms"] is None and row["gpu_samples_ms"] == [] and row["gpu_timing"] == "none"
    assert row["wall_ms"] > 0 and len(row["wall_samples_ms"]) >= 3 and row["gbps"] > 0 and row["floor_ms"] is None


def test_built_steps_compute_what_their_kernel_computes():
    """build_step hands the case's own function its seeded inputs: the Triton and torch transposes agree."""
    triton_case, torch_case = kb.cases_of("transpose", (8, 64))
    a, b = kb.build_step(triton_case, CPU)(), kb.build_step(torch_case, CPU)()
    assert a.shape == (64, 8) and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def test_default_cases_cover_every_kernel_variant_including_torch_compile():
    shapes = kb.KernelShapes(quantize=((4, 32),), proxy=((8, 32, 4, 2),), gemm=((16, 32, 32, 8),))
    methods = [c.method for c in kb.kernel_cases(shapes)]
    for fmt in ("e4m3", "e5m2"):
        for gran in ("tensorwise", "rowwise"):
            for impl in ("triton", "torch", "torch_compile"):
                assert f"kernel.quantize_{fmt}_{gran}.{impl}" in methods
    assert {"kernel.proxy_update.triton", "kernel.proxy_update.torch", "kernel.melded_gemm.cublas",
            "kernel.melded_gemm.triton", "kernel.melded_gemm_quantized_oa.triton"} <= set(methods)


def test_llama_7b_shapes_are_the_default():
    assert kb.LLAMA_7B.quantize == ((4096, 4096), (4096, 11008), (16384, 4096))
    assert {(n, k) for n, k, _, _ in kb.LLAMA_7B.proxy} == {(4096, 4096), (11008, 4096), (4096, 11008)}
    assert {(k, n) for _, k, n, _ in kb.LLAMA_7B.gemm} == {(4096, 4096), (4096, 11008), (11008, 4096)}


@pytest.mark.gpu
def test_kernel_cases_run_on_cuda_with_the_real_timer():
    shapes = kb.KernelShapes(quantize=((1024, 4096),), proxy=((4096, 4096, 64, 64),), gemm=((1024, 4096, 4096, 64),))
    device = torch.device("cuda")
    timer = kb.cuda_graph_timer(device)
    points = [kb.measure_point(case, "warm", timer, device, "GPU", None) for case in kb.kernel_cases(shapes, compile_reference=False)]
    assert all(p["status"] == "ok" for p in points), [p["error"] for p in points if p["status"] != "ok"]
    assert all(p["gpu_ms"] > 0 and p["peak_mem_bytes"] > 0 for p in points)
    assert all(p["gpu_timing"] == "cudagraph" for p in points)
