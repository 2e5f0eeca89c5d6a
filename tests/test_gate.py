"""The regression gate: significance AND a factor, never across GPU models, missing points reported."""

import random
import shutil
from pathlib import Path

import pytest
from fixtures.results import H100, H200, make_point, write_run
from rich.table import Table

from falqon_bench.data.errors import BenchInputError
from falqon_bench.readers.gate import compare_runs, median_ci, point_key
from falqon_bench.data.store import ResultsError

LAYER = "llama-7b.attn"
REPO_BASELINES = Path(__file__).resolve().parents[1] / "results" / "baselines"


def _samples(median, n=15, noise=0.01, seed=0):
    rng = random.Random(seed)
    return [median * (1 + rng.uniform(-noise, noise)) for _ in range(n)]


def _run(root, name, timings, device=H100, kind="gpu"):
    """timings: {(method, rank): samples}; kind: which samples the points carry ('gpu' or 'wall')."""
    points = [
        make_point(m, LAYER, r, device=device, **{f"{kind}_samples": s})
        for (m, r), s in timings.items()
    ]
    return write_run(root, name, device, points)


def _row(result, method, rank=16):
    return next(r for r in result.rows if r["key"].startswith(f"{method}/{LAYER}/{rank}/"))


def test_identical_samples_do_not_regress(tmp_path):
    t = {("bf16_lora", 16): _samples(1.0), ("falqon", 16): _samples(0.6, seed=1)}
    res = compare_runs(_run(tmp_path, "base", t), _run(tmp_path, "new", t))
    assert not res.regressed
    assert [r["verdict"] for r in res.rows] == ["same", "same"]
    assert all(r["ratio"] == pytest.approx(1.0) for r in res.rows)


def test_twenty_percent_slower_with_many_samples_regresses(tmp_path):
    base = _run(tmp_path, "base", {("fp8_lora", 16): _samples(1.0)})
    new = _run(tmp_path, "new", {("fp8_lora", 16): _samples(1.2, seed=1)})
    res = compare_runs(base, new)
    row = _row(res, "fp8_lora")
    assert res.regressed and row["verdict"] == "regressed"
    assert row["ratio"] == pytest.approx(1.2, rel=0.02)
    assert row["p_value"] < 0.002 and row["test"].startswith("mann-whitney")


def test_twenty_percent_faster_is_an_improvement_not_a_regression(tmp_path):
    base = _run(tmp_path, "base", {("falqon", 16): _samples(1.2)})
    new = _run(tmp_path, "new", {("falqon", 16): _samples(1.0, seed=1)})
    res = compare_runs(base, new)
    assert not res.regressed and _row(res, "falqon")["verdict"] == "improved"


def test_five_percent_slower_is_significant_but_below_the_factor(tmp_path):
    base = _run(tmp_path, "base", {("fp8_lora", 16): _samples(1.0, noise=0.005)})
    new = _run(tmp_path, "new", {("fp8_lora", 16): _samples(1.05, noise=0.005, seed=1)})
    row = _row(compare_runs(base, new), "fp8_lora")
    assert row["p_value"] < 0.002  # clearly different ...
    assert row["verdict"] == "same"  # ... but 1.05 < 1.10


def test_noisy_overlapping_samples_are_not_a_regression_even_with_a_large_median_ratio(tmp_path):
    base_s = [1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0]
    new_s = [v * 1.15 for v in base_s]
    res = compare_runs(_run(tmp_path, "base", {("fp8_lora", 16): base_s}), _run(tmp_path, "new", {("fp8_lora", 16): new_s}))
    row = _row(res, "fp8_lora")
    assert row["ratio"] == pytest.approx(1.15)
    assert row["p_value"] > 0.002 and row["verdict"] == "same" and not res.regressed


def test_few_samples_use_non_overlapping_intervals(tmp_path):
    base = _run(tmp_path, "base", {("bf16_lora", 16): [1.00, 1.01, 1.02], ("falqon", 16): [1.0, 1.1, 1.3]})
    new = _run(tmp_path, "new", {("bf16_lora", 16): [1.30, 1.31, 1.32], ("falqon", 16): [1.2, 1.25, 1.5]})
    res = compare_runs(base, new)
    separated, overlapping = _row(res, "bf16_lora"), _row(res, "falqon")
    assert separated["test"] == "99% CI" and separated["p_value"] is None
    assert separated["verdict"] == "regressed"
    assert overlapping["ratio"] > 1.10 and overlapping["verdict"] == "same"


