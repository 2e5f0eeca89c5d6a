"""One e2e point: build a whole model, convert it, and time full fine-tuning steps in one execution mode.

A step is forward (causal-LM loss on synthetic tokens) -> backward -> AdamW step -> the method's post-step
work (FALQON's proxy update). Modes:
  eager       the step as a user writes it.
  compile     each decoder layer under torch.compile (compile_blocks; optimizer and post-step stay eager).
  cuda_graph  the whole step (forward, backward, AdamW with capturable=True, post-step) captured in one
              CUDA graph on a side stream after the warm-up steps, replayed on static token buffers.
  compile_cuda_graph  both: the model under torch.compile (elementwise work fused), then the whole step
              captured as in cuda_graph (no host cost left: launches and Python run once, at capture).
What a row holds besides schema.REQUIRED_KEYS (see schema.E2E_KEYS): tokens_per_s, step wall time
(wall_ms median, p10/p90), host_ms (time to issue a step, ms), split_ms (forward / backward / optimizer /
post_step GPU time per step from CUDA events, eager and compile only), gpu_ms and gpu_busy (profiler
kernel time per step, and over wall time), kernel_class_ms (that kernel time by class: GEMM, quantize, attention,
optimizer, proxy update, elementwise, other) and floor_ms / floor_parts_ms (falqon_bench.measure.e2e_floor),
peak_mem_bytes, convert_s, loss_per_step.
"""

from __future__ import annotations

import gc
import math
import statistics
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import nn

from falqon_bench.measure import envinfo, timing
from falqon_bench.measure.causal_attention import use_maskless_causal_sdpa
from falqon_bench.measure.fast_stacks import liger_patches_of
from falqon_bench.suites.e2e_suite import COMPILED_MODES, GRAPH_MODES, identify_e2e_row
from falqon_bench.data.schema import new_row
from falqon_bench.measure.worker import one_line, record_failure

PHASES = ("forward", "backward", "optimizer", "post_step")


def synthetic_batch(generator: torch.Generator, batch: int, seq_len: int, vocab: int, device: torch.device) -> torch.Tensor:
    """batch x seq_len token ids: arithmetic sequences (random start, stride 1..3) mod vocab.

    Learnable (the next token follows from the last two), so the loss of a working run goes down.
    """
    start = torch.randint(0, vocab, (batch, 1), generator=generator)
    stride = torch.randint(1, 4, (batch, 1), generator=generator)
    return ((start + stride * torch.arange(seq_len)) % vocab).to(device)


def prepare_model(model: nn.Module, options: dict[str, Any]) -> None:
    """Everything done to the model's surroundings before conversion, in one place: attention without a mask
    tensor (the same kernels in every mode: falqon_bench.measure.causal_attention), liger-kernel patches."""
    use_maskless_causal_sdpa(model)
    if options.get("liger"):
        from falqon_bench.measure.fast_stacks import apply_liger  # issue #18; raises a clear error when unavailable

        apply_liger(model, rope=options.get("mode") not in COMPILED_MODES)  # compiled: RoPE stays (apply_liger says why)


@dataclass
class PhaseClock:
    """CUDA events around each phase of a step; `split()` is the median GPU ms per phase over recorded steps."""

    device: torch.device
    enabled: bool = False
    samples: dict[str, list[float]] = field(default_factory=lambda: {p: [] for p in PHASES})
    _pending: list[tuple[str, Any, Any]] = field(default_factory=list)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if not self.enabled or self.device.type != "cuda":
            yield
            return
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        yield
        end.record()
        self._pending.append((name, start, end))

    def collect(self) -> None:
        """After a synchronize: turn the recorded events into ms samples."""
        for name, start, end in self._pending:
            self.samples[name].append(start.elapsed_time(end))
        self._pending.clear()

    def split(self) -> dict[str, float] | None:
        if not all(self.samples.values()):
            return None
        return {p: statistics.median(v) for p, v in self.samples.items()}


