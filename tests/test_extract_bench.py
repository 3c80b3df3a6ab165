"""The extraction benchmark's bare forward feeds the denoiser exactly what extraction feeds it.

bench/bench_extract.py divides extraction's per-image rate by a bare forward's; the ratio only
means something when both run the same model calls. The denoiser's inputs are recorded in
both (a forward pre-hook) and compared with each other and with the noising rule written out
by hand: x_t = sqrt(ᾱ) x0 + sqrt(1 - ᾱ) ε for a UNet, x_σ = (1 - σ) x0 + σ ε for SD3 / Flux,
whose denoiser takes σ·T (SD3) or σ (Flux) as its timestep. Speed is not asserted here.
"""

from __future__ import annotations

import importlib.util
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from diffatlas.activations.extract import extract_activations
from diffatlas.activations.noise import sample_noise
from diffatlas.models.diffusion import images_to_tensor
from diffatlas.models.loader import load_model
from diffatlas.models.tiny import make_tiny_model

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_extract.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_extract", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class Flags:  # bench_extract's flags that bench_config reads
    timesteps = None
    layers = None
    batch_size = 2


def record_inputs(denoiser, fn):
    """The denoiser's tensor inputs (positional and keyword) of every call made by ``fn()``."""
    calls = []

    def pre(module, args, kwargs):
        calls.append([a.detach().clone() for a in args if torch.is_tensor(a)]
                     + [(k, v.detach().clone()) for k, v in sorted(kwargs.items()) if torch.is_tensor(v)])

    hook = denoiser.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        fn()
    finally:
        hook.remove()
    return calls


def same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert type(x) is type(y)
        if isinstance(x, tuple):
            assert x[0] == y[0]
            x, y = x[1], y[1]
        torch.testing.assert_close(x, y, rtol=0, atol=0)


@pytest.mark.parametrize("family", ["sd", "sd3", "flux"])
def test_bare_forward_feeds_the_denoiser_what_extraction_feeds_it(bench, family, tmp_path):
    h = load_model(str(make_tiny_model(family, tmp_path / family)), device="cpu")
    cfg = bench.bench_config(Flags, h)
    flow = h.time_convention == "sigma"
    if flow:  # extract's default steps as sigmas t / T, and the image-token streams
        assert cfg.timesteps == ["s0.050", "s0.250", "s0.500"]
        assert cfg.layers and all(name.endswith(".image") for name in cfg.layers)
    else:
        assert cfg.timesteps == [50, 250, 500] and cfg.layers == ["mid", "up_ft0", "up_ft1"]
    cfg = replace(cfg, timesteps=cfg.timesteps[1:2])
    n = 3
    images = np.random.default_rng(0).integers(0, 256, (n, h.image_size, h.image_size, 3), dtype=np.uint8)
    clock = bench.Clock(torch.device("cpu"))
    bare = record_inputs(h.denoiser, lambda: bench.bare_forward(h, images, cfg, torch.device("cpu"), clock))
    # extraction stops the pass after its last layer: the inputs are recorded all the same
    extracted = record_inputs(h.denoiser, lambda: extract_activations(
        h, images=images, sample_ids=list(range(n)), labels=["x"] * n, coarse_labels=None, captions=None,
        cfg=cfg, out=tmp_path / "store.zarr", device="cpu"))
    assert len(bare) == len(extracted) == 2  # batches of 2 and 1
    for b, e in zip(bare, extracted):
        same(b, e)

    # the hand-written noising rule and the model's own timestep convention
    x0 = h.encode_images(images_to_tensor(images[:2], h.image_size)).float()
    if flow:
        sigma = 0.25
        eps = sample_noise([0, 1], 250, tuple(x0.shape[1:]), seed=cfg.seed)
        x_t = (1 - sigma) * x0 + sigma * eps
        kw = dict(bare[0][i] for i in range(len(bare[0])) if isinstance(bare[0][i], tuple))
        if family == "sd3":  # SD3's transformer takes the scheduler's timestep sigma * 1000
            torch.testing.assert_close(kw["timestep"], torch.full((2,), 250.0))
            torch.testing.assert_close(kw["hidden_states"], x_t, rtol=1e-5, atol=1e-6)
        else:  # Flux takes sigma itself, and the latents packed 2x2
            torch.testing.assert_close(kw["timestep"], torch.full((2,), 0.25))
            b, c, hh, ww = x_t.shape
            packed = x_t.view(b, c, hh // 2, 2, ww // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, hh * ww // 4, c * 4)
            torch.testing.assert_close(kw["hidden_states"], packed, rtol=1e-5, atol=1e-6)
    else:
        ab = float(h.scheduler.alphas_cumprod[250])
        eps = sample_noise([0, 1], 250, tuple(x0.shape[1:]), seed=cfg.seed)
        x_t, t = bare[0][0], bare[0][1]
        torch.testing.assert_close(x_t, ab**0.5 * x0 + (1 - ab) ** 0.5 * eps, rtol=1e-5, atol=1e-6)
        assert t.tolist() == [250, 250]
