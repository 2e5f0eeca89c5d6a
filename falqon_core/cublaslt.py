"""fp8 GEMM through cuBLASLt with no workspace: the same library torch._scaled_mm calls, another algorithm choice.

Why: torch._scaled_mm hands cuBLASLt a 32 MiB workspace on Hopper, and for several of FALQON's GEMMs (the dX GEMM at
2048 tokens, the forward at 3000) cuBLASLt's heuristic then picks a stream-K kernel whose workspace must be zeroed
first: a memset before every such GEMM, and in a CUDA graph ~3.5 us of idle GPU between the memset and the GEMM
(H200 profile, `results/probes-step-h200/lt-gemm/`). Asked for an algorithm that needs no workspace, the heuristic
gives the same tile with a static schedule ("ssched"), as fast on its own and with no memset. The workspace size
is a process-wide setting of torch (CUBLASLT_WORKSPACE_SIZE), so a layer cannot ask for it; this module calls
cublasLtMatmul itself (ctypes, the libcublasLt that torch loaded) for the calls that opt in.

Contract (`scaled_mm`): a (M x K fp8, row-major) @ b (N x K fp8, row-major)^T with 0-dim fp32 scales -> M x N in
out_dtype, as torch._scaled_mm(a, b.t(), scale_a, scale_b, out_dtype, use_fast_accum) computes it. The sum over K
runs in fp32 either way, but another kernel may add its partial sums in another order, so results can differ from
torch._scaled_mm's in the last bit of the output (tests/test_cublaslt.py bounds it). Returns None whenever this path
does not apply (no CUDA, no libcublasLt, a shape or layout cuBLASLt has no workspace-free algorithm for): callers
then use torch._scaled_mm.

Profiling: a ctypes call is no torch op, so torch.profiler would file its kernel under the op around it (FALQON's
autograd.Function), and cuBLAS names fp8 and bf16 GEMM kernels alike (`nvjet_*`). While a profiler runs, each call
goes through the custom op `PROFILER_OP` instead (the same call; the op's inputs are recorded like any op's), which
falqon_bench's breakdown files as an fp8 GEMM. Outside a profile the op's dispatch cost is skipped.
"""

from __future__ import annotations

import ctypes
import glob
import os
import sys
import threading
from dataclasses import dataclass
from typing import Any

import torch

# cublasLt.h / library_types.h / cublas_api.h enum values (stable across CUDA 12 and 13)
_CUDA_TYPES = {
    torch.float8_e4m3fn: 28,  # CUDA_R_8F_E4M3
    torch.float8_e5m2: 29,  # CUDA_R_8F_E5M2
    torch.bfloat16: 14,  # CUDA_R_16BF
    torch.float16: 2,  # CUDA_R_16F
    torch.float32: 0,  # CUDA_R_32F
}
_CUDA_R_32F = 0
_COMPUTE_32F = 68
_OP_N, _OP_T = 0, 1
_DESC_TRANSA, _DESC_TRANSB = 3, 4
_DESC_A_SCALE_POINTER, _DESC_B_SCALE_POINTER = 17, 18
_DESC_FAST_ACCUM = 25
_PREF_MAX_WORKSPACE_BYTES = 1
_PREF_MIN_ALIGNMENT = (5, 6, 7, 8)  # A, B, C, D
_FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
_MAX_ALIGNMENT = 256  # the heuristic's default assumption; smaller when a pointer is less aligned


class _HeuristicResult(ctypes.Structure):
    _fields_ = [
        ("algo", ctypes.c_uint64 * 8),
        ("workspace_size", ctypes.c_size_t),
        ("state", ctypes.c_int),
        ("waves_count", ctypes.c_float),
        ("reserved", ctypes.c_int * 4),
    ]


@dataclass
class _Plan:
    """Descriptors and the chosen algorithm for one (shape, dtypes, alignment, fast_accum, device)."""

    desc: ctypes.c_void_p
    layouts: tuple[ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]  # A (= b), B (= a), C = D
    algo: _HeuristicResult


_lock = threading.Lock()
_lib: Any = None
_load_tried = False  # the library is looked for once per process
_handles: dict[int, ctypes.c_void_p] = {}
_plans: dict[tuple, _Plan | None] = {}


def _library_candidates() -> list[str]:
    """libcublasLt files to try, all of the CUDA major version torch was built with (none for a CPU or ROCm
    build): the soname first (dlopen returns the copy torch already loaded), then the nvidia wheels' copies."""
    if not torch.version.cuda:
        return []
    soname = f"libcublasLt.so.{torch.version.cuda.split('.')[0]}"
    names = [soname]
    for root in {os.path.dirname(os.path.dirname(torch.__file__)), *(p for p in sys.path if "site-packages" in p)}:
        names += sorted(glob.glob(os.path.join(root, "nvidia", "*", "lib", soname)))
        names += sorted(glob.glob(os.path.join(root, "nvidia", "cublas", "lib", soname)))
    return names


