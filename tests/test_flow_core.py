"""Flow-matching time in the diffusion core, checked against diffusers' own
``FlowMatchEulerDiscreteScheduler`` (``scale_noise``, ``step``) and closed forms."""

from __future__ import annotations

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from diffatlas.models.diffusion import (
    flow_add_noise,
    flow_eps_x0,
    flow_invert,
    flow_inversion_path,
    flow_scheduler_timestep,
    flow_step,
)

torch.set_num_threads(1)


@pytest.fixture
def sched():
    s = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)  # SD3's settings
    s.set_timesteps(7)
    return s


def _xs(seed=0, shape=(2, 4, 8, 8)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


def test_add_noise_matches_scale_noise(sched):
    x0, eps = _xs()
    for k in (0, 3, 6):
        t = sched.timesteps[k]
        sigma = float(sched.sigmas[k])
        want = sched.scale_noise(x0, t.reshape(1).expand(2), eps)
        # the scheduler's "timestep" is sigma * T: record both
        assert flow_scheduler_timestep(sigma, 1000) == pytest.approx(float(t), rel=1e-6)
        torch.testing.assert_close(flow_add_noise(x0, eps, sigma), want, rtol=1e-6, atol=1e-6)
        # per-row sigmas give the same
        got = flow_add_noise(x0, eps, torch.tensor([sigma, sigma]))
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_euler_step_matches_scheduler_step(sched):
    x, v = _xs(1)
    y = x.clone()
    for k, t in enumerate(sched.timesteps):
        want = sched.step(v, t, y).prev_sample
        got = flow_step(v, y, float(sched.sigmas[k]), float(sched.sigmas[k + 1]))
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        y = want


def test_velocity_recovers_x0_and_eps():
    x0, eps = _xs(2)
    for sigma in (0.0, 0.25, 0.9, 1.0):
        x_t = flow_add_noise(x0, eps, sigma)
        v = eps - x0  # the flow-matching training target
        e_hat, x0_hat = flow_eps_x0(v, x_t, sigma)
        torch.testing.assert_close(x0_hat, x0, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(e_hat, eps, rtol=1e-5, atol=1e-5)


def test_flow_inversion_on_a_straight_flow_is_exact():
    """With the true velocity of a straight path (constant v = ε - x0) Euler is exact: the
    inversion of x0 to σ lands on the forward-noised x_σ, and stepping back returns x0."""
    x0, eps = _xs(3)
    v_fn = lambda x, s: eps - x0  # noqa: E731
    path = flow_inversion_path(0.6, steps=10)
    assert path == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    x = flow_invert(v_fn, x0, path)
    torch.testing.assert_close(x, flow_add_noise(x0, eps, 0.6), rtol=1e-5, atol=1e-5)
    back = flow_step(eps - x0, x, 0.6, 0.0)
    torch.testing.assert_close(back, x0, rtol=1e-5, atol=1e-5)
    # a path run in pieces equals one run
    mid = flow_invert(v_fn, x0, path[:3])
    torch.testing.assert_close(flow_invert(v_fn, mid, path[3:], start=path[2]), x, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError):
        flow_invert(v_fn, x0, [0.5, 0.4])
