"""The baseline methods compute the math they claim: forward output, adapter gradients and dX, checked
against fp64 on one K -> N layer.

Every reference is an fp64 value with a worst-case error bound carried through the same sequence of
operations the method runs (`Bounded`): each rounding to a format with unit roundoff u adds u * |value|
(bf16: u = 2^-8; e4m3: 2^-4; e5m2: 2^-3; a tensorwise fp8 cast also adds half its smallest subnormal
times the scale); each GEMM adds fp32 accumulation, K * 2^-24 * |a|.|b|, and propagates its operands'
errors. A method passes when every element of its result lies within that bound of the fp64 value.
LoRA scaling alpha/r is 2 in these tests, an exact binary multiply.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from bounds import gemm_accum_unit

from falqon_core import fp8
from falqon_core.convert import convert_model
from falqon_core.methods import AdapterConfig, MethodUnavailable, get_method
from falqon_core.methods._lora_common import lora_layers

BF16 = torch.bfloat16
U_BF16 = 2.0**-8  # bf16: 8 significant bits
U_FP32 = 2.0**-24
SCALING = 2.0  # lora_alpha / r in every test here
HOEFFDING_LAMBDA = 5.0
TOKENS = 32
SHAPES = [(64, 96), (128, 48)]  # (K, N): wide and tall
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
FP8_FORMAT = {fp8.E4M3: (448.0, 2.0**-4, 2.0**-9), fp8.E5M2: (57344.0, 2.0**-3, 2.0**-16)}  # max, u, subnormal step


@pytest.fixture(autouse=True)
def _fp32_accumulation_in_cublas():
    """cuBLAS may sum bf16 split-K partials in bf16 by default; the bounds here assume fp32 accumulation."""
    matmul_flags = torch.backends.cuda.matmul
    saved = matmul_flags.allow_bf16_reduced_precision_reduction
    matmul_flags.allow_bf16_reduced_precision_reduction = False
    yield
    matmul_flags.allow_bf16_reduced_precision_reduction = saved


# ---------------------------------------------------------------------------------------------------------
# fp64 values with error bounds


@dataclass
class Bounded:
    """An fp64 tensor `val` and, per element, a worst-case bound `err` on |computed - val| and a Hoeffding
    scale `sd`: sqrt of the sum of squared bounds of the independent rounding errors that make up the
    error, so |computed - val| <= lam * sd except with probability 2 exp(-lam^2 / 2)."""

    val: torch.Tensor
    err: torch.Tensor
    sd: torch.Tensor | None = None

    def __post_init__(self):
        if self.sd is None:
            self.sd = self.err.clone()

    @classmethod
    def exact(cls, t: torch.Tensor) -> Bounded:
        v = t.detach().double()
        return cls(v, torch.zeros_like(v))

    @property
    def T(self) -> Bounded:
        return Bounded(self.val.T, self.err.T, self.sd.T)

    def magnitude(self) -> torch.Tensor:
        return self.val.abs() + self.err


def matmul(a: Bounded, b: Bounded, u_acc: float = U_FP32) -> Bounded:
    """a @ b with error propagation (|da||b| + |a||db| + |da||db|) and accumulation error.

    Worst case (`err`): K * u_acc * |a|.|b| (each of the K additions errs by at most u_acc times a partial
    sum, itself at most |a|.|b|). Hoeffding scale (`sd`): the K addition errors are K more independent,
    zero-mean terms bounded by u_acc |a|.|b| each, so they add K (u_acc |a|.|b|)^2 to the variance, like
    every other rounding here. Zero-mean: round-to-nearest in fp32 (the probabilistic analysis of Higham
    and Mary, SIAM J. Sci. Comput. 2019); on Hopper's fp8 tensor cores a truncation of each product's low
    bits, whose sign is the product's sign, a fair coin independent of the magnitudes for the symmetric
    random operands here. (Adding the worst case K u_acc |a|.|b| to sd instead made ||sd||_F over half of
    ||value||_F on CUDA, where u_acc = 2^-13: dx at K, N = 64, 96, a norm bound that no longer says much.)
    """
    k = a.val.shape[-1]
    mag = a.magnitude() @ b.magnitude()
    err = a.err @ b.val.abs() + a.val.abs() @ b.err + a.err @ b.err + k * u_acc * mag
    var = a.sd.square() @ b.val.square() + a.val.square() @ b.sd.square() + a.sd.square() @ b.sd.square()
    var = var + k * (u_acc * mag).square()
    return Bounded(a.val @ b.val, err, var.sqrt())


def rounded(a: Bounded, u: float = U_BF16) -> Bounded:
    """One rounding to a format with unit roundoff u (normal range)."""
    step = u * a.magnitude()
    return Bounded(a.val, a.err + step, (a.sd.square() + step.square()).sqrt())


def added(a: Bounded, b: Bounded) -> Bounded:
    """Sum; the two errors may share roundings (both paths see the same x), so their scales add linearly."""
    return Bounded(a.val + b.val, a.err + b.err, a.sd + b.sd)


def scaled(a: Bounded, s: float) -> Bounded:
    return Bounded(a.val * s, a.err * abs(s), a.sd * abs(s))


def fp8_cast_bound(a: Bounded, dtype: torch.dtype) -> Bounded:
    """A dynamic tensorwise fp8 cast: u * |x| in the normal range, half a subnormal step times the scale
    (scale <= max|x| / fp8_max) below it, 2 * 2^-24 relative for the fp32 scale and its reciprocal."""
    fmax, u, sub = FP8_FORMAT[dtype]
    scale = a.magnitude().max() / fmax
    step = (u + 2 * U_FP32) * a.magnitude() + 0.5 * sub * scale
    return Bounded(a.val, a.err + step, (a.sd.square() + step.square()).sqrt())


def torchao_fp8_round(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The value torchao's dynamic tensorwise cast gives t, in fp64: scale = fp8_max / amax (fp64 -> fp32),
    data = saturate(t_fp32 * scale) in fp8, value = data / scale."""
    fmax = FP8_FORMAT[dtype][0]
    amax = t.detach().abs().max().double()
    scale = (fmax / torch.clamp(amax, min=1e-12)).float()
    data = torch.clamp(t.detach().float() * scale, -fmax, fmax).to(dtype)
    return data.double() / scale.double()


