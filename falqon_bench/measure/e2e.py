"""An e2e suite (`kind = "e2e"`) under torchrun: DDP fine-tuning of a whole model, one process per GPU.

    torchrun --nproc-per-node 8 -m falqon_bench.measure.e2e suites/e2e.toml --out results/e2e-8gpu
    python -m falqon_bench.measure.e2e suites/e2e.toml --out /tmp/e2e      # one process; `falqon-bench run` does the same
                                                                    # with a worker subprocess per method

Every point (method x mode x liger) runs in turn in these processes; a point that raises is one error row and
the next point still runs (ranks agree on failure, so none waits in a collective another rank skipped). Rank 0
writes the rows with the runner's RunWriter (points.jsonl + manifest.json), so report, compare, merge and
--resume read them as any run; `tokens` and `tokens_per_s` count every rank's tokens.

DDP and FALQON: the proxy update rewrites the melded fp8 matrix (a buffer) on every rank. DDP all-reduces
the gradient of B before the optimizer step, so every rank applies the same update and the fp8 bytes stay
identical without broadcasting buffers before each forward. Frozen weights (fp8 buffers, tensor-subclass
weights such as fp6_lora's) are kept out of DDP: every rank builds them from the same seed, and fp8 buffers
are synced once by bytes. The run checks the claim at the end of each point (rank 0's bytes against every
rank's) and records `weights_in_sync`.

A suite with `parallel = "fsdp"` runs FSDP2 instead of DDP: the model built and sharded layer by layer, FALQON's fp8
buffers replicated (falqon_bench.measure.e2e_fsdp says how and why); the same sync check holds.
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from falqon_bench.data.errors import BenchInputError


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: rank among world_size, its device, and the backend (None: single process)."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_kind: str) -> DistInfo:
    """Join the process group torchrun describes in the environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*).

    Without those variables (a plain `python -m`), run as one process with no process group.
    device_kind: 'cuda', 'cpu' or 'auto' (cuda when available).
    """
    if device_kind == "auto":
        device_kind = "cuda" if torch.cuda.is_available() else "cpu"
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    local_rank = int(os.environ.get("LOCAL_RANK", 0)) if launched else 0
    device = torch.device("cuda", local_rank) if device_kind == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not launched:
        return DistInfo(0, 1, 0, device, None)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        kwargs: dict[str, Any] = {"backend": backend}
        if device.type == "cuda":
            kwargs["device_id"] = device  # binds NCCL to this GPU (no guessing from the rank)
        dist.init_process_group(**kwargs)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device, backend)


def fp8_buffers(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Every float8 buffer of the model (FALQON's melded [W; A] matrices), by name, in a stable order."""
    fp8_dtypes = {torch.float8_e4m3fn, torch.float8_e5m2}
    return [(name, b) for name, b in model.named_buffers() if b is not None and b.dtype in fp8_dtypes]


FP8_COMPARED_BYTES = 8 * 2**30  # host copy for fp8_bytes_changed: all of a 7B model, the first 8 GiB of a 70B one


def _compared_fp8_buffers(model: nn.Module) -> list[torch.Tensor]:
    """The fp8 buffers whose bytes fp8_bytes_changed counts: in order, up to FP8_COMPARED_BYTES (a host copy of all
    of a 70B model's 70 GB, twice, would not fit a GPU machine's memory)."""
    kept, total = [], 0
    for _, buf in fp8_buffers(model):
        total += buf.numel()
        if total > FP8_COMPARED_BYTES and kept:
            break
        kept.append(buf)
    return kept


