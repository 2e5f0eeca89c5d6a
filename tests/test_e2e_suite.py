"""The e2e suite kind (whole-model fine-tuning) through the one runner, on CPU with tiny-llama.

Claims: every row has the schema's REQUIRED_KEYS and E2E_KEYS; a point that cannot run (a method that raises,
cuda_graph on a CPU) is one error row and the others still train; --resume after a kill re-runs only what was
not finished; a typo in the suite and an unsafe model directory exit 2 with one paragraph that says where.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from falqon_bench.cli import app
from falqon_bench.data.schema import E2E_KEYS, REQUIRED_KEYS
from falqon_core.methods import method_names, register_method
from falqon_core.methods.base import Method, StepCost

STEPS = 3
TINY_SUITE = f"""# tiny e2e suite for CPU tests
kind = "e2e"
name = "tiny-e2e"
description = "tiny-llama, a few steps"
device = "cpu"
model = "tiny-llama"
seq_len = 16
batch = 2
steps = {STEPS}
warmup_steps = 1
profile_steps = 0
rank = 8
lr = 1e-2
methods = ["bf16_lora", "falqon", "e2e_raises"]
modes = ["eager", "cuda_graph"]
"""


def _register_raising_method() -> None:
    if "e2e_raises" not in method_names():
        def convert(self, model, config):
            raise RuntimeError("e2e_raises: boom in convert")

        cls = type("e2e_raises", (Method,), {
            "name": "e2e_raises", "summary": "test only: raises in convert", "built_on": "nothing",
            "convert": convert, "step_cost": lambda self, K, N, rank, tokens: StepCost({"bf16": 0.0}, 0.0),
        })  # fmt: skip
        register_method(cls)


_register_raising_method()


def _run(*args: str):
    return CliRunner().invoke(app, ["run", *args])


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "points.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def suite_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("e2e_suite") / "tiny.toml"
    path.write_text(TINY_SUITE)
    return path


@pytest.fixture(scope="module")
def finished_run(suite_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("e2e_run") / "run"
    result = _run(str(suite_file), "--out", str(out), "--no-isolate")
    assert result.exit_code == 0, result.output
    return out


def test_every_row_has_the_required_and_e2e_keys(finished_run):
    rows = _rows(finished_run)
    assert len(rows) == 6  # 3 methods x 2 modes
    for row in rows:
        assert [k for k in REQUIRED_KEYS if k not in row] == []
        assert [k for k in E2E_KEYS if k not in row] == []
        assert row["kind"] == "e2e" and row["layer"] == "tiny-llama" and (row["K"], row["N"]) == (64, 128)
        assert row["tokens"] == 2 * 16 and row["mode"] == row["options"]["mode"]


def test_eager_points_train_and_record_every_step(finished_run):
    ok = {r["method"]: r for r in _rows(finished_run) if r["mode"] == "eager" and r["method"] != "e2e_raises"}
    assert sorted(ok) == ["bf16_lora", "falqon"]
    for row in ok.values():
        assert row["status"] == "ok", row["error"]
        assert len(row["loss_per_step"]) == STEPS and all(math.isfinite(v) for v in row["loss_per_step"])
        assert len(row["wall_samples_ms"]) == STEPS - 1  # the warm-up step is not timed
        assert row["wall_p10_ms"] <= row["wall_ms"] <= row["wall_p90_ms"]
        assert row["tokens_per_s"] == pytest.approx(32 / (row["wall_ms"] / 1e3))
        assert 0 < row["host_ms"] and row["convert_s"] > 0 and row["trainable_params"] > 0
        assert row["gpu_ms"] is None and row["split_ms"] is None  # CPU: no GPU time to split
    assert ok["falqon"]["loss_per_step"] != ok["bf16_lora"]["loss_per_step"]


def test_a_method_that_raises_and_a_mode_that_cannot_run_are_error_rows(finished_run):
    rows = _rows(finished_run)
    raised = [r for r in rows if r["method"] == "e2e_raises"]
    assert {r["status"] for r in raised} == {"error"}
    assert any("boom in convert" in r["error"] for r in raised)
    graph = [r for r in rows if r["mode"] == "cuda_graph" and r["method"] != "e2e_raises"]
    assert len(graph) == 2 and all(r["status"] == "error" and "needs a CUDA device" in r["error"] for r in graph)


def test_resume_after_a_kill_reruns_only_unfinished_points(finished_run, tmp_path):
    """A kill mid-write leaves the first row whole and half of the next; --resume keeps the first and re-runs the rest."""
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    lines = (run / "points.jsonl").read_text().splitlines()
    first = json.loads(lines[0])
    assert first["status"] == "ok"
    (run / "points.jsonl").write_text(lines[0] + "\n" + lines[1][: len(lines[1]) // 2])
    result = _run(str(Path(json.loads((run / "manifest.json").read_text())["suite_file"])), "--out", str(run),
                  "--resume", "--no-isolate", "--methods", "bf16_lora")
    assert result.exit_code == 0, result.output
    rows = _rows(run)
    assert rows[0] == first  # the finished point was kept, not measured again
    assert [r["point_id"] for r in rows].count(first["point_id"]) == 1
    assert {r["mode"] for r in rows[1:]} == {"cuda_graph"}  # only the unfinished bf16_lora point ran


def test_the_torchrun_entry_point_refuses_resume_of_a_run_that_does_not_exist(suite_file, tmp_path, capsys):
    from falqon_bench.measure import e2e

    assert e2e.main([str(suite_file), "--out", str(tmp_path / "typo"), "--resume", "--device", "cpu"]) == 2
    assert "holds no earlier run" in capsys.readouterr().err and not (tmp_path / "typo").exists()


def test_unknown_key_exits_2_naming_file_line_key_and_allowed(tmp_path):
    path = tmp_path / "typo.toml"
    path.write_text(TINY_SUITE.replace("seq_len = 16", "seqlen = 16"))
    result = _run(str(path), "--dry-run")
    assert result.exit_code == 2 and "Traceback" not in result.output
    message = result.output
    assert "`seqlen`" in message and str(path) in message and "line 7" in message
    assert "seq_len" in message and "modes" in message  # the allowed keys are listed


def test_unknown_kind_and_unknown_mode_exit_2(tmp_path):
    path = tmp_path / "kind.toml"
    path.write_text(TINY_SUITE.replace('kind = "e2e"', 'kind = "e3e"'))
    result = _run(str(path), "--dry-run")
    assert result.exit_code == 2 and "e3e" in result.output and "e2e" in result.output
    path.write_text(TINY_SUITE.replace('"eager", "cuda_graph"', '"eager", "graph"'))
    result = _run(str(path), "--dry-run")
    assert result.exit_code == 2 and "modes" in result.output and "cuda_graph" in result.output


def _model_dir(root: Path, weights: str, config: dict) -> Path:
    root.mkdir()
    (root / "config.json").write_text(json.dumps({"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, **config}))
    (root / weights).write_bytes(b"not really weights")
    return root


@pytest.mark.parametrize("flag", [[], ["--allow-pickle"]])
def test_a_pickled_only_model_dir_needs_allow_pickle(tmp_path, flag):
    model = _model_dir(tmp_path / "pickled", "pytorch_model.bin", {})
    path = tmp_path / "dir.toml"
    path.write_text(TINY_SUITE.replace('"tiny-llama"', json.dumps(str(model))))
    result = _run(str(path), "--dry-run", *flag)
    if flag:
        assert result.exit_code == 0, result.output
        assert "pickled" in result.output  # the plan names the model by its directory
    else:
        assert result.exit_code == 2 and "pickled weights" in result.output and "--allow-pickle" in result.output


def test_an_option_the_method_does_not_read_exits_2(tmp_path):
    path = tmp_path / "opt.toml"
    path.write_text(TINY_SUITE + "options = {bf16_lora = {freeze_b = true}}\n")
    result = _run(str(path), "--dry-run")
    assert result.exit_code == 2, result.output
    assert "freeze_b of method bf16_lora; allowed: freeze_a" in " ".join(result.output.split())


def test_layers_deeper_than_a_model_dir_exit_2_instead_of_adding_random_layers(tmp_path):
    model = _model_dir(tmp_path / "two", "model.safetensors", {})
    path = tmp_path / "dir.toml"
    path.write_text(TINY_SUITE.replace('"tiny-llama"', json.dumps(str(model))).replace("\nrank = 8", "\nlayers = 5\nrank = 8"))
    result = _run(str(path), "--dry-run")
    assert result.exit_code == 2, result.output
    assert "exceeds the 2 decoder layers" in " ".join(result.output.split())


def test_a_config_only_dir_of_another_architecture_trains_with_every_projection_adapted(tmp_path):
    """Phi-3's config.json alone: built with random weights, deeper than the file says, and LoRA on its fused
    qkv_proj and gate_up_proj as on o_proj and down_proj (a LLaMA name list would have left the fused ones frozen)."""
    from transformers import Phi3Config

    root = tmp_path / "phi3"
    root.mkdir()
    Phi3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
               vocab_size=256, pad_token_id=0).to_json_file(root / "config.json")
    path = tmp_path / "phi3.toml"
    text = TINY_SUITE.replace('"tiny-llama"', json.dumps(str(root))).replace("\nrank = 8", "\nlayers = 2\nrank = 8")
    path.write_text(text.replace('methods = ["bf16_lora", "falqon", "e2e_raises"]', 'methods = ["bf16_lora", "falqon"]')
                    .replace('modes = ["eager", "cuda_graph"]', 'modes = ["eager"]'))
    out = tmp_path / "run"
    result = _run(str(path), "--out", str(out), "--no-isolate")
    assert result.exit_code == 0, result.output
    rows = {r["method"]: r for r in _rows(out)}
    assert all(r["status"] == "ok" and r["layer"] == "phi3" for r in rows.values()), rows
    # per layer, K -> N: qkv_proj 64 -> 128, o_proj 64 -> 64, gate_up_proj 64 -> 256, down_proj 128 -> 64; 2 layers
    widths = [(64, 128), (64, 64), (64, 256), (128, 64)]
    assert rows["bf16_lora"]["trainable_params"] == 2 * sum(8 * (k + n) for k, n in widths)  # A r x K + B N x r
    assert rows["falqon"]["trainable_params"] == 2 * sum(8 * n for _, n in widths)  # B only


def test_a_gpt2_style_config_dir_exits_2_naming_its_model_type(tmp_path):
    """GPT-2's config has n_embd, not hidden_size, and its projections are Conv1D: refused before any build."""
    from transformers import GPT2Config

    root = tmp_path / "gpt2"
    root.mkdir()
    GPT2Config(n_embd=64, n_layer=1, n_head=4, vocab_size=256).to_json_file(root / "config.json")
    path = tmp_path / "gpt2.toml"
    path.write_text(TINY_SUITE.replace('"tiny-llama"', json.dumps(str(root))))
    result = _run(str(path), "--dry-run")
    assert result.exit_code == 2, result.output
    message = " ".join(result.output.split())
    assert "model_type 'gpt2'" in message and "lacks hidden_size / intermediate_size" in message, message


