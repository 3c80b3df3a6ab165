"""Datasets: the rendered ShapesWorld and ingested real images, in one directory layout.

- :mod:`diffatlas.data.shapesworld`: the world, its renderer, caption grammar and detector.
- :mod:`diffatlas.data.ingest`: image folders and CSV/Parquet manifests.
- :mod:`diffatlas.data.dataset`: the ``results/data/{dataset}/`` layout, written and read.
- :mod:`diffatlas.data.config`: the dataclasses of the ``datasets`` config section.
"""

from diffatlas.data.build import make_dataset
from diffatlas.data.dataset import Dataset, load_dataset

__all__ = ["Dataset", "load_dataset", "make_dataset"]
