"""topk_indices: both Triton selects (rank, bisect) pick the same set as torch.topk (ties at the threshold aside)."""

import pytest
import torch

from falqon_core.kernels import topk as tk
from falqon_core.kernels.topk import SELECTS, topk_indices, topk_indices_reference, topk_indices_triton


def as_set(indices: torch.Tensor) -> list[int]:
    return sorted(indices.tolist())


@pytest.mark.parametrize("select", SELECTS)
@pytest.mark.parametrize("n,k", [(1, 1), (7, 3), (100, 1), (100, 100), (1000, 64), (4096, 256), (5000, 17)])
def test_triton_select_picks_the_same_set_as_torch_topk(n, k, select):
    if select == "rank" and n > 2000:  # N^2 compares: minutes in the CPU interpreter; the GPU test covers them
        n = 1500
    values = torch.randn(n).abs() * torch.rand(n) * 100  # distinct with probability 1, like row L1 norms
    got = topk_indices_triton(values, k, select)
    assert got.dtype == torch.int64 and got.shape == (k,)
    assert as_set(got) == as_set(topk_indices_reference(values, k))
    if select == "rank":
        assert torch.equal(values[got], values[got].sort(descending=True).values), "rank: largest first"
    else:
        assert torch.equal(got, got.sort().values), "bisect: indices ascending"


def test_rank_select_counts_across_chunks_and_a_partial_last_chunk():
    # n not a multiple of the chunk (one partial chunk, two and three chunks), the largest in the first and the last
    chunk = tk._RANK_BLOCK_J
    for n in (chunk // 2 + 1, chunk + 3, 2 * chunk + 17):
        values = torch.rand(n)
        for kth_at in (0, n - 1):
            values[kth_at] = 2.0
            got = topk_indices_triton(values, 1, "rank")
            assert got.tolist() == [kth_at]
            values[kth_at] = 0.5


@pytest.mark.parametrize("select", SELECTS)
def test_negative_values_and_signed_zeros_are_ordered_as_floats(select):
    values = torch.tensor([-3.0, -0.0, 0.0, -1e-30, 2.0, -7.5, 1e-30, -2.0])
    for k in range(1, values.numel() + 1):
        got = topk_indices_triton(values, k, select)
        kth = values[got].min()
        assert (values[got] >= kth).all() and int((values > kth).sum()) <= k
        assert len(set(got.tolist())) == k
    assert as_set(topk_indices_triton(values, 3, select)) == [2, 4, 6]  # 2.0, 1e-30, then +0.0 over -0.0 by value


@pytest.mark.parametrize("select", SELECTS)
def test_ties_at_the_threshold_are_broken_by_lowest_index(select):
    values = torch.tensor([5.0, 1.0, 3.0, 3.0, 0.0, 3.0, 3.0])
    assert as_set(topk_indices_triton(values, 3, select)) == [0, 2, 3]
    assert as_set(topk_indices_triton(torch.zeros(50), 10, select)) == list(range(10))  # B = 0 before any gradient
    n = 2 * tk._RANK_BLOCK_J + 17  # ties spread over three chunks of the rank select
    assert as_set(topk_indices_triton(torch.zeros(n), n - 20, select)) == list(range(n - 20))


@pytest.mark.parametrize("select", SELECTS)
def test_nan_ranks_above_everything_as_in_torch_topk(select):
    values = torch.tensor([1.0, float("nan"), 9.0, float("-inf"), float("inf"), 2.0])
    for k in (1, 2, 3):
        assert as_set(topk_indices_triton(values, k, select)) == as_set(topk_indices_reference(values, k))


def test_default_select_is_rank_up_to_its_length_then_bisect(monkeypatch):
    monkeypatch.setattr(tk, "MAX_RANK_LENGTH", 100)  # the threshold, not its value, is under test (CPU time)
    short, long = torch.rand(100), torch.rand(101)
    got = topk_indices_triton(short, 10)
    assert torch.equal(short[got], short[got].sort(descending=True).values), "rank: largest first"
    got = topk_indices_triton(long, 10)
    assert torch.equal(got, got.sort().values) and as_set(got) == as_set(torch.topk(long, 10).indices), "bisect"
    with pytest.raises(ValueError, match="select must be one of"):
        topk_indices_triton(short, 10, "radix")


def test_k_zero_gives_an_empty_result_and_bad_arguments_raise():
    assert topk_indices_triton(torch.rand(10), 0).numel() == 0
    with pytest.raises(ValueError, match="k must be in"):
        topk_indices_triton(torch.rand(10), 11)
    with pytest.raises(ValueError, match="1-D fp32"):
        topk_indices_triton(torch.rand(4, 4), 2)
    with pytest.raises(ValueError, match="bisect select holds at most"):
        topk_indices_triton(torch.rand(tk.MAX_TRITON_LENGTH + 1), 2, "bisect")


def test_dispatcher_uses_torch_off_cuda_and_for_long_vectors(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the Triton select must not run here")

    monkeypatch.setattr(tk, "topk_indices_triton", fail)
    values = torch.rand(tk.MAX_TRITON_LENGTH + 1)
    assert as_set(topk_indices(values, 5)) == as_set(torch.topk(values, 5).indices)


@pytest.mark.gpu
@pytest.mark.parametrize("select", SELECTS)
@pytest.mark.parametrize("n", [1024, 4096, 11008, 14336, 32768])
def test_triton_select_on_cuda_matches_torch_topk_at_llama_widths(n, select):
    if select == "rank" and n > tk.MAX_RANK_LENGTH:
        pytest.skip("the rank select is not used past MAX_RANK_LENGTH")
    values = torch.randn(n, 64, device="cuda").abs().sum(dim=1)
    for k in (1, 10, 64, 256):
        assert as_set(topk_indices_triton(values, k, select)) == as_set(topk_indices_reference(values, k))


@pytest.mark.gpu
def test_triton_select_is_cuda_graph_capturable():
    values = torch.rand(4096, device="cuda")
    topk_indices_triton(values, 64)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = topk_indices_triton(values, 64)
    values.copy_(torch.rand(4096, device="cuda"))
    graph.replay()
    torch.cuda.synchronize()
    assert as_set(got) == as_set(torch.topk(values, 64).indices)
