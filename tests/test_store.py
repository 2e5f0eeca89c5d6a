"""Results files: durable appends, resume, error rows retried, torn last line, corrupt files, export, merge."""

import json
import os

import pandas as pd
import pytest

import falqon_bench.data.store as store
from falqon_bench.data.schema import REQUIRED_KEYS, point_id
from falqon_bench.data.store import ResultsError, RunWriter, export_points, load_run, merge_runs


def row(rank: int, status: str = "ok", device: str = "NVIDIA H100 80GB HBM3", **extra) -> dict:
    ident = {"suite": "t", "method": "falqon", "layer": "l.64x64", "K": 64, "N": 64, "rank": rank, "tokens": 16,
             "compile": False, "cache": "warm", "dtype": "bfloat16", "options": {}}  # fmt: skip
    r = {k: None for k in REQUIRED_KEYS}
    r.update(ident, point_id=point_id(ident), device=device, status=status, gpu_timing="cudagraph",
             gpu_ms=1.0 + rank / 100, gpu_samples_ms=[1.0, 1.1, 0.9], wall_ms=2.0, wall_samples_ms=[2.0, 2.2],
             kernel_ms={"gemm_fp8": 0.5, "quantize": 0.2}, error=None if status == "ok" else "RuntimeError: boom")  # fmt: skip
    r.update(extra)
    return r


