"""falqon_core.cublaslt: the workspace-free cuBLASLt fp8 GEMM behind fp8.scaled_mm on CUDA.

CPU: where the path does not apply it says so (None), so fp8.scaled_mm's CPU results are untouched. GPU: the
product against the fp64 product of the same fp8 values (bounds.gemm_bound, fp8 tensor-core accumulation) and
against torch._scaled_mm (another kernel may add the fp32 partial sums in another order: at most one bf16 ulp
apart), at aligned and offset pointers, with fast accumulation, inside a CUDA graph; and falqon's step with the
path on and off.
"""

from __future__ import annotations

import pytest
import torch

from bounds import gemm_bound
from falqon_steps import falqon_steps
from falqon_core import cublaslt, fp8


def fp8_operand(rows: int, cols: int, dtype: torch.dtype, device: str = "cpu", seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, cols, generator=g) * 2).to(dtype).to(device)


def test_alignment_is_the_largest_power_of_two_up_to_256():
    assert cublaslt.alignment(0) == 256
    assert cublaslt.alignment(0x7F0000001000) == 256
    assert cublaslt.alignment(0x7F0000001010) == 16
    assert cublaslt.alignment(0x7F0000001003) == 1


def test_library_candidates_match_the_cuda_major_torch_was_built_with(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    names = cublaslt._library_candidates()
    assert names[0] == "libcublasLt.so.12" and all(n.endswith("libcublasLt.so.12") for n in names)
    monkeypatch.setattr(torch.version, "cuda", None)  # a CPU or ROCm build: nothing to load
    assert cublaslt._library_candidates() == []


def test_cpu_tensors_do_not_take_the_path():
    a, b = fp8_operand(32, 64, fp8.E4M3), fp8_operand(48, 64, fp8.E4M3, seed=1)
    one = torch.ones(())
    assert cublaslt.scaled_mm(a, one, b, one) is None


@pytest.mark.parametrize(
    "change",
    ["e5m2 x e5m2", "rowwise scale", "fp64 scale", "non-contiguous a", "fp8 output", "K mismatch"],
)
def test_inputs_outside_the_contract_do_not_apply(change):
    a, b = fp8_operand(32, 64, fp8.E4M3), fp8_operand(48, 64, fp8.E4M3, seed=1)
    sa, sb, out = torch.ones(()), torch.ones(()), torch.bfloat16
    if change == "e5m2 x e5m2":
        a, b = a.float().to(fp8.E5M2), b.float().to(fp8.E5M2)
    elif change == "rowwise scale":
        sa = torch.ones(32, 1)
    elif change == "fp64 scale":
        sa = torch.ones((), dtype=torch.float64)
    elif change == "non-contiguous a":
        a = fp8_operand(64, 32, fp8.E4M3).t()
    elif change == "fp8 output":
        out = fp8.E4M3
    else:
        b = fp8_operand(48, 80, fp8.E4M3)
    assert not cublaslt._applies(a, b, sa, sb, out)


def test_the_contract_applies_to_what_falqon_passes():
    a, b = fp8_operand(32, 64, fp8.E5M2), fp8_operand(48, 64, fp8.E4M3, seed=1)
    assert cublaslt._applies(a, b, torch.ones(()), torch.ones(()), torch.bfloat16)


def test_cpu_scaled_mm_never_reaches_cublaslt(monkeypatch):
    """With the switch on, CPU calls (the upcast GEMM and torch._scaled_mm's CPU kernel alike) stay off cuBLASLt."""
    def fail(*args, **kwargs):
        raise AssertionError("cublaslt.scaled_mm called for CPU tensors")

    monkeypatch.setattr(cublaslt, "scaled_mm", fail)
    monkeypatch.setattr(fp8, "WORKSPACE_FREE_GEMM", True)
    a, b = fp8_operand(32, 64, fp8.E4M3), fp8_operand(48, 64, fp8.E4M3, seed=1)
    scale = torch.tensor(0.5)
    exact = (a.double() @ b.double().t()) * 0.25
    bound = gemm_bound((a.double().abs() @ b.double().abs().t()) * 0.25, exact.abs(), 64, "cpu", True, torch.bfloat16)
    for upcast in (True, False):
        monkeypatch.setattr(fp8, "CPU_UPCAST", upcast)
        got = fp8.scaled_mm(a, scale, b, scale)
        assert got.shape == (32, 48) and ((got.double() - exact).abs() <= bound).all()


def _within_one_bf16_ulp(a: torch.Tensor, b: torch.Tensor) -> bool:
    ulp = torch.finfo(torch.bfloat16).eps * a.float().abs().clamp_min(torch.finfo(torch.bfloat16).tiny)
    return bool(((a.float() - b.float()).abs() <= ulp * 1.0001).all())


def _check_against_fp64_and_torch(a, sa, b, sb, out_dtype, fast_accum):
    got = cublaslt.scaled_mm(a, sa, b, sb, out_dtype, fast_accum)
    assert got is not None and got.shape == (a.shape[0], b.shape[0]) and got.dtype == out_dtype
    exact = (a.double() @ b.double().t()) * sa.double() * sb.double()
    abs_prod = (a.double().abs() @ b.double().abs().t()) * sa.double() * sb.double()
    bound = gemm_bound(abs_prod, exact.abs(), a.shape[1], "cuda", True, out_dtype)
    assert ((got.double() - exact).abs() <= bound).all()
    ref = torch._scaled_mm(a, b.t(), scale_a=sa, scale_b=sb, out_dtype=out_dtype, use_fast_accum=fast_accum)
    if out_dtype == torch.bfloat16:  # the same fp32 sums up to their order: one bf16 ulp at most
        assert _within_one_bf16_ulp(ref, got)
    return got


@pytest.mark.gpu
@pytest.mark.parametrize("m,n,k", [(2048, 4096, 4096), (2048, 4096, 1024), (3008, 4160, 4096), (16, 48, 32),
                                   (512, 1088, 11008)])
@pytest.mark.parametrize("types", [(fp8.E4M3, fp8.E4M3), (fp8.E5M2, fp8.E4M3), (fp8.E4M3, fp8.E5M2)])
@pytest.mark.parametrize("fast_accum", [False, True])
def test_gpu_product_is_within_the_fp8_bound_and_one_ulp_of_torch(m, n, k, types, fast_accum):
    a = fp8_operand(m, k, types[0], "cuda")
    b = fp8_operand(n, k, types[1], "cuda", seed=1)
    sa, sb = torch.tensor(0.37, device="cuda"), torch.tensor(1.9, device="cuda")
    _check_against_fp64_and_torch(a, sa, b, sb, torch.bfloat16, fast_accum)


@pytest.mark.gpu
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16])
def test_gpu_other_output_dtypes(out_dtype):
    a, b = fp8_operand(256, 512, fp8.E4M3, "cuda"), fp8_operand(128, 512, fp8.E4M3, "cuda", seed=1)
    one = torch.ones((), device="cuda")
    _check_against_fp64_and_torch(a, one, b, one, out_dtype, False)


