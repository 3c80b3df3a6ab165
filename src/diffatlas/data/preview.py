"""The dataset preview figure: the first images in a grid, titled with caption or label."""

from __future__ import annotations

import math
import textwrap

import numpy as np

from diffatlas.data.dataset import Dataset
from diffatlas.errors import UserError


def preview_figure(ds: Dataset, n: int = 16, columns: int | None = None):
    """A matplotlib Figure with the first ``n`` images of ``ds``.

    Each panel is titled with the caption (ShapesWorld) or the label (real images) so a
    reader can check that images, captions and labels line up.
    """
    import matplotlib.pyplot as plt

    from diffatlas import plotting  # noqa: F401  (selects the headless backend)

    if n < 1:
        raise UserError(f"--n = {n} is not allowed; allowed: an integer >= 1")
    n = min(n, len(ds))
    cols = columns or min(n, 8 if n > 16 else 4)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.6 * rows), squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k >= n:
            continue
        ax.imshow(np.asarray(ds.images[k]), interpolation="nearest")
        row = ds.meta.iloc[k]
        title = row["caption"] or f"{row['label']}" + (f" ({row['coarse_label']})" if row["coarse_label"] != row["label"] else "")
        ax.set_title("\n".join(textwrap.wrap(str(title), 26)), fontsize=8)
    name = ds.info.get("name", ds.path.name)
    fig.suptitle(f"{name}: first {n} of {len(ds)} images ({ds.image_size}x{ds.image_size})", fontsize=10)
    fig.tight_layout()
    return fig
