"""Many-GPU e2e results: the weak-scaling figure and the "largest model each method fine-tunes" table.

Both read e2e rows only (suite kind "e2e", from runs of several world sizes and models) and appear in a report
only when their data exists:
  scaling figure   some (model, method, mode, parallel) series ran at two or more GPU counts. Left: tokens/s per
                   GPU vs GPU count (weak scaling: flat is ideal); right: that per-GPU rate over the same series'
                   rate at its fewest GPUs, with the 90% line.
  largest model    the e2e rows name two or more models: per method and GPU count, the largest model (by decoder
                   linear parameters, layers x (4 K^2 + 3 K N): GQA's smaller k/v are ignored, the order is right)
                   that trained, with its peak memory, and every model tried as ok / oom / error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable

from matplotlib.figure import Figure

from falqon_bench.readers.figures.e2e import GIB, _methods, e2e_rows
from falqon_bench.readers.figures.style import variant_color

FIGURE_NAME = "scaling.png"
EFFICIENCY_TARGET = 0.9  # the bar: tokens/s per GPU at 8 GPUs >= 90% of 1 GPU


def _series_key(r: dict[str, Any]) -> tuple[str, str, str, str]:
    return (str(r.get("layer")), str(r.get("method")), str(r.get("mode") or "eager"), str(r.get("parallel") or "ddp"))


def per_gpu_tokens_per_s(r: dict[str, Any]) -> float | None:
    """tokens/s per GPU of an ok e2e row (its tokens_per_s counts every rank)."""
    tps, world = r.get("tokens_per_s"), r.get("world_size") or 1
    return float(tps) / int(world) if r.get("status") == "ok" and tps else None


def scaling_series(rows: Iterable[dict[str, Any]]) -> dict[tuple[str, str, str, str], dict[int, float]]:
    """(model, method, mode, parallel) -> {GPU count: tokens/s per GPU}, only series with two or more GPU counts.

    Several rows at one GPU count (repeated runs) keep the fastest.
    """
    series: dict[tuple[str, str, str, str], dict[int, float]] = {}
    for r in e2e_rows(rows):
        rate = per_gpu_tokens_per_s(r)
        if rate is None:
            continue
        points = series.setdefault(_series_key(r), {})
        world = int(r.get("world_size") or 1)
        points[world] = max(rate, points.get(world, 0.0))
    return {k: dict(sorted(v.items())) for k, v in series.items() if len(v) >= 2}


def scaling_efficiency(points: dict[int, float]) -> dict[int, float]:
    """Per-GPU rate at each GPU count over the rate at the fewest GPUs (1.0 = perfect weak scaling)."""
    first = points[min(points)]
    return {world: rate / first for world, rate in points.items()}


def render_scaling_figure(series: dict[tuple[str, str, str, str], dict[int, float]], device: str) -> Figure:
    fig = Figure(figsize=(13, 5), layout="constrained")
    left, right = fig.subplots(1, 2)
    models = list(dict.fromkeys(k[0] for k in series))
    fig.suptitle(f"Weak scaling of end-to-end fine-tuning ({device}; model {', '.join(models)})", fontsize=12)
    many_modes = len({k[2:] for k in series}) > 1
    many_models = len(models) > 1
    styles = ("-", "--", ":", "-.")
    for (model, method, mode, parallel), points in series.items():
        label = method + (f" {mode}/{parallel}" if many_modes else "") + (f" [{model}]" if many_models else "")
        style = styles[models.index(model) % len(styles)]
        worlds = list(points)
        left.plot(worlds, [points[w] for w in worlds], style, marker="o", color=variant_color(method), label=label)
        eff = scaling_efficiency(points)
        right.plot(worlds, [eff[w] for w in worlds], style, marker="o", color=variant_color(method), label=label)
    worlds = sorted({w for points in series.values() for w in points})
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set_xticks(worlds, [str(w) for w in worlds])
        ax.set_xlabel("GPUs (one process each)")
        ax.grid(True, alpha=0.3)
    left.set_ylabel("tokens / s per GPU")
    left.set_title("tokens/s per GPU (higher is better; flat = ideal weak scaling)")
    left.set_ylim(bottom=0)
    right.axhline(EFFICIENCY_TARGET, color="black", linestyle="--", linewidth=0.8, label=f"{EFFICIENCY_TARGET:.0%}")
    right.set_ylabel("per-GPU rate / rate at the fewest GPUs")
    right.set_title("weak-scaling efficiency")
    right.set_ylim(0, max(1.1, max(max(scaling_efficiency(p).values()) for p in series.values()) * 1.05))
    right.legend(fontsize=8)
    return fig


def scaling_markdown(series: dict[tuple[str, str, str, str], dict[int, float]], cell: Callable[[Any], str] = str) -> str:
    worlds = sorted({w for points in series.values() for w in points})
    head = "| model | method | mode | parallel | " + " | ".join(f"{w} GPU" for w in worlds) + " | efficiency at most GPUs |"
    lines = [head, "|" + "---|" * (5 + len(worlds))]
    for (model, method, mode, parallel), points in series.items():
        cells = [f"{points[w]:,.0f}" if w in points else "-" for w in worlds]
        eff = scaling_efficiency(points)[max(points)]
        lines.append(f"| {cell(model)} | {cell(method)} | {cell(mode)} | {cell(parallel)} | " + " | ".join(cells) + f" | {eff:.0%} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- largest model


def decoder_linear_params(r: dict[str, Any]) -> float:
    """layers x (4 K^2 + 3 K N): the decoder linears of a LLaMA-architecture model (K hidden, N intermediate)."""
    layers = int((r.get("options") or {}).get("layers") or 0)
    K, N = int(r.get("K") or 0), int(r.get("N") or 0)
    return float(layers) * (4 * K * K + 3 * K * N)


def outcome(r: dict[str, Any]) -> str:
    """'ok', 'oom', 'unsupported' or 'error' for an e2e row."""
    if r.get("status") == "ok":
        return "ok"
    text = f"{r.get('error_type') or ''} {r.get('error') or ''}".lower()
    if "outofmemory" in text.replace(" ", "") or "out of memory" in text:
        return "oom"
    return "unsupported" if str(r.get("error") or "").startswith("unsupported") else "error"


def model_attempts(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One dict per e2e row: method, GPUs, model, layers, decoder params, outcome, peak GiB (method, GPUs, size order)."""
    out = []
    for r in e2e_rows(rows):
        out.append({
            "method": r["method"], "gpus": int(r.get("world_size") or 1), "model": str(r.get("layer")),
            "layers": int((r.get("options") or {}).get("layers") or 0), "params": decoder_linear_params(r),
            "outcome": outcome(r), "peak_gib": (r["peak_mem_bytes"] / GIB) if r.get("peak_mem_bytes") else None,
            "mode": r.get("mode"), "parallel": r.get("parallel") or "ddp", "error": r.get("error"),
        })  # fmt: skip
    order = {m: i for i, m in enumerate(_methods(out))}
    return sorted(out, key=lambda a: (order[a["method"]], a["gpus"], a["params"]))


