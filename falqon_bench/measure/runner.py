"""Run a suite: expand it, open the results files, measure every point (isolated per method), summarize.

Isolation (docs/architecture.md, "The path of a point"): each method's points run in a worker subprocess
(falqon_bench.measure.worker) with a per-point timeout; a hung point is killed, a crashed worker (OOM-kill, segfault, illegal memory access)
costs only its current point, and a fresh worker takes the remaining points. Every finished point is
appended and fsync'd at once, so Ctrl-C (manifest marked "interrupted", exit 130) or a SIGKILL loses no
finished point, and `--resume` completes the run.
"""

from __future__ import annotations

import collections
import datetime as _dt
import itertools
import json
import os
import queue
import signal
import subprocess
import sys
import threading
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from falqon_bench.measure import envinfo
from falqon_bench.data.errors import BenchInputError
from falqon_bench.data.store import POINTS, RunWriter, find_runs, load_run, new_manifest, new_run_id
from falqon_bench.suites.suite import Suite, kind_hook
from falqon_bench.suites.sweep import Point, expand_suite, filter_methods, filter_ranks, filter_variant, shard_points
from falqon_bench.data.schema import error_row, method_label
from falqon_bench.measure.worker import MeasureContext, measure_point

CPU_WARNING = "CPU run: timings are wall-clock on the CPU and say nothing about GPU speed; run on a CUDA GPU for gpu_ms"
DEFAULT_POINT_TIMEOUT_S = 300.0
STDERR_TAIL_LINES = 20


@dataclass
class RunOptions:
    """Everything `falqon-bench run` can change about a suite run. Times in ms / s as named."""

    out_dir: Path | None = None
    resume: bool = False
    methods: list[str] | None = None
    ranks: list[int] | None = None
    variant: str = "all"
    shard: tuple[int, int] | None = None
    isolate: bool = True
    point_timeout_s: float = DEFAULT_POINT_TIMEOUT_S
    lock_clocks: bool = False
    dry_run: bool = False
    budget_ms: float | None = None
    warmup_ms: float | None = None
    min_samples: int | None = None
    results_root: Path = Path("results")


@dataclass
class RunOutcome:
    """What a run did: where its results are, and how it ended ('complete', 'interrupted', 'dry-run')."""

    status: str
    points: list[Point]
    run_dir: Path | None = None
    rows: list[dict[str, Any]] = field(default_factory=list)
    skipped: int = 0


def resolve_device(suite_device: str) -> torch.device:
    """'auto' -> cuda when torch sees a GPU, else cpu; 'cuda' without a GPU is an input error."""
    if suite_device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if suite_device == "cuda" and not torch.cuda.is_available():
        raise BenchInputError(
            f'the suite sets device = "cuda" but torch {torch.__version__} sees no CUDA GPU here: its timings need a GPU; '
            f'run it on a GPU machine, or check the run path on this CPU with `falqon-bench run smoke` '
            f'(device = "auto"), or set device = "auto" or "cpu" in the suite'
        )
    return torch.device(suite_device)


def plan_points(suite: Suite, options: RunOptions) -> list[Point]:
    """The suite's points after --methods and --shard, in run order."""
    points = expand_suite(suite)
    if options.methods:
        points = filter_methods(points, options.methods)
    if options.ranks:
        points = filter_ranks(points, options.ranks)
    points = filter_variant(points, options.variant)
    if options.shard:
        points = shard_points(points, *options.shard)
    return points


def measure_context(suite: Suite, options: RunOptions, device: torch.device, peaks: dict | None) -> MeasureContext:
    t = suite.timing
    return MeasureContext(
        device=str(device),
        budget_ms=options.budget_ms if options.budget_ms is not None else t.budget_ms,
        warmup_ms=options.warmup_ms if options.warmup_ms is not None else t.warmup_ms,
        min_samples=options.min_samples if options.min_samples is not None else t.min_samples,
        profile=t.profile,
        peaks=peaks,
    )


def precheck(point: Point, device: torch.device) -> str | None:
    """Why a point cannot run here without starting a worker (method unavailable / no compile support), or None.

    A kind whose points are not registered methods (kernels) checks its points itself (suite.kind_hook)."""
    own_check = _own_precheck(point)
    if own_check is not None:
        return own_check(point, device)
    from falqon_core.methods import MethodUnavailable, get_method

    from falqon_bench.measure.fast_stacks import is_stack_baseline

    if is_stack_baseline(point["method"]):  # Unsloth: its e2e point itself records why it cannot run (fast_stacks)
        return None
    try:
        get_method(point["method"]).check_runnable(device, compile=bool(point.get("compile")))
    except MethodUnavailable as e:
        return str(e)
    return None