class Cast:
    """How a linear layer rounds its GEMM operands before the matmul."""

    def fwd(self, ref: Bounded, actual: torch.Tensor) -> Bounded:
        return ref

    def grad(self, ref: Bounded, actual: torch.Tensor) -> Bounded:
        return ref


class Fp8CastBound(Cast):
    """fp8 linear vs the unquantized math: operands carry the e4m3 (inputs, weights) / e5m2 (grads) error."""

    def fwd(self, ref, actual):
        return fp8_cast_bound(ref, fp8.E4M3)

    def grad(self, ref, actual):
        return fp8_cast_bound(ref, fp8.E5M2)


class Fp8CastExact(Cast):
    """fp8 linear vs the fp64 product of fp8-rounded operands: the operand is the actual bf16 tensor the
    layer saw, rounded the way torchao rounds it; only the GEMM's own roundings remain in the bound."""

    def fwd(self, ref, actual):
        return Bounded.exact(torchao_fp8_round(actual, fp8.E4M3))

    def grad(self, ref, actual):
        return Bounded.exact(torchao_fp8_round(actual, fp8.E5M2))


# ---------------------------------------------------------------------------------------------------------
# one training step of one converted layer


class OneLayer(nn.Module):
    def __init__(self, K: int, N: int):
        super().__init__()
        self.proj = nn.Linear(K, N, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


@dataclass
class Step:
    """Inputs, the layer's weights as it computes with them, its results and two LoRA intermediates."""

    x: torch.Tensor
    dy: torch.Tensor
    W: torch.Tensor
    out: torch.Tensor
    dx: torch.Tensor
    A: torch.Tensor | None = None
    B: torch.Tensor | None = None
    dA: torch.Tensor | None = None
    dB: torch.Tensor | None = None
    oa: torch.Tensor | None = None  # x . A^T as the layer computed it (bf16)
    doa: torch.Tensor | None = None  # the gradient reaching it


def base_weight(method_name: str, layer: nn.Module) -> torch.Tensor:
    """The frozen W the layer multiplies with, as a dense bf16 tensor (NF4 dequantized by bitsandbytes,
    a torchao quantized tensor by its own dequantize)."""
    weight = layer.weight
    if method_name == "qlora_nf4":
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(weight.data, weight.quant_state).to(BF16)
    if type(weight) not in (torch.Tensor, nn.Parameter):
        return weight.dequantize().to(BF16)
    return weight.detach()


def randomize_lora_b(model: nn.Module, rank: int) -> None:
    """B ~ N(0, 1/r), so the adapter path contributes about as much as the base and dA is not zero."""
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B["default"].weight.normal_(0.0, rank**-0.5)


def run_step(method_name: str, K: int, N: int, rank: int, device: str = "cpu", direct: bool = False) -> Step:
    """Convert a K -> N layer, give B random values (it starts at zero), run forward and backward(dY).

    direct: call the method's own convert, skipping convert_model's device check."""
    torch.manual_seed(0)
    model = OneLayer(K, N).to(device)
    config = AdapterConfig(rank=rank, alpha=SCALING * rank)
    if direct:
        model = get_method(method_name).convert(model, config)
    else:
        model, _ = convert_model(model, method_name, config)
    x = torch.randn(TOKENS, K, dtype=BF16, device=device, requires_grad=True)
    dy = torch.randn(TOKENS, N, dtype=BF16, device=device)
    layers = lora_layers(model)
    if not layers:
        out = model(x)
        out.backward(dy)
        return Step(x.detach(), dy, base_weight(method_name, model.proj), out.detach(), x.grad)
    (_, layer), = layers
    return lora_step(model, layer, x, dy, rank, lambda: base_weight(method_name, layer.base_layer))


def lora_step(model, layer, x, dy, rank: int, weight_of: Callable[[], torch.Tensor]) -> Step:
    """Give the PEFT LoRA layer a random B, run forward and backward(dY), and record O_A = x A^T and its
    gradient with hooks. weight_of(): the base weight the layer multiplies with, read after the step."""
    lora_a, lora_b = layer.lora_A["default"], layer.lora_B["default"]
    randomize_lora_b(model, rank)
    seen: dict[str, torch.Tensor] = {}

    def keep_oa(module, inputs, output):
        seen["oa"] = output.detach()
        output.register_hook(lambda g: seen.__setitem__("doa", g.detach()))

    handle = lora_a.register_forward_hook(keep_oa)
    out = model(x)
    out.backward(dy)
    handle.remove()
    return Step(
        x=x.detach(), dy=dy, W=weight_of(), out=out.detach(), dx=x.grad,
        A=lora_a.weight.detach(), B=lora_b.weight.detach(), dA=lora_a.weight.grad, dB=lora_b.weight.grad,
        oa=seen["oa"], doa=seen["doa"],
    )


def lora_reference(
    s: Step, base: Cast, lora: Cast, u_acc_base: float = U_FP32, u_acc_lora: float = U_FP32, w_err: float = 0.0
) -> dict[str, Bounded]:
    """PEFT's LoRA step in fp64, op by op: out = base(x) + lora_B(lora_A(x)) * scaling, and its backward.
    Each linear rounds its operands with its Cast and its output to bf16. w_err: relative error allowed
    on W (a fused dequant-GEMM that does not round W to bf16 first)."""
    X, dY = Bounded.exact(s.x), Bounded.exact(s.dy)
    W = Bounded(s.W.double(), w_err * s.W.double().abs())
    A, B = Bounded.exact(s.A), Bounded.exact(s.B)
    xw, w = base.fwd(X, s.x), base.fwd(W, s.W)
    xa, a, b = lora.fwd(X, s.x), lora.fwd(A, s.A), lora.fwd(B, s.B)
    y_base = rounded(matmul(xw, w.T, u_acc_base))
    oa = rounded(matmul(xa, a.T, u_acc_lora))
    oa_in = lora.fwd(oa, s.oa)
    ob = rounded(matmul(oa_in, b.T, u_acc_lora))
    out = rounded(added(y_base, rounded(scaled(ob, SCALING))))
    dys = lora.grad(rounded(scaled(dY, SCALING)), s.dy * SCALING)
    doa = rounded(matmul(dys, b, u_acc_lora))
    doa_in = lora.grad(doa, s.doa)
    dA = rounded(matmul(doa_in.T, xa, u_acc_lora))
    dB = rounded(matmul(dys.T, oa_in, u_acc_lora))
    dx_base = rounded(matmul(base.grad(dY, s.dy), w, u_acc_base))
    dx = rounded(added(dx_base, rounded(matmul(doa_in, a, u_acc_lora))))
    return {"out": out, "oa": oa, "doa": doa, "dA": dA, "dB": dB, "dx": dx}


def assert_within(actual: torch.Tensor, ref: Bounded, what: str) -> None:
    diff = (actual.detach().double() - ref.val).abs()
    worst = float((diff / ref.err.clamp(min=1e-300)).max())
    assert bool((diff <= ref.err).all()), f"{what}: outside the bound (worst |err|/bound = {worst:.3f})"


def assert_all_within(s: Step, ref: dict[str, Bounded], names=("out", "dx", "dA", "dB")) -> None:
    for name in names:
        assert_within(getattr(s, name), ref[name], name)


def assert_bound_is_tight(ref: Bounded, fraction: float, what: str) -> None:
    """Guard against a vacuous test: the bound must be a small fraction of the values it bounds."""
    ratio = float(ref.err.max() / ref.val.abs().max())
    assert ratio <= fraction, f"{what}: bound is {ratio:.3f} of max |value| (limit {fraction})"


# ---------------------------------------------------------------------------------------------------------
# bf16_linear, bf16_lora, qlora_nf4: all-bf16 math


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("K,N", SHAPES)
def test_bf16_linear_output_and_dx_match_fp64_within_bf16_rounding(K, N, device):
    """out = bf16(x W^T), dX = bf16(dY W): one bf16 rounding (2^-8) plus fp32 accumulation each."""
    s = run_step("bf16_linear", K, N, rank=12, device=device)
    X, W, dY = Bounded.exact(s.x), Bounded.exact(s.W), Bounded.exact(s.dy)
    assert_within(s.out, rounded(matmul(X, W.T)), "out")
    assert_within(s.dx, rounded(matmul(dY, W)), "dx")


def test_bf16_linear_trains_nothing():
    model, method = convert_model(OneLayer(64, 96), "bf16_linear", AdapterConfig(rank=12))
    assert method.trainable_parameters(model) == []
    assert model.proj.weight.dtype == BF16


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rank", [12, 16])
@pytest.mark.parametrize("K,N", SHAPES)
def test_bf16_lora_matches_fp64_within_bf16_rounding(K, N, rank, device):
    """Forward, dA, dB and dX within the bf16 roundings of PEFT's op sequence (bound: a few 2^-8 relative)."""
    s = run_step("bf16_lora", K, N, rank, device)
    ref = lora_reference(s, Cast(), Cast())
    assert_all_within(s, ref)
    for name in ("out", "dx", "dA", "dB"):
        assert_bound_is_tight(ref[name], 16 * U_BF16, name)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rank", [12, 16])
@pytest.mark.parametrize("K,N", SHAPES)
def test_qlora_nf4_matches_fp64_lora_on_the_dequantized_weight(K, N, rank, device):
    """QLoRA = bf16 LoRA on W' = dequantize_nf4(W): the same bf16 bound as bf16_lora, with W' in place of W.
    On CUDA bitsandbytes may fuse the dequant into its GEMM without rounding W' to bf16 (W' +- 2^-8)."""
    s = run_step("qlora_nf4", K, N, rank, device)
    ref = lora_reference(s, Cast(), Cast(), w_err=U_BF16 if device == "cuda" else 0.0)
    assert_all_within(s, ref)
    assert_bound_is_tight(ref["out"], 16 * U_BF16, "out")


def test_qlora_nf4_really_uses_the_quantized_weight():
    """The dequantized NF4 weight differs from W (4-bit codes), so the test above checks the NF4 path."""
    torch.manual_seed(0)
    W = OneLayer(64, 96).proj.weight.detach().to(BF16)
    s = run_step("qlora_nf4", 64, 96, 12)
    assert float((s.W.float() - W.float()).abs().max()) > 0.01 * float(W.abs().max())


def _nf4_code() -> torch.Tensor:
    import bitsandbytes.functional as bnbf

    return bnbf.get_4bit_type("nf4", device="cpu").double()


def test_nf4_dequantized_value_is_the_nearest_code_times_the_block_absmax():
    """Without double quant, each element of a 64-block becomes code[i] * absmax(block), code[i] the NF4
    value nearest to w / absmax (ties aside); dequantize returns it rounded to bf16 (2^-8 relative)."""
    import bitsandbytes.functional as bnbf

    torch.manual_seed(0)
    W = torch.randn(96, 64, dtype=BF16)
    packed, state = bnbf.quantize_4bit(W, blocksize=64, compress_statistics=False, quant_type="nf4")
    deq = bnbf.dequantize_4bit(packed, state).double().reshape(-1, 64)
    blocks = W.double().reshape(-1, 64)
    absmax = blocks.abs().amax(dim=1, keepdim=True)
    assert torch.allclose(state.absmax.double().reshape(-1, 1), absmax, rtol=U_FP32, atol=0)
    code = _nf4_code()
    dist = (blocks.unsqueeze(-1) / absmax.unsqueeze(-1) - code).abs()
    nearest = code[dist.argmin(dim=-1)] * absmax
    two_best = dist.topk(2, dim=-1, largest=False).values
    clear = (two_best[..., 1] - two_best[..., 0]) > 1e-3  # not a near-tie between two codes
    assert bool(((deq - nearest).abs() <= U_BF16 * nearest.abs())[clear].all())


def test_nf4_double_quant_error_within_half_the_largest_code_gap():
    """With double quant the block absmax a is itself 8-bit quantized (error e <= one step of its dynamic
    code times its fp32 scale), so |w - deq| <= (a + e) * g / 2 + e (g: largest gap between NF4 codes)
    + 2^-8 |deq| for the bf16 result."""
    import bitsandbytes.functional as bnbf

    torch.manual_seed(0)
    W = torch.randn(96, 64, dtype=BF16) * 0.05
    packed, state = bnbf.quantize_4bit(W, blocksize=64, compress_statistics=True, quant_type="nf4")
    deq = bnbf.dequantize_4bit(packed, state).double().reshape(-1, 64)
    blocks = W.double().reshape(-1, 64)
    a = blocks.abs().amax(dim=1, keepdim=True)
    code = _nf4_code()
    gap = float((code[1:] - code[:-1]).max())
    nested = state.state2
    e = float((nested.code.double()[1:] - nested.code.double()[:-1]).abs().max()) * float(nested.absmax.double().max())
    bound = (a + e) * gap / 2 + e + U_BF16 * deq.abs()
    assert state.nested
    assert bool(((deq - blocks).abs() <= bound).all())
    assert float((deq - blocks).abs().max()) > 0  # the 4-bit grid does round


@pytest.mark.gpu
def test_nf4_conversion_on_a_side_stream_quantizes_the_finished_weight():
    """The runner builds each point on its own CUDA stream, and bitsandbytes' quantize kernel runs on the
    legacy default stream: the conversion must wait for the weight's producer and finish before torch goes
    on. The producer here is a chain of GEMMs on the side stream (milliseconds), so a quantization that
    does not wait reads the weight half written; the NF4 bytes and statistics must be those of the weight
    quantized after a device synchronization."""
    import bitsandbytes.functional as bnbf

    from falqon_core.methods.qlora_nf4 import quantize_linear_to_nf4

    torch.manual_seed(0)
    side = torch.cuda.Stream()
    base = torch.randn(4096, 4096, dtype=BF16, device="cuda") / 64
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        w = base
        for _ in range(24):
            w = torch.tanh(w @ base) * 0.5
        linear = nn.Linear(4096, 4096, bias=False, device="cuda", dtype=BF16)
        linear.weight.data = w
        q = quantize_linear_to_nf4(linear, BF16)
    torch.cuda.synchronize()
    packed, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    torch.cuda.synchronize()
    assert torch.equal(q.weight.data.view(-1), packed.view(-1))
    assert torch.equal(q.weight.quant_state.absmax, state.absmax)
    assert torch.equal(q.weight.quant_state.offset, state.offset)
    assert torch.equal(q.weight.quant_state.state2.absmax, state.state2.absmax)
    assert torch.isfinite(bnbf.dequantize_4bit(q.weight.data, q.weight.quant_state)).all()


# ---------------------------------------------------------------------------------------------------------
# fp8_lora, fp8_base_lora: torchao float8 linears


FP8_CASES = [("fp8_lora", 48), ("fp8_lora", 16), ("fp8_base_lora", 12), ("fp8_base_lora", 48)]


def fp8_casts(method_name: str, cast: type[Cast]) -> tuple[Cast, Cast]:
    """(base cast, adapter cast): fp8_lora rounds every linear's operands, fp8_base_lora only the base's."""
    return cast(), cast() if method_name == "fp8_lora" else Cast()


def fp8_acc(method_name: str, device: str) -> tuple[float, float]:
    """Accumulation units (base GEMMs, adapter GEMMs): fp8 GEMMs follow tests/bounds.py (2^-13 on CUDA's fp8
    tensor cores, 2^-24 on CPU); fp8_base_lora's adapter GEMMs are bf16 with fp32 accumulation (the fixture)."""
    u = gemm_accum_unit(device, fp8=True)
    return u, u if method_name == "fp8_lora" else gemm_accum_unit(device, fp8=False)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method_name,rank", FP8_CASES)
@pytest.mark.parametrize("K,N", SHAPES)
def test_fp8_methods_match_fp64_product_of_fp8_rounded_operands(K, N, method_name, rank, device):
    """Each fp8 GEMM equals the fp64 product of its operands rounded as torchao rounds them (tensorwise
    e4m3 for x, W, A, B, O_A; e5m2 for dY, dO_A), up to bf16 output rounding (2^-8) and accumulation.
    Intermediates that torchao re-quantizes (O_A, dO_A) are taken from the run itself."""
    s = run_step(method_name, K, N, rank, device)
    base, lora = fp8_casts(method_name, Fp8CastExact)
    ref = lora_reference(s, base, lora, *fp8_acc(method_name, device))
    assert_all_within(s, ref, ("out", "oa", "doa", "dx", "dA", "dB"))
    for name in ("out", "dx", "dA", "dB"):
        assert_bound_is_tight(ref[name], 16 * U_BF16 if device == "cpu" else 0.5, name)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method_name,rank", FP8_CASES)
@pytest.mark.parametrize("K,N", SHAPES)
def test_fp8_methods_match_unquantized_fp64_within_e4m3_e5m2_error(K, N, method_name, rank, device):
    """Against the unquantized fp64 LoRA math: each cast adds 2^-4 (e4m3) or 2^-3 (e5m2) relative error
    (plus half a subnormal step of its scale), carried through every GEMM; outputs round to bf16.

    Worst case (`err`): errors of a dot product added in absolute value; always holds but grows like
    sqrt(K) times the typical result (1 to 3x max |value| for fp8_lora here), so it only rules out gross errors.
    Hoeffding (`sd`): the roundings are independent, zero-mean and bounded, so per element
    |error| <= 5 sd except with probability 2 exp(-12.5) = 7e-6; and E|error|^2 <= sd^2, so over a tensor
    of thousands of elements ||error||_F <= ||sd||_F (measured: 0.2 to 0.4 of it, as sd bounds each
    rounding by its worst case). The norm-wise bound is the tight one: at most 40% of ||value||_F.
    """
    s = run_step(method_name, K, N, rank, device)
    base, lora = fp8_casts(method_name, Fp8CastBound)
    ref = lora_reference(s, base, lora, *fp8_acc(method_name, device))
    assert_all_within(s, ref)
    for name in ("out", "dx", "dA", "dB"):
        r, actual = ref[name], getattr(s, name).double()
        assert_within(actual, Bounded(r.val, HOEFFDING_LAMBDA * r.sd), f"{name} (Hoeffding)")
        norm_err, norm_bound = float((actual - r.val).norm()), float(r.sd.norm())
        assert norm_err <= norm_bound, f"{name}: ||error||_F {norm_err:.4g} > ||sd||_F = {norm_bound:.4g}"
        assert norm_bound <= 0.4 * float(r.val.norm()), f"{name}: norm-wise bound is vacuous"


@pytest.mark.parametrize("K,N", SHAPES)
def test_fp8_lora_is_not_bf16_lora(K, N):
    """The fp8 path really quantizes: its output leaves the bf16-only bound that bf16_lora stays within."""
    s = run_step("fp8_lora", K, N, 48)
    ref = lora_reference(s, Cast(), Cast())
    assert not bool(((s.out.double() - ref["out"].val).abs() <= ref["out"].err).all())


def test_fp8_lora_rank_not_multiple_of_16_is_unavailable_with_reason():
    with pytest.raises(MethodUnavailable, match="rank 12.*divisible by 16|divisible by 16.*rank 12") as excinfo:
        convert_model(OneLayer(64, 96), "fp8_lora", AdapterConfig(rank=12))
    assert "Use a rank and layer sizes that are multiples of 16" in str(excinfo.value)  # fp8_lora's rank is constrained


def test_fp8_base_lora_converts_only_base_layers():
    from torchao.float8.float8_linear import Float8Linear

    model, _ = convert_model(OneLayer(64, 96), "fp8_base_lora", AdapterConfig(rank=12))
    (_, layer), = lora_layers(model)
    assert isinstance(layer.base_layer, Float8Linear)
    assert not isinstance(layer.lora_A["default"], Float8Linear)
    assert not isinstance(layer.lora_B["default"], Float8Linear)


# ---------------------------------------------------------------------------------------------------------
# fp6_lora: torchao fpx (fp6-llm kernels) where torchao ships it, else the floatx backend (tests/test_fp6_lora.py)


def test_fp6_lora_runs_on_cpu_through_floatx_when_fpx_cannot():
    """No CUDA (or no fpx in torchao): fp6_lora is available, converts through the floatx backend and says why."""
    from falqon_core.methods.fp6_lora import torchao_fpx_config

    assert get_method("fp6_lora").unavailable_reason("cpu") is None
    model, method = convert_model(OneLayer(64, 256), "fp6_lora", AdapterConfig(rank=16))
    (_, layer), = lora_layers(model)
    assert layer.base_layer.fp6_backend == "floatx"
    why = method.describe(model)["fp6_backend_reason"]
    try:
        torchao_fpx_config()
    except MethodUnavailable as exc:
        assert str(exc) in why
    else:
        assert "need CUDA" in why


def test_frozen_quantized_linear_backward_is_dy_times_dequantized_weight():
    """FrozenQuantizedLinear (fp6_lora's frozen layer) on a torchao int8 weight-only tensor, which runs on
    CPU: forward = torchao's own linear; dX = bf16(dY . dequantize(W)) within one bf16 rounding (2^-8) and
    fp32 accumulation; W gets no gradient."""
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    from falqon_core.methods.fp6_lora import FrozenQuantizedLinear

    torch.manual_seed(0)
    layer = FrozenQuantizedLinear.from_linear(nn.Linear(64, 96, bias=False).to(BF16))
    quantize_(layer, Int8WeightOnlyConfig())
    assert type(layer.weight) is not nn.Parameter
    x = torch.randn(TOKENS, 64, dtype=BF16, requires_grad=True)
    dy = torch.randn(TOKENS, 96, dtype=BF16)
    out = layer(x)
    out.backward(dy)
    W = Bounded.exact(layer.weight.dequantize())
    with torch.no_grad():
        assert torch.equal(out, torch.nn.functional.linear(x, layer.weight))
    assert_within(x.grad, rounded(matmul(Bounded.exact(dy), W)), "dx")
    assert layer.weight.grad is None


def test_fp6_lora_fpx_conversion_trains_through_a_cpu_stand_in(monkeypatch):
    """fp6_lora's fpx path (PEFT, base layer swap, torchao quantize_, custom backward) with torchao's int8
    weight-only config standing in for fpx and its CUDA check waived: auto picks fpx for a shape its kernels
    fit; bf16 LoRA on W' = dequantize(W) within the bf16_lora bound, with W' +- 2^-8 because torchao applies
    the int8 scale after its GEMM."""
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    from falqon_core.methods import fp6_lora

    monkeypatch.setattr(fp6_lora, "torchao_fpx_config", lambda: (lambda ebits, mbits: Int8WeightOnlyConfig(), quantize_))
    monkeypatch.setattr(fp6_lora, "fpx_kernels_run_on", lambda device: True)
    torch.manual_seed(0)
    W = OneLayer(64, 256).proj.weight.detach().to(BF16)  # the weight run_step's layer starts from
    s = run_step("fp6_lora", 64, 256, 12, direct=True)
    assert not torch.equal(s.W, W)  # the base layer computes with the quantized weight
    ref = lora_reference(s, Cast(), Cast(), w_err=U_BF16)
    assert_all_within(s, ref)


def test_fp6_lora_refuses_shapes_the_fpx_kernels_cannot_run():
    from falqon_core.methods.fp6_lora import require_fpx_shapes

    with pytest.raises(MethodUnavailable, match="N % 256"):
        require_fpx_shapes({"proj": (64, 96)})


@pytest.mark.parametrize("K,N", SHAPES)
def test_fp6_lora_matches_fp64_lora_on_the_dequantized_fp6_weight_on_cpu(K, N):
    """floatx backend: bf16 LoRA on W' = dequantize_fp6(W), which the base GEMMs use exactly: the bf16_lora bound."""
    s = run_step("fp6_lora", K, N, 12)
    ref = lora_reference(s, Cast(), Cast())
    assert_all_within(s, ref)
    assert_bound_is_tight(ref["out"], 16 * U_BF16, "out")


@pytest.mark.gpu
@pytest.mark.parametrize("K,N", [(64, 256), (128, 512)])
def test_fp6_lora_matches_fp64_lora_on_the_dequantized_fp6_weight(K, N):
    """On CUDA: bf16 LoRA on W' = dequantize_fp6(W). With fpx the fused fp6 GEMM may not round W' to bf16
    (W' +- 2^-8); floatx multiplies the dequantized bf16 W' itself (the bf16_lora bound)."""
    method = get_method("fp6_lora")
    reason = method.unavailable_reason("cuda")
    if reason:
        pytest.skip(reason)
    s = run_step("fp6_lora", K, N, 16, "cuda")
    fused = method.default_backend(K, N) == "fpx"  # what auto picks for this layer on this GPU
    ref = lora_reference(s, Cast(), Cast(), w_err=U_BF16 if fused else 0.0)
    assert_all_within(s, ref)


# ---------------------------------------------------------------------------------------------------------
# torch.compile


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("method_name,rank", [
    ("bf16_linear", 16), ("bf16_lora", 16), ("qlora_nf4", 16), ("fp8_lora", 16), ("fp8_base_lora", 16),
])
def test_compiled_layer_matches_eager(method_name, rank):
    """Methods that claim supports_compile run under torch.compile with the eager results: compiled fp8
    casts may round a few elements to a neighbouring e4m3/e5m2 value, so norm-wise within 2^-4."""
    assert get_method(method_name).supports_compile
    torch.manual_seed(0)
    model, _ = convert_model(OneLayer(128, 256).cuda(), method_name, AdapterConfig(rank=rank))
    randomize_lora_b(model, rank)
    x = torch.randn(64, 128, dtype=BF16, device="cuda", requires_grad=True)
    dy = torch.randn(64, 256, dtype=BF16, device="cuda")

    def step(module):
        x.grad = None
        out = module(x)
        out.backward(dy)
        return out.detach().float(), x.grad.float()

    eager = step(model)
    compiled = step(torch.compile(model))
    for e, c in zip(eager, compiled):
        assert float((c - e).norm()) <= 2.0**-4 * float(e.norm())


# ---------------------------------------------------------------------------------------------------------
# step_cost against the GEMMs the layer really runs


class GemmCounter(TorchDispatchMode):
    """FLOPs (2 M N K) of every GEMM op, by precision: 'fp8' when an operand is fp8 or a torchao float8
    tensor, else 'bf16'. bitsandbytes' fused NF4 op (gemm_4bit) counts as one bf16 GEMM."""

    def __init__(self):
        super().__init__()
        self.flops = {"fp8": 0.0, "bf16": 0.0}

    @staticmethod
    def _is_fp8(t) -> bool:
        return isinstance(t, torch.Tensor) and (
            t.dtype in (fp8.E4M3, fp8.E5M2) or type(t).__name__ == "Float8TrainingTensor"
        )

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func.overloadpacket)
        mats = None
        if name in ("aten.mm", "aten._scaled_mm"):
            mats = args[0], args[1]
        elif name == "aten.addmm":
            mats = args[1], args[2]
        if mats is not None:
            (m, k), n = mats[0].shape, mats[1].shape[1]
            self.flops["fp8" if any(self._is_fp8(t) for t in mats) else "bf16"] += 2.0 * m * n * k
        elif name == "bitsandbytes.gemm_4bit":
            a, shape_b = args[0], args[2]
            self.flops["bf16"] += 2.0 * a.numel() * shape_b[0]
        return func(*args, **kwargs)


