"""Real-image DAAM on flow-matching models (tiny SD3 and Flux) on a tiny ShapesWorld dataset.

Oracles, all independent of the code under test: the σ grid of the model's own pipeline
(diffusers' StableDiffusion3Pipeline / FluxPipeline after a call), the flow noising rule and
Euler steps written out here on the denoiser's observed inputs and outputs, a hand loop of
Euler inversion and denoising, and the joint softmax computed by hand (tests/joint_oracles.py).
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from diffatlas.cli import main as cli
from diffatlas.daam.realimage import flow_sigmas, trace_real_images
from diffatlas.errors import UserError
from diffatlas.models.diffusion import FLOW_NOISING_RULE, Time
from diffatlas.models.loader import load_model
from diffatlas.models.tiny import make_tiny_model
from joint_oracles import capture_attention_inputs, hand_maps

FAMILIES = ("sd3", "flux")
SEED = 5


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from diffatlas.data.dataset import write_dataset
    from diffatlas.data.shapesworld import generate_shapesworld

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("daam_real_flow")
    paths = {fam: make_tiny_model(fam, root / fam) for fam in FAMILIES}
    data = generate_shapesworld({"n_samples": 3, "two_object_fraction": 0.5, "image_size": 32})
    write_dataset(root / "data", data.images, data.meta, data.masks)
    return root, paths, {fam: load_model(p) for fam, p in paths.items()}, data


def _x0(h, images) -> torch.Tensor:
    """Clean latents by hand: the VAE posterior mean, shifted and scaled as the VAE config says."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    cfg = h.vae.config
    with torch.no_grad():
        z = h.vae.encode(x).latent_dist.mean
    return (z - (cfg.shift_factor or 0.0)) * cfg.scaling_factor


def _record_calls(denoiser):
    """Every denoiser call's input, timestep and output (Flux: packed tokens, as the model sees them)."""
    calls = []

    def pre(mod, args, kwargs):
        calls.append({"x": kwargs["hidden_states"].clone(), "t": float(kwargs["timestep"].reshape(-1)[0])})

    def post(mod, args, kwargs, out):
        calls[-1]["out"] = out.sample.clone()

    return calls, [denoiser.register_forward_pre_hook(pre, with_kwargs=True),
                   denoiser.register_forward_hook(post, with_kwargs=True)]


