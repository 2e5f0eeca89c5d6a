"""Per point: the suite run's median gpu_ms against pytest-benchmark's median of the same point from
`pytest benchmarks --benchmark-json`, their ratio, and whether it is within a tolerance (default 3%).

    python scripts/gpu/median_table.py RUN_DIR OUT_JSON [--tolerance 0.03]

Prints a markdown table and a summary line; exits 0 (the numbers are the result, not a gate). The
pytest-benchmark median is read from the JSON's own stats (seconds), not recomputed from its samples.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from falqon_bench.readers.gate import point_key
from falqon_bench.data.store import load_results


def median_rows(run_path: Path, bench_json: Path, tolerance: float) -> list[dict]:
    run = load_results(run_path)
    doc = json.loads(Path(bench_json).read_text())
    bench_by_id = {b["extra_info"].get("point_id"): b for b in doc.get("benchmarks", []) if isinstance(b.get("extra_info"), dict)}
    rows = []
    for p in run.points:
        bench = bench_by_id.pop(p.get("point_id"), None)
        suite_ms = p.get("gpu_ms") if p.get("gpu_ms") is not None else p.get("wall_ms")
        bench_ms = bench["stats"]["median"] * 1e3 if bench else None
        ratio = bench_ms / suite_ms if bench_ms is not None and suite_ms else None
        within = None if ratio is None else abs(ratio - 1.0) <= tolerance
        note = "" if bench else "no pytest-benchmark result"
        if p.get("status") != "ok":
            note = f"suite: {p.get('error')}"
        rows.append({"key": point_key(p), "suite_ms": suite_ms, "bench_ms": bench_ms, "ratio": ratio, "within": within, "note": note})
    for bench in bench_by_id.values():
        rows.append({"key": point_key(bench["extra_info"]), "suite_ms": None, "bench_ms": bench["stats"]["median"] * 1e3,
                     "ratio": None, "within": None, "note": "not in the suite run"})
    return rows


def render(rows: list[dict], tolerance: float) -> str:
    def fmt(v, spec):
        return "-" if v is None else format(v, spec)

    lines = [f"| point | suite median ms | pytest-benchmark median ms | ratio | within {tolerance:.0%} | note |",
             "|---|---:|---:|---:|:---:|---|"]
    for r in rows:
        within = "-" if r["within"] is None else ("yes" if r["within"] else "NO")
        lines.append(f"| {r['key']} | {fmt(r['suite_ms'], '.4f')} | {fmt(r['bench_ms'], '.4f')} | {fmt(r['ratio'], '.4f')} | {within} | {r['note']} |")
    compared = [r for r in rows if r["within"] is not None]
    worst = max((abs(r["ratio"] - 1) for r in compared), default=None)
    lines.append("")
    lines.append(f"{sum(r['within'] for r in compared)} of {len(rows)} points within {tolerance:.0%}"
                 + (f"; largest deviation {worst:.2%}" if worst is not None else ""))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("bench_json")
    ap.add_argument("--tolerance", type=float, default=0.03)
    args = ap.parse_args()
    print(render(median_rows(Path(args.run), Path(args.bench_json), args.tolerance), args.tolerance))


if __name__ == "__main__":
    main()
