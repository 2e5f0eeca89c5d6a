"""Expand a validated suite into points: one point = one (method, layer shape, rank, tokens, compile, cache, dtype, options).

Points come out in a deterministic order grouped by method (methods in the order the suite first names
them), so one worker process can run one method's points. Identical points from overlapping grids
appear once. `--shard i/n` and `--methods` select from this list without changing its order.
"""

from __future__ import annotations

import itertools
from typing import Any

from falqon_bench.data.errors import BenchInputError
from falqon_bench.data import schema
from falqon_bench.suites.suite import Suite

Point = dict[str, Any]  # a schema.Point as the runner sends it (schema.Point.as_dict)


def expand_suite(suite: Suite) -> list[Point]:
    """Every point of every [[grid]] (cartesian product of its axes), deduplicated, grouped by method."""
    if suite.kind != "layers":  # another suite kind expands itself (suite.KINDS)
        from falqon_bench.suites.suite import kind_function

        return kind_function(suite.kind, "expand")(suite)
    points: list[Point] = []
    seen: set[str] = set()
    method_order: dict[str, int] = {}
    for grid in suite.grids:
        for method in grid.methods:
            method_order.setdefault(method, len(method_order))
        axes = itertools.product(
            grid.methods, grid.layers, grid.ranks, grid.tokens, grid.compile, grid.cache, grid.dtype, grid.options
        )
        for method, layer, rank, tokens, compiled, cache, dtype, options in axes:
            point = schema.Point(
                suite=suite.name, method=method, layer=layer.name, K=layer.K, N=layer.N, rank=rank, tokens=tokens,
                compile=compiled, cache=cache, dtype=dtype, options=dict(options.get(method, {})),
            ).as_dict(per_block=layer.per_block)
            if point["point_id"] not in seen:
                seen.add(point["point_id"])
                points.append(point)
    return sorted(points, key=lambda p: method_order[p["method"]])  # stable: keeps grid order inside a method


def filter_methods(points: list[Point], methods: list[str]) -> list[Point]:
    """Keep the points of `methods` (from --methods a,b); a name the suite does not sweep is an error."""
    in_suite = list(dict.fromkeys(p["method"] for p in points))
    unknown = [m for m in methods if m not in in_suite]
    if unknown:
        raise BenchInputError(
            f"--methods names {', '.join(unknown)}, which the suite does not sweep; methods in this suite: {', '.join(in_suite)}"
        )
    wanted = set(methods)
    return [p for p in points if p["method"] in wanted]


def filter_ranks(points: list[Point], ranks: list[int]) -> list[Point]:
    """Keep the points at these ranks (from --ranks 16,64); a rank the suite does not sweep is an error."""
    in_suite = sorted({p["rank"] for p in points})
    unknown = [r for r in ranks if r not in in_suite]
    if unknown:
        raise BenchInputError(f"--ranks names {unknown}, which the suite does not sweep; ranks in this suite: {in_suite}")
    return [p for p in points if p["rank"] in set(ranks)]


def filter_variant(points: list[Point], variant: str) -> list[Point]:
    """Keep only eager (compile=false) or only compiled points (--variant eager|compile); 'all' keeps both."""
    allowed = {"all": None, "eager": False, "compile": True}
    if variant not in allowed:
        raise BenchInputError(f"--variant {variant!r}; allowed: {', '.join(allowed)}")
    wanted = allowed[variant]
    return points if wanted is None else [p for p in points if bool(p["compile"]) is wanted]


def parse_shard(text: str) -> tuple[int, int]:
    """'2/4' -> (2, 4): shard i of n, 1-based (Slurm: --shard $((SLURM_ARRAY_TASK_ID + 1))/$SLURM_ARRAY_TASK_COUNT)."""
    try:
        i_text, n_text = text.split("/")
        i, n = int(i_text), int(n_text)
    except ValueError:
        raise BenchInputError(f"--shard {text!r} is not of the form i/n (e.g. 1/4, 1-based)") from None
    if n < 1 or not 1 <= i <= n:
        raise BenchInputError(f"--shard {text!r}: need 1 <= i <= n (1-based), got i={i}, n={n}")
    return i, n


def shard_points(points: list[Point], i: int, n: int) -> list[Point]:
    """Every n-th point starting at the (i-1)-th: shards 1..n partition the points and each stays grouped by method."""
    return [p for j, p in enumerate(points) if j % n == i - 1]