# torchao's float8 backward also runs the frozen base's dW GEMM (autograd discards it): 2 M N K in fp8
TORCHAO_DISCARDED_DW = {"fp8_lora": True, "fp8_base_lora": True}


@pytest.mark.parametrize("method_name,rank", [
    ("bf16_linear", 12), ("bf16_lora", 12), ("qlora_nf4", 12), ("fp8_lora", 48), ("fp8_base_lora", 12),
])
def test_step_cost_gemm_flops_match_the_gemms_the_layer_runs(method_name, rank):
    K, N = 64, 96
    torch.manual_seed(0)
    model, method = convert_model(OneLayer(K, N), method_name, AdapterConfig(rank=rank))
    x = torch.randn(TOKENS, K, dtype=BF16, requires_grad=True)
    with GemmCounter() as counter:
        model(x).backward(torch.randn(TOKENS, N, dtype=BF16))
    expected = {"fp8": 0.0, "bf16": 0.0} | method.step_cost(K, N, rank, TOKENS).gemm_flops
    if TORCHAO_DISCARDED_DW.get(method_name):
        expected["fp8"] += 2.0 * TOKENS * N * K
    assert counter.flops == expected


@pytest.mark.parametrize("method_name", ["bf16_lora", "qlora_nf4", "fp8_lora", "fp8_base_lora", "fp6_lora"])
def test_lora_step_cost_moves_more_bytes_than_bf16_lora_when_it_quantizes(method_name):
    """Every quantized method adds cast or dequant traffic on top of bf16_lora's elementwise passes,
    and the counts grow with the token count."""
    K, N, r, M = 4096, 4096, 16, 2048
    ref = get_method("bf16_lora").step_cost(K, N, r, M)
    cost = get_method(method_name).step_cost(K, N, r, M)
    assert cost.quant_bytes >= ref.quant_bytes
    assert (cost.quant_bytes > ref.quant_bytes) == (method_name != "bf16_lora")
    assert sum(cost.gemm_flops.values()) == pytest.approx(4 * M * N * K + 6 * M * r * (K + N))
    bigger = get_method(method_name).step_cost(K, N, r, 2 * M)
    assert bigger.quant_bytes > cost.quant_bytes


