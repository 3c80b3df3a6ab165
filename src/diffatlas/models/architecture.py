"""Config factories for the ShapesWorld model: a small Stable-Diffusion-shaped network.

The ShapesWorld model uses SD's own classes (``UNet2DConditionModel`` with cross-attention
``attn2`` blocks, ``CLIPTextModel``) so that every analysis hooks the very module paths it
hooks on SD1.5 (``down_blocks.1.attentions.0...attn2``, ``mid_block``, ``up_blocks``).
Only the sizes differ. These functions return plain config dicts so that a caller (the
world-model trainer, :mod:`diffatlas.models.tiny`, tests) can override any field.

Design (see DESIGN.md, "facts learned"): at 32x32 pixels on 2 CPU cores, attention at full
resolution costs most of the training time, so cross-attention transformer blocks sit only at
16x16 and 8x8 and in the mid block (8x8). The default (32, 64, 64) channels with one layer
per block give about 1.7M parameters.
"""

from __future__ import annotations

from typing import Any

from diffatlas.errors import UserError


def world_unet_config(
    image_size: int = 32,
    *,
    in_channels: int = 3,
    block_out_channels: tuple[int, ...] = (32, 64, 64),
    layers_per_block: int = 1,
    cross_attention_dim: int = 64,
    num_attention_heads: int = 4,
    norm_num_groups: int = 16,
    **overrides: Any,
) -> dict[str, Any]:
    """Config of a pixel-space ``UNet2DConditionModel`` for ``image_size`` x ``image_size`` RGB.

    The first (full-resolution) block is a plain ``DownBlock2D``/``UpBlock2D``; every deeper
    block, and the mid block, has cross-attention to the text encoder's hidden states
    (``cross_attention_dim`` must equal the text encoder's ``hidden_size``).

    Shapes: ``unet(x [B, in_channels, S, S], t [B], encoder_hidden_states [B, 77, D]).sample``
    is ``[B, in_channels, S, S]``.
    """
    n = len(block_out_channels)
    if n < 2:
        raise UserError(f"block_out_channels must have at least 2 entries, got {block_out_channels}")
    if image_size % (2 ** (n - 1)) != 0:
        raise UserError(
            f"image_size {image_size} must be divisible by 2**(len(block_out_channels)-1) = {2 ** (n - 1)}"
        )
    for c in block_out_channels:
        if c % norm_num_groups:
            raise UserError(f"block_out_channels {block_out_channels} must be multiples of norm_num_groups={norm_num_groups}")
        if c % num_attention_heads:
            raise UserError(f"block_out_channels {block_out_channels} must be multiples of num_attention_heads={num_attention_heads}")
    down = ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1)
    up = ("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",)
    cfg: dict[str, Any] = dict(
        sample_size=image_size,
        in_channels=in_channels,
        out_channels=in_channels,
        block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block,
        down_block_types=down,
        up_block_types=up,
        mid_block_type="UNetMidBlock2DCrossAttn",
        cross_attention_dim=cross_attention_dim,
        # diffusers calls the number of heads ``attention_head_dim`` for historical reasons;
        # setting it (and not ``num_attention_heads``, which UNet2DConditionModel rejects)
        # gives ``num_attention_heads`` heads per attention layer.
        attention_head_dim=num_attention_heads,
        norm_num_groups=norm_num_groups,
    )
    cfg.update(overrides)
    return cfg


def world_text_encoder_config(
    vocab_size: int,
    *,
    hidden_size: int = 64,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    intermediate_size: int | None = None,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """Config (kwargs of ``transformers.CLIPTextConfig``) of a small CLIP text encoder.

    ``vocab_size`` is ``len(tokenizer)``. Token ids default to the layout of
    :func:`diffatlas.models.tokenizer.build_world_tokenizer` (BOS, EOS the last two ids,
    PAD = EOS), so ``CLIPTextModel``'s pooled output reads the end-of-text position.
    Hidden states are ``[B, 77, hidden_size]``.
    """
    if vocab_size < 3:
        raise UserError(f"vocab_size must be at least 3, got {vocab_size}")
    eos = vocab_size - 1 if eos_token_id is None else eos_token_id
    cfg: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 2 * hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        max_position_embeddings=77,
        projection_dim=hidden_size,
        hidden_act="quick_gelu",
        bos_token_id=vocab_size - 2 if bos_token_id is None else bos_token_id,
        eos_token_id=eos,
        pad_token_id=eos if pad_token_id is None else pad_token_id,
    )
    cfg.update(overrides)
    return cfg
