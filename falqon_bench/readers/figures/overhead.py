"""Fig. 1 of the paper: is FP8 LoRA faster than BF16 LoRA per layer, and what does quantization cost?

Left figure (fig1_overhead): per layer, one bar per method (eager and compiled as separate bars),
its height the measured step time (median, p10-p90 whiskers), split by the profiler's category
times into compute (GEMMs), quantization overhead (quantize/cast kernels only), other elementwise
kernels and other kernels; time the profile does not explain (launch cost, host) is the light top
segment. Compiled variants are hatched bars in the same colours.
Right figure (fig1_rank_throughput): million tokens/s over adapter rank, one colour per method,
eager solid, torch.compile dashed with hollow markers; a method's option sets each get a marker of their own.
"""

from __future__ import annotations

import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from falqon_bench.readers.figures.data import COMPUTE_CATEGORIES, RunLabel, metric_label, option_set, ordered, variant_parts
from falqon_bench.readers.figures.style import (
    layer_panels,
    FAILED_GID,
    SPLIT_COLORS,
    add_footer,
    empty_panel,
    error_bars,
    mark_failed_point,
    mark_unavailable,
    new_figure,
    sorted_variants,
    legend_handles,
    variant_color,
    variant_hatch,
    is_compiled,
    wrap_label,
    COMPILE_HATCH,
)

BAR_WIDTH = 0.7
OPTION_MARKERS = ("s", "^", "v", "P", "X", "*")  # a method's option sets in sorted order; without options: o (D compiled)


def _marker(variant: str, option_sets: list[str]) -> str:
    """The line marker of a variant in the rank figure: one per option set of its method, the same eager and compiled."""
    method, setting = variant_parts(variant)[0], option_set(variant)
    if setting == method:
        return "D" if is_compiled(variant) else "o"
    siblings = [s for s in option_sets if s != method and variant_parts(s)[0] == method]
    return OPTION_MARKERS[siblings.index(setting) % len(OPTION_MARKERS)]


def latency_split(row: pd.Series) -> dict[str, float]:
    """A point's metric_ms split into SPLIT_COLORS segments (ms); the profiled categories are scaled
    down when they sum to more than the measured time, never up. Only quantize/cast kernels count as
    quantization overhead: bf16_lora's elementwise kernels (adds, dropout, casts to the compute dtype
    are not quantization) get a segment of their own."""
    total = float(row["metric_ms"])
    if not row["has_kernel_ms"]:
        return {"not profiled": total}
    compute = sum(row[f"k_{c}"] for c in COMPUTE_CATEGORIES)
    quantize = float(row["k_quantize"])
    elementwise = float(row["k_elementwise"])
    other = float(row["k_other"])
    profiled = compute + quantize + elementwise + other
    scale = min(1.0, total / profiled) if profiled > 0 else 0.0
    return {
        "compute (GEMMs)": compute * scale,
        "quantization overhead\n(quantize/cast kernels)": quantize * scale,
        "elementwise\n(not quantization)": elementwise * scale,
        "other kernels": other * scale,
        "not in profile\n(launch, host)": max(0.0, total - profiled * scale),
    }


def _layer_order(df: pd.DataFrame) -> list[str]:
    return list(pd.unique(df["layer"]))


def render_overhead_figure(df: pd.DataFrame, label: RunLabel) -> Figure:
    """Per-layer latency bars split into compute vs quantization overhead (one panel per layer)."""
    layers = _layer_order(df)
    metric = metric_label(df)
    fig, axes = new_figure(len(layers), "Fig. 1 - per-layer step latency:\ncompute vs quantization overhead (lower is better)")
    if not layers:
        empty_panel(axes[0], "no points")
    used: set[str] = set()
    for panel in layer_panels(df, axes, layers):
        ax = panel.ax
        unavailable = []
        for i, variant, row in panel.rows:
            if not row["ok"]:
                unavailable.append((i, "failed", FAILED_GID))
                continue
            bottom = 0.0
            for segment, ms in latency_split(row).items():
                if ms <= 0:
                    continue
                ax.bar(i, ms, BAR_WIDTH, bottom=bottom, color=SPLIT_COLORS[segment], edgecolor="white", linewidth=0.5,
                       hatch=variant_hatch(variant), label=segment if segment not in used else "_nolegend_")
                used.add(segment)
                bottom += ms
            yerr = error_bars([row["metric_ms"]], [row["p10_ms"]], [row["p90_ms"]])
            ax.errorbar(i, row["metric_ms"], yerr=yerr, color="black", capsize=3, linewidth=1)
        ax.set_ylim(bottom=0)
        for i, text, gid in unavailable:
            mark_unavailable(ax, i, BAR_WIDTH, text, gid)
        panel.finish()
        ax.set_ylabel(f"step time, ms ({metric})")
    if used:
        handles = legend_handles(SPLIT_COLORS, used)
        if any(is_compiled(v) for v in df["variant"]):
            handles.append(Patch(facecolor="#bbbbbb", edgecolor="white", hatch=COMPILE_HATCH, label="hatched:\ntorch.compile"))
        fig.legend(handles=handles, loc="outside right upper", fontsize=7)
    add_footer(fig, label, sorted(set(df["device"])), f"{metric}; bars split by profiler category share")
    return fig


