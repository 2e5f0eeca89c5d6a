"""suites/cliffs.toml covers falqon's worst classes, and scripts/gpu/cliffs_summary.py reports them per point."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from falqon_bench.suites.suite import load_suite
from falqon_bench.suites.sweep import expand_suite

ROOT = Path(__file__).resolve().parents[1]


def _summary_module():
    spec = importlib.util.spec_from_file_location("cliffs_summary", ROOT / "scripts" / "gpu" / "cliffs_summary.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cliffs_suite_covers_kv_short_and_unaligned_tokens_and_ranks_8_to_256_for_three_methods():
    points = expand_suite(load_suite(ROOT / "suites" / "cliffs.toml"))
    eager = [p for p in points if not p["compile"]]
    for method in ("falqon", "bf16_lora", "halo_lora"):
        cells = {(p["layer"], p["rank"], p["tokens"]) for p in eager if p["method"] == method}
        for layer in ("llama-7b.attn", "llama-7b.up", "llama-7b.down", "llama-3-8b.kv"):
            for rank in (8, 48, 64, 256):
                for tokens in (512, 3000):
                    assert (layer, rank, tokens) in cells, (method, layer, rank, tokens)
        assert ("llama-3-8b.kv", 256, 9999) in cells and ("llama-7b.attn", 64, 4096) in cells
    assert {p["method"] for p in points if p["compile"]} == {"bf16_lora"}
    assert len(points) <= 150  # ~4 minutes on an H200 (estimate in the suite file)


def _row(method, ms, layer="llama-3-8b.kv", rank=64, tokens=512, **extra):
    return {"method": method, "layer": layer, "rank": rank, "tokens": tokens, "compile": False, "status": "ok",
            "gpu_ms": ms, "options": {}, "pct_of_floor": 40.0, **extra}


def test_summary_puts_falqon_next_to_the_best_other_method_and_its_earlier_run(tmp_path):
    now, before = tmp_path / "now", tmp_path / "before"
    now.mkdir()
    before.mkdir()
    kernels = repr([{"name": "(unattributed device time)", "category": "other", "ms": 0.004},
                    {"name": "_cast_transpose_kernel", "category": "quantize", "ms": 0.003}])
    rows = [_row("falqon", 0.080, kernels=kernels), _row("bf16_lora", 0.064),
            {**_row("bf16_lora", 0.060), "compile": True}, _row("halo_lora", 0.090),
            _row("falqon", 0.5, tokens=3000), _row("bf16_lora", 0.6, tokens=3000),
            {**_row("halo_lora", None, tokens=3000), "status": "error"}]
    (now / "points.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (before / "points.jsonl").write_text(json.dumps(_row("falqon", 0.101)) + "\n")
    summary = _summary_module()
    lines = summary.summary_lines(summary.read_points(now), summary.read_points(before))
    kv512 = next(line for line in lines if line.startswith("llama-3-8b.kv") and " 512 " in line)
    # best other is the compiled bf16_lora (0.060): 0.060 / 0.080 = 0.75; before 0.101 / 0.080 = 1.26
    assert "bf16_lora+compile" in kv512 and "0.060" in kv512 and " 0.75 " in kv512 and "1.26" in kv512
    assert kv512.rstrip().endswith("4.0    3.0    0.0")
    assert "falqon not the fastest: 1 of 2 cells" in lines
    assert "falqon slower than bf16_lora: 1 cells" in lines


def test_summary_says_which_file_it_cannot_read_and_exits_2(tmp_path, capsys):
    (tmp_path / "points.jsonl").write_text("{not json\n")
    assert _summary_module().main([str(tmp_path)]) == 2
    assert "points.jsonl:1" in capsys.readouterr().out
