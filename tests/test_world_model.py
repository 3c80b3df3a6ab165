"""The ShapesWorld model trainer: a few steps on a tiny config, loading, resume, fidelity."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from diffatlas.errors import UserError
from diffatlas.world.config import FidelityConfig, WorldModelConfig

torch.set_num_threads(1)

# A tiny network (same block types as the real one) so a step takes milliseconds.
TINY = dict(
    steps=3, batch_size=4, block_out_channels=[8, 16, 16], norm_num_groups=4, num_attention_heads=2,
    text_hidden_size=16, text_heads=2, text_layers=1, warmup=2, checkpoint_every=1, log_every=1,
)


def _weights(model_dir) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for sub in ("unet", "text_encoder"):
        for f in sorted((model_dir / sub).glob("*.safetensors")):
            out.update({f"{sub}.{k}": v for k, v in load_file(str(f)).items()})
    return out


def test_train_few_steps_gives_loadable_model(tmp_path):
    from diffatlas.models.loader import load_model
    from diffatlas.world.train import TRAINING_INFO, train_world_model

    cfg = WorldModelConfig(**{**TINY, "checkpoint_every": 2})
    summary = train_world_model(cfg, tmp_path / "model", checkpoint_dir=tmp_path / "ckpt")
    assert summary["finished"] and summary["step"] == 3 and summary["images_seen"] == 12
    assert len(summary["loss_history"]) == 3 and all(np.isfinite(l) for _, l in summary["loss_history"])

    handle = load_model(tmp_path / "model")
    assert handle.family == "pixel" and handle.image_size == 32 and handle.num_train_timesteps == 1000
    # The SD module paths every analysis hooks exist.
    names = dict(handle.denoiser.named_modules())
    assert "mid_block" in names and "up_blocks.1.attentions.0.transformer_blocks.0.attn2" in names
    assert not any(".attn" in n for n in names if n.startswith(("down_blocks.0.", "up_blocks.2.")))  # no 32x32 attention
    # Training's padded tokenizer calls leave no state in the saved tokenizer.json.
    saved_tok = json.loads((tmp_path / "model" / "tokenizer" / "tokenizer.json").read_text())
    assert saved_tok["padding"] is None and saved_tok["truncation"] is None
    cond = handle.conditioning(["a red circle", ""])
    eps = handle.predict_noise(torch.zeros(2, 3, 32, 32), 500, cond)
    assert eps.shape == (2, 3, 32, 32) and torch.isfinite(eps).all()
    # The saved weights are the EMA weights of the checkpoint.
    from safetensors.torch import load_file

    ckpt = load_file(str(tmp_path / "ckpt" / "last" / "model.safetensors"))
    saved = _weights(tmp_path / "model")
    for key in ("unet.conv_in.weight", "text_encoder.embeddings.token_embedding.weight"):
        assert torch.equal(saved[key], ckpt[f"ema.{key}"])
        assert not torch.equal(saved[key], ckpt[key])  # EMA differs from the raw weights
    info = json.loads((tmp_path / "model" / TRAINING_INFO).read_text())
    assert info["config"]["seed"] == 0 and info["trajectory_hash"] == cfg.trajectory_hash()


def test_resume_repeats_the_uninterrupted_run(tmp_path):
    from diffatlas.world.train import train_world_model

    # Constant lr: a run of 2 steps extended to 4 is the 4-step run.
    const = {**TINY, "lr_schedule": "constant"}
    full = WorldModelConfig(**{**const, "steps": 4})
    train_world_model(full, tmp_path / "full", checkpoint_dir=None)
    # Two steps, then "interrupted"; a second call with steps=4 resumes at step 2.
    half = train_world_model(WorldModelConfig(**{**const, "steps": 2}), tmp_path / "half", checkpoint_dir=tmp_path / "ck")
    assert half["step"] == 2
    resumed = train_world_model(full, tmp_path / "resumed", checkpoint_dir=tmp_path / "ck")
    assert resumed["step"] == 4 and resumed["images_seen"] == 16
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "resumed")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
    # Asking for fewer steps than the checkpoint has is an error, never a silent restart.
    with pytest.raises(UserError, match="past world_model.train.steps = 3"):
        train_world_model(WorldModelConfig(**{**const, "steps": 3}), tmp_path / "x", checkpoint_dir=tmp_path / "ck")
    # A checkpoint of another trajectory is not used.
    other = WorldModelConfig(**{**const, "steps": 4, "lr": 5e-4})
    fresh = train_world_model(other, tmp_path / "other", checkpoint_dir=tmp_path / "ck", max_seconds=0.0)
    assert fresh["step"] == 1 and not fresh["finished"]


def test_cosine_run_resumes_onto_its_trajectory(tmp_path):
    from diffatlas.world.train import train_world_model

    cos = WorldModelConfig(**{**TINY, "steps": 4, "lr_schedule": "cosine", "warmup": 1})
    train_world_model(cos, tmp_path / "full", checkpoint_dir=None)
    # Interrupted after one step (max_seconds=0), then resumed: the same weights.
    cut = train_world_model(cos, tmp_path / "cut", checkpoint_dir=tmp_path / "ck", max_seconds=0.0)
    assert cut["step"] == 1 and not cut["finished"]
    resumed = train_world_model(cos, tmp_path / "resumed", checkpoint_dir=tmp_path / "ck")
    assert resumed["step"] == 4
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "resumed")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
    # Another step count is another schedule: its checkpoint is not resumed.
    longer = WorldModelConfig(**{**TINY, "steps": 6, "lr_schedule": "cosine", "warmup": 1})
    fresh = train_world_model(longer, tmp_path / "longer", checkpoint_dir=tmp_path / "ck", max_seconds=0.0)
    assert fresh["step"] == 1


def test_batches_are_seeded_and_match_their_captions():
    from diffatlas.data.shapesworld import parse_caption
    from diffatlas.world.judge import judge_images, matches_caption
    from diffatlas.world.train import sample_batch

    cfg = WorldModelConfig(caption_dropout=0.25, colour_word_prob=1.0)
    imgs, caps = sample_batch(cfg, step=7, batch_size=64)
    imgs2, caps2 = sample_batch(cfg, step=7, batch_size=64)
    assert np.array_equal(imgs, imgs2) and caps == caps2
    assert not np.array_equal(imgs, sample_batch(cfg, step=8, batch_size=64)[0])
    dropped = [c == "" for c in caps]
    assert 4 <= sum(dropped) <= 30  # Binomial(64, 0.25): mean 16
    n_two = 0
    for img, cap, verdict in zip(imgs, caps, judge_images(imgs)):
        if not cap:
            continue
        _, objects = parse_caption(cap)
        n_two += len(objects) == 2
        assert matches_caption(verdict, objects)["all"], (cap, verdict)
    assert n_two > 5


def test_noise_and_loss_weights_follow_the_scheduler():
    from diffatlas.models.diffusion import add_noise
    from diffatlas.world.train import make_scheduler, min_snr_weights

    sched = make_scheduler(WorldModelConfig())
    ac = sched.alphas_cumprod.float()
    x0, noise = torch.rand(5, 3, 8, 8) * 2 - 1, torch.randn(5, 3, 8, 8)
    t = torch.tensor([0, 10, 500, 900, 999])
    torch.testing.assert_close(add_noise(x0, noise, ac[t].view(-1, 1, 1, 1)), sched.add_noise(x0, noise, t))
    w = min_snr_weights(ac, 5.0)
    snr = ac / (1 - ac)
    assert torch.all(w[snr <= 5] == 1.0)
    torch.testing.assert_close(w[snr > 5], 5.0 / snr[snr > 5])
    assert torch.equal(min_snr_weights(ac, 0.0), torch.ones(1000))
    # DDPM's linear betas: at DDIM's first step (t = 950 of 20 leading steps) ~1% of the
    # image is left (sqrt ᾱ), so starting from N(0, I) is nearly right; the cosine one leaves 7.6%.
    assert sched.config.beta_schedule == "linear"
    assert 0.009 < float(ac[950].sqrt()) < 0.012
    cos = make_scheduler(WorldModelConfig(beta_schedule="squaredcos_cap_v2")).alphas_cumprod
    assert 0.07 < float(cos[950].sqrt()) < 0.08


def test_config_validation_and_resume_hash():
    with pytest.raises(UserError, match="world_model.train.lr"):
        WorldModelConfig.from_dict({"lr": -1})
    with pytest.raises(UserError, match="unknown config key.*in world_model.train: stepz"):
        WorldModelConfig.from_dict({"stepz": 3})
    with pytest.raises(UserError, match="block_out_channels"):
        WorldModelConfig(block_out_channels=[30, 64, 64])
    with pytest.raises(UserError, match="world_model.fidelity.num_inference_steps"):
        FidelityConfig.from_dict({"num_inference_steps": 0})
    base = WorldModelConfig(lr_schedule="constant")
    assert WorldModelConfig(lr_schedule="constant", steps=99, log_every=3).trajectory_hash() == base.trajectory_hash()
    assert WorldModelConfig(lr_schedule="constant", lr=5e-4).trajectory_hash() != base.trajectory_hash()
    with pytest.raises(UserError, match="world_model.train.lr_schedule.*allowed: constant, cosine"):
        WorldModelConfig.from_dict({"lr_schedule": "step"})
    # Under the cosine schedule the step count shapes every learning rate: no resuming across it.
    cos = WorldModelConfig(lr_schedule="cosine")
    assert WorldModelConfig(lr_schedule="cosine", steps=99).trajectory_hash() != cos.trajectory_hash()
    assert WorldModelConfig(lr_schedule="cosine", log_every=3).trajectory_hash() == cos.trajectory_hash()


def test_learning_rate_schedules():
    from diffatlas.world.train import lr_at

    const = WorldModelConfig(lr=1e-3, warmup=10, steps=110, lr_schedule="constant")
    assert lr_at(const, 0) == pytest.approx(1e-4) and lr_at(const, 9) == pytest.approx(1e-3)
    assert lr_at(const, 109) == pytest.approx(1e-3)
    cos = WorldModelConfig(lr=1e-3, warmup=10, steps=111, lr_schedule="cosine", lr_final=0.1)
    assert lr_at(cos, 9) == pytest.approx(1e-3) and lr_at(cos, 10) == pytest.approx(1e-3)
    # Half-way through the decay the cosine is at the mean of the two ends; the last step ends it.
    assert lr_at(cos, 60) == pytest.approx(0.55e-3)
    assert lr_at(cos, 110) == pytest.approx(1e-4)
    lrs = [lr_at(cos, s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_fidelity_end_to_end_on_a_tiny_model(tmp_path):
    from diffatlas.commands import world_fidelity
    from diffatlas.models.tiny import make_tiny_model

    model = make_tiny_model("pixel", tmp_path / "tiny")
    cfg = {"n_single": 3, "n_two": 2, "num_inference_steps": 2, "batch_size": 2, "grid_rows": 2, "grid_cols": 3}
    rc = world_fidelity.main(["--model", str(model), "--out-json", str(tmp_path / "f.json"), "--out-samples",
                              str(tmp_path / "s.npy"), "--config-json", json.dumps(cfg), "--device", "cpu"])
    assert rc == 0
    rec = json.loads((tmp_path / "f.json").read_text())
    imgs = np.load(tmp_path / "s.npy")
    assert imgs.shape == (5, 32, 32, 3) and imgs.dtype == np.uint8
    assert [s["caption"] for s in rec["samples"][:3]] == ["a red circle", "a green circle", "a blue circle"]
    assert rec["shape_accuracy"]["n"] == 3 and rec["two_object_rate"]["n"] == 2
    assert rec["model"]["revision"] and rec["sampler"]["num_inference_steps"] == 2
    # Batching does not change the samples: the noise is drawn once from the seed.
    rc = world_fidelity.main(["--model", str(model), "--out-json", str(tmp_path / "g.json"), "--out-samples",
                              str(tmp_path / "t.npy"), "--config-json", json.dumps({**cfg, "batch_size": 5}),
                              "--device", "cpu"])
    assert np.abs(np.load(tmp_path / "t.npy").astype(int) - imgs.astype(int)).max() <= 1
    rc = world_fidelity.main(["--figure", str(tmp_path / "grid.png"), "--fidelity-json", str(tmp_path / "f.json"),
                              "--samples", str(tmp_path / "s.npy"), "--config-json", json.dumps(cfg)])
    assert rc == 0 and (tmp_path / "grid.png").stat().st_size > 1000
