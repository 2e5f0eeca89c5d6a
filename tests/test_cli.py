"""The `falqon-bench` commands: help with examples, list, env, export/merge, report/compare/kernels wiring, exit codes."""

import json
import subprocess
import sys
import types

import pytest
import torch
from typer.testing import CliRunner

from falqon_core.methods import method_names
from fixtures.methods import register_needs_gpu_method
from falqon_bench.cli import app, parse_overrides
from falqon_bench.data.errors import BenchInputError
from falqon_bench.data.schema import REQUIRED_KEYS, point_id
from falqon_bench.data.store import RunWriter

COMMANDS = ["run", "list", "env", "export", "merge", "report", "compare", "kernels"]


register_needs_gpu_method("cli_needs_gpu")


def invoke(*args):
    return CliRunner().invoke(app, list(args))


def write_run(path, device="NVIDIA H100 80GB HBM3", ranks=(4, 8)):
    w = RunWriter(path, {"suite": "t", "run_id": path.name})
    for rank in ranks:
        ident = {"suite": "t", "method": "falqon", "layer": "l", "K": 64, "N": 64, "rank": rank, "tokens": 16,
                 "compile": False, "cache": "warm", "dtype": "bfloat16", "options": {}}  # fmt: skip
        r = {k: None for k in REQUIRED_KEYS}
        r.update(ident, point_id=point_id(ident), device=device, status="ok", gpu_samples_ms=[1.0], wall_samples_ms=[2.0])
        w.append(r)
    return path


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_with_examples(command):
    result = invoke(command, "--help")
    assert result.exit_code == 0, result.output
    assert "Examples" in result.output and f"falqon-bench {command}" in result.output


def test_run_help_names_units_in_option_names():
    out = invoke("run", "--help").output
    for opt in ("--point-timeout-s", "--warmup-ms", "--budget-ms", "--shard", "--resume", "--no-isolate", "--lock-clocks", "--dry-run", "--methods", "--out"):
        assert opt in out, opt