def test_override_pattern_raises_the_factor_for_matching_points_only(tmp_path):
    t_base = {("fp8_lora", 16): _samples(1.0), ("bf16_lora", 16): _samples(1.0, seed=2)}
    t_new = {("fp8_lora", 16): _samples(1.2, seed=1), ("bf16_lora", 16): _samples(1.2, seed=3)}
    base, new = _run(tmp_path, "base", t_base), _run(tmp_path, "new", t_new)
    res = compare_runs(base, new, overrides={"fp8_lora/*/eager": 1.5})
    assert _row(res, "fp8_lora")["verdict"] == "same" and _row(res, "fp8_lora")["factor"] == 1.5
    assert _row(res, "bf16_lora")["verdict"] == "regressed" and res.regressed


def test_point_key_names_method_layer_rank_tokens_and_mode():
    assert point_key(make_point("falqon", LAYER, 16, 4096, compile=True)) == f"falqon/{LAYER}/16/4096/compile"


def test_runs_from_different_gpu_models_are_never_compared(tmp_path):
    t = {("bf16_lora", 16): _samples(1.0)}
    with pytest.raises(BenchInputError, match=f"base ran on {H100}, new on {H200}: compare runs from the same GPU model"):
        compare_runs(_run(tmp_path, "base", t), _run(tmp_path, "new", t, device=H200))


def test_points_missing_from_one_side_are_reported_not_regressions(tmp_path):
    base = _run(tmp_path, "base", {("bf16_lora", 16): _samples(1.0), ("falqon", 16): _samples(0.5)})
    new = _run(tmp_path, "new", {("bf16_lora", 16): _samples(1.0), ("fp8_lora", 16): _samples(5.0)})
    res = compare_runs(base, new)
    assert not res.regressed
    assert _row(res, "falqon")["verdict"] == "missing" and _row(res, "falqon")["note"] == "only in baseline"
    assert _row(res, "fp8_lora")["verdict"] == "missing" and _row(res, "fp8_lora")["note"] == "only in new run"


def test_runs_that_share_no_point_are_refused_not_passed(tmp_path):
    base = _run(tmp_path, "base", {("falqon", 16): _samples(0.5)})
    new = _run(tmp_path, "new", {("fp8_lora", 16): _samples(5.0)})
    with pytest.raises(BenchInputError, match="share no point"):
        compare_runs(base, new)


def test_a_point_that_newly_fails_fails_the_gate_but_one_failing_on_both_sides_does_not(tmp_path):
    ok = make_point("fp8_lora", LAYER, 16, gpu_samples=_samples(1.0))
    err = make_point("fp8_lora", LAYER, 16, status="error", error="OutOfMemoryError: CUDA out of memory")
    base, new, both = write_run(tmp_path, "base", H100, [ok]), write_run(tmp_path, "new", H100, [err]), write_run(tmp_path, "both", H100, [err])
    res = compare_runs(base, new)
    assert _row(res, "fp8_lora")["verdict"] == "failed" and "out of memory" in _row(res, "fp8_lora")["note"]
    assert res.regressed
    res2 = compare_runs(both, new)
    assert _row(res2, "fp8_lora")["verdict"] == "failed" and not res2.regressed


def test_wall_samples_are_used_when_there_is_no_gpu_time(tmp_path):
    base = _run(tmp_path, "base", {("bf16_lora", 4): _samples(0.5)}, device="CPU", kind="wall")
    new = _run(tmp_path, "new", {("bf16_lora", 4): _samples(0.7, seed=1)}, device="CPU", kind="wall")
    row = _row(compare_runs(base, new), "bf16_lora", rank=4)
    assert row["samples"].startswith("wall") and row["verdict"] == "regressed"


def test_baseline_may_be_a_bare_points_jsonl_file(tmp_path):
    base = _run(tmp_path, "base", {("bf16_lora", 16): _samples(1.0)})
    baseline_file = tmp_path / "baselines" / "nvidia-h100.jsonl"
    baseline_file.parent.mkdir()
    shutil.copy(base / "points.jsonl", baseline_file)
    new = _run(tmp_path, "new", {("bf16_lora", 16): _samples(1.3, seed=1)})
    res = compare_runs(baseline_file, new)
    assert res.regressed and _row(res, "bf16_lora")["verdict"] == "regressed"


def test_bad_input_raises_bench_input_errors(tmp_path):
    run = _run(tmp_path, "base", {("bf16_lora", 16): _samples(1.0)})
    with pytest.raises(ResultsError):
        compare_runs(tmp_path / "nope", run)
    corrupt = tmp_path / "corrupt.jsonl"
    corrupt.write_text('{"method": "x", "layer": "y", "status": "ok"}\nnot json\n{"method": "x"}\n')
    with pytest.raises(ResultsError, match="corrupt"):
        compare_runs(corrupt, run)
    with pytest.raises(BenchInputError, match="factor"):
        compare_runs(run, run, factor=0.9)
    with pytest.raises(BenchInputError, match="override"):
        compare_runs(run, run, overrides={"*": 0.5})


