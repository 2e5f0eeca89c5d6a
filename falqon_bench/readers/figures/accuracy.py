"""The accuracy report: loss curves, final loss vs learning rate, and accuracy vs speed, from accuracy rows.

Reads result rows only (no torch). One figure set per run; every figure is titled with model, corpus and
device. Best-of-grid (falqon_bench.readers.accuracy_summary): per method variant, the lr with the lowest final
held-out loss (mean over seeds).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from matplotlib.figure import Figure

from falqon_bench.readers.accuracy_summary import accuracy_rows, best_of_grid
from falqon_bench.readers.figures.png import compact_pngs

_PALETTE = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c", "#ccb974", "#64b5cd"]
DPI = 110


def _title(rows: list[dict[str, Any]], what: str) -> str:
    r = rows[0]
    return f"{what}\nmodel {r['layer']} (rank {r['rank']}), corpus {r['corpus']}, {r['device']}"


def _colors(labels: list[str]) -> dict[str, str]:
    return {label: _PALETTE[i % len(_PALETTE)] for i, label in enumerate(labels)}


def _floor(ax, rows: list[dict[str, Any]]) -> None:
    floor = next((r.get("loss_floor") for r in rows if r.get("loss_floor") is not None), None)
    if floor is not None:
        ax.axhline(floor, color="k", ls=":", lw=1, label=f"floor (entropy rate) {floor:.3f}")


def _best_of_grid_figure(rows: list[dict[str, Any]]):
    """(best row per method variant, its colour, an 8x5 in figure, its axes): what every per-method plot starts from."""
    best = best_of_grid(rows)
    fig = Figure(figsize=(8, 5), layout="constrained")
    return best, _colors(list(best)), fig, fig.subplots()


def render_loss_curves(rows: list[dict[str, Any]]) -> Figure:
    """Held-out loss vs step per method variant at its best lr (mean over seeds)."""
    best, colors, fig, ax = _best_of_grid_figure(rows)
    for label, b in best.items():
        runs = [r for r in rows if r["label"] == label and r["lr"] == b["lr"] and r.get("status") == "ok"]
        steps = [c["step"] for c in runs[0]["heldout_curve"]]
        losses = [sum((r["heldout_curve"][i]["loss"] or float("nan")) for r in runs) / len(runs) for i in range(len(steps))]
        ax.plot(steps, losses, marker="o", ms=3, color=colors[label], label=f"{label} (lr {b['lr']:g})")
    _floor(ax, rows)
    ax.set_xlabel("fine-tuning step")
    ax.set_ylabel("held-out loss (nats / token)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.suptitle(_title(rows, "Held-out loss during fine-tuning, each method at its best learning rate"), fontsize=10)
    return fig


def render_loss_vs_lr(rows: list[dict[str, Any]]) -> Figure:
    """Final held-out loss vs lr (log x) per method variant; diverged runs drawn as x at the top."""
    labels = list(dict.fromkeys(r["label"] for r in rows))
    colors = _colors(labels)
    fig = Figure(figsize=(8, 5), layout="constrained")
    ax = fig.subplots()
    finite = [r["final_loss"] for r in rows if r.get("final_loss") is not None]
    top = max(finite) * 1.05 if finite else 1.0
    for label in labels:
        mine = sorted((r for r in rows if r["label"] == label and r.get("status") == "ok"), key=lambda r: r["lr"])
        lrs = sorted({r["lr"] for r in mine})
        means = []
        for lr in lrs:
            vals = [r["final_loss"] for r in mine if r["lr"] == lr]
            means.append(None if any(v is None for v in vals) else sum(vals) / len(vals))
        ax.plot([lr for lr, m in zip(lrs, means) if m is not None], [m for m in means if m is not None],
                marker="o", color=colors[label], label=label)
        bad = [lr for lr, m in zip(lrs, means) if m is None]
        if bad:
            ax.plot(bad, [top] * len(bad), "x", color=colors[label], ms=9)
    _floor(ax, rows)
    start = next((r.get("start_loss") for r in rows if r.get("start_loss") is not None), None)
    if start is not None:
        ax.axhline(start, color="grey", ls="--", lw=1, label=f"start ({rows[0]['label']} base) {start:.3f}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (AdamW)")
    ax.set_ylabel("final held-out loss (nats / token)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.suptitle(_title(rows, "Final held-out loss vs learning rate (x at the top: diverged)"), fontsize=10)
    return fig


LABEL_OFFSET_PT = (5.0, 5.0)  # a label's lower-left corner from its point, when nothing is in the way
LABEL_GAP_PX = 2.0  # the least room between two labels' boxes


def render_accuracy_vs_speed(rows: list[dict[str, Any]]) -> Figure:
    """Held-out loss vs tokens/s, one point per method variant at its best lr; labels kept apart (_place_labels)."""
    best, colors, fig, ax = _best_of_grid_figure(rows)
    labels = []
    for label, b in best.items():
        if b["final_loss"] is None or not b["tokens_per_s"]:
            continue
        ax.scatter([b["tokens_per_s"]], [b["final_loss"]], color=colors[label], s=50)
        labels.append(ax.annotate(
            f"{label} (lr {b['lr']:g})", (b["tokens_per_s"], b["final_loss"]), fontsize=8, xytext=LABEL_OFFSET_PT,
            textcoords="offset points", color=colors[label],
        ))
    _floor(ax, rows)
    ax.set_xlabel("training throughput of the same run (tokens / s, eager, median step)")
    ax.set_ylabel("best-of-grid final held-out loss (nats / token)")
    ax.grid(alpha=0.3)
    fig.suptitle(_title(rows, "Accuracy vs speed (lower right is better)"), fontsize=10)
    _place_labels(fig, labels)
    return fig


def _place_labels(fig: Figure, labels: list[Any], passes: int = 4) -> None:
    """Keep the point labels from overlapping: two methods can land at nearly the same (tokens/s, loss).

    Greedy in display space, in order of the points' x: a label whose box would overlap one already placed moves
    down one label height at a time (up instead, once it would leave the axes at the bottom); the label of a point
    in the right third of the x range goes to the left of its point. Labels take their point's colour, so a moved
    one (no connector line: it would cross other labels) still reads as its point's.
    Layout (constrained) can shift the axes once labels move, so this repeats until no offset changes.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    if not labels:
        return
    canvas = FigureCanvasAgg(fig)
    to_px = fig.dpi / 72.0
    for _ in range(passes):
        fig.draw_without_rendering()
        renderer = canvas.get_renderer()
        changed = False
        placed: list[tuple[float, float, float, float]] = []
        for ann in sorted(labels, key=lambda a: a.xy[0]):
            ax_box = ann.axes.get_window_extent(renderer)
            ann.update_positions(renderer)
            box = ann.get_window_extent(renderer)
            dx_now, dy_now = ann.xyann
            w, h = box.width, box.height
            # where the box would be at offset (dx, dy): the current box moved by the change of offset
            def x0_at(dx: float) -> float:
                return box.x0 + (dx - dx_now) * to_px

            def y0_at(dy: float) -> float:
                return box.y0 + (dy - dy_now) * to_px

            # right third of the x range: label on the left (decided in data space, so layout cannot flip it back)
            lo, hi = ann.axes.get_xlim()
            dx = LABEL_OFFSET_PT[0] if (ann.xy[0] - lo) <= 2 / 3 * (hi - lo) else -LABEL_OFFSET_PT[0] - w / to_px
            step = (h + LABEL_GAP_PX) / to_px
            down = [LABEL_OFFSET_PT[1] - k * step for k in range(len(labels) + 1)]
            up = [LABEL_OFFSET_PT[1] + k * step for k in range(1, len(labels) + 1)]
            for dy in [c for c in down if y0_at(c) >= ax_box.y0] + up:
                if not any(_boxes_overlap((x0_at(dx), y0_at(dy), x0_at(dx) + w, y0_at(dy) + h), other) for other in placed):
                    break
            placed.append((x0_at(dx), y0_at(dy), x0_at(dx) + w, y0_at(dy) + h))
            if abs(dx - dx_now) > 1e-6 or abs(dy - dy_now) > 1e-6:
                ann.xyann = (dx, dy)
                changed = True
        if not changed:
            return