def test_a_model_path_relative_to_the_suite_file_works_from_any_working_directory(tmp_path, monkeypatch):
    """`model = "models/x"` next to the suite file (as suites/e2e-qwen2.5-7b.toml has it) is found from elsewhere."""
    from transformers import Qwen2Config

    (tmp_path / "suites" / "models" / "q").mkdir(parents=True)
    Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                vocab_size=256).to_json_file(tmp_path / "suites" / "models" / "q" / "config.json")
    path = tmp_path / "suites" / "rel.toml"
    path.write_text(TINY_SUITE.replace('"tiny-llama"', '"models/q"'))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    result = _run(str(path), "--dry-run")
    assert result.exit_code == 0, result.output
    assert "64x128" in result.output  # the plan has the directory's config: hidden 64, intermediate 128
    path.write_text(TINY_SUITE.replace('"tiny-llama"', '"models/missing"'))
    result = _run(str(path), "--dry-run")
    assert result.exit_code == 2 and "unknown model 'models/missing'" in result.output


def test_the_shipped_qwen_suite_builds_from_its_config_alone():
    from falqon_bench.suites.suite import load_suite
    from falqon_bench.suites.sweep import expand_suite

    points = expand_suite(load_suite("e2e-qwen2.5-7b"))
    assert {(p["layer"], p["K"], p["N"]) for p in points} == {("qwen2.5-7b", 3584, 18944)}
    assert {p["method"] for p in points} >= {"falqon", "bf16_lora"} and Path(points[0]["model"]).is_dir()