@pytest.mark.gpu
def test_gpu_offset_pointers_get_a_plan_for_their_alignment():
    """Row slices of a buffer start at 16-byte (not 256-byte) offsets: the heuristic must be told."""
    big_a = fp8_operand(2048 + 1, 1024, fp8.E4M3, "cuda")
    big_b = fp8_operand(512 + 1, 1024, fp8.E4M3, "cuda", seed=1)
    a, b = big_a[1:], big_b[1:]  # 1024-byte rows: offsets of 1024 bytes, then a 16-byte-aligned slice below
    one = torch.ones((), device="cuda")
    _check_against_fp64_and_torch(a, one, b, one, torch.bfloat16, False)
    flat = fp8_operand(1, 16 + 256 * 512, fp8.E4M3, "cuda").view(-1)
    a16 = flat[16:].view(256, 512)
    assert cublaslt.alignment(a16.data_ptr()) == 16
    _check_against_fp64_and_torch(a16, one, b[:128, :512].contiguous(), one, torch.bfloat16, False)


@pytest.mark.gpu
def test_gpu_graph_replay_reads_the_current_operands():
    a = fp8_operand(512, 1024, fp8.E4M3, "cuda")
    b = fp8_operand(256, 1024, fp8.E4M3, "cuda", seed=1)
    sa, sb = torch.tensor(1.0, device="cuda"), torch.tensor(0.5, device="cuda")
    cublaslt.scaled_mm(a, sa, b, sb)  # the plan is made outside the capture
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        out = cublaslt.scaled_mm(a, sa, b, sb)
    a.copy_(fp8_operand(512, 1024, fp8.E4M3, "cuda", seed=7))
    sa.fill_(2.0)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, cublaslt.scaled_mm(a, sa, b, sb))


@pytest.mark.gpu
@pytest.mark.parametrize("n,rank,m", [(4096, 64, 2048), (1024, 40, 2048), (512, 24, 3000)])
def test_gpu_falqon_step_with_and_without_the_path(monkeypatch, n, rank, m):
    """The switch changes which cuBLASLt kernel runs falqon's GEMMs. Same fp8 operands: the output and dX within
    one bf16 ulp (the fp32 sums' order). dB goes through O_A's e4m3 cast, whose scale follows O_A's amax: a
    one-ulp change there may move each O_A8 value by one e4m3 step (2^-3 relative), so the two dB differ by at
    most twice that plus each GEMM's accumulation bound, relative to |dY|^T |O_A|."""
    calls = []
    real = cublaslt.scaled_mm
    monkeypatch.setattr(cublaslt, "scaled_mm", lambda *a, **k: calls.append(1) or real(*a, **k))
    layer, x, dy, results = falqon_steps(
        n, rank, m, [lambda on=on: monkeypatch.setattr(fp8, "WORKSPACE_FREE_GEMM", on) for on in (False, True)]
    )
    assert calls  # the second step went through the workspace-free path
    (y0, dx0, db0), (y1, dx1, db1) = results
    assert _within_one_bf16_ulp(y0, y1) and _within_one_bf16_ulp(dx0, dx1)
    o_a = x.double() @ (layer.adapter_fp8.double() * layer.scale.double()).t()
    scale = dy.double().abs().t() @ o_a.abs()
    bound = 2 * (2.0**-3 + m * 2.0**-13) * scale * 1.01
    assert ((db0.double() - db1.double()).abs() <= bound).all()
