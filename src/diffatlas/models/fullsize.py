"""Stable Diffusion at its published size, with random weights: real-size runs without downloads.

Speed and memory depend on the architecture, not on the weights, so a randomly initialised
copy of a published architecture measures what a user meets on the real checkpoint
(forward time, Jacobian memory, store sizes) on a machine that cannot download it.

Sizes (``make-tiny-model sd OUT --size SIZE``):

* ``sd15``: Stable Diffusion 1.5 - the UNet of ``stable-diffusion-v1-5`` (859.52M parameters:
  blocks 320/640/1280/1280, two layers per block, 8 heads, cross-attention to 768-d CLIP
  ViT-L/14 text states), its VAE (83.65M; 512 px <-> 4x64x64 latents) and CLIP ViT-L/14's
  text tower (123.06M; 12 layers, width 768); DDIM with SD1.x's scaled-linear betas, ε-prediction.
* ``sd2v``: Stable Diffusion 2.1 (768-v) - the UNet of ``stable-diffusion-2-1`` (865.91M:
  head widths 64 as 5/10/20/20 heads, linear projections, cross-attention to 1024-d
  OpenCLIP ViT-H/14 text states), the same VAE at 768 px (4x96x96 latents), OpenCLIP-H's
  text tower as diffusers ships it (23 layers, width 1024, GELU; 340.39M) and
  ``prediction_type = "v_prediction"``.

The tokenizer is the offline word-level one of the tiny models (a real BPE vocabulary
cannot be built without a download); the text encoder keeps CLIP's 49408-token embedding so
the parameter count is the published one. Building a model allocates it in full (about
3.5 GB of float32 for ``sd15``): for benches and GPU checks, never for tests - tests count
parameters on the ``meta`` device (:func:`build_pipeline` with ``device="meta"``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from diffatlas.errors import UserError

log = logging.getLogger(__name__)

SIZES = ("sd15", "sd2v")
"""Full-size architectures :func:`make_full_size_model` builds (``tiny`` is :mod:`diffatlas.models.tiny`)."""

CLIP_VOCAB_SIZE = 49408
"""CLIP's BPE vocabulary (the token embedding rows of every SD text encoder)."""


def unet_config(size: str) -> dict[str, Any]:
    """``UNet2DConditionModel`` kwargs of the published UNet of ``size``."""
    common: dict[str, Any] = dict(
        in_channels=4,
        out_channels=4,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        downsample_padding=1,
        flip_sin_to_cos=True,
        freq_shift=0,
        norm_num_groups=32,
        norm_eps=1e-5,
        act_fn="silu",
    )
    if size == "sd15":
        return {**common, "sample_size": 64, "cross_attention_dim": 768, "attention_head_dim": 8}
    if size == "sd2v":
        # diffusers' "attention_head_dim" here is the number of heads per block (64-wide heads).
        return {**common, "sample_size": 96, "cross_attention_dim": 1024, "attention_head_dim": (5, 10, 20, 20),
                "use_linear_projection": True, "upcast_attention": True}
    raise UserError(f"unknown model size {size!r}; allowed: tiny, {', '.join(SIZES)}")


def vae_config(size: str) -> dict[str, Any]:
    """``AutoencoderKL`` kwargs of SD's VAE (8x down-sampling, 4 latent channels)."""
    unet_config(size)  # validates size
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=32,
        act_fn="silu",
        sample_size=512 if size == "sd15" else 768,
        scaling_factor=0.18215,
    )


def text_encoder_config(size: str, tokenizer) -> dict[str, Any]:
    """``CLIPTextConfig`` kwargs: CLIP ViT-L/14 (sd15) or OpenCLIP ViT-H/14 (sd2v) text tower."""
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    if size == "sd15":
        return dict(vocab_size=CLIP_VOCAB_SIZE, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                    num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768, **ids)
    if size == "sd2v":
        return dict(vocab_size=CLIP_VOCAB_SIZE, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                    num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu", projection_dim=512, **ids)
    raise UserError(f"unknown model size {size!r}; allowed: tiny, {', '.join(SIZES)}")


def scheduler(size: str):
    """DDIM with SD's scaled-linear betas; ε-prediction for sd15, v-prediction for sd2v."""
    from diffusers import DDIMScheduler

    unet_config(size)
    return DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1,
        prediction_type="epsilon" if size == "sd15" else "v_prediction",
    )


def build_pipeline(size: str, device: str | torch.device = "cpu"):
    """A ``StableDiffusionPipeline`` of ``size`` with random weights, built on ``device``.

    ``device="meta"`` allocates nothing (shapes only): the way to count parameters in tests.
    """
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from diffatlas.models.tiny import TINY_WORDS
    from diffatlas.models.tokenizer import build_world_tokenizer

    tok = build_world_tokenizer(TINY_WORDS)
    with torch.device(device):
        unet = UNet2DConditionModel(**unet_config(size))
        vae = AutoencoderKL(**vae_config(size))
        te = CLIPTextModel(CLIPTextConfig(**text_encoder_config(size, tok))).eval()
    return StableDiffusionPipeline(
        vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=scheduler(size),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def make_full_size_model(size: str, path: str | os.PathLike, seed: int = 0,
                         dtype: torch.dtype = torch.float32) -> Path:
    """Build the random full-size model ``size`` and save it to ``path`` (diffusers layout).

    ``dtype`` is the precision of the saved weights (float16 halves the 3.4 GB of sd15);
    :func:`~diffatlas.models.loader.load_model` casts to its own ``dtype`` on load.
    """
    from diffatlas.io import atomic_dir
    from diffatlas.models.loader import _quiet_loading

    unet_config(size)
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        pipe = build_pipeline(size)
    finally:
        torch.random.set_rng_state(state)
    pipe.to(dtype=dtype)
    with atomic_dir(Path(path)) as tmp, _quiet_loading():
        pipe.save_pretrained(str(tmp), safe_serialization=True)
    log.info("wrote random %s model (%s) to %s", size, str(dtype).removeprefix("torch."), path)
    return Path(path)
