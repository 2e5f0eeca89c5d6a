"""Results files: results/<run-id>/manifest.json + points.jsonl, one JSON line per finished point.

Lines are appended, flushed and fsync'd as each point finishes, so a crash or Ctrl-C loses no
finished point; a half-written last line (killed mid-write) is ignored on load. `--resume` reads the
ids already present and skips them. Readers (report, compare, export) use only `load_run`.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from falqon_bench.errors import BenchInputError
from falqon_bench.schema import REQUIRED_KEYS, SCHEMA_VERSION

MANIFEST = "manifest.json"
POINTS = "points.jsonl"
# a finished run may be gzip'd in place (`gzip -9 points.jsonl`) to keep committed results small
POINTS_GZ = POINTS + ".gz"


class ResultsError(BenchInputError):
    """A results path that is missing, empty or corrupt; the CLI prints it and exits 2."""


@dataclass
class RunData:
    run_dir: Path
    manifest: dict[str, Any]
    points: list[dict[str, Any]]

    @property
    def run_id(self) -> str:
        return str(self.manifest.get("run_id", self.run_dir.name))


def device_slug(device_name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3': run ids and the gate's baseline file names."""
    return re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-") or "device"


def new_run_id(suite_name: str, device_name: str, now: _dt.datetime | None = None) -> str:
    """'<UTC timestamp>-<suite>-<device slug>', sortable by time."""
    now = now or _dt.datetime.now(_dt.timezone.utc)
    return f"{now:%Y%m%d-%H%M%S}-{suite_name}-{device_slug(device_name)}"


def _atomic_write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


class RunWriter:
    """Appends points to one run directory; safe to re-open with resume=True."""

    def __init__(self, run_dir: Path, manifest: dict[str, Any], resume: bool = False):
        self.run_dir = Path(run_dir)
        self.points_path = self.run_dir / POINTS
        self.manifest_path = self.run_dir / MANIFEST
        if self.points_path.exists() and not resume:
            raise ResultsError(f"{self.run_dir} already holds results; pass --resume to continue it or choose another --out")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if resume:
            _drop_partial_last_line(self.points_path)
        if resume and self.manifest_path.exists():
            old = json.loads(self.manifest_path.read_text())
            manifest = {**old, **manifest, "started_at": old.get("started_at", manifest.get("started_at"))}
            manifest["resumed"] = int(old.get("resumed", 0)) + 1
        self.manifest = {"schema": SCHEMA_VERSION, **manifest}
        self.manifest.setdefault("status", "running")
        _atomic_write_json(self.manifest_path, self.manifest)
        self.finished_ids = {p["point_id"] for p in _read_points(self.points_path) if p.get("status") == "ok"} if resume else set()

    def append(self, point: dict[str, Any]) -> None:
        """Write one finished point (ok or error) and make it durable before returning."""
        missing = [k for k in REQUIRED_KEYS if k not in point]
        if missing:
            raise ValueError(f"point lacks required keys {missing}")
        line = json.dumps(point, sort_keys=True, default=str)
        with open(self.points_path, "a") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())
        if point.get("status") == "ok":
            self.finished_ids.add(point["point_id"])

    def update_manifest(self, **fields: Any) -> None:
        self.manifest.update(fields)
        _atomic_write_json(self.manifest_path, self.manifest)


def _drop_partial_last_line(path: Path) -> None:
    """Cut a half-written last line (a kill mid-write) so the next append starts on a line of its own."""
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)
            f.flush()
            os.fsync(f.fileno())


def _read_points(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    if path.suffix == ".gz":
        import gzip

        lines = gzip.decompress(path.read_bytes()).decode().splitlines()
    else:
        lines = path.read_text().splitlines()
    points = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            points.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines):  # killed mid-write: the last line may be partial
                continue
            raise ResultsError(f"{path}:{i}: not a JSON line ({e.msg}); the file is corrupt") from None
    return points


def load_run(path: Path | str) -> RunData:
    """Read a run directory (or its points.jsonl). Raises ResultsError with a clear message."""
    path = Path(path)
    run_dir = path.parent if path.name in (POINTS, POINTS_GZ) else path
    if not run_dir.exists():
        raise ResultsError(f"{run_dir}: no such results directory")
    points_path, manifest_path = run_dir / POINTS, run_dir / MANIFEST
    if not points_path.exists() and (run_dir / POINTS_GZ).exists():
        points_path = run_dir / POINTS_GZ
    if not points_path.exists():
        raise ResultsError(f"{run_dir}: no {POINTS} (not a falqon-bench run directory)")
    return RunData(run_dir=run_dir, manifest=_read_manifest(manifest_path), points=_read_run_points(points_path))


