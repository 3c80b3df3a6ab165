"""The activation store: one zarr v3 group per (model, dataset, timestep), read as one.

The workflow writes one store per extraction job, ``results/activations/{model}/{dataset}/t{timestep}.zarr``;
:class:`ActivationStore` and :func:`open_dataset` open either one such store or the directory of a
model's times as ONE logical store. Layout of each store (every array has ``dimension_names``,
so ``xarray.open_zarr(path)`` opens it whole)::

    timestep            [timestep]                       int64, training scale 0..T-1; flow-matching
                                                         models: the scheduler's timestep σ·T
    alpha_bar           [timestep]                       float64, ᾱ_t of the scheduler (NaN: flow matching)
    sigma               [timestep]                       float64, σ in [0, 1] (flow-matching models only)
    sample              [sample]                         int64, dataset sample ids
    label_code          [sample]                         int32, index into attrs["label_classes"]
    coarse_label_code   [sample]                         int32, index into attrs["coarse_label_classes"]
    attribute_code__{a} [sample]                         int32, index into attrs["attribute_classes"][a]
    pooled__{layer}     [timestep, sample, channel__{layer}]                      float32
    spatial__{layer}    [timestep, sample, channel__{layer}, y__{layer}, x__{layer}]  float16 (optional)

Class names are kept as strings in the attributes, sorted, so no statistic depends on an
arbitrary numbering. The dataset's categorical attributes (ShapesWorld: colour, shape, size,
position; see :mod:`diffatlas.data.dataset`) are stored the same way, one code array each,
their names in order as the keys of ``attrs["attribute_classes"]`` (absent in stores of
datasets without attributes). Root attributes record the model, scheduler, prompt, guidance, seed,
pooling, image size and noise mode, and ``layers`` maps each layer name to its module path.

Every per-time array is chunked ``(1, batch_size, ...)`` along (timestep, sample), so a batch
of rows is whole chunks and two writers of disjoint, chunk-aligned row ranges never touch the
same chunk: a shard of samples is just a row range.

Writers go through :func:`open_writer`, which builds the store in a temporary directory and
renames it into place on success only. By default a :class:`BackgroundWriter` thread fills
zarr while the caller computes the next batch (a bounded queue of :data:`WRITE_QUEUE_DEPTH`
batches); an error on that thread is raised in the caller, and a failure on either side
leaves no store behind.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import warnings
from collections.abc import Iterator, Mapping, Sequence
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
ATTRIBUTE_CODE = "attribute_code__{}"
#: Root attribute: attribute name -> its sorted class names (the codes index them).
ATTRIBUTE_CLASSES = "attribute_classes"
WRITE_QUEUE_DEPTH = 2
"""Batches in flight between the compute loop and the writer thread: enough to hide a write
behind the next forward pass, few enough that host memory stays a couple of batches."""

# Blocks of one batch: layer name -> (pooled [B, C], spatial [B, C, h, w] or None); numpy
# arrays or CPU tensors (pinned buffers of a non-blocking device copy are fine once ``ready``).
Blocks = Mapping[str, tuple[Any, Any]]


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


def _numpy(x: Any, dtype: Any) -> np.ndarray:
    """A CPU tensor or array as a numpy array of ``dtype`` (no copy when it already is one)."""
    if hasattr(x, "numpy"):
        x = x.numpy()
    return np.asarray(x, dtype=dtype)


class ActivationWriter:
    """Fills a store one (timestep, batch of rows) block at a time, synchronously.

    Blocks may come in any order; that every row of every layer and timestep was written is
    checked once, in :meth:`close`.
    """

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
        attributes: Mapping[str, Sequence[str]] | None = None,
        sigma: Sequence[float] | None = None,
    ) -> None:
        n_t, n_s = len(timesteps), len(sample_ids)
        if n_s == 0:
            raise UserError("cannot write an activation store for an empty dataset (0 samples)")
        if len(labels) != n_s:
            raise UserError(f"{len(labels)} labels for {n_s} samples: labels must align with samples")
        attributes = dict(attributes or {})
        for name, values in attributes.items():
            if len(values) != n_s:
                raise UserError(f"attribute {name!r} has {len(values)} values for {n_s} samples: attributes must align with samples")
        self.group = zarr.open_group(str(root), mode="w", zarr_format=3)
        g = self.group

        def coord(name: str, values: np.ndarray, dim: str) -> None:
            arr = g.create_array(name, shape=values.shape, dtype=values.dtype, dimension_names=[dim])
            arr[:] = values

        coord("timestep", np.asarray(timesteps, dtype=np.int64), "timestep")
        coord("alpha_bar", np.asarray(alpha_bar, dtype=np.float64), "timestep")
        if sigma is not None:
            if len(sigma) != n_t:
                raise UserError(f"{len(sigma)} sigmas for {n_t} timesteps: they must align")
            coord("sigma", np.asarray(sigma, dtype=np.float64), "timestep")
        coord("sample", np.asarray(sample_ids, dtype=np.int64), "sample")
        codes, classes = _codes(labels)
        coord("label_code", codes, "sample")
        coarse_codes, coarse_classes = _codes(coarse_labels if coarse_labels is not None else labels)
        coord("coarse_label_code", coarse_codes, "sample")
        attribute_classes = {}
        for name, values in attributes.items():
            codes_a, attribute_classes[name] = _codes(values)
            coord(ATTRIBUTE_CODE.format(name), codes_a, "sample")

        chunk_s = max(1, min(batch_size, n_s))
        # Every chunk is written, even an all-zero one: skipping empty chunks costs a
        # comparison of every chunk with the fill value on the write path, and a complete
        # store then has every chunk on disk.
        config = {"write_empty_chunks": True}
        self._pooled: dict[str, Any] = {}
        self._spatial: dict[str, Any] = {}
        for spec in layers:
            self._pooled[spec.name] = g.create_array(
                POOLED.format(spec.name),
                shape=(n_t, n_s, spec.channels),
                chunks=(1, chunk_s, spec.channels),
                dtype="float32",
                dimension_names=["timestep", "sample", f"channel__{spec.name}"],
                config=config,
            )
            if spec.spatial:
                self._spatial[spec.name] = g.create_array(
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
                    config=config,
                )
        # Rows written per (layer, timestep): a flag per row, checked once at close.
        self._written = {s.name: np.zeros((n_t, n_s), bool) for s in layers}
        g.attrs.update(
            {
                **attrs,
                "label_classes": classes,
                "coarse_label_classes": coarse_classes,
                **({ATTRIBUTE_CLASSES: attribute_classes} if attribute_classes else {}),
                "layers": {s.name: s.module_path for s in layers},
                "spatial_layers": [s.name for s in layers if s.spatial],
            }
        )

    def write(
        self,
        layer: str,
        t_index: int,
        start: int,
        pooled: Any,
        spatial: Any = None,
    ) -> None:
        """Store rows ``start:start+B`` of one layer at timestep index ``t_index``.

        Shapes: pooled [B, C]; spatial [B, C, h, w] (numpy arrays or CPU tensors).
        """
        pooled = _numpy(pooled, np.float32)
        stop = start + pooled.shape[0]
        self._pooled[layer][t_index, start:stop] = pooled
        if layer in self._spatial:
            if spatial is None:
                raise ValueError(f"layer {layer} stores spatial maps but none were given")
            self._spatial[layer][t_index, start:stop] = _numpy(spatial, np.float16)
        self._written[layer][t_index, start:stop] = True

    def submit(self, t_index: int, start: int, blocks: Blocks, ready: Any = None) -> None:
        """Write every layer of one batch now (``ready``, e.g. a CUDA event, is waited on first)."""
        if ready is not None:
            ready.synchronize()
        for layer, (pooled, spatial) in blocks.items():
            self.write(layer, t_index, start, pooled, spatial)

    def close(self) -> None:
        for name, written in self._written.items():
            if not written.all():
                t_idx, rows = np.nonzero(~written)
                raise RuntimeError(
                    f"layer {name}: {len(rows)} (timestep, sample) rows were never written "
                    f"(first: timestep index {int(t_idx[0])}, row {int(rows[0])})"
                )
        # Consolidated metadata lets xarray open the store in one read; zarr warns that it is
        # not in the v3 spec yet, which is expected here.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=UserWarning)
            zarr.consolidate_metadata(self.group.store)


class BackgroundWriter:
    """Hands batches to a worker thread that writes them with an :class:`ActivationWriter`.

    :meth:`submit` returns as soon as the batch is queued (it blocks only while
    :data:`WRITE_QUEUE_DEPTH` batches are already waiting), so the caller's next forward pass
    overlaps the zarr encoding and file writes. The caller must not modify submitted arrays.
    An exception on the worker is re-raised in the caller, at the next :meth:`submit` or at
    :meth:`finish`; after one, the worker drops what is still queued.
    """

    def __init__(self, writer: ActivationWriter, depth: int = WRITE_QUEUE_DEPTH) -> None:
        self.writer = writer
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, int(depth)))
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, name="activation-writer", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self._error is not None or self._stop.is_set():
                continue  # keep draining, so the caller never blocks on a full queue
            try:
                self.writer.submit(*item)
            except BaseException as err:  # noqa: BLE001 - handed to the caller
                self._error = err

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def submit(self, t_index: int, start: int, blocks: Blocks, ready: Any = None) -> None:
        """Queue one batch (see :meth:`ActivationWriter.submit`)."""
        while True:
            self._raise_if_failed()
            try:
                self._queue.put((t_index, start, blocks, ready), timeout=0.1)
                return
            except queue.Full:
                continue

    def write(self, layer: str, t_index: int, start: int, pooled: Any, spatial: Any = None) -> None:
        """Queue rows of one layer (see :meth:`ActivationWriter.write`)."""
        self.submit(t_index, start, {layer: (pooled, spatial)})

    def finish(self) -> None:
        """Wait until every queued batch is written; raise the worker's error, if any."""
        self._queue.put(None)
        self._thread.join()
        self._raise_if_failed()

    def abort(self) -> None:
        """Drop what is queued and stop the worker (before its directory is removed)."""
        self._stop.set()
        self._queue.put(None)
        self._thread.join()


