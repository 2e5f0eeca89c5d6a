"""`falqon-bench run SUITE --gpus all|N`: one `run --shard i/N` process per GPU of this host, joined into one run.

Nothing new about scheduling: each GPU runs the ordinary `falqon-bench run SUITE --shard i/N` (its points, its
worker subprocesses, its own results files) with CUDA_VISIBLE_DEVICES set to that one GPU, and `merge` joins the
shards when all have ended. A cluster does the same with a job array (README, "Many GPUs").

Layout of the run directory OUT:
    OUT/points.jsonl, OUT/manifest.json    the merged run (what report, compare and export read)
    OUT/shards/shard<i>of<N>/              each shard's own run (points.jsonl, manifest.json, worker.log)
    OUT/shards/shard<i>of<N>.log           the shard process's stdout and stderr
A shard that fails or is interrupted leaves its finished points: they are merged (manifest status
"merged-partial"), and `--resume` with the same --out re-runs only what is missing and merges again.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from falqon_bench.data.errors import BenchInputError

SHARDS_DIR = "shards"


@dataclass(frozen=True)
class ShardDevice:
    """Where one shard runs: a label for messages and the CUDA_VISIBLE_DEVICES value its process gets ('' = CPU)."""

    label: str
    visible: str


def visible_gpu_ids() -> list[str]:
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES entries (its own list when set, else 0..count-1)."""
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None and listed.strip():
        return [g.strip() for g in listed.split(",") if g.strip()][:count]
    return [str(i) for i in range(count)]


def parse_gpus(text: str, available: list[str]) -> list[ShardDevice]:
    """'all' or a count N -> one ShardDevice per GPU used; BenchInputError when there are not that many GPUs."""
    text = text.strip().lower()
    if text == "all":
        n = len(available)
    else:
        try:
            n = int(text)
        except ValueError:
            raise BenchInputError(f"--gpus {text!r}: expected `all` or a number of GPUs >= 1, e.g. --gpus 8") from None
        if n < 1:
            raise BenchInputError(f"--gpus {text!r}: expected `all` or a number of GPUs >= 1, e.g. --gpus 8")
    if not available:
        raise BenchInputError("--gpus: torch sees no CUDA GPU on this machine; run without --gpus (one process), "
                              "or on a GPU host")
    if n > len(available):
        raise BenchInputError(f"--gpus {n}: only {len(available)} GPU(s) visible here "
                              f"(CUDA_VISIBLE_DEVICES entries {', '.join(available)}); use --gpus all or at most {len(available)}")
    return [ShardDevice(f"cuda:{gpu}", gpu) for gpu in available[:n]]


def shard_dir(out: Path, i: int, n: int) -> Path:
    return out / SHARDS_DIR / f"shard{i}of{n}"


def shard_command(suite: str, i: int, n: int, out: Path, passthrough: list[str], resume: bool) -> list[str]:
    """The ordinary CLI run of shard i of n into its own directory (with --resume when that shard has started)."""
    cmd = [sys.executable, "-m", "falqon_bench.cli", "run", suite, "--shard", f"{i}/{n}", "--out", str(shard_dir(out, i, n))]
    if resume and (shard_dir(out, i, n) / "manifest.json").exists():
        cmd.append("--resume")
    return cmd + passthrough


def _shard_env(device: ShardDevice) -> dict[str, str]:
    env = dict(os.environ)
    env["CUDA_VISIBLE_DEVICES"] = device.visible
    paths = [p for p in sys.path if p and os.path.isdir(p)]  # the shard imports exactly what this process can
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths + env.get("PYTHONPATH", "").split(os.pathsep)))
    return env


