"""The fast-stacks e2e run as one table: tokens/s and peak memory per (method, mode, liger), and falqon's speedup.

    python scripts/gpu/fast_stacks_e2e_summary.py RUN_DIR [--method falqon]

Reads RUN_DIR/points.jsonl (an e2e suite run, see scripts/gpu/fast_stacks_e2e.sh) and prints, fastest first:
method, mode, liger, tokens/s, step ms (median), peak GiB, and for points that did not run their error
("unsupported: ..." where a stack cannot run here). The last lines name the fastest point of `--method` and the
fastest point of every other stack, and the ratio of their tokens/s (> 1: falqon is faster). Exits 0 (the
numbers are the result); 2 when the run directory holds no points.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def load_rows(run_dir: Path) -> list[dict[str, Any]]:
    """The points of a run directory (whole lines only: a run stopped mid-write leaves a partial last line)."""
    rows = []
    for line in (run_dir / "points.jsonl").read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def variant(row: dict[str, Any]) -> str:
    """'falqon cuda_graph', 'bf16_lora compile +liger': one point of the run."""
    options = row.get("options") or {}
    return f"{row['method']} {row.get('mode') or options.get('mode')}" + (" +liger" if options.get("liger") else "")


def speedup_over_fastest(rows: list[dict[str, Any]], method: str = "falqon") -> dict[str, Any] | None:
    """`method`'s fastest ok point against the fastest ok point of every other method (tokens/s, any mode/liger).

    Returns {"mine": row, "fastest_other": row, "speedup": mine tokens/s / fastest other's}; None when either
    side has no ok point with tokens_per_s.
    """
    ok = [r for r in rows if r.get("status") == "ok" and r.get("tokens_per_s")]
    mine = [r for r in ok if r["method"] == method]
    others = [r for r in ok if r["method"] != method]
    if not mine or not others:
        return None
    best = max(mine, key=lambda r: r["tokens_per_s"])
    fastest_other = max(others, key=lambda r: r["tokens_per_s"])
    return {"mine": best, "fastest_other": fastest_other, "speedup": best["tokens_per_s"] / fastest_other["tokens_per_s"]}


def summary_lines(rows: list[dict[str, Any]], method: str = "falqon") -> list[str]:
    """The table (ok points by tokens/s, fastest first, then the others with their error) and the speedup line."""
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    ok = sorted((r for r in rows if r.get("status") == "ok"), key=lambda r: -(r.get("tokens_per_s") or 0.0))
    lines = [f"{'point':34} {'tokens/s':>9} {'step ms':>8} {'peak GiB':>8}  status"]
    for r in ok + [r for r in rows if r.get("status") != "ok"]:
        peak = r["peak_mem_bytes"] / 2**30 if r.get("peak_mem_bytes") else None
        status = "ok" if r.get("status") == "ok" else str(r.get("error") or r.get("status"))[:150]
        lines.append(f"{variant(r):34} {fmt(r.get('tokens_per_s'), ',.0f'):>9} {fmt(r.get('wall_ms'), '.1f'):>8} "
                     f"{fmt(peak, '.1f'):>8}  {status}")
    result = speedup_over_fastest(rows, method)
    if result is None:
        lines.append(f"\n{method}'s speedup over the fastest other stack: not measured (no ok point on one side)")
    else:
        lines.append(f"\n{method}'s speedup over the fastest other stack: {result['speedup']:.2f}x "
                     f"({variant(result['mine'])}, {result['mine']['tokens_per_s']:,.0f} tokens/s, against "
                     f"{variant(result['fastest_other'])}, {result['fastest_other']['tokens_per_s']:,.0f} tokens/s)")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--method", default="falqon", help="the method whose speedup is reported (default: falqon)")
    args = parser.parse_args(argv)
    if not (args.run_dir / "points.jsonl").is_file():
        print(f"error: {args.run_dir} holds no points.jsonl: the run wrote no point", file=sys.stderr)
        return 2
    print("\n".join(summary_lines(load_rows(args.run_dir), args.method)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
