"""Fuzz: mutated suite files and results files (random truncation, byte flips, type swaps; seeded) go
through `run --dry-run` (suite parsing), report, compare, export and merge in-process. Every case
must exit 0 or 2, never with a traceback (any exception other than SystemExit), and a command that
exits 2 must leave no output behind (no report directory, export file, merged run or temp file).

The count of cases is printed to the terminal. Reports of results that still load write their pages
and perf table without the per-GPU figures, so the whole test stays within CI's time; the reading
and checking path is the same as for a full report (test_report and test_trust render those).
"""

from __future__ import annotations

import gzip
import json
import random
import re
import shutil
from pathlib import Path

import pytest
from fixtures.results import H100, make_point, write_run
from typer.testing import CliRunner

from falqon_bench.readers import report
from falqon_bench.cli import app

SEED = 15
SUITE_CASES = 100
RESULTS_CASES = 80
SUITE = """\
name = "fuzz"
description = "tiny"
device = "cpu"

[timing]
budget_ms = 5
warmup_ms = 1
min_samples = 3
cache = "warm"

[defaults]
tokens = [16]
compile = [false]
dtype = ["bfloat16"]

[[grid]]
layers = [{ name = "t.32x48", K = 32, N = 48 }, "llama-7b.attn"]
ranks = [4, 8]
methods = ["bf16_linear", "falqon"]
options = { falqon = { topk = 2 } }
"""
TOML_VALUES = ['32', '-5', '0', '"text"', '[]', '[0]', '["a", 1]', 'true', '1.5', '{ K = 1 }', 'nan', 'inf', '[-1]',
               '[{ name = "x", K = -1, N = 2 }]', '"llama-7b"', '[true, false]', '["cold"]', '[1e9]']
JSON_VALUES = ["sixteen", -1, 0, 1.5, None, True, [], {}, [1, "a"], {"a": "b"}, float("nan"), 10**30, "", [-1.0]]


def flip_bytes(data: bytes, rng: random.Random) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        out[rng.randrange(len(out))] = rng.randrange(256)
    return bytes(out)


def truncate(data: bytes, rng: random.Random) -> bytes:
    return data[: rng.randrange(len(data))]


def swap_toml_value(text: str, rng: random.Random) -> str:
    """Replace the value of one `key = value` line by a literal of another type."""
    lines = text.splitlines()
    candidates = [i for i, line in enumerate(lines) if re.match(r"^\s*\w+\s*=", line)]
    i = rng.choice(candidates)
    key = lines[i].split("=", 1)[0]
    lines[i] = f"{key}= {rng.choice(TOML_VALUES)}"
    return "\n".join(lines) + "\n"


def mutate_suite(rng: random.Random) -> bytes:
    kind = rng.choice(["swap", "swap", "truncate", "flip", "swap+flip"])
    data = SUITE.encode()
    if "swap" in kind:
        data = swap_toml_value(data.decode(), rng).encode()
    if kind == "truncate":
        data = truncate(data, rng)
    if "flip" in kind:
        data = flip_bytes(data, rng)
    return data


def swap_json_value(line: str, rng: random.Random) -> str:
    row = json.loads(line)
    key = rng.choice(sorted(row))
    row[key] = rng.choice(JSON_VALUES)
    return json.dumps(row)


def mutate_points(data: bytes, rng: random.Random) -> bytes:
    kind = rng.choice(["swap", "swap", "truncate", "flip", "drop-key"])
    if kind == "truncate":
        return truncate(data, rng)
    if kind == "flip":
        return flip_bytes(data, rng)
    lines = data.decode().splitlines()
    i = rng.randrange(len(lines))
    if kind == "swap":
        lines[i] = swap_json_value(lines[i], rng)
    else:
        row = json.loads(lines[i])
        row.pop(rng.choice(sorted(row)))
        lines[i] = json.dumps(row)
    return ("\n".join(lines) + "\n").encode()


def mutate_manifest(data: bytes, rng: random.Random) -> bytes:
    kind = rng.choice(["truncate", "flip", "swap"])
    if kind == "truncate":
        return truncate(data, rng)
    if kind == "flip":
        return flip_bytes(data, rng)
    manifest = json.loads(data)
    manifest[rng.choice(["schema", "suite", "shard", "device", "run_id", "env"])] = rng.choice(JSON_VALUES)
    return json.dumps(manifest).encode()


