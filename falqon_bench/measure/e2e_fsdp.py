"""FSDP2 (`torch.distributed.fsdp.fully_shard`) for e2e points with `parallel = "fsdp"`: models that do not fit one GPU.

How the model is built (so no rank ever holds the whole bf16 model): the LLaMA skeleton is made on the meta device;
then, one decoder layer at a time, every rank materializes the layer on its device (random init from the point's
seed and the layer index, the same bytes on every rank), converts it with the method, and shards it with
fully_shard; the layer's full bf16 weights are freed before the next layer is made. The embedding, final norm and
LM head come last, and the root module is sharded over what is left. Peak memory while building is the sharded
model plus one full layer. (The weights differ from the DDP path's `make_model` init: another RNG order, the same
distribution; only a named config is built this way, not a local model directory.)

FALQON's fp8 melded [W; A] matrices are buffers, and fully_shard shards parameters only: they are REPLICATED on
every rank, and only B (N x r, the trainable parameter) and the frozen bf16 parameters (norms, embedding, LM head)
are sharded. Why replicated rather than sharded:
  - every forward and backward GEMM reads the whole melded matrix: sharded, it would be all-gathered twice per step
    (1 byte per weight each time); replicated, the weights cost no communication at all;
  - the proxy update ranks B's rows over all N rows and rewrites the chosen rows of W8: sharded W8 rows would need a
    global top-k and a scatter of the merged rows;
  - at 1 byte per weight, a 70B-class backbone is ~70 GB: it fits one 141 GB H200 replicated.
The cost is memory per rank (the fp8 backbone is not divided by the world size) and a few collectives after the
optimizer step: B is all-gathered (N x r fp32 per layer), the proxy update runs on the full B on every rank (same
input, same kernels, so the same fp8 bytes), and B's new value is written back into this rank's shard. The e2e
run checks the fp8 bytes bit-identical across ranks after training (`weights_in_sync`). HALO's frozen fp8 weights
are buffers too and are replicated the same way.

With one process (torchrun --nproc-per-node 1, or no torchrun) nothing is sharded: the point is the layer-by-layer
build alone, which is what lets one GPU hold a model whose bf16 weights it could never hold (FALQON's 70B-class).

A method that fully_shard or FSDP2's forward cannot handle (a tensor subclass weight, a CUDA-graph mode) is one
error row "unsupported: fsdp: <reason>" (error_type "unsupported"); an OOM stays an OOM.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

class FsdpUnsupported(RuntimeError):
    """A point that FSDP2 cannot run as configured; its row reads "unsupported: fsdp: <reason>"."""


def parallel_of(point: dict[str, Any]) -> str:
    """'ddp' (the default, absent from the point options so old point ids stay stable) or 'fsdp'."""
    return str(point["options"].get("parallel", "ddp"))


def materialize(module: nn.Module, device: torch.device, seed: int, std: float) -> None:
    """Give a meta-device module real storage on `device` and LLaMA's init (normal(0, std) weights, unit norms).

    Seeded here, so every rank makes the same bytes; only the module's own meta tensors are touched.
    """
    module.to_empty(device=device, recurse=True)
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for sub in module.modules():
            if isinstance(sub, (nn.Linear, nn.Embedding)):
                sub.weight.normal_(0.0, std, generator=generator)
                if getattr(sub, "bias", None) is not None:
                    sub.bias.zero_()
            elif type(sub).__name__.endswith("RMSNorm"):
                sub.weight.fill_(1.0)


def _unwrap_peft(model: nn.Module) -> nn.Module:
    """PEFT's get_peft_model wraps the converted module; its LoRA layers live in the module itself, so keep that."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _meta_llama(point: dict[str, Any]):
    """The point's named LLaMA config as a bf16 model on the meta device (no memory), KV cache off, all frozen."""
    from transformers import LlamaForCausalLM

    from falqon_bench.suites.models import is_model_dir, llama_config

    if is_model_dir(point["model"]):
        raise FsdpUnsupported("a local model directory is not built layer by layer yet; use a named model config")
    config = llama_config(point["model"], point["options"]["layers"])
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("meta"):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.config.use_cache = False
    for p in model.parameters():
        p.requires_grad_(False)
    return model, config