def test_append_writes_one_fsynced_line_per_point(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(store.os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    w = RunWriter(tmp_path / "run", {"suite": "t"})
    synced.clear()
    for r in (4, 8, 16):
        w.append(row(r))
    text = (tmp_path / "run" / "points.jsonl").read_text()
    assert text.endswith("\n") and len(text.splitlines()) == 3 and len(synced) == 3
    assert [json.loads(ln)["rank"] for ln in text.splitlines()] == [4, 8, 16]
    assert json.loads((tmp_path / "run" / "manifest.json").read_text())["schema"] == 1


def test_append_refuses_a_row_missing_required_keys(tmp_path):
    w = RunWriter(tmp_path / "run", {"suite": "t"})
    bad = row(4)
    del bad["gpu_ms"]
    with pytest.raises(ValueError, match="gpu_ms"):
        w.append(bad)


def test_an_existing_run_needs_resume(tmp_path):
    RunWriter(tmp_path / "run", {"suite": "t"}).append(row(4))
    with pytest.raises(ResultsError, match="--resume"):
        RunWriter(tmp_path / "run", {"suite": "t"})


def test_resume_skips_ok_points_and_retries_error_rows(tmp_path):
    w = RunWriter(tmp_path / "run", {"suite": "t", "started_at": "first"})
    w.append(row(4))
    w.append(row(8, status="error"))
    w2 = RunWriter(tmp_path / "run", {"suite": "t", "started_at": "second"}, resume=True)
    assert w2.finished_ids == {row(4)["point_id"]}, "the error point is not finished: it is retried"
    w2.append(row(8))
    run = load_run(tmp_path / "run")
    assert [(p["rank"], p["status"]) for p in run.points] == [(4, "ok"), (8, "ok")], "the retry replaces the error row"
    assert run.manifest["resumed"] == 1 and run.manifest["started_at"] == "first"


def test_half_written_last_line_is_ignored_and_resume_appends_cleanly(tmp_path):
    w = RunWriter(tmp_path / "run", {"suite": "t"})
    w.append(row(4))
    with open(tmp_path / "run" / "points.jsonl", "a") as f:
        f.write(json.dumps(row(8))[:40])  # killed mid-write
    assert [p["rank"] for p in load_run(tmp_path / "run").points] == [4]
    w2 = RunWriter(tmp_path / "run", {"suite": "t"}, resume=True)
    w2.append(row(8))
    lines = (tmp_path / "run" / "points.jsonl").read_text().splitlines()
    assert [json.loads(ln)["rank"] for ln in lines] == [4, 8], "the torn line was cut, not glued to the next one"


def test_corrupt_line_in_the_middle_is_a_results_error(tmp_path):
    w = RunWriter(tmp_path / "run", {"suite": "t"})
    w.append(row(4))
    with open(tmp_path / "run" / "points.jsonl", "a") as f:
        f.write("{not json\n")
    w.append(row(8))
    with pytest.raises(ResultsError, match="points.jsonl:2"):
        load_run(tmp_path / "run")


def test_missing_and_empty_runs_are_results_errors(tmp_path):
    with pytest.raises(ResultsError, match="no such results directory"):
        load_run(tmp_path / "nope")
    RunWriter(tmp_path / "empty", {"suite": "t"})
    with pytest.raises(ResultsError, match="no points.jsonl"):
        load_run(tmp_path / "empty")
    (tmp_path / "empty" / "points.jsonl").write_text("")
    with pytest.raises(ResultsError, match="holds no points"):
        load_run(tmp_path / "empty")


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_export_round_trips_values_and_lists(tmp_path, suffix):
    w = RunWriter(tmp_path / "run", {"suite": "t", "run_id": "r1"})
    rows = [row(4), row(8, status="error", gpu_ms=None)]
    for r in rows:
        w.append(r)
    out = export_points([tmp_path / "run"], tmp_path / f"points{suffix}")
    df = pd.read_parquet(out) if suffix == ".parquet" else pd.read_csv(out)
    assert len(df) == 2 and set(REQUIRED_KEYS) <= set(df.columns) and set(df["run_id"]) == {"r1"}
    first = df.iloc[0]
    assert first["gpu_ms"] == pytest.approx(rows[0]["gpu_ms"]) and pd.isna(df.iloc[1]["gpu_ms"])
    assert json.loads(first["gpu_samples_ms"]) == rows[0]["gpu_samples_ms"]
    assert json.loads(first["kernel_ms"]) == rows[0]["kernel_ms"]
    assert list(df["status"]) == ["ok", "error"] and list(df["rank"]) == [4, 8]


def test_export_to_an_unknown_format_is_a_results_error(tmp_path):
    RunWriter(tmp_path / "run", {"suite": "t"}).append(row(4))
    with pytest.raises(ResultsError, match=".parquet, .csv"):
        export_points([tmp_path / "run"], tmp_path / "x.xlsx")


def test_merge_joins_shards_once_each_and_refuses_mixed_gpus(tmp_path):
    a, b, c = (RunWriter(tmp_path / n, {"suite": "t", "run_id": n, "shard": f"{i}/2"}) for i, n in ((1, "a"), (2, "b"), (2, "c")))
    a.append(row(4))
    a.append(row(8))
    b.append(row(8))  # the same point in two shards is kept once
    b.append(row(16))
    merged = load_run(merge_runs([tmp_path / "a", tmp_path / "b"], tmp_path / "m"))
    assert sorted(p["rank"] for p in merged.points) == [4, 8, 16]
    assert merged.manifest["merged_from"] == ["a", "b"] and merged.manifest["status"] == "merged"
    assert merged.manifest["n_points"] == 3 and merged.manifest["shard"] is None and merged.manifest["shards_missing"] == []
    c.append(row(32, device="NVIDIA H200"))
    with pytest.raises(ResultsError, match="different devices"):
        merge_runs([tmp_path / "a", tmp_path / "c"], tmp_path / "m2")


def test_a_gzipped_run_loads_like_the_plain_one(tmp_path):
    import gzip

    run = tmp_path / "run"
    w = RunWriter(run, {"run_id": "r"})
    for r in (16, 64):
        w.append(row(r))
    plain = load_run(run).points
    data = (run / store.POINTS).read_bytes()
    (run / store.POINTS_GZ).write_bytes(gzip.compress(data))
    (run / store.POINTS).unlink()
    assert load_run(run).points == plain
    assert store.find_runs(tmp_path) == [run]


def test_run_id_is_one_path_component_whatever_the_suite_name():
    import datetime as dt

    now = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc)
    run_id = store.new_run_id("../../evil x/y", "CPU", now)
    assert "/" not in run_id and " " not in run_id and run_id == "20260102-030405-..-..-evil-x-y-cpu"
    assert store.new_run_id("fast-stacks_v1.2", "NVIDIA H200", now) == "20260102-030405-fast-stacks_v1.2-nvidia-h200"


@pytest.mark.parametrize("text", ['{"a": 1}', "not json", "[]"])
def test_a_results_file_of_no_known_format_is_named_as_such(tmp_path, text):
    path = tmp_path / "out.json"
    path.write_text(text)
    with pytest.raises(ResultsError, match="neither a points .jsonl nor a pytest-benchmark JSON"):
        store.load_results(path)
