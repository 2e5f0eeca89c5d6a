"""Time every launch config in quantize_configs.TUNE_GRID of the four memory-bound quantize kernels (GPU, < 2 min on
an H200) and print the per-shape-class winners as a TUNED block to paste into falqon_core/kernels/quantize_configs.py.

Kernels and inputs (bf16 unless noted; FALQON's layer step): partial_amax (max |x|), cast_tensorwise (x -> e4m3),
cast_transpose (x -> e5m2 row-major + transposed, pad_to 16), transpose_bytes (fp8 W8 -> W8^T). Each candidate's
output must be bit-identical to the default config's (and the default's to the torch reference); one that is not
is reported and never wins. Times are CUDA-graph replays of back-to-back launches (triton's do_bench_cudagraph,
median), L2 not flushed: as the layer step runs them (a 32 MB input partly sits in the H200's 50 MB L2).

    PYTHONPATH=$PWD python scripts/gpu/tune_quantize.py --out /tmp/tune_quantize.json
    PYTHONPATH=$PWD python scripts/gpu/tune_quantize.py --cpu-smoke   # interpreter, tiny shapes, identity only
"""

from __future__ import annotations

import os
import sys

if "--cpu-smoke" in sys.argv:  # before triton.jit runs: the interpreter is chosen at decoration time
    os.environ["TRITON_INTERPRET"] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict  # noqa: E402

import torch  # noqa: E402
import triton  # noqa: E402

from falqon_core import fp8  # noqa: E402
from falqon_core.kernels import quantize_configs as qc  # noqa: E402
from falqon_core.kernels.quantize import launch_cast_tensorwise, launch_partial_amax, quantize_fp8_reference  # noqa: E402
from falqon_core.kernels.quantize_transpose import launch_cast_transpose, quantize_transpose_fp8_reference  # noqa: E402
from falqon_core.kernels.transpose import launch_transpose_bytes, transpose_fp8_reference  # noqa: E402

# one or more shapes per class that FALQON's layers hit: x (M x K) and dY (M x N) at 512-16384 tokens, incl. a GQA kv
# dY (M x 1024) at 512 and 2048 tokens, where a step is a string of short launches (classes le1M/narrow, le4M/narrow)
SHAPES = [(4096, 4096), (4096, 1024), (4096, 11008), (4096, 14336), (3000, 4096), (512, 4096), (16384, 4096),
          (512, 1024), (2048, 1024), (4096, 16), (2048, 64)]  # last two: O_A (M x r, class le1M/thin)
