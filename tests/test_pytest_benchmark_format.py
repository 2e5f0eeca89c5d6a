"""pytest-benchmark JSON: committed runs exported, read back by pytest-benchmark's own loader and its `compare`;
`falqon-bench compare` on such files gives the verdicts of the runs they came from; benchmarks/ skips
cleanly without a GPU and, on a CPU suite, reports exactly the samples measure_point took."""

import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pytest_benchmark.stats import Stats
from pytest_benchmark.storage.file import FileStorage
from typer.testing import CliRunner

from falqon_bench.cli import app
from falqon_bench.readers.gate import compare_runs
from falqon_bench.data.pytest_benchmark_format import (
    SampleReplay,
    benchmark_id,
    export_pytest_benchmark,
    is_pytest_benchmark_json,
    run_to_pytest_benchmark,
    sample_stats,
)
from falqon_bench.data.store import load_results
from fixtures.results import H100, make_point, write_cpu_run, write_run

REPO = Path(__file__).resolve().parents[1]
COMMITTED = [REPO / "results" / "gate-h100-repeat", *sorted((REPO / "results" / "baselines").glob("*.jsonl"))]
H100_BASELINE = REPO / "results" / "baselines" / "nvidia-h100-80gb-hbm3.jsonl"
H100_REPEAT = REPO / "results" / "gate-h100-repeat"


class RecordingLogger:
    """pytest-benchmark's FileStorage reports a file it cannot load as a warning and goes on: record them."""

    def __init__(self):
        self.warnings = []

    def warning(self, text, **kwargs):
        self.warnings.append(text)

    def info(self, *args, **kwargs):
        pass

    debug = info


def verdicts(result):
    return {r["key"]: (r["verdict"], r["p_value"], r["ratio"], r["samples"]) for r in result.rows}


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6, 7, 8, 11, 40])
def test_sample_stats_equal_pytest_benchmarks_own_stats(n):
    rng = random.Random(n)
    samples = [rng.lognormvariate(-7, 0.1) for _ in range(n)]
    theirs = Stats()
    for s in samples:
        theirs.update(s)
    ours = sample_stats(samples)
    for field in Stats.fields:
        assert ours[field] == pytest.approx(getattr(theirs, field), rel=1e-12), field
    assert ours["data"] == samples and ours["iterations"] == 1


@pytest.mark.parametrize("run", COMMITTED, ids=lambda p: p.name)
def test_export_of_a_committed_run_loads_with_pytest_benchmarks_own_loader(run, tmp_path):
    out = export_pytest_benchmark(run, tmp_path / "bench.json")
    logger = RecordingLogger()
    loaded = list(FileStorage(tmp_path / "storage", logger=logger).load_benchmarks(str(out)))
    assert logger.warnings == []
    points = {p["point_id"]: p for p in load_results(run).points}
    assert len(loaded) == len(points) == 24
    assert len({b["fullname"] for b in loaded}) == 24
    for bench in loaded:
        point = points[bench["extra_info"]["point_id"]]
        samples_s = [v / 1e3 for v in point["gpu_samples_ms"]]
        assert bench["name"] == f"test_point[{benchmark_id(point)}]"
        assert bench["rounds"] == len(samples_s) and bench["data"] == samples_s
        assert bench["median"] * 1e3 == pytest.approx(point["gpu_ms"], rel=1e-9)
        assert bench["extra_info"]["device"] == point["device"] and bench["extra_info"]["timed_by"] == "gpu_samples_ms"
    doc = json.loads(out.read_text())
    assert doc["commit_info"]["id"] == load_results(run).manifest["env"]["git"]["sha"]
    assert doc["machine_info"]["gpu"] == next(iter(points.values()))["device"]


