"""Suite files: TOML, validated with pydantic, every mistake reported as ONE paragraph naming file, key, line, allowed values.

A suite has a `name`, a `description`, a `device` ("cuda" | "cpu" | "auto"), a `[timing]` table, a
`[defaults]` table (any sweep axis) and one or more `[[grid]]` tables. Each grid is expanded as the
cartesian product of its axes (see falqon_bench.suites.sweep); an axis a grid leaves out comes from [defaults].

    name = "example"
    device = "auto"
    [timing]
    budget_ms = 500          # sampling budget per timing kind and point, ms
    [defaults]
    tokens = [4096]
    [[grid]]
    layers = ["llama-7b.attn", {name = "tiny", K = 64, N = 96}]
    ranks = [16, 64]
    methods = ["bf16_lora", "falqon"]
    options = {falqon = {topk = 16}}   # per-method options (a list of such tables sweeps them)
"""

from __future__ import annotations

import json
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from falqon_bench.data.errors import BenchInputError
from falqon_bench.suites.layers import (
    LayerShape, allowed_layer_names, custom_layer, layers_of_model_dir, named_layers, resolve_layer,
)

AXES = ("layers", "ranks", "tokens", "methods", "compile", "cache", "dtype", "options")
REQUIRED_AXES = ("layers", "ranks", "tokens", "methods")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class InlineLayer(_Strict):
    """A layer written inline: {name, K, N} (name optional, per_block defaults to 1)."""

    name: str | None = None
    K: int = Field(gt=0)
    N: int = Field(gt=0)
    per_block: int = Field(1, gt=0)


def _layer_item(item: Any, i: int) -> str | InlineLayer:
    """One `layers` entry: a named shape or an inline table; raise ValueError with a readable reason."""
    if isinstance(item, str):
        return item
    if isinstance(item, dict):
        try:
            return InlineLayer.model_validate(item)
        except ValidationError as e:
            err = sorted(e.errors(), key=lambda x: x["type"] != "extra_forbidden")[0]  # a typo explains a 'missing'
            key = ".".join(str(p) for p in err["loc"])
            if err["type"] == "extra_forbidden":
                raise ValueError(f"item {i + 1} has unknown key `{key}`; allowed keys: name, K, N, per_block") from None
            if err["type"] == "missing":
                raise ValueError(f"item {i + 1} lacks `{key}`; an inline layer is {{name, K, N}}") from None
            raise ValueError(f"item {i + 1} key `{key}`: {err['msg']} (got {err.get('input')!r})") from None
    raise ValueError(f"item {i + 1} is {item!r}; a layer is a name like 'llama-7b.attn' or a table {{name, K, N}}")


def _axis_list(value: Any) -> Any:
    """A sweep axis must be a TOML list: `tokens = 32` silently sweeping one value hid typos like a
    missing bracket, so a scalar is an error that shows the list to write."""
    if value is None or isinstance(value, list):
        return value
    shown = json.dumps(value) if isinstance(value, (str, int, float, bool)) else repr(value)
    raise ValueError(f"a single value ({shown}) where a list is expected; write a list: [{shown}]")


class Axes(_Strict):
    """Sweep axes of one [[grid]] (or of [defaults]); every axis is a list (a scalar is an error that shows
    the list to write), except `options`, where one table means a one-element list."""

    layers: list[str | InlineLayer] | None = None
    ranks: list[int] | None = None
    tokens: list[int] | None = None
    methods: list[str] | None = None
    compile: list[bool] | None = None
    cache: list[Literal["warm", "cold"]] | None = None
    dtype: list[Literal["bfloat16", "float16"]] | None = None
    options: list[dict[str, dict[str, Any]]] | None = None

    @model_validator(mode="before")
    @classmethod
    def _one_options_table_is_a_list(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("options"), dict):
            return {**data, "options": [data["options"]]}
        return data

    @field_validator("ranks", "tokens", "methods", "compile", "cache", "dtype", mode="before")
    @classmethod
    def _lists_only(cls, value: Any) -> Any:
        return _axis_list(value)

    @field_validator("layers", mode="before")
    @classmethod
    def _layers(cls, value: Any) -> Any:
        value = _axis_list(value)
        if isinstance(value, list):
            return [_layer_item(item, i) for i, item in enumerate(value)]
        return value

    @field_validator("ranks", "tokens")
    @classmethod
    def _positive(cls, value: list[int] | None) -> list[int] | None:
        for i, v in enumerate(value or []):
            if v <= 0:
                raise ValueError(f"item {i + 1} is {v}; must be a positive integer")
        return value


