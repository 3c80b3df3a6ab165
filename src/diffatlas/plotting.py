"""Figure helpers shared by the stages: a headless backend and atomic saves."""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # figures are rendered on headless machines and cluster nodes
import matplotlib.pyplot as plt  # noqa: E402

from diffatlas.io import atomic_file  # noqa: E402


def save_figure(fig: "plt.Figure", path: str | os.PathLike, dpi: int = 120) -> Path:
    """Save ``fig`` to ``path`` atomically (format from the suffix) and close it."""
    path = Path(path)
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format=path.suffix.lstrip(".") or "png")
    plt.close(fig)
    return path
