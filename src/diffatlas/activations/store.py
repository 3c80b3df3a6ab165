"""The activation store: one zarr v3 group per (model, dataset).

Layout (every array has ``dimension_names``, so ``xarray.open_zarr(path)`` opens it whole)::

    timestep            [timestep]                       int64, training scale 0..T-1
    alpha_bar           [timestep]                       float64, ᾱ_t of the scheduler
    sample              [sample]                         int64, dataset sample ids
    label_code          [sample]                         int32, index into attrs["label_classes"]
    coarse_label_code   [sample]                         int32, index into attrs["coarse_label_classes"]
    pooled__{layer}     [timestep, sample, channel__{layer}]                      float32
    spatial__{layer}    [timestep, sample, channel__{layer}, y__{layer}, x__{layer}]  float16 (optional)

Class names are kept as strings in the attributes, sorted, so no statistic depends on an
arbitrary numbering. Root attributes record the model, scheduler, prompt, guidance, seed,
pooling, image size and noise mode, and ``layers`` maps each layer name to its module path.

Writers go through :func:`open_writer`, which builds the store in a temporary directory and
renames it into place on success only.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from diffatlas.errors import UserError
from diffatlas.io import atomic_dir

log = logging.getLogger(__name__)

POOLED = "pooled__{}"
SPATIAL = "spatial__{}"


@dataclass(frozen=True)
class LayerSpec:
    """What the writer needs to know of a layer before the first batch."""

    name: str  # alias or module path, as the user named it (used in result paths)
    module_path: str  # native module path in the model
    channels: int
    height: int  # spatial map size as stored (after any cap)
    width: int
    spatial: bool  # also store the spatial map


def _codes(labels: Sequence[str] | None) -> tuple[np.ndarray, list[str]]:
    if labels is None:
        return np.zeros(0, dtype=np.int32), []
    labels = [str(x) for x in labels]
    classes = sorted(set(labels))
    index = {c: i for i, c in enumerate(classes)}
    return np.asarray([index[x] for x in labels], dtype=np.int32), classes


class ActivationWriter:
    """Fills a store one (timestep, batch) block at a time; see :func:`open_writer`."""

    def __init__(
        self,
        root: Path,
        *,
        timesteps: Sequence[int],
        alpha_bar: Sequence[float],
        sample_ids: Sequence[int],
        labels: Sequence[str],
        coarse_labels: Sequence[str] | None,
        layers: Sequence[LayerSpec],
        attrs: dict[str, Any],
        batch_size: int,
    ) -> None:
        n_t, n_s = len(timesteps), len(sample_ids)
        if n_s == 0:
            raise UserError("cannot write an activation store for an empty dataset (0 samples)")
        if len(labels) != n_s:
            raise UserError(f"{len(labels)} labels for {n_s} samples: labels must align with samples")
        self.group = zarr.open_group(str(root), mode="w", zarr_format=3)
        g = self.group

        def coord(name: str, values: np.ndarray, dim: str) -> None:
            arr = g.create_array(name, shape=values.shape, dtype=values.dtype, dimension_names=[dim])
            arr[:] = values

        coord("timestep", np.asarray(timesteps, dtype=np.int64), "timestep")
        coord("alpha_bar", np.asarray(alpha_bar, dtype=np.float64), "timestep")
        coord("sample", np.asarray(sample_ids, dtype=np.int64), "sample")
        codes, classes = _codes(labels)
        coord("label_code", codes, "sample")
        coarse_codes, coarse_classes = _codes(coarse_labels if coarse_labels is not None else labels)
        coord("coarse_label_code", coarse_codes, "sample")

        chunk_s = max(1, min(batch_size, n_s))
        for spec in layers:
            g.create_array(
                POOLED.format(spec.name),
                shape=(n_t, n_s, spec.channels),
                chunks=(1, n_s, spec.channels),
                dtype="float32",
                dimension_names=["timestep", "sample", f"channel__{spec.name}"],
            )
            if spec.spatial:
                g.create_array(
                    SPATIAL.format(spec.name),
                    shape=(n_t, n_s, spec.channels, spec.height, spec.width),
                    chunks=(1, chunk_s, spec.channels, spec.height, spec.width),
                    dtype="float16",
                    dimension_names=[
                        "timestep",
                        "sample",
                        f"channel__{spec.name}",
                        f"y__{spec.name}",
                        f"x__{spec.name}",
                    ],
                )
        # The pooled array holds all samples of a timestep in one chunk; buffer it in memory
        # (n_samples × channels floats, small) so each chunk is written once by one writer.
        self._pooled_buffers = {s.name: np.zeros((n_s, s.channels), np.float32) for s in layers}
        self._filled = {s.name: np.zeros(n_s, bool) for s in layers}
        self._current_t: int | None = None
        self._layers = {s.name: s for s in layers}
        g.attrs.update(
            {
                **attrs,
                "label_classes": classes,
                "coarse_label_classes": coarse_classes,
                "layers": {s.name: s.module_path for s in layers},
                "spatial_layers": [s.name for s in layers if s.spatial],
            }
        )

    def write(
        self,
        layer: str,
        t_index: int,
        start: int,
        pooled: np.ndarray,
        spatial: np.ndarray | None = None,
    ) -> None:
        """Store a batch of samples ``start:start+B`` of one layer at timestep index ``t_index``.

        Shapes: pooled [B, C]; spatial [B, C, h, w]. Timesteps must be written in order.
        """
        if self._current_t is not None and t_index != self._current_t:
            self._flush_pooled()
        self._current_t = t_index
        stop = start + pooled.shape[0]
        self._pooled_buffers[layer][start:stop] = pooled
        self._filled[layer][start:stop] = True
        if self._layers[layer].spatial:
            if spatial is None:
                raise ValueError(f"layer {layer} stores spatial maps but none were given")
            self.group[SPATIAL.format(layer)][t_index, start:stop] = np.asarray(spatial, dtype=np.float16)

    def _flush_pooled(self) -> None:
        for name, buf in self._pooled_buffers.items():
            if not self._filled[name].all():
                missing = int((~self._filled[name]).sum())
                raise RuntimeError(f"layer {name}: {missing} samples were never written at timestep index {self._current_t}")
            self.group[POOLED.format(name)][self._current_t] = buf
            self._filled[name][:] = False

    def close(self) -> None:
        if self._current_t is not None:
            self._flush_pooled()
        # Consolidated metadata lets xarray open the store in one read; zarr warns that it is
        # not in the v3 spec yet, which is expected here.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=UserWarning)
            zarr.consolidate_metadata(self.group.store)


@contextlib.contextmanager
def open_writer(path: str | Path, **kwargs: Any) -> Iterator[ActivationWriter]:
    """Build the store in a temporary directory; it appears at ``path`` only when complete."""
    with atomic_dir(path) as tmp:
        writer = ActivationWriter(tmp, **kwargs)
        yield writer
        writer.close()


class ActivationStore:
    """Read access to a finished store by layer name and training-scale timestep."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not (self.path / "zarr.json").exists():
            raise UserError(f"{self.path} is not an activation store (no zarr.json); run the extract rule first")
        self.group = zarr.open_group(str(self.path), mode="r")
        self.attrs: dict[str, Any] = dict(self.group.attrs)
        self.timesteps = np.asarray(self.group["timestep"][:])
        self.alpha_bar = np.asarray(self.group["alpha_bar"][:])
        self.sample_ids = np.asarray(self.group["sample"][:])
        self.layers: list[str] = list(self.attrs.get("layers", {}))

    def __len__(self) -> int:
        return len(self.sample_ids)

    def _layer(self, layer: str) -> str:
        if layer not in self.layers:
            raise UserError(f"layer {layer!r} is not in {self.path}; stored layers: {', '.join(self.layers)}")
        return layer

    def t_index(self, timestep: int) -> int:
        hits = np.nonzero(self.timesteps == int(timestep))[0]
        if len(hits) == 0:
            raise UserError(
                f"timestep {timestep} is not in {self.path}; stored timesteps: {', '.join(map(str, self.timesteps))}"
            )
        return int(hits[0])

    def has_spatial(self, layer: str) -> bool:
        return self._layer(layer) in self.attrs.get("spatial_layers", [])

    def pooled(self, layer: str, timestep: int) -> np.ndarray:
        """[sample, channel] float32 at one timestep."""
        arr = self.group[POOLED.format(self._layer(layer))]
        return np.asarray(arr[self.t_index(timestep)], dtype=np.float32)

    def spatial(self, layer: str, timestep: int, samples: slice | np.ndarray = slice(None)) -> np.ndarray:
        """[sample, channel, h, w] float16 at one timestep (``samples`` selects rows)."""
        if not self.has_spatial(layer):
            raise UserError(
                f"layer {layer!r} in {self.path} was extracted without spatial maps; "
                "set extract.spatial: true (or list the layer in extract.spatial_layers) and re-run extract"
            )
        arr = self.group[SPATIAL.format(layer)]
        t = self.t_index(timestep)
        if isinstance(samples, slice):
            return np.asarray(arr[t, samples])
        return np.asarray(arr.oindex[t, np.asarray(samples)])

    def spatial_shape(self, layer: str) -> tuple[int, int, int]:
        """(channels, h, w) of a layer's stored maps."""
        shape = self.group[SPATIAL.format(self._layer(layer))].shape
        return int(shape[2]), int(shape[3]), int(shape[4])

    def labels(self, granularity: str = "fine") -> np.ndarray:
        """Class names per sample (strings); ``granularity`` is ``fine`` or ``coarse``."""
        if granularity not in ("fine", "coarse"):
            raise UserError(f"label granularity {granularity!r} is not one of: fine, coarse")
        prefix = "" if granularity == "fine" else "coarse_"
        classes = np.asarray(self.attrs[f"{prefix}label_classes"], dtype=object)
        return classes[np.asarray(self.group[f"{prefix}label_code"][:])]
