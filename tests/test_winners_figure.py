"""The 'where each method wins' figure, rendered from a synthetic results file written by the real RunWriter."""

from __future__ import annotations

import math

import numpy as np
from matplotlib.colors import to_hex

from falqon_bench.readers.figures.data import label_for, points_table
from falqon_bench.readers.figures.style import variant_color
from falqon_bench.readers.figures.winners import render_winners_figure, winners_table
from falqon_bench.data.store import load_run
from fixtures.results import H200, make_point, write_run

LAYERS = {"llama-7b.attn": (4096, 4096), "llama-3-8b.kv": (4096, 1024)}
RANKS, TOKENS = (8, 64), (3000, 4096)
# ms per method; halo_lora wins llama-3-8b.kv at r=8, 3000 tokens; bf16_lora compiled (llama-7b.attn r=64,
# 4096 tokens only) beats its eager self and halo_lora
BASE = {"bf16_lora": 1.0, "halo_lora": 0.8, "falqon": 0.6, "bf16_linear": 0.3}


def _ms(method, layer, rank, tokens):
    if (method, layer, rank, tokens) == ("falqon", "llama-3-8b.kv", 8, 3000):
        return 0.9
    return BASE[method] * tokens / 4096


def write_sweep(tmp_path):
    points = []
    for layer, (K, N) in LAYERS.items():
        for r in RANKS:
            for m in TOKENS:
                for method in BASE:
                    ms = _ms(method, layer, r, m)
                    points.append(make_point(method, layer, r, m, device=H200, K=K, N=N, gpu_samples=[ms] * 5,
                                             floor_ms=0.5 * m / 4096))
    points.append(make_point("bf16_lora", "llama-7b.attn", 64, 4096, device=H200, compile=True, gpu_samples=[0.7] * 5))
    return write_run(tmp_path, "20260101-000000-shapes", H200, points)


def test_winners_table_takes_best_of_compile_and_leaves_out_non_lora_methods(tmp_path):
    df = points_table([load_run(write_sweep(tmp_path))])
    table = winners_table(df)
    assert len(table) == len(LAYERS) * len(RANKS) * len(TOKENS)
    assert "bf16_linear" not in set(table["winner"])  # fastest of all, but trains nothing
    lost = table[(table["layer"] == "llama-3-8b.kv") & (table["rank"] == 8) & (table["tokens"] == 3000)].iloc[0]
    assert lost["winner"] == "halo_lora" and math.isclose(lost["falqon_speedup"], 0.8 * 3000 / 4096 / 0.9)
    won = table[(table["layer"] == "llama-7b.attn") & (table["rank"] == 64) & (table["tokens"] == 4096)].iloc[0]
    assert won["winner"] == "falqon"
    # the best other method is bf16_lora compiled (0.7 ms), not halo_lora eager (0.8 ms)
    assert won["best_other"] == "bf16_lora" and math.isclose(won["falqon_speedup"], 0.7 / 0.6)
    assert math.isclose(won["falqon_pct_of_floor"], 100 * 0.5 / 0.6)


def test_winners_figure_colours_cells_by_method_and_writes_speedup_and_pct_of_floor(tmp_path):
    run = load_run(write_sweep(tmp_path))
    df = points_table([run])
    fig = render_winners_figure(df, label_for([run], df))
    titles = [ax.get_title() for ax in fig.axes]
    for layer in LAYERS:
        assert f"{layer}: fastest method" in titles and f"{layer}: falqon % of floor" in titles
    kv = next(ax for ax in fig.axes if ax.get_title() == "llama-3-8b.kv: fastest method")
    image = kv.get_images()[0]
    rgba = image.cmap(image.norm(image.get_array()))
    assert to_hex(rgba[0, 0]) == variant_color("halo_lora")  # rank 8 (row 0), 3000 tokens (column 0)
    assert to_hex(rgba[1, 1]) == variant_color("falqon")
    texts = [t.get_text() for t in kv.texts]
    assert "0.65x" in texts and "1.00x" not in texts
    floor = next(ax for ax in fig.axes if ax.get_title() == "llama-7b.attn: falqon % of floor")
    assert "83%" in [t.get_text() for t in floor.texts]
    assert np.isclose(floor.get_images()[0].get_array()[1, 1], 100 * 0.5 / 0.6)
    fig.savefig(tmp_path / "winners.png")
    assert (tmp_path / "winners.png").stat().st_size > 5000


def test_winners_figure_of_a_run_without_lora_points_says_so(tmp_path):
    run = load_run(write_run(tmp_path, "20260101-000000-linear", H200, [
        make_point("bf16_linear", "llama-7b.attn", 16, device=H200, gpu_samples=[0.3] * 3)]))
    df = points_table([run])
    assert winners_table(df).empty
    fig = render_winners_figure(df, label_for([run], df))
    assert any("no timed LoRA points" in t.get_text() for ax in fig.axes for t in ax.texts)