@dataclass
class Training:
    """A converted model ready to step: what the modes share."""

    model: nn.Module  # the module called for the loss (compiled / DDP-wrapped)
    base: nn.Module  # the converted model itself (post-step work runs on it)
    method: Any
    optimizer: torch.optim.Optimizer
    clock: PhaseClock
    skip_grad_allreduce: bool = False

    def _forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=tokens, labels=tokens).loss

    def step(self, tokens: torch.Tensor, zero_grad: bool = True) -> torch.Tensor:
        """One training step; returns the loss (a device tensor: no host sync)."""
        clock = self.clock
        if zero_grad:
            self.optimizer.zero_grad(set_to_none=True)
        if self.skip_grad_allreduce and hasattr(self.model, "no_sync"):
            ctx = self.model.no_sync()  # ranks diverge: only for testing the fp8 sync check
        else:
            ctx = nullcontext()
        with ctx:
            with clock.phase("forward"):
                loss = self._forward(tokens)
            with clock.phase("backward"):
                loss.backward()
        with clock.phase("optimizer"):
            self.optimizer.step()
        with clock.phase("post_step"):
            self.method.after_optimizer_step(self.base)
        return loss.detach()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_training(point: dict[str, Any], device: torch.device, wrap: Callable[[nn.Module], nn.Module] | None = None):
    """(Training, convert_s, trainable element count): model made, prepared, converted (timed), optimizer built."""
    from falqon_core.convert import projection_targets
    from falqon_core.methods import AdapterConfig

    from falqon_bench.measure.fast_stacks import check_stack_point, convert_for_point  # issue #18: Unsloth, liger's modes
    from falqon_bench.suites.models import make_model

    opts = point["options"]
    check_stack_point(point, device)  # "unsupported: <why>" before a model is built
    model = make_model(point["model"], device, torch.bfloat16, num_layers=opts["layers"], seed=opts["seed"],
                       allow_pickle=bool(point.get("allow_pickle")))
    prepare_model(model, opts)
    adapter = AdapterConfig(rank=int(point["rank"]), target_modules=projection_targets(model), seed=opts["seed"],
                            options=dict(opts.get("method_options") or {}))
    _sync(device)
    t0 = time.perf_counter()
    model, method = convert_for_point(model, point, adapter)  # falqon_core's convert_model, or Unsloth's model
    _sync(device)
    convert_s = time.perf_counter() - t0
    params = method.trainable_parameters(model)
    if not params:
        raise ValueError(f"{point['method']} has no trainable parameters to fine-tune")
    if opts["mode"] in COMPILED_MODES:
        compile_blocks(model)
    outer = wrap(model) if wrap is not None else model
    capturable = opts["mode"] in GRAPH_MODES
    optimizer = torch.optim.AdamW(params, lr=opts["lr"], capturable=capturable)
    training = Training(outer, model, method, optimizer, PhaseClock(device))
    return training, convert_s, sum(p.numel() for p in params)


def build_fields(training: Training, convert_s: float, n_trainable: int) -> dict[str, Any]:
    """The row fields known once the model is built: conversion time, trainable elements, liger patches applied."""
    return {"convert_s": convert_s, "trainable_params": n_trainable,
            "liger_patches": list(liger_patches_of(training.base)) or None}


def compile_blocks(model: nn.Module) -> None:
    """torch.compile each decoder layer in place (as torchtitan does), else the whole model.

    The decoder layers share one code path and one shape, and dynamo treats their parameters as inputs, so the
    first layer's compiled graph serves all of them: compile time does not grow with depth (a whole 32-layer
    llama-7b compiled as one graph took minutes, and recompiled on its KV cache). The embedding, final norm,
    lm_head and loss stay eager: a few kernels per step.
    """
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        model.compile()
        return
    # one recompile per layer would be a bug, not a cost to hide: allow some, never a silent eager fallback
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 16)
    for layer in layers:
        layer.compile()


def make_batches(point: dict[str, Any], vocab: int, device: torch.device, data_rank: int = 0) -> list[torch.Tensor]:
    """Every step's tokens, made up front (seeded per process, so DDP ranks see different data)."""
    opts = point["options"]
    generator = torch.Generator().manual_seed(1000 + 7919 * opts["seed"] + data_rank)
    return [synthetic_batch(generator, opts["batch"], opts["seq_len"], vocab, device) for _ in range(opts["steps"])]


