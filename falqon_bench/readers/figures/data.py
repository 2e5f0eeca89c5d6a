"""Points of one or more runs as one table with what every figure needs: the metric, its spread, the variant label.

metric_ms is gpu_ms (CUDA-graph replay) where a point has it, else wall_ms (CPU runs); p10_ms/p90_ms
come from the same kind of samples. A variant is "method" for eager and "method+compile" for
torch.compile; a point run with method options (a suite's `options`) carries them in brackets,
"falqon[a_scale=kaiming,flush_every=1]+compile", so two option sets of one method never share a label.
All times in ms per step of one layer.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np
import pandas as pd

from falqon_bench.data.derived import residual
from falqon_bench.data.schema import BREAKDOWN_CATEGORIES, option_set_label
from falqon_bench.data.store import RunData

KERNEL_SUM_MARK = "†"

BASELINE_METHOD = "bf16_lora"
COMPUTE_CATEGORIES = ("gemm_fp8", "gemm_bf16", "lora_gemm")
# methods in the order figures draw them (others follow, sorted)
METHOD_ORDER = ("bf16_linear", "bf16_lora", "qlora_nf4", "fp8_lora", "fp8_base_lora", "fp6_lora", "halo_lora", "falqon")


@dataclass(frozen=True)
class RunLabel:
    """What each figure's footer says about where its numbers come from."""

    run_ids: tuple[str, ...]
    gpus: tuple[str, ...]
    torch: str
    triton: str


def find_nested(obj: Any, keys: tuple[str, ...], kind: type, depth: int = 0) -> Any:
    """The first value of type `kind` under one of `keys` anywhere in a nested manifest dict, else None."""
    if depth > 4 or not isinstance(obj, dict):
        return None
    for key in keys:
        if isinstance(obj.get(key), kind):
            return obj[key]
    for value in obj.values():
        found = find_nested(value, keys, kind, depth + 1)
        if found:
            return found
    return None


def find_key(obj: Any, name: str) -> str | None:
    """The first string value under key `name` (or `name`_version) anywhere in a nested manifest dict."""
    return find_nested(obj, (name, f"{name}_version"), str)


def run_versions(run: RunData) -> dict[str, str]:
    env = run.manifest.get("env", run.manifest)
    return {lib: find_key(env, lib) or "?" for lib in ("torch", "triton")}


def _percentiles(samples: Any, fallback: float | None) -> tuple[float | None, float | None]:
    values = [float(v) for v in samples or [] if v is not None]
    if not values:
        return fallback, fallback
    return float(np.percentile(values, 10)), float(np.percentile(values, 90))


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def variant_label(method: str, compiled: bool, options: Any, kernel_sum: bool) -> str:
    """'method[key=value,...]+compile †': the option set (sorted keys) only when there is one, '+compile' for
    torch.compile, † for a profiler kernel sum."""
    return option_set_label(method, options) + ("+compile" if compiled else "") + (f" {KERNEL_SUM_MARK}" if kernel_sum else "")


