"""Pullback geometry on flow-matching transformers (issue 21 item 5): the planted linear toy,
tiny SD3 / Flux against exact Jacobians, sampling against diffusers' Euler scheduler, the
end-to-end run, bad input, and the intervention hook on a joint block's image stream."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from diffatlas.errors import UserError
from diffatlas.geometry.editing import x0_normalise, x0_update_gain
from diffatlas.geometry.jacobian import PullbackMap, top_singular
from diffatlas.geometry.sampling import Denoiser

torch.set_num_threads(1)


# ------------------------------------------------------------------ the planted linear toy
class JointTransformerBlock(nn.Module):
    """Named like diffusers' joint block, so the layer resolver gives it ``.image`` / ``.text``.

    Image token k (of a 2x2 patch grid, row-major) is ``W_k · patch_k``; the text stream is a
    decoy that depends on x differently (a Jacobian read from it would be wrong).
    """

    def __init__(self, w: torch.Tensor) -> None:  # w [4, c_out, C·2·2]
        super().__init__()
        self.register_buffer("w", w)

    def forward(self, tokens: torch.Tensor):
        image = torch.einsum("kod,bkd->bko", self.w, tokens)
        text = 5.0 * tokens.sum(dim=1, keepdim=True)[..., : self.w.shape[1]].expand(-1, 2, -1)
        return text, image


class ToyJoint(nn.Module):
    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        self.transformer_blocks = nn.ModuleList([JointTransformerBlock(w)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.transformer_blocks[0](patchify(x))[1]


def patchify(x: torch.Tensor) -> torch.Tensor:
    """[B, C, 4, 4] -> tokens [B, 4, C·2·2]: 2x2 patches, row-major, each patch flattened as [C, 2, 2]."""
    b, c = x.shape[:2]
    return x.reshape(b, c, 2, 2, 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, 4, c * 4)


class FlowToyHandle:
    """A flow-matching model whose noise prediction is ε̂(x) = κ x + c, i.e. velocity
    v(x) = (ε̂ - x) / (1 - σ) = ((κ - 1) x + c) / (1 - σ) (from ε̂ = x_σ + (1 - σ) v)."""

    time_convention = "sigma"
    num_train_timesteps = 1000
    model_id = "flow-toy"

    def __init__(self, kappa: float, c: torch.Tensor) -> None:
        self.kappa, self.c = kappa, c

    def conditioning(self, prompts):
        return None

    def model_output(self, x, sigma, cond):
        return ((self.kappa - 1.0) * x + self.c) / (1.0 - float(sigma))


def _planted(seed: int = 0):
    """W_k = U_k diag(s_k) V_kᵀ with 12 distinct singular values over the four tokens."""
    g = torch.Generator().manual_seed(seed)
    C, c_out, D = 2, 3, 8
    s = torch.tensor([12.0, 3.0, 0.5, 10.0, 2.5, 0.4, 8.0, 2.0, 0.3, 6.0, 1.5, 0.2], dtype=torch.float64).reshape(4, 3)
    us = [torch.linalg.qr(torch.randn(c_out, c_out, generator=g, dtype=torch.float64)).Q for _ in range(4)]
    vs = [torch.linalg.qr(torch.randn(D, c_out, generator=g, dtype=torch.float64)).Q for _ in range(4)]
    w = torch.stack([(us[k] * s[k]) @ vs[k].T for k in range(4)])
    return w, s, us, vs, C


def _hand_directions(s, us, vs, C, n):
    """The top-n singular triples of J by hand: each is one token's (s, U col, V col), placed on the
    token's patch (v, in x layout [C, 4, 4]) and grid cell (u, in h layout [c_out, 2, 2])."""
    triples = sorted(((float(s[k, j]), k, j) for k in range(4) for j in range(3)), reverse=True)[:n]
    out = []
    for val, k, j in triples:
        pi, pj = divmod(k, 2)
        v = torch.zeros(C, 4, 4, dtype=torch.float64)
        v[:, 2 * pi:2 * pi + 2, 2 * pj:2 * pj + 2] = vs[k][:, j].reshape(C, 2, 2)
        u = torch.zeros(3, 2, 2, dtype=torch.float64)
        u[:, pi, pj] = us[k][:, j]
        out.append((val, v, u.reshape(-1)))
    return out