def _read_manifest(path: Path) -> dict[str, Any]:
    """The manifest JSON at path ({} when absent); corrupt JSON is a ResultsError."""
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ResultsError(f"{path}: corrupt JSON ({e.msg} at line {e.lineno})") from None


def _read_run_points(path: Path) -> list[dict[str, Any]]:
    """The points of a points file, checked, the last record of each point_id kept (a resumed run may
    have retried an error row). Empty or foreign files are a ResultsError."""
    points = _read_points(path)
    if not points:
        raise ResultsError(f"{path}: holds no points")
    for i, p in enumerate(points, 1):
        missing = [k for k in ("method", "layer", "status") if not isinstance(p, dict) or k not in p]
        if missing:
            raise ResultsError(f"{path}: point {i} lacks keys {missing}; is this a falqon-bench results file?")
    by_id: dict[str, dict[str, Any]] = {}
    for p in points:
        by_id[p.get("point_id") or str(len(by_id))] = p
    return list(by_id.values())


def find_runs(results_root: Path | str) -> list[Path]:
    """Run directories under results_root (recursively), oldest first by run id / mtime."""
    root = Path(results_root)
    if not root.exists():
        return []
    runs = list({p.parent for pattern in (POINTS, POINTS_GZ) for p in root.rglob(pattern)})
    return sorted(runs, key=lambda p: (p.stat().st_mtime, p.name))


def latest_run(results_root: Path | str) -> Path:
    runs = find_runs(results_root)
    if not runs:
        raise ResultsError(f"no runs under {results_root}; run `falqon-bench run SUITE` first or name a run directory")
    return runs[-1]


def points_frame(runs: Iterable[RunData]):
    """All points of several runs as one pandas DataFrame, with run_id and gpu columns added."""
    import pandas as pd

    rows = []
    for run in runs:
        for p in run.points:
            rows.append({**p, "run_id": run.run_id})
    return pd.DataFrame(rows)


def export_points(run_dirs: list[Path], out_path: Path) -> Path:
    """Write the points of the runs as Parquet (.parquet) or CSV (.csv); list/dict columns become JSON text."""
    df = points_frame(load_run(r) for r in run_dirs)
    for col in df.columns:
        if df[col].map(lambda v: isinstance(v, (list, dict))).any():
            df[col] = df[col].map(lambda v: json.dumps(v) if isinstance(v, (list, dict)) else v)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if out_path.suffix == ".parquet":
        df.to_parquet(out_path, index=False)
    elif out_path.suffix == ".csv":
        df.to_csv(out_path, index=False)
    else:
        raise ResultsError(f"{out_path}: unknown export format {out_path.suffix!r}; allowed: .parquet, .csv")
    return out_path


def merge_runs(run_dirs: list[Path], out_dir: Path) -> Path:
    """Join shards of one sweep (same suite, same GPU model) into one run directory."""
    runs = [load_run(r) for r in run_dirs]
    devices = {p.get("device") for r in runs for p in r.points if p.get("status") == "ok"}
    if len(devices) > 1:
        raise ResultsError(f"refusing to merge runs from different devices {sorted(map(str, devices))}: compare them instead")
    manifest = {**runs[0].manifest, "merged_from": [r.run_id for r in runs], "run_id": Path(out_dir).name, "status": "merged"}
    writer = RunWriter(Path(out_dir), manifest)
    seen: set[str] = set()
    for r in runs:
        for p in r.points:
            if p.get("point_id") not in seen:
                seen.add(p.get("point_id"))
                writer.append(p)
    return Path(out_dir)


def load_points_file(path: Path | str) -> RunData:
    """Read a bare points file (e.g. results/baselines/<gpu>.jsonl, a gate baseline) as a run.

    The manifest comes from `<stem>.manifest.json` beside it when present; the run id is the file stem.
    Raises ResultsError when the file is missing, empty or not falqon-bench points.
    """
    path = Path(path)
    if not path.is_file():
        raise ResultsError(f"{path}: no such points file")
    manifest = _read_manifest(path.with_name(path.stem + ".manifest.json"))
    return RunData(run_dir=path, manifest={"run_id": path.stem, **manifest}, points=_read_run_points(path))


def load_results(path: Path | str) -> RunData:
    """A run directory, its points.jsonl, or a bare points .jsonl file (gate baselines), or a pytest-benchmark JSON file."""
    path = Path(path)
    if path.is_file() and path.name not in (POINTS, POINTS_GZ):
        from falqon_bench.pytest_benchmark_format import is_pytest_benchmark_json, load_pytest_benchmark

        if is_pytest_benchmark_json(path):
            return load_pytest_benchmark(path)
    if path.is_file() and path.suffix == ".jsonl" and path.name != POINTS:
        return load_points_file(path)
    return load_run(path)
