"""The `kind = "e2e"` suite: fine-tune a whole model, one point per (method, execution mode, liger).

    kind = "e2e"
    name = "e2e"
    device = "cuda"
    model = "llama-7b"        # a named config (random weights) or the path of a local HF model directory
    layers = 32               # decoder layers (default: the model's own depth)
    seq_len = 2048            # tokens per sequence
    batch = 2                 # sequences per optimizer step (per process under torchrun)
    steps = 16                # optimizer steps, warm-up included
    warmup_steps = 6          # steps left out of the timing (cuda_graph: eager warm-up before the capture)
    profile_steps = 3         # steps profiled for gpu_busy / gpu_ms (0: no profile)
    rank = 16
    lr = 1e-4
    seed = 0
    methods = ["bf16_lora", "falqon"]   # falqon_core's methods, and the Unsloth baselines unsloth_lora, unsloth_qlora
    modes = ["eager", "compile", "cuda_graph", "compile_cuda_graph"]
    modes_by_method = {bf16_lora = ["compile"]}   # these methods' modes instead of `modes` (e.g. each at its best)
    liger = [false]           # apply falqon_bench.measure.fast_stacks.apply_liger before converting
    parallel = "ddp"          # under torchrun: "ddp" (a model copy per GPU) or "fsdp" (FSDP2 fully_shard, built
                              # layer by layer: models that do not fit one GPU; see falqon_bench.measure.e2e_fsdp)
    allow_pickle = false      # load pickled weights of a model directory (see falqon_bench.suites.models)
    options = {falqon = {init_svd = "lowrank"}}   # per-method options

Each point carries the schema's identity keys (layer = the model's name, K = hidden size, N = intermediate
size, tokens = batch x seq_len per optimizer step, compile = the mode compiles the model) and everything else that
identifies it in `options`, so point_id, --resume, --shard, merge and compare work as for layer points.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from falqon_bench.data.errors import BenchInputError
from falqon_bench.data.schema import Point

KIND = "e2e"
MODES = ("eager", "compile", "cuda_graph", "compile_cuda_graph")
COMPILED_MODES = ("compile", "compile_cuda_graph")  # the model runs under torch.compile
GRAPH_MODES = ("cuda_graph", "compile_cuda_graph")  # the whole step is replayed from one CUDA graph


class E2ESuiteFile(BaseModel):
    """The top level of an e2e suite file, exactly as written (strict: a typo is an unknown key)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    kind: Literal["e2e"]
    name: str = Field(min_length=1)
    description: str = ""
    device: Literal["cuda", "cpu", "auto"] = "auto"
    model: str = Field(min_length=1)
    layers: int | None = Field(None, gt=0)
    seq_len: int = Field(gt=0)
    batch: int = Field(gt=0)
    steps: int = Field(gt=1)
    warmup_steps: int = Field(1, ge=1)
    profile_steps: int = Field(2, ge=0)
    rank: int = Field(gt=0)
    lr: float = Field(gt=0)
    seed: int = 0
    methods: list[str] = Field(min_length=1)
    modes: list[Literal["eager", "compile", "cuda_graph", "compile_cuda_graph"]] = Field(default_factory=lambda: ["eager"], min_length=1)
    liger: list[bool] = Field(default_factory=lambda: [False], min_length=1)
    modes_by_method: dict[str, list[Literal["eager", "compile", "cuda_graph", "compile_cuda_graph"]]] = Field(default_factory=dict)
    allow_pickle: bool = False
    parallel: Literal["ddp", "fsdp"] = "ddp"
    options: dict[str, dict[str, Any]] = Field(default_factory=dict)


ALLOWED_KEYS = tuple(E2ESuiteFile.model_fields)


def validate_e2e_suite(data: dict[str, Any], file: Path | str, text: str):
    """Parsed TOML -> suite.Suite of kind 'e2e' (its settings in `kind_spec`); one-paragraph BenchInputError."""
    from falqon_core.methods import check_method_options, method_names

    from falqon_bench.suites.suite import Suite, Timing, explain_top_level_error, find_key_line

    try:
        spec = E2ESuiteFile.model_validate(data)
    except ValidationError as e:
        raise BenchInputError(explain_top_level_error(e, file, text, ALLOWED_KEYS)) from None
    from falqon_bench.suites.models import model_beside

    spec = spec.model_copy(update={"model": model_beside(spec.model, file)})

    def at(key: str) -> str:
        line = find_key_line(text, None, None, key)
        return f"{file}" + (f" line {line}" if line else "")

    from falqon_bench.measure.fast_stacks import STACK_BASELINES

    registered = method_names()
    for name in [*spec.methods, *spec.options, *spec.modes_by_method]:
        if name not in registered and (name in spec.options or name not in STACK_BASELINES):
            key = "methods" if name in spec.methods else "options" if name in spec.options else "modes_by_method"
            raise BenchInputError(f"unknown method `{name}` in {at(key)}; registered methods: {', '.join(registered)}; "
                                  f"baselines of other stacks (no options): {', '.join(STACK_BASELINES)}")
    for name, method_options in spec.options.items():
        try:
            check_method_options(name, method_options)
        except ValueError as e:
            raise BenchInputError(f"`options` of {at('options')}: {e}") from None
    for name, modes in spec.modes_by_method.items():
        if name not in spec.methods or not modes:
            raise BenchInputError(f"`modes_by_method` in {at('modes_by_method')} gives {name} "
                                  + ("modes, but it is not in `methods`" if modes else "no modes")
                                  + f"; methods: {', '.join(spec.methods)}")
    if spec.warmup_steps >= spec.steps:
        raise BenchInputError(f"`warmup_steps` ({spec.warmup_steps}) in {at('warmup_steps')} must be below `steps` "
                              f"({spec.steps}): no step would be timed")
    return Suite(
        name=spec.name, description=spec.description, device=spec.device, timing=Timing(profile=spec.profile_steps > 0),
        grids=[], path=Path(file) if isinstance(file, Path) else None, raw_text=text,
        spec=spec.model_dump(mode="json"), kind=KIND, kind_spec=spec, allow_pickle=spec.allow_pickle,
    )


