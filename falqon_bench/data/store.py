"""Results files: results/<run-id>/manifest.json + points.jsonl, one JSON line per finished point.

Lines are appended, flushed and fsync'd as each point finishes, so a crash or Ctrl-C loses no
finished point; a half-written last line (killed mid-write) is dropped on load with a warning naming
its line; every other problem (corrupt or truncated file, plain or gzip; a row of the wrong type or
schema) is a ResultsError naming file, line and key. `--resume` reads the
ids already present and skips them. Readers (report, compare, export) use only `load_run`.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from falqon_bench.data.errors import BenchInputError
from falqon_bench.data.schema import REQUIRED_KEYS, SCHEMA_VERSION, row_problem

MANIFEST = "manifest.json"
POINTS = "points.jsonl"
# a finished run may be gzip'd in place (`gzip -9 points.jsonl`) to keep committed results small
POINTS_GZ = POINTS + ".gz"


# manifest["status"] of every run, whichever runner wrote it: running until the last point is written,
# then complete; interrupted after Ctrl-C (`--resume` completes it); merged / merged-partial for the union
# of shards (merge_runs). RunWriter refuses any other word.
RUN_STATUSES = ("running", "complete", "interrupted", "merged", "merged-partial")


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
    """'<UTC timestamp>-<suite>-<device slug>', sortable by time; one path component whatever the suite's name.

    A suite name is free text (a '/' or '../' in it would put the run outside results/), so characters other
    than letters, digits, '.', '_' and '-' become '-'; the manifest keeps the name as written.
    """
    now = now or _dt.datetime.now(_dt.timezone.utc)
    suite_part = re.sub(r"[^A-Za-z0-9._-]+", "-", suite_name)
    return f"{now:%Y%m%d-%H%M%S}-{suite_part}-{device_slug(device_name)}"


def utc_now() -> str:
    """The current UTC time, ISO 8601 to the second: every timestamp of a manifest."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def new_manifest(run_id: str, suite: str, device: str, env: dict[str, Any], n_points: int, **extra: Any) -> dict[str, Any]:
    """The manifest every run starts with (layer suites, e2e under torchrun, kernel micro-benchmarks): run id,
    suite, device name, environment (envinfo.collect_env), planned points, start time, status 'running',
    then the runner's own `extra` fields. RunWriter adds `schema`."""
    return {"run_id": run_id, "suite": suite, "device": device, "env": env, "n_points": n_points,
            "started_at": utc_now(), "status": "running", **extra}


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
        if self.manifest["status"] not in RUN_STATUSES:
            raise ValueError(f"manifest status {self.manifest['status']!r}; allowed: {', '.join(RUN_STATUSES)}")
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
        if "status" in fields and fields["status"] not in RUN_STATUSES:
            raise ValueError(f"manifest status {fields['status']!r}; allowed: {', '.join(RUN_STATUSES)}")
        self.manifest.update(fields)
        _atomic_write_json(self.manifest_path, self.manifest)

    def finish(self, **fields: Any) -> None:
        """Mark the run complete (every planned point written), with finished_at and the runner's `fields`."""
        self.update_manifest(status="complete", finished_at=utc_now(), **fields)


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


def warn(message: str) -> None:
    """A reader's warning (a dropped partial line): one line on stderr, never silence."""
    print(f"warning: {message}", file=sys.stderr)


def _read_text(path: Path) -> str:
    """The whole text of a plain or gzip'd points file; an unreadable, corrupt or truncated file is a ResultsError."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ResultsError(f"{path}: cannot be read ({e.strerror or e})") from None
    if path.suffix == ".gz":
        import gzip
        import zlib

        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as e:
            what = "truncated (the gzip stream ends early)" if isinstance(e, EOFError) else f"not a valid gzip file ({e})"
            raise ResultsError(f"{path}: {what}; the file is corrupt. Re-copy it, or restore it from git or the run's host") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ResultsError(f"{path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); the file is corrupt") from None


def _read_point_lines(path: Path) -> list[tuple[int, Any]]:
    """(line number, parsed JSON) of every non-empty line. A corrupt line is a ResultsError naming the line,
    except the last one: a run killed mid-write leaves a partial last line, which is dropped with a warning."""
    if not path.exists():
        return []
    lines = _read_text(path).splitlines()
    last = max((i for i, line in enumerate(lines, 1) if line.strip()), default=0)
    parsed = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            parsed.append((i, json.loads(line)))
        except (json.JSONDecodeError, RecursionError) as e:
            msg = getattr(e, "msg", "too deeply nested")
            if i == last:
                warn(f"{path}:{i}: dropped a partial or corrupt last line ({msg}); a run killed mid-write leaves one")
                continue
            raise ResultsError(f"{path}:{i}: not a JSON line ({msg}); the file is corrupt") from None
    return parsed


def _read_points(path: Path) -> list[dict[str, Any]]:
    return [p for _, p in _read_point_lines(path) if isinstance(p, dict)]


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
    manifest = _read_manifest(manifest_path)
    return RunData(run_dir=run_dir, manifest=manifest, points=_kind_of_legacy_rows(_read_run_points(points_path), manifest))


def _kind_of_legacy_rows(points: list[dict[str, Any]], manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows of an e2e run that lack `kind` (error rows the runner wrote for a timed-out or crashed point before it
    stamped them with their kind) get the run's kind and their mode, so readers do not take them for layer points."""
    kind = (manifest.get("suite_spec") or {}).get("kind")
    if kind != "e2e":
        return points
    return [p if "kind" in p else {**p, "kind": kind, "mode": (p.get("options") or {}).get("mode")} for p in points]


