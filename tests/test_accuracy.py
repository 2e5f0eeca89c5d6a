"""The accuracy suite kind: its file schema and CLI errors, the corpora, the end-to-end synthetic run's claims,
and the accuracy report (from the committed CPU results)."""

import json
import math
import os
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from falqon_bench.readers.accuracy_summary import best_of_grid
from falqon_bench.cli import app
from falqon_bench.measure.corpora import entropy_rate, sample_chain, synthetic_corpus

REPO = Path(__file__).resolve().parents[1]
SYNTHETIC_RESULTS = REPO / "results" / "accuracy-synthetic-cpu"

MINIMAL = """kind = "accuracy"
name = "acc-test"
device = "cpu"
model = "{model}"
steps = 2
methods = ["bf16_lora"]
[lrs]
bf16_lora = [1e-3]
"""


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def write(tmp_path, text, name="s.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


# ---------------------------------------------------------------- the suite file


def test_dry_run_lists_one_point_per_method_lr_and_seed(tmp_path):
    text = MINIMAL.format(model="tiny-llama").replace('methods = ["bf16_lora"]', 'methods = ["bf16_lora", {label = "f+sr", method = "falqon", options = {rounding = "stochastic"}}]\nseeds = [0, 1]')
    text += '"f+sr" = [1e-3, 1e-2]\n'
    result = invoke("run", write(tmp_path, text), "--dry-run")
    assert result.exit_code == 0, result.output
    from falqon_bench.suites.suite import load_suite
    from falqon_bench.suites.sweep import expand_suite

    points = expand_suite(load_suite(write(tmp_path, text)))
    assert len(points) == 2 + 4 and len({p["point_id"] for p in points}) == 6
    sr = [p for p in points if p["options"]["label"] == "f+sr"]
    assert all(p["method"] == "falqon" and p["options"]["rounding"] == "stochastic" for p in sr)
    assert {(p["K"], p["N"], p["tokens"], p["layer"]) for p in points} == {(64, 128, 16 * 64, "tiny-llama")}


@pytest.mark.parametrize(
    "change,expected",
    [
        (lambda t: t.replace("steps = 2", "stepz = 2"), "unknown key `stepz`"),
        (lambda t: t.replace("bf16_lora = [1e-3]", "falqon = [1e-3]"), "missing ['bf16_lora']"),
        (lambda t: t.replace('methods = ["bf16_lora"]', 'methods = ["nope"]'), "unknown method `nope`"),
        (lambda t: t.replace('kind = "accuracy"', 'kind = "accuracyy"'), "unknown suite kind 'accuracyy'"),
        (lambda t: t.replace("steps = 2", 'steps = 2\ncorpus = "file"'), "needs corpus_path"),
    ],
)
def test_bad_accuracy_suites_exit_2_with_one_paragraph(tmp_path, change, expected):
    result = invoke("run", write(tmp_path, change(MINIMAL.format(model="tiny-llama"))), "--dry-run")
    assert result.exit_code == 2, result.output
    assert expected in " ".join(result.output.split()) and "Traceback" not in result.output


def _model_dir(tmp_path, weights: str, config_extra: dict | None = None) -> Path:
    d = tmp_path / "model"
    d.mkdir()
    config = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "vocab_size": 256, **(config_extra or {})}
    (d / "config.json").write_text(json.dumps(config))
    (d / weights).write_bytes(b"not really weights")
    return d


def test_pickled_only_model_dir_is_refused_unless_allow_pickle(tmp_path):
    model = _model_dir(tmp_path, "pytorch_model.bin")
    suite = write(tmp_path, MINIMAL.format(model=model))
    refused = invoke("run", suite, "--dry-run")
    assert refused.exit_code == 2 and "pickled" in refused.output
    assert invoke("run", suite, "--dry-run", "--allow-pickle").exit_code == 0
    assert invoke("run", write(tmp_path, "allow_pickle = true\n" + MINIMAL.format(model=model), "t.toml"), "--dry-run").exit_code == 0


def test_remote_code_model_dir_is_refused_even_with_allow_pickle(tmp_path):
    model = _model_dir(tmp_path, "model.safetensors", {"auto_map": {"AutoModelForCausalLM": "x.Y"}})
    result = invoke("run", write(tmp_path, MINIMAL.format(model=model)), "--dry-run", "--allow-pickle")
    assert result.exit_code == 2 and "remote code" in " ".join(result.output.split())


