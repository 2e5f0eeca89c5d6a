"""The batched proxy update (one launch for all layers of one shape) against the per-layer update it replaces.

Claims: per layer, the batched Triton kernel gives the same fp8 bytes and the same rows as the per-layer Triton
kernel for any inputs (same ranking ops, same fp32 summation order), and as the torch reference where the sums
are exact in fp32 (see test_kernels_proxy_update.exact_inputs); a converted model stacks its layers by shape,
AdamW still trains them, and Falqon.after_optimizer_step with groups equals one update per layer, bit for bit.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from falqon_core import fp8
from falqon_core.kernels.proxy_update import proxy_update_reference_, proxy_update_triton_
from falqon_core.kernels.proxy_update_batched import (
    proxy_update_batched_,
    proxy_update_batched_reference_,
    proxy_update_batched_triton_,
)
from falqon_core.methods import AdapterConfig, get_method
from falqon_core.methods.falqon import FalqonLinear, falqon_layers, pad_rows
from falqon_core.methods.falqon_groups import run_proxy_updates, stack_layers
from tests.test_kernels_proxy_update import exact_inputs


def stacked(layers_w8_a8: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """L x (N + r_pad) x K fp8, each layer [W8; A8; zero rows] as FalqonLinear stores it."""
    mats = [pad_rows(torch.cat([w.view(torch.uint8), a.view(torch.uint8)]).view(fp8.E4M3)) for w, a in layers_w8_a8]
    return torch.stack([m.view(torch.uint8) for m in mats]).view(fp8.E4M3)


def general_inputs(n_layers: int, n: int, k_dim: int, r: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    pairs = [((torch.randn(n, k_dim, generator=g) * 64).to(fp8.E4M3), (torch.randn(r, k_dim, generator=g) * 20).to(fp8.E4M3))
             for _ in range(n_layers)]
    b = torch.randn(n_layers, n, r, generator=g) * 0.3  # fp32, as FalqonLinear's B
    return stacked(pairs), b


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.view(torch.uint8), b.view(torch.uint8))


@pytest.mark.parametrize("n_layers,n,k_dim,r,k", [(3, 40, 300, 5, 7), (2, 33, 129, 3, 33), (4, 24, 64, 7, 1)])
def test_batched_kernel_is_bit_identical_to_the_per_layer_kernel_for_general_inputs(n_layers, n, k_dim, r, k):
    melded, b = general_inputs(n_layers, n, k_dim, r, seed=n)
    per_layer = melded.clone()
    rows_b = proxy_update_batched_triton_(melded, b.clone(), k)
    for i in range(n_layers):
        rows_i = proxy_update_triton_(per_layer[i, :n], per_layer[i, n : n + r], b[i].clone(), k)
        assert torch.equal(rows_b[i].sort().values, rows_i.sort().values)
    assert not same_bytes(melded, general_inputs(n_layers, n, k_dim, r, seed=n)[0]), "nothing merged: vacuous"
    assert same_bytes(melded, per_layer)


def test_batched_kernel_equals_the_torch_reference_when_sums_are_exact():
    n, k_dim, r, k = 40, 200, 5, 6
    layers = [exact_inputs(n, k_dim, r, k) for _ in range(3)]
    melded = stacked([(w, a) for w, a, _ in layers])
    b = torch.stack([bb.float() for _, _, bb in layers])
    reference = melded.clone()
    rows_r = proxy_update_batched_reference_(reference, b.clone(), k)
    b_t = b.clone()
    rows_t = proxy_update_batched_triton_(melded, b_t, k)
    assert torch.equal(rows_t.sort(dim=1).values, rows_r.sort(dim=1).values)
    assert same_bytes(melded, reference)
    assert (b_t == 0).all()
    # the adapter rows and the padding rows never change
    w_only = stacked([(w, a) for w, a, _ in layers])
    assert same_bytes(melded[:, n:], w_only[:, n:])


def test_batched_reference_is_the_per_layer_reference_layer_by_layer():
    melded, b = general_inputs(2, 24, 48, 3, seed=5)
    per_layer = melded.clone()
    rows = proxy_update_batched_(melded, b.clone(), 4)  # CPU tensors: the reference path
    for i in range(2):
        assert torch.equal(rows[i], proxy_update_reference_(per_layer[i, :24], per_layer[i, 24:27], b[i].clone(), 4))
    assert same_bytes(melded, per_layer)


def test_batched_update_rejects_bad_arguments_with_clear_errors():
    melded, b = general_inputs(2, 16, 32, 3, seed=0)
    with pytest.raises(ValueError, match="k must be in"):
        proxy_update_batched_triton_(melded, b, 17)
    with pytest.raises(ValueError, match="N \\+ r rows"):
        proxy_update_batched_triton_(melded, b[:1], 2)
    with pytest.raises(ValueError, match="L x"):
        proxy_update_batched_triton_(melded[0], b[0], 2)


# ---------------------------------------------------------------- grouping in a converted model


class Blocks(nn.Module):
    """Two blocks of three linears: q and v are 48 -> 48, up is 48 -> 80 (two shapes, two layers of each per
    shape and block), plus one odd 48 -> 40 linear alone in its shape."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"q": nn.Linear(48, 48, bias=False), "v": nn.Linear(48, 48, bias=False), "up": nn.Linear(48, 80)})
            for _ in range(2)
        )
        self.head = nn.Linear(48, 40, bias=False)

    def forward(self, x):
        for blk in self.blocks:
            x = x + blk["q"](x) * torch.sigmoid(blk["v"](x)) + blk["up"](x)[..., :48]
        return self.head(x)