def _read_manifest(path: Path) -> dict[str, Any]:
    """The manifest JSON at path ({} when absent); corrupt JSON, a non-object or another schema is a ResultsError."""
    if not path.exists():
        return {}
    try:
        manifest = json.loads(path.read_bytes().decode("utf-8"))
    except json.JSONDecodeError as e:
        raise ResultsError(f"{path}:{e.lineno}: corrupt JSON ({e.msg}); the manifest is corrupt") from None
    except (OSError, UnicodeDecodeError, RecursionError) as e:
        raise ResultsError(f"{path}: cannot be read as UTF-8 JSON ({e}); the manifest is corrupt") from None
    if not isinstance(manifest, dict):
        raise ResultsError(f"{path}: a JSON {type(manifest).__name__}, not an object; the manifest is corrupt")
    if "schema" in manifest and manifest["schema"] != SCHEMA_VERSION:
        raise ResultsError(f"{path}: has `schema` = {manifest['schema']!r}: results of another schema version; "
                           f"this falqon-bench reads version {SCHEMA_VERSION}")
    return manifest


def _read_run_points(path: Path) -> list[dict[str, Any]]:
    """The points of a points file, checked, the last record of each point_id kept (a resumed run may
    have retried an error row). Empty or foreign files are a ResultsError."""
    lines = _read_point_lines(path)
    if not lines:
        raise ResultsError(f"{path}: holds no points")
    for i, (line, p) in enumerate(lines, 1):
        problem = row_problem(p)
        if problem:
            raise ResultsError(f"{path}: point {i} {problem} (line {line}). Is this a falqon-bench results file of schema {SCHEMA_VERSION}?")
    points = [p for _, p in lines]
    by_id: dict[str, dict[str, Any]] = {}
    for p in points:
        by_id[p.get("point_id") or str(len(by_id))] = p
    return list(by_id.values())


def require_shape_keys(run: RunData) -> None:
    """ResultsError (exit 2) for a point whose K, N, rank or tokens is not an integer, or whose `compile` is
    not true/false (schema.row_problem with shape_required): the report computes with these, so null or text
    there is a damaged or forged file, not a value to show. Points are counted from 1."""
    for i, p in enumerate(run.points, 1):
        problem = row_problem(p, shape_required=True)
        if problem:
            raise ResultsError(f"{run.run_dir / POINTS}: point {i} {problem}. The report computes with K, N, rank, "
                               "tokens and compile; the file was damaged or not written by falqon-bench; nothing was rendered.")


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
            df[col] = df[col].map(lambda v: json.dumps(v, ensure_ascii=False) if isinstance(v, (list, dict)) else v)
    out_path = Path(out_path)
    if out_path.suffix not in (".parquet", ".csv"):
        raise ResultsError(f"{out_path}: unknown export format {out_path.suffix!r}; allowed: .parquet, .csv")
    for col in df.columns[df.dtypes == object]:  # a key holding text in one row and a number in another
        kinds = {type(v) for v in df[col] if v is not None and v == v}
        if len(kinds) > 1:
            df[col] = df[col].map(lambda v: v if v is None or v != v else str(v))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp")  # the file appears whole or not at all
    try:
        if out_path.suffix == ".parquet":
            df.to_parquet(tmp, index=False)
        else:
            df.to_csv(tmp, index=False)
        os.replace(tmp, out_path)
    except (OSError, ValueError, TypeError, NotImplementedError) as e:
        raise ResultsError(f"{out_path}: cannot be written ({e})") from None
    finally:
        tmp.unlink(missing_ok=True)
    return out_path


def _shard_of(run: RunData) -> tuple[int, int] | None:
    """(i, n) from a run manifest's `shard` ('i/n'), or None when the run was not a shard."""
    text = run.manifest.get("shard")
    if not isinstance(text, str) or "/" not in text:
        return None
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        return None
    return (i, n) if 1 <= i <= n else None


