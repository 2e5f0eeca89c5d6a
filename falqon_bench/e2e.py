"""End-to-end fine-tuning benchmark of a whole LLaMA-architecture model, one process per GPU (DESIGN.md section 7).

    torchrun --nproc-per-node 8 -m falqon_bench.e2e --model llama-7b --method falqon --rank 16 \\
        --steps 20 --seq-len 128 --batch-size 2 --out results/e2e-falqon
    python -m falqon_bench.e2e --model tiny-llama --method bf16_lora,falqon --out /tmp/e2e   # one process, no torchrun

The model is built from a transformers LlamaConfig with random weights (never downloaded), its linears are
converted by a falqon_core method, and it trains under torch.distributed DDP (nccl on CUDA, gloo on CPU;
rank/world size from torchrun's env vars) on synthetic token batches seeded per rank, with AdamW over the
method's trainable tensors and `method.after_optimizer_step` after every step.

DDP and FALQON: the proxy update rewrites the melded fp8 matrix (a buffer) on every rank. DDP all-reduces
the gradient of B before the optimizer step, so every rank applies the same update and the fp8 bytes stay
identical without broadcasting buffers before each forward (DDP's buffer sync is off: a 7B model's
fp8 matrices are ~6.5 GB).
The run checks that claim at the end (rank 0's bytes against every rank's) and records `weights_in_sync`.

Rank 0 writes one line per method to <out>/points.jsonl in the suite's results format (falqon_bench.store):
`wall_ms` is the median step time in ms (CUDA-synchronized on GPU, warm-up steps excluded), `tokens` the
global tokens per step, `tokens_per_s` the sum over ranks of each rank's tokens per second.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import inspect
import json
import math
import os
import statistics
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from falqon_bench.models import MODEL_NAMES, TINY_LLAMA, build_model, llama_config
from falqon_bench.schema import point_id
from falqon_bench.store import RunWriter

SUITE_NAME = "e2e-torchrun"


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


def synthetic_batch(
    generator: torch.Generator, batch_size: int, seq_len: int, vocab: int, device: torch.device
) -> torch.Tensor:
    """batch_size x seq_len token ids: arithmetic sequences (random start and stride 1..3) mod vocab.

    Learnable (the next token follows from the last two), so the loss of a working run goes down.
    """
    start = torch.randint(0, vocab, (batch_size, 1), generator=generator)
    stride = torch.randint(1, 4, (batch_size, 1), generator=generator)
    return ((start + stride * torch.arange(seq_len)) % vocab).to(device)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fp8_buffers(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Every float8 buffer of the model (FALQON's melded [W; A] matrices), by name, in a stable order."""
    fp8_dtypes = {torch.float8_e4m3fn, torch.float8_e5m2}
    return [(name, b) for name, b in model.named_buffers() if b is not None and b.dtype in fp8_dtypes]


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

    fp8_names = [name for name, _ in fp8_buffers(model)]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, fp8_names)
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


def _sum_over_ranks(value: float, info: DistInfo) -> float:
    if info.backend is None:
        return value
    t = torch.tensor(value, dtype=torch.float64, device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t.item())


