"""Summary of a shapes sweep (suites/shapes.toml) and of the fast-accum comparison, from result files only.

    python scripts/gpu/shapes_summary.py RUN_DIR [FAST_ACCUM_RUN_DIR]

Prints: every point with >= 2048 tokens where falqon is not the fastest LoRA method (winner and margin; cells where
falqon has no point are listed apart), every point where falqon is slower than bf16_lora, falqon's % of floor per
layer class and every point below the issue's floor targets, falqon against the
best bf16_lora (eager or compiled) at r = 64, 4096 tokens on llama-7b attn/up/down, falqon's option sets side
by side where it ran several (suites/db-path.toml), and falqon's gpu_ms with fast_accum on and off.
Exit 0 whatever the numbers say (a summary, not a gate); 2 on unreadable input.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd

from falqon_bench.readers.figures.data import best_of_compile, points_table
from falqon_bench.readers.figures.winners import winners_table
from falqon_bench.data.store import ResultsError, load_run

MIN_TOKENS = 2048
FLOOR_TARGET_PCT = {"K,N>=4096": 85.0, "kv (GQA)": 60.0}  # issue 13's % of floor targets at >= 2048 tokens
HEADLINE = ("llama-7b.attn", "llama-7b.up", "llama-7b.down")


def layer_class(layer: str, K: int, N: int) -> str:
    """'kv' for GQA kv projections, 'K,N>=4096' for the big ones (the issue's 85% class), else the part name."""
    part = layer.rsplit(".", 1)[-1]
    if part == "kv":
        return "kv (GQA)"
    return "K,N>=4096" if K >= 4096 and N >= 4096 else part


def print_sweep(df: pd.DataFrame) -> None:
    table = winners_table(df)
    if table.empty:
        print("no timed LoRA points")
        return
    ok = df[df["ok"]]
    errors = df[~df["ok"]]
    print(f"points: {len(df)} ({len(ok)} ok, {len(errors)} not ok)")
    for _, e in errors.iterrows():
        print(f"  not ok: {e['variant']} {e['layer']} r={e['rank']} M={e['tokens']}: {str(e['error'])[:120]}")

    print(f"\nfalqon not the fastest LoRA method at >= {MIN_TOKENS} tokens (winner, falqon ms / winner ms):")
    timed = table[table["falqon_ms"].notna()]  # a cell where only other methods ran says nothing about falqon
    lost = timed[(timed["tokens"] >= MIN_TOKENS) & (timed["winner"] != "falqon")]
    width = max([22, *(len(str(v)) for v in lost["winner_variant"])])  # option-set labels are longer
    for _, c in lost.iterrows():
        print(f"  {c['layer']:<16} r={c['rank']:<4} M={c['tokens']:<6} {c['winner_variant']:<{width}} "
              f"{c['winner_ms']:.3f} ms vs falqon {c['falqon_ms']:.3f} ms ({c['falqon_ms'] / c['winner_ms']:.2f}x)")
    print(f"  {len(lost)} of {int((timed['tokens'] >= MIN_TOKENS).sum())} cells" if len(lost) else
          f"  none of {int((timed['tokens'] >= MIN_TOKENS).sum())} cells")
    untimed = table[table["falqon_ms"].isna()]
    if len(untimed):
        print("  cells without a falqon point (not counted): " + ", ".join(
            f"{c['layer']} r={c['rank']} M={c['tokens']}" for _, c in untimed.iterrows()))

    best = best_of_compile(df[df["ok"]])
    bf16 = best[best["method"] == "bf16_lora"].set_index(["layer", "rank", "tokens"])["metric_ms"]
    slower = []
    for _, c in table.iterrows():
        key = (c["layer"], c["rank"], c["tokens"])
        if key in bf16.index and c["falqon_ms"] > bf16[key]:
            slower.append(f"  {c['layer']} r={c['rank']} M={c['tokens']}: falqon {c['falqon_ms']:.3f} > bf16_lora {bf16[key]:.3f} ms")
    print("\nfalqon slower than bf16_lora (best of eager/compiled):")
    print("\n".join(slower) if slower else "  none")

    shapes = df.drop_duplicates("layer").set_index("layer")[["K", "N"]]
    t = table.assign(cls=[layer_class(l, int(shapes.loc[l, "K"]), int(shapes.loc[l, "N"])) for l in table["layer"]])
    t = t[t["tokens"] >= MIN_TOKENS]
    print(f"\nfalqon % of floor at >= {MIN_TOKENS} tokens, per layer class (min / median / max, cells):")
    for cls, g in t.groupby("cls"):
        pct = g["falqon_pct_of_floor"].dropna()
        if len(pct):
            print(f"  {cls:<12} {pct.min():5.1f} / {pct.median():5.1f} / {pct.max():5.1f}  ({len(pct)})")
    target = t["cls"].map(FLOOR_TARGET_PCT).astype(float)  # NaN for classes without a target: never below
    below = t[t["falqon_pct_of_floor"] < target]
    for _, c in below.sort_values("falqon_pct_of_floor").iterrows():
        print(f"  below target: {c['layer']:<16} r={c['rank']:<4} M={c['tokens']:<6} {c['falqon_pct_of_floor']:5.1f}% "
              f"({c['falqon_ms']:.3f} ms)")

    print("\nfalqon vs best bf16_lora at r=64, 4096 tokens:")
    for layer in HEADLINE:
        key = (layer, 64, 4096)
        row = table[(table["layer"] == layer) & (table["rank"] == 64) & (table["tokens"] == 4096)]
        if row.empty or key not in bf16.index:
            print(f"  {layer}: not measured")
            continue
        f_ms = float(row["falqon_ms"].iloc[0])
        print(f"  {layer:<14} falqon {f_ms:.3f} ms, bf16_lora {bf16[key]:.3f} ms: {bf16[key] / f_ms:.2f}x")


def print_option_sets(df: pd.DataFrame) -> None:
    """Where falqon ran with several option sets (e.g. suites/db-path.toml): each beside the default ({}), per cell,
    eager. The sections above take falqon at its best option set; this says what each one costs."""
    rows = df[(df["method"] == "falqon") & df["ok"] & ~df["compile"].astype(bool)]
    if rows["options"].fillna("").nunique() < 2:
        return
    print("\nfalqon option sets side by side (eager; ratio = option set / default):")
    for (layer, rank, tokens), g in rows.groupby(["layer", "rank", "tokens"], sort=False):
        by = {str(v): float(m) for v, m in zip(g["variant"], g["metric_ms"])}
        base = by.get("falqon")
        cells = ", ".join(f"{v} {ms:.3f}" + (f" ({ms / base:.3f})" if base and v != "falqon" else "")
                          for v, ms in sorted(by.items()))
        print(f"  {layer:<16} r={rank:<4} M={tokens:<6} {cells}")


def print_fast_accum(df: pd.DataFrame) -> None:
    print("\nfalqon forward GEMM fast_accum (gpu_ms, r=64, 4096 tokens):")
    rows = df[(df["method"] == "falqon") & df["ok"]]
    for layer, g in rows.groupby("layer"):
        by = {json.loads(o or "{}").get("fast_accum"): float(m) for o, m in zip(g["options"], g["metric_ms"])}
        on, off = by.get(True), by.get(False)
        if on and off:
            print(f"  {layer:<14} on {on:.3f} ms, off {off:.3f} ms: off/on {off / on:.3f}")
        else:
            print(f"  {layer:<14} incomplete: {by}")


def main(argv: list[str]) -> int:
    if not 1 <= len(argv) <= 2:
        print(__doc__)
        return 2
    try:
        sweep = points_table([load_run(Path(argv[0]))])
        print_sweep(sweep)
        print_option_sets(sweep)
        if len(argv) == 2:
            print_fast_accum(points_table([load_run(Path(argv[1]))]))
    except ResultsError as exc:
        print(f"cannot read results: {exc}")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
