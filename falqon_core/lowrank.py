"""The top-r singular values and right singular vectors of a matrix, exactly or by a randomized method.

FALQON's init needs only the top r (16-64) singular triplets of each layer's quantization error (N x K, up to
11008 x 4096 in LLaMA-7B). A full SVD computes all min(N, K) of them: about 1 s per layer on an H200, 230 s for
LLaMA-7B's 224 linears. A randomized range finder (Halko, Martinsson & Tropp 2011, Alg. 4.4 with power
iterations) costs a few N x K x (r + oversample) GEMMs instead. It is seeded with its own generator, so every
DDP rank (and every rerun) computes the same A from the same W without touching the global RNG.
"""

from __future__ import annotations

import torch

SVD_METHODS = ("exact", "lowrank")
DEFAULT_OVERSAMPLE = 32
DEFAULT_POWER_ITERATIONS = 8


def top_singular(matrix: torch.Tensor, rank: int, method: str = "lowrank", oversample: int = DEFAULT_OVERSAMPLE,
                 power_iterations: int = DEFAULT_POWER_ITERATIONS, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(s (r,), vh (r x K)): the r largest singular values of `matrix` (N x K) and their right singular vectors.

    method "exact": torch.linalg.svd (all of them, then the top r). "lowrank": randomized, with q = r + oversample
    probe vectors and `power_iterations` rounds of E.E^T (each re-orthonormalized), in matrix's dtype.
    """
    if method == "exact" or rank + oversample >= min(matrix.shape):  # no saving on a matrix this small
        _, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        return s[:rank], vh[:rank]
    if method != "lowrank":
        raise ValueError(f"SVD method must be one of {SVD_METHODS}, got {method!r}")
    n_rows, n_cols = matrix.shape
    q = min(rank + oversample, n_rows, n_cols)
    generator = torch.Generator(device=matrix.device).manual_seed(seed)
    probe = torch.randn(n_cols, q, generator=generator, device=matrix.device, dtype=matrix.dtype)
    basis = torch.linalg.qr(matrix @ probe).Q  # N x q, spans most of the range's top directions
    for _ in range(power_iterations):  # sharpen towards the top: E E^T amplifies large singular values
        basis = torch.linalg.qr(matrix @ torch.linalg.qr(matrix.mT @ basis).Q).Q
    _, s, vh = torch.linalg.svd(basis.mT @ matrix, full_matrices=False)  # q x K: cheap
    return s[:rank], vh[:rank]