def _own_precheck(point: Point):
    """The point's kind's own precheck (a kind of non-method points), or None for method points."""
    return kind_hook(point.get("kind", "layers"), "precheck", "point")


def _worker_group(point: Point) -> str:
    """Points that share a worker process: a method's (layers, e2e, accuracy), or the kind's own group (one kernel's)."""
    return point.get("worker_group") or point["method"]


def measure_peaks_safely(device: torch.device) -> tuple[dict | None, str | None]:
    """falqon_bench.measure.roofline.measure_peaks on GPU, once per run; (None, why) on CPU or when it fails."""
    if device.type != "cuda":
        return None, None
    try:
        from falqon_bench.measure.roofline import measure_peaks

        return measure_peaks(device), None
    except Exception as e:
        return None, f"{type(e).__name__}: {e}"


# ---------------------------------------------------------------- executors


def _error_row(point: Point, label: str, error_type: str, error: str) -> dict[str, Any]:
    """schema.error_row plus what the point's kind needs its rows to carry (`identify_<kind>_row`, e.g. e2e's kind
    and mode): a timed-out or crashed e2e or accuracy point then reads as one of its kind, not as a layer point."""
    identify = kind_hook(point.get("kind", "layers"), "identify", "row")
    return {**error_row(point, label, error_type, error), **(identify(point) if identify else {})}


def run_in_process(points: list[Point], ctx: MeasureContext) -> Iterator[dict[str, Any]]:
    """--no-isolate: measure each point in this process (a CUDA error here poisons the rest of the run)."""
    device = torch.device(ctx.device)
    label = envinfo.device_name(device)
    for point in points:
        reason = precheck(point, device)
        yield _error_row(point, label, "unavailable", f"unavailable: {reason}") if reason else measure_point(point, ctx)


def _method_modules(points: list[Point]) -> list[str]:
    """Modules defining the points' methods outside falqon_core (plugins, tests), for the worker to import."""
    from falqon_core.methods import get_method

    from falqon_bench.measure.fast_stacks import is_stack_baseline

    mods = []
    for name in dict.fromkeys(p["method"] for p in points if not is_stack_baseline(p["method"]) and _own_precheck(p) is None):
        mod = type(get_method(name)).__module__
        if not mod.startswith("falqon_core.") and mod != "__main__" and mod not in mods:
            mods.append(mod)
    return mods


def _describe_exit(rc: int | None) -> str:
    if rc is None:
        return "no exit status"
    if rc < 0:
        try:
            return f"killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"killed by signal {-rc}"
    return f"exit status {rc}"


class WorkerProcess:
    """One `python -m falqon_bench.measure.worker` child: points in on stdin, protocol lines out, stderr to the run's log."""

    def __init__(self, points: list[Point], ctx: MeasureContext, log_path: Path):
        env = dict(os.environ)
        paths = [p for p in sys.path if p and os.path.isdir(p)]  # the worker imports exactly what the parent can
        env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths + env.get("PYTHONPATH", "").split(os.pathsep)))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "falqon_bench.measure.worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            bufsize=1,
            env=env,
            start_new_session=True,  # its own process group: killable as a whole, and Ctrl-C is the parent's to handle
        )
        self.events: queue.Queue = queue.Queue()
        self.stderr_tail: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL_LINES)
        payload = json.dumps({"points": points, "context": ctx.to_json(), "modules": _method_modules(points)}, default=str)
        threading.Thread(target=self._feed, args=(payload,), daemon=True).start()
        threading.Thread(target=self._read_stdout, daemon=True).start()
        self._stderr_thread = threading.Thread(target=self._read_stderr, args=(log_path,), daemon=True)
        self._stderr_thread.start()

    def _feed(self, payload: str) -> None:
        try:
            self.proc.stdin.write(payload)
            self.proc.stdin.close()
        except (BrokenPipeError, OSError):
            pass

    def _read_stdout(self) -> None:
        for line in self.proc.stdout:
            try:
                self.events.put(json.loads(line))
            except json.JSONDecodeError:
                self.stderr_tail.append(f"(stdout) {line.rstrip()}")
        self.events.put(None)  # EOF: the worker exited

    def _read_stderr(self, log_path: Path) -> None:
        with open(log_path, "a") as log:
            log.write(f"--- worker {self.proc.pid} started {_dt.datetime.now(_dt.timezone.utc).isoformat()}\n")
            for line in self.proc.stderr:
                log.write(line)
                log.flush()
                self.stderr_tail.append(line.rstrip())

    def next_event(self, timeout_s: float) -> dict[str, Any] | None | str:
        """The next protocol event, None at EOF, or 'timeout'."""
        try:
            return self.events.get(timeout=timeout_s)
        except queue.Empty:
            return "timeout"

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                self.proc.kill()

    def close(self) -> int | None:
        """Kill if still running, reap, and return the exit status."""
        self.kill()
        try:
            rc = self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            rc = None
        self._stderr_thread.join(timeout=5)
        return rc

    def tail(self) -> str:
        lines = [ln for ln in self.stderr_tail if ln.strip()][-3:]
        return " | ".join(lines)