def convert(options=None, rank=5):
    torch.manual_seed(0)
    method = get_method("falqon")
    model = method.convert(Blocks(), AdapterConfig(rank=rank, options=options or {}, seed=0))
    return method, model


@pytest.fixture
def triton_path(monkeypatch):
    """The proxy updates (per layer and batched) take their Triton kernels; the forward keeps its torch reference
    (the Triton forward under the interpreter would only make these tests slow)."""
    from falqon_core.methods import falqon, falqon_groups

    monkeypatch.setattr(falqon, "proxy_update_", proxy_update_triton_)
    monkeypatch.setattr(falqon_groups, "proxy_update_batched_", proxy_update_batched_triton_)


def train_steps(method, model, steps, lr=0.05, per_layer=False):
    """AdamW on the method's parameters, then the proxy update: grouped, or one layer at a time."""
    opt = torch.optim.AdamW(method.trainable_parameters(model), lr=lr)
    g = torch.Generator().manual_seed(3)
    losses = []
    for _ in range(steps):
        x = torch.randn(16, 48, generator=g).bfloat16()
        loss = model(x).float().square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if per_layer:
            with torch.no_grad():
                for _, layer in falqon_layers(model):
                    layer.proxy_update()
        else:
            method.after_optimizer_step(model)
        losses.append(loss.item())
    return losses


def test_convert_stacks_layers_of_one_shape_and_leaves_a_lone_layer_alone():
    _, model = convert()
    groups = {id(layer.proxy_group): layer.proxy_group for _, layer in falqon_layers(model) if layer.proxy_group}
    assert sorted(g.size for g in groups.values()) == [2, 4]  # up x2, q/v x4
    assert model.head.proxy_group is None
    for _, layer in falqon_layers(model):
        g = layer.proxy_group
        if g is not None:
            assert layer.lora_B.data_ptr() == g.lora_b[layer.proxy_group_index].data_ptr()
            assert layer.melded.data_ptr() == g.melded[layer.proxy_group_index].data_ptr()
            assert isinstance(layer.lora_B, nn.Parameter) and layer.lora_B.requires_grad


def test_stacking_changes_no_value_and_the_model_computes_the_same():
    torch.manual_seed(0)
    plain = Blocks()
    torch.manual_seed(0)
    method = get_method("falqon")
    model = method.convert(copy.deepcopy(plain), AdapterConfig(rank=5, seed=0))
    loose = copy.deepcopy(plain)
    for name in ("q", "v", "up"):
        for blk, ref in zip(loose.blocks, model.blocks):
            layer = FalqonLinear(blk[name], 5)
            assert same_bytes(layer.melded, ref[name].melded)  # the same init, now a slice of the stack
    x = torch.randn(4, 48).bfloat16()
    assert torch.isfinite(model(x).float()).all()


