"""Kernel micro-benchmarks are a suite kind of the one runner (`kind = "kernels"`, suites/kernels.toml).

Claims: the packaged suite expands to exactly the points of the committed kernels run (same ids, so resume,
compare and the report keep working); the file's keys select kernels, formats, variants and caches; a mistake
exits 2 naming file, key and allowed values; on a CPU the packaged (device = "cuda") suite exits 2 like every
GPU-only kind, and a device = "cpu" suite runs through runner.run_suite (Triton under TRITON_INTERPRET=1,
wall time only) with resume, worker groups per kernel and the kernels summary table.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from rich.console import Console

from falqon_bench.data.errors import BenchInputError
from falqon_bench.data.store import load_run
from falqon_bench.measure import runner
from falqon_bench.suites import kernels_suite
from falqon_bench.suites.suite import load_suite, validate_suite
from falqon_bench.suites.sweep import expand_suite

ROOT = Path(__file__).resolve().parents[1]
TINY = """
kind = "kernels"
name = "kernels-tiny"
device = "cpu"
caches = ["warm"]
implementations = ["triton", "torch"]
[timing]
budget_ms = 2
warmup_ms = 0
min_samples = 2
[shapes]
transpose = [[8, 64], [16, 32]]
"""


def tiny_suite(tmp_path: Path, text: str = TINY) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(text)
    return path


def quiet() -> Console:
    return Console(file=open(os.devnull, "w"), width=200)


def test_the_packaged_suite_expands_to_the_points_of_the_committed_kernels_run():
    points = expand_suite(load_suite("kernels"))
    committed = load_run(ROOT / "results" / "kernels-h100").points
    assert [p["point_id"] for p in points] == [r["point_id"] for r in committed]  # same points, same order
    assert {p["kind"] for p in points} == {"kernels"} and {p["per_block"] for p in points} == {1}
    groups = list(dict.fromkeys(p["worker_group"] for p in points))
    assert groups == ["kernel.quantize", "kernel.proxy", "kernel.gemm", "kernel.transpose"]  # one worker per kernel


def test_formats_granularities_implementations_and_caches_select_the_points(tmp_path):
    text = TINY.replace('caches = ["warm"]', 'caches = ["cold"]\nformats = ["e5m2"]\ngranularities = ["rowwise"]')
    text = text.replace('implementations = ["triton", "torch"]', 'implementations = ["torch", "torch_compile", "cublas"]')
    text = text.replace("transpose = [[8, 64], [16, 32]]", "quantize = [[8, 64]]\ngemm = [[32, 64, 64, 8]]\ntranspose = [[8, 64]]")
    points = expand_suite(load_suite(tiny_suite(tmp_path, text)))
    assert [p["method"] for p in points] == [
        "kernel.quantize_e5m2_rowwise.torch", "kernel.quantize_e5m2_rowwise.torch_compile",
        "kernel.melded_gemm.cublas", "kernel.melded_gemm_quantized_oa.cublas", "kernel.transpose_fp8.torch",
    ]
    assert {p["cache"] for p in points} == {"cold"} and points[1]["compile"] is True
    assert points[2]["kernel_shape"] == [32, 64, 64, 8] and points[2]["layer"] == "32x64x64"


def test_kernels_runs_only_the_listed_kernels(tmp_path):
    text = TINY.replace("transpose = [[8, 64], [16, 32]]", "quantize = [[8, 64]]\ntranspose = [[8, 64]]")
    text = text.replace('device = "cpu"', 'device = "cpu"\nkernels = ["transpose"]')
    points = expand_suite(load_suite(tiny_suite(tmp_path, text)))
    assert {p["kernel"] for p in points} == {"transpose"}


@pytest.mark.parametrize("edit, expected", [
    (("caches", "cache"), "unknown key `cache` in the top level of {file} line 5; allowed keys: kind, name, description, "
                          "device, kernels, caches, formats, granularities, implementations, timing, shapes"),
    (("transpose = ", "transpos = "), "unknown key `transpos` in [shapes] of {file} line 12; allowed keys: quantize, proxy, gemm, transpose"),
    (("budget_ms = 2", "budget = 2"), "unknown key `budget` in [timing] of {file} line 8; allowed keys: budget_ms, warmup_ms, min_samples"),
    (("budget_ms = 2", "budget_ms = 0"), "bad value for `budget_ms` in [timing] of {file} line 8: Input should be greater than 0 (got 0)"),
    (('"triton", "torch"]', '"triton", "cuda"]'), "bad value for `implementations` item 2 in the top level of {file} line 6: "
                                                  "Input should be 'triton', 'torch', 'torch_compile' or 'cublas' (got 'cuda')"),
    (("[[8, 64], [16, 32]]", "[[8, 64], [16, 'a']]"), "bad value for `transpose` item 2 in [shapes] of {file} line 12: Input should be a valid integer"),
    (("[[8, 64], [16, 32]]", "[[8, 64], [16, 32, 4]]"), "bad shape [16, 32, 4] (item 2) for `transpose` in [shapes] of {file} line 12: a transpose shape is 2 integers >= 1, [rows, cols]"),
    (("transpose = [[8, 64], [16, 32]]", "proxy = [[16, 64, 4, 8]]"), "top-k rows k = 8 exceeds the rank r = 4"),
    (('device = "cpu"', 'device = "cpu"\nkernels = ["gemm"]'), "runs no shapes for gemm: give each kernel it runs a list of shapes in [shapes] (quantize = [[rows, cols], ...]; proxy = [[N, K, r, k], ...]"),
    (("[shapes]\ntranspose = [[8, 64], [16, 32]]", ""), "the kernels suite {file} runs no shapes for any kernel: give each kernel it runs a list of shapes in [shapes]"),
])
def test_a_mistake_is_one_paragraph_naming_file_key_line_and_allowed_values(tmp_path, edit, expected):
    path = tiny_suite(tmp_path, TINY.replace(*edit))
    with pytest.raises(BenchInputError) as e:
        load_suite(path)
    assert expected.format(file=path) in str(e.value)


def test_a_bad_kernels_suite_exits_2_through_the_cli(tmp_path):
    from typer.testing import CliRunner

    from falqon_bench.cli import app

    path = tiny_suite(tmp_path, TINY.replace("caches", "cache"))
    result = CliRunner().invoke(app, ["run", str(path), "--dry-run"])
    assert result.exit_code == 2 and "unknown key `cache`" in result.stderr and "Traceback" not in result.stderr


def test_an_unknown_kind_names_kernels_among_the_allowed():
    with pytest.raises(BenchInputError, match="allowed: layers, e2e, accuracy, kernels"):
        validate_suite({"kind": "kernel", "name": "x"})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only outcome")
def test_the_packaged_suite_on_a_cpu_exits_2_saying_it_needs_a_gpu(tmp_path):
    options = runner.RunOptions(results_root=tmp_path)
    with pytest.raises(BenchInputError, match='the suite sets device = "cuda" but .* sees no CUDA GPU here'):
        runner.run_suite(load_suite("kernels"), options, console=quiet())
    assert not any(tmp_path.iterdir()), "nothing is written when the run cannot start"


def test_a_cpu_suite_runs_isolated_one_worker_per_kernel_with_the_runners_manifest_and_summary(tmp_path, capsys):
    suite = load_suite(tiny_suite(tmp_path))
    options = runner.RunOptions(out_dir=tmp_path / "run", point_timeout_s=120)
    outcome = runner.run_suite(suite, options, console=quiet())
    assert outcome.status == "complete" and len(outcome.rows) == 4
    run = load_run(tmp_path / "run")
    assert [r["point_id"] for r in run.points] == [p["point_id"] for p in outcome.points]
    for row in run.points:
        assert row["status"] == "ok", row["error"]
        assert row["device"] == "CPU" and row["gpu_ms"] is None and row["gpu_timing"] == "none" and row["wall_ms"] > 0
        assert row["suite"] == "kernels-tiny" and row["bytes"] == 2.0 * row["K"] * row["N"]
    assert len({r["worker_pid"] for r in run.points}) == 1, "one kernel's points share one worker"
    assert run.manifest["status"] == "complete" and run.manifest["suite"] == "kernels-tiny"
    assert run.manifest["suite_spec"]["shapes"]["transpose"] == [[8, 64], [16, 32]]
    console = Console(width=200, record=True)
    runner.print_summary(outcome, console)
    text = console.export_text()
    assert "falqon kernels on CPU (CPU wall_ms)" in text and "GB/s" in text and "kernel.transpose_fp8.triton" in text


def test_resume_measures_only_the_points_a_crash_left_undone(tmp_path):
    suite = load_suite(tiny_suite(tmp_path))
    run_dir = tmp_path / "run"
    first = runner.run_suite(suite, runner.RunOptions(out_dir=run_dir, isolate=False), console=quiet())
    assert first.status == "complete"
    points_file = run_dir / "points.jsonl"
    lines = points_file.read_text().splitlines()
    points_file.write_text(lines[0] + "\n" + lines[1][: len(lines[1]) // 2])  # a crash mid-write of the 2nd row
    second = runner.run_suite(suite, runner.RunOptions(out_dir=run_dir, resume=True, isolate=False), console=quiet())
    assert second.skipped == 1 and len(second.rows) == 3
    run = load_run(run_dir)
    assert sorted(r["point_id"] for r in run.points) == sorted(p["point_id"] for p in first.points)
    assert run.manifest["status"] == "complete" and run.manifest["resumed"] == 1


def test_triton_points_on_a_cpu_without_the_interpreter_are_unavailable_rows(tmp_path, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    outcome = runner.run_suite(load_suite(tiny_suite(tmp_path)), runner.RunOptions(out_dir=tmp_path / "run", isolate=False),
                               console=quiet())  # fmt: skip
    rows = {(r["method"], r["layer"]): r for r in outcome.rows}
    triton = rows[("kernel.transpose_fp8.triton", "8x64")]
    assert triton["status"] == "error" and triton["error_type"] == "unavailable"
    assert triton["error"].startswith("unavailable: Triton kernels need a CUDA GPU; on a CPU set TRITON_INTERPRET=1")
    assert rows[("kernel.transpose_fp8.torch", "8x64")]["status"] == "ok"


def test_fp8_variants_on_a_gpu_older_than_ada_are_unavailable(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    point = {"method": "kernel.melded_gemm.cublas"}
    cuda = torch.device("cuda")
    assert "need compute capability 8.9+" in kernels_suite.precheck_kernels_point(point, cuda)
    assert "this GPU is 8.0" in kernels_suite.precheck_kernels_point({"method": "kernel.quantize_e4m3_rowwise.triton"}, cuda)
    assert kernels_suite.precheck_kernels_point({"method": "kernel.quantize_e4m3_rowwise.torch"}, cuda) is None


def test_the_runner_checks_kernel_points_with_the_kinds_own_precheck_not_the_method_registry():
    point = expand_suite(load_suite("kernels"))[0]
    assert point["method"] == "kernel.quantize_e4m3_tensorwise.triton"  # no registered method of that name
    reason = runner.precheck(point, torch.device("cpu"))
    assert reason == kernels_suite.precheck_kernels_point(point, torch.device("cpu"))
    assert runner._method_modules([point]) == []


class TestAlias:
    """`falqon-bench kernels` is `run kernels` restricted to --only's kernels."""

    def invoke(self, monkeypatch, *args):
        from typer.testing import CliRunner

        from falqon_bench.cli import app

        seen = {}

        def fake_run_suite(suite, options, console=None):
            seen.update(suite=suite, options=options)
            return runner.RunOutcome(status="complete", points=expand_suite(suite))

        monkeypatch.setattr(runner, "run_suite", fake_run_suite)
        return CliRunner().invoke(app, ["kernels", *args]), seen

    def test_only_keeps_the_named_kernels_of_the_packaged_suite(self, monkeypatch, tmp_path):
        result, seen = self.invoke(monkeypatch, "--only", "quantize,transpose", "--out", str(tmp_path / "k"), "--resume")
        assert result.exit_code == 0, result.output
        points = expand_suite(seen["suite"])
        assert {p["kernel"] for p in points} == {"quantize", "transpose"} and len(points) == 3 * 12 * 2 + 2 * 2 * 2  # quantize: 3 shapes x 12 variants x 2 caches
        assert seen["suite"].name == "kernels" and seen["suite"].spec["kernels"] == ["quantize", "transpose"]
        assert seen["options"].out_dir == tmp_path / "k" and seen["options"].resume and seen["options"].isolate

    def test_without_only_it_runs_the_whole_suite(self, monkeypatch):
        result, seen = self.invoke(monkeypatch)
        assert result.exit_code == 0, result.output
        assert len(expand_suite(seen["suite"])) == 116

    def test_the_cli_groups_are_the_suites_kernels(self):
        from falqon_bench import cli

        assert cli.KERNEL_GROUPS == kernels_suite.KERNELS
        from falqon_bench.measure import kernel_bench

        assert kernel_bench.KERNELS == kernels_suite.KERNELS


