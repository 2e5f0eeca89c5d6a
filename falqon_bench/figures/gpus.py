"""Fig. 5 of the paper: speed of each method relative to bf16_lora, grouped by GPU model (several runs).

speedup = geometric mean over the shapes (layer, rank, tokens) where both ran of bf16_lora time /
method time, on the same GPU. Each method (and the baseline) uses the faster of eager and compiled,
among the points every GPU ran (a variant or shape only one GPU measured would make the groups unequal).
Whiskers: the geometric means of the p10/p90 ratios (baseline p10 / method p90 ... p90 / p10).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from falqon_bench.figures.data import BASELINE_METHOD, RunLabel, best_of_compile, metric_label, ordered
from falqon_bench.figures.style import FAILED_GID, NA_GID, add_footer, empty_panel, error_bars, geomean, mark_unavailable, new_figure, variant_color

SHAPE = ["layer", "rank", "tokens"]
POINT = ["method", "compile", *SHAPE]


def points_on_every_device(df: pd.DataFrame) -> pd.DataFrame:
    """Only the (method, compile, layer, rank, tokens) points that every GPU in df has a row for."""
    n_devices = df["device"].nunique()
    per_point = df.groupby(POINT)["device"].transform("nunique")
    return df[per_point == n_devices]


def speedups(df: pd.DataFrame) -> pd.DataFrame:
    """Rows (device, method, speedup, low, high, shapes, status, why) of every method on every GPU."""
    best = best_of_compile(points_on_every_device(df))
    rows = []
    for device in sorted(set(best["device"])):
        on = best[best["device"] == device]
        base = on[(on["method"] == BASELINE_METHOD) & on["ok"]].set_index(SHAPE)
        for method in ordered(on["method"]):
            mine = on[on["method"] == method]
            ok = mine[mine["ok"]].set_index(SHAPE)
            shared = ok.index.intersection(base.index)
            row = {"device": device, "method": method, "speedup": np.nan, "low": np.nan, "high": np.nan, "shapes": len(shared), "status": "ok", "why": ""}
            if ok.empty:
                row.update(status="failed", why="; ".join(str(e) for e in mine["error"].dropna().unique()))
            elif base.empty or shared.empty:
                row.update(status="n/a", why=f"no {BASELINE_METHOD} point with the same shape on {device}")
            else:
                b, m = base.loc[shared], ok.loc[shared]
                row.update(
                    speedup=geomean((b["metric_ms"] / m["metric_ms"]).tolist()),
                    low=geomean((b["p10_ms"] / m["p90_ms"]).tolist()),
                    high=geomean((b["p90_ms"] / m["p10_ms"]).tolist()),
                )
            rows.append(row)
    return pd.DataFrame(rows)


def render_gpu_speedup_figure(df: pd.DataFrame, label: RunLabel) -> Figure:
    """Grouped bars: x = GPU model, one bar per method, height = speedup over bf16_lora (x)."""
    metric = metric_label(df)
    fig, axes = new_figure(1, f"Fig. 5 - speedup over {BASELINE_METHOD} per GPU model\n(higher is better)", panel_width=8.0)
    ax = axes[0]
    table = speedups(df) if not df.empty else pd.DataFrame()
    if table.empty:
        empty_panel(ax, "no points")
        add_footer(fig, label, [], metric)
        return fig
    devices = sorted(set(table["device"]))
    methods = ordered(table["method"])
    width = 0.8 / max(1, len(methods))
    unavailable = []
    labelled: set[str] = set()
    for j, method in enumerate(methods):
        for i, device in enumerate(devices):
            x = i - 0.4 + width * (j + 0.5)
            hit = table[(table["device"] == device) & (table["method"] == method)]
            if hit.empty:
                continue
            r = hit.iloc[0]
            if r["status"] != "ok":
                unavailable.append((x, r["status"], FAILED_GID if r["status"] == "failed" else NA_GID))
                continue
            ax.bar(x, r["speedup"], width * 0.95, color=variant_color(method), label="_nolegend_" if method in labelled else method)
            labelled.add(method)
            ax.errorbar(x, r["speedup"], yerr=error_bars([r["speedup"]], [r["low"]], [r["high"]]), color="black", capsize=2, linewidth=1)
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle=":")
    ax.set_ylim(bottom=0)
    for x, text, gid in unavailable:
        mark_unavailable(ax, x, width * 0.95, text, gid)
    ax.set_xticks(range(len(devices)))
    ax.set_xticklabels(devices, fontsize=8)
    ax.set_xlim(-0.6, len(devices) - 0.4)
    ax.set_xlabel("GPU model")
    ax.set_ylabel(f"speedup over {BASELINE_METHOD}, x ({metric})")
    fig.legend(loc="outside right upper", fontsize=7)  # outside the axes: never over a bar
    add_footer(fig, label, devices, f"{metric}; geometric mean over shared shapes; best of eager/compile")
    return fig
