"""quantize_db: dY's e5m2 cast that also computes FALQON's dB = dY8^T . O_A8 from its tiles, against quantize_fp8
(dY8 bit-identical) and fp64 (dB), under the interpreter on CPU and on the GPU when marked; the split-M path
against the one-launch path; the falqon layer's db_path option."""

import pytest
import torch

from bounds import accumulation_bound
from falqon_core import fp8
from falqon_core.kernels.cast_db import (
    CastDbConfig, config_for_rank, db_gemm_reference, launch_quantize_db, quantize_db, quantize_db_reference,
    quantize_db_triton,
)


def operands(m: int, n: int, rank: int, device: str = "cpu", seed: int = 0):
    """dY8 (M x N e5m2), O_A8^T (r_pad x M_pad e4m3, zero rows past r and columns past M), both scales."""
    g = torch.Generator().manual_seed(seed)
    r_pad, m_pad = -(-rank // 16) * 16, -(-m // 16) * 16
    dy8 = (torch.randn(m, n, generator=g) * 100).to(fp8.E5M2)
    oa = torch.zeros(r_pad, m_pad)
    oa[:rank, :m] = torch.randn(rank, m, generator=g) * 20
    oa8_t = oa.to(fp8.E4M3)
    dy_scale, oa_scale = torch.tensor(3.0e-4), torch.tensor(0.0125)
    return [t.to(device) for t in (dy8, dy_scale, oa8_t, oa_scale)]


def exact(dy8, dy_scale, oa8_t, oa_scale, rank):
    m = dy8.shape[0]
    a, b = dy8.double().t(), oa8_t[:rank, :m].double().t()
    s = dy_scale.double() * oa_scale.double()
    return a @ b * s, a.abs() @ b.abs() * s


def check_against_fp64(got, ops, rank, device):
    want, abs_ab = exact(*ops, rank)
    m = ops[0].shape[0]
    bound = accumulation_bound(abs_ab, m, device, fp8=True) + 2.0**-24 * want.abs() * 3  # sum, then two scalings
    assert got.shape == want.shape and got.dtype == torch.float32
    err = (got.double() - want).abs()
    assert bool((err <= bound).all()), f"max excess {float((err - bound).max()):.3g}"


def test_reference_is_the_exact_sum_within_fp32():
    ops = operands(100, 40, 12)
    check_against_fp64(db_gemm_reference(*ops, 12), ops, 12, "cpu")


def test_split_m_path_agrees_with_one_launch_and_repeats_bit_for_bit():
    """Many programs per SM and small token blocks force several splits (the workspace and the reduce launch)."""
    m, n, rank = 300, 32, 20
    dy = (torch.randn(m, n, generator=torch.Generator().manual_seed(3)) * 0.03).bfloat16()
    _, _, oa8_t, oa_scale = operands(m, n, rank, seed=1)
    one = launch_quantize_db(dy, oa8_t, oa_scale, rank, fp8.E5M2, True, CastDbConfig(block_n=32, programs_per_sm=1))
    split_cfg = CastDbConfig(block_n=32, block_m=16, programs_per_sm=64)
    split = launch_quantize_db(dy, oa8_t, oa_scale, rank, fp8.E5M2, True, split_cfg)
    check_against_fp64(split[2], [split[0], split[1], oa8_t, oa_scale], rank, "cpu")
    torch.testing.assert_close(split[2], one[2], rtol=2e-6, atol=1e-6 * float(one[2].abs().max()))
    assert torch.equal(split[2], launch_quantize_db(dy, oa8_t, oa_scale, rank, fp8.E5M2, True, split_cfg)[2])


def test_padding_of_o_a_is_ignored_and_rows_can_be_skipped():
    """O_A8^T's columns past M (the M_pad zero columns) and rows past r take no part, whatever they hold; without
    keep_rows no dY8 is returned and dB is the same."""
    m, n, rank = 37, 48, 8
    dy = (torch.randn(m, n) * 0.03).bfloat16()
    _, _, oa8_t, oa_scale = operands(m, n, rank)
    dirty = oa8_t.clone()
    dirty[:, m:] = torch.tensor(448.0).to(fp8.E4M3)
    dirty[rank:, :] = torch.tensor(-448.0).to(fp8.E4M3)
    want = quantize_db_triton(dy, oa8_t, oa_scale, rank, fp8.E5M2)[2]
    assert torch.equal(quantize_db_triton(dy, dirty, oa_scale, rank, fp8.E5M2)[2], want)
    dy8, _, db = quantize_db(dy, oa8_t, oa_scale, rank, fp8.E5M2, keep_rows=False)
    assert dy8 is None and db.shape == (n, rank)


def test_bad_shapes_say_what_is_wrong():
    dy = torch.randn(16, 32).bfloat16()
    _, _, oa8_t, oa_scale = operands(16, 32, 8)
    with pytest.raises(ValueError, match="rank"):
        quantize_db(dy, oa8_t, oa_scale, 17, fp8.E5M2)
    with pytest.raises(ValueError, match="columns"):
        quantize_db(torch.randn(40, 32).bfloat16(), oa8_t, oa_scale, 8, fp8.E5M2)


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


@pytest.mark.parametrize(
    "m,n,rank,cfg",
    [(64, 128, 16, CastDbConfig()), (37, 48, 8, CastDbConfig()), (200, 130, 100, CastDbConfig(max_block_r=32)),
     (300, 32, 20, CastDbConfig(block_n=32, block_m=16, programs_per_sm=64)), (150, 96, 40, config_for_rank(40))],
    ids=["aligned", "odd", "two-r-blocks", "split-m", "wide-r"],
)
@pytest.mark.parametrize("dy_dtype", [torch.bfloat16, torch.float32], ids=str)  # fp32: e2e runs in fp32
def test_fused_cast_and_db_match_quantize_then_db(m, n, rank, cfg, dy_dtype):
    """dY8 and its scale bit-identical to quantize_fp8; dB within the bound of the exact sum of the same dY8."""
    g = torch.Generator().manual_seed(m + n)
    dy = (torch.randn(m, n, generator=g) * 0.03).to(dy_dtype)
    _, _, oa8_t, oa_scale = operands(m, n, rank)
    dy8, dy_scale, db = launch_quantize_db(dy, oa8_t, oa_scale, rank, fp8.E5M2, True, cfg)
    want8, want_scale, _ = quantize_db_reference(dy, oa8_t, oa_scale, rank, fp8.E5M2)
    assert same_bytes(dy8, want8) and torch.equal(dy_scale, want_scale)
    check_against_fp64(db, [dy8, dy_scale, oa8_t, oa_scale], rank, "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("dy_dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("m,n,rank", [(4096, 4096, 64), (3000, 1024, 24), (2048, 11008, 256), (512, 4096, 8)])
def test_gpu_fused_cast_and_db_within_the_bound(m, n, rank, dy_dtype):
    dy = (torch.randn(m, n, device="cuda") * 0.03).to(dy_dtype)
    _, _, oa8_t, oa_scale = operands(m, n, rank, device="cuda")
    dy8, dy_scale, db = quantize_db_triton(dy, oa8_t, oa_scale, rank, fp8.E5M2)
    want8, want_scale, _ = quantize_db_reference(dy, oa8_t, oa_scale, rank, fp8.E5M2)
    assert same_bytes(dy8, want8) and torch.equal(dy_scale, want_scale)
    check_against_fp64(db.cpu(), [t.cpu() for t in (dy8, dy_scale, oa8_t, oa_scale)], rank, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("m,n,rank", [(4096, 4096, 64), (3000, 1024, 24)])
def test_gpu_fused_db_is_closer_to_exact_than_the_cublas_fp8_gemm(m, n, rank):
    """The fused fp32 sums against cuBLAS's fp8 GEMM on the same operands (dY8^T made here)."""
    dy = (torch.randn(m, n, device="cuda") * 0.03).bfloat16()
    _, _, oa8_t, oa_scale = operands(m, n, rank, device="cuda")
    dy8, dy_scale, db = quantize_db(dy, oa8_t, oa_scale, rank, fp8.E5M2)
    dy8_t = torch.zeros(n, oa8_t.shape[1], device="cuda", dtype=torch.uint8)
    dy8_t[:, :m] = dy8.view(torch.uint8).t()
    cublas = fp8.scaled_mm(dy8_t.view(fp8.E5M2), dy_scale, oa8_t, oa_scale, out_dtype=torch.float32)[:, :rank]
    want, _ = exact(*[t.cpu() for t in (dy8, dy_scale, oa8_t, oa_scale)], rank)
    assert float((db.cpu().double() - want).abs().max()) <= float((cublas.cpu().double() - want).abs().max())


def test_auto_picks_the_fused_db_for_wide_layers_low_ranks_and_long_sequences():
    from falqon_core.methods.falqon import fused_db_wins

    assert fused_db_wins(4096, 64, 4096) and fused_db_wins(11008, 8, 3000) and fused_db_wins(14336, 24, 1024)
    assert not fused_db_wins(1024, 64, 4096)  # narrow GQA kv output
    assert not fused_db_wins(4096, 100, 4096) and not fused_db_wins(4096, 256, 9999)  # wide accumulators
    assert not fused_db_wins(4096, 64, 512)  # short sequences
    assert not fused_db_wins(4096, 64, 4096, grad_bytes=4)  # fp32 dY: not run on a GPU yet


def test_db_path_option_is_checked_and_reported():
    from falqon_core.methods.falqon import FalqonLinear, parse_options

    assert parse_options({"db_path": "fused"}) == {"db_path": "fused"}
    with pytest.raises(ValueError, match="db_path must be one of auto, fused, transpose"):
        parse_options({"db_path": "cublas"})
    assert "db_path=transpose" in repr(FalqonLinear(torch.nn.Linear(32, 32, bias=False), 8, db_path="transpose"))


@pytest.mark.parametrize("r,M,x_grad", [(8, 77, True), (24, 40, False)])
def test_falqon_step_with_the_fused_db_matches_the_transposed_path(monkeypatch, r, M, x_grad):
    """Triton kernels forced on (interpreter): out and dX bit-identical, dB within the fp32 sum bound, and the
    backward ran the fused kernel (no dY8^T)."""
    from torch import nn

    from falqon_core.kernels import _triton_common as tc
    from falqon_core.kernels import cast_db
    from falqon_core.methods.falqon import FalqonLinear

    torch.manual_seed(r + M)
    linear = nn.Linear(64, 48, bias=False)
    x, g = torch.randn(M, 64), torch.randn(M, 48)

    def step(db_path):
        layer = FalqonLinear(linear, r, db_path=db_path)
        xi = x.clone().requires_grad_(x_grad)
        out = layer(xi)
        out.backward(g)
        return out.detach(), (xi.grad if x_grad else None), layer.lora_B.grad.clone()

    monkeypatch.setattr(tc, "triton_fp8_ok", lambda t: True)
    calls = []
    real = cast_db.quantize_db_triton
    monkeypatch.setattr(cast_db, "quantize_db_triton", lambda *a, **k: calls.append(a[3]) or real(*a, **k))
    out_t, dx_t, db_t = step("transpose")
    assert calls == []
    out_f, dx_f, db_f = step("fused")
    assert calls == [r], "the fused cast + dB ran once, at the layer's rank"
    assert torch.equal(out_f, out_t) and (dx_f is None or torch.equal(dx_f, dx_t))
    assert db_f.dtype == torch.float32 and db_f.shape == (48, r)
    scale = db_t.abs().max()
    torch.testing.assert_close(db_f, db_t, rtol=M * 2.0**-23, atol=M * 2.0**-23 * float(scale))
