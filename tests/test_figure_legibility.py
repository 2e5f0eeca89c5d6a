"""Every figure, rendered from committed results (H100 and H200 overhead runs, a CPU smoke run, a run of
falqon option sets), is legible at its default size: no two pieces of text (tick labels, % labels,
failed/n-a marks, titles, legend entries) overlap on the canvas."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.text import Text

from falqon_bench.readers.figures import (
    render_breakdown_figure,
    render_floor_figure,
    render_gpu_speedup_figure,
    render_overhead_figure,
    render_rank_throughput_figure,
    render_total_cost_figure,
)
from falqon_bench.readers.figures.data import label_for, points_table
from falqon_bench.readers.figures.floor import has_floor
from falqon_bench.data.store import load_run

REPO = Path(__file__).resolve().parents[1]
RUNS = {
    "overhead-h100": [REPO / "results" / "overhead-h100"],
    "overhead-h200": [REPO / "results" / "overhead-h200"],
    "cpu-smoke": [REPO / "tests" / "data" / "cpu-smoke"],
    # one method, three option sets: long labels wrapped under the bars and in the legend
    "falqon-variant-overhead-h200": [REPO / "results" / "falqon-variant-overhead-h200"],
}
PER_GPU = [render_overhead_figure, render_rank_throughput_figure, render_total_cost_figure, render_breakdown_figure, render_floor_figure]
TOLERANCE_PX = 1.0  # boxes may touch, not overlap


def visible_texts(fig: Figure) -> list[Text]:
    """Every drawn, non-empty text of the figure: tick labels inside the axis' view (matplotlib keeps
    spare ticks beyond it, never drawn), annotations, titles, axis labels, legend entries."""
    tick_labels, drawn_ticks = set(), []
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            lo, hi = sorted(axis.get_view_interval())
            span = (hi - lo) or 1.0
            for tick in axis.get_major_ticks() + axis.get_minor_ticks():
                for label in (tick.label1, tick.label2):
                    tick_labels.add(id(label))
                    if lo - 1e-9 * span <= tick.get_loc() <= hi + 1e-9 * span and label.get_visible():
                        drawn_ticks.append(label)
    others = [t for t in fig.findobj(Text) if id(t) not in tick_labels]
    return [t for t in others + drawn_ticks if t.get_visible() and t.get_text().strip()]


def overlapping_pairs(fig: Figure) -> list[tuple[str, str]]:
    """Pairs of texts whose window extents overlap by more than TOLERANCE_PX in both directions."""
    canvas = FigureCanvasAgg(fig)  # the canvas savefig uses for PNGs
    fig.draw_without_rendering()  # lays the figure out (constrained layout, ticks) without rasterizing it
    renderer = canvas.get_renderer()
    boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in visible_texts(fig)]
    pairs = []
    for (a, box_a), (b, box_b) in itertools.combinations(boxes, 2):
        dx = min(box_a.x1, box_b.x1) - max(box_a.x0, box_b.x0)
        dy = min(box_a.y1, box_b.y1) - max(box_a.y0, box_b.y0)
        if dx > TOLERANCE_PX and dy > TOLERANCE_PX:
            pairs.append((a, b))
    return pairs


def test_the_overlap_check_finds_overlapping_labels():
    """The check itself can fail: two labels drawn at one spot are reported."""
    fig = Figure(figsize=(4, 3))
    ax = fig.subplots()
    ax.set_xticks([0, 0.01])
    ax.set_xticklabels(["fp8_base_lora+compile", "fp8_lora+compile"])
    assert ("fp8_base_lora+compile", "fp8_lora+compile") in overlapping_pairs(fig)


@pytest.fixture(scope="module")
def tables():
    loaded = {name: [load_run(d) for d in dirs] for name, dirs in RUNS.items()}
    loaded["h100-vs-h200"] = loaded["overhead-h100"] + loaded["overhead-h200"]
    out = {}
    for name, runs in loaded.items():
        df = points_table(runs)
        out[name] = (df, label_for(runs, df))
    return out


@pytest.mark.parametrize("run", list(RUNS))
@pytest.mark.parametrize("render", PER_GPU, ids=lambda f: f.__name__)
def test_no_text_overlaps_in_any_figure_of_a_committed_run(tables, run, render):
    df, label = tables[run]
    if render is render_floor_figure and not has_floor(df):
        pytest.skip("no floor measured (CPU run): the report leaves the floor figure out")
    assert overlapping_pairs(render(df, label)) == []


def test_no_text_overlaps_in_fig5_h100_vs_h200(tables):
    assert overlapping_pairs(render_gpu_speedup_figure(*tables["h100-vs-h200"])) == []
