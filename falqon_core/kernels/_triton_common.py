"""Pieces the Triton kernels share: when to take the Triton path, fp8 format constants, and exact rounding.

Why software rounding exists: on the GPU, Triton lowers an fp32 -> fp8 cast to `cvt.rn.satfinite`
(round-to-nearest-even, the same rounding as torch's `.to(float8)`), and fp32 -> bf16 to `cvt.rn`. The
Triton *interpreter* (TRITON_INTERPRET=1, how the kernels are tested on CPU) does not: it rounds fp8
halfway cases away from zero and truncates to bf16 (triton/runtime/interpreter.py `_convert_float`).
`round_to_grid` first rounds an fp32 value to the target format's grid with round-to-nearest-even fp32
adds, after which any cast is exact; the kernels use it under the interpreter (so CPU tests check the
same round-to-nearest-even arithmetic the GPU does) and, optionally, on the GPU too.
"""

from __future__ import annotations

import functools
import math
import os
import struct
from typing import Any, Callable, TypeVar

import torch
import triton
import triton.language as tl

from falqon_core import fp8

FP8_DTYPES = (fp8.E4M3, fp8.E5M2)

_F = TypeVar("_F", bound=Callable[..., Any])


def opaque_to_compile(launcher: _F) -> _F:
    """Keep Dynamo from tracing into a Triton launcher: under torch.compile, call its `falqon::` custom op
    (registered by falqon_core.kernels.compile_ops: one graph node with a fake implementation), or, for a
    launcher without one, run it as it is (a graph break).

    Why not let Dynamo trace the launch: inductor works out which buffers a user Triton kernel writes by
    analysing the kernel; where that misses a store, dead-code elimination drops the launch and the compiled
    step silently skips the kernel (seen on the H100: compiled halo_lora returned zeros; pytorch/pytorch#170808).
    A custom op declares what it writes. Eager calls pay only one `is_compiling()` check.
    """
    disabled = torch.compiler.disable(launcher)
    slot: dict[str, Any] = {}  # {"op": custom op, "unpack": op result -> launcher result}, see register_compile_op

    @functools.wraps(launcher)
    def call(*args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_compiling():
            op = slot.get("op")
            if op is None:
                return disabled(*args, **kwargs)
            result = op(*args, **kwargs)
            unpack = slot.get("unpack")
            return unpack(result) if unpack is not None else result
        return launcher(*args, **kwargs)

    call.compile_op_slot = slot  # type: ignore[attr-defined]
    return call  # type: ignore[return-value]


def register_compile_op(wrapped: Callable[..., Any], op: Callable[..., Any], unpack: Callable[[Any], Any] | None = None) -> None:
    """Make torch.compile call `op` (same arguments) for the opaque_to_compile launcher `wrapped`."""
    slot = getattr(wrapped, "compile_op_slot", None)
    if slot is None:
        raise TypeError(f"{getattr(wrapped, '__qualname__', wrapped)} is not an opaque_to_compile launcher")
    slot.update(op=op, unpack=unpack)


def is_interpreter() -> bool:
    """True when Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_fp8_ok(t: torch.Tensor) -> bool:
    """Whether the Triton fp8 kernels can run on t's device: a CUDA GPU with fp8 support (sm_89+)."""
    if not t.is_cuda or is_interpreter():
        return False
    return torch.cuda.get_device_capability(t.device) >= fp8.FP8_MIN_CAPABILITY


_SM_COUNT: dict[int, int] = {}


def num_sms(t: torch.Tensor) -> int:
    """Streaming multiprocessors of t's GPU (132 on an H100 SXM); a small number under the interpreter.

    Persistent and grid-stride kernels size their grid with it. Host-only (no sync): graph-capture safe.
    """
    if not t.is_cuda or is_interpreter():
        return 2
    index = t.device.index if t.device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


def _describe_format(dtype: torch.dtype) -> tuple[float, int, int]:
    info = torch.finfo(dtype)
    return float(info.max), round(-math.log2(info.eps)), round(math.log2(info.smallest_normal))


# computed once at import, so the launchers only do dict lookups (cheap per call, and simple for Dynamo)
_FORMATS = {dtype: _describe_format(dtype) for dtype in (*FP8_DTYPES, torch.bfloat16)}


def format_constants(dtype: torch.dtype) -> tuple[float, int, int]:
    """(largest finite value, stored mantissa bits, smallest normal exponent) of a float format.

    From torch.finfo, so fp8 and bf16 are described the same way: e4m3 -> (448, 3, -6),
    e5m2 -> (57344, 2, -14), bf16 -> (3.39e38, 7, -126).
    """
    if dtype not in _FORMATS:
        _FORMATS[dtype] = _describe_format(dtype)
    return _FORMATS[dtype]


def check_fp8_dtype(dtype: torch.dtype) -> None:
    """Raise a clear error for a dtype the fp8 kernels do not produce."""
    if dtype not in FP8_DTYPES:
        raise ValueError(f"fp8 dtype must be torch.float8_e4m3fn or torch.float8_e5m2, got {dtype}")


def fp32(value: float) -> float:
    """A Python float rounded to the nearest fp32 (round-to-nearest-even), as torch rounds a scalar operand."""
    return struct.unpack("<f", struct.pack("<f", value))[0]


def fp32_reciprocal(value: float) -> float:
    """1 / value as an fp32 division would round it, as torch's CUDA `tensor / python_scalar` uses it.

    Computed in double and rounded once to fp32: for fp32 operands this equals the correctly rounded fp32
    quotient (double has more than 2 * 24 + 2 bits, so the double rounding is innocuous).
    """
    return fp32(1.0 / fp32(value))


@triton.jit
def round_to_grid(y, MANT_BITS: tl.constexpr, MIN_EXP: tl.constexpr):
    """Round fp32 y to the nearest value with MANT_BITS stored mantissa bits (ties to even), in fp32.

    Adds and subtracts magic = 2**(e + 23 - MANT_BITS), e = max(exponent of y, MIN_EXP): the fp32 add
    then rounds at exactly the target format's ulp 2**(e - MANT_BITS) (subnormal spacing below MIN_EXP).
    Keeps the sign (so -tiny rounds to -0.0 as torch does). y must already be within the format's range.
    """
    bits = y.to(tl.int32, bitcast=True)
    exp_bits = tl.maximum(bits & 0x7F800000, (MIN_EXP + 127) << 23)
    magic = (exp_bits + ((23 - MANT_BITS) << 23)).to(tl.float32, bitcast=True)
    rounded = (tl.abs(y) + magic) - magic
    signed = rounded.to(tl.int32, bitcast=True) | (bits & -2147483648)
    return signed.to(tl.float32, bitcast=True)


@triton.jit
def saturating_cast(y, FP8_MAX: tl.constexpr, MANT_BITS: tl.constexpr, MIN_EXP: tl.constexpr,
                    SOFTWARE_ROUND: tl.constexpr, OUT_DTYPE: tl.constexpr):
    """fp32 -> fp8 as falqon_core.fp8.saturating_cast: clamp to +-FP8_MAX, then round-to-nearest-even.

    NaN stays NaN (the clamp propagates it), as torch.clamp does.
    """
    y = tl.clamp(y, -FP8_MAX, FP8_MAX, propagate_nan=tl.PropagateNan.ALL)
    if SOFTWARE_ROUND:
        y = round_to_grid(y, MANT_BITS, MIN_EXP)
    return y.to(OUT_DTYPE)


@triton.jit
def cast_bf16(y, SOFTWARE_ROUND: tl.constexpr):
    """fp32 -> bf16, round-to-nearest-even (the interpreter would truncate without SOFTWARE_ROUND)."""
    if SOFTWARE_ROUND:
        y = round_to_grid(y, 7, -126)
    return y.to(tl.bfloat16)


def triton_fp8_dtype(dtype: torch.dtype):
    """The Triton element type of a torch fp8 dtype."""
    check_fp8_dtype(dtype)
    return tl.float8e4nv if dtype == fp8.E4M3 else tl.float8e5


@triton.jit
def scale_from_amax(amax, fp8_max, inv_max, min_scale, SCALE_BY_RECIPROCAL: tl.constexpr):
    """Dequant scale (fp32) = amax / fp8_max, clamped at min_scale, with torch's fp32 ops on this device.

    The float scalars are cast to fp32 here: Triton types a Python float argument fp32, but a kernel launched
    from torch.compile'd code gets it as fp64, which would turn the scale (and the cast after it) fp64.
    """
    fp8_max, inv_max = tl.cast(fp8_max, tl.float32), tl.cast(inv_max, tl.float32)
    min_scale = tl.cast(min_scale, tl.float32)
    if SCALE_BY_RECIPROCAL:
        scale = amax * inv_max
    else:
        scale = tl.math.div_rn(amax, fp8_max)
    return tl.maximum(scale, min_scale)


@triton.jit
def inverse_scale(scale):
    """RN(1 / scale) in fp32, the factor every cast multiplies by: data = sat_cast(x * inverse_scale(scale)).

    A multiply, not an IEEE division per element: div.rn.f32 is a ~10-instruction sequence, and with it the cast
    of a 2048 x 4096 bf16 tensor was compute-bound on an H200 (7.0 us against 4.0 with the multiply, which is the
    bare convert's time: results/probes-step-h200/cast-div.txt). The torch reference (falqon_core.fp8.quantize)
    multiplies by the same correctly rounded reciprocal, so kernels and reference stay bit-identical; against
    the division a product can differ by one fp32 ulp, which moves an fp8 value only when x / scale lies within
    that ulp of a rounding boundary (torchao's casts multiply by a reciprocal scale too).
    """
    return tl.math.div_rn(tl.full(scale.shape, 1.0, tl.float32), scale)


@triton.jit
def scale_from_partials(partial_ptr, num_partials, scale_ptr, fp8_max, inv_max, min_scale,
                        SCALE_BY_RECIPROCAL: tl.constexpr, PARTIALS_BLOCK: tl.constexpr):
    """Launch 2 of a tensorwise quantization: the dequant scale from the max of launch 1's partial amaxes
    (a few hundred fp32 values, read from L2 by every program); program 0 also stores it to scale_ptr."""
    return scale_from_partials_of(tl.program_id(0), partial_ptr, num_partials, scale_ptr, fp8_max, inv_max,
                                  min_scale, SCALE_BY_RECIPROCAL, PARTIALS_BLOCK)


@triton.jit
def scale_from_partials_of(pid, partial_ptr, num_partials, scale_ptr, fp8_max, inv_max, min_scale,
                           SCALE_BY_RECIPROCAL: tl.constexpr, PARTIALS_BLOCK: tl.constexpr):
    """scale_from_partials where the programs casting this tensor are numbered by `pid` (a launch that also
    does other work, kernels/grad_prepass.py); the one numbered 0 stores the scale."""
    p = tl.arange(0, PARTIALS_BLOCK)
    amax = tl.max(tl.load(partial_ptr + p, mask=p < num_partials, other=0.0), axis=0)
    scale = scale_from_amax(amax, fp8_max, inv_max, min_scale, SCALE_BY_RECIPROCAL)
    if pid == 0:
        tl.store(scale_ptr, scale)
    return scale
