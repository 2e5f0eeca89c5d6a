"""grad_prepass: FALQON's first backward launch (dY's partial amax + W8's transpose + O_A's cast) against the
separate launches it replaces (partial_amax, transpose_fp8, the tensorwise cast), under the interpreter on CPU and
on the GPU when marked; and the falqon layer's gradients with and without it, bit for bit."""

import pytest
import torch

from falqon_core import fp8
from falqon_core.kernels import grad_prepass as gp
from falqon_core.kernels.quantize import partial_amax
from falqon_core.kernels.quantize_configs import FlatConfig, TileConfig
from falqon_core.kernels.transpose import transpose_fp8_reference
from falqon_steps import falqon_steps
from test_cast_db import same_bytes
from test_kernels_transpose import random_bytes


def prepass(dy, weight):
    """The launch without O_A, at the tuned configs grad_prepass_oa uses: (dY's partial amaxes, W8^T)."""
    return gp.launch_grad_prepass(dy, weight, *gp.prepass_configs(dy, weight))[:2]


def garbage_empty(monkeypatch):
    """torch.empty that returns NaN / 7-filled tensors, so a kernel that skips a store leaves visible garbage."""
    real = torch.empty

    def empty(*shape, **kw):
        t = real(*shape, **kw)
        return t.fill_(7) if not t.is_floating_point() else t.fill_(float("nan"))

    monkeypatch.setattr(torch, "empty", empty)


@pytest.mark.parametrize("m,n,w_shape", [(37, 48, (100, 37)), (64, 256, (256, 64)), (3, 5, (1, 1))],
                         ids=["odd", "aligned", "tiny"])