class Timing(_Strict):
    """How each point is timed (falqon_bench.measure.timing: warm up by time, then sample until budget_ms and min_samples). Times in ms."""

    budget_ms: float = Field(1000.0, gt=0)
    warmup_ms: float = Field(100.0, ge=0)
    min_samples: int = Field(10, gt=0)
    cache: Literal["warm", "cold"] = "warm"
    profile: bool = True


class SuiteFile(_Strict):
    """The top level of a suite file, exactly as written."""

    kind: Literal["layers"] = "layers"
    name: str = Field(min_length=1)
    description: str = ""
    device: Literal["cuda", "cpu", "auto"] = "auto"
    timing: Timing = Field(default_factory=Timing)
    defaults: Axes = Field(default_factory=Axes)
    grid: list[Axes] = Field(min_length=1)


@dataclass
class Grid:
    """One [[grid]] with [defaults] applied and layer names resolved: every axis is a concrete, non-empty list."""

    layers: list[LayerShape]
    ranks: list[int]
    tokens: list[int]
    methods: list[str]
    compile: list[bool]
    cache: list[str]
    dtype: list[str]
    options: list[dict[str, dict[str, Any]]]


@dataclass
class Suite:
    """A validated suite, ready for falqon_bench.suites.sweep.expand_suite."""

    name: str
    description: str
    device: str
    timing: Timing
    grids: list[Grid]
    path: Path | None = None
    raw_text: str = ""
    spec: dict[str, Any] = field(default_factory=dict)
    kind: str = "layers"  # a key of KINDS
    kind_spec: Any = None  # the validated settings of a non-layer kind (e.g. e2e_suite.E2ESuiteFile)
    allow_pickle: bool = False  # a local model directory may hold pickled weights (suite key / --allow-pickle)


# kind -> module with validate_<kind>_suite(data, file, text) -> Suite, expand_<kind>_suite(suite) -> points,
# measure_<kind>_point(point, ctx) -> row; "layers" is this module, sweep.py and worker.py themselves.
KINDS: dict[str, str] = {
    "layers": __name__,
    "e2e": "falqon_bench.suites.e2e_suite",
    "accuracy": "falqon_bench.suites.accuracy_suite",
    "kernels": "falqon_bench.suites.kernels_suite",
}


def kind_function(kind: str, verb: str):
    """The `<verb>_<kind>_...` function of a suite kind's module, e.g. kind_function("e2e", "expand")."""
    import importlib

    module = importlib.import_module(KINDS[kind])
    return getattr(module, f"{verb}_{kind}_{'point' if verb == 'measure' else 'suite'}")


def kind_hook(kind: str, verb: str, noun: str):
    """A kind module's optional `<verb>_<kind>_<noun>` function, or None. The runner asks for two:
    precheck_<kind>_point(point, device) -> reason | None, defined by kinds whose points are not registered
    methods (kernels: the runner then skips its method check); tabulate_<kind>_rows(rows) -> rich Table, the
    run's summary table in place of the runner's per-method one."""
    import importlib

    return getattr(importlib.import_module(KINDS[kind]), f"{verb}_{kind}_{noun}", None)


# ---------------------------------------------------------------- locating keys in the raw text

_HEADER = re.compile(r"^\s*(\[\[?)\s*([^\]]+?)\s*(\]\]?)\s*(#.*)?$")


