"""transpose_fp8: a bit-exact C x R copy of any R x C 1-byte tensor, and FALQON's backward uses it.

Bit-exactness is the only claim (the kernel moves bytes), so every comparison is on the uint8 view:
NaN encodings and -0 must survive too. Inputs are random bytes viewed as fp8, so every encoding occurs.
"""

import pytest
import torch
from torch import nn

from falqon_bench.measure import kernel_bench as kb
from falqon_core import fp8
from falqon_core.kernels import transpose_fp8, transpose_fp8_reference, transpose_fp8_triton
from falqon_core.methods import falqon as falqon_mod

ODD_SHAPES = [(1, 1), (3, 130), (257, 65), (64, 64)]
BYTE_DTYPES = [torch.uint8, fp8.E4M3, fp8.E5M2]


def random_bytes(rows, cols, dtype, device="cpu"):
    """rows x cols of uniformly random bytes viewed as dtype (all 256 encodings, NaNs included)."""
    return torch.randint(0, 256, (rows, cols), dtype=torch.uint8, device=device).view(dtype)


def assert_same_bytes(got, want):
    assert got.dtype == want.dtype and got.shape == want.shape, (got.dtype, got.shape, want.dtype, want.shape)
    assert got.is_contiguous()
    assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))


@pytest.mark.parametrize("dtype", BYTE_DTYPES, ids=str)
@pytest.mark.parametrize("shape", ODD_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_triton_transpose_is_bit_identical_to_the_reference(shape, dtype):
    x = random_bytes(*shape, dtype)
    assert_same_bytes(transpose_fp8_triton(x), transpose_fp8_reference(x))


def test_triton_transpose_reads_strided_views():
    """A column slice (row stride > cols) and a transposed view (column stride != 1) are read as they are."""
    base = random_bytes(70, 200, fp8.E4M3)
    for view in (base[:, 3:133], base[5:, :].t(), base[::2, ::3]):
        assert_same_bytes(transpose_fp8_triton(view), transpose_fp8_reference(view))


@pytest.mark.parametrize("shape,pad_to", [((77, 24), 16), ((3, 130), 16), ((257, 65), 64), ((64, 48), 16)])
def test_padded_transpose_appends_zero_columns_in_the_same_pass(shape, pad_to):
    """pad_to: C x R_pad with R_pad the next multiple of pad_to; columns R.. are zero bytes, the rest x^T."""
    x = random_bytes(*shape, fp8.E4M3)
    got, want = transpose_fp8_triton(x, pad_to), transpose_fp8_reference(x, pad_to)
    assert_same_bytes(got, want)
    rows_out = -(-shape[0] // pad_to) * pad_to
    assert got.shape == (shape[1], rows_out)
    assert torch.equal(got[:, : shape[0]].view(torch.uint8), x.t().contiguous().view(torch.uint8))
    assert int(got[:, shape[0] :].view(torch.uint8).count_nonzero()) == 0


def test_dispatcher_uses_the_reference_off_cuda_and_rejects_wrong_inputs():
    x = random_bytes(5, 9, fp8.E5M2)
    assert_same_bytes(transpose_fp8(x), x.t().contiguous())
    with pytest.raises(ValueError, match="1-byte dtype"):
        transpose_fp8(torch.zeros(4, 4, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="2-D"):
        transpose_fp8_triton(torch.zeros(2, 3, 4, dtype=torch.uint8))


def test_falqon_gemms_get_contiguous_operands_so_no_implicit_transpose_copy_remains(monkeypatch):
    """Every operand reaching fp8_matmul_nt in FALQON's backward is already contiguous (its .contiguous()
    is a no-op), and the grads are those of the unpatched layer."""
    torch.manual_seed(0)
    layer = falqon_mod.FalqonLinear(nn.Linear(32, 48), 8)
    layer.lora_B.data.normal_()
    x = torch.randn(16, 32, requires_grad=True)
    grad_out = torch.randn(16, 48)
    layer(x).backward(grad_out)
    want_dx, want_db = x.grad.clone(), layer.lora_B.grad.clone()

    seen = []
    original = falqon_mod.fp8_matmul_nt

    def recording(a8, a_scale, b8, b_scale, out_dtype):
        seen.append((a8.is_contiguous(), b8.is_contiguous()))
        return original(a8, a_scale, b8, b_scale, out_dtype)

    monkeypatch.setattr(falqon_mod, "fp8_matmul_nt", recording)
    x.grad, layer.lora_B.grad = None, None
    layer(x).backward(grad_out)
    assert seen == [(True, True), (True, True)], seen  # the dX GEMM, then the dB GEMM
    assert torch.equal(x.grad, want_dx) and torch.equal(layer.lora_B.grad, want_db)


def test_kernel_bench_transpose_case_counts_one_read_and_one_write():
    def timer(step, cache):
        step()
        return [0.5, 0.7, 0.6], "events"

    shapes = kb.KernelShapes(quantize=(), proxy=(), gemm=(), transpose=((8, 64),))
    peaks = {"copy_gb_per_s": 1000.0, "fp8_tflops": 500.0}
    rows = [kb.measure_point(case, "warm", timer, torch.device("cpu"), "CPU", peaks) for case in kb.kernel_cases(shapes)]
    points = {p["method"]: p for p in rows}
    assert set(points) == {"kernel.transpose_fp8.triton", "kernel.transpose_fp8.torch"}
    p = points["kernel.transpose_fp8.triton"]
    # 8 x 64 e4m3 read (512 B) + 512 B written, in 0.6 ms
    assert p["status"] == "ok" and p["bytes"] == 1024.0
    assert p["gbps"] == pytest.approx(1024 / 0.6e-3 / 1e9)
    assert p["pct_of_copy_bw"] == pytest.approx(100 * p["gbps"] / 1000.0)
    assert kb.LLAMA_7B.transpose == ((4096, 4096), (4096, 11008))


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(4096, 4096), (4096, 11008), (11008, 4096)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_cuda_transpose_is_bit_identical_at_llama_shapes(shape):
    for dtype in (fp8.E4M3, fp8.E5M2):
        x = random_bytes(*shape, dtype, device="cuda")
        assert_same_bytes(transpose_fp8(x), transpose_fp8_reference(x))
    odd = random_bytes(257, 4099, fp8.E4M3, device="cuda")
    assert_same_bytes(transpose_fp8(odd), transpose_fp8_reference(odd))


@pytest.mark.gpu
def test_cuda_transpose_can_be_captured_in_a_cuda_graph():
    x = random_bytes(4096, 11008, fp8.E4M3, device="cuda")
    transpose_fp8(x)  # compile the kernel outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = transpose_fp8(x)
    x.view(torch.uint8).copy_(torch.randint(0, 256, x.shape, dtype=torch.uint8, device="cuda"))
    graph.replay()
    torch.cuda.synchronize()
    assert_same_bytes(out, transpose_fp8_reference(x))
