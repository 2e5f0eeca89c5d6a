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
from falqon_core.kernels import row_select as rs
from falqon_core.kernels.row_select import (
    chunked_select_wins, row_l1_reference, row_l1_triton, take_top_rows_reference_, take_top_rows_triton_,
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


def run_take(b, k, chunked=None):
    b_t, b_r = b.clone(), b.clone()
    got = take_top_rows_triton_(b_t, k, chunked=chunked)
    ref = take_top_rows_reference_(b_r, k)
    return got, ref, b_t


@pytest.mark.parametrize("n,r,k", [(1, 4, 1), (40, 8, 5), (300, 24, 300), (tk._RANK_BLOCK_J + 3, 64, 64),
                                   (2 * tk._RANK_BLOCK_J + 17, 100, 33), (50, 256, 0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunked", [False, True])
def test_take_top_rows_matches_the_reference_in_order_copies_the_rows_and_zeroes_b(n, r, k, dtype, chunked):
    # ties among norms are common on this grid: both break them by lower index, so even the order is identical
    b = exact_b(n, r, dtype)
    (rows, b_rows), (rows_ref, b_rows_ref), b_after = run_take(b, k, chunked)
    assert rows.dtype == torch.int64 and rows.shape == (k,)
    assert torch.equal(rows, rows_ref)
    assert b_rows.dtype == dtype and torch.equal(b_rows, b_rows_ref) and torch.equal(b_rows, b[rows])
    assert (b_after == 0).all()


@pytest.mark.parametrize("chunked", [False, True])
def test_take_top_rows_on_a_transposed_b_and_with_ties_and_nan(chunked):
    b = torch.ones(6, 20).t()  # column-major B (strides 1, 20), every norm tied
    b[13, 2] = float("nan")  # NaN ranks above everything (torch.topk's order)
    (rows, b_rows), (rows_ref, _), b_after = run_take(b, 4, chunked)
    assert rows.tolist() == rows_ref.tolist() == [13, 0, 1, 2]
    assert torch.equal(b_rows[1:], torch.ones(3, 6)) and b_rows[0].isnan().any()
    assert (b_after == 0).all()


CHUNK = rs._CHUNK


@pytest.mark.parametrize("n,k", [
    (3 * CHUNK, 5),  # whole chunks
    (2 * CHUNK + 1, 40),  # a last chunk of one row: k - 1 of its slots unused
    (CHUNK + 200, 300),  # k above the last chunk's 200 rows
    (2 * CHUNK + 7, CHUNK + 60),  # k above a whole chunk: every row a candidate, slots past each chunk unused
])
def test_chunked_select_matches_the_rank_select_and_the_reference_at_chunk_edges(n, k):
    # values with many ties across chunks: the candidates' order must still put the lower row first
    b = exact_b(n, 4)
    (rows, b_rows), (rows_ref, b_rows_ref), b_after = run_take(b, k, chunked=True)
    (rows_rank, _), _, _ = run_take(b, k, chunked=False)
    assert torch.equal(rows, rows_ref) and torch.equal(rows, rows_rank)
    assert torch.equal(b_rows, b_rows_ref) and (b_after == 0).all()


def test_chunked_select_with_nan_inf_and_zero_rows_spread_over_chunks():
    b = torch.randn(3 * CHUNK + 11, 8)
    b[CHUNK + 3, 1] = float("nan")
    b[5, 0] = float("inf")
    b[2 * CHUNK:2 * CHUNK + 40] = 0.0
    b[3 * CHUNK + 2] = -float("inf")  # |B| = inf: a second inf norm, in the last, partial chunk
    (rows, b_rows), (rows_ref, b_rows_ref), b_after = run_take(b, 9, chunked=True)
    assert rows.tolist() == rows_ref.tolist() and rows[:3].tolist() == [CHUNK + 3, 5, 3 * CHUNK + 2]
    assert torch.equal(b_rows[1:], b_rows_ref[1:]) and b_rows[0].isnan().any()
    assert (b_after[~b_after.isnan()] == 0).all() and not b_after.isnan().any()


def test_chunked_select_is_chosen_where_it_was_measured_faster():
    # results/probes-topk-h200/select-chunked.txt: faster at N 4096 up to k 64, at N 11008 and 14336 for every k
    assert all(chunked_select_wins(n, k) for n, k in [(4096, 8), (4096, 64), (11008, 256), (14336, 16)])
    assert not any(chunked_select_wins(n, k) for n, k in [(1024, 8), (1024, 256), (4096, 256), (2048, 16), (CHUNK, 1)])


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
@pytest.mark.parametrize("n,r,k", [(4096, 64, 64), (11008, 16, 16), (1024, 256, 256), (14336, 40, 40), (3000, 8, 8)])
@pytest.mark.parametrize("chunked", [None, False, True])
def test_take_top_rows_on_cuda_matches_the_reference(n, r, k, chunked):
    b = exact_b(n, r, torch.float32, "cuda")
    (rows, b_rows), (rows_ref, b_rows_ref), b_after = run_take(b, k, chunked)
    assert torch.equal(rows, rows_ref) and torch.equal(b_rows, b_rows_ref) and (b_after == 0).all()
    g = torch.randn(n, r, device="cuda")
    exact = g.double().abs().sum(dim=1)
    assert ((row_l1_triton(g).double() - exact).abs() <= (r - 1) * U_FP32 * exact).all()


@pytest.mark.gpu
@pytest.mark.parametrize("n,r", [(4096, 64), (14336, 16)])  # 14336 rows: above MAX_RANK_LENGTH, the chunked select
def test_proxy_update_on_cuda_takes_the_fused_select(monkeypatch, n, r):
    from falqon_core.kernels import proxy_update as pu

    called = []
    monkeypatch.setattr(pu, "take_top_rows_triton_", lambda b, k: called.append(k) or take_top_rows_triton_(b, k))
    w8, a8, b = exact_inputs(n, 4096, r, r, device="cuda")
    w_r = w8.clone()
    pu.proxy_update_(w8, a8, b.clone(), r)
    proxy_update_reference_(w_r, a8, b.clone(), r)
    assert called == [r] and torch.equal(w8.view(torch.uint8), w_r.view(torch.uint8))