def test_a_model_directory_next_to_the_suite_file_is_found_from_any_working_directory(tmp_path, monkeypatch):
    """`model = "models/x"` resolves next to the suite file, as in e2e suites (a config.json alone is enough), and so
    does a `corpus_path`."""
    from transformers import LlamaConfig

    (tmp_path / "suites" / "models" / "x").mkdir(parents=True)
    LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
                vocab_size=256).to_json_file(tmp_path / "suites" / "models" / "x" / "config.json")
    suite = tmp_path / "suites" / "acc.toml"
    suite.write_text(MINIMAL.format(model="models/x"))
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    result = invoke("run", suite, "--dry-run")
    assert result.exit_code == 0, result.output
    assert "64x96" in result.output  # the plan read the directory's config
    (tmp_path / "suites" / "data").mkdir()
    (tmp_path / "suites" / "data" / "c.jsonl").write_text("".join(f'{{"text": "line {i} of a small corpus"}}\n' for i in range(400)))
    suite.write_text(MINIMAL.format(model="models/x").replace("steps = 2", 'steps = 2\ncorpus = "file"\ncorpus_path = "data/c.jsonl"'))
    with_corpus = invoke("run", suite, "--dry-run")
    assert with_corpus.exit_code == 0, with_corpus.output  # the corpus file next to the suite file, too
    suite.write_text(MINIMAL.format(model="models/missing"))
    missing = invoke("run", suite, "--dry-run")
    assert missing.exit_code == 2 and "models/missing" in missing.output


def test_an_option_the_variant_does_not_read_exits_2(tmp_path):
    text = MINIMAL.format(model="tiny-llama").replace('methods = ["bf16_lora"]', 'methods = [{label = "q", method = "qlora_nf4", options = {double_quant = false}}]').replace("bf16_lora = ", "q = ")
    result = invoke("run", write(tmp_path, text), "--dry-run")
    assert result.exit_code == 2, result.output
    assert "double_quant of method qlora_nf4; it takes no options" in " ".join(result.output.split())


@pytest.mark.parametrize(
    "corpus,expected",
    [
        (None, "does not exist"),
        ("", "holds 0 text(s)"),
        ('{"text": "a"}\n{not json\n', "line 2: not JSON"),
        ("dir", "is not a file"),
        ("".join(f'{{"text": "{i:010d}"}}\n' for i in range(20)), "heldout part of the corpus has 22 tokens"),
    ],
)
def test_bad_corpus_file_exits_2_before_any_point_runs(tmp_path, corpus, expected):
    path = tmp_path / "c.jsonl"
    if corpus == "dir":
        path.mkdir()
    elif corpus is not None:
        path.write_text(corpus)
    text = MINIMAL.format(model="tiny-llama").replace("steps = 2", f'steps = 2\ncorpus = "file"\ncorpus_path = "{path}"')
    result = invoke("run", write(tmp_path, text), "--dry-run")
    assert result.exit_code == 2, result.output
    assert expected in " ".join(result.output.split()) and "Traceback" not in result.output


def test_byte_corpus_on_a_model_with_a_smaller_vocab_exits_2(tmp_path):
    model = _model_dir(tmp_path, "model.safetensors", {"vocab_size": 100})
    result = invoke("run", write(tmp_path, MINIMAL.format(model=model).replace("steps = 2", 'steps = 2\ncorpus = "stdlib"')), "--dry-run")
    assert result.exit_code == 2, result.output
    assert "256 token ids" in " ".join(result.output.split()) and "embeds only 100" in " ".join(result.output.split())


# ---------------------------------------------------------------- corpora


def test_synthetic_floor_is_the_task_chains_entropy_rate():
    """The true chain's own cross-entropy on sampled text equals the stated floor (law of large numbers)."""
    corpus = synthetic_corpus(0)
    g = torch.Generator().manual_seed(1)
    chain_seed = 0
    from falqon_bench.measure.corpora import markov_chain, shifted_chain

    gg = torch.Generator().manual_seed(chain_seed)
    base = markov_chain(64, gg)
    task = shifted_chain(base, gg)
    assert corpus.loss_floor == pytest.approx(entropy_rate(task))
    tokens = sample_chain(task, g, 64, 400)[:, 100:]  # past the start: near stationarity
    nll = -task[tokens[:, :-1], tokens[:, 1:]].log()
    sd = nll.std().item() / math.sqrt(nll.numel())
    assert abs(nll.mean().item() - corpus.loss_floor) < 6 * sd + 0.02
    assert not torch.allclose(base, task)