def run_steps(training: Training, batches: list[torch.Tensor], point: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Run every step in the point's mode; returns the measurements (times in ms, losses as floats)."""
    opts = point["options"]
    mode, warmup = opts["mode"], opts["warmup_steps"]
    if mode in GRAPH_MODES and device.type != "cuda":
        raise RuntimeError(f"{mode} mode needs a CUDA device (a CUDA graph captures GPU work)")
    losses: list[torch.Tensor] = []
    wall: list[float] = []
    host: list[float] = []
    replay: Callable[[torch.Tensor], torch.Tensor] | None = None
    for i, tokens in enumerate(batches):
        timed = i >= warmup
        training.clock.enabled = timed and mode not in GRAPH_MODES
        if mode in GRAPH_MODES and i == warmup:
            replay = capture_step(training, tokens, device)
        step = (lambda: replay(tokens)) if replay is not None else (lambda: training.step(tokens))
        loss, host_ms, wall_ms = timing.timed_call(step, device)
        training.clock.collect()
        if i == GRAD_CHECK_STEP:
            check_adapter_grads(training, mode)
        losses.append(loss)
        if timed:
            wall.append(wall_ms)
            host.append(host_ms)
    profiled = profile_steps(replay or training.step, batches, int(point.get("profile_steps") or 0), device)
    return {"wall": wall, "host": host, "losses": [float(v) for v in torch.stack(losses).float().cpu()], **profiled}


GRAD_CHECK_STEP = 1  # the second step: LoRA's A gets a gradient once B has left zero (after one optimizer step)


def check_adapter_grads(training: Training, mode: str) -> None:
    """Raise when a trainable tensor got no gradient, or an all-zero one, in this step: a backward that skipped
    work (seen on an H200 with torch 2.11: inductor-compiled FALQON left layer 0's B gradients zero while eager
    gives them) would otherwise be timed as a fast step. One host sync, once per point, outside the timed steps
    whenever warmup_steps >= 2."""
    names = {id(p): n for n, p in training.base.named_parameters()}
    trainable = [p for group in training.optimizer.param_groups for p in group["params"]]  # what the step trains
    missing = [names.get(id(p), "?") for p in trainable if p.grad is None]
    # an FSDP2 gradient is a DTensor: check this rank's shard (an empty shard has nothing to say)
    local = [(p, p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad) for p in trainable if p.grad is not None]
    local = [(p, g) for p, g in local if g.numel()]
    if local:
        nonzero = torch.stack([g.detach().ne(0).any() for _, g in local]).cpu().tolist()
        missing += [names.get(id(p), "?") for (p, _), ok in zip(local, nonzero) if not ok]
    if missing:
        raise RuntimeError(
            f"the {mode} step left {len(missing)} of {len(trainable)} trainable tensors without a gradient (zero or "
            f"none), e.g. {', '.join(missing[:3])}: its backward skipped work, so its time is not a training step's; "
            "run this method in eager or cuda_graph mode (scripts/gpu/compiled_grad_check.py compares with eager)"
        )


def capture_step(training: Training, tokens: torch.Tensor, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """Capture one whole step in a CUDA graph; returns replay(tokens) -> loss (a fresh tensor per call).

    The eager warm-up steps before this call allocated AdamW's state; grads are set to None so the captured
    backward writes them from the graph's pool (no zero_grad inside the graph).
    """
    static_tokens = tokens.clone()
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):  # one more eager step on the capture stream (lazy inits happen off-graph)
        training.step(static_tokens)
    torch.cuda.current_stream(device).wait_stream(stream)
    _sync(device)
    training.optimizer.zero_grad(set_to_none=True)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph, stream=stream):
            static_loss = training.step(static_tokens, zero_grad=False)
    except Exception as e:
        raise RuntimeError(f"capture of the whole step failed: {one_line(e)}") from e

    def replay(batch: torch.Tensor) -> torch.Tensor:
        static_tokens.copy_(batch)
        graph.replay()
        return static_loss.clone()

    return replay


