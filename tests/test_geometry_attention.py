"""The Jacobian's chunked attention: exact (values, JVPs, VJPs) against the whole-matrix one."""

from __future__ import annotations

import pytest
import torch

from diffatlas.errors import UserError
from diffatlas.geometry.jacobian import ChunkedAttnProcessor, PullbackMap, forward_ad_safe_attention, top_singular

torch.set_num_threads(1)


def _attention(cross: bool, group_norm: bool, upcast: bool):
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    return Attention(query_dim=16, heads=2, dim_head=8, cross_attention_dim=12 if cross else None,
                     norm_num_groups=4 if group_norm else None, residual_connection=group_norm,
                     upcast_attention=upcast, bias=True).eval().requires_grad_(False)


def _reference(attn, x, ctx):
    """softmax(Q Kᵀ / sqrt(d)) V per head, written out from the module's own weights."""
    B, N, _ = x.shape
    ctx = x if ctx is None else ctx
    h = attn.heads
    q = attn.to_q(x).view(B, N, h, -1).transpose(1, 2)
    k = attn.to_k(ctx).view(B, ctx.shape[1], h, -1).transpose(1, 2)
    v = attn.to_v(ctx).view(B, ctx.shape[1], h, -1).transpose(1, 2)
    w = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
    return attn.to_out[0]((w @ v).transpose(1, 2).reshape(B, N, -1))


@pytest.mark.parametrize("cross", [False, True])
@pytest.mark.parametrize("chunk", [1, 3, 7, 64])
def test_chunked_equals_written_out_attention(cross, chunk):
    attn = _attention(cross, group_norm=False, upcast=False)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 10, 16, generator=g, dtype=torch.float64)
    ctx = torch.randn(2, 5, 12, generator=g, dtype=torch.float64) if cross else None
    attn = attn.double()
    attn.set_processor(ChunkedAttnProcessor(chunk))
    torch.testing.assert_close(attn(x, encoder_hidden_states=ctx), _reference(attn, x, ctx), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cross, group_norm, upcast, masked", [
    (False, False, False, False), (True, False, True, False), (False, True, False, False), (True, False, False, True),
])
def test_chunked_values_and_jvps_equal_the_whole_matrix(cross, group_norm, upcast, masked):
    from diffusers.models.attention_processor import AttnProcessor

    attn = _attention(cross, group_norm, upcast)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 16, 3, 4, generator=g) if group_norm else torch.randn(2, 12, 16, generator=g)
    ctx = torch.randn(2, 6, 12, generator=g) if cross else None
    mask = None
    if masked:  # key padding: the last two text tokens masked out
        mask = torch.zeros(2, 1, 6)  # [B, 1, N_k], as UNet2DConditionModel passes it
        mask[..., -2:] = -1e4
    tangents = torch.randn(5, *x.shape, generator=g)

    def run(processor):
        attn.set_processor(processor)

        def f(z):
            return attn(z, encoder_hidden_states=ctx, attention_mask=mask)

        value = f(x)
        jvps = torch.func.vmap(lambda t: torch.func.jvp(f, (x,), (t,))[1])(tangents)
        _, pullback = torch.func.vjp(f, x)
        vjps = torch.func.vmap(lambda c: pullback(c)[0])(jvps)
        return value, jvps, vjps

    whole = run(AttnProcessor())
    for chunk in (1, 5, 1000):
        for a, b in zip(run(ChunkedAttnProcessor(chunk)), whole):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_pullback_basis_identical_with_chunked_attention():
    """The whole map through a tiny latent U-Net (self-attention over 8x8 = 64 tokens)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8, attention_head_dim=2, norm_num_groups=4,
    ).eval().requires_grad_(False)
    ctx = torch.randn(1, 5, 8)

    def predict(x):
        return unet(x, torch.full((x.shape[0],), 400), encoder_hidden_states=ctx.expand(x.shape[0], -1, -1)).sample

    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    for pooling in ("sum", "none"):
        fmap = PullbackMap(unet, predict, "mid", pooling)
        kw = dict(oversample=2, tol=1e-30, max_iters=3)
        whole = top_singular(fmap, x, 3, attention_chunk=None, generator=torch.Generator().manual_seed(0), **kw)
        chunked = top_singular(fmap, x, 3, attention_chunk=7, generator=torch.Generator().manual_seed(0), **kw)
        assert float(((chunked.s - whole.s).abs() / whole.s).max()) < 1e-5
        assert float((chunked.v * whole.v).flatten(2).sum(-1).abs().min()) > 1 - 1e-4  # same directions


def test_bad_chunk_is_a_clear_error():
    with pytest.raises(UserError, match="attention query chunk 0"):
        ChunkedAttnProcessor(0)
    unet = _attention(False, False, False)
    with pytest.raises(UserError):
        with forward_ad_safe_attention(unet, query_chunk=-1):
            raise AssertionError("the context was entered with query_chunk -1")


def test_feed_forward_in_token_blocks_equals_written_out_geglu():
    """Inside the context a transformer feed-forward runs on blocks of tokens (here 3 of 10:
    a short last block); values and JVPs equal GEGLU written out, and the module is restored."""
    from diffusers.models.attention import FeedForward

    torch.manual_seed(0)
    ff = FeedForward(16, activation_fn="geglu").eval().requires_grad_(False).double()
    holder = torch.nn.Sequential(ff)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 10, 16, generator=g, dtype=torch.float64)
    tangents = torch.randn(4, *x.shape, generator=g, dtype=torch.float64)

    def reference(z):
        hidden, gate = ff.net[0].proj(z).chunk(2, dim=-1)
        return ff.net[2](hidden * torch.nn.functional.gelu(gate))

    calls = []
    inner = ff.net[0].register_forward_hook(lambda m, i, o: calls.append(i[0].shape[1]))
    with forward_ad_safe_attention(holder, query_chunk=3):
        value = ff(x)
        jvps = torch.func.vmap(lambda t: torch.func.jvp(ff, (x,), (t,))[1])(tangents)
    assert calls[:4] == [3, 3, 3, 1]  # the blocks the projection saw
    ref_jvps = torch.func.vmap(lambda t: torch.func.jvp(reference, (x,), (t,))[1])(tangents)
    torch.testing.assert_close(value, reference(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(jvps, ref_jvps, rtol=1e-12, atol=1e-12)
    calls.clear()
    ff(x)
    inner.remove()
    assert "forward" not in ff.__dict__ and calls == [10]  # restored: all tokens at once again


def test_large_host_blocks_are_returned_on_linux():
    """The allocator setting the Jacobian makes on the CPU takes on glibc (and is idempotent)."""
    import platform

    from diffatlas.accel import return_large_host_blocks

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip("mallopt is glibc's")
    assert return_large_host_blocks() is True
    assert return_large_host_blocks() is True
