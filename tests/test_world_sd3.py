"""The SD3-architecture ShapesWorld model (world_model.train.architecture: sd3): a tiny run
through the rule's command, resume, loading, the flow-matching loss, the flow sampler and the
fidelity gate code on it.

Oracles: the diffusers StableDiffusion3Pipeline itself (its encode_prompt, transformer call
and FlowMatchEulerDiscreteScheduler sampling loop), the rectified-flow formulas written out by
hand, an uninterrupted run (for resume), and the trajectory hash recorded by the shipped UNet
model before the sd3 fields existed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from diffatlas.errors import UserError
from diffatlas.world.config import FidelityConfig, WorldModelConfig

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]

# One joint-attention block of 2 heads of 8 channels, 16-wide text encoders: a step takes milliseconds.
TINY = dict(architecture="sd3", steps=3, batch_size=4, sd3_layers=1, sd3_heads=2, sd3_head_dim=8, text_hidden_size=16,
            text_heads=2, text_layers=1, warmup=2, checkpoint_every=1, log_every=1, lr_schedule="constant")
MODULES = ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3")


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for sub in MODULES:
        for f in sorted((model_dir / sub).glob("*.safetensors")):
            out.update({f"{sub}.{k}": v for k, v in load_file(str(f)).items()})
    return out


def _train_cli(tmp_path: Path, cfg: dict, out: str, ckpt: str = "ck") -> subprocess.CompletedProcess:
    """The command line of rule train_world_model (rules/world_model.smk)."""
    return subprocess.run(
        [sys.executable, "-m", "diffatlas", "train-world-model", "--config-json", json.dumps(cfg, sort_keys=True),
         "--out", str(tmp_path / out), "--checkpoint-dir", str(tmp_path / ckpt), "--device", "cpu", "--threads", "1"],
        capture_output=True, text=True, cwd=ROOT, env={"PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1",
                                                       "PATH": str(Path(sys.executable).parent)},
    )


@pytest.fixture(scope="module")
def tiny_sd3(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("sd3world")
    proc = _train_cli(tmp, {**TINY, "steps": 2}, "model")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp


def test_rule_command_trains_a_loadable_sd3_pipeline(tiny_sd3):
    from diffatlas.models.loader import load_model
    from diffatlas.world.train import TRAINING_INFO

    model = tiny_sd3 / "model"
    index = json.loads((model / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline" and index["vae"] == [None, None]
    info = json.loads((model / TRAINING_INFO).read_text())
    assert info["architecture"] == "sd3" and info["config"]["architecture"] == "sd3" and info["finished"]
    assert info["step"] == 2 and info["images_seen"] == 8 and len(info["loss_history"]) == 2
    assert set(info["parameters"]) == set(MODULES) and "rectified flow" in info["objective"]
    for key in ("train_seconds", "images_per_second", "final_loss", "trajectory_hash", "device", "torch_threads", "versions"):
        assert key in info, key

    handle = load_model(model)
    assert handle.family == "sd3" and handle.vae is None and handle.time_convention == "sigma"
    assert (handle.image_size, handle.latent_size, handle.latent_channels) == (32, 32, 3)
    assert handle.denoiser.config.patch_size == 2 and handle.denoiser.config.num_layers == 1
    assert handle.t5_length == WorldModelConfig().text_max_length  # the T5 tokenizer is the last one
    cond = handle.conditioning(["a red circle", ""])
    # CLIP-L + CLIP-G (16 tokens each, side by side) then T5 (16 tokens): [B, 32, text_hidden_size].
    assert cond["encoder_hidden_states"].shape == (2, 32, 16) and cond["pooled_projections"].shape == (2, 16)
    v = handle.model_output(torch.zeros(2, 3, 32, 32), 0.5, cond)
    assert v.shape == (2, 3, 32, 32) and torch.isfinite(v).all()
    # The saved weights are the checkpoint's EMA weights.
    from safetensors.torch import load_file

    ckpt = load_file(str(tiny_sd3 / "ck" / "last" / "model.safetensors"))
    saved = _weights(model)
    ema = {k[4:] for k in ckpt if k.startswith("ema.")}
    # T5's embed_tokens is tied to its shared embedding: saved once.
    assert saved.keys() <= ema and len(saved) >= len(ema) - 1
    for k in saved:
        assert torch.equal(saved[k], ckpt[f"ema.{k}"]), k


def test_resume_through_the_rule_command_repeats_the_uninterrupted_run(tiny_sd3, tmp_path):
    # tiny_sd3 stopped at step 2 (its checkpoint is in ck/); steps=3 resumes there (constant lr).
    import shutil

    shutil.copytree(tiny_sd3 / "ck", tmp_path / "ck")
    proc = _train_cli(tmp_path, {**TINY, "steps": 3}, "resumed")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stderr and "at step 2" in proc.stderr
    proc = _train_cli(tmp_path, {**TINY, "steps": 3}, "full", ckpt="ck_full")
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "resumed")
    assert a.keys() == b.keys() and len(a) > 50
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
    assert json.loads((tmp_path / "resumed" / "diffatlas_training.json").read_text())["images_seen"] == 12


def test_flow_loss_is_rectified_flow_written_by_hand():
    from diffatlas.world.train import build_pipeline, flow_matching_loss, sample_sigmas, step_generator

    cfg = WorldModelConfig(**TINY)
    pipe = build_pipeline(cfg)
    x0 = torch.rand(3, 3, 32, 32) * 2 - 1
    captions = ["a red circle", "", "a small blue square and a green triangle"]
    loss = flow_matching_loss(pipe, cfg, x0, captions, step_generator(0, 5), torch.device("cpu"))
    # By hand: the same draws in the same order, x = (1 - s) x0 + s e, target e - x0,
    # conditioning from diffusers' own encode_prompt, timestep s * 1000 as SD3's pipeline passes it.
    g = step_generator(0, 5)
    s = torch.sigmoid(torch.randn(3, generator=g))
    e = torch.randn(x0.shape, generator=g)
    sb = s.view(-1, 1, 1, 1)
    emb, _, pooled, _ = pipe.encode_prompt(captions, None, None, do_classifier_free_guidance=False,
                                           max_sequence_length=16)
    with torch.no_grad():
        v = pipe.transformer(hidden_states=(1 - sb) * x0 + sb * e, timestep=s * 1000, encoder_hidden_states=emb,
                             pooled_projections=pooled).sample
    assert float(loss) == pytest.approx(float(((v - (e - x0)) ** 2).mean()), rel=1e-5)
    # Sigma densities: logit-normal(0, 1) has logit mean 0 and sd 1; uniform has mean 1/2, var 1/12.
    s = sample_sigmas(cfg, 20000, torch.Generator().manual_seed(1))
    logit = torch.log(s / (1 - s))
    assert abs(float(logit.mean())) < 0.03 and abs(float(logit.std()) - 1) < 0.03
    u = sample_sigmas(WorldModelConfig(**{**TINY, "sigma_sampling": "uniform"}), 20000, torch.Generator().manual_seed(1))
    assert abs(float(u.mean()) - 0.5) < 0.01 and abs(float(u.var()) - 1 / 12) < 0.003


@pytest.mark.parametrize("guidance", [1.0, 2.0])
def test_flow_sampler_is_the_sd3_pipelines_loop(tiny_sd3, guidance):
    """The fidelity check's sampler (core Euler step) against StableDiffusion3Pipeline.__call__."""
    from diffatlas.models.loader import load_model
    from diffatlas.world.fidelity import sample_flow

    handle = load_model(tiny_sd3 / "model")
    cfg = FidelityConfig(n_single=3, n_two=0, num_inference_steps=4, guidance_scale=guidance, batch_size=2)
    captions = ["a red circle", "a small blue square and a green triangle", "a yellow triangle"]
    x = sample_flow(handle, captions, cfg)
    noise = torch.randn((3, 3, 32, 32), generator=torch.Generator().manual_seed(cfg.seed))
    # No VAE: the pipeline's latents are the images; it divides the size by its default
    # vae_scale_factor 8, so 256 px asks for 32x32 latents.
    ref = handle.pipeline(captions, height=256, width=256, latents=noise, num_inference_steps=4,
                          guidance_scale=guidance, output_type="latent", max_sequence_length=handle.t5_length).images
    torch.testing.assert_close(x, ref, rtol=1e-5, atol=1e-5)
    # diffusers' grid at shift 1: N sigmas evenly from 1 down to 1/T, then 0.
    assert handle.flow_sigmas(4) == pytest.approx([*np.linspace(1.0, 1 / 1000, 4), 0.0], abs=1e-6)


