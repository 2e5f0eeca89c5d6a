"""Results you can trust: each case a new user hit on 8a313ae (issue 15), as a test that failed there.

Readers (report, compare, export, merge) exit 2 with one paragraph naming file, line and key on a
corrupt, truncated or foreign results file, and warn (with the line) when they drop a partial last
line; merge refuses incomplete or mixed shards and writes a manifest of the merged run; run and e2e
refuse non-positive timeouts, budgets and ranks; figures never mix eager and compiled under one
label, never paint non-quantization kernels as quantization overhead, and show no floor or CPU
speedup that was not measured.
"""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import pandas as pd
import pytest
from fixtures.results import H100, H200, make_point, write_cpu_run, write_run
from matplotlib.colors import to_hex
from typer.testing import CliRunner

from falqon_bench.cli import app
from falqon_bench.readers.figures.data import label_for, points_table
from falqon_bench.readers.figures.style import SPLIT_COLORS
from falqon_bench.data.store import RunWriter, load_run


def invoke(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def assert_input_error(result, *needles: str) -> str:
    """Exit 2, one 'error:' paragraph on stderr naming every needle, no traceback, no 'Aborted.'."""
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert isinstance(result.exception, SystemExit), result.exception
    message = result.stderr.strip()
    assert message.startswith("error: ") and "Traceback" not in result.output and "Aborted" not in result.output, message
    for needle in needles:
        assert needle in " ".join(message.split()), (needle, message)
    return message


def four_points(device: str = H100) -> list[dict]:
    return [make_point(m, "llama-7b.attn", r, device=device, gpu_samples=[1.0 + 0.01 * i for i in range(6)], kernel_ms={"gemm_bf16": 0.8},
                       floor_ms=0.5) for m in ("bf16_lora", "falqon") for r in (16, 64)]


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return write_run(tmp_path / "results", "run", H100, four_points())


def gzip_run(run: Path, data: bytes | None = None) -> Path:
    """Replace run/points.jsonl by points.jsonl.gz (holding `data` when given: raw bytes, not gzip'd)."""
    plain = run / "points.jsonl"
    gz = run / "points.jsonl.gz"
    gz.write_bytes(data if data is not None else gzip.compress(plain.read_bytes()))
    plain.unlink()
    return gz


def every_reader(run: Path, tmp_path: Path) -> dict[str, object]:
    """The result of report, compare, export and merge on `run` (each one must leave no output on error)."""
    good = write_run(tmp_path / "good", "good", H100, four_points())
    return {
        "report": invoke("report", run, "--out", tmp_path / "rep"),
        "compare": invoke("compare", good, run),
        "export": invoke("export", run, "--to", tmp_path / "x.csv"),
        "merge": invoke("merge", run, "--out", tmp_path / "merged", "--allow-partial"),
    }


def assert_no_output(tmp_path: Path) -> None:
    assert not (tmp_path / "rep").exists() and not (tmp_path / "x.csv").exists() and not (tmp_path / "merged").exists()
    assert not list(tmp_path.glob(".*merging*")) and not list(tmp_path.glob(".x.csv*"))


# ---------------------------------------------------------------- readers


def test_a_truncated_gzip_points_file_is_exit_2_naming_the_file_in_every_reader(run_dir, tmp_path):
    gz = gzip_run(run_dir)
    gz.write_bytes(gz.read_bytes()[:-30])  # 8a313ae: click turned gzip's EOFError into "Aborted." and exit 1
    for name, result in every_reader(run_dir, tmp_path).items():
        assert_input_error(result, str(gz), "truncated"), name
    assert_no_output(tmp_path)


def test_random_bytes_named_gz_are_exit_2_not_a_bad_gzip_traceback(run_dir, tmp_path):
    gz = gzip_run(run_dir, bytes(range(256)) * 4)
    for name, result in every_reader(run_dir, tmp_path).items():
        assert_input_error(result, str(gz), "not a valid gzip file"), name
    assert_no_output(tmp_path)


def test_a_rank_given_as_text_names_the_file_line_and_key(run_dir, tmp_path):
    lines = (run_dir / "points.jsonl").read_text().splitlines()
    row = json.loads(lines[2])
    row["rank"] = "sixteen"  # 8a313ae: a pandas traceback in report
    lines[2] = json.dumps(row)
    (run_dir / "points.jsonl").write_text("\n".join(lines) + "\n")
    for name, result in every_reader(run_dir, tmp_path).items():
        assert_input_error(result, f"{run_dir / 'points.jsonl'}: point 3 has `rank` = 'sixteen'", "an integer >= 0", "(line 3)"), name
    assert_no_output(tmp_path)


@pytest.mark.parametrize("where", ["row", "manifest"])
def test_results_of_another_schema_version_are_refused(run_dir, tmp_path, where):
    if where == "row":
        lines = (run_dir / "points.jsonl").read_text().splitlines()
        lines[1] = json.dumps({**json.loads(lines[1]), "schema": 2})
        (run_dir / "points.jsonl").write_text("\n".join(lines) + "\n")
        needles = (f"{run_dir / 'points.jsonl'}: point 2 has `schema` = 2", "(line 2)", "another schema version")
    else:
        manifest = json.loads((run_dir / "manifest.json").read_text())
        (run_dir / "manifest.json").write_text(json.dumps({**manifest, "schema": 2}))
        needles = (f"{run_dir / 'manifest.json'}: has `schema` = 2", "another schema version")
    for name, result in every_reader(run_dir, tmp_path).items():
        assert_input_error(result, *needles), name


def test_every_committed_result_set_passes_the_row_check():
    from falqon_bench.data.store import find_runs, load_results

    root = Path(__file__).resolve().parents[1] / "results"
    sets = find_runs(root) + sorted((root / "baselines").glob("*.jsonl"))
    assert len(sets) >= 10
    for path in sets:
        assert load_results(path).points, path


def test_a_partial_last_line_is_dropped_with_a_warning_naming_its_line(run_dir, tmp_path):
    path = run_dir / "points.jsonl"
    data = path.read_bytes()
    path.write_bytes(data[: data.rstrip(b"\n").rfind(b"\n") + 25])  # the 4th line cut mid-write
    result = invoke("export", run_dir, "--to", tmp_path / "x.csv")
    assert result.exit_code == 0, result.output
    assert f"warning: {path}:4: dropped a partial or corrupt last line" in " ".join(result.stderr.split())
    assert len(pd.read_csv(tmp_path / "x.csv")) == 3


def test_a_corrupt_line_before_the_last_is_an_error_not_a_warning(run_dir, tmp_path):
    path = run_dir / "points.jsonl"
    lines = path.read_text().splitlines()
    lines[1] = lines[1][:30]
    path.write_text("\n".join(lines) + "\n")
    assert_input_error(invoke("export", run_dir, "--to", tmp_path / "x.csv"), f"{path}:2:", "not a JSON line")


# ---------------------------------------------------------------- merge


def write_shards(root: Path, n: int, present: tuple[int, ...], suite: str = "ranks", device: str = H100) -> list[Path]:
    """Shards i of n of one 16-point sweep (16 ranks of one layer, every n-th point per shard)."""
    points = [make_point("falqon", "llama-7b.attn", r, device=device, gpu_samples=[1.0] * 5) for r in range(1, 17)]
    dirs = []
    for i in present:
        run = root / f"{suite}-shard{i}of{n}"
        w = RunWriter(run, {"suite": suite, "run_id": run.name, "device": device, "shard": f"{i}/{n}",
                            "n_points": len(points[i - 1 :: n])})
        for p in points[i - 1 :: n]:
            w.append(p)
        dirs.append(run)
    return dirs


def test_merge_of_2_of_3_shards_names_the_missing_shard_and_writes_nothing(tmp_path):
    shards = write_shards(tmp_path, 3, (1, 2))
    result = invoke("merge", *shards, "--out", tmp_path / "m")
    message = assert_input_error(result, "shard(s) 3 of 3 are missing", "--allow-partial")
    assert "--resume" not in message and not (tmp_path / "m").exists()


def test_merge_with_allow_partial_records_the_missing_shards(tmp_path):
    shards = write_shards(tmp_path, 3, (1, 3))
    assert invoke("merge", *shards, "--out", tmp_path / "m", "--allow-partial").exit_code == 0
    merged = load_run(tmp_path / "m")
    assert merged.manifest["shards_missing"] == [2] and merged.manifest["status"] == "merged-partial"
    assert merged.manifest["n_points"] == len(merged.points) == 11


def test_merged_manifest_describes_the_merged_run(tmp_path):
    shards = write_shards(tmp_path, 3, (1, 2, 3))
    assert invoke("merge", *shards, "--out", tmp_path / "m").exit_code == 0
    m = load_run(tmp_path / "m").manifest  # 8a313ae: 'shard 1/3, n_points 6' while holding 16 points
    assert m["n_points"] == 16 and m["shard"] is None and m["shards"] == 3 and m["shards_merged"] == [1, 2, 3]
    assert m["status"] == "merged" and m["run_id"] == "m" and len(m["merged_from"]) == 3


def test_merge_refuses_shards_of_different_suites(tmp_path):
    a = write_shards(tmp_path, 2, (1,), suite="ranks")
    b = write_shards(tmp_path, 2, (2,), suite="overhead")
    assert_input_error(invoke("merge", *a, *b, "--out", tmp_path / "m"), "different suites", "'ranks'", "'overhead'")
    assert not (tmp_path / "m").exists()


def test_merge_into_an_existing_directory_does_not_suggest_resume(tmp_path):
    shards = write_shards(tmp_path, 2, (1, 2))
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "points.jsonl").write_text("")
    message = assert_input_error(invoke("merge", *shards, "--out", tmp_path / "m"), "already exists", "choose another --out")
    assert "--resume" not in message


