"""A method run with several option sets (a suite's `options = [{}, {falqon = {...}}]`) is shown once per
option set in every figure and table that lists variants side by side; the fastest-method views take
the method at its best over its option sets and say which one won."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from fixtures.results import H100, H200, make_point, write_run
from matplotlib.container import BarContainer

from falqon_bench.readers.figures import (
    render_overhead_figure,
    render_rank_throughput_figure,
    render_total_cost_figure,
)
from falqon_bench.readers.figures.data import (
    KERNEL_SUM_MARK,
    label_for,
    option_set,
    ordered,
    points_table,
    variant_label,
    variant_parts,
)
from falqon_bench.readers.figures.gpus import speedups
from falqon_bench.readers.figures.style import is_compiled, layer_panels, new_figure, variant_color, wrap_label
from falqon_bench.readers.figures.total_cost import block_costs
from falqon_bench.readers.figures.winners import winners_table
from falqon_bench.readers.report import perf_table
from falqon_bench.data.schema import point_id
from falqon_bench.data.store import load_run

VARIANT = {"rounding": "stochastic", "flush_every": 1, "a_scale": "kaiming"}
VARIANT_LABEL = "falqon[a_scale=kaiming,flush_every=1,rounding=stochastic]"
LAYERS = {"llama-7b.attn": (4096, 4096, 4), "llama-7b.up": (4096, 11008, 2)}
MS = {("bf16_lora", ""): 1.0, ("falqon", ""): 0.6, ("falqon", "v"): 0.66}


def _point(method: str, opts: dict, layer: str, rank: int, ms: float, device: str = H100, compile: bool = False) -> dict:
    K, N, per_block = LAYERS[layer]
    p = make_point(method, layer, rank, device=device, compile=compile, gpu_samples=[ms * (1 + 0.01 * i) for i in range(5)],
                   kernel_ms={"gemm_fp8": 0.7 * ms, "quantize": 0.2 * ms}, floor_ms=0.5 * ms, K=K, N=N, per_block=per_block)
    p["options"] = dict(opts)
    p["point_id"] = point_id(p)  # the store keeps one row per point id
    return p


def _points(device: str = H100, scale: float = 1.0) -> list[dict]:
    return [_point(m, VARIANT if key else {}, layer, rank, ms * scale * (1 + rank / 256), device)
            for layer in LAYERS for rank in (16, 64) for (m, key), ms in MS.items()]


@pytest.fixture
def run(tmp_path):
    return load_run(write_run(tmp_path, "20250101-000000-options-h100", H100, _points()))


def test_an_option_set_gets_its_own_label_that_still_names_the_method():
    assert variant_label("falqon", False, VARIANT, False) == VARIANT_LABEL
    assert variant_label("falqon", False, {}, False) == "falqon"
    assert variant_label("falqon", True, {"fast_accum": False}, True) == f"falqon[fast_accum=false]+compile {KERNEL_SUM_MARK}"
    compiled = variant_label("falqon", True, VARIANT, True)
    assert variant_parts(compiled) == ("falqon", f"compile {KERNEL_SUM_MARK}") and is_compiled(compiled)
    assert variant_parts(VARIANT_LABEL) == ("falqon", "") and not is_compiled(VARIANT_LABEL)
    assert option_set(compiled) == option_set(VARIANT_LABEL) == VARIANT_LABEL
    assert variant_color(compiled) == variant_color("falqon") != variant_color("bf16_lora")
    # plain first, then each option set with its compiled variant after it, whatever order they come in
    shuffled = [f"{VARIANT_LABEL}+compile", "falqon+compile", VARIANT_LABEL, "bf16_lora", "falqon"]
    assert ordered(shuffled) == ["bf16_lora", "falqon", "falqon+compile", VARIANT_LABEL, f"{VARIANT_LABEL}+compile"]


def test_points_table_keeps_each_option_set_apart_and_the_panel_draws_both(run):
    df = points_table([run])
    assert sorted(set(df["variant"])) == ["bf16_lora", "falqon", VARIANT_LABEL]
    fig, axes = new_figure(2, "t")
    panels = list(layer_panels(df, axes, list(LAYERS)))
    assert [v for _, v, _ in panels[0].rows] == ["bf16_lora", "falqon", VARIANT_LABEL]
    ms = {v: row["metric_ms"] for _, v, row in panels[0].rows}
    assert panels[0].config == (16, 4096)  # samples 1.00-1.04 x the step time: median 1.02 x
    assert ms[VARIANT_LABEL] == pytest.approx(0.66 * (1 + 16 / 256) * 1.02) and ms["falqon"] == pytest.approx(0.6 * (1 + 16 / 256) * 1.02)


def test_fig1_draws_a_bar_per_option_set_with_a_wrapped_legible_label(run):
    df = points_table([run])
    fig = render_overhead_figure(df, label_for([run], df))
    ax = fig.axes[0]
    ticks = [t.get_text() for t in ax.get_xticklabels()]
    assert [t.replace("\n", "") for t in ticks] == ["bf16_lora", "falqon", VARIANT_LABEL]
    assert max(len(line) for line in ticks[2].split("\n")) <= 24
    centres = {round(p.get_x() + p.get_width() / 2, 6) for c in ax.containers if isinstance(c, BarContainer) for p in c.patches}
    assert centres == {0.0, 1.0, 2.0}


def test_wrap_label_breaks_only_after_commas():
    assert wrap_label("fp8_base_lora+compile") == "fp8_base_lora+compile"
    assert wrap_label(VARIANT_LABEL, 24) == "falqon[a_scale=kaiming,\nflush_every=1,\nrounding=stochastic]"


def test_rank_throughput_has_a_line_and_a_legend_entry_per_option_set(run):
    df = points_table([run])
    fig = render_rank_throughput_figure(df, label_for([run], df))
    ax = fig.axes[0]
    lines = {c.get_label(): c.lines[0] for c in ax.containers}
    assert set(lines) == {"bf16_lora", "falqon", VARIANT_LABEL}
    assert lines["falqon"].get_color() == lines[VARIANT_LABEL].get_color()
    assert lines["falqon"].get_marker() != lines[VARIANT_LABEL].get_marker()
    legend = [t.get_text().replace("\n", "") for t in fig.legends[0].get_texts()]
    assert legend == ["bf16_lora", "falqon", VARIANT_LABEL]


def test_total_cost_and_perf_table_show_each_option_set(run):
    df = points_table([run])
    costs = {c["label"]: c for c in block_costs(df[df["rank"] == 64], list(LAYERS))}
    assert set(costs) == {"bf16_lora", "falqon", VARIANT_LABEL}
    assert costs["falqon"]["method"] == costs[VARIANT_LABEL]["method"] == "falqon"
    assert costs[VARIANT_LABEL]["ms"] > costs["falqon"]["ms"]
    fig = render_total_cost_figure(df, label_for([run], df))
    assert len([p for c in fig.axes[0].containers if isinstance(c, BarContainer) for p in c.patches]) == 3
    table = perf_table(df)
    assert len(re.findall(r"\| llama-7b\.attn \| 16 \| 4096 \| falqon", table)) == 2
    # the option set's row, escaped for markdown, with its speedup over bf16_lora (1.0 / 0.66)
    assert re.search(r"\| falqon\\\[a_scale=kaiming,flush_every=1,rounding=stochastic\\\] \|.*\| 1\.5\dx \|", table), table


def test_winners_take_falqon_at_its_best_option_set_and_name_it(tmp_path):
    points = _points()
    for p in points:  # the option set beats default falqon at r=16 only
        if p["options"] and p["rank"] == 16:
            p["gpu_samples_ms"] = [0.1] * 5
            p["gpu_ms"] = 0.1
    df = points_table([load_run(write_run(tmp_path, "r", H100, points))])
    table = winners_table(df).set_index(["layer", "rank"])
    assert table.loc[("llama-7b.attn", 16), "winner_variant"] == VARIANT_LABEL
    assert table.loc[("llama-7b.attn", 16), "falqon_ms"] == pytest.approx(0.1)
    assert table.loc[("llama-7b.attn", 64), "winner_variant"] == "falqon"
    assert (table["winner"] == "falqon").all() and len(table) == 4  # one row per cell, not one per option set


def test_fig5_compares_each_option_set_with_its_own_times(tmp_path):
    runs = [load_run(write_run(tmp_path, name, dev, _points(dev, scale)))
            for name, dev, scale in (("a", H100, 1.0), ("b", H200, 0.8))]
    table = speedups(points_table(runs)).set_index(["device", "method"])
    assert len(table) == 6
    for device in (H100, H200):
        assert table.loc[(device, "falqon"), "speedup"] == pytest.approx(1 / 0.6, rel=0.02)
        assert table.loc[(device, VARIANT_LABEL), "speedup"] == pytest.approx(1 / 0.66, rel=0.02)


def test_committed_variant_run_renders_two_falqon_bars_per_panel():
    repo = Path(__file__).resolve().parents[1]
    run = load_run(repo / "results" / "falqon-variant-f1-overhead-h200")
    df = points_table([run])
    fig = render_overhead_figure(df, label_for([run], df))
    for ax in fig.axes:
        assert [t.get_text().replace("\n", "") for t in ax.get_xticklabels()] == ["falqon", VARIANT_LABEL]
