"""Runs as pytest-benchmark JSON and back: one benchmark per point, so that `pytest-benchmark compare` and CI
dashboards (github-action-benchmark, `tool: 'pytest'`) read falqon-bench runs, and `falqon-bench compare`
reads what `pytest benchmarks --benchmark-json` wrote.

The layout is pytest-benchmark's own (`--benchmark-json`, unchanged since its 3.1): {machine_info,
commit_info, datetime, version, benchmarks: [{group, name, fullname, params, param, extra_info, options,
stats}]}, stats = {min, max, mean, stddev, rounds, median, iqr, q1, q3, iqr_outliers, stddev_outliers,
outliers, ld15iqr, hd15iqr, ops, total, data, iterations} in seconds per step (ops: steps per second).
A point's stats are its gpu_samples_ms (CUDA-graph replay), or its wall_samples_ms on a run without GPU
time, converted to seconds. extra_info carries the point's identity and both sample lists in ms: the way
back reads those (stats.data only when they are absent), so a round trip keeps every sample bit for bit.
Points that errored have no samples and no place in `benchmarks`: they go under the top-level key
"falqon_bench" (which pytest-benchmark and the dashboards ignore) with the run's manifest, so that the
gate's "failed" verdicts survive the round trip too.

Names match the tests in benchmarks/ (`benchmarks/test_suite_points.py::test_point[<id>]`), so an export of
a suite run and a pytest run of the same suite line up by name in `pytest-benchmark compare` and in a
dashboard's history. Reads and writes files only (no torch).
"""

from __future__ import annotations

import json
import math
import statistics
from bisect import bisect_left, bisect_right
from pathlib import Path
from typing import Any

from falqon_bench.data.schema import IDENTITY_KEYS, REQUIRED_KEYS, SCHEMA_VERSION, option_text
from falqon_bench.data.store import RunData, ResultsError, load_results

TEST_FILE = "benchmarks/test_suite_points.py"
TEST_FUNCTION = "test_point"
TOP_KEY = "falqon_bench"  # our own top-level key: manifest, failed points
# pytest-benchmark's JSON layout version written when pytest-benchmark itself is not installed
LAYOUT_VERSION = "5.1.0"
MS_PER_S = 1e3

# what a benchmark's extra_info holds: enough to rebuild the point for the gate and the report's tables
EXTRA_INFO_KEYS = tuple(dict.fromkeys((*IDENTITY_KEYS, "point_id", "per_block", *REQUIRED_KEYS, "timed_by")))


def benchmark_id(point: dict[str, Any]) -> str:
    """'bf16_lora-llama-7b.attn-r16-t4096-eager': the test id of a point (pytest parametrize id, dashboard name).

    Cache, dtype and options appear only when they differ from the defaults (warm, bfloat16, none), so
    the ids of the gate suite stay short while two distinct points never share an id.
    """
    parts = [str(point["method"]), str(point["layer"]), f"r{point['rank']}", f"t{point['tokens']}",
             "compile" if point.get("compile") else "eager"]
    if point.get("cache") not in (None, "warm"):
        parts.append(str(point["cache"]))
    if point.get("dtype") not in (None, "bfloat16"):
        parts.append(str(point["dtype"]))
    if point.get("options"):  # the point's method options, flat: 'flush_every=1,rounding=stochastic'
        parts.append(option_text(point["options"]))
    return "-".join(parts)


def benchmark_group(point: dict[str, Any]) -> str:
    """'llama-7b.attn r16 t4096': methods at one shape share a group, so pytest-benchmark tables them side by side."""
    return f"{point['layer']} r{point['rank']} t{point['tokens']}"


def timed_samples_ms(point: dict[str, Any]) -> tuple[str, list[float]]:
    """('gpu_samples_ms', samples) when the point has GPU time, else ('wall_samples_ms', samples): what its stats are."""
    for key in ("gpu_samples_ms", "wall_samples_ms"):
        values = [float(v) for v in point.get(key) or [] if v is not None and math.isfinite(float(v))]
        if values:
            return key, values
    return "", []


def sample_stats(samples_s: list[float]) -> dict[str, Any]:
    """pytest-benchmark's Stats fields of samples in seconds (its definitions: quartiles by Tukey's method 2/3,
    Tukey 1.5 IQR whiskers, sample stddev, ops = rounds / total)."""
    data = list(samples_s)
    xs = sorted(data)
    n = len(xs)
    if n == 0:
        raise ValueError("sample_stats needs at least one sample")
    mean = statistics.mean(xs)
    stddev = statistics.stdev(xs) if n > 1 else 0
    q1, q3 = _quartiles(xs)
    iqr = q3 - q1
    if n == 1:
        ld15iqr = hd15iqr = xs[0]
    else:
        ld15iqr = xs[bisect_left(xs, q1 - 1.5 * iqr)]
        pos = bisect_right(xs, q3 + 1.5 * iqr)
        hd15iqr = xs[-1] if pos == n else xs[pos]
    iqr_outliers = sum(x < q1 - 1.5 * iqr or x > q3 + 1.5 * iqr for x in xs)
    stddev_outliers = sum(x < mean - stddev or x > mean + stddev for x in xs)
    total = sum(data)
    return {
        "min": xs[0], "max": xs[-1], "mean": mean, "stddev": stddev, "rounds": n, "median": statistics.median(xs),
        "iqr": iqr, "q1": q1, "q3": q3, "iqr_outliers": iqr_outliers, "stddev_outliers": stddev_outliers,
        "outliers": f"{stddev_outliers};{iqr_outliers}", "ld15iqr": ld15iqr, "hd15iqr": hd15iqr,
        "ops": n / total if total else 0, "total": total, "data": data, "iterations": 1,
    }


