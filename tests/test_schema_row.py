"""schema.py owns the results row: one Point type, one row maker for every runner, one row check.

Claims: a new key in schema.ROW_KEYS reaches the rows of every runner (layer worker, e2e, accuracy, kernel
micro-benchmarks) without touching them; Point ids are the ones committed runs hold (so --resume and the
gate's baselines still match); the report's stricter row check is the loader's check with shapes required.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from falqon_bench.data import schema
from falqon_bench.data.store import ResultsError, RunData, load_run, require_shape_keys

ROOT = Path(__file__).resolve().parents[1]
NEW_KEY = "example_new_field"


@pytest.fixture
def row_with_new_key(monkeypatch):
    """schema.ROW_KEYS with one more key, as a contributor adding a field would write it."""
    monkeypatch.setitem(schema.ROW_KEYS, NEW_KEY, "a field added in schema.py only")
    return NEW_KEY


def layer_point(method: str = "no_such_method") -> dict:
    return schema.Point(suite="t", method=method, layer="custom.64x64", K=64, N=64, rank=4, tokens=8,
                        compile=False, cache="warm", dtype="bfloat16").as_dict(per_block=1)  # fmt: skip


def test_a_key_added_to_schema_reaches_the_rows_of_every_runner(row_with_new_key):
    from falqon_bench.measure import e2e_step, kernel_bench, worker
    from falqon_bench.measure.accuracy_run import measure_accuracy_point

    ctx = worker.MeasureContext(device="cpu", budget_ms=1.0, warmup_ms=0.0, min_samples=1, profile=False)
    e2e = {**layer_point("bf16_lora"), "kind": "e2e", "options": {"mode": "cuda_graph"}}  # cuda_graph on CPU: fails at once
    accuracy = {**layer_point("bf16_lora"), "kind": "accuracy", "options": {"label": "x", "lr": 1.0, "seed": 0, "corpus": "nope"}}

    def failing_timer(step, cache):
        raise RuntimeError("timer refused")

    case = kernel_bench.KernelCase(method="kernel.x.torch", layer="8x8", K=8, N=8, rank=0, tokens=0, dtype="e4m3",
                                   step=lambda: None)  # fmt: skip
    rows = {
        "layers": worker.measure_point(layer_point(), ctx),
        "e2e": e2e_step.measure_point(e2e, ctx),
        "accuracy": measure_accuracy_point(accuracy, ctx),
        "kernels": kernel_bench.measure_point(case, "warm", failing_timer, torch.device("cpu"), "CPU", None),
        "runner error": schema.error_row(layer_point(), "CPU", "timeout", "timeout: no result"),
    }
    for runner, row in rows.items():
        assert row["status"] == "error", (runner, row["error"])  # every case above fails on purpose
        assert row["error"], runner
        assert NEW_KEY in row and row[NEW_KEY] is None, f"{runner} rows do not start from schema.new_row"
        assert schema.row_problem(json.loads(json.dumps(row, default=str))) is None, runner


def test_point_ids_are_those_of_committed_runs():
    """Point.point_id hashes the identity keys as every committed run did (a change would orphan --resume)."""
    runs = ["overhead-h200", "e2e-llama7b-h200", "kernels-h100", "accuracy-synthetic-cpu"]
    for name in runs:
        run = load_run(ROOT / "results" / name)
        for row in run.points[:20]:
            point = schema.Point(**{k: row[k] for k in schema.IDENTITY_KEYS})
            assert point.point_id == row["point_id"], (name, row["method"])


def test_identity_keys_are_the_point_fields_in_order():
    assert schema.IDENTITY_KEYS == ("suite", "method", "layer", "K", "N", "rank", "tokens", "compile", "cache",
                                    "dtype", "options")  # fmt: skip
    point = schema.Point(**{**{k: 1 for k in schema.IDENTITY_KEYS}, "options": {"a": 1}})
    assert list(point.as_dict(kind="x"))[: len(schema.IDENTITY_KEYS) + 1] == [*schema.IDENTITY_KEYS, "point_id"]


@pytest.mark.parametrize("key, value", [("K", None), ("rank", "16"), ("tokens", 1.5), ("compile", None)])
def test_the_report_requires_shape_keys_the_loader_lets_be_null(tmp_path, key, value):
    row = schema.new_row(layer_point(), "CPU")
    row[key] = value
    loadable = value is None
    assert (schema.row_problem(row) is None) == loadable
    problem = schema.row_problem(row, shape_required=True)
    assert problem and f"`{key}`" in problem and "or null" not in problem
    with pytest.raises(ResultsError, match=rf"point 1 has `{key}`.*nothing was rendered"):
        require_shape_keys(RunData(tmp_path, {}, [row]))


def test_run_writer_refuses_a_status_outside_the_vocabulary(tmp_path):
    from falqon_bench.data.store import RUN_STATUSES, RunWriter, new_manifest

    writer = RunWriter(tmp_path / "run", new_manifest("run", "s", "CPU", {}, 1))
    assert writer.manifest["status"] == "running" and "complete" in RUN_STATUSES
    with pytest.raises(ValueError, match="manifest status 'done'"):
        writer.update_manifest(status="done")
    writer.finish(n_errors=0)
    assert json.loads((tmp_path / "run" / "manifest.json").read_text())["status"] == "complete"


def test_only_timing_py_times_with_cuda_events():
    """One timer: every measuring module times through falqon_bench.measure.timing. e2e_step's PhaseClock
    (CUDA events around the forward / backward / optimizer phases inside one step) is the one other user."""
    allowed = {"falqon_bench/measure/timing.py", "falqon_bench/measure/e2e_step.py"}
    users = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "falqon_bench").rglob("*.py") if "cuda.Event(" in p.read_text())
    assert set(users) <= allowed, f"time with falqon_bench.measure.timing instead: {sorted(set(users) - allowed)}"
    assert "falqon_bench/measure/timing.py" in users