def run_isolated(points: list[Point], ctx: MeasureContext, timeout_s: float, log_path: Path) -> Iterator[dict[str, Any]]:
    """Each method's (or worker group's) points in a worker; a timeout or crash yields an error row and a fresh worker continues."""
    device = torch.device(ctx.device)
    label = envinfo.device_name(device)
    startup_timeout_s = max(120.0, timeout_s)
    for _, group in itertools.groupby(points, key=_worker_group):
        remaining: list[Point] = []
        for point in group:
            reason = precheck(point, device)
            if reason:
                yield _error_row(point, label, "unavailable", f"unavailable: {reason}")
            else:
                remaining.append(point)
        while remaining:
            worker = WorkerProcess(remaining, ctx, log_path)
            try:
                remaining = yield from _drive_worker(worker, remaining, label, timeout_s, startup_timeout_s)
            finally:
                worker.close()


def _drive_worker(worker: WorkerProcess, points: list[Point], label: str, timeout_s: float, startup_timeout_s: float):
    """Collect one worker's results; returns the points still to run (after a timeout, crash or restart request)."""
    event = worker.next_event(startup_timeout_s)
    if not isinstance(event, dict) or event.get("event") != "ready":
        rc = worker.close()
        why = "did not start in time" if event == "timeout" else f"failed to start ({_describe_exit(rc)})"
        for point in points:
            yield {**_error_row(point, label, "worker_start", f"worker {why}: {worker.tail() or 'no stderr'}"), "worker_pid": worker.proc.pid}
        return []
    i = 0
    while i < len(points):
        event = worker.next_event(timeout_s)
        if event == "timeout":
            worker.kill()
            yield {**_error_row(points[i], label, "timeout", f"timeout: no result after {timeout_s:g} s; worker killed"), "worker_pid": worker.proc.pid}
            return points[i + 1 :]
        if event is None:
            try:  # stdout closed: let the process finish dying so its own exit status is reported
                worker.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
            rc = worker.close()
            msg = f"worker_crash: worker died ({_describe_exit(rc)}) on this point; stderr: {worker.tail() or 'empty'}"
            yield {**_error_row(points[i], label, "worker_crash", msg), "worker_pid": worker.proc.pid}
            return points[i + 1 :]
        kind = event.get("event")
        if kind == "result":
            row = event["row"]
            if row.get("point_id") != points[i]["point_id"]:
                raise RuntimeError(f"worker protocol out of order: expected {points[i]['point_id']}, got {row.get('point_id')}")
            yield row
            i += 1
        elif kind == "restart":
            return points[i:]
    return []


# ---------------------------------------------------------------- the run


