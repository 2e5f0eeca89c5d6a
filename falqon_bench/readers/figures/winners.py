"""Where each LoRA method wins: per layer, the fastest method over the (rank, tokens) grid, and falqon's % of floor.

A cell is one (layer, rank, tokens) point. Each method counts at its best of eager and compiled, and of
its option sets where a suite ran several (data.best_of_compile; winner_variant names the one that won); only LoRA methods compete (bf16_linear trains nothing). The left heatmap colours
a cell by the fastest method and writes falqon's speedup over the best other LoRA method in it (> 1: falqon
wins; "-" where falqon has no time there); the right one shows falqon's % of its roofline floor
(100 * floor_ms / gpu_ms). Reads the points table only (suites/shapes.toml is the sweep it is made for).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from falqon_bench.readers.figures.data import RunLabel, best_of_compile, metric_label, ordered
from falqon_bench.readers.figures.style import add_footer, empty_panel, variant_color
from falqon_bench.data.derived import pct_of_floor

FOCUS_METHOD = "falqon"
NOT_LORA = ("bf16_linear",)
NO_POINT_COLOR = "#eeeeee"


def winners_table(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (layer, rank, tokens) with a timed LoRA method: the winner and falqon's standing.

    Columns: layer, rank, tokens, winner (method), winner_variant ('+compile' when compiled won, the option
    set in brackets when one of several won), winner_ms,
    falqon_ms, best_other (fastest LoRA method but falqon), best_other_ms, falqon_speedup (best_other_ms /
    falqon_ms; NaN without both), falqon_pct_of_floor. Times in ms (gpu_ms, or wall_ms on CPU).
    """
    columns = ["layer", "rank", "tokens", "winner", "winner_variant", "winner_ms", "falqon_ms", "best_other",
               "best_other_ms", "falqon_speedup", "falqon_pct_of_floor"]
    if df.empty:
        return pd.DataFrame(columns=columns)
    lora = df[~df["method"].isin(NOT_LORA)]
    # one row per method: "the fastest LoRA method" takes each method at its best option set (and mode)
    best = best_of_compile(lora)
    best = best[best["ok"] & best["metric_ms"].notna()]
    rows = []
    for (layer, rank, tokens), cell in best.groupby(["layer", "rank", "tokens"], sort=False):
        cell = cell.sort_values("metric_ms")
        win = cell.iloc[0]
        mine = cell[cell["method"] == FOCUS_METHOD]
        others = cell[cell["method"] != FOCUS_METHOD]
        f_ms = float(mine["metric_ms"].iloc[0]) if len(mine) else math.nan
        o_ms = float(others["metric_ms"].iloc[0]) if len(others) else math.nan
        pct = pct_of_floor(f_ms, mine["floor_ms"].iloc[0]) if len(mine) else None
        rows.append({
            "layer": layer, "rank": int(rank), "tokens": int(tokens),
            "winner": win["method"], "winner_variant": win["variant"], "winner_ms": float(win["metric_ms"]),
            "falqon_ms": f_ms, "best_other": others["method"].iloc[0] if len(others) else None,
            "best_other_ms": o_ms, "falqon_speedup": o_ms / f_ms if f_ms > 0 and o_ms > 0 else math.nan,
            "falqon_pct_of_floor": math.nan if pct is None else pct,
        })
    return pd.DataFrame(rows, columns=columns)


def _grid(cells: pd.DataFrame, value: str) -> tuple[list[int], list[int], np.ndarray]:
    """(ranks, tokens, ranks x tokens array of `value`, NaN where no point) for one layer's cells."""
    ranks = sorted(cells["rank"].unique())
    tokens = sorted(cells["tokens"].unique())
    grid = np.full((len(ranks), len(tokens)), np.nan)
    for _, c in cells.iterrows():
        grid[ranks.index(c["rank"]), tokens.index(c["tokens"])] = c[value]
    return ranks, tokens, grid


def _axes_ticks(ax, ranks, tokens) -> None:
    ax.set_xticks(range(len(tokens)), [str(t) for t in tokens], fontsize=7)
    ax.set_yticks(range(len(ranks)), [str(r) for r in ranks], fontsize=7)
    ax.set_xlabel("tokens (M)", fontsize=8)
    ax.set_ylabel("rank r", fontsize=8)


def render_winners_figure(df: pd.DataFrame, label: RunLabel) -> Figure:
    """Two heatmaps per layer (one row each): fastest LoRA method per (rank, tokens) with falqon's speedup over
    the best other method written in the cell, and falqon's % of floor."""
    table = winners_table(df)
    layers = list(pd.unique(table["layer"])) if not table.empty else []
    methods = ordered(table["winner"]) if not table.empty else []
    metric = metric_label(df)
    fig = Figure(figsize=(11.0, 1.2 + 2.6 * max(1, len(layers))), layout="constrained")
    axes = fig.subplots(max(1, len(layers)), 2, squeeze=False)
    fig.suptitle("Fastest LoRA method per (rank, tokens) (best of eager / compiled; cell: falqon's speedup over "
                 "the best other method)\nand falqon's % of roofline floor", fontsize=11)
    if not layers:
        empty_panel(axes[0][0], "no timed LoRA points")
        empty_panel(axes[0][1], "no timed LoRA points")
    cmap = ListedColormap([variant_color(m) for m in methods] or ["#ffffff"]).with_extremes(bad=NO_POINT_COLOR)
    for row, layer in zip(axes, layers):
        cells = table[table["layer"] == layer].assign(winner_idx=lambda t: t["winner"].map(methods.index))
        ranks, tokens, win = _grid(cells, "winner_idx")
        _, _, speed = _grid(cells, "falqon_speedup")
        _, _, pct = _grid(cells, "falqon_pct_of_floor")
        ax = row[0]
        ax.imshow(np.ma.masked_invalid(win), cmap=cmap, vmin=-0.5, vmax=len(methods) - 0.5, aspect="auto", origin="lower")
        for (i, j), s in np.ndenumerate(speed):
            if not np.isnan(win[i, j]):
                ax.text(j, i, "-" if np.isnan(s) else f"{s:.2f}x", ha="center", va="center", fontsize=7,
                        fontweight="bold" if s >= 1 else "normal")
        _axes_ticks(ax, ranks, tokens)
        ax.set_title(f"{layer}: fastest method", fontsize=9)
        ax = row[1]
        image = ax.imshow(np.ma.masked_invalid(pct), cmap="viridis", vmin=0, vmax=100, aspect="auto", origin="lower")
        for (i, j), p in np.ndenumerate(pct):
            if not np.isnan(p):
                ax.text(j, i, f"{p:.0f}%", ha="center", va="center", fontsize=7, color="white" if p < 60 else "black")
        if np.isnan(pct).all():
            ax.text(0.5, 0.5, "n/a (no floor: CPU run or no falqon point)", transform=ax.transAxes, ha="center",
                    va="center", fontsize=8, color="#666666")
        _axes_ticks(ax, ranks, tokens)
        ax.set_title(f"{layer}: falqon % of floor", fontsize=9)
        fig.colorbar(image, ax=ax, fraction=0.05, label="% of floor")
    if methods:
        fig.legend(handles=[Patch(color=variant_color(m), label=m) for m in methods], loc="outside right center",
                   fontsize=8, title="fastest", title_fontsize=8)
    add_footer(fig, label, sorted(set(df["device"])) if not df.empty else [], f"{metric}; floor from measured peaks")
    return fig
