"""The report: every figure renders from stored results, says what it shows, and never draws a failure as zero."""

import re

import pytest
from fixtures.results import FAILED, FAILED_ERROR, H100, H200, write_cpu_run, write_fixture_runs
from matplotlib.container import BarContainer

from falqon_bench.readers.figures import (
    render_breakdown_figure,
    render_floor_figure,
    render_gpu_speedup_figure,
    render_overhead_figure,
    render_rank_throughput_figure,
    render_total_cost_figure,
)
from falqon_bench.readers.figures.data import label_for, points_table
from falqon_bench.readers.figures.style import FAILED_GID
from falqon_bench.readers.report import render_report
from falqon_bench.data.store import ResultsError, load_run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ALL_FIGURES = ["fig1_overhead.png", "fig1_rank_throughput.png", "fig3_total_cost.png", "fig4_breakdown.png", "fig5_gpus.png", "floor.png", "winners.png"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return write_fixture_runs(tmp_path_factory.mktemp("results"))


@pytest.fixture(scope="module")
def report_dir(runs, tmp_path_factory):
    return render_report([runs["h100"], runs["h200"]], tmp_path_factory.mktemp("report") / "out")


@pytest.fixture(scope="module")
def h100(runs):
    run = load_run(runs["h100"])
    df = points_table([run])
    return df, label_for([run], df)


def _bars(ax):
    return [p for c in ax.containers if isinstance(c, BarContainer) for p in c.patches]


def _failed_artists(ax):
    return [a for a in list(ax.patches) + list(ax.texts) + list(ax.lines) if a.get_gid() == FAILED_GID]


def _panel(fig, title_start):
    return next(ax for ax in fig.axes if ax.get_title().startswith(title_start))


def test_report_writes_every_figure_and_page(report_dir):
    for name in ALL_FIGURES:
        data = (report_dir / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000, name
    for name in ("report.md", "report.html", "perf_table.md"):
        assert (report_dir / name).stat().st_size > 0


def test_html_is_self_contained(report_dir):
    page = (report_dir / "report.html").read_text()
    sources = re.findall(r'src="([^"]*)"', page)
    assert len(sources) == len(ALL_FIGURES)
    assert all(s.startswith("data:image/png;base64,") for s in sources)
    assert "<link" not in page and "http://" not in page and "https://" not in page


def test_markdown_holds_the_perf_table_and_the_failed_points_error(report_dir):
    md = (report_dir / "report.md").read_text()
    table = (report_dir / "perf_table.md").read_text()
    assert table.strip() in md
    assert "| layer | rank | tokens | method | gpu_ms (p10-p90) | wall_ms | floor_ms | % of floor | speedup vs bf16_lora |" in table
    assert f"#### {H100}" in table and f"#### {H200}" in table
    assert re.search(r"\| llama-7b\.down \| 16 \| 4096 \| fp8_lora \| failed \|", table)
    assert re.search(r"\| llama-7b\.attn \| 16 \| 4096 \| bf16_lora \| [\d.]+ \([\d.]+-[\d.]+\) \|.*\| 1\.00x \|", table)
    assert FAILED_ERROR in md
    for name in ALL_FIGURES:
        assert f"]({name})" in md


def test_fig1_overhead_has_a_panel_per_layer_with_units_and_provenance(h100):
    df, label = h100
    fig = render_overhead_figure(df, label)
    assert "Fig. 1" in fig.get_suptitle()
    assert len(fig.axes) == 3
    footer = fig.get_supxlabel()
    assert H100 in footer and "torch 2.11.0" in footer and "triton 3.6.0" in footer and "fixture-h100" in footer
    attn = _panel(fig, "llama-7b.attn")
    assert attn.get_ylabel() == "step time, ms (GPU time)"
    assert [t.get_text() for t in attn.get_xticklabels()] == ["bf16_lora", "fp8_lora", "falqon"]
    # profiled bars split into compute, quantize/cast, elementwise, other kernels and unexplained time:
    # bf16_lora has no quantize kernels, so 4 segments; fp8_lora and falqon 5
    assert len(_bars(attn)) == 4 + 5 + 5
    assert not _failed_artists(attn)


def test_failed_point_is_drawn_as_failed_not_as_zero(h100):
    df, label = h100
    for render in (render_overhead_figure, render_breakdown_figure, render_floor_figure):
        fig = render(df, label)
        down = _panel(fig, FAILED["layer"])
        failed_x = [t.get_text() for t in down.get_xticklabels()].index(FAILED["method"])
        assert not [b for b in _bars(down) if abs(b.get_x() + b.get_width() / 2 - failed_x) < 1e-9], render.__name__
        marks = _failed_artists(down)
        assert any(getattr(a, "get_hatch", lambda: None)() for a in marks)
        assert any(getattr(a, "get_text", lambda: "")() == "failed" for a in marks)
        assert all(b.get_height() > 0 for b in _bars(down))
    cost = render_total_cost_figure(df, label)
    ax = cost.axes[0]
    assert len(_bars(ax)) == 2 and all(b.get_height() > 0 for b in _bars(ax))  # fp8_lora has no block total
    assert any(a.get_text() == "failed" for a in _failed_artists(ax) if hasattr(a, "get_text"))
    rank_fig = render_rank_throughput_figure(df, label)
    assert any(a.get_text() == "fp8_lora failed" for a in _failed_artists(_panel(rank_fig, FAILED["layer"])) if hasattr(a, "get_text"))


def test_rank_throughput_plots_tokens_per_second_over_rank(h100):
    df, label = h100
    fig = render_rank_throughput_figure(df, label)
    ax = _panel(fig, "llama-7b.attn")
    assert ax.get_xlabel() == "adapter rank r" and ax.get_ylabel().startswith("throughput, million tokens/s")
    assert ax.get_legend() is None, "a legend inside a panel covers its lines"
    assert sorted(t.get_text() for t in fig.legends[0].get_texts()) == ["bf16_lora", "falqon", "fp8_lora"]
    falqon = next(c for c in ax.containers if c.get_label() == "falqon").lines[0]
    assert list(falqon.get_xdata()) == [16, 64]
    # the fixture's falqon attn step at r=16 is ~0.66 ms for 4096 tokens: ~6.2 million tokens/s
    assert falqon.get_ydata()[0] == pytest.approx(4096 / (df.query("variant == 'falqon' and layer == 'llama-7b.attn' and rank == 16")["metric_ms"].iloc[0] * 1e-3) / 1e6)


def test_fig3_total_cost_weights_layers_by_per_block(h100):
    df, label = h100
    fig = render_total_cost_figure(df, label)
    ax = fig.axes[0]
    assert "Fig. 3" in fig.get_suptitle() and "ms" in ax.get_ylabel()
    at16 = df[(df["rank"] == 16) & (df["method"] == "bf16_lora")]
    expected = float((at16["metric_ms"] * at16["per_block"]).sum())
    assert _bars(ax)[0].get_height() == pytest.approx(expected)


def test_fig4_breakdown_stacks_each_category_of_kernel_ms(h100):
    df, label = h100
    fig = render_breakdown_figure(df, label)
    attn = _panel(fig, "llama-7b.attn")
    # fixture splits: bf16_lora 4 categories, fp8_lora 5, falqon 5
    assert len(_bars(attn)) == 14
    assert "ms" in attn.get_ylabel()
    assert {t.get_text() for t in fig.legends[0].get_texts()} == {"gemm_bf16", "gemm_fp8", "lora_gemm", "quantize", "elementwise", "other"}


def test_fig5_groups_speedups_by_gpu_model(runs):
    loaded = [load_run(runs["h100"]), load_run(runs["h200"])]
    df = points_table(loaded)
    fig = render_gpu_speedup_figure(df, label_for(loaded, df))
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == [H100, H200]
    assert ax.get_ylabel().startswith("speedup over bf16_lora eager, x")
    heights = sorted(round(b.get_height(), 6) for b in _bars(ax))
    assert len(heights) == 6 and heights.count(1.0) == 2  # bf16_lora against itself on each GPU
    assert H100 in fig.get_supxlabel() and H200 in fig.get_supxlabel()
    assert ax.get_legend() is None and {t.get_text() for t in fig.legends[0].get_texts()} == {"bf16_lora", "fp8_lora", "falqon"}


def test_cpu_run_latest_by_default_uses_wall_time_and_skips_fig5_and_the_floor_figure(tmp_path, monkeypatch):
    write_cpu_run(tmp_path / "results")
    monkeypatch.chdir(tmp_path)
    out = render_report([])  # no run named: the latest under ./results, written to ./reports/<run id>
    assert out == tmp_path.joinpath("reports", "20250101-000000-smoke-cpu").relative_to(tmp_path)
    assert (tmp_path / out / "report.html").exists()
    assert not (out / "fig5_gpus.png").exists()
    md = (out / "report.md").read_text()
    assert "Fig. 5 skipped" in md and "CPU wall time" in md
    run = load_run(tmp_path / "results" / "20250101-000000-smoke-cpu")
    df = points_table([run])
    fig = render_overhead_figure(df, label_for([run], df))
    assert fig.axes[0].get_ylabel() == "step time, ms (CPU wall time)"
    assert fig.get_supxlabel().startswith("device: CPU")
    assert not (out / "floor.png").exists() and "no roofline floor" in md
    floor = render_floor_figure(df, label_for([run], df))
    assert not _bars(floor.axes[0]) and "no roofline floor was measured" in floor.axes[0].texts[0].get_text()
    assert "floor from measured peaks" not in floor.get_supxlabel()


def test_missing_or_corrupt_results_raise_results_error(tmp_path):
    with pytest.raises(ResultsError, match="no such results directory"):
        render_report([tmp_path / "absent"], tmp_path / "out")
    run_dir = write_cpu_run(tmp_path / "results")
    lines = (run_dir / "points.jsonl").read_text().splitlines()
    (run_dir / "points.jsonl").write_text("\n".join([lines[0], "{not json", *lines[1:]]) + "\n")
    with pytest.raises(ResultsError, match="corrupt"):
        render_report([run_dir], tmp_path / "out")


@pytest.mark.parametrize("sub", ["", "sub"])
def test_out_that_is_a_file_or_under_one_exits_2_not_a_traceback(tmp_path, sub):
    from typer.testing import CliRunner

    from falqon_bench.cli import app

    run_dir = write_cpu_run(tmp_path / "results")
    out = run_dir / "points.jsonl" / sub if sub else run_dir / "points.jsonl"
    result = CliRunner().invoke(app, ["report", str(run_dir), "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert "cannot be made" in result.output and "give --out a directory path" in " ".join(result.output.split())


def test_an_accuracy_run_beside_a_layer_run_exits_2_instead_of_vanishing_from_the_report(tmp_path):
    from pathlib import Path

    from falqon_bench.data.errors import BenchInputError

    accuracy_run = Path(__file__).resolve().parents[1] / "results" / "accuracy-synthetic-cpu"
    with pytest.raises(BenchInputError, match="cannot share one report"):
        render_report([write_cpu_run(tmp_path / "results"), accuracy_run], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_fig5_compares_only_points_every_gpu_ran(tmp_path):
    """A compiled variant measured on one GPU only must not make that GPU's group look faster."""
    import pandas as pd

    from falqon_bench.readers.figures.gpus import points_on_every_device, speedups

    rows = []
    for device, extra in (("H100", False), ("H200", True)):
        for method, ms in (("bf16_lora", 1.0), ("fp8_lora", 2.0)):
            rows.append(dict(device=device, method=method, compile=False, layer="l", rank=64, tokens=4096,
                             ok=True, metric_ms=ms, p10_ms=ms, p90_ms=ms, error=None, variant=method))
        if extra:  # only H200 has a (much faster) compiled fp8_lora
            rows.append(dict(device=device, method="fp8_lora", compile=True, layer="l", rank=64, tokens=4096,
                             ok=True, metric_ms=0.5, p10_ms=0.5, p90_ms=0.5, error=None, variant="fp8_lora+compile"))
    df = pd.DataFrame(rows)
    assert len(points_on_every_device(df)) == 4
    table = speedups(df).set_index(["device", "method"])
    assert table.loc[("H100", "fp8_lora"), "speedup"] == pytest.approx(0.5)
    assert table.loc[("H200", "fp8_lora"), "speedup"] == pytest.approx(0.5)


def test_a_profiler_kernel_sum_is_marked_and_never_beats_a_replay_time(tmp_path):
    """A point whose CUDA-graph capture failed carries gpu_ms = profiler kernel sum (gaps left out): the
    table marks it and best-of-eager/compile prefers a replayed time even when the kernel sum is lower."""
    from fixtures.results import make_point, write_run

    from falqon_bench.readers.figures.data import KERNEL_SUM_MARK, best_of_compile, method_sort_key
    from falqon_bench.readers.report import perf_table

    eager = make_point("falqon", "llama-7b.attn", 64, gpu_samples=[0.40] * 5, floor_ms=0.3)
    compiled = make_point("falqon", "llama-7b.attn", 64, compile=True, gpu_samples=[0.39], floor_ms=0.3)
    compiled["gpu_timing"] = "profiler"
    base = make_point("bf16_lora", "llama-7b.attn", 64, gpu_samples=[0.58] * 5, floor_ms=0.5)
    df = points_table([load_run(write_run(tmp_path, "run", H100, [eager, compiled, base]))])
    table = perf_table(df)
    assert re.search(rf"\| falqon\+compile {KERNEL_SUM_MARK} \| 0\.39 \(kernel sum\) \|.*\| 1\.49x \|", table), table
    assert re.search(r"\| falqon \| 0\.4 \(", table) and "lower bound on the step time" in table
    best = best_of_compile(df)
    assert best[best["method"] == "falqon"]["variant"].tolist() == ["falqon"]
    assert method_sort_key(f"falqon+compile {KERNEL_SUM_MARK}")[0] == method_sort_key("falqon")[0]


def test_breakdown_check_shows_the_residual_per_method_and_counts_points_beyond_5_percent(tmp_path):
    from fixtures.results import make_point, write_run

    from falqon_bench.readers.report import breakdown_check

    def point(method, rank, gpu, kernel_sum, dropped=False):
        p = make_point(method, "llama-7b.attn", rank, gpu_samples=[gpu] * 5, kernel_ms={"gemm_bf16": kernel_sum}, floor_ms=0.3)
        p["clock_dropped"] = dropped
        return p

    points = [point("bf16_lora", 16, 1.0, 0.99), point("bf16_lora", 64, 1.0, 1.02),
              point("bf16_linear", 16, 1.0, 1.10, dropped=True), point("bf16_linear", 64, 1.0, 0.98)]
    text = breakdown_check(points_table([load_run(write_run(tmp_path, "run", H100, points))]))
    assert re.search(rf"\| {H100} \| bf16_lora \| 2 \| \+?-?0\.5% \| -2\.0% \| 0 \(0\) \|", text), text
    assert re.search(rf"\| {H100} \| bf16_linear \| 2 \| .* \| -10\.0% \| 1 \(1\) \|", text), text
