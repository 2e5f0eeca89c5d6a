"""falqon_bench.measure.e2e: whole-model DDP fine-tuning under torchrun, tested on CPU with gloo and 2 processes.

The runner's e2e suite kind runs here, one process per rank (`torchrun -m falqon_bench.measure.e2e SUITE`).
The FALQON proxy update rewrites fp8 buffers on every rank; they stay bit-identical only because DDP
all-reduces B's gradient first. The tests check the sync flag is true in a normal run AND false when the
all-reduce is skipped (and that the fp8 bytes did change), so the check cannot pass vacuously.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from falqon_bench.measure import e2e
from falqon_bench.data.schema import REQUIRED_KEYS
from fixtures.methods import register_needs_gpu_method

REPO = Path(__file__).resolve().parents[1]
SUITE = """# tiny DDP e2e suite
kind = "e2e"
name = "tiny-ddp"
device = "cpu"
model = "tiny-llama"
seq_len = 32
batch = 2
steps = {steps}
warmup_steps = 1
profile_steps = 0
rank = 16
lr = 1e-2
methods = {methods}
"""


def write_suite(path: Path, methods: list[str], steps: int) -> Path:
    path.write_text(SUITE.format(steps=steps, methods=json.dumps(methods)))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(suite: Path, out: Path, *args: str, nproc: int = 2) -> list[dict]:
    """Launch `python -m torch.distributed.run -m falqon_bench.measure.e2e SUITE` on CPU (gloo) and return the rows it wrote."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
        "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
        "-m", "falqon_bench.measure.e2e", str(suite), "--out", str(out), *args,
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [json.loads(line) for line in (out / "points.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def two_rank_rows(tmp_path_factory) -> dict[str, dict]:
    root = tmp_path_factory.mktemp("e2e")
    out = root / "run"
    rows = torchrun(write_suite(root / "ddp.toml", ["bf16_lora", "falqon", "fp6_lora"], 5), out)
    assert (out / "manifest.json").exists()
    return {r["method"]: r for r in rows}


def test_two_rank_run_writes_one_complete_row_per_method(two_rank_rows):
    assert sorted(two_rank_rows) == ["bf16_lora", "falqon", "fp6_lora"]
    for name in ("bf16_lora", "falqon"):
        row = two_rank_rows[name]
        assert [k for k in REQUIRED_KEYS if k not in row] == []
        assert row["status"] == "ok", row["error"]
        assert row["world_size"] == 2 and row["backend"] == "gloo"
        assert row["device"] == "CPU" and row["gpu_ms"] is None and row["gpu_timing"] == "none" and row["mode"] == "eager"
        assert row["layer"] == "tiny-llama" and (row["K"], row["N"]) == (64, 128)
        assert row["tokens"] == 2 * 32 * 2  # batch x seq x ranks
        assert len(row["wall_samples_ms"]) == 4  # 5 steps, 1 warm-up step left out
        assert row["wall_ms"] > 0 and row["tokens_per_s"] > 0


def test_fp6_lora_under_ddp_is_one_row_not_a_dead_job(two_rank_rows):
    """fp6_lora's tensor-subclass weights once killed the whole torchrun job; now it is one row (ok or error)."""
    row = two_rank_rows["fp6_lora"]
    assert [k for k in REQUIRED_KEYS if k not in row] == []
    assert row["status"] == "ok" or row["error"]


def test_loss_is_finite_and_training_moves_it(two_rank_rows):
    for row in (two_rank_rows["bf16_lora"], two_rank_rows["falqon"]):
        losses = row["loss_per_step"]
        assert all(math.isfinite(v) for v in losses)
        assert row["loss_last"] != row["loss_first"], f"{row['method']}: loss never changed"
    bf16 = two_rank_rows["bf16_lora"]["loss_per_step"]
    assert min(bf16[1:]) < bf16[0], f"bf16_lora never went below its first loss: {bf16}"


def test_falqon_fp8_weights_stay_bit_identical_across_ranks(two_rank_rows):
    row = two_rank_rows["falqon"]
    assert row["fp8_bytes_changed"] > 0, "the proxy update never changed the fp8 matrices: the sync check is vacuous"
    assert row["weights_in_sync"] is True
    assert two_rank_rows["bf16_lora"]["weights_in_sync"] is None  # no fp8 weights to compare


def test_skipping_the_grad_allreduce_breaks_the_fp8_sync_and_is_detected(tmp_path):
    """Each rank trains on its own batches; without DDP's all-reduce of dB the ranks merge different rows."""
    (row,) = torchrun(write_suite(tmp_path / "s.toml", ["falqon"], 3), tmp_path / "run", "--skip-grad-allreduce")
    assert row["status"] == "ok" and row["fp8_bytes_changed"] > 0
    assert row["weights_in_sync"] is False


def test_single_process_run_without_torchrun(tmp_path, monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    out = tmp_path / "run"
    (row,) = e2e.run(str(write_suite(tmp_path / "s.toml", ["falqon"], 3)), out)
    assert row["status"] == "ok" and row["world_size"] == 1 and row["backend"] == "none"
    assert row["weights_in_sync"] is None and row["fp8_bytes_changed"] > 0
    assert row["tokens"] == 2 * 32 and len(row["wall_samples_ms"]) == 2
    assert e2e.run(str(tmp_path / "s.toml"), out, resume=True) == []  # resume: nothing left to run
    stored = [json.loads(line) for line in (out / "points.jsonl").read_text().splitlines()]
    assert stored[0]["point_id"] == row["point_id"]


def test_method_that_cannot_run_here_is_an_error_row_not_a_crash(tmp_path, monkeypatch):
    register_needs_gpu_method("e2e_needs_gpu")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    out = tmp_path / "run"
    (row,) = e2e.run(str(write_suite(tmp_path / "s.toml", ["e2e_needs_gpu"], 2)), out)
    assert row["status"] == "error" and "needs a CUDA GPU" in row["error"]
    assert [k for k in REQUIRED_KEYS if k not in row] == []
    assert json.loads((out / "points.jsonl").read_text())["status"] == "error"


def test_a_layer_suite_and_an_unknown_model_are_refused_with_exit_2(tmp_path, capsys):
    assert e2e.main(["smoke", "--out", str(tmp_path / "a")]) == 2
    assert "kind" in capsys.readouterr().err
    bad = tmp_path / "bad.toml"
    bad.write_text(SUITE.format(steps=3, methods='["falqon"]').replace("tiny-llama", "gpt-9"))
    assert e2e.main([str(bad), "--out", str(tmp_path / "b")]) == 2
    assert "allowed" in capsys.readouterr().err


def test_real_llama_configs_come_from_falqon_bench_layers():
    from falqon_bench.suites.layers import resolve_layer
    from falqon_bench.suites.models import llama_config

    config = llama_config("llama-3-8b", num_layers=1)
    (up,) = [s for s in resolve_layer("llama-3-8b") if s.name.endswith(".up")]
    assert (config.hidden_size, config.intermediate_size) == (up.K, up.N)
    assert config.num_key_value_heads == 8 and config.num_hidden_layers == 1


@pytest.mark.gpu
def test_torchrun_on_gpus_uses_nccl_and_keeps_fp8_in_sync(tmp_path):
    import torch

    nproc = min(2, torch.cuda.device_count())
    suite = write_suite(tmp_path / "s.toml", ["bf16_lora", "falqon"], 5)
    rows = {r["method"]: r for r in torchrun(suite, tmp_path / "run", "--device", "cuda", nproc=nproc)}
    for row in rows.values():
        assert row["status"] == "ok", row["error"]
        assert row["backend"] == "nccl" and row["world_size"] == nproc and row["peak_mem_bytes"] > 0
    assert rows["falqon"]["fp8_bytes_changed"] > 0
    assert rows["falqon"]["weights_in_sync"] is (True if nproc > 1 else None)
