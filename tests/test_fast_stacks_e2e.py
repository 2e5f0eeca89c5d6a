"""The fast stacks inside the e2e suite: Unsloth's baselines are e2e method names, timed by the same step as every
other method where Unsloth runs and recorded "unsupported: <why>" where it cannot (here: not installed, or no
GPU); liger in a CUDA graph is refused before a model is built; `modes_by_method` runs each method in its own
modes; a bad name exits 2 with the allowed names. All on CPU with tiny-llama (Unsloth itself needs a GPU)."""

from __future__ import annotations

import importlib.util
import json
import math
import tempfile
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from falqon_bench.measure import fast_stacks
from falqon_bench.suites import models
from falqon_bench.cli import app
from falqon_bench.suites.e2e_suite import expand_e2e_suite
from falqon_bench.suites.suite import load_suite
from falqon_bench.measure.worker import MeasureContext, record_failure
from falqon_core.convert import LLAMA_TARGET_MODULES, convert_model
from falqon_core.methods import AdapterConfig, MethodUnavailable

ROOT = Path(__file__).resolve().parents[1]
SUITE = """kind = "e2e"
name = "tiny-fast-stacks"
device = "cpu"
model = "tiny-llama"
seq_len = 16
batch = 2
steps = 3
warmup_steps = 1
profile_steps = 0
rank = 8
lr = 1e-2
methods = ["bf16_lora", "unsloth_lora", "unsloth_qlora"]
modes = ["eager"]
"""


def write_suite(tmp_path: Path, text: str = SUITE) -> Path:
    path = tmp_path / "suite.toml"
    path.write_text(text)
    return path


def rows_of(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "points.jsonl").read_text().splitlines() if line.strip()]


def test_unsloth_points_are_unsupported_with_the_reason_and_the_other_methods_still_train(tmp_path):
    reason = fast_stacks.unsloth_unavailable_reason("cpu")
    if reason is None:
        pytest.skip("Unsloth can run here")
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["run", str(write_suite(tmp_path)), "--out", str(out), "--no-isolate"])
    assert result.exit_code == 0, result.output
    rows = {r["method"]: r for r in rows_of(out)}
    assert sorted(rows) == ["bf16_lora", "unsloth_lora", "unsloth_qlora"]
    assert rows["bf16_lora"]["status"] == "ok" and all(math.isfinite(v) for v in rows["bf16_lora"]["loss_per_step"])
    for baseline in fast_stacks.UNSLOTH_BASELINES:
        row = rows[baseline]
        assert (row["status"], row["error_type"]) == ("error", "unsupported")
        assert row["error"] == f"unsupported: {reason}"
        assert row["convert_s"] is None  # refused before a model was built


