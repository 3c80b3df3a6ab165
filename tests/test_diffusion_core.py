"""The diffusion core (diffatlas.models.diffusion) against diffusers' own schedulers and hand values.

Oracles: ``DDIMScheduler.step(..., use_clipped_model_output=True)``, ``DDIMInverseScheduler.step``
and ``scheduler.add_noise`` from diffusers; closed forms and hand-computed numbers elsewhere.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from diffusers import DDIMInverseScheduler, DDIMScheduler

from diffatlas.errors import UserError
from diffatlas.models.diffusion import (
    CLEAN,
    PREDICTION_TYPES,
    NoiseSchedule,
    Time,
    add_noise,
    cfg_batch,
    cfg_combine,
    cfg_split,
    check_time,
    eps_x0,
    images_to_tensor,
    time_convention,
    timesteps_for,
)

SETTINGS = list(itertools.product(
    PREDICTION_TYPES,
    (0, 1),  # steps_offset
    (True, False),  # set_alpha_to_one
    (None, 1.0, 0.5),  # clip_sample off / on with its range
    ("leading", "trailing"),  # timestep_spacing
))


def _config(pred, offset, one, clip, spacing):
    return dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                prediction_type=pred, steps_offset=offset, set_alpha_to_one=one, clip_sample=clip is not None,
                clip_sample_range=clip or 1.0, timestep_spacing=spacing)


@pytest.mark.parametrize("pred,offset,one,clip,spacing", SETTINGS)
@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_ddim_step_matches_diffusers(pred, offset, one, clip, spacing, eta):
    sched = DDIMScheduler(**_config(pred, offset, one, clip, spacing))
    sched.set_timesteps(10)
    core = NoiseSchedule.from_scheduler(sched, "tiny")
    ratio = sched.config.num_train_timesteps // sched.num_inference_steps
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    worst = 0.0
    for k, t in enumerate(sched.timesteps.tolist()):
        # Outputs scaled so clipping bites at some steps.
        out = 1.5 * torch.randn(2, 4, 8, 8, generator=g)
        ref = sched.step(out, t, x, eta=eta, use_clipped_model_output=True,
                         generator=torch.Generator().manual_seed(100 + k)).prev_sample
        prev = t - ratio  # where diffusers' DDIM steps to; below 0 is the final (clean) level
        got = core.ddim_step(out, x, t, prev if prev >= 0 else CLEAN, eta=eta,
                             generator=torch.Generator().manual_seed(100 + k))
        torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-4)
        worst = max(worst, float((got - ref).abs().max()))
        x = ref
    assert worst < 2e-5


@pytest.mark.parametrize("pred,offset,one,clip,spacing", SETTINGS)
def test_ddim_inversion_step_matches_diffusers(pred, offset, one, clip, spacing):
    inv = DDIMInverseScheduler(**_config(pred, offset, one, clip, spacing))
    inv.set_timesteps(10)
    # The core reads its schedule from the forward scheduler of the same config.
    core = NoiseSchedule.from_scheduler(DDIMScheduler(**_config(pred, offset, one, clip, spacing)), "tiny")
    ratio = inv.config.num_train_timesteps // inv.num_inference_steps
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 4, 8, 8, generator=g) * 2 - 1
    for t in inv.timesteps.tolist():
        out = torch.randn(2, 4, 8, 8, generator=g)
        ref = inv.step(out, t, x).prev_sample
        src = min(t - ratio, 999)  # the level diffusers reads the output at
        got = core.ddim_invert_step(out, x, src if src >= 0 else CLEAN, t)
        torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-4)
        x = ref


def test_add_noise_matches_scheduler():
    sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    core = NoiseSchedule.from_scheduler(sched)
    g = torch.Generator().manual_seed(2)
    x0, noise = torch.randn(4, 3, 5, 5, generator=g), torch.randn(4, 3, 5, 5, generator=g)
    t = torch.tensor([0, 1, 500, 999])
    torch.testing.assert_close(core.add_noise(x0, noise, t), sched.add_noise(x0, noise, t))
    # One level for the whole batch, as a float.
    ref = sched.add_noise(x0, noise, torch.full((4,), 250))
    torch.testing.assert_close(add_noise(x0, noise, core.alpha_bar(250)), ref)


def test_eps_x0_inverts_the_forward_process_for_every_prediction_type():
    # Closed form: build x_t from known (x0, ε) and ask the core to read each kind of output back.
    g = torch.Generator().manual_seed(3)
    x0, eps = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64), torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    for a in (0.9991, 0.5, 0.0047):
        x_t = math.sqrt(a) * x0 + math.sqrt(1 - a) * eps
        outputs = {"epsilon": eps, "sample": x0, "v_prediction": math.sqrt(a) * eps - math.sqrt(1 - a) * x0}
        for kind, out in outputs.items():
            e, x = eps_x0(out, x_t, a, kind)
            torch.testing.assert_close(e, eps)
            torch.testing.assert_close(x, x0)
        # A [B, 1, 1, 1] tensor of levels gives the same.
        e, x = eps_x0(outputs["v_prediction"], x_t, torch.full((2, 1, 1, 1), a, dtype=torch.float64), "v_prediction")
        torch.testing.assert_close(e, eps)


def test_cfg_hand_values_and_batch_layout():
    u, c = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 5.0])
    assert cfg_combine(u, c, 7.5).tolist() == [16.0, 24.5]
    assert cfg_combine(u, c, 1.0).tolist() == [3.0, 5.0]
    assert cfg_combine(u, c, 0.0).tolist() == [1.0, 2.0]
    # Unconditional rows first: a model that returns its batch as is.
    x = torch.tensor([[10.0], [20.0]])
    both = cfg_batch(x)
    assert both.tolist() == [[10.0], [20.0], [10.0], [20.0]]
    out = both + torch.tensor([[0.0], [0.0], [1.0], [1.0]])  # cond rows get +1
    assert cfg_split(out, 3.0).tolist() == [[13.0], [23.0]]


def test_unknown_prediction_type_names_the_model():
    sched = DDIMScheduler()
    sched.register_to_config(prediction_type="flow")
    with pytest.raises(UserError, match=r"model my-model: .*prediction_type 'flow'.*allowed: epsilon, v_prediction, sample"):
        NoiseSchedule.from_scheduler(sched, "my-model")
    sched.register_to_config(prediction_type="epsilon", thresholding=True)
    with pytest.raises(UserError, match="thresholding"):
        NoiseSchedule.from_scheduler(sched, "my-model")


def test_final_alpha_and_clip_read_from_the_scheduler():
    s = NoiseSchedule.from_scheduler(DDIMScheduler(set_alpha_to_one=False, clip_sample=True, clip_sample_range=2.0))
    assert s.alpha_bar(CLEAN) == pytest.approx(1 - 0.0001)  # ᾱ_0 = 1 - β_0 (linear betas from 1e-4)
    assert s.clip_sample_range == 2.0
    s = NoiseSchedule.from_scheduler(DDIMScheduler(set_alpha_to_one=True, clip_sample=False))
    assert s.alpha_bar(CLEAN) == 1.0 and s.clip_sample_range is None


def test_time_string_form_round_trips_and_rejects_garbage():
    assert str(Time.step(250)) == "t250" and str(Time.sigma(0.5)) == "s0.500"
    for text, want in [("t250", Time.step(250)), ("250", Time.step(250)), (7, Time.step(7)),
                       ("s0.5", Time.sigma(0.5)), ("s1", Time.sigma(1.0)), ("s0.125", Time.sigma(0.125))]:
        assert Time.parse(text) == want
        assert Time.parse(str(want)) == want
    for bad in ("x3", "t-1", "s1.5", "s", "t2.5", True, ""):
        with pytest.raises(UserError, match="not allowed"):
            Time.parse(bad)
    assert sorted([Time.step(500), Time.step(20)]) == [Time.step(20), Time.step(500)]


def test_check_time_per_model_convention():
    assert check_time(250, "step", 1000, "extract.timesteps[0]", "sd") == Time.step(250)
    with pytest.raises(UserError, match=r"extract.timesteps\[0\] = 1000 is out of range for model 'sd'; allowed: integers 0..999"):
        check_time(1000, "step", 1000, "extract.timesteps[0]", "sd")
    with pytest.raises(UserError, match="flow-matching model"):
        check_time("t250", "sigma", None, "models.sd3.timesteps[0]", "sd3")
    with pytest.raises(UserError, match="integer training steps"):
        check_time("s0.500", "step", 1000, "models.sd.timesteps[0]", "sd")
    # A flow-matching model is not refused for having no ᾱ: its sigmas are checked instead.
    assert check_time("s0.250", "sigma", None, "models.sd3.timesteps[0]", "sd3") == Time.sigma(0.25)
    assert time_convention({"_class_name": "FlowMatchEulerDiscreteScheduler"}) == "sigma"
    assert time_convention({"_class_name": "DDIMScheduler"}) == "step"
    assert time_convention(DDIMScheduler()) == "step"


def test_timesteps_for_prefers_the_models_own_list():
    cfg = {"models": {"a": {"path": "x"}, "b": {"path": "y", "timesteps": ["s0.250", "s0.750"]}},
           "extract": {"timesteps": [50, 500]}}
    assert timesteps_for(cfg, "a") == [Time.step(50), Time.step(500)]
    assert timesteps_for(cfg, "b") == [Time.sigma(0.25), Time.sigma(0.75)]


def test_images_to_tensor_pixel_range_and_resize():
    img = np.zeros((1, 2, 2, 3), np.uint8)
    img[0, 0, 0] = [0, 255, 51]
    x = images_to_tensor(img)
    assert x.shape == (1, 3, 2, 2)
    assert x[0, :, 0, 0].tolist() == pytest.approx([-1.0, 1.0, 51 / 127.5 - 1])
    assert x[0, 0, 1, 1].item() == -1.0
    big = images_to_tensor(np.full((2, 8, 8, 3), 255, np.uint8), size=4)
    assert big.shape == (2, 3, 4, 4) and torch.allclose(big, torch.ones_like(big))


def test_config_times_checked_per_model_convention(tmp_path):
    import json

    from diffatlas.config import check_timesteps

    def model(name, sched):
        d = tmp_path / name / "scheduler"
        d.mkdir(parents=True)
        (d / "scheduler_config.json").write_text(json.dumps(sched))
        return str(tmp_path / name)

    paths = {"ddim": model("ddim", {"_class_name": "DDIMScheduler", "num_train_timesteps": 500}),
             "flow": model("flow", {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000})}
    cfg = {"models": {"ddim": {"path": paths["ddim"]}, "flow": {"path": paths["flow"]}},
           "extract": {"models": ["ddim", "flow"], "timesteps": [10, 400]}}
    # The flow-matching model is not refused for lacking ᾱ, but integer steps do not fit it.
    with pytest.raises(UserError, match=r"extract.timesteps\[0\] = 10 is not allowed for model 'flow'.*sigmas"):
        check_timesteps(cfg, paths)
    cfg["models"]["flow"]["timesteps"] = ["s0.250", "s0.750"]
    check_timesteps(cfg, paths)  # its own list replaces the global one
    cfg["models"]["ddim"]["timesteps"] = ["t100", "t500"]
    with pytest.raises(UserError, match=r"models.ddim.timesteps\[1\] = 't500' is out of range for model 'ddim'; "
                                        r"allowed: integers 0..499"):
        check_timesteps(cfg, paths)
