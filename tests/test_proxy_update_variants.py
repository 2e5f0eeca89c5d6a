"""FALQON's proxy-update variants (stochastic rounding, merge="grid", keep_unmerged, lost-update counts):
the Triton kernel against its torch reference under TRITON_INTERPRET=1, and the statistics of the rounding.

Exactness: as in test_kernels_proxy_update, B on multiples of 2^-3 and |A8| <= 8 make every sum exact in fp32,
so the merged fp32 values are identical in both paths; the RNG is a counter-based integer hash computed the
same way in both, so for a given seed the stochastic results are bit-identical.
"""

import math

import pytest
import torch

from falqon_core import fp8
from falqon_core.kernels.proxy_update import (
    hash_uniform_reference,
    proxy_update_reference_,
    proxy_update_variant_reference_,
    proxy_update_variant_triton_,
    rounding_bits_reference,
    stochastic_round_reference,
)
from test_kernels_proxy_update import exact_inputs


def small_update_inputs(n=24, k_dim=160, r=4):
    """Weights of moderate size and deltas well below half an e4m3 spacing: nearest rounding loses them all."""
    sign = torch.randint(0, 2, (n, k_dim)) * 2 - 1
    w8 = (sign * (16 + 15 * torch.rand(n, k_dim))).to(fp8.E4M3)  # spacing 2 at 16 <= |w| < 32
    a8 = (torch.randn(r, k_dim) * 2).clamp(-8, 8).to(fp8.E4M3)
    b = torch.full((n, r), 0.125 / 16)  # |delta| <= 4 * 8 * 2^-7 = 0.25: far below half a spacing (1)
    b[n // 2 :] *= -1
    return w8, a8, b


def run_pair(w8, a8, b, k, **variant):
    w_t, b_t, w_r, b_r = w8.clone(), b.clone(), w8.clone(), b.clone()
    s_t, s_r = torch.zeros(3, dtype=torch.int64), torch.zeros(3, dtype=torch.int64)
    rows_t = proxy_update_variant_triton_(w_t, a8, b_t, k, stats=s_t, **variant)
    rows_r = proxy_update_variant_reference_(w_r, a8, b_r, k, stats=s_r, **variant)
    return (w_t, b_t, rows_t, s_t), (w_r, b_r, rows_r, s_r)


def test_hash_rng_is_uniform_and_seed_dependent():
    offsets = torch.arange(200_000)
    u1, u2 = hash_uniform_reference(torch.tensor(1), offsets), hash_uniform_reference(torch.tensor(2), offsets)
    assert 0.0 <= u1.min() and u1.max() < 1.0
    # mean of 2e5 uniforms: sd 0.29 / sqrt(2e5) = 6.5e-4; 6 sd
    assert abs(u1.mean().item() - 0.5) < 4e-3
    assert (u1 != u2).float().mean() > 0.99


@pytest.mark.parametrize("seed", [7, 123456789])
@pytest.mark.parametrize("merge,keep", [("topk", False), ("topk", True), ("grid", True), ("grid", False)])
def test_stochastic_kernel_equals_reference_for_a_given_seed(seed, merge, keep):
    w8, a8, b = exact_inputs(40, 300, 8, 5)
    (w_t, b_t, rows_t, s_t), (w_r, b_r, rows_r, s_r) = run_pair(
        w8, a8, b, 5, stochastic=True, seed=torch.tensor(seed), merge=merge, keep_unmerged=keep
    )
    assert torch.equal(rows_t.sort().values, rows_r.sort().values)
    assert torch.equal(w_t.view(torch.uint8), w_r.view(torch.uint8))
    assert torch.equal(b_t, b_r)
    assert torch.equal(s_t, s_r)


@pytest.mark.parametrize("merge,keep", [("topk", True), ("grid", True), ("grid", False)])
def test_nearest_variant_kernel_equals_reference(merge, keep):
    w8, a8, b = small_update_inputs()
    b[3] = 0.5  # one row whose update clears the grid
    (w_t, b_t, _, s_t), (w_r, b_r, _, s_r) = run_pair(w8, a8, b, 4, merge=merge, keep_unmerged=keep)
    assert torch.equal(w_t.view(torch.uint8), w_r.view(torch.uint8))
    assert torch.equal(b_t, b_r) and torch.equal(s_t, s_r)


def test_default_options_of_the_variant_equal_the_reference_update():
    w8, a8, b = exact_inputs(40, 300, 8, 5)
    w_v, w_r = w8.clone(), w8.clone()
    proxy_update_variant_triton_(w_v, a8, b.clone(), 5)
    proxy_update_reference_(w_r, a8, b.clone(), 5)
    assert torch.equal(w_v.view(torch.uint8), w_r.view(torch.uint8))


def test_stochastic_rounding_is_unbiased_within_a_hoeffding_bound():
    """Mean of n stochastically rounded updates (seeds 0..n-1) vs the exact W8 + B.A8, per entry.

    Each rounded value is lo or lo + ulp, so (value - lo) / ulp is a Bernoulli variable in [0, 1] and
    Hoeffding gives |mean - exact| <= ulp * sqrt(ln(2 / delta) / (2 n)) with probability >= 1 - delta per
    entry; delta = 1e-9 (over ~4000 entries: < 1e-5 for the whole test). Nearest rounding, which loses these
    sub-grid deltas, must fail the same bound (so the test can fail).
    """
    w8, a8, b = small_update_inputs()
    exact = w8.float() + b @ a8.float()
    n = 400
    total = torch.zeros_like(exact, dtype=torch.float64)
    for seed in range(n):
        bits = rounding_bits_reference(torch.tensor(seed), torch.arange(exact.shape[0]), exact.shape[1])
        total += stochastic_round_reference(exact, bits).double()
    mean = total / n
    ulp = fp8.ulp(exact, fp8.E4M3)
    bound = ulp * math.sqrt(math.log(2 / 1e-9) / (2 * n))
    assert ((mean - exact.double()).abs() <= bound).all()
    nearest = fp8.saturating_cast(exact, fp8.E4M3).double()
    # pooled over the m entries, in the direction of each update: independent draws, each of sd <= ulp / 2,
    # so the mean signed error in ulps has sd <= 0.5 / sqrt(n m); 6 sd. Nearest rounding is biased against
    # the update (it drops it), far outside that bound.
    direction = torch.sign(exact.double() - w8.double())
    pooled_bound = 6 * 0.5 / math.sqrt(n * exact.numel())

    def bias_in_ulps(values):
        return ((values - exact.double()) * direction / ulp).mean().item()

    assert abs(bias_in_ulps(mean)) <= pooled_bound
    assert bias_in_ulps(nearest) < -3 * pooled_bound


def test_stochastic_merge_through_the_kernel_is_unbiased():
    """The same claim through the Triton kernel (fewer draws: the interpreter is slow): n = 32, delta = 1e-6."""
    w8, a8, b = small_update_inputs(n=8, k_dim=64)
    exact = w8.float() + b @ a8.float()
    n = 32
    total = torch.zeros_like(exact, dtype=torch.float64)
    for seed in range(n):
        w = w8.clone()
        proxy_update_variant_triton_(w, a8, b.clone(), 8, stochastic=True, seed=torch.tensor(seed))
        total += w.double()
    bound = fp8.ulp(exact, fp8.E4M3) * math.sqrt(math.log(2 / 1e-6) / (2 * n))
    assert ((total / n - exact.double()).abs() <= bound).all()


def test_nearest_rounding_loses_sub_grid_updates_and_counts_them():
    w8, a8, b = small_update_inputs()
    stats = torch.zeros(3, dtype=torch.int64)
    w = w8.clone()
    proxy_update_variant_reference_(w, a8, b, 24, stats=stats)
    lost, counted, rows = stats.tolist()
    assert rows == 24 and counted > 0
    assert lost / counted > 0.7  # most deltas are below half a spacing


def test_grid_merge_keeps_b_of_rows_whose_update_does_not_clear():
    w8, a8, b = small_update_inputs()
    b[3] = 0.5
    b_before = b.clone()
    stats = torch.zeros(3, dtype=torch.int64)
    proxy_update_variant_triton_(w8.clone(), a8, b, 4, merge="grid", keep_unmerged=True, stats=stats)
    assert (b[3] == 0).all()
    kept = [i for i in range(b.shape[0]) if (b[i] != 0).any()]
    assert kept and all(torch.equal(b[i], b_before[i]) for i in kept)
    assert stats[2].item() == b.shape[0] - len(kept)


def test_keep_unmerged_zeroes_only_the_top_k_rows():
    w8, a8, b = exact_inputs(40, 96, 8, 5)
    rows = proxy_update_variant_triton_(w8.clone(), a8, b, 5, keep_unmerged=True)
    zero_rows = (b == 0).all(dim=1).nonzero().flatten()
    assert set(rows.tolist()) <= set(zero_rows.tolist())
    assert (b != 0).any()


def test_variant_arguments_are_checked():
    w8, a8, b = exact_inputs(16, 64, 4)
    with pytest.raises(ValueError, match="merge must be one of"):
        proxy_update_variant_reference_(w8, a8, b, 2, merge="all")
    with pytest.raises(ValueError, match="needs `seed`"):
        proxy_update_variant_triton_(w8, a8, b, 2, stochastic=True)


# ---------------------------------------------------------------- as options of the falqon method


def test_falqon_b_and_its_gradient_are_fp32_as_in_the_reference():
    from falqon_core.methods.falqon import FalqonLinear

    layer = FalqonLinear(torch.nn.Linear(32, 48), 4, dtype=torch.bfloat16)
    assert layer.lora_B.dtype == torch.float32
    layer(torch.randn(5, 32, dtype=torch.bfloat16)).float().sum().backward()
    assert layer.lora_B.grad.dtype == torch.float32


def test_falqon_options_select_the_variant_and_track_lost_updates():
    from falqon_core.methods.falqon import FalqonLinear, parse_options

    opts = parse_options({"rounding": "stochastic", "keep_unmerged": True, "merge": "topk", "seed": 3})
    layer = FalqonLinear(torch.nn.Linear(64, 48), 4, **opts)
    layer.track_lost = True
    with torch.no_grad():
        layer.lora_B.fill_(1e-4)
    layer.proxy_update()
    assert layer.rounding_seed.item() == 4  # advanced on the device
    lost, counted, rows = layer.lost_stats.tolist()
    assert rows == 4 and counted == 4 * 64 and lost > 0.9 * counted
    assert (layer.lora_B == 0).all(dim=1).sum().item() == 4  # only the merged rows were zeroed
    with pytest.raises(ValueError, match="rounding must be one of"):
        parse_options({"rounding": "up"})
    with pytest.raises(ValueError, match="merge must be one of"):
        parse_options({"merge": "all"})


# ---------------------------------------------------------------- a_scale: A rescaled to a Kaiming LoRA A's RMS


def _linear(k_in, n_out, std, outlier=None):
    linear = torch.nn.Linear(k_in, n_out, bias=False)
    torch.nn.init.normal_(linear.weight, std=std)
    if outlier is not None:
        with torch.no_grad():
            linear.weight[0, 0] = outlier  # sets max|W| (and so the e4m3 scale) well above the Kaiming bound
    return linear


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("k_in,n_out,std,outlier", [(256, 96, 0.02, 1.0), (64, 48, 0.02, None)])
def test_kaiming_a_scale_leaves_w8_and_its_scale_bit_identical(k_in, n_out, std, outlier, seed):
    """Seed 0 at 64 x 48 caps A, and the capped max|A| once rounded one fp32 ulp above max|W| (the scale moved)."""
    from falqon_core.methods.falqon import FalqonLinear

    torch.manual_seed(seed)
    linear = _linear(k_in, n_out, std, outlier)
    svd, kaiming = FalqonLinear(linear, 8), FalqonLinear(linear, 8, a_scale="kaiming")
    assert torch.equal(svd.backbone_fp8.view(torch.uint8), kaiming.backbone_fp8.view(torch.uint8))
    assert torch.equal(kaiming.scale, fp8.tensorwise_scale(linear.weight.float()))
    assert svd.adapter_gain == 1.0 and not svd.adapter_capped


def test_kaiming_a_rows_have_peft_lora_a_rms_within_half_an_e4m3_ulp():
    """Uncapped (max|W| = 1 >> 1/sqrt(K)): every row of A8 . s has RMS 1/sqrt(3K), up to the e4m3 rounding of its
    entries (half an ulp each, at their own magnitude), and points where the SVD row points (fp64 check)."""
    from falqon_core.methods.falqon import FalqonLinear, kaiming_rms_rows

    k_in = 256
    linear = _linear(k_in, 96, 0.02, outlier=1.0)
    layer = FalqonLinear(linear, 8, a_scale="kaiming", init_svd="exact")
    assert not layer.adapter_capped and layer.adapter_gain > 1.5  # the SVD rows are ~3x smaller here
    s = layer.scale.double()
    a = layer.adapter_fp8.double() * s
    half_ulp = fp8.ulp(layer.adapter_fp8.double(), fp8.E4M3) * s / 2
    bound = half_ulp.pow(2).mean(dim=1).sqrt()  # |rms(q) - rms(x)| <= rms(q - x) <= rms(half ulps)
    rms = a.pow(2).mean(dim=1).sqrt()
    assert ((rms - 1 / math.sqrt(3 * k_in)).abs() <= bound).all(), (rms, bound)

    rows = torch.randn(8, k_in) * torch.logspace(-3, -1, 8)[:, None]
    rescaled, gain, capped = kaiming_rms_rows(rows, weight_amax=10.0)
    expected = rows.double() / rows.double().pow(2).mean(dim=1, keepdim=True).sqrt() / math.sqrt(3 * k_in)
    # fp32 arithmetic: a few roundings of 2^-24 relative each
    assert torch.allclose(rescaled.double(), expected, rtol=8 * 2.0**-24, atol=0) and not capped
    assert gain == pytest.approx(float(expected.pow(2).mean().sqrt() / rows.double().pow(2).mean().sqrt()), rel=1e-6)


def test_kaiming_a_scale_is_capped_at_max_w_and_says_so():
    """K = 64, W ~ N(0, 0.02): the Kaiming rows would exceed max|W| (1/sqrt(64) = 0.125 > ~0.06), so A is scaled
    down to max|A| = max|W| (to within e4m3 rounding) and the layer records the cap."""
    from falqon_core.methods.falqon import FalqonLinear

    linear = _linear(64, 48, 0.02)
    layer = FalqonLinear(linear, 8, a_scale="kaiming")
    assert layer.adapter_capped and layer.adapter_gain > 1.0
    assert layer.adapter_fp8.float().abs().max() <= layer.backbone_fp8.float().abs().max()
    assert layer.adapter_fp8.float().abs().max() >= 448 * (1 - fp8.relative_ulp(fp8.E4M3))


def test_a_scale_option_is_validated_and_documented():
    from falqon_core.methods import falqon
    from falqon_core.methods.falqon import FalqonLinear, parse_options

    assert parse_options({"a_scale": "kaiming"}) == {"a_scale": "kaiming"}
    with pytest.raises(ValueError, match="a_scale must be one of svd, kaiming"):
        parse_options({"a_scale": "big"})
    with pytest.raises(ValueError, match="a_scale"):
        FalqonLinear(torch.nn.Linear(32, 32), 4, a_scale="big")
    assert "a_scale" in falqon.__doc__ and "1/sqrt(3K)" in falqon.__doc__


# ---------------------------------------------------------------- flush_every: all of B into W8 every T updates


def test_flush_merges_all_of_b_like_the_reference_update_with_k_n():
    """Update 2 of flush_every = 2 is the top-k keep_unmerged update, then a merge of all that is left of B:
    W8 bit-identical to the torch references run in that order; B zero after it; A untouched."""
    from falqon_core.methods.falqon import FalqonLinear

    layer = FalqonLinear(_linear(64, 48, 0.05), 8, keep_unmerged=True, flush_every=2)
    w8, a8 = layer.backbone_fp8.clone(), layer.adapter_fp8.clone()
    b_ref = torch.zeros(48, 8)
    for step in range(2):
        b = (torch.randn(48, 8) * 4).round() / 8  # multiples of 2^-3: every sum exact in fp32 (module docstring)
        with torch.no_grad():
            layer.lora_B.add_(b)
        b_ref += b
        layer.proxy_update()
        proxy_update_variant_reference_(w8, a8, b_ref, 8, keep_unmerged=True)
        if step == 0:  # no flush yet: the top-k rows merged, the other rows of B kept
            assert torch.equal(layer.backbone_fp8.view(torch.uint8), w8.view(torch.uint8))
            assert torch.equal(layer.lora_B.detach(), b_ref) and layer.flushes_done == 0
    proxy_update_reference_(w8, a8, b_ref, 48)
    assert layer.flushes_done == 1
    assert torch.equal(layer.backbone_fp8.view(torch.uint8), w8.view(torch.uint8))
    assert (layer.lora_B == 0).all() and torch.equal(layer.adapter_fp8.view(torch.uint8), a8.view(torch.uint8))


def test_flush_every_is_validated_and_counted_in_step_cost():
    from falqon_core.methods.falqon import Falqon, FalqonLinear, parse_options

    assert parse_options({"flush_every": 4}) == {"flush_every": 4}
    for bad in (2.5, True):
        with pytest.raises(ValueError, match="flush_every must be an integer"):
            parse_options({"flush_every": bad})
    with pytest.raises(ValueError, match="flush_every must be an integer >= 0"):
        FalqonLinear(torch.nn.Linear(32, 32), 4, flush_every=-1)
    method = Falqon()
    base = method.step_cost(4096, 4096, 16, 4096, {}).quant_bytes
    flushed = method.step_cost(4096, 4096, 16, 4096, {"flush_every": 4}).quant_bytes  # options in, no state
    # a flush reads and writes N x K e4m3 bytes, reads A8 (r x K) and reads and zeroes B (N x r fp32), every 4th step
    assert flushed - base == pytest.approx((2 * 4096 * 4096 + 16 * 4096 + 2 * 4 * 4096 * 16) / 4)


def test_flush_every_one_is_the_whole_update_without_a_top_k_merge_first():
    """flush_every = 1: every row of B merged every update (W8 bit-identical to one merge of all N rows by the
    torch reference), B zero, k reported as N, and the floor's bytes without the top-k update's."""
    from falqon_core.methods.falqon import Falqon, FalqonLinear

    layer = FalqonLinear(_linear(64, 48, 0.05), 8, flush_every=1)
    w8, a8 = layer.backbone_fp8.clone(), layer.adapter_fp8.clone()
    for _ in range(2):
        b = (torch.randn(48, 8) * 4).round() / 8  # multiples of 2^-3: every sum exact in fp32
        with torch.no_grad():
            layer.lora_B.copy_(b)
        rows = layer.proxy_update()
        proxy_update_reference_(w8, a8, b.clone(), 48)
        assert torch.equal(layer.backbone_fp8.view(torch.uint8), w8.view(torch.uint8))
        assert (layer.lora_B == 0).all() and rows.tolist() == list(range(48)) and layer.last_k == 48
    assert layer.flushes_done == 2 and layer.updates_done == 2
    method = Falqon()
    n, k_dim, r = 4096, 4096, 16
    base = method.step_cost(n, k_dim, r, 4096, {}).quant_bytes
    every = method.step_cost(n, k_dim, r, 4096, {"flush_every": 1}).quant_bytes
    top_k_update = 2 * 4 * n * r + r * k_dim + 2 * r * k_dim + 4 * r * r  # B ranked + zeroed, A8, k rows of W8, k rows of B
    flush = 2 * n * k_dim + r * k_dim + 2 * 4 * n * r
    assert every - base == pytest.approx(flush - top_k_update)