# ---------------------------------------------------------------- run / e2e values


@pytest.mark.parametrize("option, value, needle", [
    ("--point-timeout-s", "0", "--point-timeout-s 0: must be a number of seconds > 0"),
    ("--budget-ms", "-5", "--budget-ms -5: must be a number of ms > 0"),
    ("--warmup-ms", "-1", "--warmup-ms -1: must be"),
    ("--min-samples", "0", "--min-samples 0: must be an integer >= 1"),
    ("--ranks", "16,0", "every rank must be an integer >= 1"),
])  # fmt: skip
def test_run_refuses_values_that_would_make_every_point_an_error(tmp_path, monkeypatch, option, value, needle):
    monkeypatch.chdir(tmp_path)
    assert_input_error(invoke("run", "smoke", option, value), needle)
    assert not (tmp_path / "results").exists()


E2E_SUITE = """kind = "e2e"
name = "e2e-bad"
device = "cpu"
model = "tiny-llama"
seq_len = 16
batch = 1
steps = 3
rank = 16
lr = 1e-3
methods = ["bf16_lora"]
"""


@pytest.mark.parametrize("key, value", [("rank", "0"), ("steps", "0"), ("seq_len", "-3"), ("lr", "0")])
def test_e2e_suite_refuses_a_rank_or_size_below_one_with_exit_2(tmp_path, monkeypatch, key, value):
    """8a313ae: e2e --rank 0 became an error row and exit 0; e2e values now live in the suite file."""
    monkeypatch.chdir(tmp_path)
    text = "\n".join(f"{key} = {value}" if line.startswith(f"{key} =") else line for line in E2E_SUITE.splitlines())
    (tmp_path / "bad.toml").write_text(text + "\n")
    assert_input_error(invoke("run", str(tmp_path / "bad.toml"), "--dry-run"), key)
    assert not (tmp_path / "results").exists()