@pytest.mark.parametrize("flag", [[], ["--allow-pickle"]])
def test_a_model_dir_asking_for_remote_code_is_always_refused(tmp_path, flag):
    model = _model_dir(tmp_path / "remote", "model.safetensors", {"auto_map": {"AutoModelForCausalLM": "x.Model"}})
    path = tmp_path / "dir.toml"
    path.write_text(TINY_SUITE.replace('"tiny-llama"', json.dumps(str(model))))
    result = _run(str(path), "--dry-run", *flag)
    assert result.exit_code == 2 and "remote code" in result.output


def test_shipped_e2e_suite_is_llama_7b_every_method_and_mode():
    from falqon_bench.suites.suite import load_suite
    from falqon_bench.suites.sweep import expand_suite

    suite = load_suite("e2e")
    points = expand_suite(suite)
    assert suite.kind == "e2e" and len(points) == 7 * 3
    assert {p["layer"] for p in points} == {"llama-7b"} and {p["tokens"] for p in points} == {4096}
    assert {p["options"]["mode"] for p in points} == {"eager", "compile", "cuda_graph"}
    assert len({p["point_id"] for p in points}) == len(points)


@pytest.mark.gpu
def test_on_a_gpu_every_mode_trains_and_cuda_graph_replays_the_whole_step(tmp_path):
    """bf16_lora and falqon in eager, compile and cuda_graph: ok rows, GPU split and busy fraction recorded,
    and the captured step learns as the eager one does (the same first loss; the loss moves)."""
    path = tmp_path / "gpu.toml"
    path.write_text(TINY_SUITE.replace('device = "cpu"', 'device = "cuda"').replace("steps = 3", "steps = 8")
                    .replace("profile_steps = 0", "profile_steps = 2").replace('"eager", "cuda_graph"', '"eager", "compile", "cuda_graph"')
                    .replace(', "e2e_raises"', ""))
    result = _run(str(path), "--out", str(tmp_path / "run"), "--no-isolate")
    assert result.exit_code == 0, result.output
    rows = {(r["method"], r["mode"]): r for r in _rows(tmp_path / "run")}
    for (method, mode), row in rows.items():
        assert row["status"] == "ok", f"{method} {mode}: {row['error']}"
        assert 0 < row["gpu_busy"] <= 1.0 and row["gpu_ms"] > 0 and row["peak_mem_bytes"] > 0
        assert row["loss_per_step"][-1] != row["loss_per_step"][0]
        if mode != "cuda_graph":
            assert set(row["split_ms"]) == {"forward", "backward", "optimizer", "post_step"}
    for method in ("bf16_lora", "falqon"):
        assert rows[(method, "cuda_graph")]["loss_per_step"][0] == pytest.approx(rows[(method, "eager")]["loss_per_step"][0], rel=1e-3)