def test_median_ci_uses_order_statistics_and_the_full_range_for_few_samples():
    assert median_ci([3.0, 1.0, 2.0]) == (1.0, 3.0)
    xs = [float(i) for i in range(1, 51)]
    lo, hi = median_ci(xs)
    # n=50 at 99%: ranks 16 and 35 cover with 1 - 2 P(Bin(50, 1/2) <= 15) = 0.9934; ranks 17, 34 only 0.985
    assert (lo, hi) == (16.0, 35.0)


def test_to_table_lists_every_point(tmp_path):
    t = {("bf16_lora", 16): _samples(1.0), ("falqon", 16): _samples(0.6)}
    res = compare_runs(_run(tmp_path, "base", t), _run(tmp_path, "new", t))
    table = res.to_table()
    assert isinstance(table, Table) and table.row_count == 2
    assert "no regression" in res.summary()


@pytest.mark.parametrize("baseline", sorted(REPO_BASELINES.glob("*.jsonl")), ids=lambda p: p.stem)
def test_each_committed_baseline_is_a_complete_run_of_the_gate_suite_on_its_gpu(baseline):
    """GPU CI runs suites/gate.toml and compares with results/baselines/<gpu>.jsonl: a baseline made
    from another suite (or an older gate.toml) would leave every CI point 'missing', gating nothing."""
    from falqon_bench.data.store import device_slug, load_points_file
    from falqon_bench.suites.suite import load_suite
    from falqon_bench.suites.sweep import expand_suite

    run = load_points_file(baseline)
    wanted = {p["point_id"] for p in expand_suite(load_suite("gate"))}
    assert {p["point_id"] for p in run.points} == wanted
    assert all(p["status"] == "ok" and p["gpu_timing"] == "cudagraph" for p in run.points)
    assert baseline.stem == device_slug(run.points[0]["device"]), "the workflow finds a baseline by the GPU's slug"


def test_option_sets_of_a_method_have_their_own_keys_and_print_literally(tmp_path):
    """Two option sets of falqon are two points; their keys name the options, and the table does not eat '[...]'
    as rich markup (it did: both printed as 'falqon/...')."""
    from rich.console import Console

    variant = {"rounding": "stochastic", "flush_every": 1}
    samples = _samples(0.6)
    plain = make_point("falqon", LAYER, 16, gpu_samples=samples)
    opts = make_point("falqon", LAYER, 16, gpu_samples=samples, options=variant)
    assert point_key(opts) == f"falqon[flush_every=1,rounding=stochastic]/{LAYER}/16/4096/eager"
    assert point_key(plain) == f"falqon/{LAYER}/16/4096/eager"
    result = compare_runs(write_run(tmp_path, "base", H100, [plain, opts]), write_run(tmp_path, "new", H100, [plain, opts]))
    assert result.count("same") == 2
    console = Console(record=True, width=200)
    console.print(result.to_table())
    assert "falqon[flush_every=1,rounding=stochastic]/" in console.export_text()


def test_e2e_and_accuracy_points_are_keyed_by_their_method_options_mode_and_label():
    """Their `options` hold the kind's settings (batch, lr, mode, method_options, ...): keyed as a layer point's option
    set, two e2e modes printed as one 120-character key cut off before the mode, identical in the table."""
    e2e = {"kind": "e2e", "method": "falqon", "layer": "tiny-llama", "rank": 5, "tokens": 64, "compile": False,
           "options": {"batch": 2, "lr": 0.01, "liger": False, "mode": "cuda_graph", "world_size": 1,
                       "method_options": {"flush_every": 1, "rounding": "stochastic"}}}
    assert point_key(e2e) == "falqon[flush_every=1,rounding=stochastic]/tiny-llama/5/64/cuda_graph"
    liger = {**e2e, "options": {**e2e["options"], "liger": True, "method_options": {}, "world_size": 8}}
    assert point_key(liger) == "falqon/tiny-llama/5/64/cuda_graph+liger/x8"
    acc = {"kind": "accuracy", "method": "falqon", "layer": "tiny-llama", "rank": 5, "tokens": 128, "compile": False,
           "options": {"label": "f1, [odd] é", "lr": 0.02, "seed": 0, "flush_every": 1, "batch": 4}}
    assert point_key(acc) == "f1, [odd] é/tiny-llama/5/128/lr=0.02/seed=0"
