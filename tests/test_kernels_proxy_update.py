"""The Triton row-wise proxy update against its torch reference.

Exactness argument: both pick rows with the same torch ops (same rows). The merged value is
W8 + sum_j B[i, j] * A8[j, :]; with B on a grid of multiples of 2^-3 (|B| <= 1) and |A8| <= 8, every product
is a multiple of 2^-12 and every partial sum is below 2^10 in magnitude, so it needs at most 22
significant bits: exact in fp32 in any summation order, and the final round-to-nearest-even cast is then
identical, i.e. bit-exact. For general inputs the fp32 sums may differ in the last bits (order), which
moves the fp8 result by at most 1 e4m3 ulp, and only for values next to a rounding boundary.
"""

import pytest
import torch

from falqon_core import fp8
from falqon_core.kernels import proxy_update as pu
from falqon_core.kernels.proxy_update import proxy_update_, proxy_update_reference_, proxy_update_triton_


def exact_inputs(n, k_dim, r, k=0, device="cpu"):
    """W8 e4m3, A8 e4m3 with |A8| <= 8, B bf16 in multiples of 2^-3 with |B| <= 1: sums exact in fp32.

    k random rows of B get entries of magnitude >= 5/8, the others <= 4/8, so the top-k set is unambiguous
    (no ties at the k-th norm) and any top-k implementation picks the same rows.
    """
    w8 = (torch.randn(n, k_dim, device=device) * 64).clamp(-448, 448).to(fp8.E4M3)
    a8 = (torch.randn(r, k_dim, device=device) * 3).clamp(-8, 8).to(fp8.E4M3)
    b = torch.randint(-4, 5, (n, r), device=device) * 0.125
    top = torch.randperm(n, device=device)[:k]
    sign = torch.randint(0, 2, (k, r), device=device) * 2 - 1
    b[top] = sign * torch.randint(5, 9, (k, r), device=device) * 0.125
    return w8, a8, b.bfloat16()


def same_rows(a: torch.Tensor, b: torch.Tensor) -> bool:
    """topk(sorted=False) returns the rows in an unspecified order: compare as sets."""
    return torch.equal(a.sort().values, b.sort().values)


def run_both(w8, a8, b, k, **triton_kwargs):
    w_t, b_t, w_r, b_r = w8.clone(), b.clone(), w8.clone(), b.clone()
    rows_t = proxy_update_triton_(w_t, a8, b_t, k, **triton_kwargs)
    rows_r = proxy_update_reference_(w_r, a8, b_r, k)
    return (w_t, b_t, rows_t), (w_r, b_r, rows_r)