def run_shards(suite: str, devices: list[ShardDevice], out: Path, passthrough: list[str], resume: bool = False,
               echo=print) -> dict[int, int]:
    """Start one shard process per device, wait for all; returns shard index -> exit status (130: interrupted).

    Ctrl-C reaches the shard processes too (same process group); each marks its run interrupted, and so does this.
    """
    n = len(devices)
    (out / SHARDS_DIR).mkdir(parents=True, exist_ok=True)
    procs: dict[int, subprocess.Popen] = {}
    logs = []
    try:
        for i, device in enumerate(devices, 1):
            log = open(out / SHARDS_DIR / f"shard{i}of{n}.log", "a")
            logs.append(log)
            procs[i] = subprocess.Popen(shard_command(suite, i, n, out, passthrough, resume), env=_shard_env(device),
                                        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            echo(f"shard {i}/{n} on {device.label}: pid {procs[i].pid}, log {log.name}")
        codes = {}
        for i, proc in procs.items():
            codes[i] = proc.wait()
            echo(f"shard {i}/{n}: exit status {codes[i]}")
        return codes
    except KeyboardInterrupt:
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        codes = {i: proc.wait() for i, proc in procs.items()}
        return {i: 130 if rc != 0 else 0 for i, rc in codes.items()}  # a shard that had finished keeps its 0
    finally:
        for log in logs:
            log.close()


def merge_into(out: Path, n: int, extra_manifest: dict) -> Path:
    """Merge the shards that wrote a manifest into OUT's own points.jsonl + manifest.json (replacing an older merge)."""
    import json

    from falqon_bench.data.store import MANIFEST, POINTS, merge_runs

    started = [shard_dir(out, i, n) for i in range(1, n + 1) if (shard_dir(out, i, n) / MANIFEST).exists()]
    if not started:
        raise BenchInputError(f"no shard of {out} wrote any result; see the logs in {out / SHARDS_DIR}")
    tmp = out / ".merging"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        merged = merge_runs(started, tmp, allow_partial=True)
        manifest = {**json.loads((merged / MANIFEST).read_text()), "run_id": out.name, **extra_manifest}
        (merged / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
        for name in (POINTS, MANIFEST):
            os.replace(merged / name, out / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def run_on_devices(suite: str, devices: list[ShardDevice], out: Path, passthrough: list[str], resume: bool = False,
                   echo=print) -> tuple[Path, dict[int, int]]:
    """Run the suite's shards on `devices` (one each) and merge them into `out`; returns (out, exit status per shard)."""
    out = Path(out)
    if (out / "points.jsonl").exists() and not resume:
        raise BenchInputError(f"{out} already holds a run; pass --resume to complete it, or choose another --out")
    codes = run_shards(suite, devices, out, passthrough, resume, echo)
    n = len(devices)
    missing = [i for i, rc in codes.items() if rc != 0]
    merge_into(out, n, {"gpus": [d.label for d in devices], "shard_exit_status": {str(i): rc for i, rc in codes.items()},
                        "shards_failed": missing})
    return out, codes


def passthrough_args(options) -> list[str]:
    """The `run` options (a runner.RunOptions) every shard gets, as CLI arguments (not --out, --shard, --resume)."""
    args: list[str] = []
    if options.methods:
        args += ["--methods", ",".join(options.methods)]
    if options.ranks:
        args += ["--ranks", ",".join(str(r) for r in options.ranks)]
    args += ["--variant", options.variant, "--point-timeout-s", repr(float(options.point_timeout_s))]
    args.append("--isolate" if options.isolate else "--no-isolate")
    if options.lock_clocks:
        args.append("--lock-clocks")
    for flag, value in (("--budget-ms", options.budget_ms), ("--warmup-ms", options.warmup_ms),
                        ("--min-samples", options.min_samples)):
        if value is not None:
            args += [flag, str(value)]
    return args


def run_on_gpus(suite, gpus: str, options, console) -> int:
    """`falqon-bench run SUITE --gpus all|N`: shards on this host's GPUs, merged; returns the exit status.

    suite: the loaded runner Suite; options: its runner.RunOptions (not sharded). 0 when every shard ended well,
    130 when interrupted, 1 when a shard failed (its finished points are merged all the same).
    """
    from falqon_bench.measure import envinfo
    from falqon_bench.measure.runner import RunOutcome, plan_points, print_summary, resolve_device
    from falqon_bench.data.store import new_run_id

    if options.shard:
        raise BenchInputError("--gpus and --shard: --gpus makes its own shards (one per GPU); give one of them")
    suite_ref = str(suite.path) if suite.path else suite.name
    devices = parse_gpus(gpus, visible_gpu_ids())
    points = plan_points(suite, options)
    devices = devices[: max(1, len(points))]  # never a shard without points
    if options.out_dir is not None:
        out = Path(options.out_dir)
    else:
        label = envinfo.device_name(resolve_device(suite.device))
        out = options.results_root / (new_run_id(suite.name, label) + f"-{len(devices)}gpus")
    passthrough = passthrough_args(options) + (["--allow-pickle"] if suite.allow_pickle else [])
    out, codes = run_on_devices(suite_ref, devices, out, passthrough, options.resume, echo=console.print)
    print_summary(RunOutcome(status="complete", points=points, run_dir=out), console)
    if any(rc == 130 for rc in codes.values()):
        return 130
    failed = [i for i, rc in codes.items() if rc != 0]
    if failed:
        console.print(f"[red]shard(s) {', '.join(map(str, failed))} failed; their logs: {out / SHARDS_DIR}[/red]")
        return 1
    return 0
