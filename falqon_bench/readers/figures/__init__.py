"""The report's figures, one module each; every render_* function takes the points table
(falqon_bench.readers.figures.data.points_table) and a RunLabel, and returns a matplotlib Figure."""

from falqon_bench.readers.figures.floor import render_floor_figure
from falqon_bench.readers.figures.gpus import render_gpu_speedup_figure
from falqon_bench.readers.figures.kernel_breakdown import render_breakdown_figure
from falqon_bench.readers.figures.overhead import render_overhead_figure, render_rank_throughput_figure
from falqon_bench.readers.figures.total_cost import render_total_cost_figure
from falqon_bench.readers.figures.winners import render_winners_figure

__all__ = [
    "render_breakdown_figure",
    "render_floor_figure",
    "render_gpu_speedup_figure",
    "render_overhead_figure",
    "render_rank_throughput_figure",
    "render_total_cost_figure",
    "render_winners_figure",
]