def test_pytest_benchmark_compare_reads_two_exports_and_exits_0(tmp_path):
    a = export_pytest_benchmark(H100_BASELINE, tmp_path / "base.json")
    b = export_pytest_benchmark(H100_REPEAT, tmp_path / "new.json")
    res = subprocess.run([sys.executable, "-m", "pytest_benchmark", "compare", str(a), str(b)],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "Failed to load" not in res.stdout + res.stderr
    rows = [line for line in res.stdout.splitlines() if line.startswith("test_point[")]
    assert len(rows) == 48  # 24 points from each file
    assert re.search(r"^test_point\[falqon-llama-7b\.up-r64-t4096-eager\] \(\S*base\) ", res.stdout, re.M)


@pytest.mark.parametrize("factor", [1.10, 1.0])
def test_falqon_compare_on_two_exports_gives_the_verdicts_of_the_runs(tmp_path, factor):
    a = export_pytest_benchmark(H100_BASELINE, tmp_path / "base.json")
    b = export_pytest_benchmark(H100_REPEAT, tmp_path / "new.json")
    on_runs = compare_runs(H100_BASELINE, H100_REPEAT, factor)
    on_files = compare_runs(a, b, factor)
    assert verdicts(on_files) == verdicts(on_runs)
    assert on_files.regressed == on_runs.regressed
    if factor == 1.0:  # at factor 1 every significant difference counts: all three verdicts occur
        assert {v[0] for v in verdicts(on_runs).values()} == {"same", "regressed", "improved"}


def test_falqon_compare_mixes_a_run_and_an_export_and_keeps_failed_points(tmp_path):
    ok = [make_point(m, "l", r, gpu_samples=[1.0 + 0.01 * i for i in range(8)], wall_samples=[3.0] * 8) for m in ("bf16_lora", "falqon") for r in (8, 16)]
    broken = make_point("falqon", "l", 16, status="error", error="OutOfMemoryError: CUDA out of memory")
    base = write_run(tmp_path, "base", H100, ok)
    new = write_run(tmp_path, "new", H100, ok[:3] + [broken])
    new_json = export_pytest_benchmark(new, tmp_path / "new.json")
    on_runs, on_mixed = compare_runs(base, new), compare_runs(base, new_json)
    assert verdicts(on_mixed) == verdicts(on_runs)
    assert on_runs.count("failed") == 1 and on_mixed.regressed and on_runs.regressed
    cli = CliRunner().invoke(app, ["compare", str(base), str(new_json)])
    assert cli.exit_code == 1, cli.output


def test_export_of_a_cpu_run_times_by_wall_samples(tmp_path):
    run = write_cpu_run(tmp_path)
    out = tmp_path / "cpu.json"
    cli = CliRunner().invoke(app, ["export", str(run), "--to", str(out), "--format", "pytest-benchmark"])
    assert cli.exit_code == 0, cli.output
    doc = json.loads(out.read_text())
    for bench in doc["benchmarks"]:
        assert bench["extra_info"]["timed_by"] == "wall_samples_ms"
        assert bench["stats"]["data"] == [v / 1e3 for v in bench["extra_info"]["wall_samples_ms"]]
    assert verdicts(compare_runs(out, out)) == verdicts(compare_runs(run, run))


def test_a_pytest_benchmark_file_without_point_identity_is_a_clear_input_error(tmp_path):
    foreign = tmp_path / "foreign.json"
    stats = sample_stats([0.001, 0.002])
    foreign.write_text(json.dumps({"machine_info": {}, "commit_info": {}, "version": "5.1.0", "datetime": "",
                                   "benchmarks": [{"name": "test_x", "fullname": "t.py::test_x", "group": None, "params": None,
                                                   "param": None, "extra_info": {}, "options": {}, "stats": stats}]}))
    assert is_pytest_benchmark_json(foreign)
    cli = CliRunner().invoke(app, ["compare", str(foreign), str(H100_REPEAT)])
    assert cli.exit_code == 2
    assert "no falqon-bench point identity" in cli.output and "Traceback" not in cli.output


def test_export_to_pytest_benchmark_takes_one_run(tmp_path):
    cli = CliRunner().invoke(app, ["export", str(H100_REPEAT), str(H100_REPEAT), "--to", str(tmp_path / "x.json"), "--format", "pytest-benchmark"])
    assert cli.exit_code == 2 and "one run per file" in cli.output


def test_points_files_are_not_taken_for_pytest_benchmark_json():
    assert not is_pytest_benchmark_json(H100_BASELINE)
    assert not is_pytest_benchmark_json(H100_REPEAT / "points.jsonl.gz")
    assert not is_pytest_benchmark_json(H100_REPEAT)


def test_sample_replay_gives_each_round_exactly_one_sample():
    replay = SampleReplay()
    samples = [0.0031, 0.0029, 0.0030000000000000001]
    assert replay.load(samples) == 3
    durations = []
    for _ in samples:
        start = replay()
        replay.next_sample()
        durations.append(replay() - start)
    assert durations == samples
    with pytest.raises(RuntimeError):
        replay.next_sample()


def _pytest_benchmarks(tmp_path, *args, env=None):
    """`python -m pytest -p pytest_benchmark benchmarks ...` from the repository root, in a fresh process."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "pytest_benchmark", "-p", "no:cacheprovider", "benchmarks",
                           "-q", "-rs", *args], cwd=REPO, env=full_env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow  # a fresh interpreter: mostly the import of torch
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the skip on a machine without a GPU")
def test_benchmarks_skip_every_gate_point_with_a_reason_without_a_gpu(tmp_path):
    res = _pytest_benchmarks(tmp_path, "-m", "gpu", env={"FALQON_BENCH_SUITE": ""})
    assert res.returncode == 0, res.stdout + res.stderr
    assert "24 skipped" in res.stdout
    assert "needs a CUDA GPU" in res.stdout


@pytest.mark.slow  # a fresh interpreter: mostly the import of torch
def test_benchmarks_report_exactly_the_samples_measure_point_took_on_a_cpu_suite(tmp_path):
    suite = tmp_path / "tiny.toml"
    suite.write_text(
        'name = "tiny"\ndevice = "cpu"\n[timing]\nbudget_ms = 5\nwarmup_ms = 1\nmin_samples = 4\nprofile = false\n'
        '[[grid]]\nlayers = [{ name = "tiny.16x24", K = 16, N = 24 }]\nranks = [4]\ntokens = [8]\nmethods = ["bf16_lora"]\n'
    )
    out = tmp_path / "out.json"
    res = _pytest_benchmarks(tmp_path, "--benchmark-json", str(out), env={"FALQON_BENCH_SUITE": str(suite), "FALQON_GIT_SHA": "0123abc"})
    assert res.returncode == 0, res.stdout + res.stderr
    doc = json.loads(out.read_text())
    (bench,) = doc["benchmarks"]
    wall = bench["extra_info"]["wall_samples_ms"]
    assert len(wall) >= 4 and bench["stats"]["data"] == [v / 1e3 for v in wall]
    assert bench["fullname"] == "benchmarks/test_suite_points.py::test_point[bf16_lora-tiny.16x24-r4-t8-eager]"
    assert doc["machine_info"]["gpu"] == "CPU" and doc["commit_info"]["id"] == "0123abc"
    run = load_results(out)
    assert run.points[0]["wall_ms"] == pytest.approx(bench["stats"]["median"] * 1e3, rel=1e-9)
    assert verdicts(compare_runs(out, out))["bf16_lora/tiny.16x24/4/8/eager"][0] == "same"


def test_files_saved_without_stats_data_compare_by_their_extra_info_samples(tmp_path):
    """`--benchmark-autosave` stores no stats.data: the samples in extra_info still give the runs' verdicts."""
    doc = json.loads(export_pytest_benchmark(H100_REPEAT, tmp_path / "new.json").read_text())
    for bench in doc["benchmarks"]:
        del bench["stats"]["data"]
    stripped = tmp_path / "0001_autosaved.json"
    stripped.write_text(json.dumps(doc))
    assert verdicts(compare_runs(H100_BASELINE, stripped, 1.0)) == verdicts(compare_runs(H100_BASELINE, H100_REPEAT, 1.0))


def test_export_of_a_run_with_option_sets_names_each_set():
    """Point options are the point's own method options, flat ({"flush_every": 1}); the id builder read them as
    {method: {key: value}} and the export died with a traceback on the committed variant run."""
    run = Path(__file__).resolve().parents[1] / "results" / "falqon-variant-f1-overhead-h200"
    doc = run_to_pytest_benchmark(load_results(run))
    names = [b["name"] for b in doc["benchmarks"]]
    assert len(set(names)) == len(names) == 12
    assert "test_point[falqon-llama-7b.attn-r16-t4096-eager-a_scale=kaiming,flush_every=1,rounding=stochastic]" in names