def test_synthetic_parts_do_not_depend_on_which_part_is_drawn_first():
    """A worker that loads a cached base never draws the pretrain part: its held-out and fine-tuning tokens must
    still be those of the worker that pretrained (same batches for every method of a run)."""
    make = synthetic_corpus.__wrapped__  # fresh pools, not the lru-cached corpus
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    pretrained_first = make(0)
    pretrained_first.sample("pretrain", g(), 2, 8)
    held_a, tune_a = pretrained_first.sample("heldout", g(), 4, 16), pretrained_first.sample("finetune", g(), 4, 16)
    cached_base = make(0)
    held_b, tune_b = cached_base.sample("heldout", g(), 4, 16), cached_base.sample("finetune", g(), 4, 16)
    assert torch.equal(held_a, held_b) and torch.equal(tune_a, tune_b)


def test_file_corpus_reads_a_jsonl_with_a_byte_order_mark(tmp_path):
    from falqon_bench.measure.corpora import read_texts

    path = tmp_path / "bom.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"text": "a"}\n{"text": "b"}\n')
    assert read_texts(path) == ["a", "b"]


def test_file_corpus_reads_jsonl_and_holds_out_the_last_tenth(tmp_path):
    from falqon_bench.measure.corpora import file_corpus
    from falqon_bench.data.errors import BenchInputError

    path = tmp_path / "c.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"line {i} " * 20}) for i in range(20)))
    corpus = file_corpus(path)
    x = corpus.sample("heldout", torch.Generator().manual_seed(0), 2, 16)
    assert x.shape == (2, 16) and int(x.max()) < 256 and corpus.vocab_size == 256
    path.write_text('{"txt": 1}\n{"text": "a"}\n')
    with pytest.raises(BenchInputError, match="line 1"):
        file_corpus(path)


# ---------------------------------------------------------------- the synthetic run (committed results)


