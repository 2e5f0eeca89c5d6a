"""FALQON's layer against fp64 arithmetic, with every tolerance derived from the formats involved.

Error model used throughout (values in their real units, s = the tensor's dequant scale):
- rounding to e4m3: |err| <= max(2^-4 |v|, 2^-10 s)   (half an ulp: 3 mantissa bits; half the subnormal step 2^-9 s)
- rounding to e5m2: |err| <= max(2^-3 |v|, 2^-17 s)   (2 mantissa bits; subnormal step 2^-16 s)
- rounding to bf16: |err| <= 2^-8 |v|                  (8 significant bits: 7 stored + the implicit one)
- accumulation of K products (tests/bounds.py): |err| <= K u sum|a||b|. On CPU u = 2^-24, covered by
  2^-16 sum|a||b| for K <= 128 (which also covers the bf16 rounding of that accumulation error). On CUDA the
  fp8 tensor cores accumulate with u = 2^-13 (K 2^-13 (1 + 2^-8) sum|a||b|); the fp32-accumulating upcast GEMM
  that fp8.scaled_mm runs for K or N not multiples of 16 keeps u = 2^-24.
  The CUDA bound (2^-7 sum|a||b| at K = 64) is far looser than CPU's: it still rejects a wrong scale, a
  transposed or wrong operand (errors of the order of |result| ~ sum|a||b| / sqrt(K)), but not a swap of
  e4m3 and e5m2 in the same-math checks; the format choices are device-independent code, which the CPU
  runs of the same tests check at 2^-16.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bounds import gemm_accum_unit
from falqon_core import fp8
from falqon_core.kernels import melded_matmul, quantize_fp8
from falqon_core.methods import AdapterConfig, get_method
from falqon_core.methods.falqon import FalqonLinear, fp8_gemm_fits
from falqon_core.training import attach_falqon_hook

E4M3_REL, E4M3_SUB = 2.0**-4, 2.0**-10
E5M2_REL, E5M2_SUB = 2.0**-3, 2.0**-17
BF16 = 2.0**-8
ACCUM = 2.0**-16

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
# (K, N, rank, tokens): on CUDA, fp8 GEMMs everywhere at the first; ranks 12 and 8 and tokens 24 and 20 are
# padded by the layer (melded rows to N + 16, dB's reduction to 32); K = 40 sends the melded GEMM and N = 56
# the dX GEMM to fp8.scaled_mm's upcast GEMM (the layer does not pad K or N)
SHAPES = [(64, 96, 16, 32), (96, 48, 12, 24), (40, 56, 8, 20)]


def accum(K: int, N: int, device: str) -> float:
    """Accumulation bound per unit of sum|a||b| for a GEMM reducing over K into N columns (module docstring)."""
    fp8_gemm = device == "cuda" and fp8.scaled_mm_fits(K, -(-N // 16) * 16)
    return max(ACCUM, K * gemm_accum_unit(device, fp8_gemm) * (1 + BF16))


def make_layer(K: int, N: int, rank: int, bias: bool = True, **options) -> FalqonLinear:
    linear = nn.Linear(K, N, bias=bias)
    return FalqonLinear(linear, rank, **options)


def e4m3_err(v: torch.Tensor, scale: float) -> torch.Tensor:
    return torch.clamp(E4M3_REL * v.abs(), min=E4M3_SUB * scale)


def e5m2_err(v: torch.Tensor, scale: float) -> torch.Tensor:
    return torch.clamp(E5M2_REL * v.abs(), min=E5M2_SUB * scale)


def dequant64(data: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return data.double() * scale.double()


def assert_within(actual: torch.Tensor, expected: torch.Tensor, bound: torch.Tensor, what: str) -> None:
    err = (actual.double() - expected).abs()
    worst = (err - bound).max().item()
    assert worst <= 0, f"{what}: exceeds its bound by {worst:.3g} (max |err| {err.max().item():.3g})"


# ---------------------------------------------------------------- init


def test_falqon_init_melds_w_and_best_rank_r_error_approximation():
    """A8*s equals sqrt(S_r) V_r^T of the fp64 SVD of W's e4m3 error, row by row up to the SVD's sign,
    within e4m3 rounding (the fp32 SVD's own error is orders below 2^-4 and covered by a 2^-10 max|A| slack)."""
    K, N, r = 64, 96, 16
    linear = nn.Linear(K, N)
    layer = FalqonLinear(linear, r)
    w = linear.weight.detach().float()
    w8, s0 = fp8.quantize(w, fp8.E4M3)
    error = w.double() - dequant64(w8, s0)
    _, sv, vh = torch.linalg.svd(error, full_matrices=False)
    a_ref = sv[:r].sqrt().unsqueeze(1) * vh[:r]

    assert layer.melded.shape == (N + r, K) and layer.melded.dtype == fp8.E4M3
    assert layer.scale.dim() == 0 and layer.scale.dtype == torch.float32
    s = layer.scale.item()
    a = dequant64(layer.adapter_fp8, layer.scale)
    sign = torch.sign((a * a_ref).sum(dim=1, keepdim=True))
    assert_within(a, sign * a_ref, e4m3_err(a_ref, s) + 2.0**-10 * a_ref.abs().max(), "A vs fp64 SVD")
    # one scale for the stacked [W; A]: the scale of the whole stack, and W's rows within e4m3 of W
    assert s == pytest.approx(torch.cat([w, a_ref.float()]).abs().max().item() / 448.0, rel=2.0**-4)
    assert_within(dequant64(layer.backbone_fp8, layer.scale), w.double(), e4m3_err(w.double(), s), "W rows")
    assert torch.count_nonzero(layer.lora_B) == 0 and layer.lora_B.shape == (N, r)
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["lora_B"]


def test_falqon_rejects_rank_and_options_out_of_range():
    with pytest.raises(ValueError, match="allowed: 1..32"):
        make_layer(32, 48, 33)
    with pytest.raises(ValueError, match="topk=49 out of range; allowed: 1..48"):
        make_layer(32, 48, 4, topk=49)
    with pytest.raises(ValueError, match="allowed: topk, topk_after"):
        get_method("falqon").convert(nn.Linear(32, 48), AdapterConfig(rank=4, options={"top_k": 2}))


# ---------------------------------------------------------------- forward


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("K,N,r,M", SHAPES)
def test_falqon_forward_matches_fp64_of_same_fp8_operands(K, N, r, M, device):
    """out = e4m3(x).W8^T in fp64 of the same operands; bound: one bf16 output rounding (2^-8) + fp32
    accumulation. Against unquantized x.W^T: e4m3 rounding of x and W on top."""
    linear = nn.Linear(K, N).to(device)
    layer = FalqonLinear(linear, r)
    x = torch.randn(2, M // 2, K, device=device)
    out = layer(x).reshape(M, N)
    x2 = x.reshape(M, K)
    bias = layer.bias.double()

    x8, sx = quantize_fp8(x2, fp8.E4M3, "tensorwise")  # the layer's own quantizer: the same operands
    xq, wq = dequant64(x8, sx), dequant64(layer.backbone_fp8, layer.scale)
    same = xq @ wq.t()
    acc = accum(K, N + r, device) * xq.abs() @ wq.abs().t()  # the melded GEMM: K into N + r columns
    assert_within(out - layer.bias.float(), same, BF16 * same.abs() + acc, "vs same math")

    exact_x, exact_w = x2.double(), linear.weight.detach().double()
    exact = exact_x @ exact_w.t()
    dx, dw = e4m3_err(exact_x, sx.item()), e4m3_err(exact_w, layer.scale.item())
    quant = dx @ exact_w.abs().t() + exact_x.abs() @ dw.t() + dx @ dw.t()
    bound = quant + BF16 * (exact.abs() + quant) + acc
    assert_within(out.double() - bias, exact, bound, "vs unquantized x.W^T")


@pytest.mark.parametrize("K,N,r,M", SHAPES[:2])
def test_melded_gemm_o_a_equals_x8_a8(K, N, r, M):
    """The last r columns of the one melded GEMM are x8.A8^T: within bf16 output rounding (2^-8) + fp32 accumulation."""
    layer = make_layer(K, N, r)
    x8, sx = fp8.quantize(torch.randn(M, K), fp8.E4M3)
    out, o_a = melded_matmul(x8, sx, layer.melded, layer.scale, N)
    xq, aq = dequant64(x8, sx), dequant64(layer.adapter_fp8, layer.scale)
    ref = xq @ aq.t()
    r_pad = -(-r // 16) * 16  # the layer's zero rows of the melded matrix give zero columns of O_A
    assert out.shape == (M, N) and o_a.shape == (M, r_pad)
    assert int(o_a[:, r:].count_nonzero()) == 0
    assert_within(o_a[:, :r], ref, BF16 * ref.abs() + ACCUM * xq.abs() @ aq.abs().t(), "O_A")


# ---------------------------------------------------------------- backward


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("K,N,r,M", SHAPES)
def test_falqon_grads_match_fp64_within_format_bounds(K, N, r, M, device):
    """dX = e5m2(dY).W8 and dB = e5m2(dY)^T.e4m3(O_A).

    Same operands in fp64, plus accumulation (module docstring) and the fp32 scale multiplies (a few 2^-24
    of |result|, inside the 2^-16 accumulation term's slack): dX (fp32, like x) has no output rounding, dB
    (bf16, like B) one (2^-8), on the fp8 GEMM and on fp8.scaled_mm's upcast GEMM alike (fp32 product).
    Against exact dY and exact O_A = x8.A8^T: dY's e5m2 rounding (2^-3) and O_A's bf16 then e4m3
    rounding (<= max(2^-4 (1 + 2^-8) |o|, 2^-10 s) + 2^-8 |o|) on top. No gradient reaches W or A.
    """
    layer = make_layer(K, N, r).to(device)
    x = torch.randn(M, K, device=device, requires_grad=True)
    g = torch.randn(M, N, device=device)
    layer(x).backward(g)
    w8 = dequant64(layer.backbone_fp8, layer.scale)

    g8, sg = quantize_fp8(g, fp8.E5M2, "tensorwise")
    gq = dequant64(g8, sg)
    same_dx = gq @ w8
    acc_dx = accum(N, K, device) * gq.abs() @ w8.abs()  # dX: N into K columns
    assert_within(x.grad, same_dx, acc_dx, "dX vs same math")
    dg = e5m2_err(g.double(), sg.item())
    exact_dx = g.double() @ w8
    bound = dg @ w8.abs()
    bound = bound + BF16 * (exact_dx.abs() + bound) + acc_dx
    assert_within(x.grad, exact_dx, bound, "dX vs exact dY")

    # the O_A the forward saved: the melded GEMM's last r columns, cast to e4m3 by the layer's quantizer
    x8, sx = quantize_fp8(x.detach(), fp8.E4M3, "tensorwise")
    _, o_a_gemm = melded_matmul(x8, sx, layer.melded, layer.scale, N, fast_accum=layer.fast_accum)  # as the layer ran it
    oa8, soa = quantize_fp8(o_a_gemm.contiguous(), fp8.E4M3, "tensorwise")  # r_pad columns: amax unchanged
    oq = dequant64(oa8, soa)[:, :r]
    same_db = gq.t() @ oq
    db = layer.lora_B.grad
    assert db.shape == (N, r) and db.dtype == layer.lora_B.dtype
    acc_db = accum(M, r, device) * gq.abs().t() @ oq.abs()  # dB: M into r columns
    assert_within(db, same_db, BF16 * same_db.abs() + acc_db, "dB vs same math")

    xq, aq = dequant64(x8, sx), dequant64(layer.adapter_fp8, layer.scale)
    o_a = xq @ aq.t()  # exact M x r
    do = torch.clamp(E4M3_REL * (1 + BF16) * o_a.abs(), min=E4M3_SUB * soa.item()) + BF16 * o_a.abs()
    do = do + accum(K, N + r, device) * xq.abs() @ aq.abs().t()
    exact_db = g.double().t() @ o_a
    bound = dg.t() @ o_a.abs() + g.double().abs().t() @ do + dg.t() @ do
    bound = bound + BF16 * (exact_db.abs() + bound) + acc_db
    assert_within(db, exact_db, bound, "dB vs exact")
    assert not layer.melded.requires_grad and layer.melded.grad is None


def test_fp8_gemm_rule_is_torch_scaled_mm_multiple_of_16():
    assert fp8_gemm_fits(64, 96) and not fp8_gemm_fits(64, 12) and not fp8_gemm_fits(24, 16)


def test_cached_weight_t_gives_identical_grads_and_stays_in_sync():
    """cache_weight_t only changes where the dX GEMM reads W8^T from: bit-identical grads, and the copy
    follows every proxy update."""
    torch.manual_seed(1)
    linear = nn.Linear(64, 48)
    plain, cached = FalqonLinear(linear, 16), FalqonLinear(linear, 16, cache_weight_t=True)
    x, g = torch.randn(32, 64), torch.randn(32, 48)
    grads = []
    for layer in (plain, cached):
        xi = x.clone().requires_grad_(True)
        layer(xi).backward(g)
        grads.append((xi.grad, layer.lora_B.grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])
    for _ in range(3):
        with torch.no_grad():
            cached.lora_B.copy_(torch.randn(48, 16) * 8)
        cached.proxy_update()
        assert torch.equal(cached.weight_t.view(torch.uint8), cached.backbone_fp8.t().contiguous().view(torch.uint8))


# ---------------------------------------------------------------- proxy update


def test_proxy_update_matches_fp64_within_one_ulp():
    """Per step: rows = top-k of B by row L1 norm; W8[rows] = e4m3(W8[rows] + B[rows].A8) in units of the
    fixed scale. The fp64 chain, re-rounded to e4m3 each step, agrees within one e4m3 ulp per element
    (the kernel sums in fp32, so a sum near a rounding boundary may round the other way)."""
    K, N, r, k = 64, 96, 16, 5
    layer = make_layer(K, N, r, topk=k)
    scale0, a8_0 = layer.scale.clone(), layer.adapter_fp8.clone()
    ref = layer.backbone_fp8.double()
    a8 = layer.adapter_fp8.double()
    for step in range(4):
        with torch.no_grad():
            layer.lora_B.copy_(torch.randn(N, r) * 4)
        b = layer.lora_B.detach().double()
        before = layer.backbone_fp8.clone()
        rows = layer.proxy_update()

        ref_rows = torch.topk(b.abs().sum(dim=1), k).indices
        assert sorted(rows.tolist()) == sorted(ref_rows.tolist()), f"step {step}: rows differ"
        merged = ref[ref_rows] + b[ref_rows] @ a8
        ref[ref_rows] = fp8.saturating_cast(merged, fp8.E4M3).double()
        got = layer.backbone_fp8.double()
        one_ulp = fp8.ulp(torch.maximum(got.abs(), ref.abs()), fp8.E4M3)
        assert ((got - ref).abs() <= one_ulp).all(), f"step {step}: more than one e4m3 ulp from fp64"

        changed = (layer.backbone_fp8.view(torch.uint8) != before.view(torch.uint8)).any(dim=1).nonzero().flatten()
        assert set(changed.tolist()) <= set(rows.tolist()), f"step {step}: a row outside the top-k changed"
        assert changed.numel() > 0
        assert torch.count_nonzero(layer.lora_B) == 0
        assert torch.equal(layer.scale, scale0)
        assert torch.equal(layer.adapter_fp8.view(torch.uint8), a8_0.view(torch.uint8))


def test_proxy_update_saturates_instead_of_overflowing():
    """A row pushed past e4m3's max lands on +-448 (saturating cast), never NaN."""
    layer = make_layer(32, 48, 4, topk=1)
    with torch.no_grad():
        layer.lora_B[7] = 1e4
    layer.proxy_update()
    row = layer.backbone_fp8[7].float()
    assert not torch.isnan(row).any() and row.abs().max() == 448.0


def test_topk_schedule_switches_after_warmup_steps_and_is_reported():
    model = nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 32))
    method = get_method("falqon")
    model = method.convert(model, AdapterConfig(rank=8, options={"topk": 6, "topk_after": 2, "warmup_steps": 3}))
    assert method.describe(model) == {"topk": {"0": None, "2": None}}
    used = []
    for _ in range(5):
        for layer in (model[0], model[2]):
            with torch.no_grad():
                layer.lora_B.normal_()
        method.after_optimizer_step(model)
        used.append(method.describe(model)["topk"])
    assert [u["0"] for u in used] == [6, 6, 6, 2, 2] and used == [{"0": k, "2": k} for k in (6, 6, 6, 2, 2)]
    assert model[0].proxy_update().numel() == 2


def test_topk_defaults_to_rank_as_the_reference_ran():
    layer = make_layer(32, 48, 8)
    layer.proxy_update()
    assert layer.last_k == 8


# ---------------------------------------------------------------- method


def test_convert_swaps_only_targets_and_freezes_the_rest():
    model = nn.Sequential()
    model.add_module("q_proj", nn.Linear(32, 32))
    model.add_module("up_proj", nn.Linear(32, 64))
    method = get_method("falqon")
    model = method.convert(model, AdapterConfig(rank=4, target_modules=("q_proj",)))
    assert isinstance(model.q_proj, FalqonLinear) and isinstance(model.up_proj, nn.Linear)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["q_proj.lora_B"]
    assert isinstance(method.convert(nn.Linear(32, 16), AdapterConfig(rank=4)), FalqonLinear)


def test_memory_bytes_counts_melded_fp8_scale_bias_b_and_adamw_state():
    K, N, r = 64, 96, 16
    model = get_method("falqon").convert(nn.Sequential(nn.Linear(K, N)), AdapterConfig(rank=r))
    mem = get_method("falqon").memory_bytes(model)
    assert mem == {"weights": (N + r) * K + 4 + 2 * N, "adapters": 4 * N * r, "optimizer_state": 8 * N * r}


def test_step_cost_counts_melded_forward_dx_db_and_keeps_padded_odd_rank_and_tokens_in_fp8():
    K, N, M = 64, 96, 32
    cost = get_method("falqon").step_cost(K, N, 16, M)
    assert cost.gemm_flops == {"fp8": 2.0 * M * (N + 16) * K + 2.0 * M * K * N + 2.0 * N * 16 * M, "bf16": 0.0}
    odd = get_method("falqon").step_cost(K, N, 12, 77)  # the layer pads both: every GEMM stays fp8
    assert odd.gemm_flops == {"fp8": 2.0 * 77 * (N + 12) * K + 2.0 * 77 * K * N + 2.0 * N * 12 * 77, "bf16": 0.0}
    r = k = 16
    casts = 3 * M * K + 3 * M * N + 3 * M * r  # x, dY, O_A: bf16 read + fp8 write
    transposes = 2 * N * K  # W8 for the dX GEMM (dY8^T is not needed: db_path's fused cast + dB)
    sgd = 3 * 4 * N * r  # the timed step's SGD on B: read B, dB, write B (fp32, as the reference's B)
    update = 2 * 4 * N * r + r * K + 2 * k * K + 4 * k * r  # rank + zero B, read A8, W8 rows, B rows
    assert cost.quant_bytes == casts + transposes + sgd + update
    cached = get_method("falqon").step_cost(K, N, r, M, {"cache_weight_t": True, "topk": 4})
    assert cached.quant_bytes == casts + sgd + 2 * 4 * N * r + r * K + 3 * 4 * K + 4 * 4 * r


def test_step_cost_follows_the_gemms_and_transposes_the_layer_really_runs():
    """fp8.scaled_mm sends any GEMM off the multiple-of-16 grid to its bf16 upcast GEMM on CUDA: the layer pads
    r and M, not K or N (K = 40: the melded forward and dX are bf16, dB fp8); the backward transposes W8 on
    every path (dY8^T is never part of the floor: the fused cast + dB needs none); and the proxy update's k in steady state is `topk_after` (with warmup_steps = 0
    every update uses it)."""
    K, N, M, r = 64, 96, 32, 8
    method = get_method("falqon")
    cost = method.step_cost(K, N, r, M)
    assert fp8.scaled_mm_fits(K, N + r) is False  # unpadded it would not fit; the layer pads r to 16
    assert cost.gemm_flops == {"fp8": 2.0 * M * (N + r) * K + 2.0 * M * K * N + 2.0 * N * r * M, "bf16": 0.0}
    off_grid = method.step_cost(40, N, r, M)
    assert off_grid.gemm_flops == {"fp8": 2.0 * N * r * M, "bf16": 2.0 * M * (N + r) * 40 + 2.0 * M * 40 * N}
    casts = 3 * M * K + 3 * M * N + 3 * M * r
    transposes = 2 * N * K  # made although dX runs the upcast GEMM (the backward always transposes W8)
    sgd_and_update = 3 * 4 * N * r + 2 * 4 * N * r + r * K + 2 * r * K + 4 * r * r  # B fp32
    assert cost.quant_bytes == casts + transposes + sgd_and_update

    model = method.convert(nn.Linear(K, N), AdapterConfig(rank=16, options={"topk_after": 2}))
    with torch.no_grad():
        model.lora_B.normal_()
    assert model.proxy_update().numel() == 2  # the k every update uses
    base = method.step_cost(K, N, 16, M, {"topk_after": 2})
    full = method.step_cost(K, N, 16, M)
    assert full.quant_bytes - base.quant_bytes == (2 * 16 * K + 4 * 16 * 16) - (2 * 2 * K + 4 * 2 * 16)


# ---------------------------------------------------------------- training


def test_training_loop_with_adamw_and_hook_lowers_the_loss():
    """30 AdamW steps on a nearby linear target: B only ever acts through the proxy update into W8."""
    K, N, r = 64, 96, 16
    base = nn.Linear(K, N, bias=False)
    with torch.no_grad():
        target_w = base.weight + 0.05 * torch.randn(N, K)
    method = get_method("falqon")
    model = method.convert(nn.Sequential(base), AdapterConfig(rank=r))
    opt = torch.optim.AdamW(method.trainable_parameters(model), lr=0.1, weight_decay=0.0)
    handle = attach_falqon_hook(opt, model)
    x = torch.randn(128, K)
    y = x @ target_w.t()
    before = model[0].backbone_fp8.clone()
    losses = []
    for _ in range(30):
        loss = (model(x).float() - y).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        assert torch.count_nonzero(model[0].lora_B) == 0  # the hook ran: B merged and zeroed
    handle.remove()
    assert losses[-1] < 0.85 * losses[0], losses
    assert not torch.equal(before.view(torch.uint8), model[0].backbone_fp8.view(torch.uint8))
    assert model[0].updates_done == 30


def test_trainer_callback_runs_the_update_on_optimizer_step():
    """Through transformers' own CallbackHandler, with the model it passes to callbacks."""
    from transformers import TrainerControl, TrainerState
    from transformers.trainer_callback import CallbackHandler

    from falqon_core.training import FalqonTrainerCallback

    model = get_method("falqon").convert(nn.Sequential(nn.Linear(32, 48)), AdapterConfig(rank=4))
    with torch.no_grad():
        model[0].lora_B.normal_()
    handler = CallbackHandler([FalqonTrainerCallback()], model, None, None, None)
    handler.on_optimizer_step(None, TrainerState(), TrainerControl())
    assert model[0].last_k == 4 and torch.count_nonzero(model[0].lora_B) == 0


@pytest.mark.gpu
def test_falqon_training_step_with_proxy_update_is_cuda_graph_capturable():
    """fwd + bwd + AdamW + proxy update captured in one CUDA graph (no host sync); a replay merges B into W8."""
    method = get_method("falqon")
    model = method.convert(nn.Sequential(nn.Linear(64, 96)).cuda(), AdapterConfig(rank=16))
    opt = torch.optim.AdamW(method.trainable_parameters(model), lr=0.1, capturable=True)
    x = torch.randn(32, 64, device="cuda", requires_grad=True)
    g = torch.randn(32, 96, device="cuda")

    def step():
        opt.zero_grad(set_to_none=False)
        model(x).backward(g)
        opt.step()
        method.after_optimizer_step(model)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    before = model[0].backbone_fp8.clone()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.count_nonzero(model[0].lora_B) == 0
    assert not torch.equal(before.view(torch.uint8), model[0].backbone_fp8.view(torch.uint8))

