"""Fig. 4 of the paper: where each method's step time goes, as stacked profiler time per category.

One panel per layer at the (rank, tokens) most methods ran; eager and compiled are separate bars
(compiled ones hatched).
Heights are the raw profiler times (kernel_ms, ms per step), not rescaled to the measured time.
"""

from __future__ import annotations

import pandas as pd
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from falqon_bench.readers.figures.data import RunLabel, metric_label
from falqon_bench.readers.figures.style import (
    layer_panels,
    CATEGORY_COLORS,
    COMPILE_HATCH,
    FAILED_GID,
    NA_GID,
    add_footer,
    empty_panel,
    legend_handles,
    mark_unavailable,
    is_compiled,
    new_figure,
    variant_hatch,
)
from falqon_bench.data.schema import BREAKDOWN_CATEGORIES

BAR_WIDTH = 0.7


def render_breakdown_figure(df: pd.DataFrame, label: RunLabel) -> Figure:
    """Stacked kernel_ms per category, bars per method, one panel per layer."""
    layers = list(pd.unique(df["layer"]))
    fig, axes = new_figure(len(layers), "Fig. 4 - step time by kernel category\n(profiler, ms per step; lower is better)")
    if not layers:
        empty_panel(axes[0], "no points")
    used: set[str] = set()
    cpu = metric_label(df) == "CPU wall time"
    for panel in layer_panels(df, axes, layers):
        ax = panel.ax
        unavailable = []
        for i, variant, row in panel.rows:
            if not row["ok"]:
                unavailable.append((i, "failed", FAILED_GID))
                continue
            if not row["has_kernel_ms"]:
                unavailable.append((i, "n/a (not profiled)", NA_GID))
                continue
            bottom = 0.0
            for cat in BREAKDOWN_CATEGORIES:
                ms = float(row[f"k_{cat}"])
                if ms <= 0:
                    continue
                ax.bar(i, ms, BAR_WIDTH, bottom=bottom, color=CATEGORY_COLORS[cat], hatch=variant_hatch(variant), edgecolor="white",
                       linewidth=0.5, label=cat if cat not in used else "_nolegend_")
                used.add(cat)
                bottom += ms
        ax.set_ylim(bottom=0)
        for i, text, gid in unavailable:
            mark_unavailable(ax, i, BAR_WIDTH, text, gid)
        panel.finish()
        ax.set_ylabel("profiled time, ms per step" + (" (CPU self time)" if cpu else " (GPU kernels)"))
    if used:
        handles = legend_handles(CATEGORY_COLORS, used)
        if any(is_compiled(v) for v in df["variant"]):
            handles.append(Patch(facecolor="#bbbbbb", edgecolor="white", hatch=COMPILE_HATCH, label="hatched:\ntorch.compile"))
        fig.legend(handles=handles, loc="outside right upper", fontsize=7)
    add_footer(fig, label, sorted(set(df["device"])), "torch.profiler" + (" on CPU: op self time" if cpu else " kernel time"))
    return fig