def _load() -> Any:
    global _lib, _load_tried
    if _load_tried:
        return _lib
    _load_tried = True
    for name in _library_candidates():
        try:
            lib = ctypes.CDLL(name)
            lib.cublasLtMatmul  # noqa: B018 (raises AttributeError when the symbol is missing)
        except (OSError, AttributeError):
            continue
        for fn in ("cublasLtCreate", "cublasLtMatmulDescCreate", "cublasLtMatrixLayoutCreate",
                   "cublasLtMatmulPreferenceCreate", "cublasLtMatmulDescSetAttribute",
                   "cublasLtMatmulPreferenceSetAttribute", "cublasLtMatmulAlgoGetHeuristic", "cublasLtMatmul",
                   "cublasLtMatmulPreferenceDestroy"):
            getattr(lib, fn).restype = ctypes.c_int
        lib.cublasLtMatrixLayoutCreate.argtypes = [
            ctypes.POINTER(ctypes.c_void_p), ctypes.c_int, ctypes.c_uint64, ctypes.c_uint64, ctypes.c_int64
        ]
        lib.cublasLtMatmulDescCreate.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_int, ctypes.c_int]
        # the other calls pass every argument as an explicit ctypes value (pointers as c_void_p, sizes as
        # c_size_t, structs by reference), so they need no argtypes
        _lib = lib
        return lib
    return None  # no libcublasLt of torch's CUDA version: callers take torch._scaled_mm


def available() -> bool:
    """True when cuBLASLt can be called here (a CUDA device and the library torch uses)."""
    return torch.cuda.is_available() and _load() is not None


def _check(status: int, what: str) -> None:
    if status != 0:
        raise RuntimeError(f"cuBLASLt {what} failed with status {status}")


def _handle(device: int) -> ctypes.c_void_p:
    handle = _handles.get(device)
    if handle is None:
        handle = ctypes.c_void_p()
        with torch.cuda.device(device):
            _check(_lib.cublasLtCreate(ctypes.byref(handle)), "cublasLtCreate")
        _handles[device] = handle
    return handle


def alignment(ptr: int) -> int:
    """The largest power of two (<= 256 bytes) that divides a device pointer: what the heuristic may assume."""
    if ptr == 0:
        return _MAX_ALIGNMENT
    return min(ptr & -ptr, _MAX_ALIGNMENT)


def _set(setter: Any, obj: ctypes.c_void_p, attr: int, value: Any) -> None:
    _check(setter(obj, ctypes.c_int(attr), ctypes.byref(value), ctypes.c_size_t(ctypes.sizeof(value))),
           f"set attribute {attr}")


def _make_plan(key: tuple) -> _Plan | None:
    device, m, n, k, a_type, b_type, out_type, aligns, fast_accum = key
    lib = _lib
    desc = ctypes.c_void_p()
    _check(lib.cublasLtMatmulDescCreate(ctypes.byref(desc), _COMPUTE_32F, _CUDA_R_32F), "MatmulDescCreate")
    _set(lib.cublasLtMatmulDescSetAttribute, desc, _DESC_TRANSA, ctypes.c_int32(_OP_T))
    _set(lib.cublasLtMatmulDescSetAttribute, desc, _DESC_TRANSB, ctypes.c_int32(_OP_N))
    _set(lib.cublasLtMatmulDescSetAttribute, desc, _DESC_FAST_ACCUM, ctypes.c_int8(int(fast_accum)))
    # column-major view of the row-major product: D^T (n x m) = b (n x k) . a^T (k x m)
    layouts = []
    for dtype, rows, cols, ld in ((b_type, k, n, k), (a_type, k, m, k), (out_type, n, m, n)):
        layout = ctypes.c_void_p()
        _check(lib.cublasLtMatrixLayoutCreate(ctypes.byref(layout), dtype, rows, cols, ld), "MatrixLayoutCreate")
        layouts.append(layout)
    pref = ctypes.c_void_p()
    _check(lib.cublasLtMatmulPreferenceCreate(ctypes.byref(pref)), "MatmulPreferenceCreate")
    try:
        _set(lib.cublasLtMatmulPreferenceSetAttribute, pref, _PREF_MAX_WORKSPACE_BYTES, ctypes.c_uint64(0))
        for attr, value in zip(_PREF_MIN_ALIGNMENT, aligns):
            _set(lib.cublasLtMatmulPreferenceSetAttribute, pref, attr, ctypes.c_uint32(value))
        result, count = _HeuristicResult(), ctypes.c_int(0)
        status = lib.cublasLtMatmulAlgoGetHeuristic(
            _handle(device), desc, layouts[0], layouts[1], layouts[2], layouts[2], pref, ctypes.c_int(1),
            ctypes.byref(result), ctypes.byref(count),
        )
    finally:
        lib.cublasLtMatmulPreferenceDestroy(pref)
    if status != 0 or count.value < 1 or result.state != 0 or result.workspace_size != 0:
        return None  # no workspace-free algorithm (descriptors leak once per such key: a handful per process)
    return _Plan(desc, (layouts[0], layouts[1], layouts[2]), result)


