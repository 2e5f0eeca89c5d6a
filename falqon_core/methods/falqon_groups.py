"""FALQON layers of one shape, stacked so that one step's proxy update is a few launches for the whole model.

Why: the update runs after every optimizer step in every FalqonLinear; LLaMA-7B has 224 of them, and one at a
time they cost ~1100 launches and their host time per step. Layers with the same (N, K, r, fp8 dtype, device,
k schedule) become one ProxyUpdateGroup:
  melded  L x (N + r_pad) x K fp8: each layer's `melded` buffer is the view melded[l]
  lora_b  L x N x r fp32: each layer's `lora_B` parameter is a view of lora_b[l]
The parameters stay one nn.Parameter per layer (an optimizer gets the same list as before and updates the
views in place), so one update of the group (falqon_core.kernels.proxy_update_batched) sees every B at once.

Stacking happens at conversion, before an optimizer holds the parameters (stack_layers). Layers whose update
is not the plain one (a variant: stochastic rounding, merge="grid", keep_unmerged, lost-update tracking, a
cached W8^T) keep their own per-layer update, and so does any layer whose tensors no longer are the group's
views (e.g. after `model.to()`, which gives each parameter its own storage): the grouped path only runs when
it computes exactly what the per-layer updates would.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable

import torch
from torch import nn

from falqon_core.kernels.proxy_update_batched import proxy_update_batched_

if TYPE_CHECKING:
    from falqon_core.methods.falqon import FalqonLinear


@dataclass(eq=False)
class ProxyUpdateGroup:
    """The stacked tensors of L FALQON layers of one shape (module docstring). Layers point to it through
    `layer.proxy_group` and `layer.proxy_group_index`; the group does not hold the layers."""

    melded: torch.Tensor  # L x (N + r_pad) x K fp8
    lora_b: torch.Tensor  # L x N x r fp32

    def __post_init__(self) -> None:
        # where layer l's B and melded matrix start: the check that a layer still uses its slice (holds)
        self.slice_ptrs = [(self.lora_b[i].data_ptr(), self.melded[i].data_ptr()) for i in range(self.size)]

    @property
    def size(self) -> int:
        return self.melded.shape[0]

    def holds(self, layers: list[FalqonLinear]) -> bool:
        """True when `layers` are exactly this group's L layers, each still on its own slice, and all of them
        would now run the plain update with one k (host checks only: no device work, no sync)."""
        if len(layers) != self.size or {layer.proxy_group_index for layer in layers} != set(range(self.size)):
            return False
        ks = {layer.next_k() for layer in layers}
        if len(ks) != 1:
            return False
        for layer in layers:
            i = layer.proxy_group_index
            if not layer.uses_plain_update():
                return False
            if (layer.lora_B.data_ptr(), layer.melded.data_ptr()) != self.slice_ptrs[i]:
                return False
        return True

    @torch.no_grad()
    def update(self, layers: list[FalqonLinear]) -> torch.Tensor:
        """The proxy update of every layer of the group at once (callers check `holds(layers)` first).

        Returns rows (L x k); each layer's host counters (updates_done, last_k) advance as in its own update.
        """
        k = layers[0].next_k()
        rows = proxy_update_batched_(self.melded, self.lora_b, k)
        for layer in layers:
            layer.last_k = k
            layer.updates_done += 1
        return rows


def group_key(layer: FalqonLinear) -> tuple:
    """Layers with equal keys can share one batched update: same shapes, formats, device and k schedule."""
    return (
        layer.out_features, layer.in_features, layer.rank, tuple(layer.melded.shape), layer.melded.dtype,
        layer.melded.device, layer.topk, layer.topk_after, layer.warmup_steps, layer.updates_done,
    )


@torch.no_grad()
def stack_layers(layers: Iterable[FalqonLinear]) -> list[ProxyUpdateGroup]:
    """Group `layers` by group_key and move each group's melded buffers and B parameters into stacked tensors.

    Call before an optimizer is built: each layer's `lora_B` becomes a new nn.Parameter (a view of the stack)
    with the same values. Layers on a variant update (a flush schedule included), with a cached W8^T, already grouped, or alone in their
    group are left as they are. Memory: each melded buffer is copied once into its stack and the old one freed,
    so conversion peaks at one group's size above the converted model.
    """
    by_key: dict[tuple, list[FalqonLinear]] = {}
    for layer in layers:
        if layer.proxy_group is None and layer.uses_plain_update() and layer.weight_t is None:
            by_key.setdefault(group_key(layer), []).append(layer)
    groups = []
    for members in by_key.values():
        if len(members) < 2:
            continue
        first = members[0]
        melded = torch.empty((len(members), *first.melded.shape), dtype=first.melded.dtype, device=first.melded.device)
        lora_b = torch.empty((len(members), *first.lora_B.shape), dtype=first.lora_B.dtype, device=first.lora_B.device)
        group = ProxyUpdateGroup(melded, lora_b)
        for i, layer in enumerate(members):
            melded[i].view(torch.uint8).copy_(layer.melded.view(torch.uint8))
            lora_b[i].copy_(layer.lora_B.detach())
            requires_grad = layer.lora_B.requires_grad
            layer.melded = melded[i]  # replaces the registered buffer (frees the layer's own copy)
            layer.lora_B = nn.Parameter(lora_b[i], requires_grad=requires_grad)
            layer.proxy_group, layer.proxy_group_index = group, i
        groups.append(group)
    return groups


def run_proxy_updates(layers: Iterable[FalqonLinear]) -> None:
    """The proxy update of every layer: one batched update per intact group, the per-layer update for the rest."""
    grouped: dict[int, tuple[ProxyUpdateGroup, list[FalqonLinear]]] = {}
    single: list[FalqonLinear] = []
    for layer in layers:
        group = layer.proxy_group
        if group is None:
            single.append(layer)
        else:
            grouped.setdefault(id(group), (group, []))[1].append(layer)
    for group, members in grouped.values():
        if group.holds(members):
            group.update(members)
        else:
            single.extend(members)
    for layer in single:
        layer.proxy_update()
