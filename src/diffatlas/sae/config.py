"""Configuration of a TopK sparse autoencoder run (the ``sae`` section of config.yaml).

:class:`SAEConfig` holds every knob of training and analysis; it is validated in
``__post_init__`` so the library is safe to call without Snakemake. The architecture depends
on the layer's channel count ``d``, known only once the store is open, so
:meth:`SAEConfig.arch` turns the config plus ``d`` into a validated :class:`SAEArch`
(``n_latents = expansion × d``, ``k < n_latents``, ``k_aux``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from diffatlas.errors import UserError
from diffatlas.sections import ConfigSection

SAMPLES = ("pooled", "spatial")
RANK_BY = ("mean", "max")
MINE_ON = ("all", "validation", "train")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


@dataclass(frozen=True)
class SAEArch:
    """Shapes of one TopK SAE; validated.

    d_in: input channels (the layer's real channel count).
    n_latents: dictionary size n.
    k: latents kept per sample by TopK (1 <= k < n).
    k_aux: latents used by the AuxK loss on dead latents (1 <= k_aux <= n).
    """

    d_in: int
    n_latents: int
    k: int
    k_aux: int

    def __post_init__(self) -> None:
        for name in ("d_in", "n_latents", "k", "k_aux"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise UserError(f"sae {name} = {value!r} is not allowed; allowed: an integer >= 1")
        if self.k >= self.n_latents:
            raise UserError(
                f"sae k = {self.k} is not allowed: k must be smaller than n_latents = {self.n_latents}"
                " (a TopK SAE that keeps every latent is not sparse); lower sae.k or raise sae.expansion"
            )
        if self.k_aux > self.n_latents:
            raise UserError(f"sae aux_k = {self.k_aux} is not allowed: it must be <= n_latents = {self.n_latents}")


@dataclass(frozen=True)
class SAEConfig(ConfigSection):
    """Training and analysis settings of a TopK SAE (defaults: the demo; k as in Revelio)."""

    SECTION = "sae"
    JOB_FREE_KEYS = ("layers", "timesteps", "gallery", "gallery_latents")

    k: int = 32
    """Active latents per sample (TopK). Revelio and OpenAI use 32."""
    expansion: int = 4
    """n_latents = expansion × d, with d the layer's channel count."""
    layers: list[str] | None = None
    """Layers to train on (workflow grid); null = each model's extraction layers
    (models.<name>.layers, else extract.layers)."""
    timesteps: list[int | str] | None = None
    """Times to train on (workflow grid): steps, or a flow-matching model's sigmas ('s0.500');
    null = each model's extraction times (models.<name>.timesteps, else extract.timesteps)."""
    steps: int = 20000
    """Cap on optimiser steps (ignored when ``epochs`` is set); training stops earlier on a
    plateau of validation FVE (``patience``, ``min_delta``)."""
    epochs: int | None = None
    """If set, the cap is this many passes over the training split instead of ``steps``."""
    eval_every: int = 100
    """Steps between validation-FVE checks (the plateau rule) and training-curve points; the
    only times training metrics leave the device."""
    patience: int = 5
    """Stop when validation FVE has not improved by ``min_delta`` for this many checks."""
    min_delta: float = 0.001
    """Smallest rise of validation FVE that counts as an improvement for the plateau rule."""
    eval_vectors: int = 4096
    """Validation vectors (a seeded sample of the validation split, held in memory) on which
    the plateau rule measures FVE; the final metrics use the whole validation split."""
    shuffle_buffer: int = 131072
    """Vectors in the streaming loader's shuffle buffer (bounds training memory); a layer
    whose vectors all fit is read once and shuffled exactly as in memory."""
    batch_size: int = 64
    """Samples per step; the training split must hold at least one batch."""
    lr: float = 1e-3
    """Adam learning rate after warm-up."""
    warmup: int = 50
    """Steps of linear learning-rate warm-up from 0."""
    aux_k: int | None = None
    """Latents used by the AuxK loss; null = d // 2 (as in the OpenAI recipe)."""
    aux_coef: float = 1.0 / 32.0
    """Weight of the AuxK loss (OpenAI: 1/32)."""
    dead_steps: int = 100
    """A latent that has not fired for more than this many steps counts as dead for AuxK."""
    val_fraction: float = 0.2
    """Share of samples (images) held out for validation; all metrics use this split."""
    seed: int = 0
    """Seed of the split, the initialisation and the batch order."""
    samples: str = "pooled"
    """pooled: one vector per image; spatial: one vector per position of the stored map."""
    top_n: int = 10
    """Top-activating samples kept per latent (Revelio: 10)."""
    rank_by: str = "mean"
    """Order of latents for the label curves: mean activation when active (Revelio) or max."""
    min_active: int = 10
    """Only latents active on more than this many samples are ranked (Revelio: 10)."""
    top_latents: int = 100
    """Number of top-ranked latents averaged into the single-number label statistics."""
    dense_threshold: float = 0.1
    """A latent active on more than this share of validation samples counts as dense."""
    mine_on: str = "all"
    """Samples searched for top activations: all (Revelio), validation or train."""
    gallery: bool = True
    """Make a gallery figure per (model, dataset, layer, timestep)."""
    gallery_latents: int = 8
    """Latents (rows) shown in a gallery."""
    init_sample: int = 4096
    """Samples used for the geometric-median initialisation of b_pre."""
    extra: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        positive_ints = ("k", "expansion", "steps", "batch_size", "top_n", "top_latents", "gallery_latents", "init_sample", "dead_steps",
                         "eval_every", "patience", "eval_vectors", "shuffle_buffer")
        for name in positive_ints:
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise UserError(f"config sae.{name} = {value!r} is not allowed; allowed: an integer >= 1")
        for name in ("warmup", "seed", "min_active"):
            value = getattr(self, name)
            if not _is_int(value) or value < 0:
                raise UserError(f"config sae.{name} = {value!r} is not allowed; allowed: an integer >= 0")
        if self.epochs is not None and (not _is_int(self.epochs) or self.epochs < 1):
            raise UserError(f"config sae.epochs = {self.epochs!r} is not allowed; allowed: null or an integer >= 1")
        if self.aux_k is not None and (not _is_int(self.aux_k) or self.aux_k < 1):
            raise UserError(f"config sae.aux_k = {self.aux_k!r} is not allowed; allowed: null or an integer >= 1")
        if not _is_num(self.lr) or not self.lr > 0:
            raise UserError(f"config sae.lr = {self.lr!r} is not allowed; allowed: a number > 0")
        if not _is_num(self.min_delta) or self.min_delta < 0:
            raise UserError(f"config sae.min_delta = {self.min_delta!r} is not allowed; allowed: a number >= 0")
        if not _is_num(self.aux_coef) or self.aux_coef < 0:
            raise UserError(f"config sae.aux_coef = {self.aux_coef!r} is not allowed; allowed: a number >= 0")
        if not _is_num(self.val_fraction) or not 0 < self.val_fraction < 1:
            raise UserError(f"config sae.val_fraction = {self.val_fraction!r} is not allowed; allowed: a number in (0, 1)")
        if not _is_num(self.dense_threshold) or not 0 < self.dense_threshold < 1:
            raise UserError(
                f"config sae.dense_threshold = {self.dense_threshold!r} is not allowed; allowed: a number in (0, 1)"
            )
        if self.samples not in SAMPLES:
            raise UserError(f"config sae.samples = {self.samples!r} is not allowed; allowed: {', '.join(SAMPLES)}")
        if self.rank_by not in RANK_BY:
            raise UserError(f"config sae.rank_by = {self.rank_by!r} is not allowed; allowed: {', '.join(RANK_BY)}")
        if self.mine_on not in MINE_ON:
            raise UserError(f"config sae.mine_on = {self.mine_on!r} is not allowed; allowed: {', '.join(MINE_ON)}")
        if not isinstance(self.gallery, bool):
            raise UserError(f"config sae.gallery = {self.gallery!r} is not allowed; allowed: true, false")
        self.reject_unknown()

    def arch(self, d_in: int, layer: str | None = None) -> SAEArch:
        """The validated architecture for a layer with ``d_in`` channels."""
        n = self.expansion * int(d_in)
        k_aux = self.aux_k if self.aux_k is not None else max(1, int(d_in) // 2)
        where = f" of layer {layer!r}" if layer else ""
        if self.k >= n:
            raise UserError(
                f"config sae.k = {self.k} is not allowed: k must be smaller than n_latents = {n}"
                f" (sae.expansion {self.expansion} × {d_in} channels{where}); lower sae.k or raise sae.expansion"
            )
        if k_aux > n:
            raise UserError(f"config sae.aux_k = {k_aux} is not allowed: it must be <= n_latents = {n}{where}")
        return SAEArch(d_in=int(d_in), n_latents=n, k=self.k, k_aux=k_aux)