def _applies(a: torch.Tensor, b: torch.Tensor, a_scale: torch.Tensor, b_scale: torch.Tensor,
             out_dtype: torch.dtype) -> bool:
    """The contract of scaled_mm (module docstring), on any device; scaled_mm also needs CUDA."""
    return (
        a.device == b.device
        and a.dtype in _FP8_DTYPES and b.dtype in _FP8_DTYPES
        and not (a.dtype == torch.float8_e5m2 and b.dtype == torch.float8_e5m2)  # cuBLASLt has no e5m2 x e5m2
        and out_dtype in _CUDA_TYPES and out_dtype not in _FP8_DTYPES
        and a.dim() == 2 and b.dim() == 2 and a.shape[1] == b.shape[1] and a.shape[0] > 0 and b.shape[0] > 0
        and a.is_contiguous() and b.is_contiguous()
        and a_scale.numel() == 1 and b_scale.numel() == 1
        and a_scale.dtype == torch.float32 and b_scale.dtype == torch.float32
        and a_scale.device == a.device and b_scale.device == a.device
    )


def scaled_mm(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
              out_dtype: torch.dtype = torch.bfloat16, use_fast_accum: bool = False) -> torch.Tensor | None:
    """a (M x K fp8) @ b (N x K fp8)^T * a_scale * b_scale -> M x N out_dtype by a workspace-free cuBLASLt
    algorithm; None where that path does not apply (module docstring), so the caller uses torch._scaled_mm."""
    # torch.compile traces torch._scaled_mm, not a ctypes call
    if (torch.compiler.is_compiling() or not a.is_cuda or not _applies(a, b, a_scale, b_scale, out_dtype)
            or not available()):
        return None
    if torch.autograd._profiler_enabled():  # module docstring: Profiling
        return torch.ops.falqon.cublaslt_scaled_mm(a, a_scale, b, b_scale, out_dtype, bool(use_fast_accum))
    return _matmul(a, a_scale, b, b_scale, out_dtype, use_fast_accum)


PROFILER_OP = "falqon::cublaslt_scaled_mm"


@torch.library.custom_op(PROFILER_OP, mutates_args=())
def _profiled_matmul(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
                     out_dtype: torch.dtype, use_fast_accum: bool) -> torch.Tensor:
    """scaled_mm as a torch op the profiler records; where no workspace-free algorithm exists, the GEMM the caller
    would run instead (torch._scaled_mm)."""
    out = _matmul(a, a_scale, b, b_scale, out_dtype, use_fast_accum)
    if out is None:
        out = torch._scaled_mm(a, b.t(), scale_a=a_scale, scale_b=b_scale, out_dtype=out_dtype,
                               use_fast_accum=use_fast_accum)
    return out


def _matmul(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
            out_dtype: torch.dtype, use_fast_accum: bool) -> torch.Tensor | None:
    """The cuBLASLt call of scaled_mm (its checks done): None when this shape has no workspace-free algorithm."""
    m, k = a.shape
    n = b.shape[0]
    out = torch.empty((m, n), device=a.device, dtype=out_dtype)
    aligns = tuple(alignment(t.data_ptr()) for t in (b, a, out, out))
    device = a.device.index if a.device.index is not None else torch.cuda.current_device()
    key = (device, m, n, k, _CUDA_TYPES[a.dtype], _CUDA_TYPES[b.dtype], _CUDA_TYPES[out_dtype], aligns,
           bool(use_fast_accum))
    with _lock:
        if key not in _plans:
            _plans[key] = _make_plan(key)
        plan = _plans[key]
        if plan is None:
            return None
        lib = _lib
        # the scales live on the device: the pointers are descriptor attributes, set per call
        _set(lib.cublasLtMatmulDescSetAttribute, plan.desc, _DESC_A_SCALE_POINTER, ctypes.c_void_p(b_scale.data_ptr()))
        _set(lib.cublasLtMatmulDescSetAttribute, plan.desc, _DESC_B_SCALE_POINTER, ctypes.c_void_p(a_scale.data_ptr()))
        one, zero = ctypes.c_float(1.0), ctypes.c_float(0.0)
        stream = torch.cuda.current_stream(a.device).cuda_stream
        la, lb, lc = plan.layouts
        _check(lib.cublasLtMatmul(
            _handle(device), plan.desc, ctypes.byref(one), ctypes.c_void_p(b.data_ptr()), la,
            ctypes.c_void_p(a.data_ptr()), lb, ctypes.byref(zero), ctypes.c_void_p(out.data_ptr()), lc,
            ctypes.c_void_p(out.data_ptr()), lc, ctypes.byref(plan.algo.algo), None, ctypes.c_size_t(0),
            ctypes.c_void_p(stream),
        ), "cublasLtMatmul")
    return out
