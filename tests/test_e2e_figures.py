"""The e2e report section: the table's numbers come from the rows (ratios to the best bf16_lora mode), error rows
say why, text goes through the report's escaping, and the figure is written."""

from __future__ import annotations

from pathlib import Path

from falqon_bench.readers.figures.e2e import markdown_table, render_e2e_section, summary_table


def _row(method, mode, tps, status="ok", **extra):
    return {"kind": "e2e", "point_id": f"{method}-{mode}", "method": method, "mode": mode, "status": status,
            "error": None if status == "ok" else "RuntimeError: capture failed", "tokens_per_s": tps, "wall_ms": 4096 / tps * 1e3 if tps else None,
            "wall_p10_ms": None, "wall_p90_ms": None, "gpu_busy": 0.5, "peak_mem_bytes": 2**30 * 24, "convert_s": 3.0,
            "host_ms": 1.0, "device": "NVIDIA H200", "loss_per_step": [5.0, 4.5, 4.0],
            "split_ms": {"forward": 100.0, "backward": 200.0, "optimizer": 5.0, "post_step": 20.0}, **extra}  # fmt: skip


ROWS = [
    _row("bf16_lora", "eager", 10000.0), _row("bf16_lora", "compile", 12500.0),
    _row("falqon", "eager", 8000.0), _row("falqon", "cuda_graph", None, status="error"),
    {"kind": "layers", "point_id": "x", "method": "falqon", "status": "ok"},  # a layer point is not e2e
]


def test_ratios_are_to_the_best_bf16_lora_mode_and_errors_carry_no_numbers():
    table = {(t["method"], t["mode"]): t for t in summary_table([r for r in ROWS if r["kind"] == "e2e"])}
    assert table[("falqon", "eager")]["vs_bf16_best"] == 8000.0 / 12500.0
    assert table[("bf16_lora", "compile")]["vs_bf16_best"] == 1.0
    assert table[("falqon", "cuda_graph")]["tokens_per_s"] is None and table[("falqon", "cuda_graph")]["status"] == "error"
    assert table[("falqon", "eager")]["peak_gib"] == 24.0


def test_markdown_cells_go_through_the_escaping_helper():
    md = markdown_table([r for r in ROWS if r["kind"] == "e2e"], cell=lambda v: f"<{v}>")
    assert "| <falqon> | <eager> | 8,000 | 0.64x |" in md
    assert "error: <RuntimeError: capture failed>" in md


def test_section_writes_the_figure_and_is_empty_without_e2e_rows(tmp_path):
    md = render_e2e_section(ROWS, tmp_path, 60, str)
    assert (tmp_path / "e2e.png").stat().st_size > 0 and "## End to end" in md and "falqon" in md
    assert render_e2e_section(ROWS[-1:], tmp_path, 60, str) == "" and not (tmp_path / "e2e.png").exists()


def test_gpu_busy_counts_overlapping_kernels_once():
    from falqon_bench.measure.e2e_step import covered_time

    assert covered_time([(0, 10), (5, 15), (20, 30), (22, 25)]) == 25  # [0,15) + [20,30)
    assert covered_time([]) == 0


def test_prepare_model_applies_liger_only_when_asked(monkeypatch):
    import sys
    import types

    from falqon_bench.measure.e2e_step import prepare_model

    calls = []
    fake = types.ModuleType("falqon_bench.measure.fast_stacks")
    fake.apply_liger = lambda model, rope=True: calls.append((model, rope))
    monkeypatch.setitem(sys.modules, "falqon_bench.measure.fast_stacks", fake)
    model = object()
    prepare_model(model, {"liger": False, "mode": "eager"})
    assert calls == []
    prepare_model(model, {"liger": True, "mode": "eager"})
    prepare_model(model, {"liger": True, "mode": "compile"})  # compiled: RoPE left out (fast_stacks.apply_liger)
    assert calls == [(model, True), (model, False)]


def test_an_e2e_only_report_has_no_layer_figures_and_inlines_its_own(tmp_path):
    """A whole-model row is not a linear layer: the layer figures (Fig. 1/3/4, floor, winners) showed e2e step
    times as 'cost of a block's linear layers'. Now an e2e-only report holds the e2e section and its figure alone."""
    from falqon_bench.readers.report import render_report

    out = render_report([Path(__file__).resolve().parents[1] / "results" / "e2e-llama7b-h200"], tmp_path / "r")
    assert sorted(p.name for p in out.glob("*.png")) == ["e2e.png"]
    page = (out / "report.html").read_text(encoding="utf-8")
    assert page.count("data:image/png;base64,") == 1 and "End to end" in page


def test_the_phase_panel_leaves_room_above_the_tallest_stack():
    """The top segment of a stack (post_step, a few us) sits at the tallest bar's height; its sticky bottom edge
    used to stop matplotlib's margin, so the tallest bar touched the frame (fp8_lora in fast-stacks-all-e2e-h200)."""
    from falqon_bench.readers.figures.e2e import render_e2e_figure

    fig = render_e2e_figure([r for r in ROWS if r["kind"] == "e2e"])
    phase_ax = next(ax for ax in fig.axes if ax.get_title().startswith("GPU time per step by phase"))
    tallest = 100.0 + 200.0 + 5.0 + 20.0
    assert phase_ax.get_ylim()[0] == 0 and phase_ax.get_ylim()[1] > tallest * 1.05


def test_a_methods_option_sets_are_separate_rows_of_the_e2e_table(tmp_path):
    """Two e2e runs of falqon, the default and the recommended variant (options = {falqon = {...}}), reported
    together: both printed as 'falqon | eager', one figure bar each under one name."""
    variant = {"a_scale": "kaiming", "flush_every": 1, "rounding": "stochastic"}
    rows = [_row("bf16_lora", "eager", 10000.0, options={"mode": "eager", "method_options": {}}),
            _row("falqon", "eager", 8000.0, options={"mode": "eager", "method_options": {}}),
            {**_row("falqon", "eager", 7000.0, options={"mode": "eager", "method_options": variant}), "point_id": "v"}]
    md = render_e2e_section(rows, tmp_path, 60, cell=str)
    assert "| falqon | eager | 8,000 |" in md, md
    assert "| falqon[a_scale=kaiming,flush_every=1,rounding=stochastic] | eager | 7,000 |" in md, md
    assert "| bf16_lora | eager | 10,000 | 1.00x |" in md, md
    assert (tmp_path / "e2e.png").exists()
