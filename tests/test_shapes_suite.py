"""suites/shapes.toml: the sweep a user runs to see where each LoRA method wins covers every class of point."""

from __future__ import annotations

from pathlib import Path

from falqon_bench.suites.layers import MODEL_NAMES, named_layers
from falqon_bench.suites.suite import load_suite
from falqon_bench.suites.sweep import expand_suite

SUITE = Path(__file__).resolve().parents[1] / "suites" / "shapes.toml"
EAGER_LORA = {"bf16_lora", "qlora_nf4", "fp8_base_lora", "halo_lora", "falqon"}


def test_shapes_suite_covers_every_layer_type_and_alignment_class_for_every_fast_lora_method():
    points = expand_suite(load_suite(SUITE))
    eager = [p for p in points if not p["compile"]]
    for method in EAGER_LORA:
        cells = {(p["layer"], p["rank"], p["tokens"]) for p in eager if p["method"] == method}
        kinds = {(layer.split(".")[1], r % 16 == 0, m % 16 == 0) for layer, r, m in cells}
        for kind in ("attn", "kv", "up", "down"):
            for rank_aligned in (True, False):
                for tokens_aligned in (True, False):
                    assert (kind, rank_aligned, tokens_aligned) in kinds, (method, kind, rank_aligned, tokens_aligned)
        layers = {layer for layer, _, _ in cells}
        assert layers == set(named_layers()), f"{method} misses {set(named_layers()) - layers}"
        assert {p.split(".")[0] for p in layers} == set(MODEL_NAMES)
        assert min(m for _, _, m in cells) == 512 and max(m for _, _, m in cells) == 16384
        assert min(r for _, r, _ in cells) == 8 and max(r for _, r, _ in cells) == 256


def test_shapes_suite_runs_fp8_lora_and_compiled_points_only_on_a_subset():
    points = expand_suite(load_suite(SUITE))
    assert 0 < sum(p["method"] == "fp8_lora" for p in points) <= 8
    assert all(p["rank"] % 16 == 0 for p in points if p["method"] == "fp8_lora")  # torchao's adapters need it
    compiled = {p["method"] for p in points if p["compile"]}
    assert compiled == {"bf16_lora", "fp8_base_lora"}
    assert len(points) <= 270  # ~7 minutes on an H200 (estimate in the suite file)


def test_shapes_suite_puts_fp8_lora_and_compiled_points_only_on_cells_falqon_has():
    # a cell where only fp8_lora or a compiled method ran would count as a falqon loss it never had a chance at
    points = expand_suite(load_suite(SUITE))
    falqon = {(p["layer"], p["rank"], p["tokens"]) for p in points if p["method"] == "falqon" and not p["compile"]}
    extra = {(p["layer"], p["rank"], p["tokens"]) for p in points if p["method"] == "fp8_lora" or p["compile"]}
    assert extra and extra <= falqon, sorted(extra - falqon)
