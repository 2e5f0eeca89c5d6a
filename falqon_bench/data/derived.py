"""Numbers derived from a stored results row, for readers (report, figures) that must not import torch.

These are pure functions of row fields (no torch, no falqon_core): the measuring side
(breakdown, roofline) re-exports them under their old names, so both sides compute them the same way.
Units: every `*_ms` is milliseconds per step; results are percent.
"""

from __future__ import annotations

import math


def residual(kernel_ms: dict[str, float] | None, gpu_ms: float | None) -> float | None:
    """Percent of gpu_ms the profiled kernels do not explain: 100 * (gpu_ms - sum) / gpu_ms.

    Negative when kernels sum to more than the step (overlapping streams, profiler overhead).
    None when either side is missing.
    """
    if not kernel_ms or gpu_ms is None or gpu_ms <= 0:
        return None
    return 100.0 * (gpu_ms - sum(kernel_ms.values())) / gpu_ms


def pct_of_floor(ms: float | None, floor: float | None) -> float | None:
    """How close a measured time is to its floor, percent: 100 * floor / ms (100 = at the floor).

    None when either is missing (None or NaN) or ms is not positive.
    """
    if ms is None or floor is None or not math.isfinite(ms) or not math.isfinite(floor) or ms <= 0:
        return None
    return 100.0 * floor / ms