def _boxes_overlap(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> bool:
    """Whether two (x0, y0, x1, y1) boxes come closer than LABEL_GAP_PX in both directions."""
    return min(a[2], b[2]) - max(a[0], b[0]) > -LABEL_GAP_PX and min(a[3], b[3]) - max(a[1], b[1]) > -LABEL_GAP_PX


FIGURES = [
    ("accuracy_loss_curves.png", "Held-out loss curves per method (best lr)", render_loss_curves),
    ("accuracy_loss_vs_lr.png", "Final held-out loss vs learning rate", render_loss_vs_lr),
    ("accuracy_vs_speed.png", "Accuracy vs speed (best lr per method)", render_accuracy_vs_speed),
]


def accuracy_table(rows: list[dict[str, Any]], escape: Callable[[Any], str]) -> str:
    """Markdown: per method variant the best lr, its final loss and accuracy, tokens/s, and falqon's lost fraction."""
    best = best_of_grid(rows)
    lines = ["| method | start loss | best lr | final held-out loss | next-token acc | tokens/s | lost-update fraction by lr |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for label, b in best.items():
        lost = [(r["lr"], r.get("lost_fraction_mean")) for r in rows if r["label"] == label and r.get("lost_fraction_mean") is not None]
        lost_text = ", ".join(f"{lr:g}: {f:.2f}" for lr, f in sorted(set(lost))) or "-"
        loss = "diverged" if b["final_loss"] is None else f"{b['final_loss']:.3f}"
        tps = "-" if not b["tokens_per_s"] else f"{b['tokens_per_s']:.0f}"
        start = next(r["start_loss"] for r in rows if r["label"] == label)
        lines.append(f"| {escape(label)} | {start:.3f} | {b['lr']:g} | {loss} | {b['final_acc']:.3f} | {tps} | {escape(lost_text)} |")
    return "\n".join(lines) + "\n"


def render_accuracy_report(runs, out: Path, escape: Callable[[Any], str], compact: bool = False) -> Path:
    """Figures + report.md + report.html of accuracy runs (one section per run) into `out`; `compact`: 256-colour
    figures (figures/png.py).

    `escape` makes any value from a results file one inert markdown cell (report._cell); the HTML page is built by
    safe_markup.markdown_to_html (raw HTML off, CSP, only the figures written here inlined).
    """
    from falqon_bench.readers.safe_markup import markdown_to_html

    out.mkdir(parents=True, exist_ok=True)
    written: list[str] = []
    md = [f"# falqon-bench accuracy report: {escape(', '.join(r.run_id for r in runs))}\n"]
    for run in runs:
        rows = accuracy_rows(run.points)
        ok = [r for r in rows if r.get("status") == "ok"]
        prefix = "" if len(runs) == 1 else f"{run.run_id}_"
        md.append(f"## {escape(run.run_id)}\n")
        if not ok:
            md.append("No successful accuracy points.\n")
            continue
        r0 = ok[0]
        floor = r0.get("loss_floor")
        md.append(f"Model {escape(r0['layer'])} (rank {r0['rank']}), corpus {escape(r0['corpus'])}, device {escape(r0['device'])}; "
                  "held-out loss at the start: per method below (fp8 bases quantize the same weights)" + (f", floor (entropy rate of the task) {floor:.3f}" if floor else "") + ".\n")
        md.append(accuracy_table(ok, escape))
        for fname, caption, render in FIGURES:
            fig = render(ok)
            fig.savefig(out / f"{prefix}{fname}", dpi=DPI, metadata={"Software": None})
            written.append(f"{prefix}{fname}")
            md.append(f"### {escape(caption)}\n\n![{escape(caption)}]({prefix}{fname})\n")
        failed = [r for r in rows if r.get("status") != "ok"]
        if failed:
            md.append("Failed points:\n")
            md += [f"- {escape(r['label'])} lr {r['lr']:g}: {escape(r.get('error'))}" for r in failed]
            md.append("")
    if compact:
        compact_pngs(out, written)
    text = "\n".join(md)
    (out / "report.md").write_text(text, encoding="utf-8")
    page = markdown_to_html(text, "falqon-bench accuracy report", written, out)
    (out / "report.html").write_text(page, encoding="utf-8")
    return out