def test_grouped_training_equals_per_layer_training_bit_for_bit(triton_path):
    method, model = convert()
    twin = copy.deepcopy(model)
    assert twin.blocks[0]["q"].proxy_group is twin.blocks[1]["v"].proxy_group  # deepcopy keeps the stacks shared
    before = model.blocks[0]["q"].melded.view(torch.uint8).clone()
    losses = train_steps(method, model, 3)
    twin_losses = train_steps(method, twin, 3, per_layer=True)
    assert losses == twin_losses
    assert not torch.equal(model.blocks[0]["q"].melded.view(torch.uint8), before), "nothing merged: vacuous"
    for (_, a), (_, b) in zip(falqon_layers(model), falqon_layers(twin)):
        assert same_bytes(a.melded, b.melded) and a.updates_done == b.updates_done == 3 and a.last_k == b.last_k
        assert torch.count_nonzero(a.lora_B) == 0


def test_grouped_update_is_one_batched_call_per_group(triton_path, monkeypatch):
    from falqon_core.methods import falqon_groups

    method, model = convert()
    calls = []
    real = falqon_groups.proxy_update_batched_
    monkeypatch.setattr(falqon_groups, "proxy_update_batched_", lambda m, b, k: calls.append(m.shape[0]) or real(m, b, k))
    train_steps(method, model, 1)
    assert sorted(calls) == [2, 4]


def test_batched_update_can_be_switched_off_and_is_checked():
    _, model = convert({"batched_update": False})
    assert all(layer.proxy_group is None for _, layer in falqon_layers(model))
    with pytest.raises(ValueError, match="batched_update must be true or false"):
        convert({"batched_update": "yes"})


def test_variants_keep_their_per_layer_update():
    _, model = convert({"rounding": "stochastic"})
    assert all(layer.proxy_group is None for _, layer in falqon_layers(model))
    _, model = convert({"cache_weight_t": True})
    assert all(layer.proxy_group is None for _, layer in falqon_layers(model))


def test_a_flush_schedule_keeps_or_takes_a_layer_out_of_the_batched_update(triton_path):
    _, model = convert({"flush_every": 2})
    assert all(layer.proxy_group is None for _, layer in falqon_layers(model))
    method, model = convert()  # stacked, then given a flush schedule: the per-layer update runs, flush included
    layer = model.blocks[0]["q"]
    assert layer.proxy_group is not None
    layer.flush_every = 1
    train_steps(method, model, 2)
    assert layer.flushes_done == 2


def test_tracking_lost_updates_after_stacking_falls_back_to_the_per_layer_update(triton_path):
    method, model = convert()
    for _, layer in falqon_layers(model):
        layer.track_lost = True
    train_steps(method, model, 2)
    stats = model.blocks[0]["q"].lost_stats
    assert stats is not None and int(stats[2]) == 2 * 5  # rows merged by two per-layer updates at k = r


def test_a_layer_moved_off_its_slice_falls_back_and_stays_correct(triton_path):
    method, model = convert()
    twin = copy.deepcopy(model)
    for m in (model, twin):  # e.g. what model.to() does: each parameter gets storage of its own
        m.blocks[1]["up"].lora_B = nn.Parameter(m.blocks[1]["up"].lora_B.detach().clone())
    train_steps(method, model, 2)
    train_steps(method, twin, 2, per_layer=True)
    for (_, a), (_, b) in zip(falqon_layers(model), falqon_layers(twin)):
        assert same_bytes(a.melded, b.melded)


def test_the_k_schedule_still_applies_to_grouped_layers(triton_path):
    method, model = convert({"topk": 4, "topk_after": 2, "warmup_steps": 1})
    assert model.blocks[0]["q"].proxy_group is not None
    train_steps(method, model, 2)
    assert {layer.last_k for _, layer in falqon_layers(model)} == {2}


