"""The regression gate: does a new result set run slower than a baseline, beyond noise and beyond a factor?

Like asv, a point regressed only when both hold:
  1. its samples differ significantly: two-sided Mann-Whitney U (scipy), p < alpha (default 0.002),
     computed exactly when the sizes allow (no ties, both sides <= EXACT_MAX samples), else by the
     normal approximation; with fewer than MIN_SAMPLES samples on a side, the test cannot reach such
     a p, so the two medians' 99% confidence intervals must not overlap instead. The intervals are
     distribution-free order-statistic intervals of the median (binomial ranks); below 8 samples no
     pair of order statistics covers 99%, and the full range [min, max] is used (its coverage is
     1 - 2^(1-n), e.g. 75% at n = 3), which is the widest, most conservative choice.
  2. the median ratio new/base exceeds `factor` (default 1.10), or a per-point override: an fnmatch
     pattern on the point key "method/layer/rank/tokens/eager|compile" -> factor; the first pattern
     that matches wins.
Samples are gpu_samples_ms when both sides have them, else wall_samples_ms. Runs from different GPU
models are never compared. A point present on one side only is reported as "missing" (two runs that share
no point at all are refused: nothing would be gated); a point that
errored is "failed", and one that ran in the baseline but errors in the new run fails the gate.
"""

from __future__ import annotations

import fnmatch
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from falqon_bench.data.errors import BenchInputError
from falqon_bench.data.schema import IDENTITY_KEYS, method_label
from falqon_bench.data.store import RunData, load_results

MIN_SAMPLES = 5
EXACT_MAX = 100
CI_CONFIDENCE = 0.99

VERDICTS = ("regressed", "improved", "same", "missing", "failed")