# ---------------------------------------------------------------- figures


def mode_points(device: str) -> list[dict]:
    """bf16_lora and fp8_lora eager at 4 ranks, fp8_lora compiled (4x faster) only at r=64."""
    pts = []
    for r in (16, 32, 64, 128):
        pts.append(make_point("bf16_lora", "l", r, device=device, gpu_samples=[1.0] * 5))
        pts.append(make_point("fp8_lora", "l", r, device=device, gpu_samples=[4.0] * 5))
    pts.append(make_point("fp8_lora", "l", 64, device=device, compile=True, gpu_samples=[0.25] * 5))
    return pts


def test_fig5_never_mixes_eager_and_compiled_under_one_label(tmp_path):
    """8a313ae drew fp8_lora as 'best of eager/compile': a geometric mean over 3 eager and 1 compiled point."""
    from falqon_bench.readers.figures import render_gpu_speedup_figure
    from falqon_bench.readers.figures.gpus import speedups

    runs = [load_run(write_run(tmp_path, d, d, mode_points(d))) for d in (H100, H200)]
    df = points_table(runs)
    table = speedups(df).set_index(["device", "method", "compile"])
    assert table.loc[(H100, "fp8_lora", False), "speedup"] == pytest.approx(0.25)  # eager only: 1/4 at every rank
    assert table.loc[(H100, "fp8_lora", False), "shapes"] == 4
    assert table.loc[(H100, "fp8_lora", True), "speedup"] == pytest.approx(4.0)  # compiled, at its one shape
    assert table.loc[(H100, "fp8_lora", True), "shapes"] == 1
    fig = render_gpu_speedup_figure(df, label_for(runs, df))
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[0].startswith("eager: geometric mean over the same 4 shape(s)")
    assert titles[1].startswith("torch.compile (hatched): geometric mean over the same 1 shape(s)")