@pytest.mark.parametrize("sigma", [0.9, 0.5, 0.1])
def test_planted_linear_flow_model_basis_and_x0_normalised_edit_by_hand(sigma):
    w, s, us, vs, C = _planted()
    den_module = ToyJoint(w)
    fmap = PullbackMap(den_module, den_module, "block0.image", "none")
    assert fmap.layer.stream == "image"
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1, C, 4, 4, generator=g, dtype=torch.float64)
    n = 3
    basis = top_singular(fmap, x, n, oversample=4, tol=1e-8, max_iters=300, generator=torch.Generator().manual_seed(0))
    assert basis.converged
    for i, (val, v, u) in enumerate(_hand_directions(s, us, vs, C, n)):
        assert abs(float(basis.s[0, i]) - val) < 1e-8 * val
        assert abs(abs(float((basis.v[0, i] * v).sum())) - 1.0) < 1e-8  # v_i (up to sign) on its patch
        assert abs(abs(float(basis.u[0, i] @ u)) - 1.0) < 1e-8  # u_i on its grid cell: h is [c_out, 2, 2]

    # The x0-normalised edit along v_1 at σ, against the hand solution.
    kappa = 0.99
    c = torch.randn(1, C, 4, 4, generator=g, dtype=torch.float64)
    den = Denoiser(FlowToyHandle(kappa, c))
    x_edit = x + torch.tensor([-6.0, 6.0], dtype=torch.float64)[:, None, None, None] * basis.v[0, :1]
    out = x0_normalise(den, x, x_edit, f"s{sigma:.3f}", kappa=kappa)

    # Hand oracle: x0(x) = x - σ v(x) = ((1 - κσ) x - σ c) / (1 - σ); x0' = x0(x_edit) with x0(x)'s
    # per-image, per-channel mean and std; x_σ' = x_σ + (1 - σ)/(1 - κσ) (x0' - x0(x_σ)).
    x0 = lambda z: ((1 - kappa * sigma) * z - sigma * c.numpy()) / (1 - sigma)  # noqa: E731
    xe, xr = x_edit.numpy(), x.numpy()
    e, r = x0(xe), x0(xr)
    mu_e, sd_e = e.mean(axis=(2, 3), keepdims=True), e.std(axis=(2, 3), ddof=1, keepdims=True)
    mu_r, sd_r = r.mean(axis=(2, 3), keepdims=True), r.std(axis=(2, 3), ddof=1, keepdims=True)
    x0_prime = (e - mu_e) / sd_e * sd_r + mu_r
    hand = xr + (1 - sigma) / (1 - kappa * sigma) * (x0_prime - r)
    assert np.abs(out.numpy() - hand).max() < 1e-9
    assert np.abs(x0(out.numpy()) - x0_prime).max() < 1e-9  # the first-order update is exact here
    assert np.abs(hand - xr).max() > 1e-2  # and it does move the point


def test_flow_gain_is_the_ddpm_form_with_a_one_minus_sigma_and_b_sigma():
    kappa = 0.99
    for sigma in (0.0, 0.3, 0.8):
        assert x0_update_gain(1 - sigma, sigma, kappa) == pytest.approx((1 - sigma) / (1 - kappa * sigma), rel=1e-15)
    assert x0_update_gain(0.0, 1.0, kappa) == 0.0  # σ = 1: pure noise, the edit returns the unedited point
    a = 0.3
    assert x0_update_gain(a**0.5, (1 - a) ** 0.5, kappa) == pytest.approx(a**0.5 / (1 - kappa * (1 - a) ** 0.5), rel=1e-15)


# ------------------------------------------------------------------ tiny SD3 and Flux
@pytest.fixture(scope="module")
def flow_handles(tmp_path_factory):
    from diffatlas.models.loader import load_model
    from diffatlas.models.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("flowgeo")
    return {f: load_model(make_tiny_model(f, root / f)) for f in ("sd3", "flux")}