def find_key_line(text: str, section: str | None, index: int | None, key: str | None) -> int | None:
    """1-based line of `key = ...` inside [section] (or the index-th [[section]]; None = top level), or None.

    Falls back to the section header's line, then to the first `key =` anywhere (inline tables).
    """
    lines = text.splitlines()
    headers = [(i, m.group(2).strip().strip('"')) for i, line in enumerate(lines) if (m := _HEADER.match(line))]
    start: int | None = -1 if section is None else None
    seen = -1
    for i, name in headers:
        if section is not None and name == section:
            seen += 1
            if index is None or seen == index:
                start = i
                break
    key_re = re.compile(rf"^\s*[\"']?{re.escape(key)}[\"']?\s*=") if key else None
    if start is not None:
        end = next((i for i, _ in headers if i > start), len(lines))
        if key_re is not None:
            for i in range(start + 1, end):
                if key_re.match(lines[i]):
                    return i + 1
        if start >= 0:
            return start + 1
    if key_re is not None:
        for i, line in enumerate(lines):
            if key_re.match(line) or re.search(rf"[{{,]\s*{re.escape(key)}\s*=", line):
                return i + 1
    return None


@dataclass
class _Where:
    """Where in a suite file a problem is: table name for the message, and how to find its line."""

    label: str
    section: str | None
    index: int | None
    allowed_keys: tuple[str, ...]


def _where(loc: tuple, top_keys: tuple[str, ...] | None = None, tables: dict[str, tuple[str, ...]] | None = None) -> tuple[_Where, tuple]:
    """Split a pydantic loc into the table it points into and the rest (key, item index...).

    tables: another kind's own tables, name -> allowed keys (kernels: timing, shapes)."""
    if tables and loc and loc[0] in tables and len(loc) > 1:
        return _Where(f"[{loc[0]}]", loc[0], None, tables[loc[0]]), loc[1:]
    if loc and loc[0] == "grid" and len(loc) > 1 and isinstance(loc[1], int):
        return _Where(f"[[grid]] #{loc[1] + 1}", "grid", loc[1], AXES), loc[2:]
    if loc and loc[0] in ("timing", "defaults") and len(loc) > 1:
        allowed = tuple(Timing.model_fields) if loc[0] == "timing" else AXES
        return _Where(f"[{loc[0]}]", loc[0], None, allowed), loc[1:]
    return _Where("the top level", None, None, top_keys or tuple(SuiteFile.model_fields)), loc


def _at(file: Path | str, text: str, where: _Where, key: str | None) -> str:
    line = find_key_line(text, where.section, where.index, key)
    return f"{where.label} of {file}" + (f" line {line}" if line else "")


def _explain_validation_error(e: ValidationError, file: Path | str, text: str, top_keys: tuple[str, ...] | None = None,
                              tables: dict[str, tuple[str, ...]] | None = None) -> str:
    """The first pydantic error as one paragraph: what, where (table, key, line), what is allowed."""
    errors = sorted(e.errors(), key=lambda x: x["type"] != "extra_forbidden")  # a typo explains a later 'missing'
    err = errors[0]
    where, rest = _where(tuple(err["loc"]), top_keys, tables)
    key = str(rest[0]) if rest else None
    item = f" item {rest[1] + 1}" if len(rest) > 1 and isinstance(rest[1], int) else ""
    more = f" ({len(errors) - 1} more problem(s) in this file after fixing this one)" if len(errors) > 1 else ""
    msg = str(err["msg"]).removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        return f"unknown key `{key}` in {_at(file, text, where, key)}; allowed keys: {', '.join(where.allowed_keys)}{more}"
    if err["type"] == "missing":
        if key == "grid":
            return f"{file} has no [[grid]] table; a suite needs at least one [[grid]] with {', '.join(REQUIRED_AXES)}{more}"
        return f"missing key `{key}` in {_at(file, text, where, None)}; it is required{more}"
    if key == "grid" and err["type"] == "too_short":
        return f"{file} has no [[grid]] table; a suite needs at least one [[grid]] with {', '.join(REQUIRED_AXES)}{more}"
    got = f" (got {err['input']!r})" if err["type"] != "value_error" and "input" in err else ""
    if key is None:
        return f"{where.label} of {file}: {msg}{got}{more}"
    return f"bad value for `{key}`{item} in {_at(file, text, where, key)}: {msg}{got}{more}"


