"""One report from stored results: PNG figures, a markdown page, a self-contained HTML page, a perf table.

Reads only result files (falqon_bench.data.store.load_run), never runs anything. Writes into
reports/<run id> (or the run ids joined with '+'), with fixed file names so a re-render replaces
the same files: fig1_overhead.png, fig1_rank_throughput.png, fig3_total_cost.png,
fig4_breakdown.png, fig5_gpus.png (only when the runs cover >= 2 GPU models), floor.png, winners.png,
report.md, report.html (images embedded as base64) and perf_table.md (README-ready).

Every string taken from a results file or manifest is escaped (falqon_bench.readers.safe_markup) and method and
layer names are checked (falqon_bench.data.identity): a shared results file cannot put script into the page.

Figures 1, 3, 4 and floor show the first run's GPU model; Fig. 5 compares all of them.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any, Callable

import matplotlib
import pandas as pd

from falqon_bench.readers.figures import (
    render_breakdown_figure,
    render_floor_figure,
    render_gpu_speedup_figure,
    render_overhead_figure,
    render_rank_throughput_figure,
    render_total_cost_figure,
    render_winners_figure,
)
from falqon_bench.readers.figures.data import (
    BASELINE_METHOD,
    KERNEL_SUM_MARK,
    RunLabel,
    at_config,
    find_nested,
    label_for,
    metric_label,
    points_table,
    reference_config,
    run_versions,
    speedup_text,
)
from falqon_bench.readers.figures.floor import has_floor
from falqon_bench.readers.figures.png import compact_pngs
from falqon_bench.readers.figures.style import sorted_variants
from falqon_bench.data.identity import WARNING_SIGN, layer_problem, method_problem, row_problems
from falqon_bench.data.derived import pct_of_floor
from falqon_bench.data.errors import BenchInputError
from falqon_bench.readers.safe_markup import markdown_to_html, md_code, md_text
from falqon_bench.data.store import RunData, latest_run, load_run, require_shape_keys

RESULTS_ROOT = Path("results")
REPORTS_ROOT = Path("reports")
DPI = 110

# file name, caption, renderer (all take the primary GPU's points, except Fig. 5)
FIGURES: list[tuple[str, str, Callable[[pd.DataFrame, RunLabel], Any]]] = [
    ("fig1_overhead.png", "Fig. 1: per-layer latency, compute vs quantization overhead", render_overhead_figure),
    ("fig1_rank_throughput.png", "Fig. 1: throughput vs adapter rank", render_rank_throughput_figure),
    ("fig3_total_cost.png", "Fig. 3: total cost of a block's linear layers per method", render_total_cost_figure),
    ("fig4_breakdown.png", "Fig. 4: step time by kernel category", render_breakdown_figure),
    ("floor.png", "% of roofline floor per method and layer", render_floor_figure),
    ("winners.png", "fastest LoRA method per (rank, tokens) and falqon's % of floor, per layer", render_winners_figure),
]
GPU_FIGURE = ("fig5_gpus.png", f"Fig. 5: speedup over {BASELINE_METHOD} per GPU model", render_gpu_speedup_figure)


MAX_REPORT_NAME = 120


def _report_name(runs: list[RunData]) -> str:
    """The run ids as one safe directory name: no '/', never '.' or '..', at most MAX_REPORT_NAME characters."""
    name = "+".join(r.run_id for r in runs)
    safe = re.sub(r"[^A-Za-z0-9._+-]+", "-", name).lstrip(".") or "run"
    if len(safe) > MAX_REPORT_NAME:
        safe = safe[: MAX_REPORT_NAME - 13] + "-" + hashlib.sha1(name.encode()).hexdigest()[:12]
    return safe


def _primary_device(runs: list[RunData]) -> str:
    points = runs[0].points
    ok = [p for p in points if p.get("status") == "ok" and p.get("device")]
    return str((ok or points)[0].get("device") or "?")


def _cell(text: Any) -> str:
    """Any value from a results file as one inert markdown table cell (see safe_markup.md_text)."""
    return md_text(text)


def _flagged(text: Any, problem: str | None) -> str:
    """A cell with the name escaped and, when identity found a problem, a visible '⚠ <problem>' after it."""
    return md_text(text) + (f" {WARNING_SIGN} {md_text(problem)}" if problem else "")


def _ms(v: Any, digits: int = 4) -> str:
    return "-" if v is None or pd.isna(v) else f"{float(v):.{digits}g}"


def perf_table(df: pd.DataFrame) -> str:
    """Markdown tables (one per GPU model): per layer, per variant (method, option set, eager or compiled: one
    row each) at the layer's reference (rank, tokens):
    gpu_ms (p10-p90), wall_ms, floor_ms, % of floor, speedup vs bf16_lora (eager)."""
    out = []
    for device in sorted(set(df["device"])):
        on = df[df["device"] == device]
        out.append(f"#### {_cell(device)}\n")
        out.append("| layer | rank | tokens | method | gpu_ms (p10-p90) | wall_ms | floor_ms | % of floor | speedup vs bf16_lora |")
        out.append("|---|---:|---:|---|---:|---:|---:|---:|---:|")
        for layer in pd.unique(on["layer"]):
            sub = on[on["layer"] == layer]
            config = reference_config(sub)
            pts = at_config(sub, config)
            base = pts[(pts["variant"] == BASELINE_METHOD) & pts["ok"]]
            base_row = base.iloc[0] if not base.empty else {}
            for variant in sorted_variants(pts["variant"]):
                r = pts[pts["variant"] == variant].iloc[0]
                head = (f"| {_flagged(layer, layer_problem(layer, r['K'], r['N']))} | {_cell(r['rank'])} | "
                        f"{_cell(r['tokens'])} | {_flagged(variant, method_problem(r['method']))} |")
                if not r["ok"]:
                    out.append(f"{head} failed | - | - | - | - |")
                    continue
                gpu = "-" if r["gpu_ms"] is None or pd.isna(r["gpu_ms"]) else f"{_ms(r['gpu_ms'])} ({_ms(r['p10_ms'])}-{_ms(r['p90_ms'])})"
                if r["metric_kind"] == "wall":
                    gpu = "- (CPU)"
                pct = pct_of_floor(r["metric_ms"], r["floor_ms"]) if r["metric_kind"] == "gpu" else None
                speedup = speedup_text(base_row, r)
                if r.get("kernel_sum_timing", False) == True:  # noqa: E712 (a numpy bool; NaN where a frame lacks it)
                    gpu = f"{_ms(r['gpu_ms'])} (kernel sum)"
                out.append(f"{head} {gpu} | {_ms(r['wall_ms'])} | {_ms(r['floor_ms'])} | {'-' if pct is None else f'{pct:.0f}%'} | {speedup} |")
        out.append("")
    note = ("Times in ms per fwd+bwd+update step of one layer: gpu_ms is the median of CUDA-graph replays "
            "(p10-p90 in brackets), wall_ms the eager median; speedup compares the layer's main metric "
            "(gpu_ms, or wall_ms on CPU) with bf16_lora (eager) at the same shape; % of floor = 100 x floor / gpu_ms.")
    if (df["metric_kind"] == "wall").any():
        note += ("\n\nCPU wall times move far more between runs than within one: a CPU speedup is shown only where the "
                 "two p10-p90 ranges do not overlap, marked (CPU); elsewhere 'within CPU noise'.")
    if "kernel_sum_timing" in df and df["kernel_sum_timing"].any():
        note += (f"\n\n{KERNEL_SUM_MARK} CUDA-graph capture failed for this point: its gpu_ms is the profiler's sum of "
                 "kernel times, which leaves out idle gaps between kernels. It is a lower bound on the step time "
                 "(its speedup an upper bound), not comparable with the replay times.")
    return "\n".join(out) + "\n" + note + "\n"


def _runs_table(runs: list[RunData]) -> str:
    lines = ["| run | GPU | torch | triton | git | points ok / failed |", "|---|---|---|---|---|---:|"]
    for run in runs:
        versions = run_versions(run)
        devices = sorted({str(p.get("device")) for p in run.points if p.get("device")})
        git = find_nested(run.manifest, ("git",), dict) or {}
        sha = git.get("sha") or run.manifest.get("git_sha") or "?"
        dirty = " (dirty)" if git.get("dirty") or run.manifest.get("dirty") else ""
        ok = sum(p.get("status") == "ok" for p in run.points)
        lines.append(f"| {_cell(run.run_id)} | {_cell(', '.join(devices))} | {_cell(versions['torch'])} | {_cell(versions['triton'])} | "
                     f"{_cell(str(sha)[:12])}{dirty} | {ok} / {len(run.points) - ok} |")
    return "\n".join(lines) + "\n"


def _failed_points(df: pd.DataFrame) -> str:
    bad = df[~df["ok"]]
    if bad.empty:
        return "None.\n"
    return "\n".join(
        f"- {md_code(r.variant)} on {md_code(r.layer)} r={_cell(r.rank)} M={_cell(r.tokens)} ({_cell(r.device)}): {_cell(r.error)}"
        + "".join(f" {WARNING_SIGN} {md_text(p)}" for p in row_problems(r.method, r.layer, r.K, r.N))
        for r in bad.itertuples()
    ) + "\n"


RESIDUAL_LIMIT_PCT = 5.0


def breakdown_check(df: pd.DataFrame) -> str:
    """Markdown: per GPU and method, how far the profiled kernel categories are from the replayed gpu_ms
    (residual = 100 x (gpu_ms - sum of categories) / gpu_ms) over every point, and which points exceed 5%."""
    if "residual_pct" not in df:
        return "No GPU breakdown in these runs.\n"
    have = df[df["residual_pct"].notna()]
    if have.empty:
        return "No GPU breakdown in these runs.\n"
    lines = ["| GPU | method | points | median residual | worst residual | beyond 5% (at a dropped clock) |",
             "|---|---|---:|---:|---:|---:|"]
    for (device, variant), g in have.groupby(["device", "variant"], sort=False):
        res = g["residual_pct"].astype(float)
        over = g[res.abs() > RESIDUAL_LIMIT_PCT]
        worst = res.iloc[int(res.abs().to_numpy().argmax())]
        lines.append(f"| {_cell(device)} | {_flagged(variant, method_problem(g['method'].iloc[0]))} | {len(g)} | {res.median():+.1f}% | {worst:+.1f}% | "
                     f"{len(over)} ({int(over['clock_dropped'].sum())}) |")
    lines.append("")
    lines.append("Residual > 0: time the kernels do not explain (gaps); < 0: kernels sum to more than the replay "
                 "(the profiled steps ran slower, e.g. at a lower SM clock than the replays). 'At a dropped clock': "
                 "the SM clock fell during the point (NVML, e.g. the software power cap), so the profiled and the "
                 "replayed steps need not have run at one clock.")
    return "\n".join(lines) + "\n"


def _reference_configs(df: pd.DataFrame) -> str:
    parts = []
    for layer in pd.unique(df["layer"]):
        config = reference_config(df[df["layer"] == layer])
        if config:
            parts.append(f"{md_code(layer)}: r={config[0]}, M={config[1]}")
    return "; ".join(parts)


def _markdown(runs: list[RunData], df: pd.DataFrame, figures: list[tuple[str, str]], notes: list[str], table: str) -> str:
    md = [f"# falqon-bench report: {', '.join(_cell(r.run_id) for r in runs)}\n", "## Runs\n", _runs_table(runs)]
    md.append("## Notes\n")
    md += [f"- {n}" for n in notes]
    md.append("")
    md.append("## Figures\n")
    for fname, caption in figures:
        md.append(f"### {caption}\n\n![{caption}]({fname})\n")
    md.append("## Performance\n")
    md.append(table)
    md.append("## Breakdown check: profiled categories vs replayed gpu_ms\n")
    md.append(breakdown_check(df))
    md.append("## Failed points\n")
    md.append(_failed_points(df))
    md.append("## Method and layer names\n")
    md.append(identity_check(df))
    return "\n".join(md)


def identity_check(df: pd.DataFrame) -> str:
    """Markdown list of every (method, layer) whose names falqon_bench.data.identity does not accept, with how many
    rows carry them; these rows are shown everywhere above, escaped and marked with the same warning."""
    problems = []
    for (method, layer, K, N), g in df.groupby(["method", "layer", "K", "N"], sort=False, dropna=False):
        found = row_problems(method, layer, K, N)
        if found:
            problems.append(f"- {WARNING_SIGN} method {md_code(method)}, layer {md_code(layer)} ({len(g)} rows): {md_text('; '.join(found))}")
    if not problems:
        return "Every method is a registered method and every layer name matches its shape.\n"
    return ("These names are not a registered method or a layer of the shape given; the rows are shown as the "
            "results file wrote them (escaped), not checked against any method's code:\n\n" + "\n".join(problems) + "\n")


def render_report(run_dirs: list[Path], out_dir: Path | None = None, compact: bool = False) -> Path:
    """Render the report of one or more runs; returns the directory written. No runs: the latest under results/.
    `compact`: 256-colour figures (figures/png.py), for reports kept in a repository.

    Raises ResultsError (a BenchInputError) for a missing or corrupt results file, or one whose shape keys
    are not integers (store.require_shape_keys).
    """
    run_dirs = [Path(d) for d in run_dirs] or [latest_run(RESULTS_ROOT)]
    runs = [load_run(d) for d in run_dirs]
    for run in runs:
        require_shape_keys(run)
    accuracy = [r.run_dir for r in runs if any(p.get("kind") == "accuracy" for p in r.points)]
    if accuracy and len(accuracy) < len(runs):  # the layer/e2e report has no accuracy section: they would vanish
        others = [str(r.run_dir) for r in runs if r.run_dir not in accuracy]
        raise BenchInputError(
            f"accuracy runs ({', '.join(map(str, accuracy))}) and other runs ({', '.join(others)}) cannot share one "
            "report: accuracy runs have their own figures; report them separately"
        )
    out = Path(out_dir) if out_dir is not None else REPORTS_ROOT / _report_name(runs)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as e:  # --out names a file, or a path under one
        raise BenchInputError(f"report directory {out} cannot be made ({e.strerror}: {e.filename}); give --out a directory path") from None
    if all(p.get("kind") == "accuracy" for r in runs for p in r.points):  # accuracy suites: their own figures
        from falqon_bench.readers.figures.accuracy import render_accuracy_report

        return render_accuracy_report(runs, out, _cell, compact)
    from falqon_bench.readers.figures.e2e import FIGURE_NAME as E2E_FIGURE, render_e2e_section  # suite kind "e2e"

    e2e_md = render_e2e_section([p for r in runs for p in r.points], out, DPI, _cell)
    from falqon_bench.readers.figures.scaling import render_scaling_section  # e2e runs at several GPU counts / models

    scaling_md, scaling_images = render_scaling_section([p for r in runs for p in r.points], out, DPI, _cell)
    layer_runs = [RunData(r.run_dir, r.manifest, [p for p in r.points if p.get("kind", "layers") == "layers"]) for r in runs]
    layer_runs = [r for r in layer_runs if r.points]
    written: list[tuple[str, str]] = []
    if layer_runs:  # the layer figures show layer points only (an e2e row is a whole model, not a linear)
        written, md = _render_layer_report(layer_runs, runs, out)
    else:
        for fname, *_ in (*FIGURES, GPU_FIGURE):  # an output dir reused from a layer report keeps no stale figure
            (out / fname).unlink(missing_ok=True)
        (out / "perf_table.md").unlink(missing_ok=True)
        md = f"# falqon-bench report: {', '.join(_cell(r.run_id) for r in runs)}\n\n## Runs\n\n{_runs_table(runs)}"
    md += e2e_md + scaling_md
    images = [f for f, _ in written] + ([E2E_FIGURE] if e2e_md else []) + scaling_images
    if compact:
        compact_pngs(out, images)
    (out / "report.md").write_text(md, encoding="utf-8")
    page = markdown_to_html(md, f"falqon-bench report {_report_name(runs)}", images, out)
    (out / "report.html").write_text(page, encoding="utf-8")
    return out


def _render_layer_report(runs: list[RunData], all_runs: list[RunData], out: Path) -> tuple[list[tuple[str, str]], str]:
    """The layer figures (Fig. 1/3/4/5, floor, winners) and tables of `runs` (layer points only) into `out`;
    returns the figures written and the markdown (its runs table lists `all_runs`)."""
    df = points_table(runs)
    device = _primary_device(runs)
    primary = df[df["device"] == device].reset_index(drop=True)
    label = label_for([r for r in runs if device in {str(p.get("device")) for p in r.points}], primary)
    notes = [
        f"Figures 1, 3, 4 and the floor figure show {_cell(device)} ({metric_label(primary)}); "
        f"each layer at the rank and token count most methods ran: {_reference_configs(primary)}.",
        "Bars carry p10-p90 whiskers; failed or missing points are hatched bars marked 'failed' or 'n/a' (errors below), never zero.",
    ]
    if metric_label(primary) == "CPU wall time":
        notes.append("CPU run: no GPU time was measured, so figures use eager wall time and there is no roofline floor.")
    written: list[tuple[str, str]] = []
    figures = list(FIGURES)
    if not has_floor(primary):  # a CPU run: no peaks measured, so no floor panel at all
        figures = [f for f in figures if f[2] is not render_floor_figure]
        (out / "floor.png").unlink(missing_ok=True)
    gpu_models = sorted(set(df["device"]))
    if len(gpu_models) >= 2:
        figures.insert(4, GPU_FIGURE)
    else:
        (out / GPU_FIGURE[0]).unlink(missing_ok=True)
        notes.append(f"Fig. 5 skipped: it needs runs from at least two GPU models; these runs cover {_cell(', '.join(gpu_models))}.")
    for fname, caption, render in figures:
        data = df if render is render_gpu_speedup_figure else primary
        # names from the results file are drawn as text: a '$' in one must not be parsed as mathtext
        with matplotlib.rc_context({"text.parse_math": False}):
            fig = render(data, label_for(runs, data) if data is df else label)
            fig.savefig(out / fname, dpi=DPI, metadata={"Software": None})
        written.append((fname, caption))

    table = perf_table(df)
    (out / "perf_table.md").write_text(table, encoding="utf-8")
    return written, _markdown(all_runs, df, written, notes, table)
