"""``ShapesWorldPipeline``: text-to-image DDIM sampling in pixel space, SD-style.

The pipeline holds the same components as Stable Diffusion minus the VAE: a
``UNet2DConditionModel`` that denoises RGB pixels directly, a ``CLIPTextModel``, a CLIP-style
tokenizer and a ``DDIMScheduler``. It is saved and loaded with the ordinary diffusers
``save_pretrained`` / ``ShapesWorldPipeline.from_pretrained`` (``model_index.json`` names
``ShapesWorldPipeline``; :func:`diffatlas.models.loader.load_model` maps that name to this class).

Classifier-free guidance batch layout (read this if you hook the UNet during sampling)
------------------------------------------------------------------------------------
* ``guidance_scale > 1``: every denoiser call gets a batch of ``2 * N`` rows,
  **unconditional first, conditional second** (``[uncond_0..uncond_{N-1}, cond_0..cond_{N-1}]``),
  like diffusers' ``StableDiffusionPipeline`` and the diffusion core
  (:func:`diffatlas.models.diffusion.cfg_batch`). ``N = len(prompts) * num_images_per_prompt``.
* ``guidance_scale <= 1``: no unconditional pass at all; the batch is the ``N`` conditional rows.

Before the first denoiser call, ``__call__`` stores what it does in
``pipe.last_cfg_layout`` (and keeps it after returning)::

    {"do_cfg": bool, "batch_size": 2N or N, "num_images": N,
     "uncond_slice": slice(0, N) or None, "cond_slice": slice(N, 2N) or slice(0, N),
     "order": ["uncond", "cond"] or ["cond"], "guidance_scale": float,
     "prompts": [...] (one per image, repeated per num_images_per_prompt),
     "timesteps": [int, ...]}

so an attention hook (e.g. DAAM) can select the conditional rows of the batch it sees with
``batch[pipe.last_cfg_layout["cond_slice"]]`` without guessing. ``cross_attention_kwargs``
is passed through to the UNet unchanged.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from diffusers import DDIMScheduler, DiffusionPipeline, ImagePipelineOutput, UNet2DConditionModel
from diffusers.utils.torch_utils import randn_tensor

from diffatlas.models.diffusion import cfg_batch, cfg_split, uses_cfg

log = logging.getLogger(__name__)


class ShapesWorldPipeline(DiffusionPipeline):
    """Pixel-space text-to-image diffusion (UNet2DConditionModel + CLIPTextModel + DDIM).

    Components: ``unet`` (UNet2DConditionModel, ``in_channels`` = 3), ``text_encoder``
    (``transformers.CLIPTextModel``), ``tokenizer`` (``transformers.CLIPTokenizer``),
    ``scheduler`` (``DDIMScheduler``; any diffusers scheduler with ``step`` works).
    """

    model_cpu_offload_seq = "text_encoder->unet"

    def __init__(self, unet: UNet2DConditionModel, text_encoder, tokenizer, scheduler: DDIMScheduler):
        super().__init__()
        self.register_modules(unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)
        self.last_cfg_layout: dict[str, Any] | None = None

    @property
    def image_size(self) -> int:
        """Side of the generated square images, in pixels."""
        s = self.unet.config.sample_size
        return int(s if isinstance(s, int) else s[0])

    @torch.no_grad()
    def encode_prompt(self, prompts: str | list[str], device: torch.device | None = None) -> torch.Tensor:
        """Text-encoder hidden states for ``prompts``: ``[B, 77, D]`` (last hidden state, as SD1.x).

        Prompts are lower-cased by the tokenizer, padded/truncated to ``model_max_length``.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        device = device or self._execution_device
        ids = self.tokenizer(
            list(prompts),
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(device)
        hidden = self.text_encoder(ids).last_hidden_state
        return hidden.to(dtype=self.unet.dtype)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        num_inference_steps: int = 50,
        guidance_scale: float = 3.0,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "np",
        return_dict: bool = True,
        negative_prompt: str | list[str] | None = None,
        eta: float = 0.0,
        latents: torch.Tensor | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        callback: Callable[[int, int, torch.Tensor], None] | None = None,
    ):
        """Sample images for ``prompt`` with DDIM and (when ``guidance_scale > 1``) CFG.

        Args:
            prompt: one prompt or a list of prompts.
            num_inference_steps: DDIM steps.
            guidance_scale: CFG weight w in ``eps_u + w (eps_c - eps_u)``; ``<= 1`` switches
                CFG off (only the conditional pass runs).
            num_images_per_prompt: images per prompt (rows are prompt-major).
            generator: torch generator(s) for the initial noise (and DDIM noise if eta > 0).
            output_type: ``"np"`` -> float32 numpy ``[N, H, W, 3]`` in [0, 1];
                ``"pt"`` -> tensor ``[N, 3, H, W]`` in [0, 1].
            negative_prompt: the unconditional prompt(s), ``""`` by default.
            latents: optional starting noise ``[N, 3, H, W]``.
            cross_attention_kwargs: forwarded to the UNet's attention processors.
            callback: called as ``callback(step_index, t, x_t)`` after every step.

        Returns:
            ``ImagePipelineOutput(images=...)`` or ``(images,)`` if ``return_dict=False``.
            The CFG batch layout used is in ``self.last_cfg_layout`` (module docstring).
        """
        if output_type not in ("np", "pt"):
            raise ValueError(f"output_type must be 'np' or 'pt', got {output_type!r}")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise ValueError("prompt must be a non-empty string or list of strings")
        device = self._execution_device
        do_cfg = uses_cfg(guidance_scale)
        n = len(prompts) * num_images_per_prompt
        per_image = [p for p in prompts for _ in range(num_images_per_prompt)]

        cond = self.encode_prompt(per_image, device)
        if do_cfg:
            neg = negative_prompt if negative_prompt is not None else ""
            neg_list = [neg] * len(prompts) if isinstance(neg, str) else list(neg)
            if len(neg_list) != len(prompts):
                raise ValueError(f"negative_prompt has {len(neg_list)} entries for {len(prompts)} prompts")
            uncond = self.encode_prompt([p for p in neg_list for _ in range(num_images_per_prompt)], device)
            context = torch.cat([uncond, cond])
        else:
            context = cond

        c = self.unet.config.in_channels
        s = self.image_size
        if latents is None:
            x = randn_tensor((n, c, s, s), generator=generator, device=device, dtype=self.unet.dtype)
        else:
            if tuple(latents.shape) != (n, c, s, s):
                raise ValueError(f"latents must have shape {(n, c, s, s)}, got {tuple(latents.shape)}")
            x = latents.to(device=device, dtype=self.unet.dtype)
        x = x * self.scheduler.init_noise_sigma

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        self.last_cfg_layout = {
            "do_cfg": do_cfg,
            "batch_size": 2 * n if do_cfg else n,
            "num_images": n,
            "uncond_slice": slice(0, n) if do_cfg else None,
            "cond_slice": slice(n, 2 * n) if do_cfg else slice(0, n),
            "order": ["uncond", "cond"] if do_cfg else ["cond"],
            "guidance_scale": float(guidance_scale),
            "prompts": per_image,
            "timesteps": [int(t) for t in self.scheduler.timesteps],
        }
        # use_clipped_model_output: with clip_sample, re-derive the noise from the clipped x0.
        # Without it the DDIM step mixes a clipped x0 with the unclipped noise, and under strong
        # guidance the noise term carries the guided change with the opposite sign: colours flip.
        extra = (
            {"eta": eta, "generator": generator, "use_clipped_model_output": True}
            if isinstance(self.scheduler, DDIMScheduler) else {}
        )
        for i, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
            inp = cfg_batch(x) if do_cfg else x
            inp = self.scheduler.scale_model_input(inp, t)
            eps = self.unet(
                inp, t, encoder_hidden_states=context, cross_attention_kwargs=cross_attention_kwargs
            ).sample
            if do_cfg:
                eps = cfg_split(eps, guidance_scale)
            x = self.scheduler.step(eps, t, x, **extra).prev_sample
            if callback is not None:
                callback(i, int(t), x)

        images = (x.float() / 2 + 0.5).clamp(0, 1)
        if output_type == "np":
            images = images.cpu().permute(0, 2, 3, 1).numpy().astype(np.float32)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)