def fp8_weights_in_sync(model: nn.Module, info: DistInfo) -> bool:
    """True when every rank holds the same fp8 bytes as rank 0 in every fp8 buffer (bit-identical).

    One buffer at a time: rank 0's uint8 view is broadcast and compared, so memory stays at one layer's
    matrix (an all_gather of all of a 7B model's fp8 bytes would need world_size x 6.5 GB).
    """
    mismatches = torch.zeros((), dtype=torch.int64, device=info.device)
    for _, buf in fp8_buffers(model):
        mine = buf.view(torch.uint8).contiguous()
        theirs = mine.clone()
        dist.broadcast(theirs, src=0)
        mismatches += int(not torch.equal(mine, theirs))
    dist.all_reduce(mismatches, op=dist.ReduceOp.SUM)
    return int(mismatches.item()) == 0


def broadcast_fp8_buffers(model: nn.Module, info: DistInfo) -> None:
    """Copy rank 0's fp8 bytes to every rank (uint8 views: gloo has no float8 dtypes), one buffer at a time."""
    with torch.no_grad():
        for _, buf in fp8_buffers(model):
            raw = buf.view(torch.uint8)
            staged = raw.contiguous()
            dist.broadcast(staged, src=0)
            if staged.data_ptr() != raw.data_ptr():
                raw.copy_(staged)


def wrap_in_ddp(model: nn.Module, info: DistInfo) -> nn.Module:
    """DistributedDataParallel over the trainable tensors; fp8 buffers are rank-local state outside DDP.

    DDP would broadcast every buffer at construction (gloo cannot send float8) and, by default, before every
    forward (gigabytes per step for FALQON). So fp8 buffers are excluded from DDP and synced once here, by
    bytes; per-forward buffer sync is off. From then on they stay equal only through DDP's all-reduce of the
    gradients, which `fp8_weights_in_sync` checks at the end.
    """
    from torch.nn.parallel import DistributedDataParallel

    frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
    frozen += [name for name, _ in model.named_buffers()]  # same seed on every rank: nothing to broadcast
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, frozen)
    broadcast_fp8_buffers(model, info)
    kwargs: dict[str, Any] = {_no_forward_buffer_sync_kwarg(): False}
    if info.device.type == "cuda":
        kwargs["device_ids"] = [info.device.index]
    return DistributedDataParallel(model, **kwargs)


def _no_forward_buffer_sync_kwarg() -> str:
    """DDP's switch for "do not broadcast buffers before every forward": `forward_sync_buffers` where it
    exists (newer torch deprecates `broadcast_buffers`), else `broadcast_buffers` (torch 2.11)."""
    from torch.nn.parallel import DistributedDataParallel

    params = inspect.signature(DistributedDataParallel.__init__).parameters
    return "forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers"


def _all_ranks_ok(ok: bool, info: DistInfo) -> bool:
    """Agree across ranks (so no rank waits in a collective another rank skipped)."""
    if info.backend is None:
        return ok
    flag = torch.tensor(0 if ok else 1, dtype=torch.int64, device=info.device)
    dist.all_reduce(flag, op=dist.ReduceOp.SUM)
    return int(flag.item()) == 0


def _reduce_over_ranks(value: float, info: DistInfo, op=dist.ReduceOp.SUM) -> float:
    """value summed (or reduced by `op`) over the ranks; the value itself in a single process."""
    if info.backend is None:
        return value
    t = torch.tensor(value, dtype=torch.float64, device=info.device)
    dist.all_reduce(t, op=op)
    return float(t.item())


def _mean_over_ranks(values: list[float], info: DistInfo) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=info.device)
    if info.backend is not None:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= info.world_size
    return [float(v) for v in t.cpu()]