def explain_top_level_error(e: ValidationError, file: Path | str, text: str, allowed_keys: tuple[str, ...],
                            tables: dict[str, tuple[str, ...]] | None = None) -> str:
    """One paragraph for a suite kind whose keys are top level, or in its own `tables` (name -> allowed keys)."""
    return _explain_validation_error(e, file, text, top_keys=allowed_keys, tables=tables)


# ---------------------------------------------------------------- loading


def _layer_model_dir(item: str, file: Path | str) -> Path | None:
    """A `layers` entry that names a directory with a config.json: from here, or next to the suite file."""
    from falqon_bench.suites.models import model_beside

    path = Path(model_beside(item, file))
    return path if (path / "config.json").is_file() else None


def _refuse_named_clash(name: str | None, K: int, N: int, what: str, where: str, fix: str) -> None:
    """Exit 2 when `name` is a named shape's with other dims: rows carry the layer's name, so a real layer's name on
    other dims would pass for that layer."""
    named = named_layers().get(name) if name else None
    if named is not None and (named.K, named.N) != (K, N):
        raise BenchInputError(
            f"{what} `{name}` (K={K}, N={N}) in `layers` of {where} has the name of a named shape with other dims "
            f"(K={named.K}, N={named.N}); {fix}"
        )


def suites_dirs() -> list[Path]:
    """Where suite names are looked up: ./suites, then the suites/ folder next to this package."""
    here = Path(__file__).resolve().parents[2] / "suites"
    cwd = Path.cwd() / "suites"
    return [cwd] if cwd.resolve() == here.resolve() else [cwd, here]


def known_suites() -> dict[str, Path]:
    """Suite name (file stem) -> path, first hit wins."""
    found: dict[str, Path] = {}
    for d in suites_dirs():
        if d.is_dir():
            for p in sorted(d.glob("*.toml")):
                found.setdefault(p.stem, p)
    return found


