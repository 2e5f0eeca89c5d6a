"""The `kind = "kernels"` suite: micro-benchmarks of falqon_core's kernels, one point per (kernel variant, shape, cache).

    kind = "kernels"
    name = "kernels"
    device = "cuda"           # "cpu" / "auto" run on a CPU too (wall time only; Triton needs TRITON_INTERPRET=1)
    kernels = ["quantize", "proxy", "gemm", "transpose"]   # default: every kernel [shapes] gives shapes for
    caches = ["warm", "cold"]                              # cold: L2 flushed before every sample
    formats = ["e4m3", "e5m2"]                             # quantize: the fp8 formats
    granularities = ["tensorwise", "rowwise"]              # quantize: one scale, or one per row
    implementations = ["triton", "torch", "torch_compile", "cublas"]   # which variants of each kernel
    [timing]
    budget_ms = 300           # sampling time per point, ms
    warmup_ms = 100
    min_samples = 30
    [shapes]
    quantize = [[4096, 4096]]            # (rows, cols) of a bf16 input
    proxy = [[4096, 4096, 64, 64]]       # (N, K, r, k): W8 N x K, A8 r x K, B N x r, top-k rows
    gemm = [[4096, 4096, 4096, 64]]      # (M, K, N, r): x M x K against the melded (N+r) x K matrix
    transpose = [[4096, 11008]]          # (rows, cols) of an e4m3 input

The cases themselves (method names 'kernel.<kernel>.<implementation>', bytes, FLOPs) and what a point does are
falqon_bench.measure.kernel_bench's; this module validates the file, expands it to points (the identity keys of
every kernels run, so point ids match the committed runs), checks a point can run here, and tabulates the rows.
Points are grouped for the runner's worker processes by kernel (`worker_group`), not by method.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from falqon_bench.data.errors import BenchInputError

KIND = "kernels"
KERNELS = ("quantize", "proxy", "gemm", "transpose")  # kernel_bench.KERNELS, here without importing torch
SHAPE_ARITY = {"quantize": ("rows", "cols"), "proxy": ("N", "K", "r", "k"), "gemm": ("M", "K", "N", "r"),
               "transpose": ("rows", "cols")}
_SHAPES_HELP = "; ".join(f"{k} = [[{', '.join(v)}], ...]" for k, v in SHAPE_ARITY.items())


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class KernelTiming(_Strict):
    """Sampling of each point (falqon_bench.measure.timing: warm up by time, then sample). Times in ms."""

    budget_ms: float = Field(300.0, gt=0)
    warmup_ms: float = Field(100.0, ge=0)
    min_samples: int = Field(30, gt=0)


class KernelShapesTable(_Strict):
    """[shapes]: per kernel a list of shapes (see SHAPE_ARITY for what each number is)."""

    quantize: list[list[int]] = Field(default_factory=list)
    proxy: list[list[int]] = Field(default_factory=list)
    gemm: list[list[int]] = Field(default_factory=list)
    transpose: list[list[int]] = Field(default_factory=list)


class KernelsSuiteFile(_Strict):
    """The top level of a kernels suite file, exactly as written (strict: a typo is an unknown key)."""

    kind: Literal["kernels"]
    name: str = Field(min_length=1)
    description: str = ""
    device: Literal["cuda", "cpu", "auto"] = "cuda"
    kernels: list[Literal["quantize", "proxy", "gemm", "transpose"]] | None = Field(None, min_length=1)
    caches: list[Literal["warm", "cold"]] = Field(default_factory=lambda: ["warm", "cold"], min_length=1)
    formats: list[Literal["e4m3", "e5m2"]] = Field(default_factory=lambda: ["e4m3", "e5m2"], min_length=1)
    granularities: list[Literal["tensorwise", "rowwise"]] = Field(default_factory=lambda: ["tensorwise", "rowwise"], min_length=1)
    implementations: list[Literal["triton", "torch", "torch_compile", "cublas"]] = Field(
        default_factory=lambda: ["triton", "torch", "torch_compile", "cublas"], min_length=1)
    timing: KernelTiming = Field(default_factory=KernelTiming)
    shapes: KernelShapesTable = Field(default_factory=KernelShapesTable)  # none at all: validate says what to write


ALLOWED_KEYS = tuple(KernelsSuiteFile.model_fields)


def validate_kernels_suite(data: dict[str, Any], file: Path | str = "<suite>", text: str = ""):
    """Parsed TOML -> suite.Suite of kind 'kernels' (its settings in `kind_spec`); one-paragraph BenchInputError."""
    from falqon_bench.suites.suite import Suite, Timing, explain_top_level_error, find_key_line

    try:
        spec = KernelsSuiteFile.model_validate(data)
    except ValidationError as e:
        tables = {"timing": tuple(KernelTiming.model_fields), "shapes": KERNELS}
        raise BenchInputError(explain_top_level_error(e, file, text, ALLOWED_KEYS, tables)) from None

    def at(table: str | None, key: str) -> str:
        line = find_key_line(text, table, None, key)
        return (f"[{table}] of " if table else "") + f"{file}" + (f" line {line}" if line else "")

    for kernel in KERNELS:
        names = SHAPE_ARITY[kernel]
        for i, shape in enumerate(getattr(spec.shapes, kernel)):
            if len(shape) != len(names) or min(shape) < 1:
                raise BenchInputError(
                    f"bad shape {shape} (item {i + 1}) for `{kernel}` in {at('shapes', kernel)}: a {kernel} shape is "
                    f"{len(names)} integers >= 1, [{', '.join(names)}]")
            if kernel == "proxy" and shape[3] > shape[2]:
                raise BenchInputError(f"bad shape {shape} (item {i + 1}) for `proxy` in {at('shapes', 'proxy')}: top-k rows "
                                      f"k = {shape[3]} exceeds the rank r = {shape[2]}; a proxy shape is [N, K, r, k] with k <= r")
    with_shapes = [k for k in KERNELS if getattr(spec.shapes, k)]
    chosen = spec.kernels if spec.kernels is not None else with_shapes
    lacking = [k for k in chosen if k not in with_shapes]
    if lacking or not chosen:
        raise BenchInputError(
            f"the kernels suite {file} runs no shapes for {', '.join(lacking) or 'any kernel'}: give each kernel it runs "
            f"a list of shapes in [shapes] ({_SHAPES_HELP})"
            + (f"; `kernels` at {at(None, 'kernels')}" if spec.kernels is not None else ""))
    spec = spec.model_copy(update={"kernels": list(dict.fromkeys(chosen))})
    return Suite(
        name=spec.name, description=spec.description, device=spec.device,
        timing=Timing(budget_ms=spec.timing.budget_ms, warmup_ms=spec.timing.warmup_ms, min_samples=spec.timing.min_samples, profile=False),
        grids=[], path=Path(file) if isinstance(file, Path) else None, raw_text=text,
        spec=spec.model_dump(mode="json"), kind=KIND, kind_spec=spec,
    )


def only_kernels(suite, kernels: tuple[str, ...] | list[str]):
    """The suite restricted to these kernels (`falqon-bench kernels --only`); a kernel it has no shapes for is an error."""
    import dataclasses

    spec: KernelsSuiteFile = suite.kind_spec
    lacking = [k for k in kernels if not getattr(spec.shapes, k)]
    if lacking:
        raise BenchInputError(f"--only {','.join(kernels)}: the suite {suite.name!r} ({suite.path or 'built in'}) has no shapes "
                              f"for {', '.join(lacking)}; it has shapes for {', '.join(k for k in KERNELS if getattr(spec.shapes, k))}")
    spec = spec.model_copy(update={"kernels": [k for k in KERNELS if k in kernels]})
    return dataclasses.replace(suite, kind_spec=spec, spec=spec.model_dump(mode="json"))


def expand_kernels_suite(suite) -> list[dict[str, Any]]:
    """One point per (kernel case, cache) in kernel_bench's run order; each kernel's points form one worker group."""
    from falqon_bench.measure.kernel_bench import case_point, cases_of

    spec: KernelsSuiteFile = suite.kind_spec
    points, seen = [], set()
    for kernel in KERNELS:
        if kernel not in spec.kernels:
            continue
        for shape in getattr(spec.shapes, kernel):
            for case in cases_of(kernel, tuple(shape), compile_reference="torch_compile" in spec.implementations):
                if case.impl not in spec.implementations:
                    continue
                if kernel == "quantize" and (case.params["fmt"] not in spec.formats or case.params["granularity"] not in spec.granularities):
                    continue
                for cache in spec.caches:
                    point = case_point(case, cache, suite.name).as_dict(
                        kind=KIND, kernel=kernel, kernel_shape=list(shape), worker_group=f"kernel.{kernel}", per_block=1)
                    if point["point_id"] not in seen:
                        seen.add(point["point_id"])
                        points.append(point)
    return points


def precheck_kernels_point(point: dict[str, Any], device) -> str | None:
    """Why a kernel point cannot run on this device (the runner's check before a worker starts), or None.

    Triton variants on a CPU need the interpreter (TRITON_INTERPRET=1 in the environment of the run); Triton's fp8
    casts and the cuBLASLt fp8 GEMM need compute capability 8.9 or newer. Torch references run anywhere."""
    from falqon_core.fp8 import FP8_MIN_CAPABILITY
    from falqon_core.kernels._triton_common import is_interpreter

    impl = point["method"].rsplit(".", 1)[-1]
    if device.type != "cuda":
        if impl == "triton" and not is_interpreter():
            return "Triton kernels need a CUDA GPU; on a CPU set TRITON_INTERPRET=1 before the run (the interpreter: correct, not fast)"
        return None
    if impl in ("triton", "cublas"):
        import torch

        capability = torch.cuda.get_device_capability(device)
        if tuple(capability) < FP8_MIN_CAPABILITY:
            return (f"fp8 {'Triton casts' if impl == 'triton' else 'cuBLASLt GEMMs'} need compute capability "
                    f"{FP8_MIN_CAPABILITY[0]}.{FP8_MIN_CAPABILITY[1]}+ (Ada, Hopper); this GPU is {capability[0]}.{capability[1]}")
    return None


def measure_kernels_point(point: dict[str, Any], ctx) -> dict[str, Any]:
    """suite.KINDS entry point for the worker: time one kernel case (falqon_bench.measure.kernel_bench, torch)."""
    from falqon_bench.measure.kernel_bench import measure_suite_point

    return measure_suite_point(point, ctx)


def tabulate_kernels_rows(rows: list[dict[str, Any]]):
    """The runner's summary of a kernels run: ms, GB/s, % of copy bandwidth, TFLOP/s per case (kernel_bench.points_table)."""
    from falqon_bench.measure.kernel_bench import points_table

    return points_table(rows)