def fp8_ulps_apart(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| in units of the e4m3 ulp at the larger magnitude."""
    a, b = a.float(), b.float()
    return (a - b).abs() / fp8.ulp(torch.maximum(a.abs(), b.abs()), fp8.E4M3).float()


@pytest.mark.parametrize(
    "n,k_dim,r,k",
    # the merge's tl.dot runs over blocks of 32 ranks and at least 16 row slots: ranks below, at, across and
    # not a multiple of that block (40, 100, 256), and k below 16 rows (masked slots) and above it
    [(40, 300, 8, 5), (64, 129, 16, 17), (20, 64, 4, 20), (70, 200, 40, 33), (24, 130, 100, 3), (300, 64, 256, 40)],
)
def test_triton_update_is_bit_exact_when_sums_are_exact_in_fp32(n, k_dim, r, k):
    (w_t, b_t, rows_t), (w_r, b_r, rows_r) = run_both(*exact_inputs(n, k_dim, r, k), k)
    assert same_rows(rows_t, rows_r)
    assert torch.equal(w_t.view(torch.uint8), w_r.view(torch.uint8))
    assert (b_t == 0).all() and (b_r == 0).all()


@pytest.mark.parametrize("b_dtype", [torch.bfloat16, torch.float32])
def test_triton_update_is_within_one_fp8_ulp_for_general_inputs(b_dtype):
    w8 = (torch.randn(48, 200) * 64).to(fp8.E4M3)
    a8 = (torch.randn(16, 200) * 20).to(fp8.E4M3)
    b = (torch.randn(48, 16) * 0.3).to(b_dtype)
    (w_t, _, rows_t), (w_r, _, rows_r) = run_both(w8, a8, b, 12)
    assert same_rows(rows_t, rows_r)
    assert fp8_ulps_apart(w_t, w_r).max().item() <= 1.0


def test_only_the_selected_rows_change():
    w8, a8, b = exact_inputs(40, 96, 8)
    b[3] = 2.0  # the row with the largest L1 norm by far (every other entry is <= 1)
    w_t = w8.clone()
    rows = proxy_update_triton_(w_t, a8, b, 4)
    changed = (w_t.view(torch.uint8) != w8.view(torch.uint8)).any(dim=1).nonzero().flatten()
    assert 3 in rows.tolist()
    assert set(changed.tolist()) <= set(rows.tolist())


def test_merge_saturates_at_e4m3_max_instead_of_overflowing_to_nan():
    w8 = torch.full((4, 32), 448.0).to(fp8.E4M3)
    a8 = torch.full((2, 32), 8.0).to(fp8.E4M3)
    b = torch.ones(4, 2, dtype=torch.bfloat16)
    proxy_update_triton_(w8, a8, b, 4)
    assert (w8.float() == 448.0).all()


def test_k_zero_leaves_w_unchanged_and_zeroes_b():
    w8, a8, b = exact_inputs(16, 64, 4)
    w_t = w8.clone()
    rows = proxy_update_triton_(w_t, a8, b, 0)
    assert rows.numel() == 0
    assert torch.equal(w_t.view(torch.uint8), w8.view(torch.uint8)) and (b == 0).all()


def test_works_on_row_slices_of_one_melded_matrix_and_a_transposed_b():
    # the caller passes w8 = melded[:N], a8 = melded[N:] (views of one buffer) and may store B transposed
    n, k_dim, r = 32, 80, 8
    w8, a8, b = exact_inputs(n, k_dim, r, 6)
    melded = torch.cat([w8.view(torch.uint8), a8.view(torch.uint8)]).view(fp8.E4M3)
    b_t = b.t().contiguous().t()  # same values, column-major storage
    assert not b_t.is_contiguous()
    proxy_update_triton_(melded[:n], melded[n:], b_t, 6)
    w_r = w8.clone()
    proxy_update_reference_(w_r, a8, b.clone(), 6)
    assert torch.equal(melded[:n].view(torch.uint8), w_r.view(torch.uint8))
    assert torch.equal(melded[n:].view(torch.uint8), a8.view(torch.uint8)), "the adapter rows must not change"
    assert (b_t == 0).all()


def test_bad_arguments_raise_clear_errors():
    w8, a8, b = exact_inputs(16, 64, 4)
    with pytest.raises(ValueError, match="k must be in"):
        proxy_update_triton_(w8, a8, b, 17)
    with pytest.raises(ValueError, match="shapes must be"):
        proxy_update_triton_(w8, a8, b[:, :3], 2)


def test_dispatcher_uses_reference_off_cuda(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the Triton path must not run on CPU tensors")

    monkeypatch.setattr(pu, "proxy_update_triton_", fail)
    w8, a8, b = exact_inputs(16, 64, 4, 3)
    w_r = w8.clone()
    proxy_update_reference_(w_r, a8, b.clone(), 3)
    proxy_update_(w8, a8, b, 3)
    assert torch.equal(w8.view(torch.uint8), w_r.view(torch.uint8))


# ---------------------------------------------------------------- GPU (run by the lead on the H100)


@pytest.mark.gpu
@pytest.mark.parametrize("n,k_dim", [(4096, 4096), (11008, 4096), (4096, 11008)])
@pytest.mark.parametrize("software_round", [False, True])
def test_triton_update_on_cuda_is_bit_exact_at_llama_shapes(n, k_dim, software_round):
    inputs = exact_inputs(n, k_dim, 64, 64, device="cuda")
    (w_t, b_t, rows_t), (w_r, _, rows_r) = run_both(*inputs, 64, software_round=software_round)
    assert same_rows(rows_t, rows_r)
    assert torch.equal(w_t.view(torch.uint8), w_r.view(torch.uint8))
    assert (b_t == 0).all()


@pytest.mark.gpu
def test_triton_update_on_cuda_within_one_ulp_for_general_inputs():
    w8 = (torch.randn(4096, 4096, device="cuda") * 64).to(fp8.E4M3)
    a8 = (torch.randn(64, 4096, device="cuda") * 20).to(fp8.E4M3)
    b = torch.randn(4096, 64, device="cuda", dtype=torch.bfloat16) * 0.3
    (w_t, _, rows_t), (w_r, _, rows_r) = run_both(w8, a8, b, 64)
    assert same_rows(rows_t, rows_r)
    assert fp8_ulps_apart(w_t, w_r).max().item() <= 1.0


@pytest.mark.gpu
def test_proxy_update_is_cuda_graph_capturable():
    w8, a8, b = exact_inputs(4096, 4096, 64, 64, device="cuda")
    proxy_update_(w8.clone(), a8, b.clone(), 64)  # compile outside the capture
    w_g, b_g = w8.clone(), torch.zeros_like(b)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        proxy_update_(w_g, a8, b_g, 64)
    w_g.copy_(w8)
    b_g.copy_(b)
    graph.replay()
    torch.cuda.synchronize()
    w_r = w8.clone()
    proxy_update_reference_(w_r, a8, b.clone(), 64)
    assert torch.equal(w_g.view(torch.uint8), w_r.view(torch.uint8)) and (b_g == 0).all()
