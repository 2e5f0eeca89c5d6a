"""FSDP2 in the e2e suite (`parallel = "fsdp"`): two CPU processes with gloo, tiny-llama, bf16_lora and falqon.

What must hold: both methods train (finite loss), FALQON's proxy update changes its fp8 bytes and they stay
bit-identical on both ranks (the melded buffers are replicated; B is sharded and written back after the update),
and a mode FSDP2 cannot run is one "unsupported" row while the others still run.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from falqon_bench.suites.e2e_suite import expand_e2e_suite
from falqon_bench.data.errors import BenchInputError
from falqon_bench.suites.suite import load_suite
from test_e2e import torchrun

FSDP_SUITE = """# tiny FSDP2 e2e suite
kind = "e2e"
name = "tiny-fsdp"
device = "cpu"
model = "tiny-llama"
seq_len = 32
batch = 2
steps = 3
warmup_steps = 1
profile_steps = 0
rank = 16
lr = 1e-2
methods = ["bf16_lora", "falqon"]
modes = ["eager", "cuda_graph"]
parallel = "fsdp"
"""


@pytest.fixture(scope="module")
def fsdp_rows(tmp_path_factory) -> dict[tuple[str, str], dict]:
    root = tmp_path_factory.mktemp("fsdp")
    (root / "fsdp.toml").write_text(FSDP_SUITE)
    rows = torchrun(root / "fsdp.toml", root / "run")
    return {(r["method"], r["mode"]): r for r in rows}


def test_bf16_lora_and_falqon_train_under_fsdp2_on_two_ranks(fsdp_rows):
    for method in ("bf16_lora", "falqon"):
        row = fsdp_rows[(method, "eager")]
        assert row["status"] == "ok", row["error"]
        assert row["parallel"] == "fsdp" and row["world_size"] == 2 and row["backend"] == "gloo"
        assert all(math.isfinite(v) for v in row["loss_per_step"]) and len(row["loss_per_step"]) == 3
        assert row["tokens"] == 2 * 32 * 2 and row["tokens_per_s"] > 0


def test_falqon_fp8_bytes_change_and_stay_identical_across_fsdp_ranks(fsdp_rows):
    row = fsdp_rows[("falqon", "eager")]
    assert row["fp8_bytes_changed"] > 0  # the proxy update merged B (gathered from both shards) into W8
    assert row["weights_in_sync"] is True
    assert row["fp8_layout"] == "replicated"
    assert fsdp_rows[("bf16_lora", "eager")]["weights_in_sync"] is None  # no fp8 buffers to compare


def test_a_mode_fsdp2_cannot_run_is_one_unsupported_row(fsdp_rows):
    for method in ("bf16_lora", "falqon"):
        row = fsdp_rows[(method, "cuda_graph")]
        assert row["status"] == "error" and row["error_type"] == "unsupported"
        assert row["error"].startswith("unsupported: fsdp: mode cuda_graph")


def test_parallel_key_changes_only_fsdp_point_ids(tmp_path):
    ddp = tmp_path / "ddp.toml"
    ddp.write_text(FSDP_SUITE.replace('parallel = "fsdp"\n', ""))
    explicit = tmp_path / "explicit.toml"
    explicit.write_text(FSDP_SUITE.replace('parallel = "fsdp"', 'parallel = "ddp"'))
    fsdp = tmp_path / "fsdp.toml"
    fsdp.write_text(FSDP_SUITE)
    ids = {name: [p["point_id"] for p in expand_e2e_suite(load_suite(str(path)))]
           for name, path in (("ddp", ddp), ("explicit", explicit), ("fsdp", fsdp))}
    assert ids["ddp"] == ids["explicit"]  # the default adds nothing to the point: old run ids still resume
    assert not set(ids["ddp"]) & set(ids["fsdp"])


def test_an_unknown_parallel_value_is_refused_naming_the_allowed_ones(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text(FSDP_SUITE.replace('parallel = "fsdp"', 'parallel = "zero3"'))
    with pytest.raises(BenchInputError) as e:
        load_suite(str(bad))
    assert "parallel" in str(e.value) and "fsdp" in str(e.value)


def test_fsdp_point_in_a_single_worker_is_an_unsupported_row_with_the_torchrun_hint(tmp_path):
    from falqon_bench.suites.e2e_suite import measure_e2e_point
    from falqon_bench.measure.worker import MeasureContext

    suite = tmp_path / "fsdp.toml"
    suite.write_text(FSDP_SUITE)
    point = expand_e2e_suite(load_suite(str(suite)))[0]
    ctx = MeasureContext(device="cpu", budget_ms=1, warmup_ms=0, min_samples=1, profile=False, peaks=None)
    row = measure_e2e_point(point, ctx)
    assert row["status"] == "error" and row["error_type"] == "unsupported" and "torchrun" in row["error"]
    assert json.loads(json.dumps(row)) == row


def test_one_process_fsdp_point_is_the_layer_by_layer_build_and_trains(tmp_path, monkeypatch):
    from falqon_bench.measure import e2e

    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    suite = tmp_path / "one.toml"
    suite.write_text(FSDP_SUITE.replace('["eager", "cuda_graph"]', '["eager"]').replace('["bf16_lora", "falqon"]', '["falqon"]'))
    (row,) = e2e.run(str(suite), tmp_path / "run")
    assert row["status"] == "ok", row["error"]
    assert row["parallel"] == "fsdp" and row["world_size"] == 1 and row["fp8_bytes_changed"] > 0


def test_every_rank_builds_the_same_fp8_bytes_from_the_seed(tmp_path):
    """Replicated fp8 buffers are only replicas if each rank's layer-by-layer build makes the same bytes."""
    import torch

    from falqon_bench.measure.e2e_fsdp import build_sharded_model

    suite = tmp_path / "s.toml"
    suite.write_text(FSDP_SUITE)
    point = next(p for p in expand_e2e_suite(load_suite(str(suite))) if p["method"] == "falqon")
    builds = [build_sharded_model(point, torch.device("cpu"), world_size=1)[0] for _ in range(2)]
    first, second = ([b.view(torch.uint8) for _, b in m.named_buffers() if b.dtype == torch.float8_e4m3fn] for m in builds)
    assert len(first) == 2 * 7 and all(torch.equal(a, b) for a, b in zip(first, second))
    assert not any(p.is_meta for m in builds for p in [*m.parameters(), *m.buffers()])


def test_tensor_subclass_weights_without_the_fsdp_hook_are_named_as_unshardable():
    """bitsandbytes' Params4bit is an nn.Parameter subclass over packed bytes: fully_shard would split the bytes and
    lose the quantization state, so such a layer is refused up front (one "unsupported" row), naming the parameter."""
    import torch
    from torch import nn

    from falqon_bench.measure.e2e_fsdp import unshardable_parameters

    class PackedWeight(nn.Parameter):
        pass

    class WithHook(nn.Parameter):
        def fsdp_pre_all_gather(self, *args):  # a subclass that tells FSDP2 how to all-gather it is fine
            raise NotImplementedError

    layer = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4))
    layer[1].weight = PackedWeight(torch.zeros(8, 1, dtype=torch.uint8), requires_grad=False)
    layer[2].weight = WithHook(torch.zeros(4, 4), requires_grad=False)
    assert unshardable_parameters(layer) == ["1.weight (PackedWeight)"]