def _point_row(p: dict[str, Any], run: RunData) -> dict[str, Any]:
    method = str(p.get("method"))
    compiled = bool(p.get("compile"))
    layer = str(p.get("layer"))
    kind = "gpu" if _is_number(p.get("gpu_ms")) else "wall"
    metric = p.get(f"{kind}_ms") if _is_number(p.get(f"{kind}_ms")) else None
    p10, p90 = _percentiles(p.get(f"{kind}_samples_ms"), metric)
    kernel_ms = p.get("kernel_ms") if isinstance(p.get("kernel_ms"), dict) else None
    ok = p.get("status") == "ok" and metric is not None
    return {
        "run_id": run.run_id,
        "device": str(p.get("device") or "?"),
        "method": method,
        "compile": compiled,
        # † marks a gpu_ms that is a profiler kernel sum (CUDA-graph capture failed): in every table and figure
        "variant": variant_label(method, compiled, p.get("options"), p.get("gpu_timing") == "profiler"),
        "layer": layer,
        "model": layer.rsplit(".", 1)[0] if "." in layer else layer,
        "part": layer.rsplit(".", 1)[-1],
        "K": p.get("K"),
        "N": p.get("N"),
        "rank": p.get("rank"),
        "tokens": p.get("tokens"),
        "per_block": p.get("per_block") if _is_number(p.get("per_block")) else None,
        "ok": ok,
        "error": None if ok else (p.get("error") or ("no timing recorded" if p.get("status") == "ok" else "error")),
        "metric_kind": kind,
        "metric_ms": metric,
        "p10_ms": p10,
        "p90_ms": p90,
        "gpu_ms": p.get("gpu_ms") if _is_number(p.get("gpu_ms")) else None,
        # 'profiler': CUDA-graph capture failed and gpu_ms is the sum of kernel times (idle gaps left out)
        "kernel_sum_timing": p.get("gpu_timing") == "profiler",
        # % of the replayed gpu_ms the profiled kernels leave unexplained (None on CPU or for a kernel sum)
        "residual_pct": (residual(kernel_ms, p.get("gpu_ms"))
                         if ok and kind == "gpu" and p.get("gpu_timing") != "profiler" else None),
        "clock_dropped": bool(p.get("clock_dropped")),
        "wall_ms": p.get("wall_ms") if _is_number(p.get("wall_ms")) else None,
        "floor_ms": p.get("floor_ms") if _is_number(p.get("floor_ms")) else None,
        **{f"k_{c}": (float(kernel_ms.get(c) or 0.0) if kernel_ms else None) for c in BREAKDOWN_CATEGORIES},
        "has_kernel_ms": bool(kernel_ms) and any(_is_number(v) and v > 0 for v in kernel_ms.values()),
        "options": json.dumps(p.get("options"), sort_keys=True, default=str) if p.get("options") else "",
    }


def points_table(runs: Iterable[RunData]) -> pd.DataFrame:
    """One row per point of every run (a later run's point replaces an identical earlier one)."""
    rows = [_point_row(p, run) for run in runs for p in run.points]
    df = pd.DataFrame(rows)
    identity = ["device", "method", "compile", "layer", "K", "N", "rank", "tokens", "options"]
    return df.drop_duplicates(subset=identity, keep="last").reset_index(drop=True)


def _split_variant(variant: str) -> tuple[str, str, str]:
    """(method, option text without brackets, suffix) of a label such as 'falqon[rounding=stochastic]+compile †'.

    The method ends at the first '[' or '+'; an option set runs from that '[' to the last ']' (a value may hold
    brackets or '+'; the suffix never holds ']'); the suffix is what follows the '+' after it."""
    end = min((i for i in (variant.find("["), variant.find("+")) if i >= 0), default=len(variant))
    rest, options = variant[end:], ""
    if rest.startswith("[") and "]" in rest:
        close = rest.rfind("]")
        options, rest = rest[1:close], rest[close + 1:]
    return variant[:end].replace(KERNEL_SUM_MARK, "").strip(), options, rest.partition("+")[2]


def variant_parts(variant: str) -> tuple[str, str]:
    """(method, suffix) of a variant label such as 'falqon[flush_every=1]+compile †': ('falqon', 'compile †')."""
    method, _, suffix = _split_variant(variant)
    return method, suffix


def option_set(variant: str) -> str:
    """The label without '+compile' and the kernel-sum mark: 'falqon[flush_every=1]', or 'falqon' without options;
    what eager and compiled points of one option set share."""
    method, options, _ = _split_variant(variant)
    return method + (f"[{options}]" if options else "")


def method_sort_key(variant: str) -> tuple[int, str, str, str, str]:
    """Methods in METHOD_ORDER; within one, no options first, then option sets by their text, each eager then
    compiled (the whole label last: 'falqon' and 'falqon †' never tie, so the order never depends on a set's)."""
    method, options, suffix = _split_variant(variant)
    idx = METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER)
    return idx, method, options, suffix, variant


def ordered(values: Iterable[str]) -> list[str]:
    return sorted(set(values), key=method_sort_key)


