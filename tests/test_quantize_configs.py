"""Launch configs of the quantize kernels: every config in the tune grid gives the torch reference's bytes
(interpreter), and the config table maps shape classes to configs (defaults where untuned, clear errors)."""

import json

import pytest
import torch

from falqon_core import fp8
from falqon_core.kernels import quantize_configs as qc
from falqon_core.kernels.quantize import launch_cast_tensorwise, launch_partial_amax, quantize_fp8_reference
from falqon_core.kernels.quantize_transpose import launch_cast_transpose, quantize_transpose_fp8_reference
from falqon_core.kernels.transpose import launch_transpose_bytes, transpose_fp8_reference


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    bits = lambda t: t.reshape(-1).view(torch.uint8)  # noqa: E731
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b))


def _input(shape, where=-1):
    x = (torch.randn(*shape) * 20).bfloat16()
    x[-1, 0] = 0.0
    x.view(-1)[where] = -900.0  # the amax at one end of the walk: a program that skips a block would miss it
    return x


def _ids(kernel):
    return [f"{kernel}-{i}" for i in range(len(qc.TUNE_GRID[kernel]))]


@pytest.mark.parametrize("cfg", qc.TUNE_GRID["partial_amax"], ids=_ids("partial_amax"))
# odd sizes (masked tails); 301 x 400 gives every program of the 16K-element blocks more than one iteration
@pytest.mark.parametrize("shape,where", [((77, 130), -1), ((300, 96), 0), ((301, 400), -1)])
def test_every_amax_config_finds_the_same_max(cfg, shape, where):
    x = _input(shape, where)
    partials = launch_partial_amax(x.view(-1), cfg)
    assert partials.numel() == cfg.programs(x.numel(), 2)
    assert float(partials.max()) == float(x.float().abs().max()) == 900.0


@pytest.mark.parametrize("cfg", qc.TUNE_GRID["cast_tensorwise"], ids=_ids("cast_tensorwise"))
@pytest.mark.parametrize("shape", [(77, 130), (301, 400)])
def test_every_cast_config_is_bit_identical_to_the_reference(cfg, shape):
    x = _input(shape)
    x[3, 5] = 1e-30  # a subnormal-after-scaling value
    partials = launch_partial_amax(x.view(-1), qc.DEFAULTS["partial_amax"])
    out, scale = launch_cast_tensorwise(x, partials, fp8.E4M3, None, cfg)
    want, want_scale = quantize_fp8_reference(x, fp8.E4M3)
    assert same_bytes(out, want) and torch.equal(scale, want_scale)


@pytest.mark.parametrize("cfg", qc.TUNE_GRID["cast_transpose"], ids=_ids("cast_transpose"))
@pytest.mark.parametrize("shape,pad_to,keep_rows", [((77, 130), 16, True), ((150, 40), 1, False), ((300, 390), 16, True)])
def test_every_cast_transpose_config_is_bit_identical_to_the_reference(cfg, shape, pad_to, keep_rows):
    x = _input(shape)
    partials = launch_partial_amax(x.view(-1), qc.DEFAULTS["partial_amax"])
    out, out_t, scale = launch_cast_transpose(x, partials, fp8.E5M2, pad_to, keep_rows, None, cfg)
    want, want_t, want_scale = quantize_transpose_fp8_reference(x, fp8.E5M2, pad_to)
    assert same_bytes(out_t, want_t) and torch.equal(scale, want_scale)
    assert same_bytes(out, want) if keep_rows else out.numel() == 0


@pytest.mark.parametrize("cfg", qc.TUNE_GRID["transpose_bytes"], ids=_ids("transpose_bytes"))
@pytest.mark.parametrize("shape,pad_to", [((77, 130), 16), ((130, 33), 1)])
def test_every_transpose_config_moves_the_same_bytes(cfg, shape, pad_to):
    x = torch.randint(0, 256, shape, dtype=torch.uint8).view(fp8.E4M3)  # every byte, NaN encodings included
    assert same_bytes(launch_transpose_bytes(x, pad_to, cfg), transpose_fp8_reference(x, pad_to))


@pytest.mark.parametrize("kernel", ["partial_amax", "cast_tensorwise", "cast_transpose"])
def test_pipelined_loops_give_the_same_bytes(kernel):
    """num_stages is not in the tune grid (no effect with Triton 3.8 on sm_90) but a table entry may set it."""
    x = _input((301, 400))
    cfg = qc.make_config(kernel, {"num_stages": 2, "programs_per_sm": 1})  # several iterations per program
    default = qc.DEFAULTS[kernel]
    partials = launch_partial_amax(x.view(-1), qc.DEFAULTS["partial_amax"])
    if kernel == "partial_amax":
        assert float(launch_partial_amax(x.view(-1), cfg).max()) == 900.0
    elif kernel == "cast_tensorwise":
        got, want = launch_cast_tensorwise(x, partials, fp8.E4M3, None, cfg), launch_cast_tensorwise(x, partials, fp8.E4M3, None, default)
        assert same_bytes(got[0], want[0]) and torch.equal(got[1], want[1])
    else:
        got = launch_cast_transpose(x, partials, fp8.E5M2, 16, True, None, cfg)
        want = launch_cast_transpose(x, partials, fp8.E5M2, 16, True, None, default)
        assert all(same_bytes(g, w) for g, w in zip(got, want))


