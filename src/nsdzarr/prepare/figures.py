"""Matplotlib plumbing shared by the summary and QC figures: headless backend, atomic PNGs."""

from __future__ import annotations

import os
from typing import Any

from nsdzarr.prepare.atomic import atomic_output

DPI = 110


def new_figure(width: float = 8.0, height: float = 5.0, **subplots: Any) -> tuple[Any, Any]:
    """A headless (Agg) figure and its axes, the same size and style in every QC figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 10, "axes.titlesize": 11, "legend.fontsize": 9})
    return plt.subplots(figsize=(width, height), dpi=DPI, layout="constrained", **subplots)


def save_png(fig: Any, path: str | os.PathLike[str], counts: dict[str, int] | None = None) -> None:
    """Write ``fig`` as a PNG atomically and free it; ``counts`` (the numbers behind the figure,
    e.g. images used) go into the PNG's text chunks, readable with Pillow's ``Image.text``."""
    import matplotlib.pyplot as plt

    metadata = {key: str(value) for key, value in (counts or {}).items()}
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png", metadata=metadata)
    plt.close(fig)


def no_data(ax: Any, text: str) -> None:
    """Say in the middle of an empty panel why it is empty."""
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, wrap=True)