@contextlib.contextmanager
def open_writer(path: str | Path, *, background: bool = True, **kwargs: Any) -> Iterator[ActivationWriter | BackgroundWriter]:
    """Build the store in a temporary directory; it appears at ``path`` only when complete.

    Yields an object with ``submit(t_index, start, blocks, ready=None)``: a
    :class:`BackgroundWriter` (default) or, with ``background=False``, the synchronous
    :class:`ActivationWriter` itself. The writer thread is always stopped before the
    temporary directory is renamed or removed.
    """
    with atomic_dir(path) as tmp:
        writer = ActivationWriter(tmp, **kwargs)
        if not background:
            yield writer
        else:
            sink = BackgroundWriter(writer)
            try:
                yield sink
            except BaseException:
                sink.abort()
                raise
            sink.finish()
        writer.close()


def _is_store(path: Path) -> bool:
    return (path / "zarr.json").exists()


def store_parts(path: str | Path | Sequence[str | Path]) -> list[Path]:
    """The stores behind ``path``: a store itself, a list of stores, or a directory of stores.

    A directory that is not itself a store (e.g. ``results/activations/{model}/{dataset}/``)
    stands for every store directly inside it: one per extracted timestep in the workflow.
    """
    if isinstance(path, (list, tuple)):
        parts = [Path(p) for p in path]
        where = ", ".join(map(str, parts)) or "(an empty list)"
    else:
        where = str(path)
        root = Path(path)
        parts = [root] if _is_store(root) else sorted(p for p in root.iterdir() if _is_store(p)) if root.is_dir() else []
    missing = [p for p in parts if not _is_store(p)]
    if not parts or missing:
        raise UserError(
            f"{missing[0] if missing else where} is not an activation store (no zarr.json, and no stores inside); "
            "run the extract rule first"
        )
    return parts