def model_shape(model: str, layers: int | None, allow_pickle: bool) -> tuple[str, int, int, int]:
    """(label, hidden size K, intermediate size N, decoder layers) of a named model or a checked local directory."""
    from falqon_bench.suites.models import check_dir_layers, check_model_dir, is_model_dir, llama_config

    if is_model_dir(model):
        import json

        root = check_model_dir(model, allow_pickle)  # refuses pickled-only / remote-code dirs (exit 2)
        config = json.loads((root / "config.json").read_text(encoding="utf-8"))
        try:
            hidden, inter = int(config["hidden_size"]), int(config["intermediate_size"])
        except (KeyError, TypeError, ValueError):
            kind = config.get("model_type", "?") if isinstance(config, dict) else "?"
            raise BenchInputError(
                f"{root}/config.json (model_type {kind!r}) lacks hidden_size / intermediate_size: e2e and accuracy "
                "suites take decoder models whose config names them as LLaMA's does (llama, mistral, qwen2, phi3, "
                "gemma, gpt_neox, ...) and whose projections are nn.Linear; GPT-2-style configs (n_embd, Conv1D) "
                "are not supported") from None
        check_dir_layers(root, config, layers)
        return root.resolve().name, hidden, inter, int(layers or config.get("num_hidden_layers", 0))
    config = llama_config(model, layers)
    return model, int(config.hidden_size), int(config.intermediate_size), int(config.num_hidden_layers)


def expand_e2e_suite(suite, world_size: int = 1) -> list[dict[str, Any]]:
    """One point per (method, mode, liger), grouped by method; `tokens` counts every process's batch.

    A method listed in `modes_by_method` runs in those modes instead of `modes`."""
    spec: E2ESuiteFile = suite.kind_spec
    label, hidden, inter, depth = model_shape(spec.model, spec.layers, suite.allow_pickle)
    points = []
    for method in dict.fromkeys(spec.methods):
        for mode in dict.fromkeys(spec.modes_by_method.get(method) or spec.modes):
            for liger in dict.fromkeys(spec.liger):
                options = {
                    "mode": mode, "seq_len": spec.seq_len, "batch": spec.batch, "layers": depth, "lr": spec.lr,
                    "seed": spec.seed, "steps": spec.steps, "warmup_steps": spec.warmup_steps, "liger": liger,
                    "world_size": world_size, "method_options": dict(spec.options.get(method, {})),
                }
                if spec.parallel != "ddp":  # absent for ddp, so the ids of existing ddp points stay the same
                    options["parallel"] = spec.parallel
                point = Point(
                    suite=suite.name, method=method, layer=label, K=hidden, N=inter, rank=spec.rank,
                    tokens=spec.batch * spec.seq_len * world_size, compile=mode in COMPILED_MODES, cache="warm",
                    dtype="bfloat16", options=options,
                ).as_dict(kind=KIND, model=spec.model, allow_pickle=suite.allow_pickle, profile_steps=spec.profile_steps,
                          per_block=1)
                points.append(point)
    return points


def identify_e2e_row(point: dict[str, Any]) -> dict[str, Any]:
    """The keys the e2e readers group a row by, from its point: on every row of the point, also the error row the
    runner writes for a point whose worker timed out or crashed (suite.kind_hook)."""
    return dict(kind=point.get("kind", KIND), mode=point["options"]["mode"])


def measure_e2e_point(point: dict[str, Any], ctx) -> dict[str, Any]:
    """worker entry: train the point's model in this process (one GPU, no process group)."""
    from falqon_bench.measure.e2e_step import measure_point

    if point["options"].get("parallel", "ddp") != "ddp":
        from falqon_bench.measure.e2e_fsdp import unsupported_in_worker

        return unsupported_in_worker(point, ctx)
    return measure_point(point, ctx)