def test_a_kernels_row_written_by_the_runner_reads_back_as_json_objects(tmp_path):
    suite = load_suite(tiny_suite(tmp_path, TINY.replace("[[8, 64], [16, 32]]", "[[8, 64]]")))
    runner.run_suite(suite, runner.RunOptions(out_dir=tmp_path / "run", isolate=False), console=quiet())
    lines = (tmp_path / "run" / "points.jsonl").read_text().splitlines()
    assert len(lines) == 2 and all(isinstance(json.loads(line), dict) for line in lines)


def test_a_variant_timed_without_graph_replay_gets_a_fresh_worker_for_the_next_point(monkeypatch):
    """CUDA-graph capture failed (events fallback): the row says so, and worker.process_poisoned asks for a restart."""
    from falqon_bench.measure import kernel_bench
    from falqon_bench.measure.worker import MeasureContext, process_poisoned

    point = expand_suite(load_suite("kernels"))[0]
    monkeypatch.setattr(kernel_bench, "_timer_for", lambda *args: lambda step, cache: ([0.1, 0.2], "events"))
    monkeypatch.setattr(kernel_bench, "build_step", lambda case, device: lambda: None)
    row = kernel_bench.measure_suite_point(point, MeasureContext(device="cpu"))
    assert row["status"] == "ok" and row["point_id"] == point["point_id"] and row["gpu_ms"] == pytest.approx(0.15)
    assert "capture failed" in row["capture_error"] and process_poisoned(row)