def _mean_over_ranks(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    values = values.detach().to(torch.float64)
    if info.backend is not None:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        values /= info.world_size
    return values


@dataclass(frozen=True)
class E2EOptions:
    """One run's settings (the CLI's options); times in ms, lengths in tokens."""

    model: str
    methods: tuple[str, ...]
    rank: int
    steps: int
    warmup_steps: int
    seq_len: int
    batch_size: int
    lr: float
    out: Path
    num_layers: int | None = None
    device: str = "auto"
    skip_grad_allreduce: bool = False


def _base_row(opts: E2EOptions, method: str, config, info: DistInfo) -> dict[str, Any]:
    """The identity keys and REQUIRED_KEYS of a point, with the measurements still empty."""
    from falqon_bench.envinfo import device_name

    identity = {
        "suite": SUITE_NAME,
        "method": method,
        "layer": opts.model,
        "K": int(config.hidden_size),
        "N": int(config.intermediate_size),
        "rank": opts.rank,
        "tokens": opts.batch_size * opts.seq_len * info.world_size,
        "compile": False,
        "cache": "warm",
        "dtype": "bfloat16",
        "options": {"world_size": info.world_size, "seq_len": opts.seq_len, "batch_size": opts.batch_size,
                    "num_layers": int(config.num_hidden_layers), "steps": opts.steps},
    }
    return {
        **identity,
        "point_id": point_id(identity),
        "device": device_name(info.device),
        "status": "ok",
        "error": None,
        "gpu_ms": None,
        "gpu_samples_ms": [],
        "gpu_timing": "none",
        "wall_ms": None,
        "wall_samples_ms": [],
        "kernel_ms": {},
        "floor_ms": None,
        "peak_mem_bytes": None,
        "world_size": info.world_size,
        "backend": info.backend or "none",
        "seq_len": opts.seq_len,
        "batch_size": opts.batch_size,
        "num_layers": int(config.num_hidden_layers),
        "steps": opts.steps,
        "warmup_steps": opts.warmup_steps,
        "lr": opts.lr,
        "loss_first": None,
        "loss_last": None,
        "tokens_per_s": None,
        "weights_in_sync": None,
    }


def _error_row(row: dict[str, Any], message: str) -> dict[str, Any]:
    return {**row, "status": "error", "error": message.strip().splitlines()[0][:500] if message.strip() else "error"}


def train_method(opts: E2EOptions, method_name: str, config, info: DistInfo) -> dict[str, Any]:
    """Build, convert, wrap in DDP and train one method; returns its results row (the same on every rank)."""
    from torch.nn.parallel import DistributedDataParallel

    from falqon_core.convert import LLAMA_TARGET_MODULES, convert_model
    from falqon_core.methods import AdapterConfig

    row = _base_row(opts, method_name, config, info)
    adapter = AdapterConfig(rank=opts.rank, target_modules=LLAMA_TARGET_MODULES)
    error = None
    try:
        model, method = convert_model(build_model(config, info.device, adapter.dtype), method_name, adapter)
    except Exception as exc:  # MethodUnavailable, a shape a kernel refuses, a missing library, OOM: one error row
        error = f"{type(exc).__name__}: {exc}"
        model = method = None
    if not _all_ranks_ok(error is None, info):
        return _error_row(row, error or "conversion failed on another rank")

    params = method.trainable_parameters(model)
    if not params:
        return _error_row(row, f"{method_name} has no trainable parameters to fine-tune")
    train_model = wrap_in_ddp(model, info) if info.backend is not None else model
    optimizer = torch.optim.AdamW(params, lr=opts.lr)
    fp8_init = [b.view(torch.uint8).cpu().clone() for _, b in fp8_buffers(model)] if info.is_main else []

    generator = torch.Generator().manual_seed(1000 + info.rank)  # different data on every rank
    losses: list[torch.Tensor] = []
    samples_ms: list[float] = []
    if info.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(info.device)
    for step in range(opts.steps):
        tokens = synthetic_batch(generator, opts.batch_size, opts.seq_len, int(config.vocab_size), info.device)
        _synchronize(info.device)
        t0 = time.perf_counter()
        if opts.skip_grad_allreduce and isinstance(train_model, DistributedDataParallel):
            with train_model.no_sync():  # ranks diverge: only for testing the sync check
                loss = train_model(input_ids=tokens, labels=tokens).loss
                loss.backward()
        else:
            loss = train_model(input_ids=tokens, labels=tokens).loss
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        method.after_optimizer_step(model)
        _synchronize(info.device)
        if step >= opts.warmup_steps:
            samples_ms.append((time.perf_counter() - t0) * 1e3)
        losses.append(loss.detach())

    mean_losses = _mean_over_ranks(torch.stack(losses), info)
    wall_ms = statistics.median(samples_ms)
    local_tokens_per_s = opts.batch_size * opts.seq_len / (wall_ms / 1e3)
    # null with one rank or without fp8 weights: nothing to compare
    in_sync = fp8_weights_in_sync(model, info) if fp8_buffers(model) and info.world_size > 1 else None  # one rank: nothing to compare
    row.update(
        wall_ms=wall_ms,
        wall_samples_ms=samples_ms,
        loss_first=float(mean_losses[0]),
        loss_last=float(mean_losses[-1]),
        loss_per_step=[float(v) for v in mean_losses],
        tokens_per_s=_sum_over_ranks(local_tokens_per_s, info),
        weights_in_sync=in_sync,
        peak_mem_bytes=int(torch.cuda.max_memory_allocated(info.device)) if info.device.type == "cuda" else None,
        trainable_params=sum(p.numel() for p in params),
    )
    if fp8_init:
        now = [b.view(torch.uint8).cpu() for _, b in fp8_buffers(model)]
        row["fp8_bytes_changed"] = int(sum((a != b).sum() for a, b in zip(fp8_init, now)))
    if not all(math.isfinite(v) for v in (row["loss_first"], row["loss_last"])):
        row = _error_row(row, f"loss is not finite ({row['loss_first']} -> {row['loss_last']})")
    return row


def run(opts: E2EOptions) -> list[dict[str, Any]]:
    """Train every method of `opts` in turn; rank 0 appends each row to <out>/points.jsonl. Returns the rows."""
    from falqon_bench.envinfo import collect_env

    info = init_distributed(opts.device)
    config = llama_config(opts.model, opts.num_layers)
    writer = None
    if info.is_main:
        manifest = {
            "suite": SUITE_NAME,
            "run_id": opts.out.name,
            "started_at": _dt.datetime.now(_dt.timezone.utc).isoformat(),
            "env": collect_env(info.device),
            "world_size": info.world_size,
            "backend": info.backend or "none",
            "model": opts.model,
        }
        writer = RunWriter(opts.out, manifest, resume=opts.out.joinpath("points.jsonl").exists())
    rows = []
    try:
        for method_name in opts.methods:
            row = train_method(opts, method_name, config, info)
            rows.append(row)
            if writer is not None:
                writer.append(row)
                print(_summary_line(row), flush=True)
    finally:
        if writer is not None:
            writer.manifest["status"] = "finished"
            writer.manifest_path.write_text(json.dumps(writer.manifest, indent=2, sort_keys=True, default=str) + "\n")
        if info.backend is not None and dist.is_initialized():
            dist.destroy_process_group()
    return rows


def _summary_line(row: dict[str, Any]) -> str:
    if row["status"] != "ok":
        return f"{row['method']}: error: {row['error']}"
    return (
        f"{row['method']}: {row['wall_ms']:.1f} ms/step, {row['tokens_per_s']:.0f} tokens/s over {row['world_size']} "
        f"rank(s), loss {row['loss_first']:.3f} -> {row['loss_last']:.3f}, weights_in_sync={row['weights_in_sync']}"
    )


def _int_at_least(minimum: int):
    """argparse type: an integer >= minimum (a rank, step or size of 0 would only produce an error row)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} must be an integer >= {minimum}")
        return value

    return parse


_positive_int, _non_negative_int = _int_at_least(1), _int_at_least(0)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{value} must be a finite number > 0")
    return value


def parse_args(argv: list[str] | None = None) -> E2EOptions:
    parser = argparse.ArgumentParser(
        prog="python -m falqon_bench.e2e",
        description="Full-model fine-tuning steps under torchrun (DDP): ms/step, global tokens/s, loss, fp8 sync check.",
        epilog="example: torchrun --nproc-per-node 8 -m falqon_bench.e2e --model llama-7b --method falqon "
        "--rank 16 --steps 20 --seq-len 128 --batch-size 2 --out results/e2e-falqon",
    )
    parser.add_argument("--model", default=TINY_LLAMA, choices=MODEL_NAMES)
    parser.add_argument("--method", default="falqon", help="method name, or several separated by commas")
    parser.add_argument("--rank", type=_positive_int, default=16, help="adapter rank r")
    parser.add_argument("--steps", type=_positive_int, default=20, help="training steps, warm-up included")
    parser.add_argument("--warmup-steps", type=_non_negative_int, default=2, help="first steps left out of the timing")
    parser.add_argument("--seq-len", type=_positive_int, default=128, help="tokens per sequence")
    parser.add_argument("--batch-size", type=_positive_int, default=2, help="sequences per rank per step")
    parser.add_argument("--lr", type=_positive_float, default=1e-3, help="AdamW learning rate")
    parser.add_argument("--num-layers", type=_positive_int, default=None, help="override the model's decoder layer count")
    parser.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"), help="auto: cuda when available")
    parser.add_argument(
        "--out", type=Path, required=True, help="results directory (points.jsonl + manifest.json); an existing one is appended to"
    )
    parser.add_argument("--skip-grad-allreduce", action="store_true", help=argparse.SUPPRESS)  # tests the sync check
    args = parser.parse_args(argv)
    if args.steps <= args.warmup_steps:
        parser.error(f"--steps ({args.steps}) must exceed --warmup-steps ({args.warmup_steps}): no step would be timed")
    from falqon_core.methods import method_names

    methods = tuple(m.strip() for m in args.method.split(",") if m.strip())
    unknown = [m for m in methods if m not in method_names()]
    if not methods or unknown:
        parser.error(f"unknown method(s) {unknown or [args.method]}; allowed: {', '.join(method_names())}")
    return E2EOptions(
        model=args.model,
        methods=methods,
        rank=args.rank,
        steps=args.steps,
        warmup_steps=args.warmup_steps,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        lr=args.lr,
        out=args.out,
        num_layers=args.num_layers,
        device=args.device,
        skip_grad_allreduce=args.skip_grad_allreduce,
    )


def main(argv: list[str] | None = None) -> int:
    try:
        run(parse_args(argv))
    except Exception:
        traceback.print_exc()
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
