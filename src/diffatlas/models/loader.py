"""One loader for every model family: ``load_model(path_or_hub_id) -> ModelHandle``.

The family is read from ``model_index.json``'s ``_class_name``:

=============================  ==========  ===============================================
``_class_name``                family      denoiser
=============================  ==========  ===============================================
``StableDiffusionPipeline``    ``"sd"``    ``UNet2DConditionModel`` on VAE latents (SD1.x/2.x)
``StableDiffusionXLPipeline``  ``"sdxl"``  ``UNet2DConditionModel`` + two text encoders
``DiTPipeline``                ``"dit"``   ``DiTTransformer2DModel`` (class-conditional)
``ShapesWorldPipeline``        ``"pixel"`` ``UNet2DConditionModel`` on pixels (no VAE)
``StableDiffusion3Pipeline``   ``"sd3"``   ``SD3Transformer2DModel`` (joint attention; CLIP-L,
                                           CLIP-G and T5; flow matching)
``FluxPipeline``               ``"flux"``  ``FluxTransformer2DModel`` (double- and single-stream
                                           blocks on 2x2-packed latents; CLIP + T5; flow matching)
=============================  ==========  ===============================================

Flow-matching families (``sd3``, ``flux``) take their time as σ in [0, 1]
(:attr:`ModelHandle.time_convention` is ``"sigma"``): ``model_output(x_t, σ, cond)`` is the
velocity ``v = ε - x0``, and each family's denoiser is called in its own convention (SD3's
transformer takes the scheduler's timestep σ·T, Flux's takes σ; Flux's latents are packed
into 2x2 patches and back around the call, so callers always see ``[B, C, h, w]``).

A local directory is loaded as is. Anything else is treated as a Hugging Face hub id and
looked up **only in the local cache** (``local_files_only=True`` by default): nothing is
ever downloaded, and a model that is not cached is a :class:`~diffatlas.errors.UserError`.

The :class:`ModelHandle` hides the differences between families behind three calls that
every analysis uses: ``conditioning(prompts)`` (the denoiser's keyword arguments),
``predict_noise(x_t, t, cond)`` (ε whatever the ``prediction_type``, DiT's learned-sigma
half removed; ``model_output`` is the raw output) and
``encode_images``/``decode`` (VAE or identity). All modules are put in ``eval()`` mode
with ``requires_grad_(False)`` (gradients w.r.t. *inputs*, e.g. Jacobians, still work); to
train, build the model from config instead.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from diffatlas.config import refuse_local_revision
from diffatlas.errors import UserError
from diffatlas.models.diffusion import (
    DDPM_NOISING_RULE,
    FLOW_NOISING_RULE,
    NoiseSchedule,
    Time,
    check_time,
    flow_add_noise,
    flow_eps_x0,
    prediction_type_of,
    time_convention,
)

log = logging.getLogger(__name__)

#: model_index.json ``_class_name`` -> family.
CLASS_TO_FAMILY = {
    "StableDiffusionPipeline": "sd",
    "StableDiffusionXLPipeline": "sdxl",
    "DiTPipeline": "dit",
    "ShapesWorldPipeline": "pixel",
    "StableDiffusion3Pipeline": "sd3",
    "FluxPipeline": "flux",
}

#: Families whose denoiser is a transformer (``pipeline.transformer``), not a UNet.
TRANSFORMER_FAMILIES = ("dit", "sd3", "flux")

#: Families with joint text-image attention and flow matching.
FLOW_FAMILIES = ("sd3", "flux")

#: T5 tokens the pipelines read by default (``max_sequence_length``): SD3 256, Flux 512; a
#: tokenizer with a smaller ``model_max_length`` (the tiny models') caps it.
T5_SEQUENCE_LENGTH = {"sd3": 256, "flux": 512}

#: Flux-dev's distilled guidance (FluxPipeline's default ``guidance_scale``), fed to
#: guidance-embedded transformers; there is no unconditional branch.
FLUX_GUIDANCE = 3.5

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

#: Weight files read through torch's pickle loader (``torch.load``), unlike safetensors.
PICKLE_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


@dataclass
class ModelHandle:
    """A loaded diffusion model with a family-independent interface.

    Attributes:
        family: ``"sd"``, ``"sdxl"``, ``"dit"``, ``"pixel"``, ``"sd3"`` or ``"flux"``.
        pipeline: the diffusers pipeline (components on ``device`` in ``dtype``).
        denoiser: the UNet2DConditionModel, or the pipeline's transformer (DiT, SD3, Flux).
        scheduler: the pipeline's scheduler (its config is the timestep convention).
        vae: AutoencoderKL, or None for pixel models.
        tokenizers, text_encoders: lists in the pipeline's order (two for SDXL and Flux, three
            for SD3 (CLIP-L, CLIP-G, T5), none for DiT).
        num_train_timesteps: T; timesteps are training-scale integers 0..T-1.
        alphas_cumprod: float32 tensor [T] (CPU): ᾱ_t of the scheduler; None for flow-matching
            schedulers (their time is σ, see :func:`diffatlas.models.diffusion.time_convention`).
        image_size: pixels per side; latent_size: denoiser input side; latent_channels.
        model_id: the path or hub id as given; revision: hub revision / commit, or a short
            content hash of the weight files for local directories (see :func:`weights_hash`).
        id2label: DiT class names (empty for text-conditioned families).
    """

    family: str
    pipeline: Any
    denoiser: torch.nn.Module
    scheduler: Any
    vae: torch.nn.Module | None
    tokenizers: list
    text_encoders: list
    num_train_timesteps: int
    alphas_cumprod: torch.Tensor | None
    image_size: int
    latent_size: int
    latent_channels: int
    model_id: str
    revision: str
    device: torch.device
    dtype: torch.dtype
    local_path: Path | None = None
    id2label: dict[int, str] = field(default_factory=dict)

    # ------------------------------------------------------------------ images <-> x0
    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell (1 for pixel models)."""
        return self.image_size // self.latent_size

    @property
    def num_classes(self) -> int | None:
        """Number of DiT classes (``num_embeds_ada_norm``); None for text-conditioned models."""
        return int(self.denoiser.config.num_embeds_ada_norm) if self.family == "dit" else None

    @torch.no_grad()
    def encode_images(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``[B, 3, H, W]`` in [-1, 1] -> clean denoiser input x0 ``[B, C, h, w]``.

        Latent models: the VAE posterior *mean* (deterministic, so repeated extraction gives
        identical activations) times ``scaling_factor`` (minus ``shift_factor`` if the VAE
        has one). Pixel models: the images themselves.
        """
        x = x.to(self.device, self.dtype)
        if self.vae is None:
            return x
        cfg = self.vae.config
        z = self.vae.encode(x).latent_dist.mean
        shift = getattr(cfg, "shift_factor", None) or 0.0
        return (z - shift) * cfg.scaling_factor

    @torch.no_grad()
    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """Denoiser-space ``x0 [B, C, h, w]`` -> images ``[B, 3, H, W]`` clamped to [-1, 1]."""
        x0 = x0.to(self.device, self.dtype)
        if self.vae is None:
            return x0.clamp(-1, 1)
        cfg = self.vae.config
        shift = getattr(cfg, "shift_factor", None) or 0.0
        return self.vae.decode(x0 / cfg.scaling_factor + shift).sample.clamp(-1, 1)

    # ------------------------------------------------------------------ conditioning
    def _prompts(self, prompts: list[str] | str | None) -> list[str]:
        if prompts is None:
            return [""]
        if isinstance(prompts, str):
            return [prompts]
        prompts = list(prompts)
        if not prompts:
            raise UserError("prompts must be a non-empty list of strings (use [''] for the empty prompt)")
        return prompts

    def _tokenize(self, tok, prompts: list[str]) -> torch.Tensor:
        return tok(
            prompts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids.to(self.device)

    @torch.no_grad()
    def conditioning(self, prompts: list[str] | str | None = None, class_labels=None) -> dict[str, Any]:
        """Keyword arguments for ``denoiser(x_t, t, **cond)``, batch ``B = len(prompts)``.

        * ``sd`` / ``pixel``: ``{"encoder_hidden_states": [B, 77, D]}`` (last hidden state).
        * ``sdxl``: ``{"encoder_hidden_states": [B, 77, D1 + D2]}`` (both encoders' penultimate
          hidden states, concatenated), ``"added_cond_kwargs": {"text_embeds": [B, P]`` (pooled
          projection of encoder 2), ``"time_ids": [B, 6]}`` (original size, crop (0, 0), target
          size, all ``image_size``).
        * ``dit``: ``{"class_labels": [B] long}``. ``class_labels`` (ints) win; else non-empty
          prompts are looked up as class names (``pipeline.labels``); else the null class
          ``num_classes`` (unconditional), one per prompt.

        * ``sd3`` / ``flux``: ``{"encoder_hidden_states": [B, L, D], "pooled_projections": [B, P]}``
          from the pipeline's own ``encode_prompt`` (SD3: CLIP-L and CLIP-G penultimate states
          side by side, padded to T5's width, then the T5 tokens: L = 77 + T5 length; pooled =
          both CLIP projections. Flux: T5 tokens, CLIP's pooled output). A prompt longer than
          the T5 budget (:meth:`t5_length`) is a UserError, not a silent truncation.

        ``prompts=None`` means ``[""]`` (the empty prompt, batch 1). An empty prompt is
        encoded like any other prompt (not replaced by zeros as SDXL's *negative* prompt is).
        """
        prompts = self._prompts(prompts)
        if self.family in FLOW_FAMILIES:
            if class_labels is not None:
                raise UserError(f"class_labels are only used by DiT models; {self.model_id} is a {self.family} model")
            return self._flow_conditioning(prompts)
        if self.family == "dit":
            return {"class_labels": self._class_labels(prompts, class_labels)}
        if class_labels is not None:
            raise UserError(f"class_labels are only used by DiT models; {self.model_id} is a {self.family} model")
        if self.family in ("sd", "pixel"):
            ids = self._tokenize(self.tokenizers[0], prompts)
            hidden = self.text_encoders[0](ids).last_hidden_state
            return {"encoder_hidden_states": hidden.to(self.dtype)}
        # sdxl
        states, pooled = [], None
        for tok, enc in zip(self.tokenizers, self.text_encoders):
            out = enc(self._tokenize(tok, prompts), output_hidden_states=True)
            states.append(out.hidden_states[-2])
            pooled = getattr(out, "text_embeds", None)  # the last encoder (with projection) wins
        s = self.image_size
        time_ids = torch.tensor([[s, s, 0, 0, s, s]], device=self.device, dtype=self.dtype).repeat(len(prompts), 1)
        return {
            "encoder_hidden_states": torch.cat(states, dim=-1).to(self.dtype),
            "added_cond_kwargs": {"text_embeds": pooled.to(self.dtype), "time_ids": time_ids},
        }

    @property
    def t5_tokenizer(self):
        """The T5 tokenizer of a joint-attention family (the last one), else None."""
        return self.tokenizers[-1] if self.family in FLOW_FAMILIES else None

    @property
    def t5_length(self) -> int | None:
        """T5 tokens read per prompt (end-of-text included): the pipeline's default
        ``max_sequence_length``, capped by the tokenizer's ``model_max_length``."""
        tok = self.t5_tokenizer
        if tok is None:
            return None
        return min(T5_SEQUENCE_LENGTH[self.family], int(tok.model_max_length))

    def _check_t5_length(self, prompts: list[str]) -> None:
        limit = self.t5_length
        for p in prompts:
            n = len(self.t5_tokenizer(p, add_special_tokens=True).input_ids)
            if n > limit:
                raise UserError(
                    f"prompt {p[:60]!r}{'...' if len(p) > 60 else ''} is {n} T5 tokens (with end-of-text) but "
                    f"model {self.model_id} ({self.family}) reads at most {limit}; allowed: prompts of at most "
                    f"{limit} T5 tokens (shorten it; nothing is truncated silently)"
                )

    def _flow_conditioning(self, prompts: list[str]) -> dict[str, Any]:
        self._check_t5_length(prompts)
        pipe, length = self.pipeline, self.t5_length
        if self.family == "sd3":
            emb, _, pooled, _ = pipe.encode_prompt(
                prompt=prompts, prompt_2=None, prompt_3=None, device=self.device,
                do_classifier_free_guidance=False, max_sequence_length=length,
            )
        else:
            emb, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, device=self.device,
                                                max_sequence_length=length)
        return {"encoder_hidden_states": emb.to(self.dtype), "pooled_projections": pooled.to(self.dtype)}

    def _class_labels(self, prompts: list[str], class_labels) -> torch.Tensor:
        n_cls = self.num_classes
        if class_labels is not None:
            labels = torch.as_tensor(class_labels, dtype=torch.long).reshape(-1)
            bad = labels[(labels < 0) | (labels > n_cls)]
            if len(bad):
                raise UserError(f"class label(s) {bad.tolist()} out of range 0..{n_cls - 1} (or {n_cls} = null class)")
        else:
            # Empty prompt -> null class; otherwise an exact class name (case-insensitive).
            names = {name.strip().lower(): i for i, name in self.id2label.items()}
            for i, value in self.id2label.items():  # "tench, Tinca tinca" style synonyms
                for syn in value.split(","):
                    names.setdefault(syn.strip().lower(), i)
            ids = []
            for p in prompts:
                key = p.strip().lower()
                if not key:
                    ids.append(n_cls)
                elif key in names:
                    ids.append(names[key])
                else:
                    some = ", ".join(sorted(names)[:10])
                    raise UserError(
                        f"DiT model {self.model_id}: prompt {p!r} is not a class name; use class_labels "
                        f"(ints 0..{n_cls - 1}) or one of its {len(names)} names (e.g. {some}, ...)"
                    )
            labels = torch.tensor(ids, dtype=torch.long)
        if (labels == n_cls).any():
            table = self.denoiser.transformer_blocks[0].norm1.emb.class_embedder.embedding_table
            if table.num_embeddings <= n_cls:
                raise UserError(f"DiT model {self.model_id} has no null class (trained without label dropout)")
        return labels.to(self.device)

    # ------------------------------------------------------------------ denoiser
    def _expand(self, cond: dict[str, Any], batch: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in cond.items():
            if isinstance(v, dict):
                out[k] = self._expand(v, batch)
            elif torch.is_tensor(v) and v.ndim >= 1 and v.shape[0] == 1 and batch != 1:
                out[k] = v.expand(batch, *v.shape[1:])
            else:
                out[k] = v
        return out

    def model_output(self, x_t: torch.Tensor, t, cond: dict[str, Any]) -> torch.Tensor:
        """The denoiser's raw output ``[B, C, h, w]`` for ``x_t`` at time(s) ``t``.

        What it means (ε, v or x0) is the scheduler's ``prediction_type``; use
        :meth:`predict_noise` for ε. ``t`` is in the model's :attr:`time_convention`: a
        training step (int, 0-d or ``[B]`` tensor, 0..T-1), or for flow-matching families σ in
        [0, 1] (float, 0-d or ``[B]`` tensor), whose output is the velocity ``v = ε - x0``; a
        :class:`~diffatlas.models.diffusion.Time` of the right kind is accepted too.
        ``cond`` comes from :meth:`conditioning`; a batch-1 conditioning is broadcast
        to ``B``. Gradients flow (no ``no_grad`` here) so callers can differentiate w.r.t.
        ``x_t``. For DiT with a learned variance (``out_channels == 2 * in_channels``) the
        variance half is dropped.
        """
        b = x_t.shape[0]
        cond = self._expand(cond, b)
        if self.family in FLOW_FAMILIES:
            return self._flow_output(x_t, self._sigmas(t, x_t), cond)
        if isinstance(t, Time):
            t = check_time(t, "step", self.num_train_timesteps, "time", self.model_id).value
        t = torch.as_tensor(t, device=x_t.device)
        if t.ndim == 0:
            t = t.expand(b)
        out = self.denoiser(x_t, t, **cond).sample
        c = x_t.shape[1]
        if out.shape[1] == 2 * c:
            out = out[:, :c]
        return out

    def _sigmas(self, t, x_t: torch.Tensor) -> torch.Tensor:
        """σ as a float32 ``[B]`` tensor on ``x_t``'s device; a step Time or σ outside [0, 1] is a UserError."""
        if isinstance(t, Time):
            t = check_time(t, "sigma", None, "time", self.model_id).value
        s = torch.as_tensor(t, device=x_t.device, dtype=torch.float32)
        if not torch.is_floating_point(torch.as_tensor(t)) or bool(((s < 0) | (s > 1)).any()):
            raise UserError(f"model {self.model_id} ({self.family}) is a flow-matching model: its time is sigma, a "
                            f"float in [0, 1] (or Time 's0.500'); got {t!r}")
        return s.expand(x_t.shape[0]) if s.ndim == 0 else s

    def _flow_output(self, x_t: torch.Tensor, sigma: torch.Tensor, cond: dict[str, Any]) -> torch.Tensor:
        """Velocity ``[B, C, h, w]`` of SD3 / Flux at σ ``[B]``, each in its denoiser's convention."""
        b, c, h, w = x_t.shape
        if self.family == "sd3":
            # SD3's transformer is conditioned on the scheduler's timestep sigma * T.
            return self.denoiser(hidden_states=x_t, timestep=sigma * self.num_train_timesteps, **cond).sample
        pipe = self.pipeline
        packed = pipe._pack_latents(x_t, b, c, h, w)  # [B, (h/2)(w/2), 4C]
        img_ids = pipe._prepare_latent_image_ids(b, h // 2, w // 2, x_t.device, x_t.dtype)
        txt_ids = torch.zeros(cond["encoder_hidden_states"].shape[1], 3, device=x_t.device, dtype=x_t.dtype)
        extra = {}
        if getattr(self.denoiser.config, "guidance_embeds", False):
            extra["guidance"] = torch.full((b,), FLUX_GUIDANCE, device=x_t.device, dtype=torch.float32)
        # Flux's transformer takes sigma itself (FluxPipeline passes timestep / 1000).
        out = self.denoiser(hidden_states=packed, timestep=sigma.to(x_t.dtype), img_ids=img_ids, txt_ids=txt_ids,
                            **extra, **cond).sample
        return pipe._unpack_latents(out, h * self.vae_scale_factor, w * self.vae_scale_factor, self.vae_scale_factor)

    def flow_sigmas(self, steps: int) -> list[float]:
        """The σ grid, 1 -> 0 (the last is 0), that this flow-matching model's own pipeline samples
        with ``steps`` steps: a fresh copy of its scheduler set up as ``StableDiffusion3Pipeline``
        / ``FluxPipeline`` set it up (Flux passes the sigmas ``linspace(1, 1/steps, steps)``; a
        scheduler with dynamic shifting gets μ from the image-token count), so the shift is the
        model's, not a constant here."""
        import numpy as np
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        sched = type(self.scheduler).from_config(self.scheduler.config)
        cfg = sched.config
        kwargs: dict[str, Any] = {}
        if cfg.get("use_dynamic_shifting", False):
            if self.family == "flux":
                h, w = self.token_grid
                tokens = int(h * w)
            else:
                tokens = (int(self.latent_size) // int(getattr(self.denoiser.config, "patch_size", 1) or 1)) ** 2
            kwargs["mu"] = calculate_shift(tokens, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                                           cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15))
        if self.family == "flux" and not cfg.get("use_flow_sigmas", False):
            kwargs["sigmas"] = np.linspace(1.0, 1.0 / steps, steps)
        sched.set_timesteps(int(steps), **kwargs)
        return [float(x) for x in sched.sigmas.tolist()]

    @property
    def token_grid(self) -> tuple[int, int] | None:
        """``(h, w)`` of the image tokens where the denoiser's input is not a ``[B, C, H, W]``
        map the hooks can read it from (Flux's packed latents); None otherwise."""
        if self.family == "flux":
            return self.latent_size // 2, self.latent_size // 2
        return None

    def predict_noise(self, x_t: torch.Tensor, t, cond: dict[str, Any]) -> torch.Tensor:
        """Noise prediction ε ``[B, C, h, w]``: :meth:`model_output` read by the scheduler's
        ``prediction_type`` (v- and x0-predicting models are converted with ᾱ_t; see
        :mod:`diffatlas.models.diffusion`). Same arguments as :meth:`model_output`."""
        out = self.model_output(x_t, t, cond)
        if self.family in FLOW_FAMILIES:
            eps, _ = flow_eps_x0(out, x_t, self._sigmas(t, x_t))
            return eps
        if self.prediction_type == "epsilon":
            return out
        tt = torch.as_tensor(t, device=x_t.device)
        if tt.ndim == 0:
            tt = tt.expand(x_t.shape[0])
        eps, _ = self.schedule.split(out, x_t, tt)
        return eps

    @property
    def prediction_type(self) -> str:
        """The scheduler's ``prediction_type`` (checked at load time)."""
        return prediction_type_of(self.scheduler, self.model_id)

    @property
    def time_convention(self) -> str:
        """``"step"`` (integer training steps with ᾱ) or ``"sigma"`` (flow matching)."""
        return time_convention(self.scheduler)

    def ddpm_alphas(self, stage: str) -> torch.Tensor:
        """``alphas_cumprod`` for a stage that noises with ᾱ; a flow-matching model (none) is a
        UserError naming the model and the stage, not a TypeError further down."""
        if self.alphas_cumprod is None:
            raise UserError(
                f"model {self.model_id}: {stage} needs a DDPM-family scheduler with alphas_cumprod "
                f"(DDIM, DDPM, PNDM, Euler, ...); {type(self.scheduler).__name__} has none (flow matching)"
            )
        return self.alphas_cumprod

    @functools.cached_property
    def schedule(self) -> NoiseSchedule:
        """The scheduler's noise levels, prediction type and clipping (the diffusion core's view).

        Raises UserError for schedulers without ``alphas_cumprod`` (flow matching)."""
        return NoiseSchedule.from_scheduler(self.scheduler, self.model_id)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t) -> torch.Tensor:
        """Forward process ``x_t = sqrt(ᾱ_t) x0 + sqrt(1 - ᾱ_t) noise`` (t: int or [B]); for
        flow-matching models ``x_σ = (1 - σ) x0 + σ noise`` (t = σ: float or [B])."""
        if self.family in FLOW_FAMILIES:
            return flow_add_noise(x0, noise, self._sigmas(t, x0))
        t = torch.as_tensor(t, device=x0.device).long()
        if t.ndim == 0:
            t = t.expand(x0.shape[0])
        return self.schedule.add_noise(x0, noise, t)

    def describe(self) -> dict[str, Any]:
        """JSON-able summary to record next to artifacts."""
        return {
            "model_id": self.model_id,
            "revision": self.revision,
            "family": self.family,
            "image_size": self.image_size,
            "latent_size": self.latent_size,
            "latent_channels": self.latent_channels,
            "num_train_timesteps": self.num_train_timesteps,
            "time_convention": self.time_convention,
            "noising_rule": FLOW_NOISING_RULE if self.time_convention == "sigma" else DDPM_NOISING_RULE,
            "scheduler": {"class": type(self.scheduler).__name__, **dict(self.scheduler.config)},
        }


# ---------------------------------------------------------------------- helpers
def weights_hash(path: str | os.PathLike, n_hex: int = 12) -> str:
    """Short content hash of a model directory's weight files.

    sha256 over, for every ``*.safetensors`` / ``*.bin`` / ``*.ckpt`` / ``*.pt`` file under
    ``path`` (sorted by relative path): its relative path, its size and its first MiB. Cheap
    on multi-GB checkpoints, and any retraining changes it. Returns the first ``n_hex``
    hex digits.
    """
    root = Path(path)
    h = hashlib.sha256()
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".bin", ".ckpt", ".pt"))
    for p in files:
        rel = p.relative_to(root).as_posix()
        h.update(rel.encode())
        h.update(str(p.stat().st_size).encode())
        with open(p, "rb") as f:
            h.update(f.read(1 << 20))
    return h.hexdigest()[:n_hex]