def check(result, outputs: list[Path], what: str) -> int:
    """The result is exit 0 or 2 without a traceback; exit 2 leaves none of `outputs`. Returns the exit code."""
    assert result.exit_code in (0, 2), f"{what}: exit {result.exit_code}\n{result.output}"
    assert result.exception is None or isinstance(result.exception, SystemExit), f"{what}: {result.exception!r}\n{result.output}"
    assert "Traceback" not in result.output, f"{what}: {result.output}"
    if result.exit_code == 2:
        errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1, f"{what}: {result.stderr}"  # (after any warning about a dropped last line)
        left = [p for p in outputs if p.exists()]
        assert not left, f"{what}: exit 2 left {left}"
    return result.exit_code


def test_fuzzed_suite_files_exit_0_or_2_without_traceback(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rng = random.Random(SEED)
    runner = CliRunner()
    codes = []
    for case in range(SUITE_CASES):
        path = tmp_path / f"suite{case}.toml"
        path.write_bytes(mutate_suite(rng))
        result = runner.invoke(app, ["run", str(path), "--dry-run"])
        codes.append(check(result, [tmp_path / "results"], f"suite case {case}: {path.read_bytes()!r}"))
    assert codes.count(2) > SUITE_CASES // 2 and codes.count(0) > 0, "the mutations must hit both outcomes"
    with capsys.disabled():
        print(f"\nfuzz: {SUITE_CASES} mutated suite files through `run --dry-run`: {codes.count(0)} ok, {codes.count(2)} exit 2")


@pytest.fixture
def good_run(tmp_path) -> Path:
    points = [make_point(m, layer, r, gpu_samples=[1.0 + 0.01 * i for i in range(6)], kernel_ms={"gemm_bf16": 0.5, "quantize": 0.1},
                         floor_ms=0.4) for m in ("bf16_lora", "falqon") for layer in ("llama-7b.attn",) for r in (16, 64)]
    run = write_run(tmp_path / "base", "base", H100, points)
    manifest = json.loads((run / "manifest.json").read_text())
    (run / "manifest.json").write_text(json.dumps({**manifest, "shard": "1/1", "schema": 1}))
    return run


def test_fuzzed_results_files_exit_0_or_2_through_every_reader(tmp_path, good_run, capsys, monkeypatch):
    monkeypatch.setattr(report, "FIGURES", [])  # the pages and the perf table only: see the module docstring
    monkeypatch.setattr(report, "DPI", 30)
    rng = random.Random(SEED)
    runner = CliRunner()
    points, manifest = (good_run / "points.jsonl").read_bytes(), (good_run / "manifest.json").read_bytes()
    tally = {"report": [], "compare": [], "export": [], "merge": []}
    for case in range(RESULTS_CASES):
        work = tmp_path / f"case{case}"
        run = work / "run"
        run.mkdir(parents=True)
        gz = rng.random() < 0.3
        target = rng.choice(["points", "points", "points", "manifest"])
        body = mutate_points(points, rng) if target == "points" else points
        (run / ("points.jsonl.gz" if gz else "points.jsonl")).write_bytes(
            flip_bytes(gzip.compress(body), rng) if gz and rng.random() < 0.3 else gzip.compress(body) if gz else body)
        (run / "manifest.json").write_bytes(mutate_manifest(manifest, rng) if target == "manifest" else manifest)
        what = f"results case {case} ({target}, {'gz' if gz else 'plain'})"
        rep, csv, merged = work / "rep", work / "x.csv", work / "merged"
        tally["report"].append(check(runner.invoke(app, ["report", str(run), "--out", str(rep)]), [rep], what + " report"))
        tally["compare"].append(check(runner.invoke(app, ["compare", str(good_run), str(run)]), [], what + " compare"))
        tally["export"].append(check(runner.invoke(app, ["export", str(run), "--to", str(csv)]), [csv], what + " export"))
        tally["merge"].append(check(runner.invoke(app, ["merge", str(run), "--out", str(merged)]), [merged], what + " merge"))
        assert not [p for p in work.iterdir() if p.name.startswith(".")], f"{what}: a temp file was left behind"
        shutil.rmtree(work)
    for name, codes in tally.items():
        assert codes.count(2) > 0 and codes.count(0) > 0, f"{name}: the mutations must hit both outcomes"
    with capsys.disabled():
        counts = ", ".join(f"{n} {c.count(0)} ok / {c.count(2)} exit 2" for n, c in tally.items())
        print(f"\nfuzz: {RESULTS_CASES} mutated results files x 4 readers = {4 * RESULTS_CASES} cases: {counts}")