@dataclass
class GateResult:
    """rows: one dict per point (key, base_ms, new_ms, ratio, p_value, test, factor, samples, verdict, note).
    regressed: whether the gate fails (a significant slowdown beyond its factor, or a new failure)."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    regressed: bool = False
    base_device: str = ""
    new_device: str = ""

    def count(self, verdict: str) -> int:
        return sum(r["verdict"] == verdict for r in self.rows)

    def summary(self) -> str:
        counts = ", ".join(f"{self.count(v)} {v}" for v in VERDICTS if self.count(v))
        state = "REGRESSION" if self.regressed else "no regression"
        return f"{state} on {self.new_device or self.base_device}: {counts}"

    def to_table(self):
        """A rich Table of every point, worst ratio first."""
        from rich.markup import escape
        from rich.table import Table

        style = {"regressed": "bold red", "failed": "red", "improved": "green", "missing": "yellow", "same": ""}
        table = Table(title=f"falqon-bench compare ({self.base_device})", caption=self.summary())
        for col, justify in (("point", "left"), ("base ms", "right"), ("new ms", "right"), ("ratio", "right"),
                             ("p", "right"), ("factor", "right"), ("verdict", "left"), ("note", "left")):
            table.add_column(col, justify=justify)

        def fmt(v: Any, spec: str) -> str:
            return "-" if v is None else format(v, spec)

        for r in sorted(self.rows, key=lambda r: -(r["ratio"] or 0.0)):
            # keys and notes are data (an option set's '[k=v]', a layer name): never rich markup
            table.add_row(escape(r["key"]), fmt(r["base_ms"], ".4f"), fmt(r["new_ms"], ".4f"), fmt(r["ratio"], ".3f"),
                          fmt(r["p_value"], ".2g"), fmt(r["factor"], ".2f"), r["verdict"], escape(r["note"] or ""),
                          style=style[r["verdict"]])
        return table


def point_key(point: dict[str, Any]) -> str:
    """'method/layer/rank/tokens/eager|compile': the name overrides match against; a point run with method options
    names them with its method, 'falqon[flush_every=1]/...' (a pattern 'falqon*/*' matches every falqon point).
    An e2e or accuracy point keeps its kind's settings in `options` (batch, lr, ...; e2e its method's options under
    method_options): an e2e point is named by its method's option set and its mode (+liger, xN processes), an
    accuracy point by its label, lr and seed.
    """
    kind, options = point.get("kind", "layers"), point.get("options") or {}
    shape = f"{point.get('layer')}/{point.get('rank')}/{point.get('tokens')}"
    if kind == "e2e" and isinstance(options, dict):
        method = method_label(point)
        mode = str(options.get("mode") or point.get("mode") or ("compile" if point.get("compile") else "eager"))
        mode += "+liger" if options.get("liger") else ""
        mode += f"/x{options['world_size']}" if (options.get("world_size") or 1) > 1 else ""
        return f"{method}/{shape}/{mode}"
    if kind == "accuracy" and isinstance(options, dict) and "label" in options:
        return f"{options['label']}/{shape}/lr={options.get('lr')}/seed={options.get('seed')}"
    mode = "compile" if point.get("compile") else "eager"
    return f"{method_label(point)}/{shape}/{mode}"


def _match_key(point: dict[str, Any]) -> str:
    """Everything that makes two points the same benchmark, except the suite name (a baseline file may
    come from a differently named suite)."""
    ident = {k: point.get(k) for k in IDENTITY_KEYS if k != "suite"}
    return json.dumps(ident, sort_keys=True, default=str)


def _devices(run: RunData) -> set[str]:
    return {str(p["device"]) for p in run.points if p.get("device") and p.get("status") == "ok"} or {
        str(p["device"]) for p in run.points if p.get("device")
    }


def _single_device(run: RunData, side: str) -> str:
    devices = _devices(run)
    if len(devices) > 1:
        raise BenchInputError(f"{side} {run.run_dir} holds points from several GPU models {sorted(devices)}: gate one GPU model at a time")
    return next(iter(devices), "")


def _samples(point: dict[str, Any], kind: str) -> list[float]:
    values = point.get(f"{kind}_samples_ms") or []
    if not values and point.get(f"{kind}_ms") is not None:
        values = [point[f"{kind}_ms"]]
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


def median_ci(samples: list[float], confidence: float = CI_CONFIDENCE) -> tuple[float, float]:
    """Distribution-free confidence interval of the median from order statistics.

    The interval [x_(k), x_(n-k+1)] covers the median with probability 1 - 2 P(Binomial(n, 1/2) < k);
    take the largest k that keeps that >= confidence. When even k = 1 falls short (n < 8 at 99%),
    return [min, max].
    """
    from scipy.stats import binom

    xs = sorted(samples)
    n = len(xs)
    if n == 0:
        raise ValueError("median_ci needs at least one sample")
    k = 0
    for cand in range(1, n // 2 + 1):
        if 1 - 2 * binom.cdf(cand - 1, n, 0.5) >= confidence:
            k = cand
        else:
            break
    if k == 0:
        return xs[0], xs[-1]
    return xs[k - 1], xs[n - k]


def _significance(base: list[float], new: list[float], alpha: float) -> tuple[bool, float | None, str]:
    """(differs, p-value or None, test name)."""
    if len(base) >= MIN_SAMPLES and len(new) >= MIN_SAMPLES:
        from scipy.stats import mannwhitneyu

        ties = len(set(base) | set(new)) < len(base) + len(new)
        exact = not ties and max(len(base), len(new)) <= EXACT_MAX
        if len(set(base) | set(new)) == 1:
            return False, 1.0, "mann-whitney"  # every sample equal: no difference to test
        p = float(mannwhitneyu(new, base, alternative="two-sided", method="exact" if exact else "asymptotic").pvalue)
        if math.isnan(p):
            p = 1.0
        return p < alpha, p, "mann-whitney exact" if exact else "mann-whitney"
    lo_b, hi_b = median_ci(base)
    lo_n, hi_n = median_ci(new)
    return (lo_n > hi_b or hi_n < lo_b), None, "99% CI"


def _factor_for(key: str, factor: float, overrides: dict[str, float] | None) -> float:
    for pattern, value in (overrides or {}).items():
        if fnmatch.fnmatchcase(key, pattern):
            return float(value)
    return factor


def _compare_point(key: str, base: dict[str, Any] | None, new: dict[str, Any] | None, factor: float, alpha: float) -> dict[str, Any]:
    row: dict[str, Any] = {"key": key, "base_ms": None, "new_ms": None, "ratio": None, "p_value": None,
                           "test": None, "factor": factor, "samples": None, "verdict": "same", "note": "", "new_failure": False}
    if base is None or new is None:
        row["verdict"] = "missing"
        row["note"] = "only in new run" if base is None else "only in baseline"
        return row
    if base.get("status") != "ok" or new.get("status") != "ok":
        row["verdict"] = "failed"
        which = [side for side, p in (("baseline", base), ("new", new)) if p.get("status") != "ok"]
        errors = "; ".join(f"{side}: {p.get('error') or 'error'}" for side, p in (("baseline", base), ("new", new)) if p.get("status") != "ok")
        row["note"] = errors
        row["new_failure"] = which == ["new"]
        return row
    kind = "gpu" if _samples(base, "gpu") and _samples(new, "gpu") else "wall"
    b, n = _samples(base, kind), _samples(new, kind)
    if not b or not n:
        row["verdict"] = "missing"
        row["note"] = "no timing samples on " + ("either side" if not b and not n else "the baseline" if not b else "the new run")
        return row
    base_ms, new_ms = statistics.median(b), statistics.median(n)
    ratio = new_ms / base_ms if base_ms > 0 else math.inf
    differs, p, test = _significance(b, n, alpha)
    row.update(base_ms=base_ms, new_ms=new_ms, ratio=ratio, p_value=p, test=test, samples=f"{kind} {len(b)}/{len(n)}")
    if differs and ratio > factor:
        row["verdict"] = "regressed"
    elif differs and ratio < 1.0 / factor:
        row["verdict"] = "improved"
    row["note"] = test if differs else f"{test}: not significant"
    return row


def compare_runs(
    base: Path | str,
    new: Path | str,
    factor: float = 1.10,
    overrides: dict[str, float] | None = None,
    alpha: float = 0.002,
) -> GateResult:
    """Compare a new result set against a baseline (a run directory or a bare points .jsonl file).

    Raises BenchInputError on a bad factor/alpha or when the sides ran on different GPU models, and
    ResultsError (a BenchInputError) when a results path is missing or corrupt.
    """
    if not factor or factor < 1.0:
        raise BenchInputError(f"factor must be >= 1.0 (a slowdown ratio, e.g. 1.10), got {factor}")
    if not 0.0 < alpha < 1.0:
        raise BenchInputError(f"alpha must be in (0, 1), got {alpha}")
    checked: dict[str, float] = {}
    for pattern, value in (overrides or {}).items():
        try:
            checked[pattern] = float(value)
        except (TypeError, ValueError):
            checked[pattern] = float("nan")
        if not checked[pattern] >= 1.0:
            raise BenchInputError(f"override {pattern!r}: factor must be a number >= 1.0, got {value!r}")
    base_run, new_run = load_results(base), load_results(new)
    base_dev, new_dev = _single_device(base_run, "baseline"), _single_device(new_run, "new run")
    if base_dev and new_dev and base_dev != new_dev:
        raise BenchInputError(f"base ran on {base_dev}, new on {new_dev}: compare runs from the same GPU model")
    base_pts = {_match_key(p): p for p in base_run.points}
    new_pts = {_match_key(p): p for p in new_run.points}
    if base_pts and new_pts and not set(base_pts) & set(new_pts):
        # every point 'missing' would pass the gate while gating nothing (e.g. a baseline of another suite)
        raise BenchInputError(
            f"{base} and {new} share no point (same method, layer, rank, tokens, variant and options): nothing to "
            "compare; give a baseline and a new run of the same suite"
        )
    rows = []
    for mk in sorted(set(base_pts) | set(new_pts)):
        b, n = base_pts.get(mk), new_pts.get(mk)
        key = point_key(n or b)
        rows.append(_compare_point(key, b, n, _factor_for(key, factor, checked), alpha))
    regressed = any(r["verdict"] == "regressed" or r.get("new_failure") for r in rows)
    return GateResult(rows=rows, regressed=regressed, base_device=base_dev, new_device=new_dev)
