"""Fig. 5 of the paper: speed of each method relative to bf16_lora (eager), grouped by GPU model (several runs).

One panel per execution mode (eager; torch.compile when measured), never a mix of the two under one
label. In a panel, speedup = geometric mean of bf16_lora eager time / method time over exactly the
same shapes (layer, rank, tokens) for every method and every GPU: the shapes where every method of
the panel (that ran at all), and bf16_lora eager, have a measured point on every GPU. The panel title
says how many shapes that is. Profiler kernel sums (capture failed) are lower bounds, not step times,
and are left out. Whiskers: the geometric means of the p10/p90 ratios (baseline p10 / method p90 ...
p90 / p10). A method run with several option sets is one bar per option set (data.option_set), the
baseline the plain bf16_lora.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from falqon_bench.readers.figures.data import BASELINE_METHOD, RunLabel, metric_label, option_set, ordered
from falqon_bench.readers.figures.style import (
    COMPILE_HATCH,
    FAILED_GID,
    NA_GID,
    add_footer,
    empty_panel,
    error_bars,
    geomean,
    mark_unavailable,
    new_figure,
    variant_color,
    wrap_label,
)

SHAPE = ["layer", "rank", "tokens"]
POINT = ["setting", "compile", *SHAPE]


def _with_setting(df: pd.DataFrame) -> pd.DataFrame:
    """df with 'setting': the method with its option set ('falqon[flush_every=1]'), what a bar stands for."""
    return df.assign(setting=[option_set(str(v)) for v in df["variant"]]) if "setting" not in df else df


def points_on_every_device(df: pd.DataFrame) -> pd.DataFrame:
    """Only the (method and option set, compile, layer, rank, tokens) points that every GPU in df has a row for."""
    df = _with_setting(df)
    n_devices = df["device"].nunique()
    per_point = df.groupby(POINT)["device"].transform("nunique")
    return df[per_point == n_devices]


def _timed(df: pd.DataFrame) -> pd.DataFrame:
    """ok points with a step time (a profiler kernel sum is a lower bound, not a step time)."""
    kernel_sum = df["kernel_sum_timing"].fillna(False).astype(bool) if "kernel_sum_timing" in df else False
    return df[df["ok"] & ~kernel_sum]


def _timed_on_every_device(timed: pd.DataFrame, devices: list[str]) -> set[tuple]:
    """The shapes (layer, rank, tokens) that `timed` has on every one of `devices`."""
    per_device = [set(map(tuple, timed[timed["device"] == d][SHAPE].itertuples(index=False))) for d in devices]
    return set.intersection(*per_device) if per_device else set()


def speedups(df: pd.DataFrame) -> pd.DataFrame:
    """Rows (device, method, compile, speedup, low, high, shapes, status, why): every method on every GPU,
    per mode, each mode over one shared set of shapes (see the module docstring). 'method' is the method
    with its option set where it has one ('falqon[flush_every=1]')."""
    everywhere = points_on_every_device(df)
    timed = _timed(everywhere)
    base = timed[(timed["setting"] == BASELINE_METHOD) & ~timed["compile"].astype(bool)]
    devices = sorted(set(everywhere["device"]))
    rows = []
    for compiled in sorted(set(everywhere["compile"].astype(bool))):
        mode = everywhere[everywhere["compile"].astype(bool) == compiled]
        mode_timed = timed[timed["compile"].astype(bool) == compiled]
        methods = ordered(mode["setting"])
        shapes = _timed_on_every_device(base, devices)
        for method in methods:
            mine = _timed_on_every_device(mode_timed[mode_timed["setting"] == method], devices)
            if mine:
                shapes &= mine
        for device in devices:
            on_base = base[base["device"] == device].set_index(SHAPE)
            for method in methods:
                mine = mode[(mode["setting"] == method) & (mode["device"] == device)]
                ok = mode_timed[(mode_timed["setting"] == method) & (mode_timed["device"] == device)].set_index(SHAPE)
                shared = sorted(shapes)
                row = {"device": device, "method": method, "compile": compiled, "speedup": np.nan, "low": np.nan, "high": np.nan,
                       "shapes": len(shared), "status": "ok", "why": ""}
                if ok.empty:
                    row.update(status="failed", why="; ".join(str(e) for e in mine["error"].dropna().unique()) or "no step time")
                elif not shared:
                    row.update(status="n/a", why=f"no shape that every method and {BASELINE_METHOD} (eager) ran on every GPU")
                else:
                    b, m = on_base.loc[shared], ok.loc[shared]
                    row.update(
                        speedup=geomean((b["metric_ms"] / m["metric_ms"]).tolist()),
                        low=geomean((b["p10_ms"] / m["p90_ms"]).tolist()),
                        high=geomean((b["p90_ms"] / m["p10_ms"]).tolist()),
                    )
                rows.append(row)
    return pd.DataFrame(rows)


def render_gpu_speedup_figure(df: pd.DataFrame, label: RunLabel) -> Figure:
    """Grouped bars per mode panel: x = GPU model, one bar per method, height = speedup over bf16_lora eager (x)."""
    metric = metric_label(df)
    table = speedups(df) if not df.empty else pd.DataFrame()
    modes = sorted(set(table["compile"])) if not table.empty else [False]
    fig, axes = new_figure(len(modes), f"Fig. 5 - speedup over {BASELINE_METHOD} (eager) per GPU model\n(higher is better)",
                           panel_width=6.5)
    if table.empty:
        empty_panel(axes[0], "no points")
        add_footer(fig, label, [], metric)
        return fig
    devices = sorted(set(table["device"]))
    labelled: set[str] = set()
    for ax, compiled in zip(axes, modes):
        part = table[table["compile"] == compiled]
        methods = ordered(part["method"])
        width = 0.8 / max(1, len(methods))
        unavailable = []
        for j, method in enumerate(methods):
            for i, device in enumerate(devices):
                x = i - 0.4 + width * (j + 0.5)
                hit = part[(part["device"] == device) & (part["method"] == method)]
                if hit.empty:
                    continue
                r = hit.iloc[0]
                if r["status"] != "ok":
                    unavailable.append((x, r["status"], FAILED_GID if r["status"] == "failed" else NA_GID))
                    continue
                ax.bar(x, r["speedup"], width * 0.95, color=variant_color(method), hatch=COMPILE_HATCH if compiled else None,
                       edgecolor="white", linewidth=0.5, label="_nolegend_" if method in labelled else method)
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
        ax.set_ylabel(f"speedup over {BASELINE_METHOD} eager, x ({metric})")
        n_shapes = int(part["shapes"].max()) if not part.empty else 0
        ax.set_title(f"{'torch.compile (hatched)' if compiled else 'eager'}: geometric mean over the same {n_shapes} "
                     f"shape(s)\nfor every method and GPU", fontsize=9)
    handles = [Patch(facecolor=variant_color(m), label=wrap_label(m)) for m in ordered(labelled)]
    fig.legend(handles=handles, loc="outside right upper", fontsize=7)  # outside the axes: never over a bar
    add_footer(fig, label, devices, f"{metric}; geometric mean over shapes shared by every method and GPU; eager and compile apart")
    return fig
