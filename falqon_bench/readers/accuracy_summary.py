"""Read accuracy rows (no torch): best-of-grid per method variant, and the table the CLI / GPU script prints.

Best-of-grid: per label, the lr whose final held-out loss, averaged over seeds, is lowest; a diverged run
(no finite final loss) counts as +inf, so it is never best.
"""

from __future__ import annotations

import math
import sys
from typing import Any

from falqon_bench.data.errors import script_exit_code
from falqon_bench.data.store import load_run


def lr_text(lr: float) -> str:
    """A learning rate as the suites write it: 3e-03, 1.5e-02 (one digit only where a second would be 0)."""
    return f"{lr:.1e}".replace(".0e", "e")


def accuracy_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if r.get("kind") == "accuracy"]


def best_of_grid(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """label -> {lr, final_loss, final_acc, tokens_per_s, lrs_seen}, from the ok rows of each label."""
    by: dict[str, dict[float, list[dict[str, Any]]]] = {}
    for r in accuracy_rows(rows):
        if r.get("status") == "ok":
            by.setdefault(r["label"], {}).setdefault(float(r["lr"]), []).append(r)
    out = {}
    for label, grid in by.items():
        def mean_loss(lr: float) -> float:
            losses = [r["final_loss"] if r.get("final_loss") is not None else math.inf for r in grid[lr]]
            return sum(losses) / len(losses)

        lr = min(grid, key=mean_loss)
        rs = grid[lr]
        out[label] = {
            "lr": lr,
            "final_loss": mean_loss(lr) if math.isfinite(mean_loss(lr)) else None,
            "final_acc": sum(r["final_acc"] for r in rs) / len(rs),
            "tokens_per_s": _mean([r.get("tokens_per_s") for r in rs]),
            "lrs_seen": sorted(grid),
        }
    return out


def _mean(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def summary_lines(rows: list[dict[str, Any]]) -> list[str]:
    """A plain-text table: per label and lr the final held-out loss (and lost fraction); best marked with *."""
    rows = accuracy_rows(rows)
    if not rows:
        return ["no accuracy rows"]
    best = best_of_grid(rows)
    floor = next((r.get("loss_floor") for r in rows if r.get("loss_floor") is not None), None)
    start = next((r.get("start_loss") for r in rows if r.get("start_loss") is not None), None)
    lines = [f"held-out loss (nats/token) after fine-tuning; start {start:.3f}" if start else "held-out loss (nats/token)"]
    if floor is not None:
        lines[0] += f", floor (entropy rate) {floor:.3f}"
    lines.append(f"{'method':<28} {'lr':>8} {'loss':>8} {'acc':>6} {'tok/s':>10} {'lost':>6}")
    for r in sorted(rows, key=lambda r: (list(best).index(r["label"]) if r["label"] in best else 99, r["lr"], r["seed"])):
        mark = "*" if r["label"] in best and best[r["label"]]["lr"] == r["lr"] else " "
        if r.get("status") != "ok":
            lines.append(f"{r['label']:<28} {lr_text(r['lr']):>8} {'error':>8}  {str(r.get('error'))[:60]}")
            continue
        loss = f"{r['final_loss']:.3f}" if r.get("final_loss") is not None else "diverged"
        lost = f"{r['lost_fraction_mean']:.2f}" if r.get("lost_fraction_mean") is not None else "-"
        tps = f"{r['tokens_per_s']:.0f}" if r.get("tokens_per_s") else "-"
        lines.append(f"{r['label']:<28} {lr_text(r['lr']):>8} {loss:>7}{mark} {r['final_acc']:>6.3f} {tps:>10} {lost:>6}")
    return lines


def main(argv: list[str] | None = None) -> int:
    """python -m falqon_bench.readers.accuracy_summary RUN_DIR...: print the table of each run."""
    def body() -> None:
        for run in (argv if argv is not None else sys.argv[1:]):
            rows = load_run(run).points  # the results store: gzip'd points, a partial last line, retried points
            print(f"== {run}")
            print("\n".join(summary_lines(rows)))

    return script_exit_code(body)


if __name__ == "__main__":
    sys.exit(main())
