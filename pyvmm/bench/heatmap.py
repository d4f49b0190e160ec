"""Dirty-page heatmaps in a bench report, and their pictures (`pyvmm bench plot --heatmap`).

`pyvmm bench --heatmap` asks the source VMM to record one row per dirty sync: guest RAM
cut into at most 4096 cells, each holding how many of its pages the sync left to send
(pyvmm/dirty/heatmap.py computes them in the VMM; docs/timeline.md). The report keeps the
rows as the VMM sent them, compressed, under "heatmap":

    {"cells": 4096, "pages_per_cell": 80, "total_pages": 327680, "page_size": 4096,
     "encoding": "zlib+base64 uint32le", "dropped_rows": 0,
     "rows": [{"sync": 1, "elapsed": -0.002, "dirty_pages": 327680, "new_pages": 0,
               "cells": "eJzt..."}, ...]}

`elapsed` is seconds since `migrate` (the x origin of the other charts). Two pictures per
report: a PNG strip (RAM left to right, one row per sync, top to bottom) and an animated
GIF (RAM as a square, one frame per sync).
"""

from __future__ import annotations

import base64
import math
import zlib
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image, ImageDraw

from pyvmm.bench import report

MIB = 1 << 20
COLORMAP = "inferno"
GIF_CELL_PX = 4  # a cell's side in the animation
GIF_FRAME_MS = 400


def from_qmp(raw: dict[str, Any], started_monotonic_s: float) -> dict[str, Any]:
    """x-pyvmm-query-heatmap's answer (all rows) in the report's names."""
    return {
        "cells": raw["cells"],
        "pages_per_cell": raw["pages-per-cell"],
        "total_pages": raw["total-pages"],
        "page_size": raw.get("page-size", 4096),
        "encoding": raw["encoding"],
        "dropped_rows": raw.get("dropped-rows", 0),
        "rows": [
            {
                "sync": row["sync"],
                "elapsed": round(row["t-us"] / 1e6 - started_monotonic_s, 4),
                "dirty_pages": row["dirty-pages"],
                "new_pages": row["new-pages"],
                "cells": row["cells"],
            }
            for row in raw["rows"]
        ],
    }


def matrix(heat: dict[str, Any]) -> np.ndarray:
    """rows x cells: the fraction of each cell's pages that were dirty (0..1)."""
    cells, ppc = heat["cells"], heat["pages_per_cell"]
    out = np.zeros((len(heat["rows"]), cells), np.float32)
    for i, row in enumerate(heat["rows"]):
        raw = zlib.decompress(base64.b64decode(row["cells"]))
        if len(raw) != cells * 4:
            raise report.ReportError(f"heatmap row {i} holds {len(raw) // 4} cells, not {cells}")
        out[i] = np.frombuffer(raw, dtype="<u4")
    # The last cell may hold fewer pages than the others.
    sizes = np.full(cells, ppc, np.float32)
    sizes[-1] = heat["total_pages"] - ppc * (cells - 1)
    return out / sizes


def render(rpt: dict[str, Any], png: Path) -> tuple[Path, Path]:
    """Write the strip (png) and the animation (png with .gif); returns both paths."""
    heat = rpt.get("heatmap")
    if not heat or not heat["rows"]:
        raise report.ReportError(
            f"{report.label(rpt)}: the report has no heatmap (run pyvmm bench --heatmap)"
        )
    frac = matrix(heat)
    gif = png.with_suffix(".gif")
    _strip(rpt, heat, frac, png)
    _animation(rpt, heat, frac, gif)
    return png, gif


def _strip(rpt: dict[str, Any], heat: dict[str, Any], frac: np.ndarray, path: Path) -> None:
    rows = len(heat["rows"])
    height = min(14.0, 2.2 + 0.22 * rows)
    fig = Figure(figsize=(12.0, height), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ram_mib = heat["total_pages"] * heat.get("page_size", 4096) / MIB
    image = ax.imshow(frac, aspect="auto", interpolation="nearest", cmap=COLORMAP, vmin=0,
                      vmax=1, extent=(0, ram_mib, rows - 0.5, -0.5))  # fmt: skip
    labels = [f"{r['sync']} ({r['elapsed']:.1f} s)" for r in heat["rows"]]
    step = max(1, rows // 25)
    ax.set_yticks(range(0, rows, step), labels[::step], fontsize=8)
    ax.set_ylabel("dirty sync (seconds since migrate)")
    ax.set_xlabel(f"guest RAM (MiB); one cell = {heat['pages_per_cell']} pages")
    result = rpt["result"]
    ax.set_title(
        f"{report.label(rpt)}: pages left to send after each dirty sync "
        f"({result['status']}, {result['dirty_syncs']} syncs)"
    )
    fig.colorbar(image, ax=ax, label="dirty fraction of the cell", fraction=0.03)
    fig.tight_layout()
    fig.savefig(path, format="png", metadata={"Software": None})


def _animation(rpt: dict[str, Any], heat: dict[str, Any], frac: np.ndarray, path: Path) -> None:
    cells = heat["cells"]
    side = math.ceil(math.sqrt(cells))
    rows_px = math.ceil(cells / side)
    cmap = colormaps[COLORMAP]
    caption_px = 28
    frames = []
    for i, row in enumerate(heat["rows"]):
        grid = np.full(side * rows_px, np.nan, np.float32)
        grid[:cells] = frac[i]
        rgba = cmap(np.nan_to_num(grid, nan=0.0)).reshape(rows_px, side, 4)
        rgba[np.isnan(grid).reshape(rows_px, side)] = (0.5, 0.5, 0.5, 1.0)  # past the end
        rgb = (rgba[..., :3] * 255).astype(np.uint8)
        rgb = np.kron(rgb, np.ones((GIF_CELL_PX, GIF_CELL_PX, 1), np.uint8))
        canvas = Image.new("RGB", (rgb.shape[1], rgb.shape[0] + caption_px), "white")
        canvas.paste(Image.fromarray(rgb), (0, caption_px))
        dirty_mib = row["dirty_pages"] * heat.get("page_size", 4096) / MIB
        ImageDraw.Draw(canvas).text(
            (4, 4), f"sync {row['sync']}  t={row['elapsed']:.1f} s  {dirty_mib:.1f} MiB dirty",
            fill="black",
        )  # fmt: skip
        frames.append(canvas.convert("P", palette=Image.Palette.ADAPTIVE))
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=GIF_FRAME_MS,
                   loop=0, optimize=False)  # fmt: skip
