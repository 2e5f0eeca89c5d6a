"""Accuracy suite files (`kind = "accuracy"`): does a method still learn, and at which learning rate?

A point is one fine-tuning run: (method variant, learning rate, seed) on one model and corpus. The grid is
methods x their own lr list x seeds, because methods differ by 100x in their best lr:

    kind = "accuracy"
    name = "accuracy-synthetic"
    device = "cpu"
    model = "tiny-llama"          # a named config (falqon_bench.suites.models) or a local HF model directory
    corpus = "synthetic"          # synthetic | stdlib | file (with corpus_path)
    # relative paths (model directory, corpus_path) are found from the working directory or next to this file
    steps = 200                   # fine-tuning optimizer steps
    pretrain_steps = 300          # of the base, once per (model, corpus, seed), cached in the run directory
    eval_every = 25
    rank = 8
    methods = ["bf16_lora", {label = "falqon+sr", method = "falqon", options = {rounding = "stochastic"}}]
    [lrs]
    bf16_lora = [1e-4, 1e-3, 3e-3]
    "falqon+sr" = [1e-4, 1e-3]

Points carry the identity keys of every results row (layer = the model's name, K / N = its hidden and
intermediate sizes, tokens = tokens per optimizer step) and put the rest in `options` (label, lr, seed,
corpus, steps, ... and the method's own options), so point_id, --resume, --shard and merge work unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from falqon_bench.data.errors import BenchInputError

KIND = "accuracy"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class MethodVariant(_Strict):
    """A method with its own options and a label to tell it apart (e.g. falqon with stochastic rounding)."""

    method: str
    label: str | None = None
    options: dict[str, Any] = Field(default_factory=dict)


class AccuracySuiteFile(_Strict):
    """The top level of an accuracy suite file, exactly as written."""

    kind: Literal["accuracy"]
    name: str = Field(min_length=1)
    description: str = ""
    device: Literal["cuda", "cpu", "auto"] = "auto"
    model: str = "tiny-llama"
    layers: int | None = Field(None, gt=0)
    allow_pickle: bool = False
    corpus: Literal["synthetic", "stdlib", "file"] = "synthetic"
    corpus_path: str | None = None
    rank: int = Field(8, gt=0)
    seq_len: int = Field(64, gt=1)
    batch: int = Field(16, gt=0)
    steps: int = Field(gt=0)
    pretrain_steps: int = Field(0, ge=0)
    pretrain_lr: float = Field(3e-3, gt=0)
    eval_every: int = Field(25, gt=0)
    eval_batches: int = Field(4, gt=0)
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    track_lost: bool = True
    methods: list[str | MethodVariant] = Field(min_length=1)
    lrs: dict[str, list[float]]

    @field_validator("lrs")
    @classmethod
    def _positive_lrs(cls, value: dict[str, list[float]]) -> dict[str, list[float]]:
        for label, grid in value.items():
            if not grid or any(lr <= 0 for lr in grid):
                raise ValueError(f"`{label}` needs a non-empty list of positive learning rates, got {grid}")
        return value


def variant_label(entry: str | MethodVariant) -> str:
    """The name a variant goes by in lrs, rows and figures: its label, else its method name."""
    return entry if isinstance(entry, str) else (entry.label or entry.method)


def model_shape(model: str) -> tuple[int, int, int]:
    """(hidden K, intermediate N, vocab) of a named model or a local model directory's config.json."""
    from falqon_bench.suites.models import is_model_dir, llama_config

    if is_model_dir(model):
        try:
            config = json.loads((Path(model) / "config.json").read_text(encoding="utf-8"))
            return int(config["hidden_size"]), int(config["intermediate_size"]), int(config["vocab_size"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise BenchInputError(f"model directory {model}: config.json lacks hidden_size / intermediate_size / vocab_size ({e})") from None
    config = llama_config(model)
    return int(config.hidden_size), int(config.intermediate_size), int(config.vocab_size)


def _explain(e: ValidationError, file: Path | str, text: str) -> str:
    """The first pydantic error as one paragraph: key, file, line, what is allowed."""
    from falqon_bench.suites.suite import find_key_line

    errors = sorted(e.errors(), key=lambda x: x["type"] != "extra_forbidden")
    err = errors[0]
    key = str(err["loc"][0]) if err["loc"] else None
    line = find_key_line(text, None, None, key) if key else None
    at = f"{file}" + (f" line {line}" if line else "")
    allowed = ", ".join(AccuracySuiteFile.model_fields)
    if err["type"] == "extra_forbidden":
        return f"unknown key `{key}` in the accuracy suite {at}; allowed keys: {allowed}"
    if err["type"] == "missing":
        return f"missing key `{key}` in the accuracy suite {at}; it is required (keys: {allowed})"
    msg = str(err["msg"]).removeprefix("Value error, ")
    got = f" (got {err['input']!r})" if err["type"] != "value_error" and "input" in err else ""
    return f"bad value for `{key}` in the accuracy suite {at}: {msg}{got}"


def validate_accuracy_suite(data: dict[str, Any], file: Path | str = "<suite>", text: str = ""):
    """Validate parsed TOML of an accuracy suite into a falqon_bench.suites.suite.Suite (kind 'accuracy')."""
    from falqon_core.methods import check_method_options, method_names

    from falqon_bench.suites.suite import Suite, Timing, find_key_line

    try:
        spec = AccuracySuiteFile.model_validate(data)
    except ValidationError as e:
        raise BenchInputError(_explain(e, file, text)) from None
    from falqon_bench.suites.models import beside_suite, model_beside

    # a model directory or a corpus file given relative to the suite file
    spec = spec.model_copy(update={"model": model_beside(spec.model, file),
                                   "corpus_path": spec.corpus_path and beside_suite(spec.corpus_path, file)})

    def where(key: str) -> str:
        line = find_key_line(text, None, None, key)
        return f"{file}" + (f" line {line}" if line else "")

    registered = method_names()
    labels = [variant_label(m) for m in spec.methods]
    for entry in spec.methods:
        method = entry if isinstance(entry, str) else entry.method
        if method not in registered:
            raise BenchInputError(f"unknown method `{method}` in `methods` of {where('methods')}; registered methods: {', '.join(registered)}")
        try:
            check_method_options(method, {} if isinstance(entry, str) else entry.options)
        except ValueError as e:
            raise BenchInputError(f"`methods` of {where('methods')}: {e}") from None
    if len(set(labels)) != len(labels):
        raise BenchInputError(f"`methods` of {where('methods')} names a label twice ({labels}); give each variant its own `label`")
    missing = [label for label in labels if label not in spec.lrs]
    unknown = [label for label in spec.lrs if label not in labels]
    if missing or unknown:
        raise BenchInputError(
            f"`lrs` of {where('lrs')} must give one learning-rate list per method label: "
            + (f"missing {missing}" if missing else "")
            + ("; " if missing and unknown else "")
            + (f"no such label {unknown}" if unknown else "")
            + f"; labels: {', '.join(labels)}"
        )
    if spec.corpus == "file" and not spec.corpus_path:
        raise BenchInputError(f"corpus = \"file\" in {where('corpus')} needs corpus_path = \"...\" (a .jsonl or text file)")
    from falqon_bench.suites.models import check_dir_layers, check_model_dir, is_model_dir

    if is_model_dir(spec.model):
        check_model_dir(spec.model, spec.allow_pickle)
        check_dir_layers(spec.model, json.loads((Path(spec.model) / "config.json").read_text(encoding="utf-8")), spec.layers)
    _, _, model_vocab = model_shape(spec.model)  # an unknown model name fails here, before any point runs
    from falqon_bench.measure.corpora import corpus_vocab

    # a missing, empty, malformed or too short corpus file, or one whose token ids the model cannot embed, is bad input
    # (exit 2 before any point runs), not one error row per point
    vocab = corpus_vocab(spec.corpus, spec.corpus_path, spec.model if is_model_dir(spec.model) else None, spec.seq_len)
    if vocab > model_vocab:
        raise BenchInputError(
            f"corpus `{spec.corpus}` in {where('corpus')} has {vocab} token ids but model {spec.model} embeds only "
            f"{model_vocab} (vocab_size); use a model with vocab_size >= {vocab} or one whose directory has a tokenizer.json that fits it"
        )
    return Suite(
        name=spec.name, description=spec.description, device=spec.device, timing=Timing(profile=False), grids=[],
        path=Path(file) if isinstance(file, Path) else None, raw_text=text, spec=spec.model_dump(mode="json"), kind=KIND,
    )


def expand_accuracy_suite(suite) -> list[dict[str, Any]]:
    """One point per (method variant, lr, seed), in suite order (grouped by method for the workers)."""
    from falqon_bench.data.schema import Point

    spec = AccuracySuiteFile.model_validate(suite.spec, strict=False)
    K, N, _ = model_shape(spec.model)
    model_name = Path(spec.model).name if Path(spec.model).is_dir() else spec.model
    points = []
    for entry in spec.methods:
        variant = MethodVariant(method=entry) if isinstance(entry, str) else entry
        label = variant_label(entry)
        for lr in spec.lrs[label]:
            for seed in spec.seeds:
                options = {
                    **variant.options, "label": label, "lr": lr, "seed": seed, "corpus": spec.corpus,
                    "steps": spec.steps, "pretrain_steps": spec.pretrain_steps, "seq_len": spec.seq_len,
                    "batch": spec.batch, "layers": spec.layers,
                }
                point = Point(
                    suite=suite.name, method=variant.method, layer=model_name, K=K, N=N, rank=spec.rank,
                    tokens=spec.batch * spec.seq_len, compile=False, cache="warm", dtype="bfloat16", options=options,
                ).as_dict(
                    kind=KIND, model=spec.model, allow_pickle=spec.allow_pickle, corpus_path=spec.corpus_path,
                    pretrain_lr=spec.pretrain_lr, eval_every=spec.eval_every, eval_batches=spec.eval_batches,
                    track_lost=spec.track_lost, method_options=dict(variant.options), grid_lrs=list(spec.lrs[label]),
                )
                points.append(point)
    order = {m: i for i, m in enumerate(dict.fromkeys(p["method"] for p in points))}
    return sorted(points, key=lambda p: order[p["method"]])


def identify_accuracy_row(point: dict[str, Any]) -> dict[str, Any]:
    """The keys the accuracy readers group a row by, from its point: on every row of the point, also the error row
    the runner writes for a point whose worker timed out or crashed (suite.kind_hook)."""
    o = point["options"]
    return dict(kind="accuracy", label=o["label"], lr=o["lr"], seed=o["seed"], corpus=o["corpus"],
                grid_lrs=point.get("grid_lrs"))


def measure_accuracy_point(point: dict[str, Any], ctx) -> dict[str, Any]:
    """suite.KINDS entry point for the worker: train and evaluate one point (falqon_bench.measure.accuracy_run, torch)."""
    from falqon_bench.measure.accuracy_run import measure_accuracy_point as measure

    return measure(point, ctx)


def tabulate_accuracy_rows(rows: list[dict[str, Any]]):
    """The runner's summary of an accuracy run: one line per (label, lr, seed) with its final held-out loss (* the
    label's best lr so far), accuracy and wall ms per step. The runner's per-method table keys cells by shape and
    method, so every label and lr of one method would share one cell. Labels are printed literally (no markup)."""
    from rich.markup import escape
    from rich.table import Table

    from falqon_bench.readers.accuracy_summary import best_of_grid, lr_text

    best = best_of_grid(rows)
    labels = list(dict.fromkeys(r.get("label") for r in rows))
    table = Table(title="held-out loss after fine-tuning (* best lr of its label), wall ms per step (median)")
    for name in ("label", "method", "lr", "seed", "loss", "acc", "ms/step"):
        table.add_column(name, justify="left" if name in ("label", "method") else "right")
    for r in sorted(rows, key=lambda r: (labels.index(r.get("label")), r.get("lr") or 0.0, r.get("seed") or 0)):
        label = str(r.get("label"))
        if r.get("status") != "ok":
            loss, acc, ms = "[red]error[/red]", "-", "-"
        else:
            loss = "diverged" if r.get("final_loss") is None else f"{r['final_loss']:.3f}"
            loss += "*" if label in best and best[label]["lr"] == r.get("lr") else ""
            acc = "-" if r.get("final_acc") is None else f"{r['final_acc']:.3f}"
            ms = "-" if r.get("wall_ms") is None else f"{r['wall_ms']:.2f}"
        lr = "-" if r.get("lr") is None else lr_text(r["lr"])
        table.add_row(escape(label), escape(str(r.get("method"))), lr, str(r.get("seed")), loss, acc, ms)
    return table