def _resolve(
    path_or_id: str, revision: str | None, local_files_only: bool, cache_dir: str | os.PathLike | None = None
) -> tuple[Path, str]:
    """Local directory of the model and its revision string."""
    p = Path(os.path.expanduser(str(path_or_id)))
    if p.exists():
        refuse_local_revision(p, revision)
        if not p.is_dir():
            raise UserError(f"model path {p} is a file; expected a diffusers model directory containing model_index.json")
        if not (p / "model_index.json").is_file():
            raise UserError(
                f"model directory {p} has no model_index.json; expected a diffusers pipeline directory "
                f"(model_index.json plus one sub-folder per component, as written by save_pretrained)"
            )
        return p, revision or weights_hash(p)
    if not _HUB_ID.match(str(path_or_id)):
        raise UserError(f"model directory {path_or_id} not found (expected a diffusers model directory or a hub id 'owner/name')")
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    cache = cache_dir or constants.HF_HUB_CACHE
    try:
        local = Path(
            snapshot_download(str(path_or_id), revision=revision, local_files_only=local_files_only, cache_dir=cache)
        )
    except LocalEntryNotFoundError as err:
        cached = _cached_revisions(Path(cache), str(path_or_id))
        if cached:  # the model is cached, the asked revision is not
            raise UserError(
                f"revision {revision or 'main'!r} of model {path_or_id!r} is not in the local Hugging Face cache "
                f"({cache}); cached revisions: {', '.join(cached)}; nothing is downloaded: "
                f"download it yourself (huggingface-cli download {path_or_id} --revision {revision or 'main'}) "
                f"or set models.<name>.revision to a cached one"
            ) from err
        raise UserError(
            f"model {path_or_id!r} is neither a local directory nor in the local Hugging Face cache "
            f"({cache}); "
            f"nothing is downloaded: download it yourself (huggingface-cli download {path_or_id}) or give a local path"
        ) from err
    except Exception as err:  # noqa: BLE001 - hub errors (bad revision, gated repo) become one clear line
        raise UserError(f"cannot resolve model {path_or_id!r} (revision {revision}): {err}") from err
    if not (local / "model_index.json").is_file():
        raise UserError(f"cached model {path_or_id!r} at {local} has no model_index.json; expected a diffusers pipeline")
    # The snapshot folder is named after the commit hash.
    return local, revision if revision and revision != "main" else local.name


