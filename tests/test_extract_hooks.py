"""Hooked activations equal those of an unhooked forward run by hand, module by module.

The oracle calls the denoiser's submodules in order (conv_in, time embedding, down blocks,
mid block, up blocks with their skip connections, output head) without any hook, checks that
this chain reproduces ``denoiser(...).sample`` exactly, and compares every intermediate with
what :class:`ActivationCapture` recorded during a normal forward pass.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from diffatlas.activations.hooks import ActivationCapture, token_grid
from diffatlas.activations.layers import layer_aliases, resolve_layers
from diffatlas.errors import UserError
from diffatlas.models.loader import load_model
from diffatlas.models.tiny import make_tiny_model

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {fam: load_model(make_tiny_model(fam, root / fam)) for fam in ("pixel", "sd", "dit")}


def manual_unet(unet, x, t, ehs):
    """The UNet2DConditionModel forward as a chain of its submodules: {alias: output}, final."""
    out = {}
    emb = unet.time_embedding(unet.time_proj(t).to(x.dtype))
    h = unet.conv_in(x)
    skips = (h,)
    for i, blk in enumerate(unet.down_blocks):
        if getattr(blk, "has_cross_attention", False):
            h, res = blk(hidden_states=h, temb=emb, encoder_hidden_states=ehs)
        else:
            h, res = blk(hidden_states=h, temb=emb)
        out[f"down_ft{i}"] = h
        skips += res
    h = unet.mid_block(h, emb, encoder_hidden_states=ehs)
    out["mid"] = h
    for i, blk in enumerate(unet.up_blocks):
        res, skips = skips[-len(blk.resnets):], skips[: -len(blk.resnets)]
        if getattr(blk, "has_cross_attention", False):
            h = blk(hidden_states=h, temb=emb, res_hidden_states_tuple=res, encoder_hidden_states=ehs)
        else:
            h = blk(hidden_states=h, temb=emb, res_hidden_states_tuple=res)
        out[f"up_ft{i}"] = h
    final = unet.conv_out(unet.conv_act(unet.conv_norm_out(h)))
    return out, final


def manual_dit(dit, x, t, y):
    """DiTTransformer2DModel as a chain: {block{i}: [B, C, h, w] maps}, final output."""
    p = dit.config.patch_size
    gh, gw = x.shape[-2] // p, x.shape[-1] // p
    tok = dit.pos_embed(x)
    out = {}
    for i, blk in enumerate(dit.transformer_blocks):
        tok = blk(tok, timestep=t, class_labels=y)
        # Independent reshape: tokens are row-major patches.
        out[f"block{i}"] = tok.reshape(tok.shape[0], gh, gw, tok.shape[2]).permute(0, 3, 1, 2)
    cond = dit.transformer_blocks[0].norm1.emb(t, y, hidden_dtype=tok.dtype)
    shift, scale = dit.proj_out_1(F.silu(cond)).chunk(2, dim=1)
    h = dit.norm_out(tok) * (1 + scale[:, None]) + shift[:, None]
    h = dit.proj_out_2(h)
    c = dit.out_channels
    h = h.reshape(-1, gh, gw, p, p, c)
    final = torch.einsum("nhwpqc->nchpwq", h).reshape(-1, c, gh * p, gw * p)
    return out, final


def _inputs(handle, b=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, handle.latent_channels, handle.latent_size, handle.latent_size, generator=g)
    t = torch.tensor([10, 400, 999][:b])
    return x, t


@pytest.mark.parametrize("family", ["pixel", "sd"])
@pytest.mark.parametrize("stop_early", [True, False])
def test_unet_hooks_match_manual_chain(models, family, stop_early):
    h = models[family]
    unet = h.denoiser
    x, t = _inputs(h)
    cond = h.conditioning(["a red circle", "", "a blue square"])
    with torch.no_grad():
        ref, final = manual_unet(unet, x, t, cond["encoder_hidden_states"])
        plain = unet(x, t, **cond).sample
    torch.testing.assert_close(final, plain, rtol=0, atol=1e-5)  # the oracle is the real forward

    names = list(layer_aliases(unet))
    layers = resolve_layers(unet, names)
    with torch.no_grad(), ActivationCapture(
        unet, layers, spatial_layers=names, spatial_max_size=None, spatial_dtype=torch.float32, stop_early=stop_early
    ) as cap:
        got = cap.run(h.predict_noise, x, t, cond)
    assert set(got) == set(ref)
    for name, want in ref.items():
        torch.testing.assert_close(got[name].spatial, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got[name].pooled, want.mean(dim=(2, 3)), rtol=1e-5, atol=1e-5)
    # Hooks are gone after the block: nothing left on any module.
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in unet.modules())


def test_dit_blocks_are_token_grids(models):
    h = models["dit"]
    dit = h.denoiser
    x, t = _inputs(h)
    y = torch.tensor([0, 5, 1000])  # two classes and the null class
    with torch.no_grad():
        ref, final = manual_dit(dit, x, t, y)
        plain = dit(x, t, class_labels=y).sample
    torch.testing.assert_close(final, plain, rtol=0, atol=1e-5)
    layers = resolve_layers(dit, ["block0", "block1"])
    with torch.no_grad(), ActivationCapture(dit, layers, spatial_layers=["block0", "block1"], spatial_max_size=4,
                                            spatial_dtype=torch.float32, pooling="sum") as cap:
        got = cap.run(h.predict_noise, x, t, {"class_labels": y})
    for name, want in ref.items():
        assert want.shape[-2:] == (8, 8)
        torch.testing.assert_close(got[name].pooled, want.sum(dim=(2, 3)), rtol=1e-5, atol=1e-4)
        # The cap averages 2x2 cells: 8x8 -> 4x4.
        torch.testing.assert_close(got[name].spatial, F.avg_pool2d(want, 2), rtol=1e-5, atol=1e-5)


def test_cap_and_fp16_maps(models):
    h = models["pixel"]
    x, t = _inputs(h, b=2)
    cond = h.conditioning(None)
    layers = resolve_layers(h.denoiser, ["up_ft2"])  # full resolution, 32x32
    with torch.no_grad():
        ref, _ = manual_unet(h.denoiser, x, t, cond["encoder_hidden_states"].expand(2, -1, -1))
        with ActivationCapture(h.denoiser, layers, spatial_layers=["up_ft2"], spatial_max_size=5) as cap:
            got = cap.run(h.predict_noise, x, t, cond)["up_ft2"]
    assert got.spatial.dtype == torch.float16 and got.spatial.shape == (2, 16, 5, 5)
    want = F.adaptive_avg_pool2d(ref["up_ft2"], (5, 5))
    torch.testing.assert_close(got.spatial.float(), want, rtol=1e-2, atol=1e-2)


def test_hooks_removed_on_error(models):
    h = models["pixel"]
    unet = h.denoiser
    layers = resolve_layers(unet, ["mid", "up_ft0"])
    x, t = _inputs(h, b=1)

    def boom(*args, **kwargs):
        h.predict_noise(*args, **kwargs)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        with ActivationCapture(unet, layers, stop_early=False) as cap:
            cap.run(boom, x, t, h.conditioning(None))
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in unet.modules())


def test_module_that_runs_twice_is_refused(models):
    h = models["pixel"]
    unet = h.denoiser
    # A ResnetBlock2D applies its one activation module twice per call.
    layers = resolve_layers(unet, ["up_blocks.0.resnets.0.nonlinearity"])
    x, t = _inputs(h, b=1)
    with torch.no_grad(), ActivationCapture(unet, layers) as cap:
        with pytest.raises(UserError, match="more than once"):
            cap.run(h.predict_noise, x, t, h.conditioning(None))


def test_attention_tokens_and_vectors(models):
    """Attention outputs [B, N, C] go back on their grid; an embedding [B, C] is pooled as is."""
    h = models["pixel"]
    unet = h.denoiser
    layers = resolve_layers(unet, ["mid_block.attentions.0.transformer_blocks.0.attn2", "time_embedding"])
    x, t = _inputs(h, b=2)
    grabbed = {}
    handle = unet.mid_block.attentions[0].transformer_blocks[0].attn2.register_forward_hook(
        lambda m, i, o: grabbed.setdefault("attn2", o.clone()))
    try:
        with torch.no_grad(), ActivationCapture(unet, layers, spatial_layers=[layers[0].name], spatial_max_size=None,
                                                spatial_dtype=torch.float32) as cap:
            got = cap.run(h.predict_noise, x, t, h.conditioning(None))
    finally:
        handle.remove()
    tok = grabbed["attn2"]  # [B, 64, C] at the 8x8 bottleneck
    assert tok.shape[1] == 64
    want = tok.reshape(2, 8, 8, -1).permute(0, 3, 1, 2)
    torch.testing.assert_close(got[layers[0].name].spatial, want)
    emb = unet.time_embedding(unet.time_proj(t))
    torch.testing.assert_close(got["time_embedding"].pooled, emb, rtol=1e-6, atol=1e-6)


def test_token_grid():
    assert token_grid(64, 16, 16) == (8, 8)  # DiT patch 2
    assert token_grid(12, 8, 6) == (4, 3)  # non-square
    assert token_grid(20, 9, 7) == (5, 4)  # ceil division (stride-2 convs on odd sizes)
    with pytest.raises(ValueError):
        token_grid(7, 16, 16)


def test_resolve_aliases_globs_and_duplicates(models):
    unet = models["pixel"].denoiser  # 3 down blocks, mid, 3 up blocks
    assert layer_aliases(unet) == {
        "down_ft0": "down_blocks.0", "down_ft1": "down_blocks.1", "down_ft2": "down_blocks.2", "mid": "mid_block",
        "up_ft0": "up_blocks.0", "up_ft1": "up_blocks.1", "up_ft2": "up_blocks.2",
    }
    got = resolve_layers(unet, ["up_ft1", "up_blocks.1.attentions.*.transformer_blocks.0.attn?", "mid_block", "mid"])
    glob = "up_blocks.1.attentions.*.transformer_blocks.0.attn?"
    # Up blocks have layers_per_block + 1 = 2 attention modules, each with attn1 and attn2.
    hits = [f"up_blocks.1.attentions.{i}.transformer_blocks.0.attn{j}" for i in (0, 1) for j in (1, 2)]
    assert [(x.name, x.module_path, x.selection) for x in got] == [
        ("up_ft1", "up_blocks.1", "up_ft1"),
        *[(h, h, glob) for h in hits],
        ("mid_block", "mid_block", "mid_block"),  # "mid" is the same module: kept once
    ]
    dit = models["dit"].denoiser
    assert layer_aliases(dit) == {"block0": "transformer_blocks.0", "block1": "transformer_blocks.1"}
    with pytest.raises(UserError, match=r"'block2'.*available aliases: block0, block1"):
        resolve_layers(dit, ["block2"])
    with pytest.raises(UserError, match="empty"):
        resolve_layers(dit, [])

