"""A point the runner itself fails (timeout, worker crash, worker start, unavailable) gets an error row that reads
as one of its suite kind: an e2e or accuracy crash row used to carry no `kind`, so the report counted it as a layer
point and drew empty layer figures into an e2e report (results/fast-stacks-rest-e2e-h200, a worker crash)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from typer.testing import CliRunner

from falqon_bench.cli import app
from falqon_bench.measure.runner import _error_row
from falqon_bench.suites.suite import load_suite
from falqon_bench.suites.sweep import expand_suite

REPO = Path(__file__).resolve().parents[1]


def test_crash_rows_of_e2e_and_accuracy_points_carry_their_kinds_keys():
    e2e_point = expand_suite(load_suite(REPO / "suites" / "e2e.toml"))[0]
    row = _error_row(e2e_point, "NVIDIA H200", "worker_crash", "worker_crash: worker died")
    assert row["kind"] == "e2e" and row["mode"] == e2e_point["options"]["mode"] and row["status"] == "error"
    acc_point = expand_suite(load_suite(REPO / "suites" / "accuracy-synthetic.toml"))[0]
    row = _error_row(acc_point, "cpu", "timeout", "timeout: no result")
    o = acc_point["options"]
    assert (row["kind"], row["label"], row["lr"], row["seed"]) == ("accuracy", o["label"], o["lr"], o["seed"])
    layer_point = expand_suite(load_suite(REPO / "suites" / "smoke.toml"))[0]
    assert "kind" not in _error_row(layer_point, "cpu", "timeout", "timeout")  # layer rows never carried one


def test_an_e2e_run_with_a_crashed_point_reports_it_in_the_e2e_table_and_draws_no_layer_figures(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(REPO / "results" / "fast-stacks-bf16-eager-e2e-h200", run)
    manifest = json.loads((run / "manifest.json").read_text())
    points = [json.loads(line) for line in (run / "points.jsonl").read_text().splitlines() if line.strip()]
    crashed = dict(points[0], point_id="crashed0", options={**points[0]["options"], "mode": "compile"})
    row = _error_row(crashed, "NVIDIA H200", "worker_crash", "worker_crash: worker died (exit status 1)")
    row.update(suite=manifest.get("suite"), point_id="crashed0")
    with (run / "points.jsonl").open("a") as f:
        f.write(json.dumps(row) + "\n")
    out = tmp_path / "rep"
    result = CliRunner().invoke(app, ["report", str(run), "--out", str(out)])
    assert result.exit_code == 0, result.output
    md = (out / "report.md").read_text()
    assert "worker_crash: worker died" in md and "| bf16_lora | compile |" in md
    assert not (out / "fig1_overhead.png").exists() and not (out / "winners.png").exists()


def test_a_crash_row_written_before_the_fix_reads_as_e2e_from_the_manifest():
    """results/fast-stacks-rest-e2e-h200 holds such a row (bf16_lora compile + liger, worker crash, no `kind`)."""
    from falqon_bench.data.store import load_run

    rows = load_run(REPO / "results" / "fast-stacks-rest-e2e-h200").points
    crashed = [r for r in rows if r.get("error_type") == "worker_crash"]
    assert crashed and all(r["kind"] == "e2e" and r["mode"] == "compile" for r in crashed)
    assert all(r.get("kind") == "e2e" for r in rows)


def test_an_accuracy_run_with_a_crashed_point_still_reports(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(REPO / "results" / "accuracy-synthetic-cpu", run)
    points = [json.loads(line) for line in (run / "points.jsonl").read_text().splitlines() if line.strip()]
    first = next(p for p in points if p.get("label") == "bf16_lora")
    crashed = dict(first, point_id="crashed0", options={**first["options"], "lr": 0.5})
    row = {**_error_row(crashed, "cpu", "worker_crash", "worker_crash: worker died (SIGKILL)"), "suite": first["suite"]}
    with (run / "points.jsonl").open("a") as f:
        f.write(json.dumps(row) + "\n")
    out = tmp_path / "rep"
    result = CliRunner().invoke(app, ["report", str(run), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "accuracy_loss_vs_lr.png").exists() and "worker died" in (out / "report.md").read_text()
