"""What the PEFT-based baselines share: finding the target linears, adding bf16 LoRA adapters with PEFT,
counting a step's FLOPs and bytes, and counting the bytes a model holds (incl. quantized storage).

Private to falqon_core.methods; falqon_core.convert re-exports `linear_module_names`.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from falqon_core.methods.base import AdapterConfig, MethodUnavailable

BF16_BYTES = 2
FP8_BYTES = 1


# ---------------------------------------------------------------------------------------------------------
# finding linears


def linear_module_names(model: nn.Module) -> list[str]:
    """Full names of every nn.Linear (or subclass) in `model`, in module order."""
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear) and name]


def name_matches(name: str, targets: Iterable[str]) -> bool:
    """PEFT's rule: a target matches a module whose full name equals it or ends with '.' + target."""
    return any(name == t or name.endswith("." + t) for t in targets)


def select_target_linears(model: nn.Module, target_modules: tuple[str, ...] | None) -> list[str]:
    """Full names of the nn.Linear modules to convert: those matching `target_modules`, or all when None.

    Raises ValueError naming the linears that exist when nothing matches.
    """
    names = linear_module_names(model)
    if target_modules is None:
        selected = names
    else:
        selected = [n for n in names if name_matches(n, target_modules)]
    if not selected:
        present = ", ".join(names[:20]) or "none"
        raise ValueError(f"no nn.Linear matches target_modules={target_modules!r}; linears in the model: {present}")
    return selected


def linear_shapes(model: nn.Module, names: Iterable[str]) -> dict[str, tuple[int, int]]:
    """name -> (K = in_features, N = out_features) for the named linears."""
    modules = dict(model.named_modules())
    return {n: (modules[n].in_features, modules[n].out_features) for n in names}


def require_dims_multiple_of(
    method: str, shapes: dict[str, tuple[int, int]], rank: int | None, multiple: int, why: str
) -> None:
    """Raise MethodUnavailable when the rank or any layer's K or N is not a multiple of `multiple`.

    rank None: the caller's rank is not constrained (halo_lora, fp8_base_lora), so the hint names only K and N.
    """
    problems = []
    if rank is not None and rank % multiple:
        problems.append(f"rank {rank}")
    for name, (k, n) in shapes.items():
        if k % multiple or n % multiple:
            problems.append(f"{name} (K={k}, N={n})")
    if problems:
        hint = (
            f"Use a rank and layer sizes that are multiples of {multiple} (e.g. rank {multiple} or {3 * multiple})."
            if rank is not None
            else f"Use layer sizes (K and N) that are multiples of {multiple}."
        )
        raise MethodUnavailable(
            f"{method}: {why} needs every GEMM dimension divisible by {multiple}; not divisible: "
            f"{', '.join(problems[:8])}. {hint}"
        )


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at dotted `name` by `new`."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


# ---------------------------------------------------------------------------------------------------------
# adding adapters


def freeze_all(model: nn.Module) -> None:
    """requires_grad=False on every parameter (the backbone is never trained by these methods)."""
    for p in model.parameters():
        p.requires_grad_(False)


def build_lora_config(config: AdapterConfig, target_names: list[str]):
    """The PEFT LoraConfig of every LoRA baseline: r, alpha from `config`, no dropout, no bias, the given linears."""
    from peft import LoraConfig

    return LoraConfig(
        r=config.rank,
        lora_alpha=config.lora_alpha,
        lora_dropout=0.0,
        bias="none",
        target_modules=list(target_names),
    )


def lora_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(full name, PEFT LoraLayer) pairs of a PEFT model."""
    from peft.tuners.lora import LoraLayer

    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]


def add_lora_adapters(model: nn.Module, config: AdapterConfig, target_names: list[str]) -> nn.Module:
    """Wrap the named linears with PEFT LoRA (get_peft_model); adapters in config.dtype; all else frozen.

    PEFT keeps bf16 adapters in fp32 unless told not to (autocast_adapter_dtype) and makes fp32 adapters
    over quantized (uint8) base weights; both are cast to config.dtype so every baseline trains bf16 A, B.
    A is initialized by PEFT (kaiming) under config.seed; B starts at zero.
    """
    from peft import get_peft_model

    freeze_all(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        peft_model = get_peft_model(model, build_lora_config(config, target_names), autocast_adapter_dtype=False)
    for _, layer in lora_layers(peft_model):
        layer.lora_A.to(config.dtype)
        layer.lora_B.to(config.dtype)
    return peft_model


# ---------------------------------------------------------------------------------------------------------
# step cost: FLOPs and bytes of one fwd + bwd + SGD step of one K -> N layer at M = tokens


def gemm_flops(m: int, n: int, k: int) -> float:
    """2*M*N*K: one multiply and one add per term."""
    return 2.0 * m * n * k


def frozen_base_flops(K: int, N: int, tokens: int) -> float:
    """Frozen W (N x K): forward Y = X.W^T and backward dX = dY.W; no dW GEMM."""
    return 2 * gemm_flops(tokens, N, K)


def adapter_flops(K: int, N: int, rank: int, tokens: int) -> float:
    """LoRA path, 6 GEMMs: forward O_A = X.A^T (M r K), O_B = O_A.B^T (M N r);
    backward dB = dY^T.O_A (N r M), dO_A = dY.B (M r N), dA = dO_A^T.X (r K M), dX_A = dO_A.A (M K r)."""
    return 3 * (gemm_flops(tokens, rank, K) + gemm_flops(tokens, N, rank))


def cast_bytes(numel: int, src_bytes: int = BF16_BYTES, dst_bytes: int = FP8_BYTES) -> float:
    """One cast pass: read every element at src width, write it at dst width."""
    return float(numel) * (src_bytes + dst_bytes)


def lora_elementwise_bytes(K: int, N: int, tokens: int, elem_bytes: int = BF16_BYTES) -> float:
    """PEFT's `result + lora_B(lora_A(x)) * scaling` outside the GEMMs, in bytes:
    forward: scale O_B (read + write M x N) and add to Y (read 2, write 1 M x N) = 5 M N;
    backward: dY * scaling (read + write M x N) = 2 M N, and the two dX contributions summed
    (read 2, write 1 M x K) = 3 M K."""
    return float(elem_bytes) * (7 * tokens * N + 3 * tokens * K)


def sgd_update_bytes(K: int, N: int, rank: int, elem_bytes: int = BF16_BYTES) -> float:
    """The timed step's SGD update of A (r x K) and B (N x r): read param and grad, write param."""
    return 3.0 * elem_bytes * rank * (K + N)
