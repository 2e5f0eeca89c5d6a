"""scripts/gpu/shapes_summary.py on synthetic results: option sets of falqon side by side (suites/db-path.toml),
and a run with no cell at >= 2048 tokens (it used to raise comparing an empty class column with the targets)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from fixtures.results import H200, make_point, write_run

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu" / "shapes_summary.py"


def _summary():
    spec = importlib.util.spec_from_file_location("shapes_summary", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_option_sets_are_printed_beside_the_default_with_their_ratio(tmp_path, capsys):
    points = [
        make_point("falqon", "llama-7b.attn", 64, 4096, device=H200, gpu_samples=[0.300] * 5, floor_ms=0.26),
        make_point("falqon", "llama-7b.attn", 64, 4096, device=H200, gpu_samples=[0.330] * 5, floor_ms=0.26,
                   options={"db_path": "transpose"}),
        make_point("bf16_lora", "llama-7b.attn", 64, 4096, device=H200, gpu_samples=[0.510] * 5),
    ]
    run = write_run(tmp_path, "20260101-000000-db-path", H200, points)
    assert _summary().main([str(run)]) == 0
    out = capsys.readouterr().out
    assert "falqon option sets side by side" in out
    assert "falqon 0.300, falqon[db_path=transpose] 0.330 (1.100)" in out
    assert "llama-7b.attn  falqon 0.300 ms, bf16_lora 0.510 ms: 1.70x" in out


def test_a_run_with_only_short_sequences_prints_no_floor_classes_and_exits_0(tmp_path, capsys):
    points = [make_point(m, "llama-7b.attn", 16, 512, device=H200, gpu_samples=[ms] * 5, floor_ms=0.04)
              for m, ms in (("falqon", 0.1), ("bf16_lora", 0.11))]
    run = write_run(tmp_path, "20260101-000000-short", H200, points)
    assert _summary().main([str(run)]) == 0
    out = capsys.readouterr().out
    assert "below target" not in out and "none of 0 cells" in out