def largest_models(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (method, GPUs): the largest model that trained ('model' None when none did) and what was tried."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for a in model_attempts(rows):
        groups.setdefault((a["method"], a["gpus"]), []).append(a)
    out = []
    for (method, gpus), tried in groups.items():
        ok = [a for a in tried if a["outcome"] == "ok"]
        best = max(ok, key=lambda a: a["params"]) if ok else None
        out.append({"method": method, "gpus": gpus, "best": best, "tried": tried})
    return out


def largest_model_markdown(rows: list[dict[str, Any]], cell: Callable[[Any], str] = str) -> str:
    lines = ["| method | GPUs | largest model fine-tuned | layers | peak GiB (fullest GPU) | every model tried |", "|" + "---|" * 6]
    for g in largest_models(rows):
        best = g["best"]
        tried = ", ".join(f"{cell(a['model'])}: {a['outcome']}" + (f" ({a['peak_gib']:.1f} GiB)" if a["peak_gib"] else "")
                          for a in g["tried"])
        if best is None:
            lines.append(f"| {cell(g['method'])} | {g['gpus']} | none |  |  | {tried} |")
            continue
        peak = "-" if best["peak_gib"] is None else f"{best['peak_gib']:.1f}"
        lines.append(f"| {cell(g['method'])} | {g['gpus']} | {cell(best['model'])} | {best['layers']} | {peak} | {tried} |")
    return "\n".join(lines) + "\n"


def render_scaling_section(points: Iterable[dict[str, Any]], out_dir: Path, dpi: int, cell: Callable[[Any], str]) -> tuple[str, list[str]]:
    """(markdown, figure files written): the scaling figure and the largest-model table, each only when its data exists."""
    rows = e2e_rows(points)
    md, images = "", []
    series = scaling_series(rows)
    figure = Path(out_dir) / FIGURE_NAME
    if series:
        device = next((r.get("device") for r in rows if r.get("device")), "?")
        render_scaling_figure(series, device).savefig(figure, dpi=dpi, metadata={"Software": None})
        caption = "Weak scaling: tokens/s per GPU vs GPU count"
        md += f"\n## Scaling over GPUs\n\n### {caption}\n\n![{caption}]({FIGURE_NAME})\n\n{scaling_markdown(series, cell)}"
        images.append(FIGURE_NAME)
    else:
        figure.unlink(missing_ok=True)
    if len({r.get("layer") for r in rows}) >= 2:
        md += ("\n## Largest model each method fine-tunes\n\nPer method and GPU count, the largest model whose e2e point "
               "trained (decoder linear parameters decide the order), and every model tried.\n\n"
               + largest_model_markdown(rows, cell))
    return md, images
