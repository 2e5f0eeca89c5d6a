"""Regenerate README.md's performance tables from a committed run (never typed by hand).

    python scripts/readme_tables.py results/overhead-h100 reports/overhead-h100

Writes between the README markers: <!-- perf_table --> (the report's perf_table.md) and
<!-- rank_table --> (per layer and rank: falqon's gpu_ms against the fastest other LoRA method, eager
or compiled, CUDA-graph times only).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from falqon_bench.readers.figures.data import points_table
from falqon_bench.data.store import load_run

README = Path(__file__).resolve().parents[1] / "README.md"
LORA_METHODS = ("bf16_lora", "qlora_nf4", "fp8_lora", "fp8_base_lora", "fp6_lora", "halo_lora")


def rank_table(run_dir: Path) -> str:
    df = points_table([load_run(run_dir)])
    df = df[df["ok"] & ~df["kernel_sum_timing"] & (df["metric_kind"] == "gpu")]
    lines = ["| layer | rank | falqon gpu_ms | fastest other LoRA method | its gpu_ms | falqon speedup |",
             "|---|---:|---:|---|---:|---:|"]
    for (layer, rank), g in df.groupby(["layer", "rank"], sort=False):
        ours = g[g["method"] == "falqon"]
        others = g[g["method"].isin(LORA_METHODS)]
        if ours.empty or others.empty:
            continue
        best_ours = ours.loc[ours["metric_ms"].idxmin()]
        best = others.loc[others["metric_ms"].idxmin()]
        ratio = best["metric_ms"] / best_ours["metric_ms"]
        mark = "" if ratio >= 1 else " (falqon slower)"
        lines.append(f"| {layer} | {rank} | {best_ours['metric_ms']:.3f} | {best['variant']} | {best['metric_ms']:.3f} | {ratio:.2f}x{mark} |")
    return "\n".join(lines) + "\n"


def splice(text: str, marker: str, body: str) -> str:
    pattern = re.compile(rf"(<!-- {marker} -->\n).*?(<!-- /{marker} -->)", re.S)
    if not pattern.search(text):
        raise SystemExit(f"README.md has no <!-- {marker} --> ... <!-- /{marker} --> block")
    return pattern.sub(lambda m: m.group(1) + body + m.group(2), text)


def main(run_dir: str, report_dir: str) -> None:
    text = README.read_text()
    text = splice(text, "perf_table", (Path(report_dir) / "perf_table.md").read_text())
    text = splice(text, "rank_table", rank_table(Path(run_dir)))
    README.write_text(text)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    main(sys.argv[1], sys.argv[2])
