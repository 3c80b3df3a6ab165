"""``diffatlas preview-dataset``: a grid of a dataset's first images with their captions.

    diffatlas preview-dataset --data results/data/shapesworld \\
        --out results/figures/data/shapesworld_preview.png [--n 16]
"""

from __future__ import annotations

from diffatlas.logs import result
from diffatlas.runner import Runner

RUNNER = Runner("preview-dataset", __doc__)


def main(argv: list[str]) -> int:
    parser = RUNNER.parser()
    parser.add_argument("--data", required=True, help="dataset directory (results/data/NAME)")
    parser.add_argument("--out", required=True, help="figure path (.png, .pdf, .svg)")
    parser.add_argument("--n", type=int, default=16, help="number of images shown (default 16)")
    args = parser.parse_args(argv)

    from diffatlas.data.dataset import load_dataset
    from diffatlas.data.preview import preview_figure
    from diffatlas.plotting import save_figure

    ds = load_dataset(args.data, mmap=True)
    path = save_figure(preview_figure(ds, args.n), args.out)
    result(f"wrote {path}")
    return 0