def reference_config(df: pd.DataFrame) -> tuple[Any, Any] | None:
    """The (rank, tokens) most variants ran at; None when df is empty.

    Ties: more tokens, then the rank nearest the middle of the swept ranks (64 of 16..256, the paper's
    setting), then the smaller rank.
    """
    if df.empty:
        return None
    counts = df.groupby(["rank", "tokens"])["variant"].nunique().reset_index()
    log_rank = np.log2(counts["rank"].astype(float).clip(lower=1.0))  # rank 0: kernel rows, which have no adapter
    middle = float(np.median(log_rank.unique()))
    counts["off_middle"] = (log_rank - middle).abs()
    counts = counts.sort_values(["variant", "tokens", "off_middle", "rank"], ascending=[False, False, True, True])
    row = counts.iloc[0]
    return int(row["rank"]), int(row["tokens"])


def at_config(df: pd.DataFrame, config: tuple[Any, Any] | None) -> pd.DataFrame:
    if config is None:
        return df.iloc[0:0]
    return df[(df["rank"] == config[0]) & (df["tokens"] == config[1])]


def best_of_compile(df: pd.DataFrame) -> pd.DataFrame:
    """Per method and shape, the fastest of eager and compiled (ok points win over failed ones, CUDA-graph
    times over profiler kernel sums); the variant label keeps '+compile' when the compiled one won.

    A method run with several option sets counts at its best one too (the label says which): this answers
    "how fast can the method be here", for the fastest-method views; figures that list variants side by
    side draw every option set instead."""
    if df.empty:
        return df
    keys = ["device", "method", "layer", "rank", "tokens"]
    # a kernel-sum time is a lower bound, not a step time: it wins only where nothing else was timed
    kernel_sum = df["kernel_sum_timing"].fillna(False).astype(bool) if "kernel_sum_timing" in df else False
    measured = df["metric_ms"].fillna(np.inf) + np.where(kernel_sum, 1e12, 0.0)
    ranked = df.assign(_rank=np.where(df["ok"], measured, np.inf))
    return ranked.sort_values("_rank").drop_duplicates(subset=keys, keep="first").drop(columns="_rank")


def metric_label(df: pd.DataFrame) -> str:
    """'GPU time' when every plotted point has gpu_ms, 'CPU wall time' when they all fell back, else both."""
    kinds = set(df.loc[df["ok"], "metric_kind"]) if not df.empty else set()
    if kinds == {"wall"}:
        return "CPU wall time"
    if kinds == {"gpu"} or not kinds:
        return "GPU time"
    return "GPU time, CPU wall time where no GPU time"


def label_for(runs: list[RunData], df: pd.DataFrame) -> RunLabel:
    versions = [run_versions(r) for r in runs]
    return RunLabel(
        run_ids=tuple(r.run_id for r in runs),
        gpus=tuple(sorted(set(df["device"]))) if not df.empty else ("?",),
        torch=", ".join(sorted({v["torch"] for v in versions})),
        triton=", ".join(sorted({v["triton"] for v in versions})),
    )


def speedup_text(base: Any, row: Any) -> str:
    """'1.49x' for base_ms / row_ms, or a marked text where the number would mislead.

    GPU times (CUDA-graph replays) print as they are. CPU wall times move by far more between runs
    than within one (0.14 -> 7.9 ms seen on a shared host), so a CPU speedup prints only when the two
    p10-p90 ranges do not overlap, marked '(CPU)'; otherwise 'within CPU noise'.
    """
    base_ms, ms = base.get("metric_ms"), row.get("metric_ms")
    if not _is_number(base_ms) or not _is_number(ms) or ms <= 0:
        return "-"
    text = f"{base_ms / ms:.2f}x"
    if base.get("variant") == row.get("variant") or "wall" not in (base.get("metric_kind"), row.get("metric_kind")):
        return text
    lo_b, hi_b, lo, hi = (base.get("p10_ms"), base.get("p90_ms"), row.get("p10_ms"), row.get("p90_ms"))
    if all(_is_number(v) for v in (lo_b, hi_b, lo, hi)) and (hi < lo_b or lo > hi_b):
        return f"{text} (CPU)"
    return "within CPU noise"