def check_shards(runs: list[RunData], allow_partial: bool = False) -> dict[str, Any]:
    """That `runs` are shards of one suite on one device and, unless allow_partial, all n of them.

    Returns what the merged manifest records: suite, device, shard count n, the shard indices present
    and the missing ones. Raises ResultsError naming the offending run directories.
    """
    suites = {str(r.manifest.get("suite")) for r in runs}
    if len(suites) > 1:
        listed = "; ".join(f"{r.run_dir}: {r.manifest.get('suite')!r}" for r in runs)
        raise ResultsError(f"refusing to merge shards of different suites ({listed}): merge the shards of one suite run")
    devices = {str(p.get("device")) for r in runs for p in r.points if p.get("status") == "ok" and p.get("device")}
    devices |= {str(r.manifest["device"]) for r in runs if isinstance(r.manifest.get("device"), str)}
    if len(devices) > 1:
        raise ResultsError(f"refusing to merge runs from different devices {sorted(devices)}: compare them instead")
    shards = {r.run_dir: _shard_of(r) for r in runs}
    not_shards = [str(d) for d, s in shards.items() if s is None]
    counts = sorted({s[1] for s in shards.values() if s})
    if len(counts) > 1:
        raise ResultsError(f"refusing to merge shards of different splits (n = {', '.join(map(str, counts))}): "
                           "merge the shards of one --shard i/n run")
    n = counts[0] if counts else None
    present = sorted(s[0] for s in shards.values() if s)
    twice = sorted({i for i in present if present.count(i) > 1})
    if twice:
        raise ResultsError(f"shard(s) {', '.join(map(str, twice))} of {n} given more than once: give each shard's run directory once")
    missing = [i for i in range(1, (n or 0) + 1) if i not in present]
    if not allow_partial:
        if not_shards:
            raise ResultsError(f"{', '.join(not_shards)}: not a shard (the manifest has no `shard` i/n); merge joins the "
                               "runs of `falqon-bench run --shard i/n`; pass --allow-partial to join them anyway")
        if missing:
            raise ResultsError(f"incomplete merge: shard(s) {', '.join(map(str, missing))} of {n} are missing "
                               f"(given: {', '.join(map(str, present))}); add their run directories, or pass --allow-partial "
                               "to write a merged run that records them as missing")
    return {"suite": next(iter(suites)), "device": next(iter(devices), None), "shards": n,
            "shards_merged": present, "shards_missing": missing}


def merge_runs(run_dirs: list[Path], out_dir: Path, allow_partial: bool = False) -> Path:
    """Join shards of one sweep (same suite, same GPU model, all n shards) into one new run directory.

    The directory appears whole or not at all (written beside it, then renamed); its manifest describes
    the merged run: n_points it holds, no shard i/n, which shards it joined and which are missing.
    """
    import shutil
    import tempfile

    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ResultsError(f"{out_dir} already exists and is not empty: merge writes a new run directory; choose another --out")
    runs = [load_run(r) for r in run_dirs]
    info = check_shards(runs, allow_partial)
    points: dict[str, dict[str, Any]] = {}
    for r in runs:
        for p in r.points:
            points.setdefault(str(p.get("point_id")), p)
    manifest = {
        **runs[0].manifest,
        "run_id": out_dir.name,
        "merged_from": [r.run_id for r in runs],
        "shard": None,
        "shards": info["shards"],
        "shards_merged": info["shards_merged"],
        "shards_missing": info["shards_missing"],
        "n_points": len(points),
        "n_errors": sum(p.get("status") != "ok" for p in points.values()),
        "status": "merged-partial" if info["shards_missing"] or allow_partial and not info["shards"] else "merged",
    }
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.merging-", dir=out_dir.parent))
    try:
        writer = RunWriter(tmp, manifest)
        for p in points.values():
            writer.append(p)
        if out_dir.exists():
            out_dir.rmdir()
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


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
        from falqon_bench.data.pytest_benchmark_format import is_pytest_benchmark_json, load_pytest_benchmark

        if is_pytest_benchmark_json(path):
            return load_pytest_benchmark(path)
    if path.is_file() and path.suffix == ".jsonl" and path.name != POINTS:
        return load_points_file(path)
    if path.is_file() and path.name not in (POINTS, POINTS_GZ):
        raise ResultsError(
            f"{path}: a file that is neither a points .jsonl nor a pytest-benchmark JSON (an object with "
            "`benchmarks` and `machine_info`); give a run directory, a points .jsonl or a --benchmark-json file"
        )
    return load_run(path)
