"""Dataclasses for the entries of the workflow's ``datasets`` section.

Each entry of ``datasets`` in ``config.yaml`` has a ``kind`` and becomes one of the
dataclasses below through :func:`dataset_config_from_dict`. The JSON Schema checks the
workflow config before any job runs; ``__post_init__`` re-checks every value so the library
and the CLI are just as safe when called without Snakemake.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Union

from diffatlas.errors import UserError

KINDS = ("shapesworld", "image_folder", "manifest")
BAD_IMAGE_MODES = ("error", "skip")
ALPHA_BACKGROUNDS = ("black", "white")
DUPLICATE_MODES = ("error", "drop", "keep")


def _check_int(name: str, value: Any, lo: int, hi: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
        upper = f" and <= {hi}" if hi is not None else ""
        raise UserError(f"datasets: {name} = {value!r} is not allowed; allowed: an integer >= {lo}{upper}")


def _check_prob(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise UserError(f"datasets: {name} = {value!r} is not allowed; allowed: a number in [0, 1]")


def _check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise UserError(f"datasets: {name} = {value!r} is not allowed; allowed: {', '.join(allowed)}")


@dataclass
class ShapesWorldConfig:
    """The rendered world (see :mod:`diffatlas.data.shapesworld`)."""

    n_samples: int = 512
    """Number of rendered images."""
    image_size: int = 32
    """Side of the square RGB images in pixels."""
    seed: int = 0
    """Seed of the renderer: the dataset is a pure function of this config."""
    two_object_fraction: float = 0.3
    """Share of images with two objects (the rest have one)."""
    size_word_prob: float = 0.5
    """Probability that a caption names an object's size ("a small red circle")."""
    colour_word_prob: float = 1.0
    """Probability that a caption names an object's colour."""
    kind: str = "shapesworld"

    def __post_init__(self) -> None:
        _check_choice("kind", self.kind, ("shapesworld",))
        _check_int("n_samples", self.n_samples, 1)
        _check_int("image_size", self.image_size, 16, 1024)
        _check_int("seed", self.seed, 0)
        _check_prob("two_object_fraction", self.two_object_fraction)
        _check_prob("size_word_prob", self.size_word_prob)
        _check_prob("colour_word_prob", self.colour_word_prob)


@dataclass
class _RealImagesConfig:
    """Fields shared by the ingested (real image) kinds."""

    path: str = ""
    """Folder (image_folder) or CSV/Parquet file (manifest)."""
    image_size: int = 512
    """Images are converted to RGB, the shorter side resized to this and centre-cropped square."""
    on_bad_image: str = "error"
    """error: stop at the first unreadable file, naming it; skip: drop it, count and log it."""
    alpha_background: str = "black"
    """Colour that transparent pixels (RGBA, LA, palette transparency) are composited on."""
    kind: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.path, str) or not self.path:
            raise UserError(f"datasets: path = {self.path!r} is not allowed; allowed: a non-empty file or folder path")
        _check_int("image_size", self.image_size, 8, 2048)
        _check_choice("on_bad_image", self.on_bad_image, BAD_IMAGE_MODES)
        _check_choice("alpha_background", self.alpha_background, ALPHA_BACKGROUNDS)


@dataclass
class ImageFolderConfig(_RealImagesConfig):
    """One sub-folder per class under ``path``; the class is the folder name."""

    coarse_labels: dict[str, str] | None = field(default=None)
    """Optional map fine class (folder name) -> coarse class; without it coarse = fine."""
    kind: str = "image_folder"

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_choice("kind", self.kind, ("image_folder",))
        if self.coarse_labels is not None:
            if not isinstance(self.coarse_labels, dict) or not all(
                isinstance(k, str) and isinstance(v, str) and v.strip() for k, v in self.coarse_labels.items()
            ):
                raise UserError(
                    f"datasets: coarse_labels = {self.coarse_labels!r} is not allowed; "
                    "allowed: a mapping from class folder name to a coarse class name (not empty or only spaces)"
                )


@dataclass
class ManifestConfig(_RealImagesConfig):
    """A CSV or Parquet table with columns path, label and optional coarse_label, caption."""

    on_duplicate: str = "error"
    """Rows naming the same image file twice: error names them; drop keeps each file's first
    row; keep keeps every row. Either way they are logged and listed in info.json."""
    attributes: list[str] = field(default_factory=list)
    """Further manifest columns that are categorical attributes of each image (stored with the
    activations; SAE label statistics per attribute); an empty cell is the class ""."""
    kind: str = "manifest"

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_choice("kind", self.kind, ("manifest",))
        _check_choice("on_duplicate", self.on_duplicate, DUPLICATE_MODES)
        from diffatlas.data.dataset import check_attribute_names

        self.attributes = check_attribute_names(self.attributes, "datasets: attributes")


DatasetConfig = Union[ShapesWorldConfig, ImageFolderConfig, ManifestConfig]
_BY_KIND = {"shapesworld": ShapesWorldConfig, "image_folder": ImageFolderConfig, "manifest": ManifestConfig}


def dataset_config_from_dict(section: dict[str, Any], name: str = "dataset") -> DatasetConfig:
    """Turn one entry of the ``datasets`` section into its dataclass.

    Unknown keys are errors naming the key, the dataset and the allowed keys.
    """
    if not isinstance(section, dict):
        raise UserError(f"datasets.{name} must be a mapping with a 'kind' key, got {section!r}")
    kind = section.get("kind")
    if kind not in _BY_KIND:
        raise UserError(f"datasets.{name}.kind = {kind!r} is not allowed; allowed: {', '.join(KINDS)}")
    cls = _BY_KIND[kind]
    allowed = sorted(f.name for f in dataclasses.fields(cls))
    unknown = sorted(set(section) - set(allowed))
    if unknown:
        raise UserError(
            f"unknown key(s) {', '.join(map(repr, unknown))} in datasets.{name} (kind {kind}); allowed keys: {', '.join(allowed)}"
        )
    try:
        return cls(**section)
    except UserError as err:
        raise UserError(str(err).replace("datasets: ", f"datasets.{name}.", 1)) from None
