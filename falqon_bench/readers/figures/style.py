"""What every figure shares: panels, colors, the provenance footer, error bars, and failed/n-a markers.

Figures are built on matplotlib.figure.Figure directly (no pyplot), so rendering needs no display,
holds no global state, and PNGs come from the Agg canvas.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Patch, Rectangle

from falqon_bench.readers.figures.data import METHOD_ORDER, RunLabel, at_config, method_sort_key, reference_config, variant_parts

CATEGORY_COLORS = {
    "gemm_fp8": "#1f77b4",
    "gemm_bf16": "#6baed6",
    "lora_gemm": "#9467bd",
    "quantize": "#d62728",
    "elementwise": "#ff9896",
    "other": "#7f7f7f",
}
SPLIT_COLORS = {
    "compute (GEMMs)": "#1f77b4",
    "quantization overhead\n(quantize/cast kernels)": "#d62728",
    "elementwise\n(not quantization)": "#f2b701",
    "other kernels": "#7f7f7f",
    "not in profile\n(launch, host)": "#dddddd",
    "not profiled": "#bbbbbb",
}
_PALETTE = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c", "#ccb974", "#64b5cd"]
FAILED_GID = "failed"
NA_GID = "n/a"


COMPILE_HATCH = "////"  # torch.compile variants: the method's colour, hatched, so they never read as eager


def is_compiled(variant: str) -> bool:
    return variant_parts(variant)[1].startswith("compile")


def variant_hatch(variant: str) -> str | None:
    """Hatching for a compiled variant's bar (None for eager)."""
    return COMPILE_HATCH if is_compiled(variant) else None


def variant_color(variant: str) -> str:
    method, _ = variant_parts(variant)
    idx = METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER) + (sum(map(ord, method)) % 3)
    return _PALETTE[idx % len(_PALETTE)]


MAX_PANELS_PER_ROW = 5  # a sweep over 15 layers gave a 6776-pixel-wide, unreadable single row


def new_figure(n_panels: int, title: str, panel_width: float = 4.4, height: float = 4.6) -> tuple[Figure, list[Axes]]:
    """A figure with n_panels (at least one), up to MAX_PANELS_PER_ROW side by side, further ones in more rows
    (unused cells of the last row removed), and a suptitle. `height` is per row."""
    n = max(1, n_panels)
    cols = min(n, MAX_PANELS_PER_ROW)
    rows = -(-n // cols)
    fig = Figure(figsize=(max(8.0, panel_width * cols), height * rows), layout="constrained")
    grid = fig.subplots(rows, cols, squeeze=False).ravel().tolist()
    for ax in grid[n:]:
        ax.remove()
    fig.suptitle(title, fontsize=12)
    return fig, grid[:n]


def add_footer(fig: Figure, label: RunLabel, gpus: Sequence[str], metric: str) -> None:
    """GPU name, library versions, run id and what was measured, under every figure."""
    text = (
        f"{'device' if list(gpus) == ['CPU'] else 'GPU'}: {', '.join(gpus) or '?'}  |  torch {label.torch}  |  triton {label.triton}  |  {metric}\n"
        f"run {', '.join(label.run_ids)}"
    )
    fig.supxlabel(text, fontsize=7, color="#444444")


def legend_handles(colors: dict[str, str], used: set[str]) -> list[Patch]:
    """Legend entries for the used keys of `colors`, in the dict's order (not the order bars were drawn)."""
    return [Patch(facecolor=c, label=k) for k, c in colors.items() if k in used]


def error_bars(values: Sequence[float], low: Sequence[float], high: Sequence[float]) -> np.ndarray:
    """2 x N yerr (distances below/above each value), never negative."""
    v, lo, hi = (np.asarray(x, dtype=float) for x in (values, low, high))
    return np.vstack([np.clip(v - lo, 0, None), np.clip(hi - v, 0, None)])


def mark_unavailable(ax: Axes, x: float, width: float, text: str, gid: str) -> Rectangle:
    """A hatched, empty bar over the whole panel height with `text` ('failed', 'n/a'), so a missing
    value never reads as zero. Call after the real bars so the panel's y-range is known."""
    bottom, top = ax.get_ylim()
    rect = Rectangle((x - width / 2, bottom), width, top - bottom, fill=False, hatch="///", edgecolor="#999999",
                     linewidth=0.8, gid=gid, label="_nolegend_")
    ax.add_patch(rect)
    ax.text(x, bottom + 0.5 * (top - bottom), text, rotation=90, ha="center", va="center", fontsize=8, color="#b22222",
            gid=gid, bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.8, "pad": 1})
    ax.set_ylim(bottom, top)
    return rect