def find_suite_file(name_or_path: str | Path) -> Path:
    """A path to a suite file, or a suite name like 'smoke' looked up in suites/."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    known = known_suites()
    if str(name_or_path) in known:
        return known[str(name_or_path)]
    listed = ", ".join(known) or "none found"
    raise BenchInputError(f"suite {str(name_or_path)!r} not found: not a file and not a suite name; known suites: {listed}")


def load_suite(name_or_path: str | Path, allow_pickle: bool = False) -> Suite:
    """Read, validate and resolve a suite file. Raises BenchInputError (one paragraph) on any mistake.

    allow_pickle (the CLI's --allow-pickle) sets the suite's `allow_pickle = true` (kinds that load a model dir)."""
    path = find_suite_file(name_or_path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise BenchInputError(f"{path} cannot be read as a UTF-8 TOML suite file: {e}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise BenchInputError(f"{path} is not valid TOML: {e}") from None
    if allow_pickle and data.get("kind", "layers") != "layers":
        data["allow_pickle"] = True
    return validate_suite(data, file=path, text=text)


def validate_suite(data: dict[str, Any], file: Path | str = "<suite>", text: str = "") -> Suite:
    """Validate parsed TOML (`text` is the raw file, used only to find line numbers for messages)."""
    kind = data.get("kind", "layers")
    if not isinstance(kind, str) or kind not in KINDS:
        line = find_key_line(text, None, None, "kind")
        raise BenchInputError(f"unknown suite kind {kind!r} in {file}" + (f" line {line}" if line else "")
                              + f"; allowed: {', '.join(KINDS)}")
    if kind != "layers":  # another kind validates itself (KINDS)
        return kind_function(kind, "validate")(data, file=file, text=text)
    data = {k: v for k, v in data.items() if k != "kind"}
    try:
        spec = SuiteFile.model_validate(data)
    except ValidationError as e:
        raise BenchInputError(_explain_validation_error(e, file, text)) from None
    grids = [_resolve_grid(spec, i, file, text) for i in range(len(spec.grid))]
    return Suite(
        name=spec.name,
        description=spec.description,
        device=spec.device,
        timing=spec.timing,
        grids=grids,
        path=Path(file) if isinstance(file, Path) else None,
        raw_text=text,
        spec=spec.model_dump(mode="json"),
    )


def _resolve_grid(spec: SuiteFile, i: int, file: Path | str, text: str) -> Grid:
    """[[grid]] #i with defaults applied; unknown methods/layers and empty axes are errors."""
    from falqon_core.methods import check_method_options, method_names

    grid, defaults = spec.grid[i], spec.defaults
    builtin = {"compile": [False], "cache": [spec.timing.cache], "dtype": ["bfloat16"], "options": [{}]}
    values: dict[str, Any] = {}
    origin: dict[str, _Where] = {}
    for axis in AXES:
        own, dflt = getattr(grid, axis), getattr(defaults, axis)
        if own is not None:
            values[axis], origin[axis] = own, _Where(f"[[grid]] #{i + 1}", "grid", i, AXES)
        elif dflt is not None:
            values[axis], origin[axis] = dflt, _Where("[defaults]", "defaults", None, AXES)
        elif axis in builtin:
            values[axis], origin[axis] = builtin[axis], _Where(f"[[grid]] #{i + 1}", "grid", i, AXES)
        else:
            where = _Where(f"[[grid]] #{i + 1}", "grid", i, AXES)
            raise BenchInputError(
                f"missing axis `{axis}` in {_at(file, text, where, None)}: neither the grid nor [defaults] sets it; "
                f"every grid needs {', '.join(REQUIRED_AXES)}"
            )
        if not values[axis]:
            raise BenchInputError(
                f"empty sweep: axis `{axis}` in {_at(file, text, origin[axis], axis)} is an empty list, so the grid has "
                f"no points; give at least one value"
            )

    registered = method_names()
    for name in values["methods"]:
        if name not in registered:
            raise BenchInputError(
                f"unknown method `{name}` in `methods` of {_at(file, text, origin['methods'], 'methods')}; "
                f"registered methods: {', '.join(registered)}"
            )
    for table in values["options"]:
        for name in table:
            if name not in registered:
                raise BenchInputError(
                    f"unknown method `{name}` in `options` of {_at(file, text, origin['options'], 'options')}; "
                    f"options are keyed by method name; registered methods: {', '.join(registered)}"
                )
            try:
                check_method_options(name, table[name])
            except ValueError as e:
                raise BenchInputError(f"`options` of {_at(file, text, origin['options'], 'options')}: {e}") from None

    layers: list[LayerShape] = []
    where = _at(file, text, origin["layers"], "layers")
    for item in values["layers"]:
        if isinstance(item, InlineLayer):
            _refuse_named_clash(item.name, item.K, item.N, "inline layer", where,
                                f'write "{item.name}" for the named shape, or give the inline layer another name')
            layers.append(custom_layer(item.K, item.N, item.name, item.per_block))
            continue
        try:
            layers.extend(resolve_layer(item))
            continue
        except KeyError:
            model_dir = _layer_model_dir(item, file)
            if model_dir is None:
                raise BenchInputError(
                    f"unknown layer `{item}` in `layers` of {where}; named shapes: "
                    f"{', '.join(allowed_layer_names())} (or an inline table {{name, K, N}}, or the path of a directory "
                    "holding a model's config.json)"
                ) from None
        try:
            from_dir = layers_of_model_dir(model_dir)
        except ValueError as e:
            raise BenchInputError(f"layer `{item}` in `layers` of {where}: {e}") from None
        for shape in from_dir:
            _refuse_named_clash(shape.name, shape.K, shape.N, f"layer (from model directory `{item}`)", where,
                                "rename the directory")
        layers.extend(from_dir)
    return Grid(
        layers=layers,
        ranks=list(values["ranks"]),
        tokens=list(values["tokens"]),
        methods=list(values["methods"]),
        compile=list(values["compile"]),
        cache=list(values["cache"]),
        dtype=list(values["dtype"]),
        options=[dict(t) for t in values["options"]],
    )
