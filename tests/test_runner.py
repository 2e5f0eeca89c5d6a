"""The run path end to end on CPU: results rows, error rows, isolation (timeout, kill + resume), Ctrl-C."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from torch import nn

from falqon_core.methods import Method, method_names, register_method
from falqon_core.methods.base import StepCost
from falqon_bench.measure.runner import CPU_WARNING, RunOptions, print_summary, run_suite
from falqon_bench.data.schema import REQUIRED_KEYS
from falqon_bench.data.store import load_run
from falqon_bench.suites.suite import load_suite

REPO = Path(__file__).resolve().parents[1]
TESTS_DIR = Path(__file__).resolve().parent
EXTRA_KEYS = (
    "suite", "dtype", "options", "per_block", "gpu_p10_ms", "gpu_p90_ms", "wall_p10_ms", "wall_p90_ms", "gpu_timing",
    "kernels", "kernel_total_ms", "floor_ms", "pct_of_floor", "flops", "quant_bytes", "memory", "clocks_before",
    "clocks_after", "clock_dropped", "started_at", "duration_s", "worker_pid", "error_type",
)  # fmt: skip


def _register(cls):
    """Register once per process (the worker imports this module under the same name)."""
    return cls if cls.name in method_names() else register_method(cls)


class _TinyFullFineTune(Method):
    """Test method: trains the whole nn.Linear weight (no adapter) - the cheapest real training step."""

    name = "tiny_full_ft"
    summary = "test only: full fine-tuning of nn.Linear"
    built_on = "torch"

    def convert(self, model, config):
        for m in model.modules():
            if isinstance(m, nn.Linear):
                m.weight.requires_grad_(True)
        return model

    def step_cost(self, K, N, rank, tokens, options=None):
        return StepCost(gemm_flops={"bf16": 6.0 * tokens * K * N}, quant_bytes=0.0)


class _TinyRaises(_TinyFullFineTune):
    name = "tiny_raises"

    def convert(self, model, config):
        raise RuntimeError("boom: this test method always fails to convert")


class _TinyHangsOrCrashes(_TinyFullFineTune):
    """Rank 4 hangs in convert, rank 6 kills its process with SIGSEGV; other ranks are fine."""

    name = "tiny_hangs"

    def convert(self, model, config):
        if config.rank == 4:
            time.sleep(3600)
        if config.rank == 6:
            os.kill(os.getpid(), signal.SIGSEGV)
        return super().convert(model, config)


class _TinySlow(_TinyFullFineTune):
    """Each step sleeps 5 ms so a run lasts long enough to be killed in the middle."""

    name = "tiny_slow"

    def after_optimizer_step(self, model):
        time.sleep(0.005)


class _TinyInterrupts(_TinyFullFineTune):
    """Behaves as Ctrl-C arriving while its point is measured."""

    name = "tiny_interrupts"

    def convert(self, model, config):
        raise KeyboardInterrupt


for _cls in (_TinyFullFineTune, _TinyRaises, _TinyHangsOrCrashes, _TinySlow, _TinyInterrupts):
    _register(_cls)


def write_suite(path: Path, methods, ranks=(4, 8), profile=False, budget_ms=2, name="tiny") -> Path:
    path.write_text(
        textwrap.dedent(
            f"""
            name = "{name}"
            device = "cpu"
            [timing]
            budget_ms = {budget_ms}
            warmup_ms = 0
            min_samples = 2
            profile = {str(profile).lower()}
            [[grid]]
            layers = [{{name = "t.32x48", K = 32, N = 48}}]
            ranks = {list(ranks)}
            tokens = [16]
            methods = {json.dumps(list(methods))}
            """
        )
    )
    return path


def test_smoke_suite_runs_in_process_with_every_required_key_and_env_in_manifest(tmp_path, capsys):
    """The real suites/smoke.toml end to end on CPU (timing budget cut to keep the test fast)."""
    from rich.console import Console

    suite = load_suite("smoke")
    suite.device = "cpu"  # the CPU path even on a GPU machine (the gpu-marked test below covers CUDA)
    opts = RunOptions(out_dir=tmp_path / "run", isolate=False, budget_ms=1, warmup_ms=0, min_samples=2)
    outcome = run_suite(suite, opts, console=Console(file=open(os.devnull, "w")))
    assert outcome.status == "complete"
    run = load_run(tmp_path / "run")
    assert len(run.points) == len(outcome.points) == 16
    for p in run.points:
        assert set(REQUIRED_KEYS) <= set(p) and set(EXTRA_KEYS) <= set(p)
        if p["status"] == "ok":
            assert p["wall_ms"] > 0 and len(p["wall_samples_ms"]) >= 2 and p["gpu_timing"] == "none" and p["device"] == "CPU"
        else:  # only a method that cannot run this shape here may fail, and it says why
            assert p["error_type"] == "unavailable" and p["error"].startswith("unavailable: "), p["error"]
    assert sum(p["status"] == "ok" for p in run.points) >= 12
    assert run.manifest["status"] == "complete"
    assert run.manifest["env"]["device"] == "CPU" and "torch" in run.manifest["env"]["versions"]
    assert "sha" in run.manifest["env"]["git"]
    console = Console(record=True, width=200)
    print_summary(outcome, console)
    assert CPU_WARNING in console.export_text()


def test_a_method_that_raises_becomes_an_error_row_and_the_run_continues(tmp_path):
    suite = load_suite(write_suite(tmp_path / "s.toml", ["tiny_raises", "tiny_full_ft"]))
    outcome = run_suite(suite, RunOptions(out_dir=tmp_path / "run", isolate=False))
    rows = {(r["method"], r["rank"]): r for r in load_run(tmp_path / "run").points}
    assert len(rows) == 4
    for rank in (4, 8):
        bad, good = rows[("tiny_raises", rank)], rows[("tiny_full_ft", rank)]
        assert bad["status"] == "error" and bad["error_type"] == "RuntimeError" and "boom" in bad["error"]
        assert set(REQUIRED_KEYS) <= set(bad)
        assert good["status"] == "ok" and good["wall_ms"] > 0 and good["flops"] == {"bf16": 6.0 * 16 * 32 * 48}
    assert outcome.status == "complete"


def test_summary_prints_an_error_repeated_at_every_token_count_once_and_keeps_every_row(tmp_path):
    from rich.console import Console

    path = write_suite(tmp_path / "s.toml", ["tiny_raises"], ranks=(4,))
    path.write_text(path.read_text().replace("tokens = [16]", "tokens = [16, 32, 48]"))
    outcome = run_suite(load_suite(path), RunOptions(out_dir=tmp_path / "run", isolate=False))
    rows = load_run(tmp_path / "run").points
    assert len(rows) == 3 and {r["tokens"] for r in rows} == {16, 32, 48}
    assert all(r["status"] == "error" and "boom" in r["error"] for r in rows)
    console = Console(record=True, width=400)
    print_summary(outcome, console)
    lines = [line for line in console.export_text().splitlines() if "boom" in line]
    assert len(lines) == 1, lines
    assert lines[0].strip().startswith("tiny_raises t.32x48 r=4: ")
    assert lines[0].endswith("(3 points: tokens=16, tokens=32, tokens=48)")


def test_ctrl_c_marks_the_run_interrupted_keeps_finished_points_and_resume_completes_it(tmp_path):
    suite_path = write_suite(tmp_path / "s.toml", ["tiny_full_ft", "tiny_interrupts"])
    outcome = run_suite(load_suite(suite_path), RunOptions(out_dir=tmp_path / "run", isolate=False))
    assert outcome.status == "interrupted"
    run = load_run(tmp_path / "run")
    assert run.manifest["status"] == "interrupted"
    assert [p["method"] for p in run.points] == ["tiny_full_ft", "tiny_full_ft"]
    first_started = {p["point_id"]: p["started_at"] for p in run.points}

    # the interrupting method is fixed: resume measures only what is missing
    suite_path = write_suite(tmp_path / "s.toml", ["tiny_full_ft", "tiny_slow"])
    resumed = run_suite(load_suite(suite_path), RunOptions(out_dir=tmp_path / "run", resume=True, isolate=False))
    assert resumed.status == "complete" and resumed.skipped == 2
    run = load_run(tmp_path / "run")
    assert {p["point_id"]: p["started_at"] for p in run.points if p["point_id"] in first_started} == first_started
    assert run.manifest["resumed"] == 1 and run.manifest["status"] == "complete"


def test_cli_exits_130_when_interrupted(tmp_path):
    from typer.testing import CliRunner

    from falqon_bench.cli import app

    suite_path = write_suite(tmp_path / "s.toml", ["tiny_interrupts"])
    result = CliRunner().invoke(app, ["run", str(suite_path), "--out", str(tmp_path / "run"), "--no-isolate"])
    assert result.exit_code == 130, result.output


def _cli_in_subprocess(args: list[str]) -> list[str]:
    """`falqon-bench ARGS` in a fresh interpreter that first registers this module's test methods."""
    code = (
        f"import sys; sys.path.insert(0, {str(TESTS_DIR)!r}); import test_runner; "
        f"from falqon_bench.cli import main; sys.argv = ['falqon-bench'] + {args!r}; main()"
    )
    return [sys.executable, "-c", code]