def mark_failed_point(ax: Axes, x: float, text: str = "failed") -> None:
    """A failed point on a line plot: an X on the panel's floor (axes coordinates), labelled, not a value."""
    ax.plot([x], [0.04], marker="X", color="#b22222", markersize=8, linestyle="none", transform=ax.get_xaxis_transform(),
            gid=FAILED_GID, label="_nolegend_", clip_on=False)
    ax.text(x, 0.09, text, transform=ax.get_xaxis_transform(), ha="center", fontsize=7, color="#b22222", gid=FAILED_GID)


LABEL_LINE_CHARS = 24  # a wrapped variant label's longest line (an option set spans a few such lines)


def wrap_label(label: str, width: int = LABEL_LINE_CHARS) -> str:
    """A variant label on lines of at most `width` characters where it can be, broken only after a comma
    (between an option set's key=value pairs), so a long option set reads whole under its bar."""
    lines: list[str] = []
    for piece in re.split(r"(?<=,)", label):
        if lines and len(lines[-1]) + len(piece) <= width:
            lines[-1] += piece
        else:
            lines.append(piece)
    return "\n".join(lines)


def set_variant_ticks(ax: Axes, variants: Sequence[str]) -> None:
    """Variant names under the bars, vertical: at 35 degrees the labels of a 15-bar panel overlapped.
    Option sets are wrapped (wrap_label): their lines stand side by side under the bar."""
    ax.set_xticks(range(len(variants)))
    # multialignment right: every line of a wrapped label ends at the axis, as a one-line label does
    ax.set_xticklabels([wrap_label(v) for v in variants], rotation=90, ha="center", multialignment="right",
                       fontsize=7 if len(variants) > 8 else 8)
    ax.set_xlim(-0.6, len(variants) - 0.4)


def sorted_variants(variants) -> list[str]:
    return sorted(set(variants), key=method_sort_key)


@dataclass
class LayerPanel:
    """One layer's panel of a per-method bar figure, at the layer's reference (rank, tokens)."""

    ax: Axes
    layer: str
    config: tuple[int, int] | None
    variants: list[str]
    rows: list[tuple[int, str, Any]]  # (bar index, variant, its point row)

    def finish(self) -> None:
        """Method names under the bars and the layer / rank / tokens title."""
        set_variant_ticks(self.ax, self.variants)
        title = f"{self.layer}  (r={self.config[0]}, M={self.config[1]} tokens)" if self.config else self.layer
        self.ax.set_title(title, fontsize=9)


def layer_panels(df, axes, layers) -> Iterator[LayerPanel]:
    """Pair each layer with its axes and the point of every variant at the layer's reference config."""
    for ax, layer in zip(axes, layers):
        sub = df[df["layer"] == layer]
        config = reference_config(sub)
        pts = at_config(sub, config)
        variants = sorted_variants(pts["variant"])
        rows = [(i, v, pts[pts["variant"] == v].iloc[0]) for i, v in enumerate(variants)]
        yield LayerPanel(ax, layer, config, variants, rows)


def geomean(values: Sequence[float]) -> float:
    vals = [v for v in values if v and v > 0 and math.isfinite(v)]
    return math.exp(sum(map(math.log, vals)) / len(vals)) if vals else float("nan")


def empty_panel(ax: Axes, message: str) -> None:
    ax.text(0.5, 0.5, message, transform=ax.transAxes, ha="center", va="center", fontsize=9, color="#666666", wrap=True)
    ax.set_xticks([])
    ax.set_yticks([])
