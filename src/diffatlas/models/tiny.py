"""Tiny randomly initialised models of every family, for tests and dry runs.

Like diffusers' own test suites, each model is built from a small config (no weights are
downloaded) and saved with ``save_pretrained`` in safetensors, so tests exercise the real
loading path of :func:`diffatlas.models.loader.load_model`. Building one takes well under a
second of CPU; every model is 32x32 pixels.

Families and what they mirror:

* ``"pixel"``: a :class:`~diffatlas.models.pipeline.ShapesWorldPipeline` with the (shrunken)
  ShapesWorld architecture of :mod:`diffatlas.models.architecture`.
* ``"sd"``: ``StableDiffusionPipeline``. The UNet keeps SD1.x's *block structure* (four down
  blocks, cross-attention in the first three, ``up_blocks.0`` plain and ``up_blocks.1-3`` with
  cross-attention) so layer aliases such as ``up_ft0..3`` resolve as on SD1.5; latents are
  4x16x16 and a 2-level VAE (scale factor 2) maps them to 32x32 pixels.
* ``"sd-v"``: the same with a v-prediction scheduler (``prediction_type="v_prediction"``),
  as SD2.x 768 models; it loads as family ``"sd"``.
* ``"sdxl"``: ``StableDiffusionXLPipeline`` with SDXL's structure (three blocks, attention
  in the two deeper ones, two text encoders, ``addition_embed_type="text_time"``).
* ``"dit"``: ``DiTPipeline`` with a 2-layer ``DiTTransformer2DModel`` (patch 2, learned sigma:
  ``out_channels = 2 * in_channels``). It has 1000 classes, like ImageNet DiT, because
  ``DiTPipeline.__call__`` hard-codes the null class id 1000 for guidance; ``id2label`` is
  written to ``model_index.json`` (``"0": "class_0"``, ...; the first ten are named after
  ShapesWorld-like words so label lookup can be tested).
* ``"sd3"``: ``StableDiffusion3Pipeline`` with a 2-block ``SD3Transformer2DModel`` (patch 2,
  joint text-image attention; the last block is ``context_pre_only`` as in SD3), CLIP-L and
  CLIP-G (with projection; hidden 16 each, so their concatenation is exactly T5's width 32)
  and a ``T5EncoderModel`` with the offline T5-style tokenizer
  (:func:`~diffatlas.models.tokenizer.build_t5_tokenizer`, 32 tokens), a VAE with SD3's
  ``shift_factor``, and SD3's ``FlowMatchEulerDiscreteScheduler`` (shift 3). Latents 4x16x16.
* ``"flux"``: ``FluxPipeline`` with a ``FluxTransformer2DModel`` of one double-stream and one
  single-stream block (guidance-embedded, like FLUX.1-dev), CLIP (pooled) + T5, and Flux's
  dynamically shifted flow-matching scheduler. Latents 4x16x16, packed 2x2 into 8x8 = 64
  image tokens of 16 channels.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from diffatlas.errors import UserError

log = logging.getLogger(__name__)

#: Families with DDPM-family schedulers (integer steps with ᾱ) and with flow matching (σ).
DDPM_FAMILIES = ("sd", "sd-v", "sdxl", "dit", "pixel")
FLOW_FAMILIES = ("sd3", "flux")
FAMILIES = DDPM_FAMILIES + FLOW_FAMILIES

#: Words of the tiny models' tokenizer (a superset of typical ShapesWorld captions).
TINY_WORDS = (
    "a an the and of with small large big red green blue yellow circle square triangle "
    "left right above below next to on in photo picture dog cat"
).split()

#: The first DiT class names (the rest are ``class_<i>``).
DIT_NAMED_CLASSES = ["red circle", "green circle", "blue circle", "yellow circle", "red square",
                     "green square", "blue square", "yellow square", "red triangle", "green triangle"]
DIT_NUM_CLASSES = 1000


def _text_encoder(tokenizer, hidden: int, with_projection: bool = False, projection_dim: int | None = None):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from diffatlas.models.architecture import world_text_encoder_config

    cfg = CLIPTextConfig(
        **world_text_encoder_config(
            len(tokenizer),
            hidden_size=hidden,
            num_hidden_layers=2,
            num_attention_heads=2,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            projection_dim=projection_dim or hidden,
        )
    )
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(cfg).eval()


def _vae(latent_channels: int = 4, **overrides):
    from diffusers import AutoencoderKL

    # Two levels: vae_scale_factor = 2 -> 16x16 latents for 32x32 images.
    return AutoencoderKL(
        **overrides,
        block_out_channels=(16, 32),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=latent_channels,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=32,
    )


def _sd_scheduler(prediction_type: str = "epsilon"):
    from diffusers import DDIMScheduler

    # SD1.x's scheduler settings (scaled-linear betas, 1000 steps, offset 1); SD2.x 768 models
    # differ only by prediction_type="v_prediction".
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )


def _make_pixel():
    from diffusers import DDIMScheduler, UNet2DConditionModel

    from diffatlas.models.architecture import world_unet_config
    from diffatlas.models.pipeline import ShapesWorldPipeline
    from diffatlas.models.tokenizer import build_world_tokenizer

    tok = build_world_tokenizer(TINY_WORDS)
    te = _text_encoder(tok, hidden=32)
    unet = UNet2DConditionModel(
        **world_unet_config(32, block_out_channels=(16, 32, 32), cross_attention_dim=32,
                            num_attention_heads=2, norm_num_groups=8)
    )
    sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=True,
                          prediction_type="epsilon")
    return ShapesWorldPipeline(unet=unet, text_encoder=te, tokenizer=tok, scheduler=sched)


def _make_sd(prediction_type: str = "epsilon"):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from diffatlas.models.tokenizer import build_world_tokenizer

    tok = build_world_tokenizer(TINY_WORDS)
    te = _text_encoder(tok, hidden=32)
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 16, 32, 32),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=2,
        norm_num_groups=8,
    )
    return StableDiffusionPipeline(
        vae=_vae(), text_encoder=te, tokenizer=tok, unet=unet, scheduler=_sd_scheduler(prediction_type),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def _make_sdxl():
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    from diffatlas.models.tokenizer import build_world_tokenizer

    tok = build_world_tokenizer(TINY_WORDS)
    tok2 = build_world_tokenizer(TINY_WORDS)
    te1 = _text_encoder(tok, hidden=32)
    te2 = _text_encoder(tok2, hidden=32, with_projection=True, projection_dim=32)
    time_dim = 8
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2),
        attention_head_dim=(2, 2, 4),
        use_linear_projection=True,
        cross_attention_dim=te1.config.hidden_size + te2.config.hidden_size,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        # pooled text embeds (projection_dim) + 6 time ids, each embedded in time_dim.
        projection_class_embeddings_input_dim=te2.config.projection_dim + 6 * time_dim,
        norm_num_groups=8,
    )
    return StableDiffusionXLPipeline(
        vae=_vae(), text_encoder=te1, text_encoder_2=te2, tokenizer=tok, tokenizer_2=tok2, unet=unet,
        scheduler=_sd_scheduler(), force_zeros_for_empty_prompt=True, add_watermarker=False,
    )


def dit_id2label() -> dict[int, str]:
    """Class names of the tiny DiT (1000 classes, the first ten ShapesWorld-like)."""
    return {i: (DIT_NAMED_CLASSES[i] if i < len(DIT_NAMED_CLASSES) else f"class_{i}") for i in range(DIT_NUM_CLASSES)}


def _make_dit():
    from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    transformer = DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,  # learned sigma: [eps, variance] channels
        num_layers=2,
        sample_size=16,
        patch_size=2,
        num_embeds_ada_norm=DIT_NUM_CLASSES,
        norm_type="ada_norm_zero",
        norm_elementwise_affine=False,
    )
    sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False)
    id2label = dit_id2label()
    pipe = DiTPipeline(transformer=transformer, vae=_vae(), scheduler=sched, id2label=id2label)
    # DiTPipeline does not register id2label itself; real DiT checkpoints carry it in
    # model_index.json, from where from_pretrained passes it back to __init__.
    pipe.register_to_config(id2label={str(k): v for k, v in id2label.items()})
    return pipe


def _t5_encoder(tokenizer, d_model: int = 32):
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(vocab_size=len(tokenizer), d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=2, num_heads=4,
                   relative_attention_num_buckets=8, pad_token_id=tokenizer.pad_token_id,
                   eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id)
    return T5EncoderModel(cfg).eval()


def _make_sd3():
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    from diffatlas.models.tokenizer import build_t5_tokenizer, build_world_tokenizer

    tok, tok2, tok3 = build_world_tokenizer(TINY_WORDS), build_world_tokenizer(TINY_WORDS), build_t5_tokenizer(TINY_WORDS)
    # CLIP-L and CLIP-G: hidden 16 each; SD3 pads their concatenation (32) to T5's width (32).
    te = _text_encoder(tok, hidden=16, with_projection=True, projection_dim=16)
    te2 = _text_encoder(tok2, hidden=16, with_projection=True, projection_dim=16)
    te3 = _t5_encoder(tok3, d_model=32)
    transformer = SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
        caption_projection_dim=16,  # = heads * head_dim, as in SD3
        pooled_projection_dim=32,  # CLIP-L + CLIP-G pooled projections
        pos_embed_max_size=16,
    )
    # SD3's scheduler: flow matching with shift 3; its VAE's scaling and shift factors.
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    vae = _vae(4, scaling_factor=1.5305, shift_factor=0.0609)
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=sched, vae=vae, text_encoder=te, tokenizer=tok,
        text_encoder_2=te2, tokenizer_2=tok2, text_encoder_3=te3, tokenizer_3=tok3,
    )


def _make_flux():
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    from diffatlas.models.tokenizer import build_t5_tokenizer, build_world_tokenizer

    tok, tok2 = build_world_tokenizer(TINY_WORDS), build_t5_tokenizer(TINY_WORDS)
    te = _text_encoder(tok, hidden=32)  # Flux reads CLIP's pooled output (hidden size)
    te2 = _t5_encoder(tok2, d_model=32)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16,  # 4 latent channels packed 2x2
        num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),  # sums to attention_head_dim
    )
    # FLUX.1's scheduler settings: resolution-dependent ("dynamic") shifting.
    sched = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096,
    )
    vae = _vae(4, scaling_factor=0.3611, shift_factor=0.1159)
    return FluxPipeline(transformer=transformer, scheduler=sched, vae=vae, text_encoder=te, tokenizer=tok,
                        text_encoder_2=te2, tokenizer_2=tok2)


_BUILDERS = {"pixel": _make_pixel, "sd": _make_sd, "sd-v": lambda: _make_sd("v_prediction"), "sdxl": _make_sdxl,
             "dit": _make_dit, "sd3": _make_sd3, "flux": _make_flux}


def make_tiny_model(family: str, path: str | os.PathLike, seed: int = 0) -> Path:
    """Build a tiny random model of ``family`` and save it to ``path`` (diffusers layout).

    Args:
        family: one of ``"sd"``, ``"sd-v"`` (v-prediction SD), ``"sdxl"``, ``"dit"``, ``"pixel"``,
            ``"sd3"``, ``"flux"``.
        path: output directory (created or replaced atomically).
        seed: torch seed of the random initialisation (same seed -> identical weights).

    Returns:
        ``Path(path)``, loadable with :func:`diffatlas.models.loader.load_model`.
    """
    from diffatlas.io import atomic_dir

    if family not in _BUILDERS:
        raise UserError(f"unknown model family {family!r}; allowed: {', '.join(FAMILIES)}")
    path = Path(path)
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        pipe = _BUILDERS[family]()
    finally:
        torch.random.set_rng_state(state)
    from diffatlas.models.loader import _quiet_loading

    with atomic_dir(path) as tmp, _quiet_loading():
        pipe.save_pretrained(str(tmp), safe_serialization=True)
    log.info("wrote tiny %s model to %s", family, path)
    return path
