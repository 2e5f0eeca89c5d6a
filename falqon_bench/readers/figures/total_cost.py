"""Fig. 3 of the paper: what a whole transformer block's linears cost per training step, per method.

cost(method) = sum over the block's linear layers of step time x per_block (how many linears of that
shape a block has). One panel per model at the (rank, tokens) most of its points ran. Eager and
torch.compile are separate bars (compiled hatched): a total never adds one layer's eager time to
another's compiled time; so are a method's option sets (a suite's `options`). The whiskers sum the layers' p10 and p90. A method with a failed or missing layer has no total.
"""

from __future__ import annotations

import pandas as pd
from matplotlib.figure import Figure

from falqon_bench.readers.figures.data import RunLabel, at_config, metric_label, ordered, reference_config, variant_parts
from falqon_bench.readers.figures.style import (
    FAILED_GID,
    NA_GID,
    add_footer,
    empty_panel,
    error_bars,
    mark_unavailable,
    new_figure,
    set_variant_ticks,
    variant_color,
    variant_hatch,
)

BAR_WIDTH = 0.7


def block_costs(pts: pd.DataFrame, layers: list[str]) -> list[dict]:
    """Per variant (eager and compiled apart: a total never mixes the two; each option set of a method apart):
    {'method', 'label', 'ms', 'p10',
    'p90', 'status' ('ok'|'failed'|'n/a'), 'why'} summed over `layers`."""
    out = []
    for variant in ordered(pts["variant"]):
        mine = pts[pts["variant"] == variant]
        entry = {"method": variant_parts(variant)[0], "label": variant, "ms": None, "p10": None, "p90": None, "status": "ok", "why": ""}
        missing = [l for l in layers if l not in set(mine["layer"])]
        failed = mine[~mine["ok"]]
        if not failed.empty:
            entry.update(status="failed", why="; ".join(f"{r.layer}: {r.error}" for r in failed.itertuples()))
        elif missing:
            entry.update(status="n/a", why="no point for " + ", ".join(missing))
        else:
            weight = mine["per_block"].fillna(1).astype(float)
            entry.update(
                ms=float((mine["metric_ms"] * weight).sum()),
                p10=float((mine["p10_ms"] * weight).sum()),
                p90=float((mine["p90_ms"] * weight).sum()),
            )
        out.append(entry)
    return out


def render_total_cost_figure(df: pd.DataFrame, label: RunLabel) -> Figure:
    """Bars of per-block total cost per method, one panel per model."""
    models = list(pd.unique(df["model"]))
    metric = metric_label(df)
    fig, axes = new_figure(len(models), "Fig. 3 - total cost of a block's linear layers\nper training step (lower is better)")
    if not models:
        empty_panel(axes[0], "no points")
    for ax, model in zip(axes, models):
        sub = df[df["model"] == model]
        config = reference_config(sub)
        pts = at_config(sub, config)
        layers = [l for l in pd.unique(sub["layer"]) if l in set(pts["layer"])]
        costs = block_costs(pts, layers)
        unavailable = []
        for i, c in enumerate(costs):
            if c["status"] != "ok":
                unavailable.append((i, c["status"], FAILED_GID if c["status"] == "failed" else NA_GID))
                continue
            ax.bar(i, c["ms"], BAR_WIDTH, color=variant_color(c["method"]), hatch=variant_hatch(c["label"]), edgecolor="white", linewidth=0.5)
            ax.errorbar(i, c["ms"], yerr=error_bars([c["ms"]], [c["p10"]], [c["p90"]]), color="black", capsize=3, linewidth=1)
        ax.set_ylim(bottom=0)
        for i, text, gid in unavailable:
            mark_unavailable(ax, i, BAR_WIDTH, text, gid)
        set_variant_ticks(ax, [c["label"] for c in costs])
        no_count = sub["per_block"].isna().any()
        ax.set_title(f"{model} (r={config[0]}, M={config[1]} tokens)\nlayers: {', '.join(layers) or '-'}" + ("; per_block missing: counted once" if no_count else "")
                     if config else model, fontsize=8)
        ax.set_ylabel(f"cost per block, ms per step ({metric})")
    add_footer(fig, label, sorted(set(df["device"])), f"{metric}; eager and torch.compile (hatched) as separate bars")
    return fig
