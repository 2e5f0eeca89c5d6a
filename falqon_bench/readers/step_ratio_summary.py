"""Step-time ratios of one method's option sets to its default, over repeated runs (no torch).

Why repeated: on a power-capped GPU two runs of the same side-by-side comparison differ by up to ~3% in their
ratios (results/probes-step-h200/variant-cache-flush), as much as issue 12's target for the accuracy variant,
so scripts/gpu/accuracy.sh times default falqon and the variant in several back-to-back runs ("rounds") and
this prints each round's ratios and their median (min-max).

A point's time is its gpu_ms (CUDA-graph replay), else wall_ms (CPU runs); rows that are not ok count as missing.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path
from typing import Any

from falqon_bench.data.schema import option_text
from falqon_bench.data.errors import script_exit_code
from falqon_bench.data.store import POINTS, POINTS_GZ, load_run

DEFAULT = "default"
Cell = tuple[str, int, int]  # layer, rank, tokens


def option_label(options: Any) -> str:
    """'default' for no options, else the point's option text (sorted key=value pairs)."""
    return option_text(options) or DEFAULT


def step_times(rows: list[dict[str, Any]]) -> dict[Cell, dict[str, float | None]]:
    """(layer, rank, tokens) -> option label -> the point's step time in ms (None when not ok)."""
    out: dict[Cell, dict[str, float | None]] = {}
    for r in rows:
        ms = (r.get("gpu_ms") or r.get("wall_ms")) if r.get("status") == "ok" else None
        out.setdefault((r["layer"], int(r["rank"]), int(r["tokens"])), {})[option_label(r.get("options"))] = ms
    return out


def ratios(times: dict[str, float | None]) -> dict[str, float | None]:
    """option label -> its time over the default's (None where either is missing); the default itself left out."""
    base = times.get(DEFAULT)
    return {label: (ms / base if ms and base else None) for label, ms in times.items() if label != DEFAULT}


def median_ratios(rounds: list[dict[Cell, dict[str, float | None]]]) -> dict[Cell, dict[str, tuple[float, float, float, int]]]:
    """cell -> option label -> (median, min, max, rounds counted) of the per-round ratios to default."""
    seen: dict[Cell, dict[str, list[float]]] = {}
    for times in rounds:
        for cell, by_label in times.items():
            for label, ratio in ratios(by_label).items():
                if ratio is not None:
                    seen.setdefault(cell, {}).setdefault(label, []).append(ratio)
    return {cell: {label: (statistics.median(xs), min(xs), max(xs), len(xs)) for label, xs in by.items()}
            for cell, by in seen.items()}


def summary_lines(rounds: list[list[dict[str, Any]]]) -> list[str]:
    """Per round: each cell's time per option set and its ratio to default; then the median over rounds."""
    per_round = [step_times(rows) for rows in rounds]
    if not any(per_round):
        return ["layer step: no points"]
    labels = sorted({label for times in per_round for by in times.values() for label in by} - {DEFAULT})
    names = {label: f"opt{i + 1}" for i, label in enumerate(labels)}
    lines = ["layer step, ms (gpu_ms, else wall_ms): option sets against default"]
    lines += [f"  {names[label]} = {label}" for label in labels]
    fmt = lambda x, spec: "-" if x is None else format(x, spec)  # noqa: E731
    for i, times in enumerate(per_round, 1):
        lines.append(f"round {i}:")
        lines.append(f"  {'layer':<18} {'rank':>4} {'tokens':>6} {'default':>9} " + " ".join(
            f"{names[label]:>9} {'ratio':>6}" for label in labels))
        for (layer, rank, tokens), by in times.items():
            r = ratios(by)
            lines.append(f"  {layer:<18} {rank:>4} {tokens:>6} {fmt(by.get(DEFAULT), '.4f'):>9} " + " ".join(
                f"{fmt(by.get(label), '.4f'):>9} {fmt(r.get(label), '.3f'):>6}" for label in labels))
    medians = median_ratios(per_round)
    lines.append(f"median (min-max) of the ratio to default over {len(per_round)} round(s):")
    for (layer, rank, tokens), by in medians.items():
        cells = [f"{names[label]} {m:.3f} ({lo:.3f}-{hi:.3f}, {n})" for label, (m, lo, hi, n) in sorted(by.items())]
        lines.append(f"  {layer:<18} {rank:>4} {tokens:>6}  " + "   ".join(cells))
    return lines


def read_rows(run: str | Path) -> list[dict[str, Any]]:
    """The points of a run directory (or its points file) through the results store (gzip'd files, a partial last
    line, a resumed run's retried points); none where the run wrote no points (absent, or killed before its first)."""
    path = Path(run)
    run_dir = path if path.is_dir() else path.parent
    points = [run_dir / POINTS, run_dir / POINTS_GZ]
    if not path.exists() or not any(p.exists() and p.stat().st_size for p in points):
        return []
    return load_run(path).points


def main(argv: list[str] | None = None) -> int:
    """python -m falqon_bench.readers.step_ratio_summary RUN_DIR...: one round per run directory."""
    runs = argv if argv is not None else sys.argv[1:]
    return script_exit_code(lambda: print("\n".join(summary_lines([read_rows(run) for run in runs]))))


if __name__ == "__main__":
    sys.exit(main())
