"""topk_indices: the one-program Triton select picks the same set as torch.topk (ties at the threshold aside)."""

import pytest
import torch

from falqon_core.kernels import topk as tk
from falqon_core.kernels.topk import topk_indices, topk_indices_reference, topk_indices_triton


def as_set(indices: torch.Tensor) -> list[int]:
    return sorted(indices.tolist())


@pytest.mark.parametrize("n,k", [(1, 1), (7, 3), (100, 1), (100, 100), (1000, 64), (4096, 256), (5000, 17)])
def test_triton_select_picks_the_same_set_as_torch_topk(n, k):
    values = torch.randn(n).abs() * torch.rand(n) * 100  # distinct with probability 1, like row L1 norms
    got = topk_indices_triton(values, k)
    assert got.dtype == torch.int64 and got.shape == (k,)
    assert as_set(got) == as_set(topk_indices_reference(values, k))
    assert torch.equal(got, got.sort().values), "indices come out ascending"


def test_negative_values_and_signed_zeros_are_ordered_as_floats():
    values = torch.tensor([-3.0, -0.0, 0.0, -1e-30, 2.0, -7.5, 1e-30, -2.0])
    for k in range(1, values.numel() + 1):
        got = topk_indices_triton(values, k)
        kth = values[got].min()
        assert (values[got] >= kth).all() and int((values > kth).sum()) <= k
        assert len(set(got.tolist())) == k
    assert as_set(topk_indices_triton(values, 3)) == [2, 4, 6]  # 2.0, 1e-30, then +0.0 over -0.0 by value


def test_ties_at_the_threshold_are_broken_by_lowest_index():
    values = torch.tensor([5.0, 1.0, 3.0, 3.0, 0.0, 3.0, 3.0])
    assert as_set(topk_indices_triton(values, 3)) == [0, 2, 3]
    assert as_set(topk_indices_triton(torch.zeros(50), 10)) == list(range(10))  # B = 0 before any gradient


def test_nan_ranks_above_everything_as_in_torch_topk():
    values = torch.tensor([1.0, float("nan"), 9.0, float("-inf"), float("inf"), 2.0])
    for k in (1, 2, 3):
        assert as_set(topk_indices_triton(values, k)) == as_set(topk_indices_reference(values, k))


def test_k_zero_gives_an_empty_result_and_bad_arguments_raise():
    assert topk_indices_triton(torch.rand(10), 0).numel() == 0
    with pytest.raises(ValueError, match="k must be in"):
        topk_indices_triton(torch.rand(10), 11)
    with pytest.raises(ValueError, match="1-D fp32"):
        topk_indices_triton(torch.rand(4, 4), 2)


def test_dispatcher_uses_torch_off_cuda_and_for_long_vectors(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the Triton select must not run here")

    monkeypatch.setattr(tk, "topk_indices_triton", fail)
    values = torch.rand(tk.MAX_TRITON_LENGTH + 1)
    assert as_set(topk_indices(values, 5)) == as_set(torch.topk(values, 5).indices)


@pytest.mark.gpu
@pytest.mark.parametrize("n", [1024, 4096, 11008, 14336, 32768])
def test_triton_select_on_cuda_matches_torch_topk_at_llama_widths(n):
    values = torch.randn(n, 64, device="cuda").abs().sum(dim=1)
    for k in (1, 10, 64, 256):
        assert as_set(topk_indices_triton(values, k)) == as_set(topk_indices_reference(values, k))


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
