"""`falqon-bench report --compact`: the same figures as 256-colour PNGs, a fraction of the bytes, and an HTML
page that inlines the compact files."""

import base64
from pathlib import Path

import numpy as np
from fixtures.results import write_fixture_runs
from PIL import Image
from typer.testing import CliRunner

from falqon_bench.cli import app
from falqon_bench.readers.figures.png import compact_png


def _pixels(path):
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


def test_compact_report_draws_the_same_figures_in_a_palette(tmp_path):
    runs = write_fixture_runs(tmp_path / "results")
    full, small = tmp_path / "full", tmp_path / "small"
    for out, extra in ((full, []), (small, ["--compact"])):
        result = CliRunner().invoke(app, ["report", str(runs["h100"]), str(runs["h200"]), "--out", str(out), *extra])
        assert result.exit_code == 0, result.output
    names = sorted(p.name for p in full.glob("*.png"))
    assert names and names == sorted(p.name for p in small.glob("*.png"))
    full_bytes = small_bytes = 0
    for name in names:
        with Image.open(small / name) as image:
            assert image.mode == "P", name
        a, b = _pixels(full / name), _pixels(small / name)
        assert a.shape == b.shape, name
        diff = np.abs(a - b).max(axis=2)
        # flat colours stay exact; only antialiased edges move, and by a few levels
        assert (diff == 0).mean() > 0.9 and np.percentile(diff, 99.9) <= 32, (name, (diff == 0).mean())
        full_bytes += (full / name).stat().st_size
        small_bytes += (small / name).stat().st_size
    assert small_bytes < 0.6 * full_bytes
    html = (small / "report.html").read_text()
    first = names[0]
    assert base64.b64encode((small / first).read_bytes()).decode() in html


def test_compact_png_keeps_transparent_areas_white(tmp_path):
    path = tmp_path / "t.png"
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[:4, :, :] = (200, 30, 30, 255)  # top half opaque red, bottom half fully transparent
    Image.fromarray(rgba, "RGBA").save(path)
    compact_png(path)
    got = _pixels(path)
    assert (got[:4] == (200, 30, 30)).all() and (got[4:] == 255).all()


def test_compact_accuracy_report_writes_palette_figures(tmp_path):
    """Accuracy runs take their own report path (figures/accuracy.py): --compact reaches it too."""
    run = Path(__file__).resolve().parents[1] / "results" / "accuracy-synthetic-cpu"
    result = CliRunner().invoke(app, ["report", str(run), "--out", str(tmp_path / "rep"), "--compact"])
    assert result.exit_code == 0, result.output
    pngs = sorted((tmp_path / "rep").glob("*.png"))
    assert len(pngs) == 3
    for png in pngs:
        with Image.open(png) as image:
            assert image.mode == "P", png.name