def test_fidelity_gate_runs_on_the_sd3_model(tiny_sd3, tmp_path):
    from diffatlas.commands import world_fidelity
    from diffatlas.world.fidelity import GATE

    cfg = {"n_single": 3, "n_two": 2, "num_inference_steps": 2, "batch_size": 5}
    rc = world_fidelity.main(["--model", str(tiny_sd3 / "model"), "--out-json", str(tmp_path / "f.json"),
                              "--out-samples", str(tmp_path / "s.npy"), "--config-json", json.dumps(cfg),
                              "--device", "cpu"])
    assert rc == 0
    rec = json.loads((tmp_path / "f.json").read_text())
    imgs = np.load(tmp_path / "s.npy")
    assert imgs.shape == (5, 32, 32, 3) and imgs.dtype == np.uint8
    assert rec["model"]["family"] == "sd3" and rec["model"]["scheduler"] == "FlowMatchEulerDiscreteScheduler"
    assert rec["sampler"]["name"] == "flow Euler" and rec["sampler"]["sigmas"] == [1.0, 0.001, 0.0]
    assert rec["gate"]["thresholds"] == GATE and rec["shape_accuracy"]["n"] == 3 and rec["two_object_rate"]["n"] == 2
    lo, hi = rec["shape_accuracy"]["ci95"]
    assert 0 <= lo <= rec["shape_accuracy"]["rate"] <= hi <= 1
    # Batching does not change the samples.
    rc = world_fidelity.main(["--model", str(tiny_sd3 / "model"), "--out-json", str(tmp_path / "g.json"),
                              "--out-samples", str(tmp_path / "t.npy"), "--config-json",
                              json.dumps({**cfg, "batch_size": 2}), "--device", "cpu"])
    assert np.abs(np.load(tmp_path / "t.npy").astype(int) - imgs.astype(int)).max() <= 1


