"""Editing: parallel transport, the map back to X, x0 normalisation, geodesic shooting."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffatlas.geometry.editing import geodesic_shoot, h_to_x, linear_edits, parallel_transport, x0_normalise
from diffatlas.geometry.jacobian import PullbackBasis, PullbackMap, top_singular

torch.set_num_threads(1)


def _orth(p, n, d, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(p, d, n, generator=g)).Q.transpose(1, 2)  # [p, n, d]


def test_parallel_transport_is_unit_and_tangent():
    g = torch.Generator().manual_seed(0)
    u = torch.randn(5, 12, generator=g)
    u = u / u.norm(dim=1, keepdim=True)
    basis = _orth(5, 3, 12, 1)
    out = parallel_transport(u, basis)
    assert torch.allclose(out.norm(dim=1), torch.ones(5), atol=1e-6)
    tangent_part = torch.einsum("pn,pnd->pd", torch.einsum("pnd,pd->pn", basis, out), basis)
    assert torch.allclose(tangent_part, out, atol=1e-6)  # lies in the new tangent space
    # The transport is the closest unit vector in the space: it has the largest cosine with u.
    other = parallel_transport(torch.randn(5, 12, generator=g), basis)
    assert ((out * u).sum(1) >= (other * u).sum(1) - 1e-6).all()
    # A vector already in the space is unchanged.
    inside = basis[:, 0]
    assert torch.allclose(parallel_transport(inside, basis), inside, atol=1e-6)


def test_h_to_x_is_unit_and_maps_back():
    # A linear map with a known SVD: J = U S Vᵀ; the X direction of u_i is v_i.
    p, n, d, D = 2, 3, 6, 20
    u_b, v_b = _orth(p, n, d, 2), _orth(p, n, D, 3)
    s = torch.tensor([[3.0, 2.0, 1.0], [5.0, 4.0, 0.5]])
    basis = PullbackBasis(v=v_b, s=s, u=u_b, residuals=torch.zeros(p, n), iterations=1, converged=True)
    assert torch.allclose(h_to_x(u_b[:, 1], basis), v_b[:, 1], atol=1e-6)
    mix = parallel_transport(u_b[:, 0] + u_b[:, 2], u_b)
    v = h_to_x(mix, basis)
    assert torch.allclose(v.norm(dim=1), torch.ones(p), atol=1e-6)
    jv = torch.einsum("pnd,pn->pd", u_b, s * torch.einsum("pnD,pD->pn", v_b, v))  # J v
    cos = (jv * mix).sum(1) / jv.norm(dim=1)
    assert torch.allclose(cos, torch.ones(p), atol=1e-6)  # J v points along the transported u


def test_linear_edits_shape_and_length():
    x = torch.randn(3, 4, 4)
    v = torch.nn.functional.normalize(torch.randn(2, 48), dim=1).reshape(2, 3, 4, 4)
    out = linear_edits(x, v, [-2.0, 0.0, 5.0])
    assert out.shape == (2, 3, 3, 4, 4)
    assert torch.allclose(out[:, 1], x.expand(2, -1, -1, -1))
    assert torch.allclose((out[:, 2] - x).reshape(2, -1).norm(dim=1), torch.full((2,), 5.0), atol=1e-5)


class _ToyHandle:
    """A model whose noise prediction is the linear toy ε(x) = κ x + c (issue 18's oracle),
    reported in the model's own ``prediction_type`` so the diffusion core has to convert it."""

    def __init__(self, kappa, c, prediction_type):
        from diffatlas.models.diffusion import NoiseSchedule

        self.kappa, self.c = kappa, c
        self.num_train_timesteps = 1000
        self.schedule = NoiseSchedule(torch.linspace(0.999, 0.01, 1000, dtype=torch.float64), 1.0, prediction_type, 1.0)

    def conditioning(self, prompts):
        return None

    def model_output(self, x, t, cond):
        a = self.schedule.alpha_bar(t)
        eps = self.kappa * x + self.c
        x0 = (x - (1 - a) ** 0.5 * eps) / a**0.5
        return {"epsilon": eps, "sample": x0, "v_prediction": a**0.5 * eps - (1 - a) ** 0.5 * x0}[self.schedule.prediction_type]


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("t", [999, 400, 20])
def test_x0_normalise_is_exact_for_a_linear_noise_predictor(prediction_type, t):
    from diffatlas.geometry.sampling import Denoiser

    kappa = 0.99
    g = torch.Generator().manual_seed(1)
    c = torch.randn(1, 3, 4, 4, generator=g, dtype=torch.float64)
    den = Denoiser(_ToyHandle(kappa, c, prediction_type))
    x_ref = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    x_edit = x_ref + 8.0 * torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    out = x0_normalise(den, x_ref, x_edit, t, kappa=kappa)

    # Hand oracle: x0(x) = (x - sqrt(1-ᾱ)(κx + c)) / sqrt(ᾱ) for ε(x) = κx + c; x0' = x0(x_edit)
    # with each image's and channel's mean and std replaced by those of x0(x_ref).
    a = float(torch.linspace(0.999, 0.01, 1000, dtype=torch.float64)[t])
    x0 = lambda x: (x - (1 - a) ** 0.5 * (kappa * x + c)) / a**0.5  # noqa: E731
    x0_prime = _normalised_x0(x0(x_edit).numpy(), x0(x_ref).numpy())
    assert np.abs(x0(out).numpy() - x0_prime).max() < 1e-9  # the first-order update is exact here
    # ... and it is the paper's update, written from the unedited x_t.
    from_xt = x_ref + a**0.5 / (1 - kappa * (1 - a) ** 0.5) * (torch.from_numpy(x0_prime) - x0(x_ref))
    assert torch.allclose(out, from_xt, atol=1e-9)


def _normalised_x0(e: np.ndarray, r: np.ndarray) -> np.ndarray:
    """x0' by hand: ``e`` [B, C, H, W] with each image's and channel's mean and std (n - 1) taken from ``r``."""
    mu_e, sd_e = e.mean(axis=(2, 3), keepdims=True), e.std(axis=(2, 3), ddof=1, keepdims=True)
    mu_r, sd_r = r.mean(axis=(2, 3), keepdims=True), r.std(axis=(2, 3), ddof=1, keepdims=True)
    return (e - mu_e) / sd_e * sd_r + mu_r


class _CubicToyHandle(_ToyHandle):
    """A non-linear toy ε(x) = κ x + c + β x³: the Taylor step's starting point matters."""

    beta = 0.05

    def model_output(self, x, t, cond):
        return self.kappa * x + self.c + self.beta * x**3  # prediction_type epsilon


def test_x0_normalise_steps_from_the_unedited_point_on_a_nonlinear_denoiser():
    """Issue 18: x_t' = x_t + gain (x0' - x0(x_t)), not the edited-point form x + gain (x0' - x0(x))."""
    from diffatlas.geometry.sampling import Denoiser

    kappa, t = 0.99, 400
    g = torch.Generator().manual_seed(3)
    c = torch.randn(1, 3, 4, 4, generator=g, dtype=torch.float64)
    den = Denoiser(_CubicToyHandle(kappa, c, "epsilon"))
    x_t = torch.randn(1, 3, 4, 4, generator=g, dtype=torch.float64)
    x_edit = x_t + 8.0 * torch.randn(3, 3, 4, 4, generator=g, dtype=torch.float64) / 48**0.5
    out = x0_normalise(den, x_t, x_edit, t, kappa=kappa)  # one reference, three edits (broadcast)

    a = float(torch.linspace(0.999, 0.01, 1000, dtype=torch.float64)[t])
    b = _CubicToyHandle.beta
    x0 = lambda x: (x - (1 - a) ** 0.5 * (kappa * x + c.numpy() + b * x**3)) / a**0.5  # noqa: E731
    xt, xe = x_t.numpy(), x_edit.numpy()
    gain = a**0.5 / (1 - kappa * (1 - a) ** 0.5)
    x0_prime = _normalised_x0(x0(xe), x0(xt))
    paper = xt + gain * (x0_prime - x0(xt))
    edited_point = xe + gain * (x0_prime - x0(xe))
    assert out.shape == x_edit.shape
    assert np.abs(out.numpy() - paper).max() < 1e-9
    assert np.abs(paper - edited_point).max() > 0.1  # the two forms do differ on this ε


def test_x0_normalise_rejects_kappa_outside_0_1():
    from diffatlas.errors import UserError
    from diffatlas.geometry.sampling import Denoiser

    den = Denoiser(_ToyHandle(0.5, 0.0, "epsilon"))
    x = torch.randn(1, 3, 4, 4)
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(UserError, match=r"geometry\.kappa.*\[0, 1\)"):
            x0_normalise(den, x, x, 500, kappa=bad)
    from diffatlas.geometry.config import GeometryConfig

    with pytest.raises(UserError, match="geometry.kappa"):
        GeometryConfig(kappa=1.0)


def test_geodesic_shoot_on_a_micro_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=8, attention_head_dim=2, norm_num_groups=4,
    ).eval().requires_grad_(False)
    ctx = torch.randn(1, 5, 8)
    fmap = PullbackMap(unet, lambda x: unet(x, 300, encoder_hidden_states=ctx.expand(len(x), -1, -1)).sample, "mid")
    x = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    kw = dict(oversample=2, tol=1e-2, max_iters=60)
    b = top_singular(fmap, x, 2, generator=torch.Generator().manual_seed(0), **kw)
    start = x.expand(2, -1, -1, -1)
    shot = geodesic_shoot(fmap, start, torch.stack([b.u[0, 0], -b.u[0, 1]]), torch.stack([b.v[0, 0], -b.v[0, 1]]),
                          [0.5, 1.0], substeps=1, n=2, basis_kwargs=kw, init=b.v.expand(2, -1, -1, -1, -1),
                          generator=torch.Generator().manual_seed(0))
    assert shot.points.shape == (2, 2, 3, 8, 8)
    # Each step has length (strength difference) / substeps: the first along v, the second
    # along the transported direction (a unit vector), so the end is within 1.0 of the start.
    steps = torch.stack([shot.points[:, 0] - start, shot.points[:, 1] - shot.points[:, 0]], 1).reshape(2, 2, -1)
    assert steps.norm(dim=-1).flatten().tolist() == pytest.approx([0.5] * 4, abs=1e-4)
    assert torch.allclose(shot.points[:, 0] - start, 0.5 * torch.stack([b.v[0, 0], -b.v[0, 1]]), atol=1e-5)
    assert (shot.transport_cos <= 1 + 1e-5).all() and (shot.transport_cos > 0.5).all()
