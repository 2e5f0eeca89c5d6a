"""Per point of a cliffs run (suites/cliffs.toml): falqon against the best other LoRA method, and against falqon
in an earlier run of the same points (results/shapes-h200: before the kernel levers).

    python scripts/gpu/cliffs_summary.py RUN_DIR [BEFORE_RUN_DIR]

Reads points.jsonl or points.jsonl.gz of each run directory directly (the stable keys of every results row),
so it runs wherever pandas does. Per (layer, rank, tokens): falqon's gpu_ms (best of eager and compiled),
the best other method and its gpu_ms, other / falqon (> 1: falqon faster), falqon's % of floor, falqon's
gpu_ms before and before / now, and where falqon's time went now: the proxy update's kernels (launched
outside any aten op, so "unattributed" by the profiler: merge and row select), quantize+transposes, GEMMs.
Exit 0 whatever the numbers say; 2 on unreadable input.
"""

from __future__ import annotations

import ast
import gzip
import json
import math
import sys
from pathlib import Path
from typing import Any

KEY = ("layer", "rank", "tokens")


def read_points(run_dir: Path) -> list[dict[str, Any]]:
    """Every row of a run directory's points.jsonl (or .gz); raises ValueError naming the file and line."""
    for name in ("points.jsonl", "points.jsonl.gz"):
        path = run_dir / name
        if path.is_file():
            opener = gzip.open if name.endswith(".gz") else open
            rows = []
            with opener(path, "rt") as f:
                for i, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            rows.append(json.loads(line))
                        except json.JSONDecodeError as exc:
                            raise ValueError(f"{path}:{i}: not JSON ({exc.msg})") from None
            return rows
    raise ValueError(f"{run_dir}: no points.jsonl or points.jsonl.gz")


def step_ms(p: dict[str, Any]) -> float | None:
    """gpu_ms (CUDA-graph replay); wall_ms on a CPU run, which has no gpu_ms (the smoke test of the script)."""
    for key in ("gpu_ms", "wall_ms"):
        value = p.get(key)
        if isinstance(value, (int, float)) and value > 0:
            return float(value)
    return None


def _ok(p: dict[str, Any]) -> bool:
    return p.get("status") == "ok" and step_ms(p) is not None


def _kernels(p: dict[str, Any]) -> list[dict[str, Any]]:
    raw = p.get("kernels") or []
    if isinstance(raw, str):  # the runner stores the list as its repr
        try:
            raw = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            return []
    return [k for k in raw if isinstance(k, dict)]


def time_split_us(p: dict[str, Any]) -> tuple[float, float, float]:
    """(proxy update kernels, quantize + transposes, GEMMs) in us of one profiled falqon step."""
    update = quant = gemm = 0.0
    for k in _kernels(p):
        us = 1000.0 * float(k.get("ms") or 0.0)
        name = str(k.get("name", ""))
        if "unattributed" in name or "TopK" in name or "topk" in name or "merge_rows" in name:
            update += us
        elif k.get("category") == "quantize" or "transpose" in name:
            quant += us
        elif k.get("category") in ("gemm_fp8", "gemm_bf16", "lora_gemm"):
            gemm += us
    return update, quant, gemm


def best_by_cell(points: list[dict[str, Any]], method: str | None, exclude: str | None = None) -> dict[tuple, dict]:
    """Fastest ok point per (layer, rank, tokens) of `method` (or of every method but `exclude`)."""
    best: dict[tuple, dict] = {}
    for p in points:
        if not _ok(p) or (method is not None and p.get("method") != method) or p.get("method") == exclude:
            continue
        if p.get("options") not in (None, {}, "{}"):  # default options only
            continue
        key = tuple(p.get(k) for k in KEY)
        if key not in best or step_ms(p) < step_ms(best[key]):
            best[key] = p
    return best


def summary_lines(points: list[dict[str, Any]], before: list[dict[str, Any]] | None) -> list[str]:
    falqon = best_by_cell(points, "falqon")
    others = best_by_cell(points, None, exclude="falqon")
    bf16 = best_by_cell(points, "bf16_lora")
    was = best_by_cell(before, "falqon") if before is not None else {}
    cells = sorted({tuple(p.get(k) for k in KEY) for p in points}, key=lambda c: (str(c[0]), c[2], c[1]))
    head = (f"{'layer':<15} {'r':>4} {'M':>6} | {'falqon':>7} {'best other':>22} {'x':>5} {'%floor':>6} | "
            f"{'before':>7} {'b/now':>5} | {'update':>6} {'quant':>6} {'gemm':>6} us")
    lines = ["gpu_ms (CUDA-graph replay; wall_ms on a CPU run), best of eager/compiled; x = best other / falqon (> 1: faster);",
             "before = falqon in the earlier run; update / quant / gemm = falqon's profiled kernels", head,
             "-" * len(head)]
    lost, slower_than_bf16 = [], []
    for cell in cells:
        f, o = falqon.get(cell), others.get(cell)
        f_ms = step_ms(f) if f else math.nan
        o_ms = step_ms(o) if o else math.nan
        o_name = (o["method"] + ("+compile" if o.get("compile") else "")) if o else "-"
        pct = f.get("pct_of_floor") if f else None
        b = was.get(cell)
        b_ms = step_ms(b) if b else math.nan
        update, quant, gemm = time_split_us(f) if f else (math.nan,) * 3
        lines.append(
            f"{cell[0]:<15} {cell[1]:>4} {cell[2]:>6} | {f_ms:7.3f} {o_name:>14} {o_ms:7.3f} {o_ms / f_ms:5.2f} "
            f"{pct if pct is not None else math.nan:6.1f} | {b_ms:7.3f} {b_ms / f_ms:5.2f} | "
            f"{update:6.1f} {quant:6.1f} {gemm:6.1f}"
        )
        if f and o and o_ms < f_ms:
            lost.append(f"  {cell[0]} r={cell[1]} M={cell[2]}: {o_name} {o_ms:.3f} < falqon {f_ms:.3f} ms")
        if f and cell in bf16 and step_ms(bf16[cell]) < f_ms:
            slower_than_bf16.append(f"  {cell[0]} r={cell[1]} M={cell[2]}: bf16_lora {step_ms(bf16[cell]):.3f} ms")
    lines += ["", f"falqon not the fastest: {len(lost)} of {len(cells)} cells"] + lost
    lines += ["", f"falqon slower than bf16_lora: {len(slower_than_bf16)} cells"] + slower_than_bf16
    return lines


def main(argv: list[str]) -> int:
    if not 1 <= len(argv) <= 2:
        print(__doc__)
        return 2
    try:
        points = read_points(Path(argv[0]))
        before = read_points(Path(argv[1])) if len(argv) == 2 else None
    except (OSError, ValueError) as exc:
        print(f"cannot read results: {exc}")
        return 2
    print("\n".join(summary_lines(points, before)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