def test_an_unknown_method_exits_2_naming_the_line_and_every_allowed_name(tmp_path):
    path = write_suite(tmp_path, SUITE.replace('"unsloth_qlora"]', '"unsloth_qlroa"]'))
    result = CliRunner().invoke(app, ["run", str(path), "--dry-run"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    message = " ".join(result.output.split())
    assert "unknown method `unsloth_qlroa`" in message and "line 12" in message
    assert "registered methods: bf16_linear, bf16_lora" in message and "falqon" in message
    assert "unsloth_lora, unsloth_qlora" in message


def test_options_for_an_unsloth_baseline_exit_2(tmp_path):
    path = write_suite(tmp_path, SUITE + "options = {unsloth_lora = {alpha = 32}}\n")
    result = CliRunner().invoke(app, ["run", str(path), "--dry-run"])
    assert result.exit_code == 2 and "unknown method `unsloth_lora`" in result.output
    assert "no options" in result.output


def test_modes_by_method_runs_the_listed_methods_in_their_own_modes(tmp_path):
    text = SUITE + 'liger = [false, true]\nmodes_by_method = {bf16_lora = ["compile", "cuda_graph"]}\n'
    points = expand_e2e_suite(load_suite(str(write_suite(tmp_path, text))))
    got = [(p["method"], p["options"]["mode"], p["options"]["liger"]) for p in points]
    assert got == [
        ("bf16_lora", "compile", False), ("bf16_lora", "compile", True),
        ("bf16_lora", "cuda_graph", False), ("bf16_lora", "cuda_graph", True),
        ("unsloth_lora", "eager", False), ("unsloth_lora", "eager", True),
        ("unsloth_qlora", "eager", False), ("unsloth_qlora", "eager", True),
    ]  # fmt: skip
    assert len({p["point_id"] for p in points}) == len(points)
    assert [p["compile"] for p in points[:4]] == [True, True, False, False]


@pytest.mark.parametrize("entry, words", [
    ('{falqon = ["eager"]}', "gives falqon modes, but it is not in `methods`"),
    ('{bf16_lora = []}', "gives bf16_lora no modes"),
    ('{bf16_lora = ["fast"]}', "modes_by_method"),
])  # fmt: skip
def test_a_bad_modes_by_method_entry_exits_2(tmp_path, entry, words):
    result = CliRunner().invoke(app, ["run", str(write_suite(tmp_path, SUITE + f"modes_by_method = {entry}\n")), "--dry-run"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert words in " ".join(result.output.split())


def point(method: str, mode: str = "eager", liger: bool = False, world_size: int = 1) -> dict:
    return {"method": method, "rank": 8, "options": {"mode": mode, "liger": liger, "world_size": world_size,
                                                     "seq_len": 16, "seed": 0, "method_options": {}}}


@pytest.mark.parametrize("mode", ["cuda_graph", "compile_cuda_graph"])
def test_liger_in_a_whole_step_cuda_graph_is_unsupported_for_its_host_sync(mode):
    assert fast_stacks.stack_point_unsupported_reason(point("falqon", mode, liger=True), "cuda") == fast_stacks.LIGER_GRAPH_REASON
    assert fast_stacks.stack_point_unsupported_reason(point("falqon", mode, liger=False), "cuda") is None


def test_liger_where_it_cannot_run_is_unsupported_with_liger_s_reason():
    reason = fast_stacks.stack_point_unsupported_reason(point("bf16_lora", "eager", liger=True), "cpu")
    assert reason == f"liger = true is not possible here: {fast_stacks.liger_unavailable_reason('cpu')}"


def test_unsloth_with_liger_or_under_torchrun_is_unsupported_whatever_is_installed(monkeypatch):
    monkeypatch.setattr(fast_stacks, "unsloth_unavailable_reason", lambda device=None: None)
    assert "Unsloth fuses RMSNorm" in fast_stacks.stack_point_unsupported_reason(point("unsloth_lora", liger=True), "cuda")
    assert "not under torchrun" in fast_stacks.stack_point_unsupported_reason(point("unsloth_qlora", world_size=2), "cuda")
    assert fast_stacks.stack_point_unsupported_reason(point("unsloth_qlora"), "cuda") is None
    with pytest.raises(fast_stacks.StackUnsupported, match="Unsloth fuses"):
        fast_stacks.check_stack_point(point("unsloth_lora", liger=True), "cuda")


def test_an_unsupported_point_is_labelled_unsupported_and_a_missing_method_unavailable():
    rows = [{}, {}]
    record_failure(rows[0], fast_stacks.StackUnsupported("no GPU"))
    record_failure(rows[1], MethodUnavailable("pip install x"))
    assert (rows[0]["error_type"], rows[0]["error"]) == ("unsupported", "unsupported: no GPU")
    assert (rows[1]["error_type"], rows[1]["error"]) == ("unavailable", "unavailable: pip install x")


def test_an_unsloth_point_trains_the_model_unsloth_built_with_the_same_step(monkeypatch, tmp_path):
    """Where Unsloth runs, the e2e step trains what build_unsloth_model returns (here a stand-in: PEFT LoRA on the
    same weights, since Unsloth needs a GPU), with the point's rank, seq_len and seed; the saved copy is removed."""
    from falqon_bench.measure.e2e_step import measure_point

    calls = []

    def fake_build(baseline, model, rank, max_seq_length, workdir, seed=0):
        calls.append((baseline, rank, max_seq_length, seed, Path(workdir)))
        (Path(workdir) / "model").mkdir()
        peft_model, method = convert_model(model, "bf16_lora", AdapterConfig(rank=rank, target_modules=LLAMA_TARGET_MODULES))
        return peft_model, method.trainable_parameters(peft_model)

    monkeypatch.setattr(fast_stacks, "unsloth_unavailable_reason", lambda device=None: None)
    monkeypatch.setattr(fast_stacks, "build_unsloth_model", fake_build)
    monkeypatch.setattr(fast_stacks, "import_unsloth", lambda workdir=None: calls.append("unsloth imported"))
    real_make_model = models.make_model
    monkeypatch.setattr(models, "make_model", lambda *a, **k: calls.append("model built") or real_make_model(*a, **k))
    text = SUITE.replace('methods = ["bf16_lora", "unsloth_lora", "unsloth_qlora"]', 'methods = ["unsloth_qlora"]')
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # convert_for_point's working directory
    (p,) = expand_e2e_suite(load_suite(str(write_suite(tmp_path, text))))
    row = measure_point(p, MeasureContext(device="cpu"))

    assert row["status"] == "ok", row["error"]
    assert calls[:2] == ["unsloth imported", "model built"]  # Unsloth before transformers builds the model
    assert calls[2][:4] == ("unsloth_qlora", 8, 16, 0)
    assert calls[2][4].parent == tmp_path and not (calls[2][4] / "model").exists()  # the saved weights are deleted once loaded
    assert row["trainable_params"] > 0 and len(row["loss_per_step"]) == 3
    assert all(math.isfinite(v) for v in row["loss_per_step"])


def load_summary_script():
    spec = importlib.util.spec_from_file_location("fast_stacks_e2e_summary", ROOT / "scripts/gpu/fast_stacks_e2e_summary.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def summary_row(method: str, mode: str, liger: bool, tokens_per_s: float | None, status: str = "ok") -> dict:
    return {"method": method, "mode": mode, "options": {"mode": mode, "liger": liger}, "status": status,
            "tokens_per_s": tokens_per_s, "wall_ms": 4096 / tokens_per_s * 1e3 if tokens_per_s else None,
            "peak_mem_bytes": 2**34, "error": None if status == "ok" else "unsupported: no GPU"}


def test_summary_compares_falqon_s_fastest_point_with_the_fastest_point_of_any_other_stack():
    summary = load_summary_script()
    rows = [
        summary_row("falqon", "cuda_graph", False, 14000.0), summary_row("falqon", "eager", True, 9000.0),
        summary_row("bf16_lora", "compile", True, 16000.0), summary_row("bf16_lora", "compile", False, 14500.0),
        summary_row("unsloth_lora", "eager", False, None, status="error"),
    ]  # fmt: skip
    result = summary.speedup_over_fastest(rows)
    assert result["speedup"] == pytest.approx(14000.0 / 16000.0)
    assert summary.variant(result["fastest_other"]) == "bf16_lora compile +liger"
    lines = summary.summary_lines(rows)
    assert lines[1].startswith("bf16_lora compile +liger") and "unsupported: no GPU" in lines[5]
    assert "0.88x (falqon cuda_graph, 14,000 tokens/s, against bf16_lora compile +liger, 16,000 tokens/s)" in lines[-1]
    assert summary.speedup_over_fastest([r for r in rows if r["method"] == "falqon"]) is None


def test_unsloth_is_refused_in_a_process_that_imported_transformers_first(monkeypatch):
    import sys

    import transformers  # noqa: F401  (what every other method's point imports)

    monkeypatch.delitem(sys.modules, "unsloth", raising=False)
    with pytest.raises(fast_stacks.StackUnsupported, match="must be imported before transformers"):
        fast_stacks.import_unsloth()


def test_the_report_s_e2e_table_tells_a_liger_point_from_the_plain_one():
    from falqon_bench.readers.figures.e2e import markdown_table

    def e2e_row(liger: bool, tokens_per_s: float) -> dict:
        return {"kind": "e2e", "point_id": f"p{liger}", "method": "bf16_lora", "mode": "compile", "status": "ok",
                "options": {"mode": "compile", "liger": liger}, "tokens_per_s": tokens_per_s, "wall_ms": 250.0}

    lines = markdown_table([e2e_row(False, 14000.0), e2e_row(True, 16000.0)]).splitlines()
    assert lines[2].startswith("| bf16_lora | compile | 14,000 |")
    assert lines[3].startswith("| bf16_lora | compile +liger | 16,000 |")
