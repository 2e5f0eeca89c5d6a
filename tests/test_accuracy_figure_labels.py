"""The accuracy-vs-speed figure keeps its point labels readable when two methods land at nearly one point."""

import json
from pathlib import Path

from test_figure_legibility import overlapping_pairs

from falqon_bench.readers.figures.accuracy import LABEL_OFFSET_PT, render_accuracy_vs_speed

REPO = Path(__file__).resolve().parents[1]


def _row(label, lr, tokens_per_s, loss):
    return {"kind": "accuracy", "status": "ok", "label": label, "lr": lr, "final_loss": loss, "final_acc": 0.5,
            "tokens_per_s": tokens_per_s, "layer": "small-llama", "rank": 16, "corpus": "stdlib", "device": "NVIDIA H200",
            "loss_floor": None}


def _labels(fig):
    return [t for t in fig.axes[0].texts]


def test_two_nearly_coincident_points_get_labels_that_do_not_overlap():
    """The H200 text run's case: the variant and its acc32 twin at 121k and 111k tokens/s, both at loss 1.363."""
    rows = [
        _row("bf16_lora", 3e-3, 446_000.0, 1.302),
        _row("falqon", 0.1, 131_000.0, 1.374),
        _row("falqon+kA+sr+keep+f4", 3e-3, 121_000.0, 1.363),
        _row("falqon+kA+sr+keep+f4+acc32", 3e-3, 111_000.0, 1.363),
    ]
    fig = render_accuracy_vs_speed(rows)
    assert overlapping_pairs(fig) == []
    texts = {t.get_text(): t for t in _labels(fig)}
    assert set(texts) == {"bf16_lora (lr 0.003)", "falqon (lr 0.1)", "falqon+kA+sr+keep+f4 (lr 0.003)", "falqon+kA+sr+keep+f4+acc32 (lr 0.003)"}
    # the twins were moved apart: one kept its place, the other moved down, both on their points' right
    twins = [texts["falqon+kA+sr+keep+f4 (lr 0.003)"], texts["falqon+kA+sr+keep+f4+acc32 (lr 0.003)"]]
    assert sorted(t.xyann[1] < LABEL_OFFSET_PT[1] for t in twins) == [False, True]
    assert all(t.xyann[0] == LABEL_OFFSET_PT[0] for t in twins)
    # every label stays inside the figure
    width, height = fig.get_size_inches() * fig.dpi
    renderer = fig.canvas.get_renderer()
    for t in _labels(fig):
        box = t.get_window_extent(renderer)
        assert box.x0 >= 0 and box.x1 <= width and box.y0 >= 0 and box.y1 <= height, (t.get_text(), box)


def test_many_points_at_one_spot_all_get_their_own_label_box():
    rows = [_row(f"variant-{i}", 1e-3, 100_000.0 + 10 * i, 1.30 + 1e-5 * i) for i in range(6)]
    rows.append(_row("far", 1e-3, 400_000.0, 1.40))
    assert overlapping_pairs(render_accuracy_vs_speed(rows)) == []


def test_labels_of_the_committed_h200_run_do_not_overlap_and_stay_in_place():
    rows = [json.loads(line) for line in (REPO / "results" / "accuracy-text-h200" / "points.jsonl").read_text().splitlines() if line.strip()]
    fig = render_accuracy_vs_speed([r for r in rows if r.get("kind") == "accuracy" and r.get("status") == "ok"])
    assert overlapping_pairs(fig) == []
    # nothing collides there: every label keeps its height (bf16_lora's, in the right third, goes left of its point)
    assert all(t.xyann[1] == LABEL_OFFSET_PT[1] for t in _labels(fig))
