"""How close each method gets to its roofline floor: 100 * floor_ms / gpu_ms per method and layer.

100% means the step ran at the measured GEMM peaks and copy bandwidth (falqon_bench.roofline). The
floor needs measured peaks, so CPU runs have none: their bars are marked n/a.
"""

from __future__ import annotations

import pandas as pd
from matplotlib.figure import Figure

from falqon_bench.figures.data import RunLabel, metric_label
from falqon_bench.figures.style import (
    layer_panels,
    FAILED_GID,
    NA_GID,
    add_footer,
    empty_panel,
    mark_unavailable,
    new_figure,
    variant_color,
)
from falqon_bench.roofline import pct_of_floor

BAR_WIDTH = 0.7


def render_floor_figure(df: pd.DataFrame, label: RunLabel) -> Figure:
    """Bars of % of floor per method, one panel per layer (higher is better, 100% = at the floor)."""
    layers = list(pd.unique(df["layer"]))
    metric = metric_label(df)
    fig, axes = new_figure(len(layers), "% of roofline floor per method and layer\n(100% = at the floor, higher is better)")
    if not layers:
        empty_panel(axes[0], "no points")
    for panel in layer_panels(df, axes, layers):
        ax = panel.ax
        unavailable = []
        for i, variant, row in panel.rows:
            pct = pct_of_floor(row["metric_ms"], row["floor_ms"]) if row["ok"] else None
            if not row["ok"]:
                unavailable.append((i, "failed", FAILED_GID))
            elif pct is None:
                unavailable.append((i, "n/a (no floor)", NA_GID))
            else:
                ax.bar(i, pct, BAR_WIDTH, color=variant_color(variant))
                ax.text(i, pct, f"{pct:.0f}%", ha="center", va="bottom", fontsize=7)
        ax.set_ylim(0, max(100.0, ax.get_ylim()[1]))
        ax.axhline(100.0, color="black", linewidth=0.8, linestyle=":")
        for i, text, gid in unavailable:
            mark_unavailable(ax, i, BAR_WIDTH, text, gid)
        panel.finish()
        ax.set_ylabel(f"% of floor ({metric})")
    add_footer(fig, label, sorted(set(df["device"])), f"{metric}; floor from measured peaks")
    return fig
