"""The kernel micro-benchmark's contract: a clear error without a GPU, and results in the store format."""

import io
import json

import pytest
import torch
from rich.console import Console

from falqon_bench.measure import kernel_bench as kb
from falqon_bench.data.schema import REQUIRED_KEYS
from falqon_bench.data.store import load_run

TINY = kb.KernelShapes(quantize=((8, 64),), proxy=((16, 64, 4, 4),), gemm=((32, 64, 64, 8),))
PEAKS = {"copy_gb_per_s": 1000.0, "fp8_tflops": 500.0}


def fake_timer(step, cache):
    """Runs the step once (so every kernel really executes) and reports fixed samples, ms."""
    step()
    return [0.5, 0.7, 0.6], "events"


def test_without_cuda_it_raises_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(kb.KernelBenchError, match="kernel micro-benchmarks need a CUDA GPU"):
        kb.run_kernel_bench(tmp_path, TINY)
    assert not any(tmp_path.iterdir()), "nothing is written when the run cannot start"


def test_with_a_fake_timer_every_point_has_the_required_keys(tmp_path):
    run_dir = kb.run_kernel_bench(
        tmp_path, TINY, device="cpu", timer=fake_timer, peaks=PEAKS, compile_reference=False,
        console=Console(file=io.StringIO()),
    )
    run = load_run(run_dir)
    # quantize: 2 formats x 2 granularities x (triton, torch); proxy: 2; gemm: 4 variants; each warm + cold
    assert len(run.points) == (8 + 2 + 4) * 2
    for p in run.points:
        missing = [k for k in (*REQUIRED_KEYS, "gbps", "pct_of_copy_bw", "tflops") if k not in p]
        assert not missing, f"{p['method']} lacks {missing}"
        assert p["status"] == "ok", p["error"]
        assert p["gpu_ms"] == 0.6 and p["wall_ms"] == 0.6 and p["gpu_samples_ms"] == [0.5, 0.7, 0.6]
        assert p["gpu_timing"] == "events" and p["kernel_ms"] == {} and p["error"] is None
        assert p["method"].startswith("kernel.") and p["cache"] in ("warm", "cold")
    assert len({p["point_id"] for p in run.points}) == len(run.points)
    assert run.manifest["status"] == "complete" and run.manifest["peaks"] == PEAKS

    by_method = {(p["method"], p["cache"]): p for p in run.points}
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
    # every line of the file is a JSON object (what other tools read)
    lines = (run_dir / "points.jsonl").read_text().splitlines()
    assert all(isinstance(json.loads(line), dict) for line in lines)


def test_a_failing_variant_is_recorded_as_an_error_and_the_run_goes_on(tmp_path):
    def timer(step, cache):
        if getattr(step, "func", None) is kb.melded_matmul_triton:
            raise RuntimeError("out of resources: shared memory\nsecond line")
        return fake_timer(step, cache)

    run_dir = kb.run_kernel_bench(
        tmp_path, TINY, device="cpu", timer=timer, peaks=PEAKS, compile_reference=False, caches=("warm",),
        console=Console(file=io.StringIO()),
    )
    points = {p["method"]: p for p in load_run(run_dir).points}
    bad = points["kernel.melded_gemm.triton"]
    assert bad["status"] == "error" and bad["error"] == "RuntimeError: out of resources: shared memory"
    assert bad["gpu_ms"] is None and bad["tflops"] is None
    assert points["kernel.melded_gemm.cublas"]["status"] == "ok"


def test_default_cases_cover_every_kernel_variant_including_torch_compile():
    shapes = kb.KernelShapes(quantize=((4, 32),), proxy=((8, 32, 4, 2),), gemm=((16, 32, 32, 8),))
    methods = [c.method for c in kb.kernel_cases(shapes, torch.device("cpu"))]
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
def test_kernel_bench_runs_on_cuda_with_the_real_timer(tmp_path):
    shapes = kb.KernelShapes(quantize=((1024, 4096),), proxy=((4096, 4096, 64, 64),), gemm=((1024, 4096, 4096, 64),))
    run_dir = kb.run_kernel_bench(tmp_path, shapes, compile_reference=False, console=Console(file=io.StringIO()))
    points = load_run(run_dir).points
    assert all(p["status"] == "ok" for p in points), [p["error"] for p in points if p["status"] != "ok"]
    assert all(p["gpu_ms"] > 0 and p["peak_mem_bytes"] > 0 for p in points)
    assert all(p["gpu_timing"] == "cudagraph" for p in points)
