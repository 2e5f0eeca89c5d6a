"""Compact PNGs for reports kept in a repository: the same figure in 256 colours.

Why: a report's figures are most of a committed run's bytes (a sweep's winners and floor figures ~0.4 MB each as
matplotlib writes them, RGBA), and a repository of runs grows by a report per run. A matplotlib figure is flat
colour plus antialiased edges: its colormaps are 256-entry tables, so a 256-colour palette (median cut, no
dithering) draws the same figure in about a third of the bytes. `falqon-bench report --compact` writes them so;
a local report keeps full colour by default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from PIL import Image

COLORS = 256


def compact_png(path: Path) -> None:
    """Rewrite the PNG at `path` as a 256-colour palette PNG (transparent areas composited on white)."""
    with Image.open(path) as image:
        rgba = image.convert("RGBA")
    flat = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba).convert("RGB")
    flat.quantize(colors=COLORS, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(path, optimize=True)


def compact_pngs(out_dir: Path, names: Iterable[str]) -> None:
    """compact_png for each named figure of a report directory."""
    for name in names:
        compact_png(Path(out_dir) / name)