def _rows():
    rows = [json.loads(line) for line in (SYNTHETIC_RESULTS / "points.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("kind") == "accuracy"]


def test_accuracy_report_renders_titled_figures_from_the_committed_cpu_run(tmp_path):
    result = invoke("report", SYNTHETIC_RESULTS, "--out", tmp_path / "rep")
    assert result.exit_code == 0, result.output
    md = (tmp_path / "rep" / "report.md").read_text()
    for name in ("accuracy_loss_curves.png", "accuracy_loss_vs_lr.png", "accuracy_vs_speed.png"):
        assert (tmp_path / "rep" / name).stat().st_size > 10_000 and name in md
    assert "tiny-llama" in md and "synthetic" in md and "| bf16_lora |" in md


def check_synthetic_claims(rows, start_tolerance=0.0):
    """The claims of the issue on a synthetic run; returns what the variant reached (for the message)."""
    ok = [r for r in rows if r["status"] == "ok"]
    assert len(ok) == len(rows), [r.get("error") for r in rows if r["status"] != "ok"]
    start = ok[0]["start_loss"]
    best = best_of_grid(ok)
    for label, b in best.items():  # every method learns below the start loss
        assert b["final_loss"] is not None and b["final_loss"] < start - start_tolerance, (label, b, start)
    reference = {r["lr"]: r for r in ok if r["label"] == "falqon"}
    for lr in (1e-4, 1e-3):  # the reference's lost-update fraction is recorded, and high
        assert reference[lr]["lost_fraction_mean"] > 0.9 and len(reference[lr]["lost_fraction"]) == reference[lr]["options"]["steps"]
    lora, variant = best["bf16_lora"], best[VARIANT]
    return lora, variant


VARIANT = "falqon+kA+sr+f1"


def test_committed_synthetic_run_meets_the_claims_it_states():
    rows = _rows()
    lora, variant = check_synthetic_claims(rows)
    assert_variant_result(rows, lora, variant, TARGET_LOSS_RATIO)
    capped = [r for r in rows if r["label"] == VARIANT]
    # a_scale = "kaiming" is recorded: A grew, and the cap at max|W| applied (K = 64: 1/sqrt(K) > max|W| here)
    assert all(r["adapter_gain"]["min"] > 1.0 and r["adapter_capped_layers"] > 0 for r in capped)
    assert all(r["adapter_gain"] == {"min": 1.0, "median": 1.0, "max": 1.0} for r in rows if r["label"] == "falqon")


@pytest.mark.slow
def test_synthetic_suite_runs_through_the_runner_and_meets_the_claims(tmp_path):
    """The whole CPU suite through `falqon-bench run` (worker processes, results files), then the same claims."""
    result = invoke("run", REPO / "suites" / "accuracy-synthetic.toml", "--out", tmp_path / "run")
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (tmp_path / "run" / "points.jsonl").read_text().splitlines()]
    assert (tmp_path / "run" / "base").is_dir()  # the base was pretrained once and cached in the run
    lora, variant = check_synthetic_claims(rows)
    assert_variant_result(rows, lora, variant, FRESH_RUN_LOSS_RATIO)


# What the issue asks of a variant: best-of-grid held-out loss within 2% of bf16_lora's, at a best lr within 10x
# of bf16_lora's. The committed run is held to that. A fresh run (CI, another CPU and torch build) may sum floats in
# another order and follow another trajectory; in exploratory runs the gap between two methods moved by about 1%
# from seed to seed, so a fresh run gets 1% more room. The variant without its flush (flush_every = 0) ends 4.1%
# above bf16_lora (docs/accuracy.md), so this still fails a variant that lost the flush.
TARGET_LOSS_RATIO = 1.02
FRESH_RUN_LOSS_RATIO = 1.03


def assert_variant_result(rows, lora, variant, max_ratio):
    ratio = variant["final_loss"] / lora["final_loss"]
    assert ratio <= max_ratio, (ratio, lora, variant)
    assert variant["lr"] <= 10 * lora["lr"] + 1e-12
    reference = best_of_grid([r for r in rows if r["label"] == "falqon"])["falqon"]
    assert variant["final_loss"] < reference["final_loss"]


# ---------------------------------------------------------------- the proxy update alone (GPU script, phase 3)


def test_update_cost_prints_default_and_variant_per_layer_and_rank_and_refuses_bad_input():
    from falqon_bench.measure.accuracy_update_cost import app as update_cost

    args = ["--layers", "64x32", "--ranks", "4", "--device", "cpu", "--budget-ms", "5"]
    result = CliRunner().invoke(update_cost, [*args, "--variant", '{"rounding": "stochastic", "flush_every": 1}'])
    assert result.exit_code == 0, result.output
    line = next(line for line in result.output.splitlines() if line.startswith("custom.64x32"))
    default_us, variant_us, diff_us = (float(v) for v in line.split()[2:])
    assert default_us > 0 and variant_us > 0 and diff_us == pytest.approx(variant_us - default_us, abs=0.02)
    for bad in (["--variant", "[1]"], ["--variant", "{"], ["--variant", '{"bogus": 1}'], ["--layers", "nope", "--variant", "{}"]):
        bad_result = CliRunner().invoke(update_cost, [*args, *bad] if bad[0] != "--layers" else [*bad, "--device", "cpu"])
        assert bad_result.exit_code == 2 and "Traceback" not in bad_result.output, bad_result.output


@pytest.mark.parametrize(
    "bad",
    [
        ["--ranks", "0"],  # no rank fits
        ["--ranks", "100"],  # past min(K, N) = 48
        ["--layers", "0x48"],
        ["--variant", '{"topk": 100}'],  # k past N = 48: the layer's check, with the shape
        ["--variant", '{"a_redraw": 30, "flush_every": 1}'],  # past r = 5
        ["--device", "tpu"],
        ["--budget-ms", "0"],
    ],
)
def test_update_cost_refuses_input_only_a_layer_shape_or_the_device_rules_out(bad):
    """These died with a ValueError / RuntimeError traceback (rc 1) from inside the timing loop."""
    from falqon_bench.measure.accuracy_update_cost import app as update_cost

    args = {"--layers": "64x48", "--ranks": "5", "--device": "cpu", "--budget-ms": "2", "--variant": "{}"}
    args.update(dict(zip(bad[::2], bad[1::2])))
    result = CliRunner().invoke(update_cost, [v for kv in args.items() for v in kv])
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), (result.output, result.exception)
    assert "bad input" in result.output and "default us" not in result.output, result.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks what a machine without a CUDA GPU says")
