"""Launch configurations of the memory-bound quantize kernels, chosen per shape class from a tuned table.

Why: on the H200 these kernels ran at ~2-3 TB/s of ~4.8 (the 64x64-tile cast-transpose at ~2), and that is the
gap to FALQON's roofline floor. Block sizes, warps, grid size and loop pipelining are what a GPU run tunes
(scripts/gpu/tune_quantize.py); none of them changes a result: amax is a max (exact in any order) and the casts
and the transpose are elementwise, so every config is bit-identical (tests/test_quantize_configs.py checks the
whole tune grid under the interpreter).

The table is keyed by shape *class*, not by shape, so shapes no suite ran get a tuned config too:
  flat kernels (partial_amax, cast_tensorwise):  numel bucket, e.g. "le16M"
  2-D kernels (cast_transpose, transpose_bytes):  numel bucket + width bucket of the contiguous dim, "le16M/wide"
A class missing from the table takes the defaults below (what the kernels ran with before tuning).

To apply a tuner run: replace TUNED with the `TUNED = {...}` block that scripts/gpu/tune_quantize.py prints
(also under "table" in its --out JSON), or, without editing anything (another GPU, a trial), point the
environment variable FALQON_KERNEL_TABLE at that JSON: its classes override TUNED's (read at the first launch).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from functools import lru_cache
from typing import Optional

KERNELS = ("partial_amax", "cast_tensorwise", "cast_transpose", "transpose_bytes")

# numel buckets (upper bounds, inclusive) and their names; past the last: "gt64M"
_NUMEL_BUCKETS = ((1 << 20, "le1M"), (1 << 22, "le4M"), (1 << 24, "le16M"), (1 << 26, "le64M"))
# width buckets of the contiguous dimension (columns): tiles that suit a 1024-wide dY differ from a 4096-wide x;
# "thin" (<= 256 columns) is FALQON's O_A (M x r), which no dY or x is (their widths are layer dims, >= 1024)
_WIDTH_BUCKETS = ((256, "thin"), (1024, "narrow"), (4096, "mid"))

# the interpreter runs whole blocks as numpy arrays: a small flat block keeps the CPU tests fast
_FLAT_BLOCK_INTERPRETER = 512


def _pow2(name: str, value: int) -> None:
    if not isinstance(value, int) or value < 1 or value & (value - 1):
        raise ValueError(f"{name} must be a positive power of 2, got {value!r}")


@dataclass(frozen=True)
class FlatConfig:
    """A flat grid-stride kernel (partial_amax, cast_tensorwise): `block` elements per program per iteration,
    min(blocks, SMs * programs_per_sm) programs, and the loop pipelined num_stages deep (None: not pipelined)."""

    block: int = 4096
    num_warps: int = 8
    programs_per_sm: int = 4
    num_stages: Optional[int] = None

    def __post_init__(self):
        _pow2("block", self.block)
        _pow2("num_warps", self.num_warps)
        if not isinstance(self.programs_per_sm, int) or self.programs_per_sm < 1:
            raise ValueError(f"programs_per_sm must be a positive int, got {self.programs_per_sm!r}")
        if self.num_stages is not None and (not isinstance(self.num_stages, int) or self.num_stages < 1):
            raise ValueError(f"num_stages must be None or a positive int, got {self.num_stages!r}")

    def programs(self, n: int, sms: int) -> int:
        return max(1, min(-(-n // self.block), sms * self.programs_per_sm))


@dataclass(frozen=True)
class TileConfig:
    """A 2-D tiled kernel: block_r x block_c tiles of the input; programs_per_sm None = one program per tile,
    else a grid-stride loop over the tiles with min(tiles, SMs * programs_per_sm) programs (pipelined num_stages
    deep; cast_transpose only: transpose_bytes is always one program per tile)."""

    block_r: int = 64
    block_c: int = 64
    num_warps: int = 4
    programs_per_sm: Optional[int] = 4
    num_stages: Optional[int] = None

    def __post_init__(self):
        _pow2("block_r", self.block_r)
        _pow2("block_c", self.block_c)
        _pow2("num_warps", self.num_warps)
        if self.programs_per_sm is not None and (not isinstance(self.programs_per_sm, int) or self.programs_per_sm < 1):
            raise ValueError(f"programs_per_sm must be None or a positive int, got {self.programs_per_sm!r}")
        if self.num_stages is not None and (not isinstance(self.num_stages, int) or self.num_stages < 1):
            raise ValueError(f"num_stages must be None or a positive int, got {self.num_stages!r}")

    def tiles(self, n_rows: int, n_cols: int) -> int:
        return -(-n_rows // self.block_r) * -(-n_cols // self.block_c)

    def programs(self, n_rows: int, n_cols: int, sms: int) -> int:
        tiles = self.tiles(n_rows, n_cols)
        return max(1, tiles if self.programs_per_sm is None else min(tiles, sms * self.programs_per_sm))


# the configs every kernel ran with before tuning
DEFAULTS = {
    "partial_amax": FlatConfig(),
    "cast_tensorwise": FlatConfig(),
    "cast_transpose": TileConfig(),
    "transpose_bytes": TileConfig(programs_per_sm=None),
}

# kernel -> shape class -> config fields (only those that differ from DEFAULTS need be given).
# Paste the tuner's TUNED block here; empty: every class runs the defaults.
# From the H200 run results/shapes-tuned-h200 (tune_quantize.txt: 30 kernel-shapes, all bit-identical to the
# defaults; mean time of each class's winner 0.77-0.96x its default's). Classes not listed keep the defaults.
TUNED: dict[str, dict[str, dict]] = {
    "partial_amax": {},
    "cast_tensorwise": {
        "le16M": {"block": 2048, "num_warps": 4, "programs_per_sm": 16},
        "le64M": {"num_warps": 4, "programs_per_sm": 8},
    },
    "cast_transpose": {
        # O_A (M x r, r <= 256): 64 x 64 tiles took 6.4-6.6 us at r 8-24 and 5.0 at r 100 (M 2048 and 4096, H200),
        # 32 x 16 tiles 1.8-3.2 us (results/probes-step-h200/oa_cast.txt; r 64: 3.0 -> 2.3 at M 4096)
        "le1M/thin": {"block_r": 32, "block_c": 16, "programs_per_sm": None},
        "le16M/mid": {"programs_per_sm": None},
        "le64M/mid": {"programs_per_sm": None},
        "le64M/wide": {"programs_per_sm": None},
    },
    "transpose_bytes": {
        "le16M/mid": {"block_r": 128, "block_c": 128, "num_warps": 8},
        "le4M/mid": {"block_r": 128, "block_c": 128, "num_warps": 8},
    },
}


def numel_bucket(numel: int) -> str:
    for bound, name in _NUMEL_BUCKETS:
        if numel <= bound:
            return name
    return "gt64M"


def width_bucket(n_cols: int) -> str:
    for bound, name in _WIDTH_BUCKETS:
        if n_cols <= bound:
            return name
    return "wide"


def shape_class(kernel: str, n_rows: int, n_cols: int) -> str:
    """The table key of a shape: "le16M" for the flat kernels, "le16M/narrow" for the 2-D ones.
    n_rows x n_cols: the input as the kernel reads it (a flat tensor is 1 x numel)."""
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; one of {KERNELS}")
    if n_rows < 0 or n_cols < 0:
        raise ValueError(f"shape must be non-negative, got {(n_rows, n_cols)}")
    numel = numel_bucket(n_rows * n_cols)
    if kernel in ("partial_amax", "cast_tensorwise"):
        return numel
    return f"{numel}/{width_bucket(n_cols)}"


def make_config(kernel: str, overrides: dict | None = None):
    """DEFAULTS[kernel] with `overrides` (field -> value) applied; a clear error for an unknown field."""
    base = DEFAULTS[kernel]
    overrides = dict(overrides or {})
    known = {f.name for f in fields(base)}
    unknown = set(overrides) - known
    if unknown:
        raise ValueError(f"{kernel} config has no field(s) {sorted(unknown)}; fields: {sorted(known)}")
    return replace(base, **overrides)


def as_overrides(kernel: str, config) -> dict:
    """The fields of `config` that differ from DEFAULTS[kernel] (the form TUNED stores)."""
    base = asdict(DEFAULTS[kernel])
    return {k: v for k, v in asdict(config).items() if base[k] != v}


def _validate(table: dict) -> dict:
    """TUNED as configs; raises at import on a mistyped paste rather than at the first launch."""
    if set(table) - set(KERNELS):
        raise ValueError(f"TUNED has unknown kernel(s) {sorted(set(table) - set(KERNELS))}")
    return {k: {cls: make_config(k, o) for cls, o in table.get(k, {}).items()} for k in KERNELS}


# A tuner run on another GPU applies without editing this file: FALQON_KERNEL_TABLE names its --out JSON (or a
# JSON of the table alone); its classes replace TUNED's, kernel by kernel and class by class.
TABLE_ENV = "FALQON_KERNEL_TABLE"


def load_table_file(path: str) -> dict:
    """The table of a tune_quantize.py --out JSON (key "table") or of a bare table JSON; clear errors."""
    import json

    try:
        with open(path) as f:
            data = json.load(f)
    except OSError as err:
        raise ValueError(f"{TABLE_ENV}={path}: cannot read it ({err.strerror})") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{TABLE_ENV}={path}: not JSON ({err})") from None
    table = data.get("table", data) if isinstance(data, dict) else None
    if not isinstance(table, dict) or not all(isinstance(v, dict) for v in table.values()):
        raise ValueError(f"{TABLE_ENV}={path}: expected {{kernel: {{shape class: {{field: value}}}}}} "
                         f"(or a tune_quantize.py --out file), got {type(table).__name__}")
    try:
        _validate(table)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{TABLE_ENV}={path}: {err}") from None
    return table


def merged_table(path: str | None = None) -> dict:
    """TUNED with the classes of the table file at `path` (default: $FALQON_KERNEL_TABLE, if set) laid over it."""
    import os

    path = os.environ.get(TABLE_ENV) if path is None else path
    table = {k: dict(TUNED.get(k, {})) for k in KERNELS}
    if path:
        for kernel, classes in load_table_file(path).items():
            table[kernel].update(classes)
    return table


def table_source() -> dict:
    """What the manifest records: the committed table, or the file that overrode it (path and content)."""
    import os

    path = os.environ.get(TABLE_ENV)
    return {"table": merged_table(), "override": path or None}


@lru_cache(maxsize=None)
def _table() -> dict:
    """The validated table, built at the first launch (not at import: a bad FALQON_KERNEL_TABLE file is then an
    error of the run that uses it, which the CLI reports as an input error before any point)."""
    return _validate(merged_table())


def config_for(kernel: str, n_rows: int, n_cols: int, interpreter: bool = False):
    """The launch config of `kernel` for an n_rows x n_cols input: TUNED's entry for its shape class, else the
    default. Under the interpreter the flat kernels take a small block (CPU test speed; results are the same)."""
    cfg = _table()[kernel].get(shape_class(kernel, n_rows, n_cols), DEFAULTS[kernel])
    if interpreter and isinstance(cfg, FlatConfig):
        cfg = replace(cfg, block=_FLAT_BLOCK_INTERPRETER)
    return cfg


def _flat(block, num_warps, programs_per_sm, num_stages=None):
    return FlatConfig(block, num_warps, programs_per_sm, num_stages)


def _tile(block_r, block_c, num_warps, programs_per_sm, num_stages=None):
    return TileConfig(block_r, block_c, num_warps, programs_per_sm, num_stages)


# What scripts/gpu/tune_quantize.py times (the default first); tests/test_quantize_configs.py checks every one is
# bit-identical to the torch reference under the interpreter. Sized for ~200 timings in the tuner's 120 s.
# No num_stages candidates: with Triton 3.8 for sm_90, tl.range(num_stages=2 or 3) left the PTX of all three
# grid-stride loops byte-identical (no cp.async: the pipeliner does not take these loads), so they would time
# the same as their unstaged twins. The knob stays for a Triton that does pipeline them.
TUNE_GRID = {
    "partial_amax": (
        DEFAULTS["partial_amax"], _flat(4096, 8, 8), _flat(4096, 4, 8), _flat(8192, 8, 4), _flat(8192, 8, 8),
        _flat(8192, 16, 4), _flat(16384, 16, 2), _flat(16384, 16, 4),
    ),
    "cast_tensorwise": (
        DEFAULTS["cast_tensorwise"], _flat(4096, 8, 8), _flat(4096, 4, 8), _flat(8192, 8, 4), _flat(8192, 8, 8),
        _flat(8192, 16, 4), _flat(2048, 4, 16), _flat(16384, 16, 2),
    ),
    "cast_transpose": (
        DEFAULTS["cast_transpose"], _tile(64, 64, 4, None), _tile(64, 64, 4, 8), _tile(64, 128, 4, 4),
        _tile(64, 128, 8, 8), _tile(64, 128, 4, None), _tile(128, 64, 4, 8), _tile(128, 64, 8, 4),
        _tile(128, 64, 4, None), _tile(128, 128, 8, 4), _tile(128, 128, 8, None), _tile(128, 128, 8, 16),
        _tile(32, 16, 4, None), _tile(64, 16, 4, None),  # thin O_A (M x r)
    ),
    "transpose_bytes": (
        DEFAULTS["transpose_bytes"], _tile(64, 128, 4, None), _tile(128, 64, 4, None), _tile(128, 128, 4, None),
        _tile(128, 128, 8, None), _tile(32, 128, 4, None),
    ),
}