def render_rank_throughput_figure(df: pd.DataFrame, label: RunLabel) -> Figure:
    """Throughput (million tokens/s) over rank, one panel per layer at that layer's most common token count.

    One colour per method: eager is a solid line with filled markers, torch.compile the same colour
    dashed with hollow markers; a method's option sets differ by marker. The legend names each method
    (each option set) once plus the two line styles.
    """
    layers = _layer_order(df)
    metric = metric_label(df)
    fig, axes = new_figure(len(layers), "Fig. 1 - throughput vs adapter rank (higher is better)")
    if not layers:
        empty_panel(axes[0], "no points")
    option_sets = ordered(option_set(v) for v in df["variant"])
    drawn: list[str] = []  # option sets with a line, for the legend
    any_compiled = False
    for ax, layer in zip(axes, layers):
        sub = df[df["layer"] == layer]
        tokens = sub.groupby("tokens")["rank"].nunique().sort_values(ascending=False).index[0]
        sub = sub[sub["tokens"] == tokens]
        ranks = sorted(sub["rank"].unique())
        for variant in sorted_variants(sub["variant"]):
            pts = sub[sub["variant"] == variant].sort_values("rank")
            ok = pts[pts["ok"]]
            compiled = is_compiled(variant)
            if not ok.empty:
                color = variant_color(variant)
                tps = tokens / (ok["metric_ms"].to_numpy(dtype=float) * 1e-3) / 1e6
                lo = tokens / (ok["p90_ms"].to_numpy(dtype=float) * 1e-3) / 1e6
                hi = tokens / (ok["p10_ms"].to_numpy(dtype=float) * 1e-3) / 1e6
                ax.errorbar(ok["rank"].to_numpy(dtype=float), tps, yerr=error_bars(tps, lo, hi), marker=_marker(variant, option_sets),
                            markersize=5 if compiled else 4, capsize=3, color=color, markerfacecolor="white" if compiled else color,
                            linestyle="--" if compiled else "-", label=variant)
                if option_set(variant) not in drawn:
                    drawn.append(option_set(variant))
                any_compiled |= compiled
            for r in pts.loc[~pts["ok"], "rank"]:
                mark_failed_point(ax, float(r), f"{variant} failed")
        if len(ranks) > 1:
            ax.set_xscale("log", base=2)
        ax.set_xticks([float(r) for r in ranks])
        ax.set_xticklabels([str(r) for r in ranks])
        ax.set_ylim(bottom=0)
        ax.set_xlabel("adapter rank r")
        ax.set_ylabel(f"throughput, million tokens/s ({metric})")
        ax.set_title(f"{layer}  (M={int(tokens)} tokens)", fontsize=9)
    # one legend for all panels, outside them (inside, it covered the lines): a method once, plus the styles
    handles = [Line2D([], [], color=variant_color(s), marker=_marker(s, option_sets), label=wrap_label(s)) for s in ordered(drawn)]
    if any_compiled:
        handles += [Line2D([], [], color="#555555", marker="o", label="eager"),
                    Line2D([], [], color="#555555", marker="D", markerfacecolor="white", linestyle="--", label="torch.compile")]
    if handles:
        fig.legend(handles=handles, loc="outside right upper", fontsize=7)
    add_footer(fig, label, sorted(set(df["device"])), metric)
    return fig