def test_fig3_totals_eager_and_compiled_separately(tmp_path):
    from falqon_bench.readers.figures.total_cost import block_costs

    pts = [make_point("fp8_lora", layer, 64, gpu_samples=[ms] * 5, compile=compiled)
           for layer, compiled, ms in (("m.attn", False, 2.0), ("m.attn", True, 1.0), ("m.up", False, 3.0))]
    df = points_table([load_run(write_run(tmp_path, "run", H100, pts))])
    costs = {c["label"]: c for c in block_costs(df, ["m.attn", "m.up"])}
    assert costs["fp8_lora"]["ms"] == pytest.approx(5.0)  # 8a313ae: 'fp8_lora / fp8_lora+compile', 1.0 + 3.0
    assert costs["fp8_lora+compile"]["status"] == "n/a"


def test_bf16_lora_elementwise_time_is_not_painted_as_quantization_overhead(tmp_path):
    from falqon_bench.readers.figures import render_overhead_figure

    point = make_point("bf16_lora", "llama-7b.attn", 64, gpu_samples=[1.0] * 5,
                       kernel_ms={"gemm_bf16": 0.6, "lora_gemm": 0.1, "elementwise": 0.25, "quantize": 0.0})
    run = load_run(write_run(tmp_path, "run", H100, [point]))
    df = points_table([run])
    fig = render_overhead_figure(df, label_for([run], df))
    red = to_hex(SPLIT_COLORS["quantization overhead\n(quantize/cast kernels)"])
    colors = {to_hex(p.get_facecolor()) for p in fig.axes[0].patches}
    assert red not in colors and to_hex(SPLIT_COLORS["elementwise\n(not quantization)"]) in colors
    legend = " ".join(t.get_text() for t in fig.legends[0].get_texts())
    assert "quantize + elementwise" not in legend


def test_cpu_report_has_no_floor_figure_and_no_speedup_inside_the_noise(tmp_path):
    from falqon_bench.readers.figures.data import speedup_text
    from falqon_bench.readers.report import render_report

    out = render_report([write_cpu_run(tmp_path / "results")], tmp_path / "rep")
    assert not (out / "floor.png").exists() and "floor.png" not in (out / "report.md").read_text()
    base = {"variant": "bf16_lora", "metric_kind": "wall", "metric_ms": 0.14, "p10_ms": 0.10, "p90_ms": 7.9}
    noisy = {"variant": "falqon", "metric_kind": "wall", "metric_ms": 0.0007, "p10_ms": 0.0005, "p90_ms": 0.2}
    clear = {"variant": "falqon", "metric_kind": "wall", "metric_ms": 20.0, "p10_ms": 19.0, "p90_ms": 21.0}
    assert speedup_text(base, noisy) == "within CPU noise"  # 8a313ae printed 200x
    assert speedup_text(base, clear) == "0.01x (CPU)"
    gpu = {**base, "metric_kind": "gpu"}
    assert speedup_text(gpu, {**noisy, "metric_kind": "gpu"}) == "200.00x"


def test_rank_plot_names_each_method_once_and_draws_compile_dashed_and_hollow():
    """8a313ae: 16 legend entries, compiled variants in the eager colour and style."""
    from falqon_bench.readers.figures import render_rank_throughput_figure

    run = load_run(Path(__file__).resolve().parents[1] / "results" / "overhead-h100")
    df = points_table([run])
    fig = render_rank_throughput_figure(df, label_for([run], df))
    entries = [t.get_text() for t in fig.legends[0].get_texts()]
    methods = sorted(set(df["method"]))
    assert len(entries) == len(methods) + 2 and entries[-2:] == ["eager", "torch.compile"]
    ax = fig.axes[0]
    for container in ax.containers:
        line = container.lines[0]
        compiled = "+compile" in container.get_label()
        assert (line.get_linestyle() == "--") == compiled
        assert (to_hex(line.get_markerfacecolor()) == "#ffffff") == compiled
    assert not any(math.isnan(v) for c in ax.containers for v in c.lines[0].get_ydata())