def test_fp8_lora_cast_bytes_count_each_operand_once():
    """fp8_lora's casts: 3 bytes (read bf16, write fp8) per element of x (twice: base and lora_A), W, dY
    (twice: base and lora_B), A, B, O_A, dO_A; plus bf16_lora's elementwise and update bytes."""
    K, N, r, M = 256, 512, 16, 64
    casts = 3 * (2 * M * K + N * K + 2 * M * N + r * K + N * r + 2 * M * r)
    fp8_bytes = get_method("fp8_lora").step_cost(K, N, r, M).quant_bytes
    extra = fp8_bytes - get_method("bf16_lora").step_cost(K, N, r, M).quant_bytes
    assert extra == casts


# ---------------------------------------------------------------------------------------------------------
# memory


def test_memory_bytes_counts_quantized_storage_and_adam_state():
    """bf16_lora holds W at 2 B/elem; qlora_nf4 at 0.5 B/elem plus its absmax statistics; both hold
    A, B in bf16 and 8 bytes of AdamW state per adapter element."""
    K, N, r = 64, 96, 12
    adapter_elems = r * (K + N)
    bf16 = get_method("bf16_lora").memory_bytes(convert_model(OneLayer(K, N), "bf16_lora", AdapterConfig(rank=r))[0])
    assert bf16 == {"weights": 2 * N * K, "adapters": 2 * adapter_elems, "optimizer_state": 8 * adapter_elems}
    model, method = convert_model(OneLayer(K, N), "qlora_nf4", AdapterConfig(rank=r))
    q = method.memory_bytes(model)
    n_blocks = N * K // 64
    # packed nibbles + one u8 absmax per block + the 16-entry fp32 NF4 code + nested fp32 scale and 256-entry code
    assert q["weights"] == N * K // 2 + n_blocks + 16 * 4 + 4 * -(-n_blocks // 256) + 256 * 4
    assert q["adapters"] == 2 * adapter_elems and q["optimizer_state"] == 8 * adapter_elems