def test_config_checks_and_the_unet_hash_is_unchanged():
    # The shipped UNet's recorded trajectory hash (computed before the sd3 fields existed).
    shipped = json.loads((ROOT / "resources/models/shapesworld/diffatlas_training.json").read_text())
    assert WorldModelConfig.from_dict(shipped["config"]).trajectory_hash() == shipped["trajectory_hash"]
    assert WorldModelConfig.from_dict({**shipped["config"], "sd3_layers": 9}).trajectory_hash() == shipped["trajectory_hash"]
    sd3 = WorldModelConfig(**TINY)
    assert sd3.trajectory_hash() != WorldModelConfig(**{**TINY, "sd3_layers": 2}).trajectory_hash()
    assert sd3.trajectory_hash() == WorldModelConfig(**{**TINY, "block_out_channels": [16, 32]}).trajectory_hash()
    with pytest.raises(UserError, match=r"world_model.architecture = 'dit' is not allowed; allowed: unet, sd3"):
        WorldModelConfig(architecture="dit")
    with pytest.raises(UserError, match=r"sd3_patch_size = 3 is not allowed with image_size 32"):
        WorldModelConfig(architecture="sd3", sd3_patch_size=3)
    with pytest.raises(UserError, match=r"sigma_sampling = 'beta' is not allowed; allowed: logit_normal, uniform"):
        WorldModelConfig(architecture="sd3", sigma_sampling="beta")
    with pytest.raises(UserError, match=r"text_hidden_size = 20 is not allowed for architecture sd3"):
        WorldModelConfig(architecture="sd3", text_hidden_size=20, text_heads=4)


def test_daam_generates_on_the_pixel_space_sd3_model(tiny_sd3):
    """DAAM generation on the VAE-less SD3 world model: each image is the core's flow Euler
    sampling (the fidelity sampler, checked above against the pipeline) from the item's own seed,
    and its word maps are on the 32x32 image grid."""
    from diffatlas.daam.trace import trace_generation
    from diffatlas.models.diffusion import flow_step
    from diffatlas.models.loader import load_model

    handle = load_model(tiny_sd3 / "model")
    prompts = ["a red circle", "a blue square"]
    run = trace_generation(handle, prompts, steps=3, guidance=1.0, seed=5, batch_size=2, layers=["transformer_blocks.*"])
    assert run.images.shape == (2, 32, 32, 3)
    sigmas = handle.flow_sigmas(3)
    for k, prompt in enumerate(prompts):
        x = torch.randn((1, 3, 32, 32), generator=torch.Generator("cpu").manual_seed(5 + k), device="cpu")
        cond = handle.conditioning([prompt])
        for s, s_next in zip(sigmas[:-1], sigmas[1:]):
            x = flow_step(handle.model_output(x, s, cond), x, s, s_next)
        expect = ((x[0].clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy()
        assert np.abs(run.images[k].astype(np.float32) / 255 - expect).max() <= 1 / 255 + 1e-4
        assert run.maps[k].token_maps.shape[1:] == (32, 32) and np.isfinite(run.maps[k].token_maps).all()
        assert run.maps[k].token_maps.sum() > 0  # the words received attention