def pickle_only_weights(local: Path, index: dict[str, Any]) -> list[Path]:
    """Weight files of the components that have pickle-based weights and no safetensors.

    A component is a ``model_index.json`` entry ``name: [library, class]``; its folder
    ``local/name`` is looked at (tokenizers and schedulers have no weights and are skipped).
    """
    found: list[Path] = []
    for name, spec in index.items():
        folder = local / name
        if name.startswith("_") or not isinstance(spec, list) or not folder.is_dir():
            continue
        files = [f for f in folder.iterdir() if f.is_file()]
        if any(f.name.endswith(".safetensors") for f in files):
            continue
        found += sorted(f for f in files if f.suffix in PICKLE_WEIGHT_SUFFIXES)
    return found


def _cached_revisions(cache: Path, hub_id: str) -> list[str]:
    """Branch/tag names (refs/) and commits (snapshots/) of ``hub_id`` in the local cache."""
    repo = cache / ("models--" + hub_id.replace("/", "--"))
    refs = sorted(p.name for p in (repo / "refs").glob("*") if p.is_file())
    snaps = sorted(p.name for p in (repo / "snapshots").glob("*") if p.is_dir())
    return refs + snaps


@contextlib.contextmanager
def _quiet_loading():
    """Silence diffusers'/transformers' per-component loading progress bars (log noise)."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    d_on, t_on = dlog.is_progress_bar_enabled(), tlog.is_progress_bar_enabled()
    dlog.disable_progress_bar()
    tlog.disable_progress_bar()
    try:
        yield
    finally:
        if d_on:
            dlog.enable_progress_bar()
        if t_on:
            tlog.enable_progress_bar()


def _pipeline_class(family: str):
    if family == "pixel":
        from diffatlas.models.pipeline import ShapesWorldPipeline

        return ShapesWorldPipeline
    import diffusers

    return {"sd": diffusers.StableDiffusionPipeline, "sdxl": diffusers.StableDiffusionXLPipeline,
            "dit": diffusers.DiTPipeline, "sd3": diffusers.StableDiffusion3Pipeline,
            "flux": diffusers.FluxPipeline}[family]


def load_model(
    path_or_id: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    revision: str | None = None,
    local_files_only: bool = True,
    cache_dir: str | os.PathLike | None = None,
    allow_pickle_weights: bool = False,
) -> ModelHandle:
    """Load a diffusers pipeline from a local directory or the local HF cache.

    Args:
        path_or_id: a directory with ``model_index.json``, or a hub id (``owner/name``)
            already in the Hugging Face cache.
        device, dtype: where and in what precision every component lives.
        revision: hub revision (branch, tag or commit) for hub ids; recorded as is. Refused
            for a local directory (it has no revisions; its weight hash is recorded).
        local_files_only: keep True (the default): nothing is downloaded.
        cache_dir: Hugging Face hub cache to look in (default: ``HF_HUB_CACHE``).
        allow_pickle_weights: weights are read from ``.safetensors`` only; True also admits
            components stored only as pickle-based ``.bin``/``.pt``/``.ckpt`` files (read
            by torch's ``weights_only`` loader). The config key is
            ``models.<name>.allow_pickle_weights``.

    Raises:
        UserError: missing directory, no ``model_index.json``, an unknown pipeline class,
            a hub id not in the cache, or a component that fails to load.
    """
    import json

    model_id = str(path_or_id)
    local, rev = _resolve(model_id, revision, local_files_only, cache_dir)
    index_path = local / "model_index.json"
    try:
        index = json.loads(index_path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{index_path} is not valid JSON: {err}") from err
    cls_name = index.get("_class_name")
    if cls_name not in CLASS_TO_FAMILY:
        allowed = ", ".join(f"{k} ({v})" for k, v in CLASS_TO_FAMILY.items())
        raise UserError(f"{index_path}: _class_name {cls_name!r} is not a supported pipeline; allowed: {allowed}")
    family = CLASS_TO_FAMILY[cls_name]
    cls = _pipeline_class(family)
    pickled = pickle_only_weights(local, index)
    if pickled and not allow_pickle_weights:
        names = ", ".join(str(f.relative_to(local)) for f in pickled)
        raise UserError(
            f"model {model_id}: {names} are pickle-based weights with no .safetensors next to them; "
            "pickle files can run code when loaded, so only safetensors are read. Convert them "
            "(load and save_pretrained, which writes safetensors) or, if you trust the files, set "
            "allow_pickle_weights: true in the model's config (models.<name>)"
        )
    if pickled:
        log.warning("model %s: loading pickle-based weights %s (allow_pickle_weights is true)",
                    model_id, ", ".join(str(f.relative_to(local)) for f in pickled))
    kwargs: dict[str, Any] = {"dtype": dtype, "local_files_only": True, "low_cpu_mem_usage": False,
                              # safetensors only, unless pickle weights are allowed and needed
                              "use_safetensors": None if pickled else True}
    for name, spec in index.items():
        # A component saved as absent ([null, null]) is passed as None: diffusers would refuse
        # the pipeline otherwise (the pixel-space SD3 ShapesWorld model has no VAE).
        if not name.startswith("_") and spec == [None, None]:
            kwargs[name] = None
    if family == "sd":
        # The safety checker is a 1 GB CLIP vision model that analyses never use.
        kwargs.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    elif family == "sdxl":
        kwargs.update(add_watermarker=False)
    elif family == "dit" and index.get("id2label"):
        # JSON keys are strings; DiTPipeline's signature wants ints.
        kwargs.update(id2label={int(k): v for k, v in index["id2label"].items()})
    try:
        with _quiet_loading():
            pipe = cls.from_pretrained(str(local), **kwargs)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UserError(f"cannot load {cls_name} from {local}: {err}") from err
    device = torch.device(device)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=None)  # tqdm turns itself off when not on a terminal

    for name, comp in pipe.components.items():
        if isinstance(comp, torch.nn.Module):
            comp.eval().requires_grad_(False)

    denoiser = pipe.transformer if family in TRANSFORMER_FAMILIES else pipe.unet
    vae = getattr(pipe, "vae", None)
    tokenizers = [t for t in (getattr(pipe, n, None) for n in ("tokenizer", "tokenizer_2", "tokenizer_3")) if t is not None]
    encoders = [e for e in (getattr(pipe, n, None) for n in ("text_encoder", "text_encoder_2", "text_encoder_3"))
                if e is not None]
    scale = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1
    if family == "flux":
        # Flux's transformer has no sample size and takes 2x2-packed latents: the size is the
        # VAE's (1024 px for FLUX.1) and the channels are the VAE's latent channels.
        latent_size = int(vae.config.sample_size) // scale
        latent_channels = int(vae.config.latent_channels)
    else:
        sample = denoiser.config.sample_size
        latent_size = int(sample if isinstance(sample, int) else sample[0])
        latent_channels = int(denoiser.config.in_channels)
    sched = pipe.scheduler
    prediction_type_of(sched, model_id)  # an unknown prediction type is refused at load time
    # A scheduler without alphas_cumprod (flow matching: times are sigmas) is not refused
    # here; stages that need ᾱ refuse it through ``handle.schedule``.
    alphas = getattr(sched, "alphas_cumprod", None)
    id2label: dict[int, str] = {}
    if family == "dit":
        id2label = {int(k): v for k, v in (index.get("id2label") or {}).items()}
    handle = ModelHandle(
        family=family,
        pipeline=pipe,
        denoiser=denoiser,
        scheduler=sched,
        vae=vae,
        tokenizers=tokenizers,
        text_encoders=encoders,
        num_train_timesteps=int(sched.config.num_train_timesteps),
        alphas_cumprod=None if alphas is None else alphas.detach().to("cpu", torch.float32).clone(),
        image_size=latent_size * scale,
        latent_size=latent_size,
        latent_channels=latent_channels,
        model_id=model_id,
        revision=rev,
        device=device,
        dtype=dtype,
        local_path=local,
        id2label=id2label,
    )
    log.info("loaded %s model %s (revision %s): %dpx, latent %dx%dx%d", family, model_id, rev,
             handle.image_size, latent_channels, latent_size, latent_size)
    return handle