def train_point_distributed(point: dict[str, Any], info: DistInfo, skip_grad_allreduce: bool = False) -> dict[str, Any]:
    """One e2e point on every rank; returns its row (the same on every rank; rank 0 writes it).

    Failure at any stage on any rank makes every rank return an error row at the same stage.
    """
    import gc

    from falqon_bench.measure.e2e_fsdp import FsdpUnsupported, build_fsdp_training, parallel_of, unsupported_message
    from falqon_bench.measure.e2e_step import build_fields, build_training, e2e_base_row, make_batches, measurements_to_row, run_steps
    from falqon_bench.measure.worker import one_line

    row = e2e_base_row(point, info.device, info.world_size, info.backend or "none")
    row["parallel"] = parallel_of(point)
    t0 = time.perf_counter()
    training = fp8_init = None
    error: str | None = None
    try:
        if info.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(info.device)
        if parallel_of(point) == "fsdp":
            training, convert_s, n_trainable = build_fsdp_training(point, info.device, info.world_size)
        else:
            wrap = (lambda m: wrap_in_ddp(m, info)) if info.backend is not None else None
            training, convert_s, n_trainable = build_training(point, info.device, wrap=wrap)
        training.skip_grad_allreduce = skip_grad_allreduce
        row.update(build_fields(training, convert_s, n_trainable))
        fp8_init = [b.view(torch.uint8).cpu().clone() for b in _compared_fp8_buffers(training.base)] if info.is_main else []
    except FsdpUnsupported as e:  # fully_shard refusing a module, a mode FSDP2 cannot run
        error = unsupported_message(e)
    except Exception as e:  # MethodUnavailable, a library missing, DDP refusing a tensor subclass, OOM
        error = one_line(e)
    if not _all_ranks_ok(error is None, info):
        return _finish_error(row, error or "failed on another rank", t0)
    try:
        measured = run_steps(training, make_batches(point, int(training.base.config.vocab_size), info.device, info.rank),
                             point, info.device)
    except Exception as e:
        error = one_line(e)
    if not _all_ranks_ok(error is None, info):
        return _finish_error(row, error or "training failed on another rank", t0)
    measured["losses"] = _mean_over_ranks(measured["losses"], info)
    measurements_to_row(row, measured, point, training.clock.split())
    row["tokens_per_s"] = _reduce_over_ranks(point["tokens"] / info.world_size / (row["wall_ms"] / 1e3), info)
    row["weights_in_sync"] = fp8_weights_in_sync(training.base, info) if fp8_buffers(training.base) and info.world_size > 1 else None
    if fp8_init:
        now = [b.view(torch.uint8).cpu() for b in _compared_fp8_buffers(training.base)]
        row["fp8_bytes_changed"] = int(sum((a != b).sum() for a, b in zip(fp8_init, now)))
        row["fp8_bytes_compared"] = int(sum(a.numel() for a in fp8_init))
    if info.device.type == "cuda":  # the fullest rank: FSDP ranks differ by their shard sizes
        row["peak_mem_bytes"] = int(_reduce_over_ranks(float(torch.cuda.max_memory_allocated(info.device)), info, dist.ReduceOp.MAX))
    if row["parallel"] == "fsdp" and fp8_buffers(training.base):
        row["fp8_layout"] = "replicated"  # buffers are not sharded by fully_shard (falqon_bench.measure.e2e_fsdp)
    finite = all(v == v and abs(v) != float("inf") for v in row["loss_per_step"])
    row.update(status="ok" if finite else "error", error=None if finite else f"loss is not finite: {row['loss_per_step'][:4]}")
    row["duration_s"] = round(time.perf_counter() - t0, 4)
    del training
    gc.collect()
    return row


def _finish_error(row: dict[str, Any], error: str, t0: float) -> dict[str, Any]:
    row.update(error=error, error_type=error.split(":")[0], duration_s=round(time.perf_counter() - t0, 4))
    if row["device"] != "CPU":
        import gc

        gc.collect()  # a model that failed half-built (OOM) sits in reference cycles: free it before the next point
        torch.cuda.empty_cache()
    return row