def _extraction_attrs(attrs: Mapping[str, Any]) -> dict[str, Any]:
    """Root attributes that say what was extracted, less those that may differ between the
    per-time parts of one logical store: their timesteps; the package version (a part added
    later may come from a newer release); the device and the batch size, which change how the
    values were computed, not what they are (a time re-extracted on a GPU still joins; the
    precision, which does change them, is still compared)."""
    out = {k: v for k, v in attrs.items() if k not in ("diffatlas_version", "device")}
    if isinstance(out.get("extract_config"), dict):
        out["extract_config"] = {k: v for k, v in out["extract_config"].items() if k not in ("timesteps", "batch_size")}
    return out


class ActivationStore:
    """Read access by layer name and training-scale timestep to one logical store.

    ``path`` is one store, a list of stores, or a directory of stores (a model's times on one
    dataset, one store per timestep as the workflow writes them). The parts must hold the same
    samples, labels and layers; timesteps are taken from all of them, each from one part.
    ``group`` is the first part's zarr group: use it for sample-level arrays (``label_code``)
    and array shapes, and :meth:`pooled` / :meth:`spatial` for per-timestep values.
    """

    def __init__(self, path: str | Path | Sequence[str | Path]) -> None:
        parts = store_parts(path)
        self.path = Path(path) if not isinstance(path, (list, tuple)) else parts[0].parent
        self.parts = parts
        groups = [zarr.open_group(str(p), mode="r") for p in parts]
        self.group = groups[0]
        self.attrs: dict[str, Any] = dict(self.group.attrs)
        self.sample_ids = np.asarray(self.group["sample"][:])
        self.layers: list[str] = list(self.attrs.get("layers", {}))
        timesteps, alpha_bar, sigma, self._where = [], [], [], []
        for part, g in zip(parts, groups):
            self._check_part(part, g)
            sig = g["sigma"][:] if "sigma" in g else [np.nan] * len(g["timestep"][:])
            for i, (t, ab, sg) in enumerate(zip(g["timestep"][:], g["alpha_bar"][:], sig)):
                if int(t) in timesteps:
                    raise UserError(f"timestep {int(t)} is stored twice under {self.path} (again in {part}); keep one")
                timesteps.append(int(t))
                alpha_bar.append(float(ab))
                sigma.append(float(sg))
                self._where.append((g, i))
        # One part keeps its own order; several are sorted by timestep.
        order = np.arange(len(timesteps)) if len(parts) == 1 else np.argsort(timesteps, kind="stable")
        self.timesteps = np.asarray(timesteps, dtype=np.int64)[order]
        self.alpha_bar = np.asarray(alpha_bar, dtype=np.float64)[order]
        #: σ of each stored time (flow-matching models), else None.
        self.sigma = np.asarray(sigma, dtype=np.float64)[order] if not np.isnan(sigma).all() else None
        self._where = [self._where[i] for i in order]

    def _check_part(self, part: Path, g: Any) -> None:
        """A part must describe the same samples and extraction as the first one."""
        if g is self.group:
            return
        if not np.array_equal(np.asarray(g["sample"][:]), self.sample_ids):
            raise UserError(f"{part} holds other samples than {self.parts[0]}: parts of one store must hold the same samples")
        attrs, first = _extraction_attrs(g.attrs), _extraction_attrs(self.attrs)
        for key in sorted(set(attrs) | set(first)):
            if attrs.get(key) != first.get(key):
                raise UserError(
                    f"{part} and {self.parts[0]} differ in {key!r} ({attrs.get(key)!r} vs {first.get(key)!r}): "
                    "they are not parts of one extraction"
                )

    def __len__(self) -> int:
        return len(self.sample_ids)

    def _layer(self, layer: str) -> str:
        if layer not in self.layers:
            raise UserError(f"layer {layer!r} is not in {self.path}; stored layers: {', '.join(self.layers)}")
        return layer

    def t_index(self, timestep: Any) -> int:
        """Index of a stored time: a training step (int / 't250'), or a sigma ('s0.500' / Time)."""
        from diffatlas.models.diffusion import Time

        if isinstance(timestep, (str, Time)):
            time = Time.parse(timestep)
            if time.kind == "sigma":
                hits = np.nonzero(np.isclose(self.sigma, time.value, rtol=0, atol=5e-4))[0] if self.sigma is not None else []
                if len(hits) == 0:
                    stored = ", ".join(f"s{x:.3f}" for x in self.sigma) if self.sigma is not None else "none (not a flow-matching store)"
                    raise UserError(f"time {time} is not in {self.path}; stored sigmas: {stored}")
                return int(hits[0])
            timestep = time.value
        hits = np.nonzero(self.timesteps == int(timestep))[0]
        if len(hits) == 0:
            raise UserError(
                f"timestep {timestep} is not in {self.path}; stored timesteps: {', '.join(map(str, self.timesteps))}"
            )
        return int(hits[0])

    def time_record(self, timestep: Any) -> dict[str, Any]:
        """A stored time in the model's own convention, for the artifacts read from it:
        ``timestep`` (the training step; a flow-matching model's scheduler timestep σ·T),
        ``alpha_bar`` (ᾱ_t; None for flow matching, which has none), ``sigma`` (σ of a
        flow-matching model, else None), ``time`` (its string form 't250' / 's0.250'),
        and the extraction's ``time_convention`` and ``noising_rule``."""
        from diffatlas.models.diffusion import Time

        i = self.t_index(timestep)
        sigma = None if self.sigma is None or np.isnan(self.sigma[i]) else float(self.sigma[i])
        ab = float(self.alpha_bar[i])
        return {
            "timestep": int(self.timesteps[i]),
            "alpha_bar": None if np.isnan(ab) else ab,
            "sigma": sigma,
            "time": str(Time.step(int(self.timesteps[i])) if sigma is None else Time.sigma(sigma)),
            "time_convention": self.attrs.get("time_convention", "step" if sigma is None else "sigma"),
            "noising_rule": self.attrs.get("noising_rule"),
        }

    def _array(self, template: str, layer: str, timestep: int) -> tuple[Any, int]:
        """The zarr array holding ``layer`` at ``timestep`` and the timestep's index in it."""
        g, i = self._where[self.t_index(timestep)]
        return g[template.format(layer)], i

    def layer_array(self, layer: str, timestep: int, spatial: bool = False) -> tuple[Any, int]:
        """The zarr array of ``layer`` (its pooled vectors, or its spatial maps) holding
        ``timestep``, and the timestep's index in it: for readers that go chunk by chunk
        (``array.chunks[1]`` samples per chunk: the loader, the streaming analysis) instead of
        reading a whole layer."""
        if spatial and not self.has_spatial(layer):
            self.spatial(layer, timestep, slice(0, 0))  # raises the clear error
        return self._array(SPATIAL if spatial else POOLED, self._layer(layer), timestep)

    def has_spatial(self, layer: str) -> bool:
        return self._layer(layer) in self.attrs.get("spatial_layers", [])

    def pooled(self, layer: str, timestep: int) -> np.ndarray:
        """[sample, channel] float32 at one timestep."""
        arr, t = self._array(POOLED, self._layer(layer), timestep)
        return np.asarray(arr[t], dtype=np.float32)

    def spatial(self, layer: str, timestep: int, samples: slice | np.ndarray = slice(None)) -> np.ndarray:
        """[sample, channel, h, w] float16 at one timestep (``samples`` selects rows)."""
        if not self.has_spatial(layer):
            raise UserError(
                f"layer {layer!r} in {self.path} was extracted without spatial maps; "
                "set extract.spatial: true (or list the layer in extract.spatial_layers) and re-run extract"
            )
        arr, t = self._array(SPATIAL, layer, timestep)
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

    @property
    def attribute_names(self) -> list[str]:
        """The dataset's categorical attributes stored here, in order ([] for a dataset without)."""
        return list(self.attrs.get(ATTRIBUTE_CLASSES) or {})

    def attributes(self) -> dict[str, tuple[np.ndarray, list[str]]]:
        """Per attribute, its codes int64 [sample] and the sorted class names they index."""
        return {
            name: (np.asarray(self.group[ATTRIBUTE_CODE.format(name)][:], dtype=np.int64), list(classes))
            for name, classes in (self.attrs.get(ATTRIBUTE_CLASSES) or {}).items()
        }


def open_dataset(path: str | Path | Sequence[str | Path]) -> Any:
    """The logical store at ``path`` (as for :class:`ActivationStore`) as one ``xarray.Dataset``.

    Each part opens lazily with ``xarray.open_zarr``; the parts are concatenated along
    ``timestep`` (sorted), and sample-level variables (``label_code``, ...) are taken once.
    The attributes are the first part's, less the per-part ones.
    """
    import xarray as xr

    parts = store_parts(path)
    ActivationStore(parts)  # the same consistency checks as the reader
    sets = [xr.open_zarr(str(p)) for p in parts]
    if len(sets) == 1:
        return sets[0]
    ds = xr.concat(sets, dim="timestep", data_vars="minimal", coords="minimal", compat="override", join="exact",
                   combine_attrs="drop_conflicts")
    return ds.sortby("timestep")