def test_transpose_refuses_a_grid_stride_config():
    x = torch.zeros(8, 8, dtype=torch.uint8)
    with pytest.raises(ValueError, match="one program per tile"):
        launch_transpose_bytes(x, 1, qc.TileConfig(programs_per_sm=4))


def test_shape_classes_bucket_by_elements_and_width():
    assert qc.shape_class("partial_amax", 4096, 4096) == qc.shape_class("partial_amax", 1, 4096 * 4096) == "le16M"
    assert qc.shape_class("partial_amax", 3000, 4096) == "le16M"  # an untuned shape shares its class's config
    assert qc.shape_class("cast_transpose", 4096, 1024) == "le4M/narrow"
    assert qc.shape_class("cast_transpose", 4096, 64) == "le1M/thin"  # O_A (M x r): no layer's x or dY is this thin
    assert qc.shape_class("cast_transpose", 512, 1024) == "le1M/narrow"
    assert qc.shape_class("cast_transpose", 1024, 4096) == "le4M/mid"
    assert qc.shape_class("transpose_bytes", 4096, 14336) == "le64M/wide"
    assert qc.shape_class("cast_tensorwise", 16384, 8192) == "gt64M"
    with pytest.raises(ValueError, match="unknown kernel"):
        qc.shape_class("cast", 4, 4)


@pytest.fixture
def table_file(tmp_path, monkeypatch):
    """Write a table JSON, point FALQON_KERNEL_TABLE at it and rebuild the cached table (undone after the test)."""
    def use(content) -> str:
        path = tmp_path / "table.json"
        path.write_text(content if isinstance(content, str) else json.dumps(content))
        monkeypatch.setenv(qc.TABLE_ENV, str(path))
        qc._table.cache_clear()
        return str(path)

    yield use
    monkeypatch.delenv(qc.TABLE_ENV, raising=False)
    qc._table.cache_clear()


def test_the_table_overrides_its_class_only(table_file):
    # a tune_quantize.py --out file: the table under "table", next to its timings
    table_file({"results": [], "table": {"cast_transpose": {"le16M/mid": {"block_r": 128, "num_warps": 8}}}})
    assert qc.config_for("cast_transpose", 3000, 4096) == qc.TileConfig(block_r=128, num_warps=8)
    assert qc.config_for("cast_transpose", 4096, 1024) == qc.DEFAULTS["cast_transpose"]
    assert qc.config_for("partial_amax", 4096, 4096) == qc.DEFAULTS["partial_amax"]
    assert qc.config_for("partial_amax", 4096, 4096, interpreter=True).block == 512


def test_the_committed_table_and_grid_are_valid():
    qc._validate(qc.TUNED)  # what the import already did; a bad paste fails here with the field named
    for kernel, grid in qc.TUNE_GRID.items():
        assert grid[0] == qc.DEFAULTS[kernel] and len(set(grid)) == len(grid)
        for cfg in grid:
            assert qc.make_config(kernel, qc.as_overrides(kernel, cfg)) == cfg


@pytest.mark.parametrize("bad,match", [
    ({"partial_amax": {"le4M": {"blok": 8192}}}, "no field"),
    ({"partial_amax": {"le4M": {"block": 3000}}}, "power of 2"),
    ({"cast": {}}, "unknown kernel"),
    ({"cast_transpose": {"le4M/mid": {"programs_per_sm": 0}}}, "programs_per_sm"),
])
def test_a_bad_table_entry_is_a_clear_error(bad, match):
    with pytest.raises(ValueError, match=match):
        qc._validate(bad)


def test_a_bare_table_file_applies_and_source_is_recorded(table_file):
    path = table_file({"partial_amax": {"le16M": {"block": 8192}}})
    assert qc.config_for("partial_amax", 4096, 4096) == qc.FlatConfig(block=8192)
    source = qc.table_source()
    assert source["override"] == path and source["table"]["partial_amax"]["le16M"] == {"block": 8192}


@pytest.mark.parametrize("content, match", [
    ("{not json", "not JSON"),
    ([1, 2], "expected"),
    ({"cast": {}}, "unknown kernel"),
    ({"partial_amax": {"le16M": {"blok": 8192}}}, "no field"),
    ({"partial_amax": {"le16M": {"block": 3000}}}, "power of 2"),
])
def test_a_bad_table_file_is_a_clear_error_naming_the_variable(table_file, content, match):
    table_file(content)
    with pytest.raises(ValueError, match=match) as err:
        qc.config_for("partial_amax", 4096, 4096)
    assert qc.TABLE_ENV in str(err.value)


def test_a_missing_table_file_is_an_input_error_of_the_cli(tmp_path, monkeypatch):
    """The CLI reports it as an input error (exit 2, no traceback) before any point runs."""
    from typer.testing import CliRunner

    from falqon_bench.cli import app

    monkeypatch.setenv(qc.TABLE_ENV, str(tmp_path / "missing.json"))
    qc._table.cache_clear()
    try:
        result = CliRunner().invoke(app, ["run", "smoke", "--out", str(tmp_path / "run"), "--no-isolate"])
    finally:
        monkeypatch.delenv(qc.TABLE_ENV)
        qc._table.cache_clear()
    assert result.exit_code == 2, result.output
    assert "missing.json" in result.output and "cannot read it" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "run" / "points.jsonl").exists()
