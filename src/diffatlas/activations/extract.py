"""The extraction driver: a dataset through a diffusers model into an activation store.

For every selected timestep (ascending) and every batch of the dataset (in dataset order):

1. images uint8 [B, H, W, 3] -> x in [-1, 1] [B, 3, S, S] (resized to the model's size if
   needed) -> ``x0 = handle.encode_images(x)`` (the VAE latent, or x for pixel models);
2. ``x_t`` by seeded forward noise (optionally ``noise_ensemble`` draws, averaged) or by
   DDIM inversion with the model;
3. ONE forward pass ``handle.predict_noise(x_t, t, cond)`` with every selected layer hooked
   (:class:`~diffatlas.activations.hooks.ActivationCapture`), stopping after the last one;
4. pooled [B, C] and spatial [B, C, h, w] maps handed to the store's background writer for
   rows ``start:start+B`` (:func:`to_host`: non-blocking copies into pinned buffers on CUDA),
   which encodes and writes them while the next batch computes.

The store is built in a temporary directory and renamed into place only when complete
(:func:`~diffatlas.activations.store.open_writer`), so a failed or killed job leaves nothing
a later job would trust; an error on the writer thread is raised here. Memory is bounded by
the batch: images are memory-mapped, and states reused across timesteps (VAE latents,
inversion trajectories) go to a scratch file on disk.

Flow-matching models (SD3, Flux) run at sigmas (``extract.timesteps: ["s0.500"]``): forward
noise is ``x_σ = (1 - σ) x0 + σ ε`` with the same seeded ε, inversion is Euler flow inversion
(:func:`~diffatlas.models.diffusion.flow_invert`) over the σ grid ``1/steps, 2/steps, ...``
below σ, and the store's ``timestep`` coordinate is the scheduler's timestep σ·T next to a
``sigma`` coordinate (``alpha_bar`` is NaN: these models have no ᾱ). Each flow time inverts
from the clean input (no shared trunk across times).

The workflow runs one job per timestep (``timesteps: [t]``), so a new timestep is a new job.
Such a job pays for its own VAE encode and, with ``noise: inversion``, for its own DDIM
inversion path from the clean input to t (:func:`~diffatlas.activations.noise.inversion_path`
depends on t alone, so the values equal those of a multi-timestep run, which shares the
common trunk of the paths). The per-job cost of inversion is at most ``t / (T / steps)``
extra passes; in exchange, time jobs share no state and run in parallel.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffatlas.accel import amp_dtype, describe_precision
from diffatlas.activations.config import ExtractConfig
from diffatlas.activations.hooks import ActivationCapture, Captured
from diffatlas.activations.layers import ResolvedLayer, resolve_layers
from diffatlas.activations.noise import CLEAN, add_noise, ddim_invert, inversion_path, sample_noise
from diffatlas.activations.store import LayerSpec, open_writer
from diffatlas.errors import UserError
from diffatlas.io import ensure_writable_parent, pick_device
from diffatlas.logs import progress
from diffatlas.models.diffusion import (  # noqa: F401 (cfg_combine, images_to_tensor re-exported for callers)
    DDPM_NOISING_RULE,
    FLOW_NOISING_RULE,
    cfg_combine,
    check_time,
    flow_add_noise,
    flow_invert,
    flow_inversion_path,
    flow_scheduler_timestep,
    images_to_tensor,
)

log = logging.getLogger(__name__)


# -- small helpers ------------------------------------------------------------------------------
def take_rows(cond: Any, index: torch.Tensor, n_rows: int) -> Any:
    """Select rows ``index`` of every tensor with leading size ``n_rows`` in a (nested) dict."""
    if isinstance(cond, torch.Tensor):
        return cond.index_select(0, index.to(cond.device)) if cond.ndim and cond.shape[0] == n_rows else cond
    if isinstance(cond, dict):
        return {k: take_rows(v, index, n_rows) for k, v in cond.items()}
    if isinstance(cond, (list, tuple)):
        return type(cond)(take_rows(v, index, n_rows) for v in cond)
    return cond


def prompts_for(cfg: ExtractConfig, labels: Sequence[str], captions: Sequence[str], family: str = "") -> list[str]:
    """One prompt per sample for the configured conditioning.

    DiT is class-conditional: the empty prompt means the null class, and class_template
    passes the label itself, which must name one of the model's classes (``id2label``).
    """
    if cfg.conditioning == "empty":
        return [""] * len(labels)
    if family == "dit":
        if cfg.conditioning == "caption":
            raise UserError(
                "config extract.conditioning = 'caption' needs a text-conditioned model, but this is a "
                "class-conditional DiT; allowed for DiT: empty (null class), class_template (labels name DiT classes)"
            )
        return [str(lab) for lab in labels]
    if cfg.conditioning == "class_template":
        return [cfg.prompt_template.format(label=lab) for lab in labels]
    empty = sum(1 for c in captions if not c)
    if empty:
        raise UserError(f"conditioning: caption needs a caption for every sample, but {empty} of {len(captions)} samples have none")
    return list(captions)


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


def read_rows(images: np.ndarray, start: int, stop: int) -> np.ndarray:
    """Rows ``start:stop`` of ``images``; a memory map is read with plain file I/O.

    Pages touched through a memory map stay resident (and count in the job's RSS) until the
    OS evicts them, so reading a whole dataset through one would make peak memory grow with
    the dataset; a positioned read keeps it bounded by the batch.
    """
    # Only a whole-file map (not a view of one, whose ``offset`` is not updated) is read by offset.
    whole = isinstance(images, np.memmap) and not isinstance(images.base, np.memmap)
    if whole and images.flags.c_contiguous and images.filename:
        row = int(np.prod(images.shape[1:]))
        offset = images.offset + start * row * images.itemsize
        with open(images.filename, "rb") as fh:
            out = np.fromfile(fh, dtype=images.dtype, count=(stop - start) * row, offset=offset)
        return out.reshape(stop - start, *images.shape[1:])
    return np.asarray(images[start:stop])


class _DiskRows:
    """Float32 rows [N, *shape] in a scratch file: reuse across timesteps without holding them in RAM."""

    def __init__(self, path: Path, n: int, shape: tuple[int, ...]) -> None:
        self.path, self.shape = path, shape
        self.row_bytes = int(np.prod(shape)) * 4
        with open(path, "wb") as fh:
            fh.truncate(n * self.row_bytes)

    def put(self, start: int, rows: torch.Tensor) -> None:
        data = rows.detach().to("cpu", torch.float32).contiguous().numpy()
        with open(self.path, "r+b") as fh:
            fh.seek(start * self.row_bytes)
            fh.write(data.tobytes())

    def get(self, start: int, n: int, device: torch.device) -> torch.Tensor:
        arr = np.fromfile(self.path, dtype=np.float32, count=n * int(np.prod(self.shape)), offset=start * self.row_bytes)
        return torch.from_numpy(arr.reshape(n, *self.shape)).to(device)


@dataclass
class _Batch:
    t_index: int
    start: int
    results: dict[str, Captured]


# -- the driver -----------------------------------------------------------------------------------
def check_timesteps(timesteps: Sequence[int], num_train_timesteps: int) -> None:
    bad = [t for t in timesteps if not 0 <= int(t) < num_train_timesteps]
    if bad:
        raise UserError(
            f"extract.timesteps {bad} out of range: this model has num_train_timesteps = {num_train_timesteps}, "
            f"so timesteps must be integers 0..{num_train_timesteps - 1}"
        )


def model_times(cfg: ExtractConfig, handle: Any) -> list[int] | list[float]:
    """``extract.timesteps`` in the model's convention: training steps (ints) or sigmas (floats).

    A time of the other convention, or a step out of range, is a UserError naming the model.
    """
    conv = getattr(handle, "time_convention", "step")
    model = str(getattr(handle, "model_id", ""))
    if conv == "sigma":
        out = [float(check_time(t, "sigma", None, f"extract.timesteps[{i}]", model).value)
               for i, t in enumerate(cfg.timesteps)]
        T = int(handle.num_train_timesteps)
        for s in out:  # the store keys times by the scheduler's integer timestep sigma * T
            if abs(flow_scheduler_timestep(s, T) - round(flow_scheduler_timestep(s, T))) > 1e-6:
                raise UserError(f"extract.timesteps: sigma {s} times T = {T} is not an integer timestep; "
                                f"allowed: sigmas on the 1/{T} grid")
        return out
    steps = [check_time(t, "step", None, f"extract.timesteps[{i}]", model).value for i, t in enumerate(cfg.timesteps)]
    check_timesteps(steps, int(handle.num_train_timesteps))
    return steps


def extract(
    cfg: ExtractConfig,
    *,
    model: str | os.PathLike,
    dataset: str | os.PathLike,
    out: str | os.PathLike,
    device: str = "auto",
    model_name: str | None = None,
    dataset_name: str | None = None,
    revision: str | None = None,
    allow_pickle_weights: bool = False,
) -> Path:
    """Load ``dataset`` and ``model`` and write the store at ``out`` (see module docstring)."""
    from diffatlas.data.dataset import load_dataset
    from diffatlas.models.loader import load_model

    out = Path(out)
    try:
        ensure_writable_parent(out)
    except UserError as err:
        raise UserError(f"cannot write the activation store {out}: {err}") from None
    dev = pick_device(device)
    ds = load_dataset(dataset, mmap=True)
    if len(ds) == 0:
        raise UserError(f"dataset {dataset} is empty (0 samples): nothing to extract")
    kwargs: dict[str, Any] = {"device": dev, "allow_pickle_weights": allow_pickle_weights}
    if revision is not None:
        kwargs["revision"] = revision
    handle = load_model(str(model), **kwargs)
    return extract_activations(
        handle,
        images=ds.images,
        sample_ids=ds.sample_ids,
        labels=ds.labels("fine"),
        coarse_labels=ds.labels("coarse"),
        attributes=ds.attributes(),
        captions=ds.captions,
        cfg=cfg,
        out=out,
        device=dev,
        extra_attrs={
            "model_name": model_name or Path(str(model)).name,
            "model_path": str(model),
            "dataset_name": dataset_name or Path(str(dataset)).name,
            "dataset_path": str(dataset),
            "dataset_image_size": int(ds.images.shape[1]),
        },
    )


def extract_activations(
    handle: Any,
    *,
    images: np.ndarray,
    sample_ids: Sequence[int],
    labels: Sequence[str],
    coarse_labels: Sequence[str] | None,
    captions: Sequence[str] | None,
    cfg: ExtractConfig,
    out: str | os.PathLike,
    device: torch.device | str = "cpu",
    extra_attrs: dict[str, Any] | None = None,
    stop_early: bool = True,
    background: bool = True,
    attributes: dict[str, Sequence[str]] | None = None,
) -> Path:
    """Extract from an already loaded :class:`~diffatlas.models.loader.ModelHandle`.

    images uint8 [N, H, W, 3] (a memory map is fine: only one batch is read at a time);
    sample_ids, labels, coarse_labels, captions: N each, aligned with ``images``;
    ``attributes``: the dataset's categorical attributes, name -> N values (stored as codes).
    ``stop_early=False`` runs every forward pass to the end (only the benchmark wants that);
    ``background=False`` writes each batch before computing the next (the same store, slower).
    """
    out = Path(out)
    device = torch.device(device)
    n = int(images.shape[0])
    if n == 0:
        raise UserError(f"the dataset for {out} is empty (0 samples): nothing to extract")
    if not (len(sample_ids) == len(labels) == n) or (coarse_labels is not None and len(coarse_labels) != n):
        raise UserError(f"{n} images but {len(sample_ids)} sample ids and {len(labels)} labels: they must align")
    ids = np.asarray(sample_ids, dtype=np.int64)
    uniq, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        raise UserError(f"sample ids must be unique (they key the store); repeated: {uniq[counts > 1][:10].tolist()}")
    try:
        ensure_writable_parent(out)
    except UserError as err:
        raise UserError(f"cannot write the activation store {out}: {err}") from None
    times = model_times(cfg, handle)
    flow = getattr(handle, "time_convention", "step") == "sigma"
    size = int(handle.image_size)
    if tuple(images.shape[1:3]) != (size, size):
        log.warning("images are %dx%d but the model takes %dx%d: each batch is resized (bilinear, antialiased)",
                    images.shape[1], images.shape[2], size, size)
    layers = resolve_layers(handle.denoiser, cfg.layers)
    # Text-token streams have no grid: they keep maps only if named (and are then refused).
    spatial_names = {lay.name for lay in layers if lay.selection in set(cfg.layers_with_maps)
                     and (lay.keeps_maps or cfg.spatial_layers is not None)}
    prompts = prompts_for(cfg, labels, captions if captions is not None else [""] * n, str(getattr(handle, "family", "")))
    runner = _Runner(handle, cfg, layers, spatial_names, prompts, ids, device, stop_early, times)

    if flow:
        T = int(handle.num_train_timesteps)
        store_steps = [int(round(flow_scheduler_timestep(s, T))) for s in times]
        alpha_bar = [float("nan")] * len(times)
    else:
        store_steps = list(times)
        alpha_bar = [float(handle.ddpm_alphas("extraction")[int(t)]) for t in times]
    where = {"device": str(device), "precision": describe_precision(handle.dtype, forward=runner.amp_dtype)}
    attrs = _attrs(handle, cfg, layers, {**where, **(extra_attrs or {})})
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.scratch-", dir=out.parent) as scratch:
        total = len(cfg.timesteps) * -(-n // cfg.batch_size)
        gen = runner.iterate(images, Path(scratch))
        batches = iter(progress(gen, desc=f"extract {out.name}", total=total))
        try:
            first = next(batches)
            specs = [
                LayerSpec(
                    name=lay.name,
                    module_path=lay.module_path,
                    channels=int(first.results[lay.name].pooled.shape[1]),
                    height=int(first.results[lay.name].spatial.shape[2]) if lay.name in spatial_names else 0,
                    width=int(first.results[lay.name].spatial.shape[3]) if lay.name in spatial_names else 0,
                    spatial=lay.name in spatial_names,
                )
                for lay in layers
            ]
            with open_writer(
                out,
                timesteps=store_steps,
                alpha_bar=alpha_bar,
                sigma=list(times) if flow else None,
                sample_ids=list(map(int, sample_ids)),
                labels=list(map(str, labels)),
                coarse_labels=None if coarse_labels is None else list(map(str, coarse_labels)),
                attributes={a: list(map(str, v)) for a, v in (attributes or {}).items()},
                layers=specs,
                attrs=attrs,
                batch_size=cfg.batch_size,
                background=background,
            ) as writer:
                for batch in _chain(first, batches):
                    blocks, ready = to_host(batch.results)
                    writer.submit(batch.t_index, batch.start, blocks, ready)
        finally:
            gen.close()  # removes the hooks at once, also on error
    log.info("wrote %d layers x %d timesteps x %d samples to %s", len(layers), len(cfg.timesteps), n, out)
    return out


def to_host(results: dict[str, Captured]) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor | None]], Any]:
    """One batch's captures as CPU tensors for the writer, and what to wait on before reading them.

    On CUDA each tensor is copied without blocking into a pinned host buffer (PyTorch's
    caching host allocator reuses them), and a CUDA event recorded after the copies is
    returned: the writer thread waits on it, so the compute loop never waits for a copy. On
    the CPU the captured tensors are used as they are (they are fresh per pass) and there is
    nothing to wait on.
    """

    def host(x: torch.Tensor | None) -> torch.Tensor | None:
        if x is None or x.device.type != "cuda":
            return None if x is None else x.detach()
        buf = torch.empty(x.shape, dtype=x.dtype, device="cpu", pin_memory=True)  # the host buffer
        buf.copy_(x, non_blocking=True)
        return buf

    blocks = {name: (host(c.pooled), host(c.spatial)) for name, c in results.items()}
    ready = None
    if any(c.pooled.device.type == "cuda" for c in results.values()):
        ready = torch.cuda.Event()
        ready.record()
    return blocks, ready


def _chain(first: _Batch, rest: Iterator[_Batch]) -> Iterator[_Batch]:
    yield first
    yield from rest


def _attrs(handle: Any, cfg: ExtractConfig, layers: list[ResolvedLayer], extra: dict[str, Any]) -> dict[str, Any]:
    """Root attributes: everything needed to know what the numbers are."""
    from diffatlas import __version__

    scheduler = getattr(handle, "scheduler", None)
    prompt = {"empty": "", "class_template": cfg.prompt_template, "caption": "{caption}"}[cfg.conditioning]
    return _jsonable(
        {
            "diffatlas_version": __version__,
            "model_id": str(getattr(handle, "model_id", "")),
            "revision": str(getattr(handle, "revision", "") or ""),
            "family": str(getattr(handle, "family", "")),
            "denoiser_class": type(handle.denoiser).__name__,
            "scheduler_class": type(scheduler).__name__ if scheduler is not None else None,
            "scheduler_config": dict(scheduler.config) if scheduler is not None else {},
            "num_train_timesteps": int(handle.num_train_timesteps),
            "time_convention": str(getattr(handle, "time_convention", "step")),
            "noising_rule": FLOW_NOISING_RULE if getattr(handle, "time_convention", "step") == "sigma" else DDPM_NOISING_RULE,
            "image_size": int(handle.image_size),
            "latent_size": int(getattr(handle, "latent_size", handle.image_size)),
            "layer_selection": list(cfg.layers),
            "conditioning": cfg.conditioning,
            "prompt": prompt,
            "prompt_template": cfg.prompt_template,
            "guidance_scale": float(cfg.guidance_scale),
            "guidance_applies_to": "inversion noise prediction" if cfg.noise == "inversion" else "none (forward noise)",
            "seed": int(cfg.seed),
            "pooling": cfg.pooling,
            "spatial_max_size": cfg.spatial_max_size,
            "noise": cfg.noise,
            "noise_ensemble": int(cfg.noise_ensemble),
            "inversion_steps": int(cfg.inversion_steps) if cfg.noise == "inversion" else None,
            "noise_seeding": "torch.Generator(cpu) per (seed, sample_id, timestep, draw), seed = blake2b-64",
            "dtype": cfg.dtype,
            "batch_size": int(cfg.batch_size),
            "extract_config": {k: v for k, v in cfg.to_dict().items() if k not in ("models", "datasets")},
            **extra,
        }
    )


class _Runner:
    """Produces one :class:`_Batch` per (timestep, batch) in write order."""

    def __init__(
        self,
        handle: Any,
        cfg: ExtractConfig,
        layers: list[ResolvedLayer],
        spatial_names: set[str],
        prompts: list[str],
        sample_ids: np.ndarray,
        device: torch.device,
        stop_early: bool,
        times: Sequence[int] | Sequence[float] | None = None,
    ) -> None:
        self.handle, self.cfg, self.layers, self.device = handle, cfg, layers, device
        self.flow = getattr(handle, "time_convention", "step") == "sigma"
        self.times = list(times) if times is not None else [int(t) for t in cfg.timesteps]
        self.spatial_names, self.prompts, self.sample_ids = spatial_names, prompts, sample_ids
        self.stop_early = stop_early
        self.ab = None if self.flow else torch.as_tensor(handle.ddpm_alphas("extraction")).detach().cpu().to(torch.float64)
        self.amp_dtype = amp_dtype(cfg.dtype, device, "extract")  # auto: see diffatlas.accel
        # Conditioning is computed once per distinct prompt when prompts repeat (empty prompt,
        # class template) and gathered per batch; captions are encoded per batch.
        self._unique: list[str] | None = None
        self._cond_unique: Any = None
        if cfg.conditioning != "caption":
            self._unique = sorted(set(prompts))
            self._index = {p: i for i, p in enumerate(self._unique)}
        self._null_cond: Any = None

    # -- conditioning -------------------------------------------------------------------
    def _conditioning(self, prompts: list[str]) -> Any:
        with torch.no_grad():
            return self.handle.conditioning(prompts)

    def cond(self, start: int, stop: int) -> Any:
        prompts = self.prompts[start:stop]
        if self._unique is None:
            return self._conditioning(prompts)
        if self._cond_unique is None:
            self._cond_unique = self._conditioning(self._unique)
        index = torch.as_tensor([self._index[p] for p in prompts], dtype=torch.long)
        return take_rows(self._cond_unique, index, len(self._unique))

    def null_cond(self, n: int) -> Any:
        if self._null_cond is None:
            self._null_cond = self._conditioning([""])
        return take_rows(self._null_cond, torch.zeros(n, dtype=torch.long), 1)

    # -- model calls ----------------------------------------------------------------------
    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def _timestep(self, t: int | float, n: int) -> torch.Tensor:
        """The denoiser's time for ``n`` rows: training steps, or σ (float32) for flow models."""
        if self.flow:
            return torch.full((n,), float(t), dtype=torch.float32, device=self.device)
        return torch.full((n,), int(t), dtype=torch.long, device=self.device)

    def _noise_key(self, t: int | float) -> int:
        """The integer time in the noise seed: the step, or the scheduler's timestep σ·T."""
        if self.flow:
            return int(round(flow_scheduler_timestep(t, int(self.handle.num_train_timesteps))))
        return int(t)

    def velocity(self, x: torch.Tensor, sigma: float, cond: Any, null: Any) -> torch.Tensor:
        """Flow models: velocity at σ (with classifier-free guidance when guidance_scale != 1)."""
        with self._autocast():
            v_c = self.handle.model_output(x, self._timestep(sigma, x.shape[0]), cond).float()
            if null is None or self.cfg.guidance_scale == 1.0:
                return v_c
            v_u = self.handle.model_output(x, self._timestep(sigma, x.shape[0]), null).float()
        return cfg_combine(v_u, v_c, self.cfg.guidance_scale)

    def eps(self, x: torch.Tensor, t: int, cond: Any, null: Any) -> torch.Tensor:
        """Noise prediction (with classifier-free guidance when guidance_scale != 1)."""
        with self._autocast():
            eps_c = self.handle.predict_noise(x, self._timestep(t, x.shape[0]), cond).float()
            if null is None or self.cfg.guidance_scale == 1.0:
                return eps_c
            eps_u = self.handle.predict_noise(x, self._timestep(t, x.shape[0]), null).float()
        return cfg_combine(eps_u, eps_c, self.cfg.guidance_scale)

    def x0(self, images: np.ndarray) -> torch.Tensor:
        x = images_to_tensor(images, int(self.handle.image_size), self.device)
        return self.handle.encode_images(x).float()

    # -- the loop -------------------------------------------------------------------------
    def iterate(self, images: np.ndarray, scratch: Path) -> Iterator[_Batch]:
        cfg, n, bs = self.cfg, int(images.shape[0]), self.cfg.batch_size
        order = sorted(range(len(self.times)), key=lambda i: self.times[i])  # ascending t
        n_batches = -(-n // bs)
        inversion = cfg.noise == "inversion"
        # States reused at the next timestep: x0 of latent models (the VAE is costly), or the
        # inversion trunk (the state at the last regular grid point reached). Pixel models
        # recompute x0 from the images (cheaper than I/O).
        reuse = (inversion and not self.flow) or (getattr(self.handle, "vae", None) is not None and len(order) > 1)
        store: _DiskRows | None = None
        spatial_dtype = torch.float16 if cfg.noise_ensemble == 1 else torch.float32
        capture = ActivationCapture(
            self.handle.denoiser,
            self.layers,
            pooling=cfg.pooling,
            spatial_layers=self.spatial_names,
            spatial_max_size=cfg.spatial_max_size,
            spatial_dtype=spatial_dtype,
            stop_early=self.stop_early,
            grid=getattr(self.handle, "token_grid", None),
        )
        trunk_t = CLEAN  # timestep of the stored inversion trunk state
        with torch.no_grad(), capture:
            for k, t_index in enumerate(order):
                t = self.times[t_index]
                for b in range(n_batches):
                    start, stop = b * bs, min(n, (b + 1) * bs)
                    cond = self.cond(start, stop)
                    if reuse and k > 0:
                        x = store.get(start, stop - start, self.device)
                    else:
                        x = self.x0(read_rows(images, start, stop))
                        if reuse and store is None:
                            store = _DiskRows(scratch / "state.f32", n, tuple(x.shape[1:]))
                    if inversion and self.flow:
                        null = self.null_cond(stop - start) if cfg.guidance_scale != 1.0 else None
                        v = lambda z, s, c=cond, u=null: self.velocity(z, s, c, u)  # noqa: E731
                        if reuse and k == 0:  # x0 (the VAE latent) for the next time
                            store.put(start, x)
                        x = flow_invert(v, x, flow_inversion_path(t, cfg.inversion_steps))
                        results = self._capture(capture, x, t, cond)
                    elif inversion:
                        null = self.null_cond(stop - start) if cfg.guidance_scale != 1.0 else None
                        eps = lambda z, s, c=cond, u=null: self.eps(z, s, c, u)  # noqa: E731
                        path = inversion_path(t, cfg.inversion_steps, len(self.ab))
                        trunk = [g for g in path[:-1] if g > trunk_t]
                        x = ddim_invert(eps, x, trunk, self.ab, start=trunk_t)  # along the regular grid
                        if k + 1 < len(order):  # kept for the next timestep (none in a one-timestep job)
                            store.put(start, x)
                        x = ddim_invert(eps, x, [t], self.ab, start=trunk[-1] if trunk else trunk_t)  # onto t
                        results = self._capture(capture, x, t, cond)
                    else:
                        if reuse and k == 0:
                            store.put(start, x)
                        results = self._forward_noised(capture, x, t, cond, self.sample_ids[start:stop])
                    yield _Batch(t_index=t_index, start=start, results=results)
                if inversion and not self.flow:
                    trunk_t = max([g for g in inversion_path(t, cfg.inversion_steps, len(self.ab))[:-1] if g > trunk_t],
                                  default=trunk_t)

    def _capture(self, capture: ActivationCapture, x_t: torch.Tensor, t: int, cond: Any) -> dict[str, Captured]:
        with self._autocast():
            return capture.run(self.handle.predict_noise, x_t, self._timestep(t, x_t.shape[0]), cond)

    def noise(self, t: int | float, ids: np.ndarray | Sequence[int], shape: tuple[int, ...], draw: int = 0) -> torch.Tensor:
        """The seeded ε [B, *shape] of (seed, sample id, time, draw), on the CPU."""
        return sample_noise(list(map(int, ids)), self._noise_key(t), tuple(shape), self.cfg.seed, draw)

    def noised(self, x0: torch.Tensor, t: int | float, noise: torch.Tensor) -> torch.Tensor:
        """``x_t`` of forward noising at the model's time ``t``: the core's ᾱ rule for a step,
        its flow rule for a σ. The one place extraction noises (the benchmark's bare forward too)."""
        if self.flow:
            return flow_add_noise(x0, noise.to(x0.device), float(t))
        return add_noise(x0, noise, float(self.ab[t]))

    def _forward_noised(
        self, capture: ActivationCapture, x0: torch.Tensor, t: int, cond: Any, ids: np.ndarray
    ) -> dict[str, Captured]:
        """Capture at ``x_t`` from seeded noise; averaged over ``noise_ensemble`` draws."""
        total: dict[str, Captured] | None = None
        draws = self.cfg.noise_ensemble
        for draw in range(draws):
            res = self._capture(capture, self.noised(x0, t, self.noise(t, ids, x0.shape[1:], draw)), t, cond)
            if draws == 1:
                return res
            if total is None:
                total = res
            else:
                for name, c in res.items():
                    total[name].pooled += c.pooled
                    if c.spatial is not None:
                        total[name].spatial += c.spatial
        for c in total.values():
            c.pooled /= draws
            if c.spatial is not None:
                c.spatial /= draws
        return total