def _ok_lines(points_path: Path) -> list[dict]:
    lines = points_path.read_text().splitlines() if points_path.exists() else []
    return [json.loads(ln) for ln in lines if ln.endswith("}")]


def test_sigkill_mid_run_then_resume_gives_every_point_once_and_keeps_finished_ones(tmp_path):
    suite_path = write_suite(tmp_path / "s.toml", ["tiny_slow"], ranks=(1, 2, 3, 4, 5, 6, 7, 8), budget_ms=150)
    out = tmp_path / "run"
    args = ["run", str(suite_path), "--out", str(out), "--no-isolate"]
    proc = subprocess.Popen(_cli_in_subprocess(args), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path)
    deadline = time.time() + 120
    while len(_ok_lines(out / "points.jsonl")) < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = {p["point_id"]: p["started_at"] for p in _ok_lines(out / "points.jsonl")}
    assert 2 <= len(before) < 8, "the run should be killed after its first points and before its end"

    from typer.testing import CliRunner

    from falqon_bench.cli import app

    res = CliRunner().invoke(app, args + ["--resume"])  # the re-run in this process: its methods are registered here
    assert res.exit_code == 0, res.output[-2000:]
    rows = [json.loads(ln) for ln in (out / "points.jsonl").read_text().splitlines()]
    ids = [r["point_id"] for r in rows]
    assert len(ids) == len(set(ids)) == 8, "every point exactly once"
    assert all(r["status"] == "ok" for r in rows)
    assert {r["point_id"]: r["started_at"] for r in rows if r["point_id"] in before} == before, "finished points not re-run"
    assert json.loads((out / "manifest.json").read_text())["status"] == "complete"


