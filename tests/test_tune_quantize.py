"""scripts/gpu/tune_quantize.py: its --cpu-smoke run checks bit-identity end to end, and its winner picking keeps a
config only where it is identical and timed on every tuned shape of its class and beats the default."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

from falqon_core.kernels import quantize_configs as qc

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts/gpu/tune_quantize.py"


def load_script():
    spec = importlib.util.spec_from_file_location("tune_quantize", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cpu_smoke_checks_every_kernel_and_writes_an_empty_table(tmp_path):
    out = tmp_path / "tune.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--cpu-smoke", "--out", str(out)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "all bit-identical" in proc.stdout
    data = json.loads(out.read_text())
    assert {r["kernel"] for r in data["results"]} == set(qc.KERNELS)
    assert all(r["default_matches_reference"] and len(r["candidates"]) == 2 for r in data["results"])
    assert all(c["identical"] and "us" not in c for r in data["results"] for c in r["candidates"])
    assert data["table"] == {k: {} for k in qc.KERNELS}


def _row(kernel, shape, times, identical=None):
    grid = qc.TUNE_GRID[kernel]
    cands = []
    for i, us in enumerate(times):
        c = {"config": asdict(grid[i]), "identical": True if identical is None else identical[i]}
        if us is not None:
            c["us"] = us
        cands.append(c)
    return {"kernel": kernel, "shape": list(shape), "class": qc.shape_class(kernel, *shape), "candidates": cands}


def test_pick_table_takes_the_best_mean_ratio_over_a_class_and_skips_incomplete_or_marginal_ones(capsys):
    tune = load_script()
    rows = [
        # le16M/mid: candidate 2 is best on one shape, candidate 1 best on average; 3 was not timed on one shape
        _row("cast_transpose", (4096, 4096), [30.0, 20.0, 15.0, 10.0]),
        _row("cast_transpose", (3000, 4096), [24.0, 15.0, 24.0, None]),
        # le4M/narrow: the best beats the default by 1% only: stays on the defaults
        _row("cast_transpose", (4096, 1024), [10.0, 9.9, 12.0]),
        # partial_amax le16M: the fastest one was not bit-identical, so it was never timed
        _row("partial_amax", (4096, 4096), [13.0, None, 11.0], identical=[True, False, True]),
    ]
    table = tune.pick_table(rows, min_gain=0.03)
    assert table["cast_transpose"] == {"le16M/mid": qc.as_overrides("cast_transpose", qc.TUNE_GRID["cast_transpose"][1])}
    assert table["partial_amax"] == {"le16M": qc.as_overrides("partial_amax", qc.TUNE_GRID["partial_amax"][2])}
    assert table["cast_tensorwise"] == {} and table["transpose_bytes"] == {}
    qc._validate(table)  # what the tuner prints is what the module accepts