@pytest.mark.gpu
def test_a_cuda_kernels_suite_runs_through_the_runner_with_replayed_gpu_times(tmp_path):
    text = TINY.replace('device = "cpu"', 'device = "cuda"').replace('caches = ["warm"]', 'caches = ["warm", "cold"]')
    text = text.replace('"triton", "torch"]', '"triton", "torch", "cublas"]').replace("min_samples = 2", "min_samples = 5")
    text = text.replace("transpose = [[8, 64], [16, 32]]", "quantize = [[1024, 4096]]\ngemm = [[1024, 4096, 4096, 64]]\n"
                        "proxy = [[4096, 4096, 64, 64]]\ntranspose = [[4096, 4096]]")
    outcome = runner.run_suite(load_suite(tiny_suite(tmp_path, text)), runner.RunOptions(out_dir=tmp_path / "run"), console=quiet())
    run = load_run(tmp_path / "run")
    # per cache: quantize 2 formats x 2 granularities x (triton, torch); gemm 2 variants (melded_gemm, its quantized-O_A
    # twin) x (cublas, triton); proxy and transpose (triton, torch)
    assert outcome.status == "complete" and len(run.points) == 2 * (8 + 4 + 2 + 2)
    assert all(r["status"] == "ok" for r in run.points), [r["error"] for r in run.points if r["status"] != "ok"]
    assert all(r["gpu_timing"] == "cudagraph" and r["gpu_ms"] > 0 and r["peak_mem_bytes"] > 0 for r in run.points)
    assert run.manifest["peaks"]["copy_gb_per_s"] > 0
    assert all(r["pct_of_copy_bw"] > 0 for r in run.points if r["bytes"]) and all(r["tflops"] > 0 for r in run.points if r["flops"])
    assert len({r["worker_pid"] for r in run.points}) == 4  # one worker per kernel