def test_update_cost_on_cuda_without_a_gpu_says_so():
    """--device defaults to cuda: on a CPU machine that was torch's 'no NVIDIA driver' traceback."""
    from falqon_bench.measure.accuracy_update_cost import app as update_cost

    result = CliRunner().invoke(update_cost, ["--layers", "64x48", "--ranks", "5", "--variant", "{}"])
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), (result.output, result.exception)
    assert "--device cpu" in result.output, result.output


def test_the_run_summary_of_an_accuracy_run_has_a_line_per_label_lr_and_seed():
    """The runner's per-method table keyed cells by (model, rank, tokens, mode) and method: every label and lr of
    a method landed in one 'falqon' cell, the last overwriting the rest. Labels print literally (rich markup off)."""
    from rich.console import Console

    from falqon_bench.measure.runner import summary_table
    from falqon_bench.suites.suite import kind_hook

    base = {"kind": "accuracy", "method": "falqon", "layer": "tiny-llama", "K": 64, "N": 128, "rank": 5, "tokens": 128,
            "compile": False, "cache": "warm", "seed": 0, "gpu_ms": None, "device": "CPU", "final_acc": 0.13}
    rows = [
        {**base, "label": "falqon", "lr": 0.1, "status": "ok", "final_loss": 4.053, "wall_ms": 20.0},
        {**base, "label": "falqon+kA+sr+f1", "lr": 0.02, "status": "ok", "final_loss": 4.013, "wall_ms": 21.0},
        {**base, "label": "f1, [bold]odd[/bold] é", "lr": 0.02, "status": "ok", "final_loss": None, "wall_ms": 22.0},
        {**base, "label": "f1, [bold]odd[/bold] é", "lr": 0.04, "status": "error", "error": "ValueError: x", "wall_ms": None},
    ]
    tabulate = kind_hook("accuracy", "tabulate", "rows") or summary_table
    console = Console(record=True, width=200)
    console.print(tabulate(rows))
    text = console.export_text()
    assert "4.053" in text and "4.013" in text and "diverged" in text and "error" in text, text
    assert "falqon+kA+sr+f1" in text and "f1, [bold]odd[/bold] é" in text, text
    assert "2e-02" in text and "4e-02" in text, text


def test_lost_update_stats_of_a_run_whose_merges_are_not_counted_say_so():
    """flush_every = 1: the flush is the whole update and is not in lost_stats, which stay zero: the row read
    merged_rows_per_update = 0.0 (no row ever merged) while every row of B was merged at every step."""
    from falqon_bench.measure.accuracy_run import lost_update_stats

    zeros = [torch.zeros(3, dtype=torch.int64) for _ in range(4)]
    assert lost_update_stats(zeros, n_layers=14, steps=4) == {
        "lost_fraction": [None] * 4, "lost_fraction_mean": None, "merged_rows_per_update": None}
    counted = [torch.tensor([1, 2, 8]) * (i + 1) for i in range(4)]  # 8 rows merged per step over 2 layers
    assert lost_update_stats(counted, n_layers=2, steps=4)["merged_rows_per_update"] == 4.0


def test_learning_rates_between_decades_are_printed_apart():
    """1.5e-2 printed as 1e-02 made two rows of one grid look the same rate (seen in a GPU run's summary)."""
    from falqon_bench.readers.accuracy_summary import lr_text

    assert [lr_text(x) for x in (3e-3, 1e-2, 1.5e-2, 2e-2)] == ["3e-03", "1e-02", "1.5e-02", "2e-02"]


def test_accuracy_summary_reads_a_gzipped_committed_run_and_exits_2_on_a_missing_one(tmp_path, capsys):
    import gzip
    import shutil

    from falqon_bench.readers.accuracy_summary import main

    committed = Path(__file__).resolve().parent.parent / "results" / "accuracy-text-lag-h200"
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(committed / "manifest.json", run)
    with open(committed / "points.jsonl", "rb") as src, gzip.open(run / "points.jsonl.gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    assert main([str(run)]) == 0
    out = capsys.readouterr().out
    assert "bf16_lora" in out and "1.312*" in out  # the committed run's best bf16_lora loss, read from the gzip
    assert main([str(tmp_path / "missing")]) == 2
    assert "missing" in capsys.readouterr().err