def test_list_methods_shows_every_method_whether_it_runs_here_and_why_not():
    result = CliRunner().invoke(app, ["list", "methods"], env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    for name in method_names():
        assert name in result.output
    line = next(ln for ln in result.output.splitlines() if "cli_needs_gpu" in ln)
    if not torch.cuda.is_available():
        assert "no" in line and "needs a CUDA GPU" in line
    assert "nothing" in line and "a method that needs CUDA" in line


def test_list_suites_and_layers():
    result = CliRunner().invoke(app, ["list", "suites"], env={"COLUMNS": "300"})
    assert result.exit_code == 0 and all(s in result.output for s in ("smoke", "overhead", "methods", "ranks", "e2e"))
    result = CliRunner().invoke(app, ["list", "layers"], env={"COLUMNS": "300"})
    cells = next([c.strip() for c in ln.split("│")[1:-1]] for ln in result.output.splitlines() if "llama-7b.attn" in ln)
    assert cells[:4] == ["llama-7b.attn", "4096", "4096", "4"]


def test_env_json_is_a_full_record_and_says_no_gpu_on_cpu():
    result = invoke("env", "--json")
    assert result.exit_code == 0
    info = json.loads(result.stdout)
    assert {"device", "versions", "git", "hostname", "cpu", "gpu"} <= set(info)
    assert torch.__version__.startswith(info["versions"]["torch"])
    if not torch.cuda.is_available():
        assert info["device"] == "CPU" and "no NVIDIA GPU" in info["gpu"]["note"]


def test_dry_run_lists_the_points_without_writing_anything(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["run", "smoke", "--dry-run", "--methods", "falqon", "--shard", "1/2"], env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    assert "2 point(s)" in result.output and not (tmp_path / "results").exists()


def test_export_and_merge_through_the_cli(tmp_path):
    a, b = write_run(tmp_path / "a", ranks=(4,)), write_run(tmp_path / "b", ranks=(8,))
    assert invoke("export", str(a), str(b), "--to", str(tmp_path / "x.csv")).exit_code == 0
    assert (tmp_path / "x.csv").read_text().count("\n") == 3
    not_shards = invoke("merge", str(a), str(b), "--out", str(tmp_path / "m"))
    assert not_shards.exit_code == 2 and "not a shard" in not_shards.stderr and not (tmp_path / "m").exists()
    assert invoke("merge", str(a), str(b), "--out", str(tmp_path / "m"), "--allow-partial").exit_code == 0
    assert len((tmp_path / "m" / "points.jsonl").read_text().splitlines()) == 2
    result = invoke("export", str(tmp_path / "missing"), "--to", str(tmp_path / "y.csv"))
    assert result.exit_code == 2 and "no such results directory" in result.stderr


@pytest.mark.parametrize("fmt", ["table", "pytest-benchmark"])
def test_export_to_an_existing_directory_names_it_and_what_to_expects(tmp_path, fmt):
    run = write_run(tmp_path / "a", ranks=(4,))
    (tmp_path / "out").mkdir()
    result = invoke("export", str(run), "--to", str(tmp_path / "out"), "--format", fmt)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert f"--to {tmp_path / 'out'} is a directory" in result.stderr
    assert ".parquet or .csv, or .json with --format pytest-benchmark" in result.stderr


def fake_module(monkeypatch, name, **attrs):
    mod = types.ModuleType(name)
    for k, v in attrs.items():
        setattr(mod, k, v)
    monkeypatch.setitem(sys.modules, name, mod)
    return mod


@pytest.mark.parametrize("regressed, code", [(True, 1), (False, 0)])
def test_compare_exits_1_on_regression_else_0_and_passes_factor_and_overrides(tmp_path, monkeypatch, regressed, code):
    calls = []

    class Result:
        def __init__(self):
            self.regressed = regressed

        def to_table(self):
            return "table"

    def compare_runs(base, new, factor, overrides):
        calls.append((base, new, factor, overrides))
        return Result()

    fake_module(monkeypatch, "falqon_bench.readers.gate", compare_runs=compare_runs)
    result = invoke("compare", "base", "new", "--factor", "1.05", "--override", "falqon/*=1.2", "--override", "*/llama-7b.up/*=1.3")
    assert result.exit_code == code, result.output
    assert [(str(b), str(n), f, o) for b, n, f, o in calls] == [("base", "new", 1.05, {"falqon/*": 1.2, "*/llama-7b.up/*": 1.3})]


def test_compare_bad_input_exits_2(monkeypatch):
    def compare_runs(base, new, factor, overrides):
        raise BenchInputError("base ran on H100, new on H200: compare runs from the same GPU model")

    fake_module(monkeypatch, "falqon_bench.readers.gate", compare_runs=compare_runs)
    result = invoke("compare", "a", "b")
    assert result.exit_code == 2 and "same GPU model" in result.stderr
    result = invoke("compare", "a", "b", "--override", "nofactor")
    assert result.exit_code == 2 and "PATTERN=FACTOR" in result.stderr


def test_parse_overrides_splits_on_the_last_equals_sign():
    assert parse_overrides(["a=b/*=1.5"]) == {"a=b/*": 1.5}
    with pytest.raises(BenchInputError):
        parse_overrides(["x=-1"])


def test_report_defaults_to_the_newest_run_under_results(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    calls = []
    fake_module(monkeypatch, "falqon_bench.readers.report",
                render_report=lambda runs, out, compact: calls.append((runs, out, compact)) or tmp_path / "rep")
    write_run(tmp_path / "results" / "only-run")
    result = invoke("report")
    assert result.exit_code == 0, result.output
    assert [([p.name for p in runs], out, compact) for runs, out, compact in calls] == [(["only-run"], None, False)]


def test_report_without_any_run_exits_2(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fake_module(monkeypatch, "falqon_bench.readers.report", render_report=lambda runs, out: None)
    result = invoke("report")
    assert result.exit_code == 2 and "no runs under results" in result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
def test_kernels_on_cpu_exits_2_saying_a_gpu_is_needed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = invoke("kernels")
    assert result.exit_code == 2 and 'the suite sets device = "cuda"' in result.stderr and "sees no CUDA GPU here" in result.stderr
    assert not (tmp_path / "results").exists()


def test_kernels_only_rejects_an_unknown_group_naming_the_allowed_ones():
    result = invoke("kernels", "--only", "quantise")
    assert result.exit_code == 2
    assert "quantise" in result.stderr and "allowed: quantize, proxy, gemm, transpose" in result.stderr


def test_console_script_main_maps_input_errors_to_exit_2_without_traceback(tmp_path):
    res = subprocess.run(
        [sys.executable, "-c", "from falqon_bench.cli import main; import sys; sys.argv=['falqon-bench','run','no-such-suite']; main()"],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr and res.stderr.strip().startswith("error: suite 'no-such-suite' not found")
