"""Stages on a v-prediction model (tiny ``sd-v``, like SD2.x 768) against diffusers' schedulers.

Each check would fail if a stage read the model's v output as noise (the bug of issue 14):
the oracle is diffusers' ``DDIMInverseScheduler`` / ``DDIMScheduler`` driven with the raw
model output and ``prediction_type="v_prediction"``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDIMInverseScheduler, DDIMScheduler

from diffatlas.activations.config import ExtractConfig
from diffatlas.activations.extract import extract_activations
from diffatlas.activations.hooks import ActivationCapture
from diffatlas.activations.layers import resolve_layers
from diffatlas.activations.store import ActivationStore
from diffatlas.models.diffusion import CLEAN, images_to_tensor
from diffatlas.models.loader import load_model
from diffatlas.models.tiny import make_tiny_model

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def vmodel(tmp_path_factory):
    h = load_model(make_tiny_model("sd-v", tmp_path_factory.mktemp("m") / "sd-v"))
    assert h.prediction_type == "v_prediction"
    return h


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)


def _inverse(h, steps, prediction_type="v_prediction"):
    inv = DDIMInverseScheduler.from_config(h.scheduler.config, steps_offset=0, set_alpha_to_one=True,
                                           clip_sample=False, timestep_spacing="leading",
                                           prediction_type=prediction_type)
    inv.set_timesteps(steps)
    return inv


def _eps_at_step0(h, x, cond):
    """The model's noise at step 0 by hand: v = sqrt(ᾱ) ε - sqrt(1-ᾱ) x0 => ε = sqrt(ᾱ) v + sqrt(1-ᾱ) x."""
    a = float(h.scheduler.alphas_cumprod[0])
    return a**0.5 * h.model_output(x, 0, cond) + (1 - a) ** 0.5 * x


@torch.no_grad()
def diffusers_inversion(h, x0, cond, target, steps, first_from_clean=False):
    """x at ``target`` by DDIMInverseScheduler on the ``steps`` grid, each output read at the level
    the step starts from. ``first_from_clean``: the first grid step above 0 starts at the clean input.

    The step that starts at the clean input evaluates the model at step 0, so its v output is
    read with ᾱ_0 (by hand, then an epsilon-typed inverse scheduler); diffusers would read it
    with its initial ᾱ = 1, which is not the level the model was asked about.
    """
    inv = _inverse(h, steps)
    ratio = 1000 // steps
    x = x0
    grid = [int(t) for t in inv.timesteps if (0 < t if first_from_clean else 0 <= t) and t <= target]
    for k, t in enumerate(grid):
        if k == 0:  # from the clean input (ᾱ = 1): a 1-step scheduler's step starts below 0
            start = _inverse(h, 1 if first_from_clean else steps, "epsilon")
            x = start.step(_eps_at_step0(h, x, cond), t, x).prev_sample
            continue
        x = inv.step(h.model_output(x, max(t - ratio, 0), cond), t, x).prev_sample
    return x


def test_daam_real_image_inversion_follows_diffusers(vmodel, images):
    from diffatlas.daam.realimage import ddim_timesteps, invert_to_start

    h = vmodel
    cond = h.conditioning(["a red circle"] * 2)
    x0 = h.encode_images(images_to_tensor(images[:2], h.image_size))
    ts = ddim_timesteps(1000, 20, 250)  # [250, 200, ..., 0]
    with torch.no_grad():
        got = invert_to_start(h, x0, ts, cond)
        want = diffusers_inversion(h, x0, cond, 250, 20)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    # Reading v as noise (the old bug) lands elsewhere: this check can fail.
    from diffatlas.models.diffusion import ddim_invert

    with torch.no_grad():
        wrong = ddim_invert(lambda z, t: h.model_output(z, t, cond), x0, sorted(ts), h.alphas_cumprod)
    assert (wrong - want).abs().max() > 1e-2

    # And DDIM back down with the core (as the traced pass does) gives diffusers' DDIMScheduler.
    fwd = DDIMScheduler.from_config(h.scheduler.config, steps_offset=0, timestep_spacing="leading")
    fwd.set_timesteps(20)
    x_core, x_ref = got, want
    with torch.no_grad():
        for i, t in enumerate(ts):
            out = h.model_output(x_core, t, cond)
            x_core = h.schedule.ddim_step(out, x_core, t, ts[i + 1] if i + 1 < len(ts) else CLEAN)
            x_ref = fwd.step(h.model_output(x_ref, t, cond), t, x_ref, use_clipped_model_output=True).prev_sample
    torch.testing.assert_close(x_core, x_ref, atol=1e-4, rtol=1e-4)
    # (No round-trip assertion: on a random network 5 DDIM steps are far from the ODE limit.)


def test_daam_real_image_invert_mode_runs_on_v_model(vmodel, images):
    from diffatlas.daam.realimage import trace_real_images

    run = trace_real_images(vmodel, images[:2], ["a red circle", "a blue square"], t_start=200, steps=10,
                            mode="invert", layers="*attn2")
    assert len(run.maps) == 2 and run.info["mode"] == "real-invert"
    assert all(m.token_maps.shape[1:] == (32, 32) and np.isfinite(m.token_maps).all() for m in run.maps)


def test_extraction_inversion_follows_diffusers(vmodel, images, tmp_path):
    h = vmodel
    cfg = ExtractConfig(layers=["mid"], timesteps=[250], noise="inversion", inversion_steps=20, spatial=False,
                        batch_size=2)
    store = ActivationStore(extract_activations(
        h, images=images, sample_ids=[0, 1, 2], labels=["a", "b", "c"], coarse_labels=None, captions=None, cfg=cfg, out=tmp_path / "s.zarr"))
    cond = h.conditioning([""] * 3)
    x0 = h.encode_images(images_to_tensor(images, h.image_size))
    x_t = diffusers_inversion(h, x0, cond, 250, 20, first_from_clean=True)
    layers = resolve_layers(h.denoiser, ["mid"])
    with torch.no_grad(), ActivationCapture(h.denoiser, layers, stop_early=False) as cap:
        want = cap.run(h.model_output, x_t, torch.full((3,), 250), cond)["mid"].pooled.numpy()
    np.testing.assert_allclose(store.pooled("mid", 250), want, rtol=1e-3, atol=1e-4)


def test_geometry_ddim_follows_diffusers_on_v_model(vmodel):
    from diffatlas.geometry.sampling import Denoiser, initial_noise

    h = vmodel
    den = Denoiser(h, "a red circle", guidance_scale=3.0)
    x = initial_noise(h, 2, seed=0)
    got = den.ddim(x, 999, CLEAN, steps=10)  # 999, 899, ..., 99, clean
    sched = DDIMScheduler.from_config(h.scheduler.config, timestep_spacing="trailing")
    sched.set_timesteps(10)
    cond, unc = h.conditioning(["a red circle"]), h.conditioning([""])
    ref = x
    with torch.no_grad():
        for t in sched.timesteps:
            out_c, out_u = h.model_output(ref, t, cond), h.model_output(ref, t, unc)
            ref = sched.step(out_u + 3.0 * (out_c - out_u), t, ref, use_clipped_model_output=True).prev_sample
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