def covered_time(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, stop) intervals (us in, us out): time at least one kernel ran."""
    covered, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop > end:
            covered += stop - max(start, end)
            end = stop
    return covered


def profile_steps(step: Callable[[torch.Tensor], torch.Tensor], batches: list[torch.Tensor], n: int,
                  device: torch.device) -> dict[str, Any]:
    """GPU kernel ms per step, gpu_busy and kernel launches per step, from torch.profiler over n more steps.

    gpu_busy = time the GPU runs at least one kernel (the union of kernel intervals) / wall time, so kernels
    overlapping on two streams are not counted twice. CPU: nothing to measure.
    """
    if n <= 0 or device.type != "cuda":
        return {"gpu_ms": None, "gpu_busy": None, "kernel_launches": None, "kernel_class_ms": None}
    from torch.profiler import ProfilerActivity, profile

    from falqon_bench.measure.breakdown import _unique_device_kernels
    from falqon_bench.measure.e2e_floor import kernel_class_ms

    _sync(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for i in range(n):
            step(batches[i % len(batches)])
        _sync(device)
        wall_ms = (time.perf_counter() - t0) * 1e3
    kernels = _unique_device_kernels(list(prof.events()))
    intervals = [(k.time_range.start, k.time_range.end) for k in kernels]
    busy_us = covered_time(intervals)
    kernel_ms = sum(stop - start for start, stop in intervals) / 1e3
    classes = kernel_class_ms(((k.name, k.time_range.end - k.time_range.start) for k in kernels), n)
    return {"gpu_ms": kernel_ms / n, "gpu_busy": busy_us / 1e3 / wall_ms if wall_ms > 0 else None,
            "kernel_launches": len(intervals) / n, "kernel_class_ms": classes}


def measurements_to_row(row: dict[str, Any], measured: dict[str, Any], point: dict[str, Any], split: dict | None) -> None:
    """Fill a row's REQUIRED_KEYS and e2e keys from run_steps' measurements (tokens/s from the median wall)."""
    wall, host = measured["wall"], measured["host"]
    s = timing.summarize(wall)
    row.update(wall_ms=s["median"], wall_p10_ms=s["p10"], wall_p90_ms=s["p90"], wall_samples_ms=wall)
    row["host_ms"] = statistics.median(host) if host else None
    row["tokens_per_s"] = point["tokens"] / (s["median"] / 1e3) if s["median"] else None
    row["split_ms"] = split
    if measured["gpu_ms"] is not None:
        row.update(gpu_ms=measured["gpu_ms"], gpu_samples_ms=[measured["gpu_ms"]], gpu_timing="profiler")
    row["gpu_busy"] = measured["gpu_busy"]
    row["kernel_launches"] = measured["kernel_launches"]
    row["kernel_class_ms"] = measured.get("kernel_class_ms")
    row["loss_per_step"] = measured["losses"]
    row["loss_first"], row["loss_last"] = measured["losses"][0], measured["losses"][-1]


def record_floor(row: dict[str, Any], training: Training, point: dict[str, Any], peaks: dict | None) -> None:
    """floor_ms and floor_parts_ms of the row (falqon_bench.measure.e2e_floor); left null without peaks or a kernel split,
    and noted in floor_error when the floor itself fails (the measurement stands)."""
    from falqon_bench.measure.e2e_floor import e2e_floor_ms

    try:
        parts = e2e_floor_ms(training.method, training.base.config, int(point["rank"]), int(point["tokens"]), peaks,
                             row.get("kernel_class_ms"), point["options"].get("method_options") or {})
    except Exception as e:  # a method without a step_cost, a config without LLaMA's fields
        row["floor_error"] = one_line(e)
        return
    if parts is not None:
        row["floor_parts_ms"] = parts
        row["floor_ms"] = parts["total"]


def e2e_base_row(point: dict[str, Any], device: torch.device, world_size: int, backend: str) -> dict[str, Any]:
    """schema.new_row plus every schema.E2E_KEYS key (null until measured)."""
    from falqon_bench.data.schema import E2E_KEYS

    row = new_row(point, envinfo.device_name(device))
    row.update({k: None for k in E2E_KEYS})
    row.update(identify_e2e_row(point), world_size=world_size, backend=backend)
    return row


def measure_point(point: dict[str, Any], ctx) -> dict[str, Any]:
    """Train one e2e point in this process; any failure is an error row (never raises, except Ctrl-C)."""
    device = torch.device(ctx.device)
    row = e2e_base_row(point, device, world_size=1, backend="none")
    t0 = time.perf_counter()
    training = None
    try:
        if point["options"]["mode"] in GRAPH_MODES and device.type != "cuda":
            raise RuntimeError(f"{point['options']['mode']} mode needs a CUDA device (a CUDA graph captures GPU work)")
        with timing.point_stream(device):
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            training, convert_s, n_trainable = build_training(point, device)
            row.update(build_fields(training, convert_s, n_trainable))
            vocab = int(training.base.config.vocab_size)
            measured = run_steps(training, make_batches(point, vocab, device), point, device)
            measurements_to_row(row, measured, point, training.clock.split())
            row["peak_mem_bytes"] = int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None
            record_floor(row, training, point, getattr(ctx, "peaks", None))
        if not all(math.isfinite(v) for v in row["loss_per_step"]):
            row.update(error_type="NonFiniteLoss", error=f"loss is not finite: {row['loss_per_step'][:4]}...")
        else:
            row.update(status="ok", error=None)
    except Exception as e:  # one method's failure (OOM, capture, unsupported op) is one error row
        record_failure(row, e)
    finally:
        row["duration_s"] = round(time.perf_counter() - t0, 4)
        del training
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row