TRANSPOSE_SHAPES = [(4096, 4096), (11008, 4096), (1024, 4096)]  # W8 (N x K) of attn, up, kv
SMOKE_SHAPES = [(77, 130), (300, 96)]
SMOKE_TRANSPOSE_SHAPES = [(77, 130), (130, 33)]
# cast_transpose first: the biggest lever, so a run cut short by the budget still has it
ORDER = ("cast_transpose", "partial_amax", "cast_tensorwise", "transpose_bytes")
PAD_TO = 16


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (fp8 NaN encodings and -0.0 included), any dtype and dim."""
    bits = lambda t: t.reshape(-1).view(torch.uint8)  # noqa: E731
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b))


def make_case(kernel: str, shape: tuple[int, int], device: torch.device):
    """(run(cfg) -> tuple of output tensors, the torch reference's outputs, bytes moved per launch)."""
    n_rows, n_cols = shape
    n = n_rows * n_cols
    gen = torch.Generator(device).manual_seed(0)
    if kernel == "transpose_bytes":
        w8 = torch.randint(0, 256, shape, dtype=torch.uint8, device=device, generator=gen).view(fp8.E4M3)
        return (lambda cfg: (launch_transpose_bytes(w8, 1, cfg),)), (transpose_fp8_reference(w8, 1),), 2 * n
    x = (torch.randn(shape, device=device, generator=gen) * 3).bfloat16()
    x.view(-1)[n // 3] = -700.0  # the amax away from both ends of the walk
    if kernel == "partial_amax":
        flat = x.view(-1)
        return (lambda cfg: (launch_partial_amax(flat, cfg).max(),)), (x.float().abs().max(),), 2 * n
    partials = launch_partial_amax(x.view(-1), qc.DEFAULTS["partial_amax"])
    if kernel == "cast_tensorwise":
        run = lambda cfg: launch_cast_tensorwise(x, partials, fp8.E4M3, None, cfg)  # noqa: E731
        return run, quantize_fp8_reference(x, fp8.E4M3), 3 * n
    if kernel == "cast_transpose":
        run = lambda cfg: launch_cast_transpose(x, partials, fp8.E5M2, PAD_TO, True, None, cfg)  # noqa: E731
        return run, quantize_transpose_fp8_reference(x, fp8.E5M2, PAD_TO), 4 * n
    raise ValueError(f"unknown kernel {kernel!r}")


def identical(got: tuple, want: tuple) -> bool:
    return len(got) == len(want) and all(same_bytes(g, w) for g, w in zip(got, want))


def time_us(fn) -> float:
    """Median microseconds per launch, back to back, L2 not flushed."""
    if hasattr(triton.testing, "do_bench_cudagraph"):
        return 1000.0 * triton.testing.do_bench_cudagraph(fn, rep=5, return_mode="median")
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(200):
        fn()
    end.record()
    torch.cuda.synchronize()
    return 1000.0 * start.elapsed_time(end) / 200


def describe(cfg) -> str:
    return " ".join(f"{k}={v}" for k, v in asdict(cfg).items())


def tune_shape(kernel, shape, candidates, device, timing: bool, deadline: float) -> dict:
    run, want, n_bytes = make_case(kernel, shape, device)
    base = run(candidates[0])
    row = {"kernel": kernel, "shape": list(shape), "class": qc.shape_class(kernel, *shape), "bytes": n_bytes,
           "default_matches_reference": identical(base, want), "candidates": []}
    for cfg in candidates:
        entry = {"config": asdict(cfg), "identical": identical(run(cfg), base)}  # this call also compiles cfg
        if timing and entry["identical"]:
            if time.monotonic() > deadline:
                entry["skipped"] = "time budget"
            else:
                entry["us"] = time_us(lambda: run(cfg))
                entry["tbps"] = n_bytes / entry["us"] / 1e6
        row["candidates"].append(entry)
    return row


def best_of(row: dict) -> dict | None:
    timed = [c for c in row["candidates"] if "us" in c]
    return min(timed, key=lambda c: c["us"]) if timed else None


def pick_table(rows: list[dict], min_gain: float) -> dict:
    """Per kernel and shape class: the config with the lowest mean (time / default's time) over the class's tuned
    shapes, among those identical and timed on all of them; kept only if it beats the default by min_gain."""
    table = {k: {} for k in qc.KERNELS}
    for kernel in qc.KERNELS:
        by_class: dict[str, list[dict]] = {}
        for row in rows:
            if row["kernel"] == kernel:
                by_class.setdefault(row["class"], []).append(row)
        for cls, members in sorted(by_class.items()):
            scores: dict[int, list[float]] = {}
            for row in members:
                default_us = row["candidates"][0].get("us")
                if default_us is None:
                    continue
                for i, c in enumerate(row["candidates"]):
                    if "us" in c:
                        scores.setdefault(i, []).append(c["us"] / default_us)
            complete = {i: sum(s) / len(s) for i, s in scores.items() if len(s) == len(members)}
            if not complete:
                continue
            i = min(complete, key=complete.get)
            if i != 0 and complete[i] < 1.0 - min_gain:
                cfg = qc.TUNE_GRID[kernel][i]
                table[kernel][cls] = qc.as_overrides(kernel, cfg)
                print(f"  {kernel:16s} {cls:14s} {describe(cfg)}  mean time {complete[i]:.2f}x default's")
    return table


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="JSON of every timing and the winners' table (key 'table')")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="TRITON_INTERPRET=1, tiny shapes, 2 candidates per kernel, bit-identity only")
    parser.add_argument("--budget-s", type=float, default=110.0, help="stop timing (still check and report) after this")
    parser.add_argument("--min-gain", type=float, default=0.03, help="a winner must beat the default by this fraction")
    parser.add_argument("--kernels", nargs="+", default=list(ORDER), choices=ORDER)
    args = parser.parse_args()
    t0 = time.monotonic()
    if args.cpu_smoke:
        device, shapes, t_shapes = torch.device("cpu"), SMOKE_SHAPES, SMOKE_TRANSPOSE_SHAPES
        grid = {k: (g[0], g[-1]) for k, g in qc.TUNE_GRID.items()}
    else:
        if not torch.cuda.is_available():
            parser.error("needs a CUDA GPU (or --cpu-smoke)")
        device, shapes, t_shapes, grid = torch.device("cuda"), SHAPES, TRANSPOSE_SHAPES, qc.TUNE_GRID
        print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}", flush=True)
    deadline = t0 + args.budget_s
    rows = []
    for kernel in args.kernels:
        for shape in (t_shapes if kernel == "transpose_bytes" else shapes):
            row = tune_shape(kernel, shape, grid[kernel], device, not args.cpu_smoke, deadline)
            rows.append(row)
            default, best = row["candidates"][0], best_of(row)
            bad = [describe(qc.TUNE_GRID[kernel][i]) for i, c in enumerate(row["candidates"]) if not c["identical"]]
            line = f"[{time.monotonic() - t0:5.1f}s] {kernel:16s} {str(shape):14s} {row['class']:14s}"
            if best is not None and "us" in default:
                line += (f" default {default['us']:7.1f} us {default['tbps']:4.2f} TB/s | best {best['us']:7.1f} us "
                         f"{best['tbps']:4.2f} TB/s  {describe(qc.make_config(kernel, best['config']))}")
            else:
                line += f" {len(row['candidates'])} configs checked"
            print(line, flush=True)
            if bad or not row["default_matches_reference"]:
                print(f"  NOT BIT-IDENTICAL: {bad or ''} default vs reference: {row['default_matches_reference']}")
            if device.type == "cuda":
                torch.cuda.empty_cache()
    failed = [r for r in rows if not r["default_matches_reference"] or not all(c["identical"] for c in r["candidates"])]
    skipped = sum(1 for r in rows for c in r["candidates"] if "skipped" in c)
    table = {k: {} for k in qc.KERNELS}
    if not args.cpu_smoke:
        print("winners per shape class (classes not listed keep the defaults):")
        table = pick_table(rows, args.min_gain)
        if skipped:
            print(f"  ({skipped} timings skipped by --budget-s {args.budget_s:g}: raise it or pass fewer --kernels)")
        print("\n# paste into falqon_core/kernels/quantize_configs.py:\nTUNED: dict[str, dict[str, dict]] = "
              + json.dumps(table, indent=4).replace("null", "None"))
    if args.out:
        meta = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (interpreter)",
                "torch": torch.__version__, "triton": triton.__version__, "seconds": round(time.monotonic() - t0, 1)}
        with open(args.out, "w") as f:
            json.dump({**meta, "results": rows, "table": table}, f, indent=1)
        print(f"wrote {args.out}")
    print(f"{len(rows)} kernel-shapes, {'all bit-identical' if not failed else f'{len(failed)} NOT bit-identical'}, "
          f"{time.monotonic() - t0:.1f}s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
