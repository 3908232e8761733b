"""Figure helpers of the analysis plots: Agg-rendered figures that never touch pyplot's global backend.

The figures are built with ``matplotlib.figure.Figure`` and an explicit Agg canvas instead of ``pyplot``, so a
notebook's inline backend keeps working after a call, and figures are not kept alive by pyplot's registry.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lightning_curv.utils import atomic_path

#: Most modules drawn with a legend; beyond this the lines stay unlabeled.
MAX_LEGEND_ENTRIES = 12


def new_figure(nrows: int = 1, ncols: int = 1, *, size: tuple[float, float] = (6.4, 4.8), dpi: int = 110) -> Any:
    """A figure with an Agg canvas and its axes (an array when there are several).

    Args:
        nrows: Rows of subplots.
        ncols: Columns of subplots.
        size: Size of ONE subplot in inches ``(width, height)``.
        dpi: Resolution.

    Returns:
        ``(figure, axes)`` as ``Figure.subplots`` returns them.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(size[0] * ncols, size[1] * nrows), dpi=dpi)
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=True)
    return fig, axes


def save_png(fig: Any, path: str | os.PathLike) -> Path:
    """Write ``fig`` as a PNG to ``path`` atomically (temporary file, then rename).

    Args:
        fig: A matplotlib ``Figure``.
        path: Destination; parent folders are created.

    Returns:
        The path written.
    """
    path = Path(path)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path
