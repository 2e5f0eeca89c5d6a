"""How close each method gets to its roofline floor: 100 * floor_ms / gpu_ms per method and layer.

100% means the step ran at the measured GEMM peaks and copy bandwidth (falqon_bench.measure.roofline). The
floor needs measured peaks, so CPU runs have none: the figure is then one message panel (and the
report leaves it out); a single point without a floor is marked n/a.
"""

from __future__ import annotations

import pandas as pd
from matplotlib.figure import Figure

from falqon_bench.readers.figures.data import RunLabel, metric_label
from falqon_bench.readers.figures.style import (
    layer_panels,
    FAILED_GID,
    NA_GID,
    add_footer,
    empty_panel,
    mark_unavailable,
    new_figure,
    variant_color,
    variant_hatch,
)
from falqon_bench.data.derived import pct_of_floor

BAR_WIDTH = 0.7


def has_floor(df: pd.DataFrame) -> bool:
    """Whether any measured point has a roofline floor (a CPU run, or a run whose peaks failed, has none)."""
    return not df.empty and bool((df["ok"] & df["floor_ms"].notna() & (df["metric_kind"] == "gpu")).any())


def render_floor_figure(df: pd.DataFrame, label: RunLabel) -> Figure:
    """Bars of % of floor per method, one panel per layer (higher is better, 100% = at the floor).

    Where no point has a floor (CPU runs) there is one message panel, not a panel of n/a bars under a
    footer claiming measured peaks; the report leaves the figure out altogether."""
    layers = list(pd.unique(df["layer"])) if has_floor(df) else []
    metric = metric_label(df)
    fig, axes = new_figure(len(layers), "% of roofline floor per method and layer\n(100% = at the floor, higher is better)")
    if not layers:
        empty_panel(axes[0], "no roofline floor was measured in this run (no GPU peaks)" if not df.empty else "no points")
        add_footer(fig, label, sorted(set(df["device"])), f"{metric}; no floor")
        return fig
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
                ax.bar(i, pct, BAR_WIDTH, color=variant_color(variant), hatch=variant_hatch(variant), edgecolor="white", linewidth=0.5)
                # vertical, above the bar: side by side horizontal labels overlapped on 15-bar panels
                ax.text(i, pct + 1.5, f"{pct:.0f}%", ha="center", va="bottom", rotation=90, fontsize=7)
        ax.set_ylim(0, max(118.0, ax.get_ylim()[1] * 1.12))  # room for the labels above a bar near 100%
        ax.axhline(100.0, color="black", linewidth=0.8, linestyle=":")
        for i, text, gid in unavailable:
            mark_unavailable(ax, i, BAR_WIDTH, text, gid)
        panel.finish()
        ax.set_ylabel(f"% of floor ({metric})")
    add_footer(fig, label, sorted(set(df["device"])), f"{metric}; floor from measured peaks")
    return fig