def build_sharded_model(point: dict[str, Any], device: torch.device, world_size: int):
    """(model, method, convert_s): built, converted and fully_shard-ed layer by layer (module docstring)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from falqon_core.convert import LLAMA_TARGET_MODULES, convert_model
    from falqon_core.methods import AdapterConfig

    opts = point["options"]
    model, config = _meta_llama(point)
    mesh = init_device_mesh(device.type, (world_size,)) if world_size > 1 else None
    std, seed = float(config.initializer_range), int(opts["seed"])
    convert_s, method = 0.0, None
    layers = model.model.layers
    for i in range(len(layers)):
        computed = [name for name, _ in layers[i].named_buffers()]
        if computed:  # a per-layer rotary embedding (older transformers): to_empty would leave its inv_freq garbage
            raise FsdpUnsupported(f"decoder layer {i} has computed buffers ({', '.join(computed[:3])}) that the meta-device "
                                  "build cannot make; a transformers with one model-level rotary embedding is needed")
        materialize(layers[i], device, seed=seed * 1_000_003 + i, std=std)
        adapter = AdapterConfig(rank=int(point["rank"]), target_modules=LLAMA_TARGET_MODULES, seed=seed + i,
                                options=dict(opts.get("method_options") or {}))
        t0 = time.perf_counter()
        converted, method = convert_model(layers[i], point["method"], adapter)
        convert_s += time.perf_counter() - t0
        layers[i] = _unwrap_peft(converted)
        _shard(fully_shard, layers[i], mesh, f"decoder layer {i}")
    rest = [model.model.embed_tokens, model.model.norm, model.lm_head]
    for j, module in enumerate(rest):
        materialize(module, device, seed=seed * 1_000_003 + len(layers) + j, std=std)
    if hasattr(model.model, "rotary_emb"):  # inv_freq is computed from the config, not random: make it anew
        model.model.rotary_emb = type(model.model.rotary_emb)(config).to(device)
    _shard(fully_shard, model, mesh, "the root module")
    return model, method, convert_s


def unshardable_parameters(module: nn.Module) -> list[str]:
    """'name (Type)' of each parameter fully_shard would split as raw storage and break: a tensor subclass (e.g.
    bitsandbytes' Params4bit, a torchao quantized weight) that does not define FSDP2's fsdp_pre_all_gather hook.
    Parameters a child FSDP unit already sharded (DTensors) are not this unit's."""
    from torch.distributed.tensor import DTensor

    return [f"{name} ({type(p).__name__})" for name, p in module.named_parameters()
            if type(p) not in (torch.Tensor, nn.Parameter) and not isinstance(p, DTensor)
            and not hasattr(p, "fsdp_pre_all_gather")]


def _shard(fully_shard, module: nn.Module, mesh, what: str) -> None:
    """fully_shard over the mesh; one process (no mesh) shards nothing: the layer-by-layer build is what counts."""
    if mesh is None:
        return
    refused = unshardable_parameters(module)
    if refused:
        raise FsdpUnsupported(f"{what} holds tensor-subclass parameters that FSDP2 cannot all-gather (they define no "
                              f"fsdp_pre_all_gather): {', '.join(refused[:3])}")
    try:
        fully_shard(module, mesh=mesh)
    except Exception as e:
        from falqon_bench.measure.worker import one_line

        raise FsdpUnsupported(f"fully_shard refused {what}: {one_line(e)}") from e


class ShardedPostStep:
    """A method's after_optimizer_step on an FSDP2 model: run it on full (all-gathered) trainable tensors.

    FSDP2 keeps B as a Shard(0) DTensor; FALQON's proxy update needs all of B next to the replicated W8. So the
    non-root FSDP modules are unsharded (B all-gathered), the method's step runs on plain tensors exactly as on
    one GPU, B's new value is sliced back into this rank's shard, and the modules are resharded. Methods without
    post-step work skip all of it (no collective).
    """

    def __init__(self, method, model: nn.Module):
        from falqon_core.methods.base import Method
        from torch.distributed.fsdp import FSDPModule

        self.method = method
        self.model = model
        self.needed = type(method).after_optimizer_step is not Method.after_optimizer_step
        self.units = [m for m in model.modules() if isinstance(m, FSDPModule) and m is not model]

    def after_optimizer_step(self, base: nn.Module) -> None:
        if not self.needed:
            return
        from torch.distributed.tensor import DTensor, Replicate

        sharded = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        for unit in self.units:
            unit.unshard()
        try:
            full = {n: self.model.get_parameter(n) for n in sharded}
            still = [n for n, p in full.items() if isinstance(p, DTensor)]
            if still:
                raise FsdpUnsupported(f"trainable parameters outside the decoder layers stay sharded: {still[:4]}")
            self.method.after_optimizer_step(base)
            with torch.no_grad():
                for name, shard in sharded.items():
                    if not isinstance(shard, DTensor):
                        continue
                    whole = DTensor.from_local(full[name].detach(), shard.device_mesh, [Replicate()], run_check=False)
                    shard.to_local().copy_(whole.redistribute(shard.device_mesh, shard.placements).to_local())
        finally:
            for unit in self.units:
                unit.reshard()


def build_fsdp_training(point: dict[str, Any], device: torch.device, world_size: int):
    """(Training, convert_s, trainable element count) for an FSDP2 point; raises FsdpUnsupported for what cannot run."""
    from falqon_bench.measure.e2e_step import PhaseClock, Training
    from falqon_bench.suites.e2e_suite import COMPILED_MODES, GRAPH_MODES

    mode = point["options"]["mode"]
    if mode in GRAPH_MODES:
        raise FsdpUnsupported(f"mode {mode}: a CUDA graph cannot capture FSDP2's per-step all-gathers and reduce-scatters "
                              "as run here; use eager or compile")
    model, method, convert_s = build_sharded_model(point, device, world_size)
    params = method.trainable_parameters(model)
    if not params:
        raise ValueError(f"{point['method']} has no trainable parameters to fine-tune")
    outer = torch.compile(model) if mode in COMPILED_MODES else model
    optimizer = torch.optim.AdamW(params, lr=point["options"]["lr"])
    training = Training(outer, model, ShardedPostStep(method, model), optimizer, PhaseClock(device))
    return training, convert_s, sum(p.numel() for p in params)


def unsupported_message(e: BaseException) -> str:
    """The row's error text for a point FSDP2 cannot run (the reason already names any library error)."""
    return f"unsupported: fsdp: {' '.join(str(e).split())}"


def unsupported_in_worker(point: dict[str, Any], ctx) -> dict[str, Any]:
    """`falqon-bench run` measures e2e points in a worker that builds the whole model at once: an fsdp point is one
    "unsupported" row there that says how to run it."""
    from falqon_bench.measure.e2e_step import e2e_base_row

    row = e2e_base_row(point, torch.device(ctx.device), world_size=1, backend="none")
    row.update(parallel="fsdp", error_type="unsupported",
               error="unsupported: fsdp: parallel = fsdp runs in python -m falqon_bench.measure.e2e SUITE --out DIR (one GPU), "
                     "or under torchrun --nproc-per-node N -m falqon_bench.measure.e2e SUITE --out DIR")
    return row
