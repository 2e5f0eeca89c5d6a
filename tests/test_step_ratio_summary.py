"""falqon_bench.readers.step_ratio_summary: per-round ratios of option sets to default and their median over
rounds (scripts/gpu/accuracy.sh's phase (2) summary)."""

import json

import pytest

from falqon_bench.readers.step_ratio_summary import main, median_ratios, option_label, ratios, step_times, summary_lines

VARIANT = {"flush_every": 1, "rounding": "stochastic"}


def _row(options, ms, layer="l.attn", rank=16, tokens=4096, status="ok", key="gpu_ms"):
    """A results row of the schema (falqon_bench.data.schema.REQUIRED_KEYS) with its time in `key`."""
    row = {"point_id": f"{layer}-{rank}-{tokens}-{sorted((options or {}).items())}", "method": "falqon",
           "layer": layer, "K": 64, "N": 64, "rank": rank, "tokens": tokens, "compile": False, "cache": "warm",
           "device": "CPU", "status": status, "error": None if status == "ok" else "boom", "gpu_ms": None,
           "gpu_samples_ms": [], "gpu_timing": "none", "wall_ms": None, "wall_samples_ms": [], "kernel_ms": {},
           "floor_ms": None, "peak_mem_bytes": 0, "options": options}
    row[key] = ms
    return row


def test_option_labels_name_the_default_and_sort_the_rest():
    assert option_label({}) == option_label(None) == "default"
    assert option_label({"rounding": "stochastic", "flush_every": 1}) == "flush_every=1,rounding=stochastic"


def test_ratio_is_time_over_the_default_and_missing_where_either_is():
    times = step_times([_row({}, 2.0), _row(VARIANT, 2.1), _row({"cache_weight_t": True}, 0.0, status="error")])
    r = ratios(times[("l.attn", 16, 4096)])
    assert r["flush_every=1,rounding=stochastic"] == pytest.approx(1.05)
    assert r["cache_weight_t=true"] is None and "default" not in r
    assert ratios({"x=1": 1.0}) == {"x=1": None}  # no default in this cell


def test_wall_ms_stands_in_on_cpu_runs():
    times = step_times([_row({}, 4.0, key="wall_ms"), _row(VARIANT, 5.0, key="wall_ms")])
    assert ratios(times[("l.attn", 16, 4096)])["flush_every=1,rounding=stochastic"] == pytest.approx(1.25)


def test_median_over_rounds_skips_missing_rounds():
    rounds = [step_times([_row({}, 1.0), _row(VARIANT, v)]) for v in (1.02, 1.08, 1.04)]
    rounds.append(step_times([_row({}, 1.0), _row(VARIANT, 9.0, status="error")]))
    m, lo, hi, n = median_ratios(rounds)[("l.attn", 16, 4096)]["flush_every=1,rounding=stochastic"]
    assert (m, lo, hi, n) == (pytest.approx(1.04), pytest.approx(1.02), pytest.approx(1.08), 3)


def test_summary_lists_every_round_then_the_median(tmp_path, capsys):
    runs = []
    for i, v in enumerate((1.5, 1.6)):
        d = tmp_path / f"round{i}"
        d.mkdir()
        rows = [_row({}, 1.0), _row(VARIANT, v), _row({}, 2.0, layer="l.up"), _row(VARIANT, 2.2, layer="l.up")]
        (d / "points.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        runs.append(str(d))
    assert main(runs + [str(tmp_path / "missing")]) == 0
    out = capsys.readouterr().out
    assert "opt1 = flush_every=1,rounding=stochastic" in out
    assert "round 1:" in out and "round 2:" in out and "round 3:" in out  # the missing run is an empty round
    assert "opt1 1.550 (1.500-1.600, 2)" in out and "opt1 1.100 (1.100-1.100, 2)" in out


def test_no_points_at_all_says_so():
    assert summary_lines([[], []]) == ["layer step: no points"]


def test_a_corrupt_run_is_a_clear_error_not_a_traceback(tmp_path, capsys):
    (tmp_path / "points.jsonl").write_text('{"layer": 1}\n')
    assert main([str(tmp_path)]) == 2
    assert "error:" in capsys.readouterr().err