def test_one_launch_equals_the_separate_launches(monkeypatch, m, n, w_shape):
    """partials bit-identical to partial_amax's (same config: same per-program maxima), W8^T byte-identical to the
    reference transpose for all 256 encodings (NaNs included); outputs start as garbage, so a skipped store shows."""
    g = torch.Generator().manual_seed(m)
    dy = (torch.randn(m, n, generator=g) * 0.03).bfloat16()
    dy[m // 2, n // 3] = -5.0  # the amax sits in one program's blocks
    weight = random_bytes(*w_shape, fp8.E4M3)
    want_partials = partial_amax(dy.view(-1))
    garbage_empty(monkeypatch)
    partials, weight_t = prepass(dy, weight)
    assert torch.equal(partials, want_partials) and float(partials.max()) == 5.0
    assert same_bytes(weight_t, transpose_fp8_reference(weight)) and weight_t.is_contiguous()


def test_small_tiles_and_few_amax_programs_cover_everything():
    """A tile smaller than the weight and fewer amax programs than blocks: every tile and block is visited."""
    dy = torch.randn(129, 33).bfloat16()
    weight = random_bytes(70, 45, fp8.E5M2)
    partials, weight_t, _, _ = gp.launch_grad_prepass(dy, weight, FlatConfig(block=64, programs_per_sm=1),
                                                      TileConfig(block_r=16, block_c=32, programs_per_sm=None))
    assert float(partials.max()) == float(dy.float().abs().max())
    assert same_bytes(weight_t, transpose_fp8_reference(weight))


@pytest.mark.parametrize("m,r_pad", [(37, 16), (2048, 48), (5, 112)], ids=["odd", "llama", "wide-r"])
def test_o_a_cast_programs_equal_the_cast_launch_and_leave_the_other_outputs_alone(monkeypatch, m, r_pad):
    """grad_prepass_oa: O_A8^T and its scale bit-identical to the cast launch over the same copy (and so to
    quantize_transpose_fp8 of O_A, tests/test_kernels_quantize_transpose.py), dY's partials and W8^T as without it."""
    from falqon_core.kernels.quantize import cast_tensorwise_from_partials
    from falqon_core.kernels.quantize_transpose import amax_copy_transpose_triton

    g = torch.Generator().manual_seed(m)
    dy = (torch.randn(m, 64, generator=g) * 0.03).bfloat16()
    weight = random_bytes(64, 48, fp8.E4M3)
    o_a = (torch.randn(m, 96 + r_pad, generator=g) * 4).bfloat16()[:, 96:]
    o_a[m // 2, 1] = 700.0  # saturates nothing: e4m3's scale maps the amax to 448
    oa_t, oa_partials = amax_copy_transpose_triton(o_a, 16)
    want8, want_scale = cast_tensorwise_from_partials(oa_t, oa_partials, fp8.E4M3)
    want_partials, want_wt = prepass(dy, weight)
    garbage_empty(monkeypatch)
    partials, weight_t, oa8_t, oa_scale = gp.grad_prepass_oa(dy, weight, oa_t, oa_partials)
    assert same_bytes(oa8_t, want8) and torch.equal(oa_scale, want_scale)
    assert torch.equal(partials, want_partials) and same_bytes(weight_t, want_wt)


def test_bad_inputs_say_what_is_wrong():
    dy = torch.randn(8, 16).bfloat16()
    weight = random_bytes(4, 4, fp8.E4M3)
    with pytest.raises(ValueError, match="contiguous"):
        prepass(dy.t(), weight)
    with pytest.raises(ValueError, match="1-byte"):
        prepass(dy, torch.zeros(4, 4))
    with pytest.raises(ValueError, match="programs_per_sm"):
        gp.launch_grad_prepass(dy, weight, FlatConfig(), TileConfig())
    with pytest.raises(ValueError, match="O_A"):
        gp.launch_grad_prepass(dy, weight, FlatConfig(), TileConfig(programs_per_sm=None), torch.zeros(16, 8), None)
    with pytest.raises(ValueError, match="O_A"):
        gp.grad_prepass_oa(dy, weight, torch.zeros(8, 16).t(), torch.zeros(1))


@pytest.mark.gpu
@pytest.mark.parametrize("m,n,k", [(2048, 4096, 4096), (3000, 1024, 4096), (2048, 11008, 4096), (512, 4096, 11008)])
def test_gpu_prepass_equals_the_separate_launches(m, n, k):
    from falqon_core.kernels.quantize import cast_tensorwise_from_partials
    from falqon_core.kernels.quantize_transpose import amax_copy_transpose

    dy = (torch.randn(m, n, device="cuda") * 0.03).bfloat16()
    weight = random_bytes(n, k, fp8.E4M3, device="cuda")
    partials, weight_t = prepass(dy, weight)
    assert torch.equal(partials, partial_amax(dy.view(-1)))
    assert same_bytes(weight_t, transpose_fp8_reference(weight))
    oa_t, oa_partials = amax_copy_transpose((torch.randn(m, n + 48, device="cuda") * 3).bfloat16()[:, n:], 16)
    partials_oa, weight_t_oa, oa8_t, oa_scale = gp.grad_prepass_oa(dy, weight, oa_t, oa_partials)
    want8, want_scale = cast_tensorwise_from_partials(oa_t, oa_partials, fp8.E4M3)
    assert same_bytes(oa8_t, want8) and torch.equal(oa_scale, want_scale)
    assert torch.equal(partials_oa, partials) and same_bytes(weight_t_oa, weight_t)


@pytest.mark.gpu
@pytest.mark.parametrize("n,rank,m", [(4096, 64, 2048), (1024, 40, 2048), (512, 24, 3000)],
                         ids=["fused-db", "transposed-db", "odd"])
def test_gpu_falqon_grads_are_the_same_bits_with_and_without_the_prepass(monkeypatch, n, rank, m):
    """The prepass changes where W8^T, dY's amax and O_A's cast are computed, not what: dX and dB bit-identical."""
    from falqon_core.methods import falqon as fm

    calls = []
    real = fm.grad_prepass_oa
    monkeypatch.setattr(fm, "grad_prepass_oa", lambda *a: calls.append(1) or real(*a))
    *_, results = falqon_steps(
        n, rank, m, [lambda on=on: monkeypatch.setattr(fm, "PREPASS", on) for on in (False, True)]
    )
    grads = [(dx, db) for _, dx, db in results]
    assert len(calls) == 1  # the second backward took the one launch, the first the separate ones
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])
