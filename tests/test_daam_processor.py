"""The DAAM processor: same output as the stock processor, maps equal to hand-computed attention,
original processors restored (also on error), bad models rejected by name."""

from __future__ import annotations

import math

import pytest
import torch

from diffatlas.daam.processor import find_cross_attention, map_shape
from diffatlas.daam.trace import AttentionTracer, CFGLayout
from diffatlas.errors import UserError

torch.set_num_threads(1)


def tiny_unet(sample_size: int = 16, seed: int = 0, **overrides):
    """A small SD-shaped UNet built from config: cross-attention at 8x8 and 4x4 plus the mid block."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    cfg = dict(
        sample_size=sample_size,
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn",
        cross_attention_dim=24,
        attention_head_dim=4,
        norm_num_groups=8,
    )
    cfg.update(overrides)
    return UNet2DConditionModel(**cfg).eval()


def hand_attention(attn, hidden, context):
    """softmax(Q K^T / sqrt(d)) per head, summed over heads: [B, N, T] (plain maths, no diffusers helpers)."""
    q = hidden @ attn.to_q.weight.T
    k = context @ attn.to_k.weight.T
    b, n, inner = q.shape
    d = inner // attn.heads
    q = q.view(b, n, attn.heads, d).permute(0, 2, 1, 3)
    k = k.view(b, context.shape[1], attn.heads, d).permute(0, 2, 1, 3)
    scores = torch.einsum("bhnd,bhtd->bhnt", q, k) / math.sqrt(d)
    return torch.softmax(scores.double(), dim=-1).sum(1)


def test_output_equals_stock_and_restores_original_processors():
    unet = tiny_unet()
    # DAAM's default: the down and up blocks' cross-attention, not the mid block's (reference code)
    default = find_cross_attention(unet)
    assert default and not any(n.startswith("mid_block") for n in default)
    assert all(n.startswith(("down_blocks.", "up_blocks.")) and n.endswith("attn2") for n in default)
    modules = find_cross_attention(unet, ["*attn2"])
    assert set(modules) - set(default) == {n for n in modules if n.startswith("mid_block")} != set()
    before = {n: m.processor for n, m in modules.items()}
    x, t, ctx = torch.randn(3, 3, 16, 16), torch.tensor([300, 300, 300]), torch.randn(3, 7, 24)
    with torch.no_grad():
        ref = unet(x, t, ctx).sample
        with AttentionTracer(unet, ["*attn2"]) as tracer:
            out = unet(x, t, ctx).sample
            raw = tracer.collect(CFGLayout.batched(3, guidance=False))
            assert all(type(m.processor).__name__ == "DAAMAttnProcessor" for m in modules.values())
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert all(modules[n].processor is before[n] for n in modules)  # the very same objects
    # Every resolution incl. the bottleneck, sizes read from the 16x16 input: 8x8 (down_blocks.1, up_blocks.1) and 4x4.
    assert sorted(raw.maps) == [(4, 4), (8, 8)]
    assert raw.maps[(8, 8)].shape == (3, 7, 8, 8)
    assert any(name.startswith("mid_block") for name in raw.layers)
    # Each attention row sums to 1 over tokens: per query, the sum over tokens = heads x calls.
    assert torch.allclose(raw.maps[(4, 4)].sum(1), torch.full((3, 4, 4), float(raw.counts[(4, 4)])), atol=1e-4)


def test_recorded_maps_equal_hand_computed_attention():
    unet = tiny_unet(seed=1)
    modules = find_cross_attention(unet)
    captured: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def grab(name):
        def hook(mod, args, kwargs):
            captured[name] = (args[0].detach().clone(), kwargs["encoder_hidden_states"].detach().clone())

        return hook

    handles = [m.register_forward_pre_hook(grab(n), with_kwargs=True) for n, m in modules.items()]
    x, ctx = torch.randn(2, 3, 16, 16), torch.randn(2, 5, 24)
    try:
        with torch.no_grad(), AttentionTracer(unet) as tracer:
            unet(x, torch.tensor([10, 10]), ctx)
            raw = tracer.collect(CFGLayout.batched(2, guidance=False))
    finally:
        for h in handles:
            h.remove()
    expected: dict[tuple[int, int], torch.Tensor] = {}
    for name, (hidden, context) in captured.items():
        attn = modules[name]
        if attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        probs = hand_attention(attn, hidden, context)  # [B, N, T]
        side = int(math.isqrt(probs.shape[1]))
        m = probs.permute(0, 2, 1).reshape(2, probs.shape[2], side, side)
        expected[(side, side)] = expected.get((side, side), 0) + m
    assert sorted(expected) == sorted(raw.maps)
    for hw, m in expected.items():
        torch.testing.assert_close(raw.maps[hw].double(), m, rtol=1e-4, atol=1e-5)


def test_restores_processors_on_error_and_selects_layers_by_glob():
    unet = tiny_unet()
    modules = find_cross_attention(unet, ["*attn2"])
    before = {n: m.processor for n, m in modules.items()}
    with pytest.raises(ZeroDivisionError):
        with AttentionTracer(unet, ["*attn2"]):
            1 / 0
    assert all(modules[n].processor is before[n] for n in modules)
    only_mid = find_cross_attention(unet, ["mid_block.*attn2"])
    assert list(only_mid) == ["mid_block.attentions.0.transformer_blocks.0.attn2"]
    with torch.no_grad(), AttentionTracer(unet, ["mid_block.*attn2"]) as tracer:
        unet(torch.randn(1, 3, 16, 16), torch.tensor([5]), torch.randn(1, 4, 24))
        raw = tracer.collect(CFGLayout.batched(1, guidance=False))
    assert list(raw.maps) == [(4, 4)] and raw.counts[(4, 4)] == modules["mid_block.attentions.0.transformer_blocks.0.attn2"].heads


def test_time_resolved_steps_add_up_to_the_total():
    unet = tiny_unet()
    x, ctx = torch.randn(1, 3, 16, 16), torch.randn(1, 6, 24)
    with torch.no_grad(), AttentionTracer(unet, time_resolved=True) as tracer:
        for t in (900, 500, 100):
            unet(x, torch.tensor([t]), ctx)
        raw = tracer.collect(CFGLayout.batched(1, guidance=False))
    assert raw.timesteps == [900.0, 500.0, 100.0]
    for hw, total in raw.maps.items():
        steps = sum(raw.per_step[(s, *hw)].float() for s in range(3))
        torch.testing.assert_close(steps, total, rtol=2e-3, atol=2e-3)  # float16 storage


def test_non_square_latent_and_bad_models():
    assert map_shape(12, (6, 8)) == (3, 4)
    assert map_shape(15, (5, 9)) == (3, 5)  # ceil division, as stride-2 convs do
    assert map_shape(6, (5, 9)) == (2, 3)
    with pytest.raises(RuntimeError):
        map_shape(7, (8, 8))
    unet = tiny_unet()
    with pytest.raises(UserError, match="match none"):
        find_cross_attention(unet, ["nothing.*"])
    from diffusers import DiTTransformer2DModel

    dit = DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, num_layers=1, sample_size=8, patch_size=2, num_embeds_ada_norm=10
    )
    with pytest.raises(UserError, match="'my-dit' has no cross-attention"):
        AttentionTracer(dit, model_name="my-dit")
