"""The e2e section of a report: whole-model fine-tuning per method and execution mode (suite kind "e2e").

One figure, four panels: tokens/s per method and mode (higher is better); peak device memory per method;
GPU time of one step split into forward / backward / optimizer / post-step per method (CUDA events, eager
mode); the training loss of every step per method (eager mode, else the first mode that ran). Plus a table:
method, mode, tokens/s, ratio to the best bf16_lora mode, step ms (p10-p90), GPU busy, peak GiB, convert s; and,
for profiled GPU rows, the step's kernel time by class with its floor (floor_table).
Reads result rows only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
from matplotlib.figure import Figure

from falqon_bench.data.schema import method_label
from falqon_bench.readers.figures.data import BASELINE_METHOD, ordered, variant_parts
from falqon_bench.readers.figures.style import empty_panel, variant_color, wrap_label

MODES = ("eager", "compile", "cuda_graph", "compile_cuda_graph")
PHASES = ("forward", "backward", "optimizer", "post_step")
PHASE_COLORS = {"forward": "#4c72b0", "backward": "#dd8452", "optimizer": "#55a868", "post_step": "#c44e52"}
MODE_HATCH = {"eager": "", "compile": "//", "cuda_graph": "..", "compile_cuda_graph": "xx"}
GIB = 2.0**30
FIGURE_NAME = "e2e.png"


def e2e_rows(points: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The e2e rows of a run (kind "e2e"), the last row of each point_id (a resumed run may hold retries), each
    with `method` naming its option set ('falqon[flush_every=1,...]', as in the layer figures): a suite's
    `options = {falqon = {...}}` sit in the row's options.method_options, and two runs of one method with
    different options, reported together, would otherwise be two rows named alike."""
    last: dict[str, dict[str, Any]] = {}
    for p in points:
        if p.get("kind") == "e2e":
            last[p["point_id"]] = p
    return [{**r, "method": method_label(r)} for r in last.values()]


def _methods(rows: list[dict[str, Any]]) -> list[str]:
    """Methods in METHOD_ORDER, each one's option sets after it (figures.data.method_sort_key)."""
    return ordered(r["method"] for r in rows)


def _ok(rows: list[dict[str, Any]], method: str, mode: str | None = None) -> list[dict[str, Any]]:
    return [r for r in rows if r["method"] == method and r.get("status") == "ok" and (mode is None or r.get("mode") == mode)]


def _preferred(rows: list[dict[str, Any]], method: str, key: str) -> dict[str, Any] | None:
    """The method's eager row holding `key`, else its first ok row that holds it."""
    mine = [r for r in _ok(rows, method) if r.get(key)]
    return next((r for r in mine if r.get("mode") == "eager"), mine[0] if mine else None)


