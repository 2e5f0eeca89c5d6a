"""FALQON's padded paths: ranks and token counts off the multiple-of-16 grid keep every GEMM in fp8.

The layer pads the melded matrix to N + r_pad rows (zero rows of A8) and the dB GEMM's token reduction to
M_pad (zero columns written by the transpose). Zero rows and columns add exact zeros to every dot product, so
the results must match the fp64 product of the same fp8 operands within the bounds of tests/test_falqon.py:
one bf16 output rounding (2^-8) plus accumulation (tests/bounds.py; on CPU 2^-24 per addition, covered by
2^-16 sum|a||b| for these K). The CPU cannot tell an fp8 GEMM from the bf16 fallback, so a spy checks that
every GEMM the layer issues has the shape torch._scaled_mm's CUDA kernel takes.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from bounds import U_FP8_TENSOR_CORE, accumulation_bound
from falqon_core import fp8
from falqon_core.kernels import melded_matmul, quantize_fp8, transpose_fp8
from falqon_core.methods.falqon import FalqonLinear, pad_rows, parse_options

BF16 = 2.0**-8
ACCUM = 2.0**-16
K, N = 128, 112  # both multiples of 16 (named layers are); rank 100 needs K, N >= 100


def dequant64(data: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return data.double() * scale.double()


def assert_within(actual, expected, bound, what):
    err = (actual.double() - expected).abs()
    worst = (err - bound).max().item()
    assert worst <= 0, f"{what}: exceeds its bound by {worst:.3g} (max |err| {err.max().item():.3g})"


def run_step(r: int, M: int, device: str = "cpu", **options):
    """One fwd + bwd of a K -> N layer at rank r on M tokens; returns (layer, x, dY)."""
    layer = FalqonLinear(nn.Linear(K, N, bias=False).to(device), r, **options)
    x = torch.randn(M, K, device=device, requires_grad=True)
    g = torch.randn(M, N, device=device)
    layer(x).backward(g)
    return layer, x, g


@pytest.mark.parametrize("r", [8, 24, 100])
@pytest.mark.parametrize("M", [1, 77, 1000])
def test_padded_forward_and_grads_match_fp64_of_the_same_fp8_operands(r, M):
    """out = x8.W8^T, dX = dY8.W8, dB = dY8^T.O_A8 at odd r and M, within bf16 rounding + accumulation."""
    torch.manual_seed(r * 1000 + M)
    layer = FalqonLinear(nn.Linear(K, N, bias=False), r)
    x = torch.randn(M, K, requires_grad=True)
    g = torch.randn(M, N)
    out = layer(x)
    out.backward(g)
    assert out.shape == (M, N) and x.grad.shape == (M, K) and layer.lora_B.grad.shape == (N, r)

    x8, sx = quantize_fp8(x.detach(), fp8.E4M3, "tensorwise")
    xq = dequant64(x8, sx)
    wq, aq = dequant64(layer.backbone_fp8, layer.scale), dequant64(layer.adapter_fp8, layer.scale)
    same = xq @ wq.t()
    assert_within(out, same, BF16 * same.abs() + ACCUM * xq.abs() @ wq.abs().t(), "out")

    g8, sg = quantize_fp8(g, fp8.E5M2, "tensorwise")
    gq = dequant64(g8, sg)
    same_dx = gq @ wq
    assert_within(x.grad, same_dx, ACCUM * gq.abs() @ wq.abs(), "dX")

    # O_A as the layer saves it: the melded GEMM's columns N.. (r_pad of them, zero past r), e4m3 tensorwise
    _, o_a = melded_matmul(x8, sx, layer.melded, layer.scale, N)
    assert o_a.shape == (M, -(-r // 16) * 16) and int(o_a[:, r:].count_nonzero()) == 0
    exact_oa = xq @ aq.t()
    assert_within(o_a[:, :r], exact_oa, BF16 * exact_oa.abs() + ACCUM * xq.abs() @ aq.abs().t(), "O_A")
    oa8, soa = quantize_fp8(o_a.contiguous(), fp8.E4M3, "tensorwise")
    oq = dequant64(oa8, soa)[:, :r]
    same_db = gq.t() @ oq
    assert_within(layer.lora_B.grad, same_db, BF16 * same_db.abs() + ACCUM * gq.abs().t() @ oq.abs(), "dB")


class ScaledMmSpy:
    """Records (reduction length, output width, use_fast_accum) of every fp8 GEMM: each torch._scaled_mm call and
    each workspace-free cuBLASLt call (falqon_core.cublaslt, what fp8.scaled_mm takes on CUDA) that ran."""

    def __init__(self, monkeypatch):
        from falqon_core import cublaslt

        self.calls: list[tuple[int, int, bool]] = []
        monkeypatch.setattr(fp8, "CPU_UPCAST", False)  # on the CPU too, route as on CUDA (fp8.scaled_mm)
        real, real_lt = torch._scaled_mm, cublaslt.scaled_mm

        def spy(a, b, *args, **kwargs):
            self.calls.append((a.shape[1], b.shape[1], bool(kwargs.get("use_fast_accum", False))))
            return real(a, b, *args, **kwargs)

        def spy_lt(a, a_scale, b, b_scale, out_dtype=torch.bfloat16, use_fast_accum=False):
            out = real_lt(a, a_scale, b, b_scale, out_dtype, use_fast_accum)
            if out is not None:  # None: not taken, fp8.scaled_mm calls torch._scaled_mm (recorded there)
                self.calls.append((a.shape[1], b.shape[0], bool(use_fast_accum)))
            return out

        monkeypatch.setattr(torch, "_scaled_mm", spy)
        monkeypatch.setattr(cublaslt, "scaled_mm", spy_lt)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("r,M", [(8, 77), (24, 1000), (100, 1), (16, 64)])
def test_every_gemm_of_a_step_fits_the_cuda_fp8_gemm_at_odd_rank_and_tokens(monkeypatch, r, M, device):
    """Forward, dX and dB each reach torch._scaled_mm (no upcast fallback) with K and N multiples of 16."""
    spy = ScaledMmSpy(monkeypatch)
    monkeypatch.setattr(fp8, "upcast_scaled_mm", lambda *a, **k: pytest.fail("bf16 fallback GEMM used"))
    run_step(r, M, device)
    assert len(spy.calls) == 3
    for k, n, _ in spy.calls:
        assert fp8.scaled_mm_fits(k, n), f"GEMM reduction {k}, width {n} would leave fp8 on CUDA"


def test_aligned_rank_and_tokens_take_the_unpadded_no_copy_path():
    """r = 16, M = 64: melded has exactly N + r rows, pad_rows returns its input, the transposes are M wide."""
    layer, _, _ = run_step(16, 64)
    assert layer.melded.shape == (N + 16, K)
    assert pad_rows(layer.melded) is layer.melded
    y8 = torch.zeros(64, N, dtype=fp8.E5M2)
    assert transpose_fp8(y8, 16).shape == (N, 64)
    odd = FalqonLinear(nn.Linear(K, N), 24)
    assert odd.melded.shape == (N + 32, K) and odd.adapter_fp8.shape == (24, K)
    assert int(odd.melded[N + 24 :].view(torch.uint8).count_nonzero()) == 0


def test_proxy_update_at_odd_rank_leaves_the_padding_rows_zero():
    layer, _, _ = run_step(24, 77)
    layer.proxy_update()
    assert int(layer.melded[N + 24 :].view(torch.uint8).count_nonzero()) == 0
    assert int(layer.lora_B.count_nonzero()) == 0


# ---------------------------------------------------------------- fast accumulation


def test_fast_accum_defaults_on_for_the_forward_gemm_only_and_the_option_turns_it_off(monkeypatch):
    """The reference runs the forward (melded) GEMM with use_fast_accum=True and the backward without."""
    spy = ScaledMmSpy(monkeypatch)
    run_step(16, 32)
    widths = [(n, fast) for _, n, fast in spy.calls]
    assert widths[0] == (N + 16, True) and all(not fast for _, fast in widths[1:])
    spy.calls.clear()
    run_step(16, 32, **parse_options({"fast_accum": False}))
    assert not any(fast for _, _, fast in spy.calls)
    with pytest.raises(ValueError, match="fast_accum must be true or false"):
        parse_options({"fast_accum": "yes"})


def truncating_dot(a: torch.Tensor, b: torch.Tensor, bits: int) -> float:
    """a.b summed left to right in an accumulator that keeps `bits` significant bits (truncation), as Hopper's
    fp8 MMA accumulator does for a whole K reduction under fast accumulation (tests/bounds.py: ~14 bits)."""
    acc = 0.0
    for p in (a.double() * b.double()).tolist():
        s = acc + p
        m, e = math.frexp(s)
        acc = math.ldexp(math.trunc(m * 2.0**bits) / 2.0**bits, e)
    return acc


def test_fast_accum_whole_k_in_a_14_bit_accumulator_stays_within_the_fp8_tensor_core_bound():
    """Fast accumulation never promotes partial sums to fp32; a 14-bit truncating accumulator over the whole
    K = 4096 still errs by less than bounds.py's K 2^-13 sum|a||b|, the bound the forward GEMM tests use on
    CUDA with or without fast accumulation: following the reference's use_fast_accum=True is allowed."""
    torch.manual_seed(1)
    k = 4096
    a8, sa = fp8.quantize(torch.randn(k), fp8.E4M3)
    b8, sb = fp8.quantize(torch.randn(k), fp8.E4M3)
    a, b = dequant64(a8, sa), dequant64(b8, sb)
    exact = float(a @ b)
    err = abs(truncating_dot(a, b, 14) - exact)
    bound = float(accumulation_bound((a.abs() @ b.abs()).reshape(1), k, "cuda", fp8=True))
    assert err <= bound
    assert bound == k * U_FP8_TENSOR_CORE * float(a.abs() @ b.abs())
    assert err > 0  # the model does round: the bound is not met by an exact sum