@contextmanager
def _sigint_deferred() -> Iterator[None]:
    """Ctrl-C during the block is held until the block ends (a results line is never half-written by us)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    old = signal.signal(signal.SIGINT, lambda signum, frame: pending.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old if old is not None else signal.default_int_handler)
        if pending:
            raise KeyboardInterrupt


def _find_resumable(results_root: Path, suite: Suite, options: RunOptions, label: str) -> Path:
    """--resume without --out: the newest run of this suite (and shard) on this device under results/."""
    shard = f"{options.shard[0]}/{options.shard[1]}" if options.shard else None
    for run_dir in reversed(find_runs(results_root)):
        try:
            manifest = json.loads((run_dir / "manifest.json").read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if manifest.get("suite") == suite.name and manifest.get("shard") == shard and manifest.get("device") in (None, label):
            return run_dir
    raise BenchInputError(
        f"--resume: no earlier run of suite {suite.name!r}{' shard ' + shard if shard else ''} on {label} under {results_root}; "
        f"name the run directory with --out"
    )


def check_resumable(run_dir: Path, suite: Suite, label: str) -> None:
    """--resume continues a run of the same suite on the same device; anything else would mix two sweeps in one file."""
    manifest_path = run_dir / "manifest.json"
    if not manifest_path.exists():
        raise BenchInputError(f"--resume: {run_dir} holds no earlier run; drop --resume to start one there")
    try:
        old_manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as e:
        raise BenchInputError(f"--resume: {manifest_path} is corrupt JSON ({e.msg})") from None
    old_suite = old_manifest.get("suite")
    if old_suite != suite.name:
        raise BenchInputError(f"--resume: {run_dir} is a run of suite {old_suite!r}, not {suite.name!r}; choose another --out")
    old_device = old_manifest.get("device")
    if old_device not in (None, label):
        raise BenchInputError(
            f"--resume: {run_dir} was run on {old_device}, this machine runs on {label}; "
            f"one run holds one device's timings: choose another --out"
        )


def _point_label(p: Point) -> str:
    return f"{p['method']} {p['layer']} r={p['rank']} t={p['tokens']}" + (" compile" if p.get("compile") else "")


def run_suite(suite: Suite, options: RunOptions, console: Console | None = None) -> RunOutcome:
    """Run (or, with dry_run, only plan) a suite; returns how it ended. Raises BenchInputError on bad input."""
    console = console or Console(stderr=True)
    points = plan_points(suite, options)
    if not points:
        raise BenchInputError(f"suite {suite.name!r}: the selection (--methods / --ranks / --variant / --shard) leaves no points to run")
    if options.dry_run:
        return RunOutcome(status="dry-run", points=points)
    device = resolve_device(suite.device)

    label = envinfo.device_name(device)
    shard = f"{options.shard[0]}/{options.shard[1]}" if options.shard else None
    if options.out_dir is not None:
        run_dir = Path(options.out_dir)
    elif options.resume:
        run_dir = _find_resumable(options.results_root, suite, options, label)
    else:
        run_id = new_run_id(suite.name, label) + (f"-shard{options.shard[0]}of{options.shard[1]}" if options.shard else "")
        run_dir = options.results_root / run_id
    if options.resume:
        check_resumable(run_dir, suite, label)

    manifest = new_manifest(
        run_dir.name, suite.name, label, envinfo.collect_env(device), len(points),
        suite_description=suite.description, suite_file=str(suite.path) if suite.path else None, suite_spec=suite.spec,
        shard=shard, methods_filter=options.methods, isolate=options.isolate, point_timeout_s=options.point_timeout_s,
    )
    writer = RunWriter(run_dir, manifest, resume=options.resume)
    todo = [p for p in points if p["point_id"] not in writer.finished_ids]
    peaks, peaks_error = writer.manifest.get("peaks"), None
    if peaks is None:
        peaks, peaks_error = measure_peaks_safely(device)
    writer.update_manifest(status="running", peaks=peaks, peaks_error=peaks_error)
    ctx = measure_context(suite, options, device, peaks)
    ctx.run_dir = str(run_dir)
    writer.update_manifest(timing={k: v for k, v in ctx.to_json().items() if k not in ("peaks", "device")})

    outcome = RunOutcome(status="running", points=points, run_dir=run_dir, skipped=len(points) - len(todo))
    lock = envinfo.locked_clocks(device) if options.lock_clocks else nullcontext({"locked": False, "reason": "not requested"})
    with lock as clock_lock:
        writer.update_manifest(clock_lock=clock_lock)
        if options.lock_clocks and not clock_lock.get("locked"):
            console.print(f"[yellow]--lock-clocks: clocks not locked: {escape(str(clock_lock.get('reason')))}[/yellow]")
        rows = run_isolated(todo, ctx, options.point_timeout_s, run_dir / "worker.log") if options.isolate else run_in_process(todo, ctx)
        try:
            _consume(rows, todo, writer, outcome, console)
        except KeyboardInterrupt:
            writer.update_manifest(status="interrupted", interrupted_at=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
            outcome.status = "interrupted"
            console.print(f"[yellow]interrupted: {len(outcome.rows)} point(s) written to {run_dir}; `--resume` completes the run[/yellow]")
            return outcome
        finally:
            rows.close()
    n_err = sum(r["status"] != "ok" for r in outcome.rows)
    writer.finish(n_errors=n_err)
    outcome.status = "complete"
    return outcome


def _consume(rows: Iterator[dict[str, Any]], todo: list[Point], writer: RunWriter, outcome: RunOutcome, console: Console) -> None:
    """Append each finished row durably while a progress bar shows point i/n, method, layer, rank, elapsed, ETA."""
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(_point_label(todo[0]) if todo else "nothing to do", total=len(todo))
        for row in rows:
            with _sigint_deferred():
                writer.append(row)
            outcome.rows.append(row)
            done = len(outcome.rows)
            progress.update(task, advance=1, description=_point_label(todo[done]) if done < len(todo) else "done")


# ---------------------------------------------------------------- summary


def _fmt_ms(v: float | None) -> str:
    return "-" if v is None else (f"{v:.3f}" if v < 100 else f"{v:.1f}")


def summary_table(rows: list[dict[str, Any]]) -> Table:
    """Rows: layer x rank x tokens (x compile, cache); columns: methods (a layer or e2e point's option set its own
    column, 'falqon[flush_every=1]'); cells: gpu_ms, else wall_ms, else 'error'."""
    methods = list(dict.fromkeys(method_label(r) for r in rows))
    any_gpu = any(r.get("gpu_ms") is not None for r in rows)
    table = Table(title=f"ms per step ({'gpu_ms: CUDA-graph replay' if any_gpu else 'wall_ms'}), median")
    for name in ("layer", "K x N", "rank", "tokens", "variant"):
        table.add_column(name)
    for m in methods:
        table.add_column(escape(m), justify="right")
    keyed: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        variant = (r.get("mode") or ("compile" if r.get("compile") else "eager")) + ("/cold" if r.get("cache") == "cold" else "")
        key = (r["layer"], f"{r['K']}x{r['N']}", r["rank"], r["tokens"], variant)
        keyed.setdefault(key, {})[method_label(r)] = r
    for key, by_method in keyed.items():
        cells = []
        for m in methods:
            r = by_method.get(m)
            if r is None:
                cells.append("")
            elif r.get("status") != "ok":
                cells.append("[red]n/a[/red]" if r.get("error_type") in ("unavailable", "unsupported") else "[red]error[/red]")
            else:
                cells.append(_fmt_ms(r.get("gpu_ms") if r.get("gpu_ms") is not None else r.get("wall_ms")))
        table.add_row(*(escape(str(k)) for k in key), *cells)
    return table


def error_groups(errors: list[dict[str, Any]]) -> list[tuple[tuple[str, str, Any, str], list[str]]]:
    """Error rows grouped by (method, layer, rank, message), in first-seen order, each with its points' labels
    (tokens, and compile/cold where set; an e2e point's mode, an accuracy point's label, lr and seed): a method
    failing alike at every token count is one summary line."""
    groups: dict[tuple[str, str, Any, str], list[str]] = {}
    for r in errors:
        if r.get("kind") == "accuracy":  # one model and token count per run: the label, lr and seed tell points apart
            label = f"{r.get('label')} lr={r.get('lr')} seed={r.get('seed')}"
        elif r.get("kind") == "e2e":
            label = f"tokens={r.get('tokens')} {r.get('mode')}" + (" +liger" if (r.get("options") or {}).get("liger") else "")
        else:
            label = f"tokens={r.get('tokens')}" + (" compile" if r.get("compile") else "") + (" cold" if r.get("cache") == "cold" else "")
        groups.setdefault((r["method"], r["layer"], r["rank"], str(r.get("error"))), []).append(label)
    return list(groups.items())


def print_summary(outcome: RunOutcome, console: Console) -> None:
    """The summary table of this run's points, the errors in short, and the CPU warning on CPU runs."""
    if outcome.run_dir is None:
        return
    try:
        stored = load_run(outcome.run_dir).points
    except BenchInputError:
        stored = outcome.rows
    wanted = {p["point_id"] for p in outcome.points}
    rows = [r for r in stored if r.get("point_id") in wanted]
    if not rows:
        return
    kind = outcome.points[0].get("kind", "layers") if outcome.points else "layers"
    console.print((kind_hook(kind, "tabulate", "rows") or summary_table)(rows))
    errors = [r for r in rows if r.get("status") != "ok"]
    ok = len(rows) - len(errors)
    console.print(f"{ok} ok, {len(errors)} error(s), {outcome.skipped} already done before this run; results: {outcome.run_dir}")
    groups = error_groups(errors)
    for (method, layer, rank, error), points in groups[:12]:
        where = f"({len(points)} points: {', '.join(points)})" if len(points) > 1 else ""
        line = f"  [red]{escape(method)} {escape(layer)} r={rank}[/red]: {escape(error)}"
        console.print(f"{line} {escape(where)}" if where else line, highlight=False)
    shown = sum(len(points) for _, points in groups[:12])
    if len(errors) > shown:
        console.print(f"  ... and {len(errors) - shown} more (see {outcome.run_dir / POINTS})")
    if all(r.get("device") == "CPU" for r in rows):
        console.print(f"[yellow]{CPU_WARNING}[/yellow]")