def summary_table(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One dict per row (method order, then mode order): the numbers of the e2e table, None where not measured."""
    base = [r["tokens_per_s"] for r in _ok(rows, BASELINE_METHOD) if r.get("tokens_per_s")]
    best_base = max(base) if base else None
    out = []
    for method in _methods(rows):
        mine = sorted((r for r in rows if r["method"] == method), key=lambda r: MODES.index(r.get("mode")) if r.get("mode") in MODES else 9)
        for r in mine:
            ok = r.get("status") == "ok"
            tps = r.get("tokens_per_s") if ok else None
            out.append({
                "method": method, "mode": r.get("mode"), "status": r.get("status"), "error": r.get("error"),
                "liger": bool((r.get("options") or {}).get("liger")),  # liger-kernel's patches (falqon_bench.measure.fast_stacks)
                "tokens_per_s": tps, "vs_bf16_best": (tps / best_base) if tps and best_base else None,
                "wall_ms": r.get("wall_ms") if ok else None, "wall_p10_ms": r.get("wall_p10_ms"), "wall_p90_ms": r.get("wall_p90_ms"),
                "gpu_busy": r.get("gpu_busy"), "peak_gib": (r["peak_mem_bytes"] / GIB) if r.get("peak_mem_bytes") else None,
                "convert_s": r.get("convert_s"), "host_ms": r.get("host_ms") if ok else None,
            })  # fmt: skip
    return out


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def markdown_table(rows: list[dict[str, Any]], cell: Callable[[Any], str] = str) -> str:
    """The summary table in markdown; every text cell goes through `cell` (the report's escaping)."""
    head = "| method | mode | tokens/s | vs best bf16_lora | step ms (p10-p90) | host ms | GPU busy | peak GiB | convert s |"
    lines = [head, "|" + "---|" * 9]
    for t in summary_table(rows):
        t["mode"] = f"{t['mode']} +liger" if t["liger"] else t["mode"]
        if t["status"] != "ok":
            lines.append(f"| {cell(t['method'])} | {cell(t['mode'])} | error: {cell(t['error'])} |  |  |  |  |  |  |")
            continue
        step = f"{_fmt(t['wall_ms'], '.1f')} ({_fmt(t['wall_p10_ms'], '.1f')}-{_fmt(t['wall_p90_ms'], '.1f')})"
        lines.append(
            f"| {cell(t['method'])} | {cell(t['mode'])} | {_fmt(t['tokens_per_s'], ',.0f')} | {_fmt(t['vs_bf16_best'], '.2f')}x | "
            f"{step} | {_fmt(t['host_ms'], '.1f')} | {_fmt(t['gpu_busy'], '.0%')} | {_fmt(t['peak_gib'], '.1f')} | {_fmt(t['convert_s'], '.1f')} |"
        )
    return "\n".join(lines) + "\n"


CLASS_COLUMNS = ("gemm", "quantize", "attention", "optimizer", "proxy_update", "elementwise", "other")


def floor_table(rows: list[dict[str, Any]], cell: Callable[[Any], str] = str) -> str:
    """Markdown: per ok row with a profile, its GPU ms per step by kernel class, the floor of the step (converted
    linears and LM head at the roofline + the measured attention/elementwise/optimizer/other) and step time over
    that floor; '' when no row has a kernel split (CPU runs)."""
    profiled = [r for r in rows if r.get("status") == "ok" and r.get("kernel_class_ms")]
    if not profiled:
        return ""
    order = {m: i for i, m in enumerate(_methods(rows))}
    with_liger = lambda r: bool((r.get("options") or {}).get("liger"))  # noqa: E731  (a series of its own)
    profiled.sort(key=lambda r: (order.get(r["method"], 99), MODES.index(r["mode"]) if r.get("mode") in MODES else 9,
                                 with_liger(r)))
    names = [c.replace("_", " ") for c in CLASS_COLUMNS]
    head = ("| method | mode | GPU ms | " + " | ".join(names) + " | floor ms (linears + head + rest) | step / floor |")
    lines = [head, "|" + "---|" * (len(CLASS_COLUMNS) + 5)]
    for r in profiled:
        split = r["kernel_class_ms"]
        parts = r.get("floor_parts_ms") or {}
        floor = r.get("floor_ms")
        floor_cell = "-" if floor is None else (
            f"{floor:.1f} ({_fmt(parts.get('linears'), '.1f')} + {_fmt(parts.get('lm_head'), '.1f')} + "
            f"{_fmt(parts.get('measured_rest'), '.1f')})")
        ratio = (r["wall_ms"] / floor) if floor and r.get("wall_ms") else None
        lines.append(
            f"| {cell(r['method'])} | {cell(str(r.get('mode')) + (' +liger' if with_liger(r) else ''))} | "
            f"{_fmt(r.get('gpu_ms'), '.1f')} | "
            + " | ".join(_fmt(split.get(c), ".1f") for c in CLASS_COLUMNS)
            + f" | {floor_cell} | {_fmt(ratio, '.2f')}x |"
        )
    return "\n".join(lines) + "\n"


def render_e2e_figure(rows: list[dict[str, Any]], title_note: str = "") -> Figure:
    """The four panels (see the module docstring) of the e2e rows of one device."""
    fig = Figure(figsize=(14, 9), layout="constrained")
    axes = fig.subplots(2, 2).ravel()
    device = next((r.get("device") for r in rows if r.get("device")), "?")
    fig.suptitle(f"End-to-end fine-tuning step per method ({device}){title_note}", fontsize=12)
    methods = _methods(rows)
    x = np.arange(len(methods))

    ax = axes[0]
    liger = lambda r: bool((r.get("options") or {}).get("liger"))  # noqa: E731  (liger-kernel patches, a series of its own)
    series = [(m, lg) for m in MODES for lg in (False, True) if any(r.get("mode") == m and liger(r) == lg for r in rows)]
    width = 0.8 / max(1, len(series))
    for j, (mode, with_liger) in enumerate(series):
        values = [next((r for r in _ok(rows, m, mode) if liger(r) == with_liger), {}).get("tokens_per_s") or 0.0 for m in methods]
        ax.bar(x + (j - (len(series) - 1) / 2) * width, values, width, label=mode + (" +liger" if with_liger else ""),
               hatch=MODE_HATCH.get(mode, ""), color=[variant_color(m) for m in methods], edgecolor="black",
               linewidth=1.8 if with_liger else 0.5)
    ax.set_title("tokens/s by execution mode (higher is better; missing bar = failed)")
    ax.set_ylabel("tokens / s")
    ax.set_ylim(top=ax.get_ylim()[1] * 1.3)  # headroom: the legend sits above the bars, not on them
    ax.legend(fontsize=7, ncol=3, loc="upper left")

    ax = axes[1]
    peaks = [max((r.get("peak_mem_bytes") or 0) for r in _ok(rows, m)) / GIB if _ok(rows, m) else 0.0 for m in methods]
    if any(peaks):
        ax.bar(x, peaks, color=[variant_color(m) for m in methods], edgecolor="black", linewidth=0.5)
        ax.set_title("peak device memory (max over modes)")
        ax.set_ylabel("GiB")
    else:
        empty_panel(ax, "no device memory recorded (CPU run)")

    ax = axes[2]
    bottom = np.zeros(len(methods))
    splits = {p: np.array([((_preferred(rows, m, "split_ms") or {}).get("split_ms") or {}).get(p, 0.0) for m in methods]) for p in PHASES}
    if any(v.any() for v in splits.values()):
        for phase, values in splits.items():
            ax.bar(x, values, bottom=bottom, color=PHASE_COLORS[phase], label=phase.replace("_", "-"), edgecolor="black", linewidth=0.3)
            bottom += values
        # the top segment's sticky bottom edge (at the tallest stack's height) would stop the autoscale margin
        ax.set_ylim(0, float(bottom.max()) * 1.08)
        ax.legend(fontsize=8)
        ax.set_title("GPU time per step by phase (CUDA events, eager)")
    else:
        empty_panel(ax, "no phase split (CPU run, or no eager/compile point)")
    ax.set_ylabel("ms per step")

    ax = axes[3]
    drawn = False
    seen: dict[str, int] = {}  # option sets of one method share its color: a line style each
    for m in methods:
        r = _preferred(rows, m, "loss_per_step")
        if r:
            nth = seen[variant_parts(m)[0]] = seen.get(variant_parts(m)[0], -1) + 1
            ax.plot(range(1, len(r["loss_per_step"]) + 1), r["loss_per_step"], label=f"{m} ({r.get('mode')})",
                    color=variant_color(m), linestyle=("-", "--", ":", "-.")[nth % 4])
            drawn = True
    if drawn:
        ax.legend(fontsize=8)
        ax.set_title("training loss per step")
        ax.set_xlabel("step")
    else:
        empty_panel(ax, "no loss recorded")
    for a in axes[:3]:
        a.set_xticks(x, [wrap_label(m) for m in methods], rotation=30, ha="right", fontsize=8)
    return fig


def render_e2e_section(points: Iterable[dict[str, Any]], out_dir: Path, dpi: int, cell: Callable[[Any], str]) -> str:
    """Write e2e.png into out_dir and return the report's markdown section ('' when there are no e2e rows)."""
    rows = e2e_rows(points)
    if not rows:
        (Path(out_dir) / FIGURE_NAME).unlink(missing_ok=True)
        return ""
    fig = render_e2e_figure(rows)
    fig.savefig(Path(out_dir) / FIGURE_NAME, dpi=dpi, metadata={"Software": None})
    caption = "End-to-end fine-tuning: tokens/s, memory, step split, loss"
    section = f"\n## End to end\n\n### {caption}\n\n![{caption}]({FIGURE_NAME})\n\n{markdown_table(rows, cell)}"
    floors = floor_table(rows, cell)
    if floors:
        section += ("\n### Where the GPU time of a step goes, and its floor\n\nms per step by kernel class (profiler); the "
                    "floor is the converted linears and the LM head at the measured peaks plus the measured attention, "
                    "elementwise, optimizer and other kernels.\n\n" + floors)
    return section
