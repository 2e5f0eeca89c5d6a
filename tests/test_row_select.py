"""row_select: the Triton row L1 norms and the select that copies the chosen rows of B out and zeroes B, against
their torch references (and the fused proxy update against proxy_update_reference_).

Exactness: with B's entries multiples of 2^-3 and |B| <= 1, every partial sum of a row's |B| is a multiple of 2^-3
below 2^8 (r <= 256): at most 11 significant bits, exact in fp32 in any order, so the norms are bit-identical to
torch's and the selects see the same values. For general inputs each of the r - 1 fp32 additions errs by at most
2^-24 of a partial sum, itself at most the norm: |norm - exact| <= (r - 1) 2^-24 norm (tests/bounds.py's model).
"""

import pytest
import torch

from bounds import U_FP32
from falqon_core.kernels import topk as tk
from falqon_core.kernels.proxy_update import proxy_update_reference_, proxy_update_triton_
from falqon_core.kernels.row_select import (
    row_l1_reference, row_l1_triton, take_top_rows_reference_, take_top_rows_triton_,
)
from test_kernels_proxy_update import exact_inputs, fp8_ulps_apart


def exact_b(n, r, dtype=torch.float32, device="cpu"):
    return (torch.randint(-8, 9, (n, r), device=device) * 0.125).to(dtype)


@pytest.mark.parametrize("n,r", [(1, 1), (77, 8), (130, 24), (64, 64), (33, 100), (200, 256)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_norms_are_bit_identical_to_torch_when_sums_are_exact(n, r, dtype):
    b = exact_b(n, r, dtype)
    assert torch.equal(row_l1_triton(b), row_l1_reference(b))
    bt = exact_b(r, n, dtype).t()  # a transposed B (strides r x 1 swapped)
    assert torch.equal(row_l1_triton(bt), row_l1_reference(bt))


@pytest.mark.parametrize("r", [3, 64, 200])
def test_row_norms_within_the_fp32_summation_bound_for_general_inputs(r):
    b = torch.randn(150, r) * torch.logspace(-6, 2, r)  # magnitudes over eight decades
    exact = b.double().abs().sum(dim=1)
    got = row_l1_triton(b).double()
    assert ((got - exact).abs() <= (r - 1) * U_FP32 * exact).all()


def test_row_norms_of_empty_and_rank_zero_b():
    assert row_l1_triton(torch.zeros(0, 4)).shape == (0,)
    assert torch.equal(row_l1_triton(torch.zeros(5, 0)), torch.zeros(5))


def run_take(b, k):
    b_t, b_r = b.clone(), b.clone()
    got = take_top_rows_triton_(b_t, k)
    ref = take_top_rows_reference_(b_r, k)
    return got, ref, b_t


@pytest.mark.parametrize("n,r,k", [(1, 4, 1), (40, 8, 5), (300, 24, 300), (tk._RANK_BLOCK_J + 3, 64, 64),
                                   (2 * tk._RANK_BLOCK_J + 17, 100, 33), (50, 256, 0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_take_top_rows_matches_the_reference_in_order_copies_the_rows_and_zeroes_b(n, r, k, dtype):
    # ties among norms are common on this grid: both break them by lower index, so even the order is identical
    b = exact_b(n, r, dtype)
    (rows, b_rows), (rows_ref, b_rows_ref), b_after = run_take(b, k)
    assert rows.dtype == torch.int64 and rows.shape == (k,)
    assert torch.equal(rows, rows_ref)
    assert b_rows.dtype == dtype and torch.equal(b_rows, b_rows_ref) and torch.equal(b_rows, b[rows])
    assert (b_after == 0).all()


def test_take_top_rows_on_a_transposed_b_and_with_ties_and_nan():
    b = torch.ones(6, 20).t()  # column-major B (strides 1, 20), every norm tied
    b[13, 2] = float("nan")  # NaN ranks above everything (torch.topk's order)
    (rows, b_rows), (rows_ref, _), b_after = run_take(b, 4)
    assert rows.tolist() == rows_ref.tolist() == [13, 0, 1, 2]
    assert torch.equal(b_rows[1:], torch.ones(3, 6)) and b_rows[0].isnan().any()
    assert (b_after == 0).all()


def test_take_top_rows_rejects_bad_arguments():
    with pytest.raises(ValueError, match="k must be in"):
        take_top_rows_triton_(torch.zeros(4, 2), 5)
    with pytest.raises(ValueError, match="2-D float"):
        take_top_rows_triton_(torch.zeros(4), 1)


@pytest.mark.parametrize("n,k_dim,r,k", [(40, 300, 8, 5), (70, 200, 40, 33), (24, 130, 100, 3), (600, 64, 16, 16)])
def test_fused_proxy_update_is_bit_exact_when_sums_are_exact(n, k_dim, r, k):
    w8, a8, b = exact_inputs(n, k_dim, r, k)
    w_t, b_t, w_r, b_r = w8.clone(), b.clone(), w8.clone(), b.clone()
    rows_t = proxy_update_triton_(w_t, a8, b_t, k, fused_select=True)
    rows_r = proxy_update_reference_(w_r, a8, b_r, k)
    assert torch.equal(rows_t.sort().values, rows_r.sort().values)
    assert torch.equal(w_t.view(torch.uint8), w_r.view(torch.uint8))
    assert (b_t == 0).all()


def test_fused_proxy_update_within_one_fp8_ulp_for_general_inputs():
    w8, a8, _ = exact_inputs(48, 200, 16)
    b = torch.randn(48, 16) * 0.3
    w_t, w_r = w8.clone(), w8.clone()
    rows_t = proxy_update_triton_(w_t, a8, b.clone(), 12, fused_select=True)
    rows_r = proxy_update_reference_(w_r, a8, b.clone(), 12)
    assert torch.equal(rows_t.sort().values, rows_r.sort().values)
    assert fp8_ulps_apart(w_t, w_r).max().item() <= 1.0


# ---------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("n,r,k", [(4096, 64, 64), (11008, 16, 16), (1024, 256, 256)])
def test_take_top_rows_on_cuda_matches_the_reference(n, r, k):
    b = exact_b(n, r, torch.float32, "cuda")
    (rows, b_rows), (rows_ref, b_rows_ref), b_after = run_take(b, k)
    assert torch.equal(rows, rows_ref) and torch.equal(b_rows, b_rows_ref) and (b_after == 0).all()
    g = torch.randn(n, r, device="cuda")
    exact = g.double().abs().sum(dim=1)
    assert ((row_l1_triton(g).double() - exact).abs() <= (r - 1) * U_FP32 * exact).all()


@pytest.mark.gpu
def test_proxy_update_on_cuda_takes_the_fused_select(monkeypatch):
    from falqon_core.kernels import proxy_update as pu

    called = []
    monkeypatch.setattr(pu, "take_top_rows_triton_", lambda b, k: called.append(k) or take_top_rows_triton_(b, k))
    w8, a8, b = exact_inputs(4096, 4096, 64, 64, device="cuda")
    w_r = w8.clone()
    pu.proxy_update_(w8, a8, b.clone(), 64)
    proxy_update_reference_(w_r, a8, b.clone(), 64)
    assert called == [64] and torch.equal(w8.view(torch.uint8), w_r.view(torch.uint8))
