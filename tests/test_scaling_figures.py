"""The many-GPU report parts from synthetic e2e rows: weak-scaling figure and the largest-model table.

Each appears only when its data exists (a series at two or more GPU counts; two or more models), and its
numbers come from the rows: tokens/s per GPU = tokens_per_s / world_size, efficiency = that over the rate at
the fewest GPUs, the largest model = the biggest one whose row is ok.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from falqon_bench.readers.figures.scaling import (
    FIGURE_NAME, largest_models, model_attempts, outcome, render_scaling_section, scaling_efficiency, scaling_series,
)

SHAPES = {"llama-7b": (4096, 11008, 32), "llama-13b": (5120, 13824, 40), "llama-70b": (8192, 28672, 80)}


def _row(method, world, tps=None, model="llama-7b", status="ok", error=None, error_type=None, peak_gib=40.0, mode="eager"):
    K, N, layers = SHAPES[model]
    return {"kind": "e2e", "point_id": f"{method}-{model}-{world}-{mode}", "method": method, "layer": model, "K": K, "N": N,
            "options": {"layers": layers, "world_size": world, "mode": mode}, "mode": mode, "world_size": world,
            "status": status, "error": error, "error_type": error_type, "tokens_per_s": tps if status == "ok" else None,
            "peak_mem_bytes": int(peak_gib * 2**30) if status == "ok" else None, "device": "NVIDIA H200"}  # fmt: skip


WEAK = [_row("bf16_lora", w, 10000.0 * w * (1.0 if w == 1 else 0.95)) for w in (1, 2, 4, 8)]
WEAK += [_row("falqon", w, 6000.0 * w * (1.0 if w < 8 else 0.8)) for w in (1, 2, 4, 8)]
WEAK += [_row("falqon", 8, None, status="error", error="RuntimeError: nccl", mode="compile")]  # failed: no series


def test_tokens_per_gpu_and_efficiency_come_from_the_rows():
    series = scaling_series(WEAK)
    assert set(series) == {("llama-7b", "bf16_lora", "eager", "ddp"), ("llama-7b", "falqon", "eager", "ddp")}
    falqon = series[("llama-7b", "falqon", "eager", "ddp")]
    assert falqon == {1: 6000.0, 2: 6000.0, 4: 6000.0, 8: pytest.approx(4800.0)}
    assert scaling_efficiency(falqon)[8] == pytest.approx(0.8)
    assert scaling_efficiency(series[("llama-7b", "bf16_lora", "eager", "ddp")])[8] == pytest.approx(0.95)


def test_no_scaling_figure_from_one_gpu_count_and_no_table_from_one_model(tmp_path):
    (tmp_path / FIGURE_NAME).write_bytes(b"stale")
    md, images = render_scaling_section([_row("bf16_lora", 1, 9000.0), _row("falqon", 1, 7000.0)], tmp_path, 60, str)
    assert md == "" and images == [] and not (tmp_path / FIGURE_NAME).exists()


def test_scaling_section_writes_the_figure_and_a_table_with_the_efficiency(tmp_path):
    md, images = render_scaling_section(WEAK, tmp_path, 60, str)
    assert images == [FIGURE_NAME] and (tmp_path / FIGURE_NAME).stat().st_size > 10_000
    line = next(ln for ln in md.splitlines() if ln.startswith("| llama-7b | falqon"))
    assert "6,000" in line and "4,800" in line and line.endswith("| 80% |")
    assert "Largest model" not in md


LARGEST = [
    _row("bf16_lora", 1, 9000.0, "llama-7b", peak_gib=60.0), _row("bf16_lora", 1, 5000.0, "llama-13b", peak_gib=95.0),
    _row("bf16_lora", 1, model="llama-70b", status="error", error_type="OutOfMemoryError",
         error="OutOfMemoryError: CUDA out of memory. Tried to allocate 1.75 GiB"),
    _row("bf16_lora", 8, 3000.0, "llama-70b", peak_gib=70.0),
    _row("falqon", 1, 7000.0, "llama-7b", peak_gib=30.0), _row("falqon", 1, 900.0, "llama-70b", peak_gib=120.5),
    _row("qlora_nf4", 8, model="llama-70b", status="error", error_type="unsupported", error="unsupported: fsdp: Params4bit"),
]


def test_largest_model_is_the_biggest_ok_row_per_method_and_gpu_count():
    best = {(g["method"], g["gpus"]): g["best"] and g["best"]["model"] for g in largest_models(LARGEST)}
    assert best == {("bf16_lora", 1): "llama-13b", ("bf16_lora", 8): "llama-70b", ("falqon", 1): "llama-70b",
                    ("qlora_nf4", 8): None}
    assert [a["outcome"] for a in model_attempts(LARGEST) if a["method"] == "bf16_lora" and a["gpus"] == 1] == ["ok", "ok", "oom"]
    assert outcome(LARGEST[-1]) == "unsupported"


def test_largest_model_table_shows_peak_memory_and_every_attempt(tmp_path):
    md, _ = render_scaling_section(LARGEST, tmp_path, 60, str)
    lines = {ln.split("|")[1].strip() + "@" + ln.split("|")[2].strip(): ln for ln in md.splitlines() if ln.startswith("| ") and "---" not in ln}
    assert "| llama-70b | 80 | 120.5 |" in lines["falqon@1"]
    assert "| llama-13b | 40 | 95.0 |" in lines["bf16_lora@1"] and "llama-70b: oom" in lines["bf16_lora@1"]
    assert "| none |" in lines["qlora_nf4@8"] and "llama-70b: unsupported" in lines["qlora_nf4@8"]


def test_report_of_runs_at_several_gpu_counts_shows_the_scaling_figure(tmp_path):
    from falqon_bench.suites.e2e_suite import expand_e2e_suite
    from falqon_bench.readers.report import render_report
    from falqon_bench.data.store import RunWriter
    from falqon_bench.suites.suite import load_suite
    from falqon_bench.data.schema import new_row

    suite = tmp_path / "s.toml"
    suite.write_text('kind = "e2e"\nname = "weak"\ndevice = "cpu"\nmodel = "tiny-llama"\nseq_len = 32\nbatch = 2\n'
                     'steps = 3\nrank = 16\nlr = 1e-2\nmethods = ["bf16_lora", "falqon"]\n')
    runs = []
    for world in (1, 2):
        writer = RunWriter(tmp_path / f"run{world}", {"suite": "weak", "kind": "e2e", "device": "CPU"})
        for point in expand_e2e_suite(load_suite(str(suite)), world_size=world):
            row = {**new_row(point, "CPU"), "kind": "e2e", "mode": "eager", "world_size": world, "status": "ok",
                   "tokens_per_s": 1000.0 * world, "wall_ms": 64.0, "loss_per_step": [5.0, 4.9, 4.8]}
            writer.append(json.loads(json.dumps(row)))
        runs.append(writer.run_dir)
    out = render_report(runs, tmp_path / "report")
    assert (out / FIGURE_NAME).exists() and "Scaling over GPUs" in (out / "report.md").read_text()
    assert (out / "report.html").read_text().count("data:image/png;base64,") == 2  # e2e.png and scaling.png