def test_hung_and_crashed_workers_cost_only_their_point_and_a_fresh_worker_continues(tmp_path):
    """rank 4 hangs (killed at the timeout), rank 6 segfaults, rank 8 is fine: three workers, one row each."""
    suite = load_suite(write_suite(tmp_path / "s.toml", ["tiny_hangs"], ranks=(4, 6, 8)))
    outcome = run_suite(suite, RunOptions(out_dir=tmp_path / "run", isolate=True, point_timeout_s=4))
    rows = {r["rank"]: r for r in load_run(tmp_path / "run").points}
    assert rows[4]["status"] == "error" and rows[4]["error_type"] == "timeout" and "after 4 s" in rows[4]["error"]
    assert rows[6]["status"] == "error" and rows[6]["error_type"] == "worker_crash" and "SIGSEGV" in rows[6]["error"]
    assert rows[8]["status"] == "ok", rows[8]
    pids = {rows[r]["worker_pid"] for r in (4, 6, 8)}
    assert len(pids) == 3 and os.getpid() not in pids, "three worker processes, none of them this one"
    assert outcome.status == "complete"
    assert (tmp_path / "run" / "worker.log").read_text().count("started") == 3


def test_resume_refuses_a_directory_of_another_suite_or_without_a_run(tmp_path):
    from falqon_bench.data.errors import BenchInputError

    run_suite(load_suite(write_suite(tmp_path / "a.toml", ["tiny_full_ft"], name="a")), RunOptions(out_dir=tmp_path / "run", isolate=False))
    other = load_suite(write_suite(tmp_path / "b.toml", ["tiny_full_ft"], name="b"))
    with pytest.raises(BenchInputError, match="run of suite 'a', not 'b'"):
        run_suite(other, RunOptions(out_dir=tmp_path / "run", resume=True, isolate=False))
    with pytest.raises(BenchInputError, match="holds no earlier run"):
        run_suite(other, RunOptions(out_dir=tmp_path / "empty", resume=True, isolate=False))