def _as_model_input(h, x: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] latents as the denoiser takes them (Flux packs 2x2 patches into tokens)."""
    if h.family != "flux":
        return x
    b, c, hh, ww = x.shape
    return h.pipeline._pack_latents(x, b, c, hh, ww)


@pytest.mark.parametrize("family", FAMILIES)
def test_sigma_grid_is_the_model_pipelines_own(setup, family):
    _, _, handles, _ = setup
    h = handles[family]
    h.pipeline(prompt="a red circle", num_inference_steps=5, guidance_scale=1.0, output_type="latent",
               max_sequence_length=h.t5_length, height=h.image_size, width=h.image_size,
               generator=torch.Generator().manual_seed(0))
    used = [float(s) for s in h.pipeline.scheduler.sigmas]  # descending, ends at the clean 0
    assert used[0] == pytest.approx(1.0) and used[-1] == 0.0
    assert flow_sigmas(h, 5, 1.0) == pytest.approx(used[:-1], abs=1e-6)
    got = flow_sigmas(h, 5, 0.5)
    assert got[0] == 0.5 and got[1:] == pytest.approx([s for s in used if 0 < s < 0.5], abs=1e-7)
    with pytest.raises(UserError, match="steps = 0"):
        flow_sigmas(h, 0, 0.5)


@pytest.mark.parametrize("family", FAMILIES)
def test_noised_start_is_the_flow_rule_and_denoising_takes_euler_steps(setup, family):
    _, _, handles, data = setup
    h = handles[family]
    ids = [int(s) for s in data.meta["sample_id"]]
    calls, hooks = _record_calls(h.denoiser)
    try:
        run = trace_real_images(h, data.images, list(data.meta["caption"]), sample_ids=ids, t_start="s0.700",
                                steps=6, mode="noise", seed=SEED)
    finally:
        for hk in hooks:
            hk.remove()
    grid = run.info["sigmas"]
    assert grid[0] == 0.7 and len(calls) == len(grid) >= 2 and all(a > b for a, b in zip(grid, grid[1:]))
    # the timestep each transformer was given: SD3 the scheduler's sigma * 1000, Flux sigma itself
    scale = 1000.0 if family == "sd3" else 1.0
    assert [c["t"] for c in calls] == pytest.approx([s * scale for s in grid], rel=1e-6)
    x0 = _x0(h, data.images)
    eps = torch.stack([torch.randn(x0.shape[1:], generator=torch.Generator().manual_seed(SEED * 1_000_003 + i)) for i in ids])
    want = _as_model_input(h, 0.3 * x0 + 0.7 * eps)  # x_sigma = (1 - sigma) x0 + sigma eps
    assert (calls[0]["x"] - want).abs().max().item() < 1e-5
    # each next input is one Euler step: x + (sigma' - sigma) v (packing is a permutation)
    for i in range(len(calls) - 1):
        step = calls[i]["x"] + (grid[i + 1] - grid[i]) * calls[i]["out"]
        assert (calls[i + 1]["x"] - step).abs().max().item() < 1e-5
    # the last step lands on sigma = 0; its distance to x0 is the recorded reconstruction error
    last = calls[-1]["x"] - grid[-1] * calls[-1]["out"]
    rmse = ((last - _as_model_input(h, x0)) ** 2).flatten(1).mean(1).sqrt()
    assert run.info["reconstruction_rmse"] == pytest.approx(rmse.tolist(), rel=1e-4)
    info = run.info
    assert info["mode"] == "real-noise" and info["t_start"] == "s0.700" and info["sigma_start"] == 0.7
    assert info["scheduler_timestep_start"] == pytest.approx(700.0) and info["noising_rule"] == FLOW_NOISING_RULE
    assert info["timesteps"] == pytest.approx([s * 1000 for s in grid]) and info["time_convention"] == "sigma"
    assert info["model"]["family"] == family and info["joint_attention"]["family"] == family
    assert info["cfg"] is False and len(run) == 3 and [it["sample_id"] for it in run.items] == ids


def _hand_euler(h, x0: torch.Tensor, grid: list[float], cond) -> tuple[torch.Tensor, torch.Tensor]:
    """Euler flow inversion 0 -> grid[0] through the ascending grid, then Euler denoising back to
    0 through the descending grid, written out: (the inverted start, the reconstruction)."""
    up = sorted(grid)
    x, s = x0.clone(), 0.0
    with torch.no_grad():
        for s_next in up:
            x = x + (s_next - s) * h.model_output(x, s, cond)
            s = s_next
        start = x.clone()
        for i, s in enumerate(grid):
            s_next = grid[i + 1] if i + 1 < len(grid) else 0.0
            x = x + (s_next - s) * h.model_output(x, s, cond)
    return start, x


@pytest.mark.parametrize("family", FAMILIES)
def test_euler_inversion_then_denoising_reconstructs_as_a_hand_loop(setup, family):
    _, _, handles, data = setup
    h = handles[family]
    caps = list(data.meta["caption"])
    calls, hooks = _record_calls(h.denoiser)
    try:
        run = trace_real_images(h, data.images, caps, t_start=0.5, steps=8, mode="invert", guidance=1.0)
        noised = trace_real_images(h, data.images, caps, t_start=0.5, steps=8, mode="noise")
    finally:
        for hk in hooks:
            hk.remove()
    grid = run.info["sigmas"]
    x0 = _x0(h, data.images)
    start, recon = _hand_euler(h, x0, grid, h.conditioning(caps))
    first_traced = calls[len(grid)]  # the inversion's len(grid) calls come first
    assert first_traced["t"] == pytest.approx(0.5 * (1000.0 if family == "sd3" else 1.0))
    assert (first_traced["x"] - _as_model_input(h, start)).abs().max().item() < 1e-4
    rmse = ((recon - x0) ** 2).flatten(1).mean(1).sqrt()
    assert run.info["reconstruction_rmse"] == pytest.approx(rmse.tolist(), rel=1e-3)
    # approximately the image again: far closer than from fresh noise at the same sigma, and
    # Euler's first-order error shrinks with the step count (the ODE itself is reversible)
    assert max(run.info["reconstruction_rmse"]) < 0.5 * min(noised.info["reconstruction_rmse"])
    fine = trace_real_images(h, data.images, caps, t_start=0.5, steps=32, mode="invert")
    assert len(fine.info["sigmas"]) > 2 * len(grid)
    assert np.all(np.array(fine.info["reconstruction_rmse"]) < 0.4 * np.array(run.info["reconstruction_rmse"]))
    assert run.info["mode"] == "real-invert" and run.info["solver"].startswith("euler")


@pytest.mark.parametrize("family", FAMILIES)
def test_real_image_maps_equal_the_joint_softmax_by_hand(setup, family):
    _, _, handles, data = setup
    h = handles[family]
    from diffatlas.daam.trace import AttentionTracer

    names = sorted(AttentionTracer(h.denoiser).modules)
    calls, hooks = capture_attention_inputs(h.denoiser, names)
    try:  # one step (no grid point below sigma 0.3 with steps=1): one call per module
        run = trace_real_images(h, data.images, list(data.meta["caption"]), t_start="s0.300", steps=1,
                                guidance=3.0 if family == "sd3" else 1.0, time_resolved=True)
    finally:
        for hk in hooks:
            hk.remove()
    assert run.info["sigmas"] == [0.3]
    text_len = next(c["encoder_hidden_states"].shape[1] for c in calls.values() if "encoder_hidden_states" in c)
    with torch.no_grad():
        want = hand_maps(family, calls, text_len)  # [rows, 64 image tokens, text]
    if family == "sd3":  # CFG batch [uncond, cond]: the conditional half is the one recorded
        assert run.info["cfg"] is True and want.shape[0] == 6
        want = want[3:]
    (_, raw), = run.time_resolved
    got = raw.maps[(8, 8)].double()  # [items, text, 8, 8], summed over heads and blocks
    assert (got - want.permute(0, 2, 1).reshape(got.shape)).abs().max().item() < 2e-6
    # the word maps are the family's text stream of those sums (bicubic to 32x32, clamped)
    offset = run.info["joint_attention"]["stream_offset"]
    m = run.maps[1]
    n = m.token_maps.shape[0]
    up = torch.nn.functional.interpolate(got[:, offset:offset + n].float(), size=(32, 32), mode="bicubic",
                                         align_corners=False).clamp(min=0)
    assert np.abs(m.token_maps - up[1].numpy()).max() < 1e-5
    assert run.maps[0].word_map("circle").shape == (32, 32)


def test_daam_real_command_on_sd3_and_flux_and_bad_start_times(setup, tmp_path, capsys):
    root, paths, _, _ = setup
    cfg = {"n_real": 3, "steps": 2, "batch_size": 3, "real_mode": "invert", "real_sigma": "s0.500", "taus": [0.4]}
    for fam in FAMILIES:
        out = tmp_path / fam
        args = ["daam-real", "--model", str(paths[fam]), "--model-name", f"tiny-{fam}", "--dataset", str(root / "data"),
                "--out", str(out), "--config-json", json.dumps(cfg), "--device", "cpu", "--threads", "1"]
        assert cli(args) == 0
        info = json.loads((out / "run" / "info.json").read_text())
        assert info["t_start"] == "s0.500" and info["sigma_start"] == 0.5 and info["scheduler_timestep_start"] == 500.0
        assert info["noising_rule"] == FLOW_NOISING_RULE and info["joint_attention"]["family"] == fam
        assert info["model_name"] == f"tiny-{fam}" and info["dataset"] == "data"
        summary = pd.read_csv(out / "summary.csv")  # scored against the true masks, as for UNets
        assert {"daam", "whole_image"} <= set(summary["method"]) and (summary["n"] > 0).all()
        assert json.loads((out / "eval.json").read_text())["mode"] == "real"
    bad = ["daam-real", "--model", str(paths["sd3"]), "--dataset", str(root / "data"), "--device", "cpu"]
    for key, value, msg in (("real_sigma", 1.5, "daam.real_sigma = 1.5 is not allowed"),
                            ("real_sigma", "t400", "daam.real_sigma = 't400' is not allowed; allowed: a flow-matching sigma"),
                            ("real_t", "s0.5", "daam.real_t = 's0.5' is not allowed; allowed: a training step")):
        code = cli([*bad, "--out", str(tmp_path / "x"), "--config-json", json.dumps({key: value})])
        assert code == 2 and not (tmp_path / "x").exists(), (key, value)
        err = capsys.readouterr().err
        assert msg in err and "Traceback" not in err, err


def test_start_time_comes_from_one_key_per_convention():
    from diffatlas.daam.config import DAAMConfig

    cfg = DAAMConfig()
    assert cfg.real_start("step") == Time.step(400) and cfg.real_start("sigma") == Time.sigma(0.6)
    assert DAAMConfig(real_sigma=0.25, real_t="t300").real_start("sigma") == Time.sigma(0.25)
    assert DAAMConfig(real_t="t300").real_start("step") == Time.step(300)
    for kw, msg in (({"real_sigma": 0}, "daam.real_sigma = 0 is not allowed"),
                    ({"real_sigma": "s1.5"}, "daam.real_sigma = 's1.5'"),
                    ({"real_t": 0.5}, "daam.real_t = 0.5 is not allowed; allowed: a training step")):
        with pytest.raises(UserError, match=msg):
            DAAMConfig(**kw)


def test_workflow_plans_daam_real_for_flow_models_with_their_sigma(setup, tmp_path):
    """Dry run: daam_real jobs for a tiny SD3 and Flux model, each handed daam.real_sigma; a
    real_sigma that is no sigma stops the run at parse time, by name."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    root_dir = Path(__file__).resolve().parents[1]
    _, paths, _, _ = setup
    cfg = yaml.safe_load((root_dir / "tests" / "workflow" / "tiny_config.yaml").read_text())
    cfg["results"] = str(tmp_path / "results")
    cfg["models"] = {fam: {"path": str(paths[fam])} for fam in FAMILIES}
    cfg["daam"].update(models=list(FAMILIES), real_sigma="s0.450")
    env = dict(os.environ, DIFFATLAS_NO_PROGRESS="1")
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    targets = [str(tmp_path / "results" / "daam" / fam / "real" / "shapesworld") for fam in FAMILIES]

    def dry_run(config: dict) -> subprocess.CompletedProcess:
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(config))
        return subprocess.run([sys.executable, "-m", "snakemake", *targets, "-n", "-p", "--cores", "1",
                               "--configfile", str(path)], cwd=root_dir, env=env, capture_output=True, text=True, timeout=600)

    proc = dry_run(cfg)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    for fam in FAMILIES:
        line = next(ln for ln in out.splitlines() if ln.startswith("Shell command: diffatlas daam-real") and f"--model-name {fam} " in ln)
        assert '"real_sigma": "s0.450"' in line and f"--model {paths[fam]}" in line
    cfg["daam"]["real_sigma"] = "t400"
    proc = dry_run(cfg)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "daam.real_sigma = 't400' is not allowed" in out and "Traceback" not in out, out[-3000:]