def _hand_image_stream(handle, layer_path, x, sigma, cond):
    """The block's image tokens by a plain forward hook (output[1]), original processors, on the grid by hand."""
    module = dict(handle.denoiser.named_modules())[layer_path]
    seen = {}
    hook = module.register_forward_hook(lambda m, i, o: seen.__setitem__("h", o[1]))
    try:
        handle.model_output(x, sigma, cond)
    finally:
        hook.remove()
    h = seen["h"]  # [B, N, C]
    side = int(round(h.shape[1] ** 0.5))
    return h.reshape(h.shape[0], side, side, h.shape[2]).permute(0, 3, 1, 2)  # row-major patches -> [B, C, h, w]


@pytest.mark.parametrize("family,layer,path", [("sd3", "block0.image", "transformer_blocks.0"),
                                               ("flux", "block0", "transformer_blocks.0"),
                                               ("flux", "single_block0.image", "single_transformer_blocks.0")])
def test_tiny_flow_transformer_basis_against_the_exact_jacobian(flow_handles, family, layer, path):
    handle = flow_handles[family]
    cond = handle.conditioning([""])
    x = torch.randn(1, handle.latent_channels, handle.latent_size, handle.latent_size, generator=torch.Generator().manual_seed(2))
    # h (pooling none) is the image stream laid on its patch grid, as extraction lays it
    flat = PullbackMap.from_handle(handle, "s0.500", layer=layer, pooling="none", cond=cond)
    with torch.no_grad():
        assert torch.allclose(flat(x), _hand_image_stream(handle, path, x, 0.5, cond).flatten(1), atol=1e-6)
    fmap = PullbackMap.from_handle(handle, "s0.500", layer=layer, pooling="sum", cond=cond)
    basis = top_singular(fmap, x, 3, oversample=3, tol=1e-5, max_iters=300, generator=torch.Generator().manual_seed(0))
    # oracle: reverse-mode Jacobian of the hand capture with the model's own attention (fused SDPA)
    jac = torch.autograd.functional.jacobian(lambda z: _hand_image_stream(handle, path, z, 0.5, cond).sum(dim=(2, 3))[0], x)
    u, s, vh = torch.linalg.svd(jac.reshape(jac.shape[0], -1).double(), full_matrices=False)
    assert basis.converged
    assert ((basis.s[0].double() - s[:3]).abs() / s[:3]).max() < 1e-4
    assert (vh[:3] * basis.v[0].reshape(3, -1).double()).sum(1).abs().min() > 0.999
    assert (u[:, :3].T * basis.u[0].double()).sum(1).abs().min() > 0.999