def test_resume_refuses_a_run_of_another_device_and_leaves_its_manifest_alone(tmp_path):
    """A committed GPU run must not be resumed on another machine: it would mix devices and overwrite its env."""
    from falqon_bench.data.errors import BenchInputError

    suite = load_suite(write_suite(tmp_path / "a.toml", ["tiny_full_ft"], name="a"))
    first = run_suite(suite, RunOptions(results_root=tmp_path / "results", isolate=False))
    manifest_path = first.run_dir / "manifest.json"
    gpu_manifest = {**json.loads(manifest_path.read_text()), "device": "NVIDIA H100 80GB HBM3"}
    manifest_path.write_text(json.dumps(gpu_manifest))
    with pytest.raises(BenchInputError, match="was run on NVIDIA H100 80GB HBM3"):
        run_suite(suite, RunOptions(out_dir=first.run_dir, resume=True, isolate=False))
    with pytest.raises(BenchInputError, match="no earlier run of suite 'a' on CPU"):
        run_suite(suite, RunOptions(results_root=tmp_path / "results", resume=True, isolate=False))
    assert json.loads(manifest_path.read_text()) == gpu_manifest


def test_resume_without_out_continues_the_newest_run_of_the_suite(tmp_path):
    suite = load_suite(write_suite(tmp_path / "a.toml", ["tiny_full_ft"], name="a"))
    first = run_suite(suite, RunOptions(results_root=tmp_path / "results", isolate=False))
    again = run_suite(suite, RunOptions(results_root=tmp_path / "results", resume=True, isolate=False))
    assert again.run_dir == first.run_dir and again.skipped == 2 and again.rows == []


