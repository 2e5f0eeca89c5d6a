"""FALQON's a_redraw option: after each flush (B zero), the next rows of A get fresh Kaiming-uniform entries.

Claims checked: only the scheduled rows of A8 change, cyclically; W8, its scale and B are what the flush alone
gives; the new entries are the fp64 uniform draw from the counter-based hash cast to e4m3 (bit for bit) and have
the RMS of A at init; bad values are refused; step_cost counts the bytes written.
"""

import math

import pytest
import torch

from falqon_core import fp8
from falqon_core.kernels.proxy_update import hash_uniform_reference


def _linear(k_in=64, n_out=48, std=0.02, seed=0):
    torch.manual_seed(seed)
    linear = torch.nn.Linear(k_in, n_out, bias=False)
    torch.nn.init.normal_(linear.weight, std=std)
    return linear


def _step(layers, seed):
    """The same B added to every layer, then each layer's proxy update."""
    g = torch.Generator().manual_seed(seed)
    b = (torch.randn(layers[0].out_features, layers[0].rank, generator=g) * 4).round() / 8  # exact sums (2^-3 grid)
    for layer in layers:
        with torch.no_grad():
            layer.lora_B.add_(b)
        layer.proxy_update()


def test_a_redraw_replaces_rows_cyclically_after_each_flush_and_leaves_w8_scale_and_b():
    from falqon_core.methods.falqon import FalqonLinear

    linear = _linear()
    opts = dict(a_scale="kaiming", keep_unmerged=True, flush_every=1)
    fixed, redrawn = FalqonLinear(linear, 8, **opts), FalqonLinear(linear, 8, a_redraw=3, **opts)
    a_init = redrawn.adapter_fp8.clone()
    expected_changed = [{0, 1, 2}, {3, 4, 5}, {6, 7, 0}]
    previous = a_init
    for step, rows in enumerate(expected_changed):
        _step([fixed, redrawn], seed=step)
        changed = {int(i) for i in (redrawn.adapter_fp8.float() != previous.float()).any(dim=1).nonzero()}
        assert changed <= rows and len(changed) >= 2, (step, changed)  # a row may redraw onto equal bytes: not all 3 need differ
        untouched = [i for i in range(8) if i not in rows]
        assert torch.equal(redrawn.adapter_fp8[untouched].view(torch.uint8), previous[untouched].view(torch.uint8))
        previous = redrawn.adapter_fp8.clone()
        if step == 0:  # the first flush merged B with the initial A in both layers: the same W8
            assert torch.equal(redrawn.backbone_fp8.view(torch.uint8), fixed.backbone_fp8.view(torch.uint8))
        assert (redrawn.lora_B == 0).all() and torch.equal(redrawn.scale, fixed.scale)
    assert redrawn.redraws_done == 9 and redrawn.flushes_done == 3


def test_redrawn_rows_are_the_fp64_uniform_draw_cast_to_e4m3_with_the_rms_of_a():
    """Each entry is e4m3(round-to-nearest((2u - 1) b)) for u = hash(seed, row K + col), b = sqrt(3) RMS(A8 at
    init): computed here in fp64 from the hash and compared byte for byte (2u - 1 and its product with b are exact
    or one fp32 rounding away, far inside half an e4m3 spacing except at ties, which the check allows by one ulp).
    The redrawn rows' RMS is b / sqrt(3) within the sampling error of K x rows uniform draws (5 sigma)."""
    from falqon_core.methods.falqon import FalqonLinear

    k_in, rank = 256, 16
    layer = FalqonLinear(_linear(k_in, 64, seed=1), rank, a_scale="kaiming", flush_every=1, a_redraw=rank, seed=5)
    bound = math.sqrt(3.0) * float(layer.adapter_fp8.double().pow(2).mean().sqrt())
    assert layer.redraw_bound == pytest.approx(bound, rel=1e-6)
    _step([layer], seed=0)
    offsets = torch.arange(rank, dtype=torch.int64)[:, None] * k_in + torch.arange(k_in)
    u = hash_uniform_reference(torch.tensor(5), offsets).double()
    expected = ((2 * u - 1) * bound).clamp(-448, 448)
    got = layer.adapter_fp8.double()
    ulp = fp8.ulp(expected.abs().clamp_min(2.0**-6), fp8.E4M3)
    assert ((got - expected).abs() <= ulp / 2 + 1e-12).all()
    nearest = expected.float().to(fp8.E4M3).double()
    assert (got == nearest).float().mean() > 0.99  # fp32 ties aside, exactly the nearest e4m3 value
    rms = float(got.pow(2).mean().sqrt())
    n = rank * k_in  # Var(x^2) for U(-b, b) is 4 b^4 / 45
    sigma_ms = math.sqrt(4 * bound**4 / 45 / n)
    assert abs(rms**2 - bound**2 / 3) <= 5 * sigma_ms + 2 * float(ulp.mean()) * bound, (rms, bound / math.sqrt(3))
    assert layer.redraw_seed.item() == 6  # advanced on the device: the next redraw draws new bits


def test_a_redraw_is_validated_and_counted_in_step_cost():
    from falqon_core.methods import falqon
    from falqon_core.methods.falqon import Falqon, FalqonLinear, parse_options

    assert parse_options({"a_redraw": 2, "flush_every": 4}) == {"a_redraw": 2, "flush_every": 4}
    for bad in (1.5, True):
        with pytest.raises(ValueError, match="a_redraw must be an integer"):
            parse_options({"a_redraw": bad})
    with pytest.raises(ValueError, match="needs flush_every > 0"):
        FalqonLinear(torch.nn.Linear(32, 32), 4, a_redraw=1)
    with pytest.raises(ValueError, match=r"a_redraw must be an integer in 0\.\.4"):
        FalqonLinear(torch.nn.Linear(32, 32), 4, a_redraw=5, flush_every=1)
    assert "a_redraw" in falqon.__doc__
    method = Falqon()
    flushed = method.step_cost(4096, 4096, 16, 4096, {"flush_every": 4}).quant_bytes
    redrawn = method.step_cost(4096, 4096, 16, 4096, {"flush_every": 4, "a_redraw": 2}).quant_bytes
    assert redrawn - flushed == pytest.approx(2 * 4096 / 4)  # 2 rows of A8 (K e4m3 bytes each) per flush
