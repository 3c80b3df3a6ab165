"""Pullback Jacobian: subspace iteration vs the exact SVD of the full Jacobian (jacrev)."""

from __future__ import annotations

import pytest
import torch

from diffatlas.errors import UserError
from diffatlas.geometry.jacobian import (
    PullbackMap,
    check_timestep,
    forward_ad_safe_attention,
    full_jacobian,
    top_singular,
)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def micro():
    """A micro UNet2DConditionModel (8x8 RGB, cross-attention in the mid block) and its map."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=8, attention_head_dim=2, norm_num_groups=4,
    ).eval().requires_grad_(False)
    ctx = torch.randn(1, 5, 8)

    def predict(x):
        return unet(x, torch.full((x.shape[0],), 400), encoder_hidden_states=ctx.expand(x.shape[0], -1, -1)).sample

    return unet, predict


def _exact(fmap, x):
    jac = full_jacobian(fmap, x)
    u, s, vh = torch.linalg.svd(jac.double(), full_matrices=False)
    return u, s, vh


@pytest.mark.parametrize("pooling,n_samples", [("sum", 2), ("mean", 1), ("none", 1)])
def test_matches_exact_svd(micro, pooling, n_samples):
    unet, predict = micro
    fmap = PullbackMap(unet, predict, "mid", pooling)
    x = torch.randn(n_samples, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    n = 4
    basis = top_singular(fmap, x, n, oversample=4, tol=1e-4, max_iters=200, generator=torch.Generator().manual_seed(0))
    assert basis.converged
    assert basis.v.shape == (n_samples, n, 3, 8, 8) and basis.s.shape == (n_samples, n)
    for i in range(n_samples):
        u, s, vh = _exact(fmap, x[i : i + 1])
        rel = ((basis.s[i].double() - s[:n]).abs() / s[:n]).max().item()
        assert rel < 1e-3, (pooling, i, rel)
        cos_v = (vh[:n] * basis.v[i].reshape(n, -1).double()).sum(1).abs()
        cos_u = (u[:, :n].T * basis.u[i].double()).sum(1).abs()
        assert cos_v.min().item() > 0.99, cos_v
        assert cos_u.min().item() > 0.99, cos_u
        # u_i = J v_i / sigma_i
        jv = full_jacobian(fmap, x[i : i + 1]).double() @ basis.v[i].reshape(n, -1).double().T
        assert torch.allclose(jv / basis.s[i].double(), basis.u[i].double().T, atol=1e-4)


def test_vmap_and_loop_agree(micro):
    unet, predict = micro
    fmap = PullbackMap(unet, predict, "mid", "sum")
    x = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    kw = dict(oversample=1, tol=1e-9, max_iters=2)
    a = top_singular(fmap, x, 2, batching="vmap", generator=torch.Generator().manual_seed(0), **kw)
    b = top_singular(fmap, x, 2, batching="loop", generator=torch.Generator().manual_seed(0), **kw)
    assert a.iterations == b.iterations == 2
    assert torch.allclose(a.s, b.s, rtol=1e-5)
    assert torch.allclose(a.v, b.v, atol=1e-5)


def test_stops_at_the_layer(micro):
    unet, predict = micro
    fmap = PullbackMap(unet, predict, "mid", "sum")
    x = torch.randn(1, 3, 8, 8)
    fmap.check(x)  # the one full validation pass
    calls = []
    hook = unet.up_blocks[0].register_forward_hook(lambda *a: calls.append(1))
    try:
        h = fmap(x)
    finally:
        hook.remove()
    assert calls == []  # the up path never ran
    assert h.shape == (1, 16)


def test_attention_processors_restored_even_on_error(micro):
    unet, _ = micro
    before = {k: type(v) for k, v in unet.attn_processors.items()}
    with pytest.raises(RuntimeError):
        with forward_ad_safe_attention(unet):
            assert {type(v).__name__ for v in unet.attn_processors.values()} == {"ChunkedAttnProcessor"}
            raise RuntimeError("boom")
    assert {k: type(v) for k, v in unet.attn_processors.items()} == before


def test_bad_input_names_the_value(micro):
    unet, predict = micro
    fmap = PullbackMap(unet, predict, "mid", "sum")
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(UserError, match="193"):
        top_singular(fmap, x, 193)  # input dimension is 3*8*8 = 192
    with pytest.raises(UserError, match="at most 16"):
        top_singular(fmap, x, 17)  # sum-pooled mid has 16 channels
    with pytest.raises(UserError, match="no_such_block"):
        PullbackMap(unet, predict, "no_such_block")
    with pytest.raises(UserError, match="up_ft7"):
        PullbackMap(unet, predict, "up_ft7")
    with pytest.raises(UserError, match="1000"):
        check_timestep(1000, 1000)
    with pytest.raises(UserError, match="-1"):
        check_timestep(-1, 1000)
    assert check_timestep(999, 1000) == 999


def test_loaded_tiny_model(tmp_path):
    """The loader path: the tiny pixel model at a noisy timestep, against jacrev."""
    from diffatlas.models.loader import load_model
    from diffatlas.models.tiny import make_tiny_model

    handle = load_model(make_tiny_model("pixel", tmp_path / "pixel"))
    with pytest.raises(UserError, match="5000"):
        PullbackMap.from_handle(handle, 5000)
    fmap = PullbackMap.from_handle(handle, 700, layer="mid")
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    basis = top_singular(fmap, x, 1, oversample=3, tol=1e-3, max_iters=100, generator=torch.Generator().manual_seed(0))
    u, s, vh = _exact(fmap, x)
    assert abs(basis.s[0, 0].item() - s[0].item()) / s[0].item() < 1e-3
    assert abs((vh[0] * basis.v[0, 0].reshape(-1).double()).sum().item()) > 0.99