def test_lock_clocks_without_nvml_is_recorded_not_fatal(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("checks the machine without NVML")
    suite = load_suite(write_suite(tmp_path / "s.toml", ["tiny_full_ft"]))
    outcome = run_suite(suite, RunOptions(out_dir=tmp_path / "run", isolate=False, lock_clocks=True))
    manifest = load_run(tmp_path / "run").manifest
    assert outcome.status == "complete" and manifest["clock_lock"]["locked"] is False and "no NVIDIA GPU" in manifest["clock_lock"]["reason"]


def test_throttle_reasons_decode_to_names_and_clock_drop_ignores_idle_gpus():
    from falqon_bench.measure.envinfo import clock_dropped, decode_throttle_reasons

    assert decode_throttle_reasons(0x1 | 0x4 | 0x40) == ["gpu_idle", "sw_power_cap", "hw_thermal_slowdown"]
    assert decode_throttle_reasons(1 << 40) == [hex(1 << 40)]
    busy_fast = {"sm_clock_mhz": 1980, "max_sm_clock_mhz": 1980, "throttle_reasons": []}
    busy_slow = {"sm_clock_mhz": 1700, "max_sm_clock_mhz": 1980, "throttle_reasons": ["sw_power_cap"]}  # 86% < 90%
    idle_low = {"sm_clock_mhz": 345, "max_sm_clock_mhz": 1980, "throttle_reasons": ["gpu_idle"]}
    assert clock_dropped(busy_fast, busy_fast) is False
    assert clock_dropped(busy_fast, busy_slow) is True
    assert clock_dropped(idle_low, busy_fast) is False, "an idle GPU parks its clock by design"
    assert clock_dropped({"note": "no NVIDIA GPU"}, {}) is None


@pytest.mark.gpu
def test_smoke_suite_on_gpu_records_graph_time_floor_clocks_and_breakdown(tmp_path):
    """On the GPU: gpu_ms from CUDA-graph replay (or the marked profiler fallback), floor from measured peaks, NVML clocks."""
    outcome = run_suite(load_suite("smoke"), RunOptions(out_dir=tmp_path / "run", isolate=True, budget_ms=20, warmup_ms=5))
    run = load_run(tmp_path / "run")
    assert outcome.status == "complete" and run.manifest["peaks"] and run.manifest["env"]["gpu"].get("name")
    ok = [p for p in run.points if p["status"] == "ok"]
    assert len(ok) >= 12
    for p in ok:
        assert p["device"] != "CPU" and p["gpu_timing"] in ("cudagraph", "profiler") and p["gpu_ms"] > 0
        assert p["wall_ms"] > 0 and p["peak_mem_bytes"] > 0 and p["clocks_before"].get("max_sm_clock_mhz")
        assert p["floor_ms"] is None or p["floor_ms"] > 0
    assert all(p["gpu_timing"] == "cudagraph" for p in ok if p["method"] in ("bf16_linear", "bf16_lora")), [
        (p["method"], p.get("capture_error")) for p in ok if p["gpu_timing"] != "cudagraph"
    ]


def test_the_run_summary_gives_each_option_set_of_a_method_its_own_column():
    """It keyed cells by method alone: a second option set overwrote the first's cell (one 'falqon' column)."""
    from rich.console import Console

    from falqon_bench.measure.runner import summary_table

    base = {"layer": "tiny.attn", "K": 64, "N": 64, "rank": 16, "tokens": 64, "compile": False, "cache": "warm",
            "method": "falqon", "status": "ok", "gpu_ms": None}
    rows = [{**base, "options": {}, "wall_ms": 0.5}, {**base, "options": {"flush_every": 1}, "wall_ms": 0.8}]
    console = Console(record=True, width=200)
    console.print(summary_table(rows))
    text = console.export_text()
    assert "falqon[flush_every=1]" in text and "0.500" in text and "0.800" in text


def test_the_run_summary_of_an_e2e_run_names_its_methods_option_set():
    """An e2e suite's `options = {falqon = {...}}` sit in options.method_options: the column read plain 'falqon'."""
    from rich.console import Console

    from falqon_bench.measure.runner import summary_table

    row = {"kind": "e2e", "layer": "tiny-llama", "K": 64, "N": 128, "rank": 5, "tokens": 64, "compile": False,
           "cache": "warm", "method": "falqon", "status": "ok", "gpu_ms": None, "wall_ms": 16.1, "mode": "eager",
           "options": {"mode": "eager", "lr": 0.01, "method_options": {"flush_every": 1, "rounding": "stochastic"}}}
    console = Console(record=True, width=200)
    console.print(summary_table([row]))
    assert "falqon[flush_every=1,rounding=stochastic]" in console.export_text()


def test_error_lines_name_an_accuracy_points_label_and_lr_and_an_e2e_points_mode():
    """Grouped error lines named points by tokens: two failed lrs of one accuracy label read 'tokens=32, tokens=32'."""
    from falqon_bench.measure.runner import error_groups

    base = {"method": "falqon", "layer": "tiny-llama", "rank": 5, "tokens": 32, "error": "ValueError: x"}
    acc = [{**base, "kind": "accuracy", "label": "bad [redraw]", "lr": lr, "seed": 0} for lr in (0.01, 0.02)]
    ((_, points),) = error_groups(acc)
    assert points == ["bad [redraw] lr=0.01 seed=0", "bad [redraw] lr=0.02 seed=0"]
    e2e = [{**base, "kind": "e2e", "mode": m, "options": {"mode": m, "liger": m == "eager"}} for m in ("eager", "compile")]
    ((_, points),) = error_groups(e2e)
    assert points == ["tokens=32 eager +liger", "tokens=32 compile"]