def test_stack_layers_skips_already_grouped_layers():
    _, model = convert()
    assert stack_layers(layer for _, layer in falqon_layers(model)) == []


def test_run_proxy_updates_of_ungrouped_layers_is_the_per_layer_update():
    torch.manual_seed(0)
    layer = FalqonLinear(nn.Linear(32, 48, bias=False), 4)
    with torch.no_grad():
        layer.lora_B.normal_()
    twin = copy.deepcopy(layer)
    run_proxy_updates([layer])
    twin.proxy_update()
    assert same_bytes(layer.melded, twin.melded) and layer.updates_done == 1


# ---------------------------------------------------------------- torch.compile


def test_batched_compile_op_matches_its_launcher_and_compiles_whole():
    from falqon_core.kernels import compile_ops

    launcher = proxy_update_batched_triton_
    assert launcher.compile_op_slot.get("op") is not None
    import inspect

    op_params = list(inspect.signature(compile_ops.proxy_update_batched_._init_fn).parameters)
    assert op_params == list(inspect.signature(launcher.__wrapped__).parameters)

    melded, b = general_inputs(3, 24, 64, 3, seed=9)
    eager_m, eager_b = melded.clone(), b.clone()
    proxy_update_batched_triton_(eager_m, eager_b, 4)
    torch._dynamo.reset()
    fn = torch.compile(lambda m, bb: proxy_update_batched_triton_(m, bb, 4), fullgraph=True, backend="aot_eager")
    fn(melded, b)
    torch._dynamo.reset()
    assert same_bytes(melded, eager_m) and (b == 0).all()


# ---------------------------------------------------------------- GPU (run by the lead)


@pytest.mark.gpu
@pytest.mark.parametrize("n,k_dim", [(4096, 4096), (11008, 4096), (4096, 11008)])
def test_batched_update_on_cuda_is_bit_identical_to_per_layer_at_llama_shapes(n, k_dim):
    melded, b = general_inputs(4, n, k_dim, 16, seed=1)
    melded, b = melded.cuda(), b.cuda()
    per_layer = melded.clone()
    rows_b = proxy_update_batched_(melded, b.clone(), 16)
    for i in range(4):
        rows_i = proxy_update_triton_(per_layer[i, :n], per_layer[i, n : n + 16], b[i].clone(), 16)
        assert torch.equal(rows_b[i].sort().values, rows_i.sort().values)
    assert same_bytes(melded, per_layer)


@pytest.mark.gpu
def test_grouped_update_is_cuda_graph_capturable_and_replays_equal_per_layer_updates():
    """The batched update captured in a CUDA graph (no host sync); each replay, on new B values written into the
    parameters, gives the bytes one eager per-layer update per layer gives. (The whole training step in one graph
    is the e2e cuda_graph mode.)"""
    torch.manual_seed(0)
    method = get_method("falqon")
    model = method.convert(Blocks().cuda(), AdapterConfig(rank=16))
    twin = copy.deepcopy(model)
    layers, twin_layers = [m for _, m in falqon_layers(model)], [m for _, m in falqon_layers(twin)]
    g = torch.Generator(device="cuda").manual_seed(1)

    def new_b():
        with torch.no_grad():
            for a, b in zip(layers, twin_layers):
                a.lora_B.normal_(generator=g)
                b.lora_B.copy_(a.lora_B)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        new_b()
        method.after_optimizer_step(model)  # warm-up outside the graph (Triton compiles here)
        for layer in twin_layers:
            layer.proxy_update()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        method.after_optimizer_step(model)
    before = model.blocks[0]["q"].melded.view(torch.uint8).clone()
    for _ in range(3):
        new_b()
        graph.replay()
        for layer in twin_layers:
            layer.proxy_update()
    torch.cuda.synchronize()
    assert not torch.equal(model.blocks[0]["q"].melded.view(torch.uint8), before), "the replays merged nothing"
    for a, b in zip(layers, twin_layers):
        assert same_bytes(a.melded, b.melded) and torch.count_nonzero(a.lora_B) == 0
