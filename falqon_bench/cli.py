"""`falqon-bench`: run suites, list what exists, record the environment, export/merge results, report, compare.

Bad input (suite file, results path, option) prints one red paragraph and exits 2, never a traceback;
`compare` exits 1 on a regression; an interrupted run exits 130 and `--resume` completes it.
"""

import functools
import json
import os
import sys
from enum import Enum
from pathlib import Path
from typing import Callable, List, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from falqon_bench.data.errors import EXIT_INPUT_ERROR, BenchInputError

app = typer.Typer(
    name="falqon-bench",
    help="Benchmark and profile FP8 LoRA fine-tuning methods (FALQON and baselines) layer by layer.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)

RESULTS_ROOT = Path("results")
EXIT_REGRESSION = 1
EXIT_INTERRUPTED = 130


def _out() -> Console:
    """Tables on stdout; piped output (CI logs) gets a wide page instead of rich's 80-column default."""
    console = Console(highlight=False)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(highlight=False, width=200)
    return console


def _err() -> Console:
    return Console(stderr=True, highlight=False)


def print_input_error(e: BaseException) -> None:
    """One red paragraph on stderr (no markup parsing: messages quote TOML like [[grid]])."""
    _err().print(Text(f"error: {e}", style="red"), soft_wrap=True)


def user_errors(fn: Callable) -> Callable:
    """Map BenchInputError (and ResultsError) raised by a command to the red paragraph + exit 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except BenchInputError as e:
            print_input_error(e)
            raise typer.Exit(EXIT_INPUT_ERROR) from None

    return wrapper


KERNEL_GROUPS = ("quantize", "proxy", "gemm", "transpose")  # kernels_suite.KERNELS (cli imports no suite module up here)


# ---------------------------------------------------------------- run


@app.command()
@user_errors
def run(
    suite: str = typer.Argument(..., help="Suite name (smoke, overhead, methods, ranks, e2e) or path to a .toml file."),
    out: Optional[Path] = typer.Option(None, "--out", help="Run directory to write (default: results/<run-id>)."),
    resume: bool = typer.Option(False, "--resume", help="Continue a run: skip points already ok in --out (or the newest run of this suite)."),
    methods: Optional[str] = typer.Option(None, "--methods", help="Only these methods, comma-separated: bf16_lora,falqon."),
    ranks: Optional[str] = typer.Option(None, "--ranks", help="Only these ranks, comma-separated: 16,64."),
    variant: str = typer.Option("all", "--variant", help="eager, compile or all: keep only eager (compile=false) or only compiled points."),
    shard: Optional[str] = typer.Option(None, "--shard", help="Run shard i of n (1-based), e.g. 2/4; `merge` joins the shards."),
    isolate: bool = typer.Option(True, "--isolate/--no-isolate", help="Run each method's points in a worker subprocess (default) or in-process."),
    point_timeout_s: float = typer.Option(300.0, "--point-timeout-s", help="Seconds a point may take before its worker is killed (isolated runs)."),
    lock_clocks: bool = typer.Option(False, "--lock-clocks", help="Lock the GPU SM clock for the run via NVML (needs root); reset after."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Only list the points the run would measure."),
    budget_ms: Optional[float] = typer.Option(None, "--budget-ms", help="Override the suite's \\[timing] budget_ms: sampling time per point and timer, ms."),
    warmup_ms: Optional[float] = typer.Option(None, "--warmup-ms", help="Override the suite's \\[timing] warmup_ms: warm-up time per point, ms."),
    min_samples: Optional[int] = typer.Option(None, "--min-samples", help="Override the suite's \\[timing] min_samples per timer."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Let a suite's local model directory load pickled weights (*.bin): only for files you trust."),
    gpus: Optional[str] = typer.Option(None, "--gpus", help="all or N: one `--shard i/N` process per GPU of this host, merged into --out."),
) -> None:
    """Run a suite: time every point (gpu_ms by CUDA-graph replay, wall_ms eager, kernel breakdown) into results/.

    Each finished point is appended to results/<run-id>/points.jsonl at once; Ctrl-C marks the run
    interrupted (exit 130) and `--resume` completes it. A method that cannot run here becomes an
    error row "unavailable: <reason>", not a failure of the run.

    [bold]Examples[/bold]
      falqon-bench run smoke
      falqon-bench run overhead --out results/h100-overhead --lock-clocks
      falqon-bench run overhead --out results/h100-overhead --resume
      falqon-bench run methods --methods bf16_lora,falqon --dry-run
      falqon-bench run overhead --ranks 64 --variant eager
      falqon-bench run ranks --shard 2/4 --point-timeout-s 600
      falqon-bench run shapes --gpus all --out results/shapes-8xh200
    """
    from falqon_bench.measure.runner import RunOptions, print_summary, run_suite
    from falqon_bench.suites.suite import load_suite
    from falqon_bench.suites.sweep import parse_shard

    _check_run_numbers(point_timeout_s=point_timeout_s, budget_ms=budget_ms, warmup_ms=warmup_ms, min_samples=min_samples)
    loaded = load_suite(suite, allow_pickle=allow_pickle)
    loaded.allow_pickle = loaded.allow_pickle or allow_pickle
    options = RunOptions(
        out_dir=out,
        resume=resume,
        methods=[m.strip() for m in methods.split(",") if m.strip()] if methods else None,
        ranks=_parse_ranks(ranks) if ranks else None,
        variant=variant,
        shard=parse_shard(shard) if shard else None,
        isolate=isolate,
        point_timeout_s=point_timeout_s,
        lock_clocks=lock_clocks,
        dry_run=dry_run,
        budget_ms=budget_ms,
        warmup_ms=warmup_ms,
        min_samples=min_samples,
        results_root=RESULTS_ROOT,
    )
    console = _err()
    if gpus is not None and not dry_run:
        from falqon_bench.measure.gpu_shards import run_on_gpus

        code = run_on_gpus(loaded, gpus, options, _out())
        if code:
            raise typer.Exit(code)
        return
    outcome = run_suite(loaded, options, console=console)
    if outcome.status == "dry-run":
        _print_plan(loaded.name, outcome.points)
        return
    print_summary(outcome, _out())
    if outcome.status == "interrupted":
        raise typer.Exit(EXIT_INTERRUPTED)


def _parse_ranks(text: str) -> list[int]:
    try:
        ranks = [int(r) for r in text.split(",") if r.strip()]
    except ValueError:
        raise BenchInputError(f"--ranks {text!r}: expected comma-separated integers, e.g. 16,64") from None
    if not ranks or min(ranks) < 1:
        raise BenchInputError(f"--ranks {text!r}: every rank must be an integer >= 1, e.g. 16,64")
    return ranks


def _check_run_numbers(point_timeout_s: float, budget_ms: float | None, warmup_ms: float | None, min_samples: int | None) -> None:
    """Timeouts and budgets that would turn every point into an error (or time nothing) are input errors."""
    import math

    rules = (("--point-timeout-s", point_timeout_s, "a number of seconds > 0, e.g. 300", lambda v: v > 0),
             ("--budget-ms", budget_ms, "a number of ms > 0, e.g. 500", lambda v: v > 0),
             ("--warmup-ms", warmup_ms, "a number of ms >= 0, e.g. 100", lambda v: v >= 0),
             ("--min-samples", min_samples, "an integer >= 1, e.g. 10", lambda v: v >= 1))
    for name, value, allowed, ok in rules:
        if value is not None and not (math.isfinite(value) and ok(value)):
            raise BenchInputError(f"{name} {value:g}: must be {allowed}")


def _print_plan(suite_name: str, points: list) -> None:
    table = Table(title=f"{suite_name}: {len(points)} point(s) (dry run, nothing measured)")
    for col in ("#", "method", "layer", "K x N", "rank", "tokens", "compile", "cache", "options", "point_id"):
        table.add_column(col)
    for i, p in enumerate(points, 1):
        opts = json.dumps(p["options"]) if p["options"] else ""
        table.add_row(str(i), p["method"], p["layer"], f"{p['K']}x{p['N']}", str(p["rank"]), str(p["tokens"]),
                      str(p["compile"]).lower(), p["cache"], escape(opts), p["point_id"])
    _out().print(table)


# ---------------------------------------------------------------- list / env


class ListWhat(str, Enum):
    methods = "methods"
    suites = "suites"
    layers = "layers"


@app.command("list")
@user_errors
def list_(what: ListWhat = typer.Argument(ListWhat.methods, help="methods, suites or layers.")) -> None:
    """List registered methods (and whether they can run here), suite files, or named layer shapes.

    [bold]Examples[/bold]
      falqon-bench list methods
      falqon-bench list suites
      falqon-bench list layers
    """
    console = _out()
    if what == ListWhat.methods:
        console.print(methods_table())
    elif what == ListWhat.suites:
        console.print(suites_table())
    else:
        console.print(layers_table())


def methods_table() -> Table:
    """Every registered method: can it run on this machine's device (and why not), built on, summary."""
    import torch

    from falqon_core.methods import get_method, method_names

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    table = Table(title=f"methods (device here: {device.type})")
    for col in ("method", "runs here", "why not", "built on", "summary"):
        table.add_column(col)
    for name in method_names():
        m = get_method(name)
        reason = m.unavailable_reason(device)
        table.add_row(name, "[green]yes[/green]" if reason is None else "[red]no[/red]", escape(reason or ""), escape(m.built_on), escape(m.summary))
    return table


def suites_table() -> Table:
    from falqon_bench.suites.suite import known_suites, load_suite

    table = Table(title="suites")
    for col in ("suite", "file", "description"):
        table.add_column(col)
    for name, path in known_suites().items():
        try:
            description = load_suite(path).description
        except BenchInputError as e:
            description = f"[red]invalid: {escape(str(e))}[/red]"
        else:
            description = escape(description)
        table.add_row(name, str(path), description)
    return table


def layers_table() -> Table:
    from falqon_bench.suites.layers import named_layers

    table = Table(title="named layer shapes (a bare model name means all its layers)")
    for col in ("layer", "K", "N", "per block", "from"):
        table.add_column(col)
    for s in named_layers().values():
        table.add_row(s.name, str(s.K), str(s.N), str(s.per_block), s.source)
    return table


@app.command()
@user_errors
def env(as_json: bool = typer.Option(False, "--json", help="Print the full record as JSON.")) -> None:
    """Show this machine as a run manifest records it: GPU, driver, clocks, power, throttle reasons, versions, git sha.

    [bold]Examples[/bold]
      falqon-bench env
      falqon-bench env --json > env.json
    """
    from falqon_bench.measure.envinfo import collect_env

    info = collect_env()
    if as_json:
        typer.echo(json.dumps(info, indent=2, default=str))
        return
    table = Table(title="environment")
    table.add_column("key")
    table.add_column("value")
    for key, value in _flatten(info):
        table.add_row(key, escape(str(value)))
    _out().print(table)


def _flatten(d: dict, prefix: str = ""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _flatten(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


# ---------------------------------------------------------------- results files


class ExportFormat(str, Enum):
    table = "table"
    pytest_benchmark = "pytest-benchmark"


@app.command()
@user_errors
def export(
    runs: List[Path] = typer.Argument(..., help="Run directories (or their points.jsonl)."),
    to: Path = typer.Option(..., "--to", help="Output file: .parquet or .csv (list/dict columns become JSON text), or .json with --format pytest-benchmark."),
    output_format: ExportFormat = typer.Option(ExportFormat.table, "--format", help="table (Parquet/CSV by --to's suffix) or pytest-benchmark (one run as a --benchmark-json file)."),
) -> None:
    """Export the points of one or more runs to one Parquet or CSV table (with a run_id column), or one run as pytest-benchmark JSON.

    [bold]Examples[/bold]
      falqon-bench export results/20250101-120000-overhead-h100 --to overhead.parquet
      falqon-bench export results/a results/b --to both.csv
      falqon-bench export results/gate-h100-repeat --to gate.json --format pytest-benchmark
    """
    from falqon_bench.data.store import export_points

    if to.is_dir():  # its empty suffix would read as "unknown export format ''"
        raise BenchInputError(
            f"--to {to} is a directory; --to expects an output file: .parquet or .csv, or .json with "
            f"--format pytest-benchmark (e.g. --to {to / 'points.csv'})"
        )
    if output_format == ExportFormat.pytest_benchmark:
        if len(runs) != 1:
            raise BenchInputError(f"--format pytest-benchmark writes one run per file (one machine_info); got {len(runs)} runs")
        from falqon_bench.data.pytest_benchmark_format import export_pytest_benchmark

        _out().print(f"wrote {export_pytest_benchmark(runs[0], to)}")
        return
    path = export_points(list(runs), to)
    _out().print(f"wrote {path}")


@app.command()
@user_errors
def merge(
    runs: List[Path] = typer.Argument(..., help="Run directories of the shards."),
    out: Path = typer.Option(..., "--out", help="New run directory for the joined points (must not exist yet)."),
    allow_partial: bool = typer.Option(False, "--allow-partial", help="Join the shards given even when some of the n are missing (recorded in the manifest)."),
) -> None:
    """Join the shards of one sweep (same suite, same GPU model, all n shards) into one new run directory.

    Shards are the runs of `falqon-bench run SUITE --shard i/n`; a missing shard index, another suite
    or another GPU model is an error (exit 2) naming them.

    [bold]Examples[/bold]
      falqon-bench merge results/ranks-shard1of4 results/ranks-shard2of4 results/ranks-shard3of4 results/ranks-shard4of4 --out results/ranks-h100
    """
    from falqon_bench.data.store import merge_runs

    path = merge_runs(list(runs), out, allow_partial=allow_partial)
    _out().print(f"merged {len(runs)} run(s) into {path}")


@app.command()
@user_errors
def report(
    runs: Optional[List[Path]] = typer.Argument(None, help="Run directories (default: the newest run under results/)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Report directory (default: reports/<run-id>/)."),
    compact: bool = typer.Option(False, "--compact", help="256-colour PNGs (about a third of the bytes, the same figures): for reports committed to a repository."),
) -> None:
    """Render figures (PNG) and one HTML + markdown report from result files only (no GPU needed).

    [bold]Examples[/bold]
      falqon-bench report
      falqon-bench report results/h100-overhead results/h200-overhead --out reports/gpus
      falqon-bench report results/my-sweep --out reports/my-sweep --compact
    """
    from falqon_bench.readers.report import render_report
    from falqon_bench.data.store import latest_run

    run_dirs = list(runs) if runs else [latest_run(RESULTS_ROOT)]
    path = render_report(run_dirs, out, compact)
    _out().print(f"report written to {path}")


def parse_overrides(items: List[str]) -> dict:
    """['falqon/*=1.2'] -> {'falqon/*': 1.2}; the pattern is matched against 'method/layer/rank/tokens/compile'."""
    overrides = {}
    for item in items:
        pattern, sep, factor = item.rpartition("=")
        try:
            value = float(factor)
        except ValueError:
            value = None
        if not sep or not pattern or value is None or value <= 0:
            raise BenchInputError(f"--override {item!r} is not PATTERN=FACTOR with a positive number (e.g. 'falqon/*=1.2')")
        overrides[pattern] = value
    return overrides


@app.command()
@user_errors
def compare(
    base: Path = typer.Argument(..., help="Baseline run directory, points .jsonl (e.g. results/baselines/h100.jsonl) or pytest-benchmark JSON."),
    new: Path = typer.Argument(..., help="New run directory, or a pytest-benchmark JSON file (`pytest benchmarks --benchmark-json`)."),
    factor: float = typer.Option(1.10, "--factor", help="A point regresses only when new/base median exceeds this ratio."),
    override: Optional[List[str]] = typer.Option(None, "--override", help="PATTERN=FACTOR per point (fnmatch on method/layer/rank/tokens/eager|compile; a point run with method options is method[k=v,...]/..., so 'falqon*/*' matches them too); repeatable."),
) -> None:
    """Regression gate: exit 1 when a point is significantly slower (Mann-Whitney U) by more than --factor, else 0.

    [bold]Examples[/bold]
      falqon-bench compare results/baselines/nvidia-h100-80gb-hbm3.jsonl results/ci
      falqon-bench compare results/base results/new --factor 1.05 --override 'falqon/*=1.2'
      falqon-bench compare results/baselines/nvidia-h200.jsonl out.json
    """
    from falqon_bench.readers.gate import compare_runs

    if factor <= 0:
        raise BenchInputError(f"--factor {factor} must be a positive ratio such as 1.10")
    result = compare_runs(base, new, factor, parse_overrides(override or []))
    _out().print(result.to_table())
    if result.regressed:
        _err().print(Text("regression: at least one point is significantly slower than the baseline", style="red"))
        raise typer.Exit(EXIT_REGRESSION)


@app.command()
@user_errors
def kernels(
    out: Optional[Path] = typer.Option(None, "--out", help="Run directory to write (default: results/<run-id>)."),
    only: Optional[str] = typer.Option(
        None, "--only", help=f"Only these kernels, comma-separated: {','.join(KERNEL_GROUPS)}."
    ),
    resume: bool = typer.Option(False, "--resume", help="Continue a run: skip points already ok in --out (or the newest kernels run)."),
) -> None:
    """Micro-benchmark the FP8 kernels (quantize, melded GEMM, proxy update, transpose) against their references on the GPU.

    The same as `falqon-bench run kernels` (suites/kernels.toml: LLaMA-7B shapes, warm and cold L2) restricted
    to --only's kernels: one runner, worker processes, results/<run-id>/points.jsonl, --resume. For the
    runner's other options (--point-timeout-s, --methods, --shard, --dry-run) or other shapes, use
    `falqon-bench run` with that suite or a copy of it. Without a CUDA GPU it exits 2 (the suite sets device = "cuda").

    [bold]Examples[/bold]
      falqon-bench kernels
      falqon-bench kernels --out results/h100-kernels
      falqon-bench kernels --only quantize,transpose
      falqon-bench run kernels --methods kernel.melded_gemm.cublas,kernel.melded_gemm.triton --dry-run
    """
    from falqon_bench.measure.runner import RunOptions, print_summary, run_suite
    from falqon_bench.suites.kernels_suite import only_kernels
    from falqon_bench.suites.suite import load_suite

    suite = only_kernels(load_suite("kernels"), _parse_kernel_groups(only))
    outcome = run_suite(suite, RunOptions(out_dir=out, resume=resume, results_root=RESULTS_ROOT), console=_err())
    print_summary(outcome, _out())
    if outcome.status == "interrupted":
        raise typer.Exit(EXIT_INTERRUPTED)


def _parse_kernel_groups(only: str | None) -> tuple[str, ...]:
    """--only's groups (all when not given); an unknown name is a BenchInputError naming the allowed ones."""
    if only is None:
        return KERNEL_GROUPS
    groups = tuple(g.strip() for g in only.split(",") if g.strip())
    unknown = [g for g in groups if g not in KERNEL_GROUPS]
    if unknown or not groups:
        raise BenchInputError(f"--only: unknown kernel group(s) {unknown or [only]}; allowed: {', '.join(KERNEL_GROUPS)}")
    return groups


def _quiet_library_import_noise() -> None:
    """torchao's import logs a torch deprecation warning (KernelPreference enum) on every command: hide it.

    Set before torch is imported (torch leaves this logger's level alone), so that commands which only
    read result files (report, compare, export, merge) never import torch.
    """
    import logging

    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)


def main() -> None:
    """Console-script entry point: BenchInputError anywhere -> red paragraph, exit 2 (no traceback)."""
    _quiet_library_import_noise()
    try:
        app()
    except BenchInputError as e:
        print_input_error(e)
        sys.exit(EXIT_INPUT_ERROR)


if __name__ == "__main__":
    main()