def run(suite_ref: str, out: Path, methods: list[str] | None = None, resume: bool = False, allow_pickle: bool = False,
        device: str | None = None, skip_grad_allreduce: bool = False) -> list[dict[str, Any]]:
    """Run an e2e suite's points in this process group; rank 0 appends each row to <out>/points.jsonl. Returns the rows."""
    from falqon_bench.measure import envinfo
    from falqon_bench.suites.e2e_suite import KIND, expand_e2e_suite
    from falqon_bench.data.store import RunWriter, new_manifest
    from falqon_bench.suites.suite import load_suite
    from falqon_bench.suites.sweep import filter_methods

    suite = load_suite(suite_ref)
    if suite.kind != KIND:
        raise BenchInputError(f"{suite_ref}: a suite of kind {suite.kind!r}; python -m falqon_bench.measure.e2e runs kind = \"e2e\" "
                              "suites (use `falqon-bench run` for the others)")
    suite.allow_pickle = suite.allow_pickle or allow_pickle
    info = init_distributed(device or suite.device)
    if resume:  # as `falqon-bench run --resume`: a mistyped --out must not start a fresh run; every rank reads it, all stop
        from falqon_bench.measure.runner import check_resumable

        check_resumable(out, suite, envinfo.device_name(info.device))
    points = expand_e2e_suite(suite, world_size=info.world_size)
    if methods:
        points = filter_methods(points, methods)
    writer = None
    done: list[str] = []
    if info.is_main:
        manifest = new_manifest(
            out.name, suite.name, envinfo.device_name(info.device), envinfo.collect_env(info.device), len(points),
            suite_description=suite.description, kind=KIND, suite_file=str(suite.path) if suite.path else None,
            suite_spec=suite.spec, world_size=info.world_size, backend=info.backend or "none",
        )
        writer = RunWriter(out, manifest, resume=resume)
        done = sorted(writer.finished_ids)
    if info.backend is not None:
        shared = [done]
        dist.broadcast_object_list(shared, src=0)
        done = shared[0]
    rows = []
    try:
        for point in [p for p in points if p["point_id"] not in set(done)]:
            row = train_point_distributed(point, info, skip_grad_allreduce)
            rows.append(row)
            if writer is not None:
                writer.append(row)
                print(_summary_line(row), flush=True)
        if writer is not None:
            writer.finish()
        if info.backend is not None:  # every rank done before any tears the group down (a gloo rank that
            dist.barrier()            # destroyed it while its peer still ran aborted: 'terminate called ...')
    finally:
        if info.backend is not None and dist.is_initialized():
            dist.destroy_process_group()
    return rows


def _summary_line(row: dict[str, Any]) -> str:
    head = f"{row['method']} {row['mode']}"
    if row["status"] != "ok":
        return f"{head}: error: {row['error']}"
    return (
        f"{head}: {row['wall_ms']:.1f} ms/step, {row['tokens_per_s']:.0f} tokens/s over {row['world_size']} rank(s), "
        f"loss {row['loss_first']:.3f} -> {row['loss_last']:.3f}, weights_in_sync={row['weights_in_sync']}"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m falqon_bench.measure.e2e",
        description="Run an e2e suite (kind = \"e2e\") in this process group: under torchrun, DDP over its ranks.",
        epilog="example: torchrun --nproc-per-node 8 -m falqon_bench.measure.e2e suites/e2e.toml --out results/e2e-8gpu",
    )
    parser.add_argument("suite", help="e2e suite name or .toml path")
    parser.add_argument("--out", type=Path, required=True, help="run directory (points.jsonl + manifest.json)")
    parser.add_argument("--methods", default=None, help="only these methods, comma-separated")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out: skip points already ok")
    parser.add_argument("--allow-pickle", action="store_true", help="let a local model directory load pickled weights")
    parser.add_argument("--device", default=None, choices=("auto", "cuda", "cpu"), help="override the suite's device")
    parser.add_argument("--skip-grad-allreduce", action="store_true", help=argparse.SUPPRESS)  # tests the sync check
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
    try:
        run(args.suite, args.out, methods, args.resume, args.allow_pickle, args.device, args.skip_grad_allreduce)
    except BenchInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