def _quartiles(xs: list[float]) -> tuple[float, float]:
    """(q1, q3) of sorted xs as pytest-benchmark computes them (Wikipedia's quartile methods 3 and 2)."""
    n = len(xs)
    if n == 1:
        return xs[0], xs[0]
    if n % 2 == 0:
        return statistics.median(xs[: n // 2]), statistics.median(xs[n // 2:])
    m, r = n // 4, n % 4
    if r == 1:
        return 0.25 * xs[m - 1] + 0.75 * xs[m], 0.75 * xs[3 * m] + 0.25 * xs[3 * m + 1]
    return 0.75 * xs[m] + 0.25 * xs[m + 1], 0.25 * xs[3 * m + 1] + 0.75 * xs[3 * m + 2]


def point_extra_info(point: dict[str, Any]) -> dict[str, Any]:
    """The extra_info of a point's benchmark: identity, device, status, medians and every sample (ms)."""
    info = {k: point.get(k) for k in EXTRA_INFO_KEYS}
    info["timed_by"] = timed_samples_ms(point)[0] or None
    return info


def point_benchmark(point: dict[str, Any], options: dict[str, Any] | None = None) -> dict[str, Any]:
    """One pytest-benchmark benchmark entry of an ok point with samples (stats in seconds)."""
    key, samples_ms = timed_samples_ms(point)
    if not samples_ms:
        raise ValueError(f"point {point.get('point_id')} has no timing samples")
    bid = benchmark_id(point)
    identity = {k: point.get(k) for k in (*IDENTITY_KEYS, "point_id", "per_block")}
    return {
        "group": benchmark_group(point),
        "name": f"{TEST_FUNCTION}[{bid}]",
        "fullname": f"{TEST_FILE}::{TEST_FUNCTION}[{bid}]",
        "params": {"point": identity},
        "param": bid,
        "extra_info": point_extra_info(point),
        "options": options or {"disable_gc": False, "timer": key, "min_rounds": len(samples_ms), "max_time": None,
                               "min_time": None, "warmup": False},
        "stats": sample_stats([v / MS_PER_S for v in samples_ms]),
    }


def machine_info(manifest: dict[str, Any]) -> dict[str, Any]:
    """pytest-benchmark's machine_info keys from a run manifest's env, plus the GPU and the full env record."""
    env = manifest.get("env") or {}
    versions = env.get("versions") or {}
    platform_text = str(env.get("platform") or "")
    return {
        "node": env.get("hostname"),
        "processor": env.get("cpu"),
        "machine": next((m for m in ("x86_64", "aarch64", "arm64") if m in platform_text), ""),
        "python_compiler": "",
        "python_implementation": "CPython",
        "python_implementation_version": versions.get("python"),
        "python_version": versions.get("python"),
        "python_build": [],
        "release": "",
        "system": platform_text.split("-")[0] if platform_text else "",
        "cpu": {"brand_raw": env.get("cpu"), "count": env.get("cpu_count")},
        "gpu": env.get("device") or manifest.get("device"),
        "falqon_bench_env": env,
    }


def commit_info(manifest: dict[str, Any]) -> dict[str, Any]:
    """pytest-benchmark's commit_info from the manifest's git record (sha and dirty flag)."""
    git = (manifest.get("env") or {}).get("git") or {}
    return {"id": git.get("sha") or "unknown", "time": None, "author_time": None, "dirty": bool(git.get("dirty")),
            "project": "falqon-bench", "branch": "(unknown)"}


def _layout_version() -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version("pytest-benchmark")
    except importlib.metadata.PackageNotFoundError:
        return LAYOUT_VERSION


def run_to_pytest_benchmark(run: RunData) -> dict[str, Any]:
    """A run as one pytest-benchmark JSON document: ok points with samples as benchmarks, the rest under TOP_KEY."""
    benchmarks, not_benchmarks = [], []
    for p in run.points:
        if p.get("status") == "ok" and timed_samples_ms(p)[1]:
            benchmarks.append(point_benchmark(p))
        else:
            not_benchmarks.append({k: p.get(k) for k in (*EXTRA_INFO_KEYS, "error_type")})
    m = run.manifest
    return {
        "machine_info": machine_info(m),
        "commit_info": commit_info(m),
        "benchmarks": benchmarks,
        "datetime": m.get("finished_at") or m.get("started_at") or "",
        "version": _layout_version(),
        TOP_KEY: {"schema": SCHEMA_VERSION, "run_id": run.run_id, "manifest": m, "other_points": not_benchmarks},
    }


def export_pytest_benchmark(run_path: Path | str, out_path: Path | str) -> Path:
    """Write one run (directory, points.jsonl(.gz) or bare .jsonl) as a pytest-benchmark JSON file."""
    doc = run_to_pytest_benchmark(load_results(run_path))
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(doc, indent=2, sort_keys=True, default=str) + "\n")
    return out_path


# ---------------------------------------------------------------- the way back


def is_pytest_benchmark_json(path: Path | str) -> bool:
    """Whether path is a file holding a pytest-benchmark JSON document (decided by content, not name)."""
    path = Path(path)
    if not path.is_file():
        return False
    try:
        doc = json.loads(path.read_bytes())
    except ValueError:  # not JSON (a points .jsonl has one object per line, a .gz is binary): one JSON object per line
        return False
    return isinstance(doc, dict) and isinstance(doc.get("benchmarks"), list) and "machine_info" in doc


def load_pytest_benchmark(path: Path | str) -> RunData:
    """A pytest-benchmark JSON file (from `export --format pytest-benchmark` or `pytest benchmarks
    --benchmark-json`) as a run: one point per benchmark from its extra_info, plus the failed points.

    Raises ResultsError naming the file and benchmark when a benchmark carries no point identity.
    """
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ResultsError(f"{path}: corrupt JSON ({e.msg} at line {e.lineno})") from None
    ours = doc.get(TOP_KEY) or {}
    points = [_benchmark_point(path, i, b) for i, b in enumerate(doc.get("benchmarks") or [], 1)]
    points += [{**{k: None for k in REQUIRED_KEYS}, **p} for p in ours.get("other_points") or []]
    if not points:
        raise ResultsError(f"{path}: holds no benchmarks")
    manifest = dict(ours.get("manifest") or {})
    manifest.setdefault("env", (doc.get("machine_info") or {}).get("falqon_bench_env") or {})
    manifest.setdefault("run_id", ours.get("run_id") or path.stem)
    manifest["source_format"] = "pytest-benchmark"
    return RunData(run_dir=path, manifest=manifest, points=points)


def _benchmark_point(path: Path, i: int, bench: Any) -> dict[str, Any]:
    """Rebuild a results row from one benchmark: extra_info, samples in ms (stats.data in s as a fallback)."""
    info = bench.get("extra_info") if isinstance(bench, dict) else None
    missing = [k for k in ("method", "layer", "rank", "tokens", "device") if not isinstance(info, dict) or k not in info]
    if missing:
        name = bench.get("fullname") if isinstance(bench, dict) else None
        raise ResultsError(
            f"{path}: benchmark {i} ({name!r}) has no falqon-bench point identity in extra_info (lacks {missing}); "
            f"falqon-bench reads pytest-benchmark files written by `pytest benchmarks` or "
            f"`falqon-bench export --format pytest-benchmark`"
        )
    point = {**{k: None for k in REQUIRED_KEYS}, **info}
    point.setdefault("status", "ok")
    if not timed_samples_ms(point)[1]:
        data = (bench.get("stats") or {}).get("data") or []
        point[info.get("timed_by") or "gpu_samples_ms"] = [float(v) * MS_PER_S for v in data]
    return point


# ---------------------------------------------------------------- pytest-benchmark's timer, fed measured samples


class SampleReplay:
    """Hands samples that were already measured to pytest-benchmark, so that its stats are exactly those samples.

    Give it as the timer (`@pytest.mark.benchmark(timer=replay)`) and give `replay.next_sample` as the target of
    `benchmark.pedantic(..., rounds=len(samples))`: pytest-benchmark reads the timer before and after each call
    of the target; the target arms the next sample and the reading after it returns that sample, the one
    before returns 0, so each round's duration (end - start) is one sample in seconds, bit for bit.
    """

    __name__ = "replayed_samples"  # how pytest-benchmark names the timer in a benchmark's options

    def __init__(self) -> None:
        self._samples: list[float] = []
        self._armed: float | None = None

    def load(self, samples_s: list[float]) -> int:
        """Queue one point's samples (seconds); returns how many rounds to ask pytest-benchmark for."""
        self._samples, self._armed = [float(s) for s in samples_s], None
        return len(self._samples)

    def next_sample(self) -> None:
        if not self._samples:
            raise RuntimeError("SampleReplay: more rounds than loaded samples")
        self._armed = self._samples.pop(0)

    def __call__(self) -> float:
        value, self._armed = (self._armed if self._armed is not None else 0.0), None
        return value