def test_flow_sampling_equals_diffusers_euler_scheduler(flow_handles):
    """σ 1 -> 0.5 -> clean with 4 steps over the axis: [1, .75, .5] then [.5, .25, 0], as
    FlowMatchEulerDiscreteScheduler.step walks the same sigmas."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from diffatlas.models.diffusion import CLEAN, Time

    handle = flow_handles["sd3"]
    den = Denoiser(handle, "a red circle")
    x = torch.randn(1, 4, handle.latent_size, handle.latent_size, generator=torch.Generator().manual_seed(0))
    ours = den.ddim(den.ddim(x, Time.sigma(1.0), Time.sigma(0.5), 4), Time.sigma(0.5), CLEAN, 4)
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    sched.set_timesteps(sigmas=[1.0, 0.75, 0.5, 0.25])
    assert torch.allclose(sched.sigmas, torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    ref = x.clone()
    for t in sched.timesteps:
        v = handle.model_output(ref, float(t) / 1000, den.cond)
        ref = sched.step(v, t, ref).prev_sample
    assert torch.allclose(ours, ref, atol=1e-5), (ours - ref).abs().max()


def test_bad_layer_and_time_on_a_flow_model(flow_handles, tmp_path):
    sd3, flux = flow_handles["sd3"], flow_handles["flux"]
    with pytest.raises(UserError, match=r"'single_block0'.*available aliases: .*block0\.image"):
        PullbackMap.from_handle(sd3, "s0.500", layer="single_block0")  # SD3 has no single-stream blocks
    with pytest.raises(UserError, match=r"'block1\.text'"):
        PullbackMap.from_handle(sd3, "s0.500", layer="block1.text")  # SD3's last block updates no text
    with pytest.raises(UserError, match=r"'mid'"):
        PullbackMap.from_handle(flux, "s0.500", layer="mid")
    with pytest.raises(UserError, match=r"flow-matching model, whose times are sigmas"):
        PullbackMap.from_handle(sd3, 500, layer="block0")
    from diffatlas.geometry.config import GeometryConfig

    with pytest.raises(UserError, match="geometry.global_sigma"):
        GeometryConfig(global_sigma=1.5)
    with pytest.raises(UserError, match="geometry.iterative_timesteps"):
        GeometryConfig(iterative_timesteps=["x0.5"])


def test_geometry_end_to_end_on_tiny_sd3_and_flux(flow_handles, tmp_path):
    from diffatlas.geometry.artifacts import load_basis
    from diffatlas.geometry.config import GeometryConfig
    from diffatlas.geometry.run import run_global, run_measures, run_paths, run_timestep

    for family, layer in (("sd3", "block0.image"), ("flux", "block0")):
        handle = flow_handles[family]
        cfg = GeometryConfig(models=[family], layer=layer, n_samples=2, n_directions=2, edit_directions=1,
                             edit_strengths=[-4.0, 4.0], ddim_steps=4, iterative_timesteps=["s1.000"], global_samples=2,
                             path_pairs=1, path_segments=2, global_direction=0)
        root = tmp_path / family
        runs = []
        for time, name in (("s1.000", "t1000"), ("s0.500", "t500")):
            meta = run_timestep(handle, cfg, time, root / name, family)
            runs.append(str(root / name))
            on_disk = json.loads((root / name / "meta.json").read_text())
            assert on_disk["time"] == time and on_disk["time_convention"] == "sigma"
            assert on_disk["sigma"] == float(time[1:]) and on_disk["scheduler_timestep"] == 1000 * float(time[1:])
            assert on_disk["timestep"] == int(name[1:]) and on_disk["alpha_bar"] is None
            assert on_disk["noising_rule"].startswith("x_sigma = (1 - sigma) * x0 + sigma * eps")
            assert on_disk["layer"] == layer and on_disk["stream"] == "image"
            assert on_disk["converged"] and "Euler" in on_disk["edit"]["sampler"]
            tensors, _ = load_basis(root / name)
            assert tensors["v"].shape == (2, 2, 4, handle.latent_size, handle.latent_size)
            assert bool(meta["iterative"]) == (time == "s1.000")
            from diffatlas.geometry.artifacts import load_edits

            edits = load_edits(root / name)
            assert ("iterative" in edits) == (time == "s1.000")
            zero = cfg.strengths.index(0.0)
            unedited = np.broadcast_to(edits["linear"][:, :, zero:zero + 1], edits["normalised"].shape)
            # at σ = 1 the x0-normalised gain (1 - σ)/(1 - κσ) is 0: every normalised edit is the unedited image
            assert np.array_equal(edits["normalised"], unedited) == (time == "s1.000")
        g = run_global(handle, cfg, root / "t1000", root / "global", family)
        assert g["time"] == "s1.000"
        p = run_paths(handle, cfg, root / "path_lengths.csv", family)
        assert p["sigma"] == 1.0 and p["layer"] == layer
        run_measures(runs, root / "psd.csv", root / "distances.csv")
        assert (root / "spectra_trend.csv").exists()
        with pytest.raises(UserError, match="holds time s0.500"):
            run_global(handle, cfg, root / "t500", root / "global2", family)


# ------------------------------------------------------------------ the intervention hook
def test_steering_a_joint_block_edits_its_image_stream_and_alpha_zero_is_bit_identical(flow_handles, tmp_path):
    from diffatlas.activations.layers import resolve_layers
    from diffatlas.interventions.edit import SteeringSAE
    from diffatlas.interventions.hook import InterventionHook
    from diffatlas.interventions.spec import Intervention
    from diffatlas.models.diffusion import Time
    from diffatlas.sae.config import SAEArch
    from diffatlas.sae.model import TopKSAE

    handle = flow_handles["sd3"]
    layer = resolve_layers(handle.denoiser, ["block0.image"])[0]
    block = dict(handle.denoiser.named_modules())[layer.module_path]
    cond = handle.conditioning([""])
    x = torch.randn(1, 4, handle.latent_size, handle.latent_size, generator=torch.Generator().manual_seed(1))
    seen = {}
    cap = block.register_forward_hook(lambda m, i, o: seen.__setitem__("out", o))
    handle.model_output(x, 0.5, cond)
    cap.remove()
    text, image = seen["out"]
    d = image.shape[-1]
    sae = TopKSAE(SAEArch(d_in=d, n_latents=8, k=2, k_aux=4), seed=0)
    sae.save(tmp_path / "sae", {"model": "sd3", "layer": "block0.image", "module_path": layer.module_path,
                                "samples": "spatial", "pooling": "mean", "input_scale": 1.0, "timestep": 500})
    steer = SteeringSAE.load(tmp_path / "sae")

    def generate(spec=None):
        den = Denoiser(handle, "")
        x_T = torch.randn(1, 4, handle.latent_size, handle.latent_size, generator=torch.Generator().manual_seed(7))
        if spec is None:
            return den.ddim(x_T, Time.sigma(1.0), -1, 4)
        with InterventionHook(handle.denoiser, layer, spec, steer, guided=False) as hook:
            out = den.ddim(x_T, Time.sigma(1.0), -1, 4)
        return out, hook

    base = generate()
    out, hook = generate(Intervention(latent=3, alpha=0.0))
    assert torch.equal(out, base) and hook.passes == 4 and hook.edited_passes == 0

    # a real steer moves the image tokens by α d_j at every token, and leaves the text stream alone
    spec = Intervention(latent=3, alpha=2.5)
    with InterventionHook(handle.denoiser, layer, spec, steer, guided=False):
        cap = block.register_forward_hook(lambda m, i, o: seen.__setitem__("edited", o))
        handle.model_output(x, 0.5, cond)
        cap.remove()
    text_e, image_e = seen["edited"]
    direction = sae.W_dec[3] / sae.W_dec[3].norm()
    assert torch.equal(text_e, text)
    assert torch.allclose(image_e - image, (2.5 * direction).expand_as(image), atol=1e-5)


# ------------------------------------------------------------------ the workflow's plan
def test_workflow_plans_a_flow_models_geometry_at_its_sigmas(tmp_path):
    """Dry run, a UNet and SD3 side by side: SD3's geometry jobs get its sigma (and global_sigma),
    are named by sigma * T and read its own h (models.sd3.geometry_layer); the UNet keeps
    geometry.layer and its steps."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    from diffatlas.models.tiny import make_tiny_model

    root = Path(__file__).resolve().parents[1]
    cfg = yaml.safe_load((root / "tests" / "workflow" / "tiny_config.yaml").read_text())
    cfg["results"] = str(tmp_path / "results")
    cfg["models"] = {"unet": {"path": str(make_tiny_model("pixel", tmp_path / "pixel"))},
                     "sd3": {"path": str(make_tiny_model("sd3", tmp_path / "sd3")), "timesteps": ["s0.500"],
                             "geometry_layer": "block0.image"}}
    cfg["extract"]["models"], cfg["daam"]["models"] = ["unet"], ["unet"]
    cfg["geometry"].update(models=["unet", "sd3"], meaning_models=[], layer="mid", timesteps=[300], global_timestep=900)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, DIFFATLAS_NO_PROGRESS="1")
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    proc = subprocess.run([sys.executable, "-m", "snakemake", "-n", "-p", "--cores", "1", "--configfile", str(path)],
                          cwd=root, env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    geo = str(tmp_path / "results" / "geometry" / "sd3")
    assert f"--timestep s0.500 --out {geo}/t500" in out, out[-3000:]
    assert f"--timestep s1.000 --out {geo}/t1000" in out
    assert f"--basis {geo}/t1000" in out
    unet = str(tmp_path / "results" / "geometry" / "unet")
    assert f"--timestep 300 --out {unet}/t300" in out and f"--timestep 900 --out {unet}/t900" in out
    # each basis job's settings name its model's own h (the JSON is shell-quoted in the command)
    jobs = [line for line in out.splitlines() if "diffatlas geometry --model" in line]
    sd3_jobs = [line for line in jobs if f"{geo}/t" in line]
    unet_jobs = [line for line in jobs if f"{unet}/t" in line]
    assert sd3_jobs and unet_jobs, out[-3000:]
    assert all('block0.image' in line for line in sd3_jobs) and all('"layer": "mid"' in line and "block0" not in line for line in unet_jobs), jobs
