"""Interventions during generation: no-op edits are bit-identical on every family, a planted
toy responds to steering and clamping exactly as computed by hand, and bad input is one clear
error naming the artifact."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from diffatlas.activations.layers import ResolvedLayer
from diffatlas.cli import main as cli
from diffatlas.errors import UserError
from diffatlas.interventions.edit import SteeringSAE
from diffatlas.interventions.generate import prepare, sample
from diffatlas.interventions.hook import InterventionHook
from diffatlas.interventions.spec import Intervention
from diffatlas.sae.config import SAEArch
from diffatlas.sae.model import TopKSAE

# family -> (layer, prompts): a map layer, a down block (tuple output), an up block, DiT tokens
FAMILIES = {
    "pixel": ("mid", ["a red circle", "a blue square"]),
    "sd": ("down_ft1", ["a red circle", "a blue square"]),
    "sd-v": ("up_ft1", ["a red circle", "a blue square"]),
    "sdxl": ("mid", ["a red circle", "a blue square"]),
    "dit": ("block0", ["red circle", "blue square"]),
}


def save_sae(path, d, *, model="tiny", layer="mid", module_path="mid_block", samples="spatial", n=16, k=4,
             scale=0.5, seed=0, dead=None, W_enc=None, W_dec=None, pooling="mean"):
    """A TopK SAE with the cfg.json provenance train-sae writes (random weights unless given)."""
    sae = TopKSAE(SAEArch(d_in=d, n_latents=n, k=k, k_aux=min(n, 8)), seed=seed)
    with torch.no_grad():
        if W_enc is not None:
            sae.W_enc.copy_(torch.tensor(W_enc))
        if W_dec is not None:
            sae.W_dec.copy_(torch.tensor(W_dec))
        if dead is not None:
            sae.b_enc[dead] = -1e6  # never selected: an inactive latent
    sae.save(path, {"model": model, "layer": layer, "module_path": module_path, "samples": samples, "pooling": pooling,
                    "input_scale": scale, "timestep": 500})
    return path


def layer_channels(handle, module_path):
    module = dict(handle.denoiser.named_modules())[module_path]
    seen = {}

    def keep(m, i, o):
        seen["x"] = o[0] if isinstance(o, tuple) else o  # returns None: the output is left as is

    h = module.register_forward_hook(keep)
    try:
        x = torch.zeros(1, handle.latent_channels, handle.latent_size, handle.latent_size)
        handle.model_output(x, 500, handle.conditioning(["red circle" if handle.family == "dit" else "a"]))
    finally:
        h.remove()
    x = seen["x"]
    return x.shape[-1] if x.ndim == 3 else x.shape[1]


@pytest.fixture(scope="module")
def handles(tmp_path_factory):
    from diffatlas.models.loader import load_model
    from diffatlas.models.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("intervene")
    return {f: (load_model(make_tiny_model(f, root / f)), root / f) for f in FAMILIES}


# ------------------------------------------------------------------ the sampler itself
def test_sampler_matches_the_diffusers_pipeline(handles):
    """Without a hook our DDIM + CFG equals ShapesWorldPipeline's (diffusers' DDIMScheduler.step)."""
    from diffatlas.geometry.sampling import initial_noise

    handle, _ = handles["pixel"]
    prompts = FAMILIES["pixel"][1]
    ours = sample(handle, prompts, seed=3, steps=3, guidance_scale=3.0)
    noise = initial_noise(handle, len(prompts), 3)
    ref = handle.pipeline(prompts, num_inference_steps=3, guidance_scale=3.0, latents=noise, output_type="pt").images
    assert torch.allclose(ours.clamp(-1, 1), ref * 2 - 1, atol=1e-5)


# ------------------------------------------------------------------ no-op edits, every family
@pytest.mark.parametrize("family", list(FAMILIES))
def test_noop_edits_are_bit_identical_and_real_edits_are_not(handles, family, tmp_path):
    handle, _ = handles[family]
    layer, prompts = FAMILIES[family]
    from diffatlas.interventions.generate import resolve_layer

    path = resolve_layer(handle, layer).module_path
    d = layer_channels(handle, path)
    sae_dir = save_sae(tmp_path / "sae", d, layer=layer, module_path=path, dead=[5])
    base = sample(handle, prompts, seed=0, steps=2, guidance_scale=3.0)

    def run(**kw):
        spec = Intervention(**{"latent": 5, "t_max": 999, "t_min": 0, **kw})
        hook, *_ = prepare(handle, sae_dir, layer, spec, model="tiny", steps=2, guidance_scale=3.0)
        return sample(handle, prompts, seed=0, steps=2, guidance_scale=3.0, hook=hook), hook

    out, hook = run(mode="steer", alpha=0.0)
    assert torch.equal(out, base) and hook.passes == 2 and hook.edited_passes == 0
    out, hook = run(mode="ablate")  # latent 5 never fires
    assert torch.equal(out, base) and hook.edited_passes == 0
    out, hook = run(mode="steer", alpha=0.0, where="active", cfg_branch="cond")
    assert torch.equal(out, base)
    out, hook = run(mode="steer", alpha=20.0)
    assert not torch.equal(out, base) and hook.edited_passes == 2
    out, hook = run(mode="clamp", value=20.0, cfg_branch="cond")  # a dead latent forced on
    assert not torch.equal(out, base) and hook.edited_passes == 2


# ------------------------------------------------------------------ a planted toy, by hand
class Toy(nn.Module):
    """A denoiser whose output is linear in its ``mid_block`` output: out = R · mid(x) (1×1 convs)."""

    R = [[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [1.0, 1.0, 1.0]]

    def __init__(self):
        super().__init__()
        self.mid_block = nn.Identity()
        self.readout = nn.Conv2d(3, 3, 1, bias=True)
        with torch.no_grad():
            self.readout.weight.copy_(torch.tensor(self.R)[:, :, None, None])
            self.readout.bias.copy_(torch.tensor([0.5, -0.25, 0.0]))

    def forward(self, x, t, **kw):
        return SimpleNamespace(sample=self.readout(self.mid_block(x)))


# planted SAE: d = 3, three latents, the third dead, so latents 0 and 1 are always the top k = 2;
# z_0 = scale · relu(x_0)
PLANTED = {"W_enc": [[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 0.0]],
           "W_dec": [[0.6, 0.8, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0]], "n": 3, "k": 2, "dead": [2],
           "layer": "mid", "module_path": "mid_block", "model": "toy"}
MID = ResolvedLayer("mid", "mid_block")


def toy_input():
    """[2, 3, 1, 2]: channel 0 is +1.5 at position 0 and −1 at position 1 (latent 0 active at position 0 only)."""
    x = torch.zeros(2, 3, 1, 2)
    x[:, 0, 0, 0], x[:, 0, 0, 1] = 1.5, -1.0
    x[:, 1], x[:, 2] = 0.25, -0.5
    return x


def toy_pass(spec, sae_dir, guided=False, x=None):
    toy = Toy()
    x = toy_input() if x is None else x
    t = torch.tensor([500, 500])
    base = toy(x, t).sample
    hook = InterventionHook(toy, MID, spec, SteeringSAE.load(sae_dir), guided=guided)
    with hook:
        out = toy(x, t).sample
    return out - base, out, base, hook


def test_planted_toy_steering_by_hand(tmp_path):
    sae_dir = save_sae(tmp_path / "sae", 3, scale=2.0, **PLANTED)
    # unit atom (0.6, 0.8, 0); α = 2 -> mid += (1.2, 1.6, 0) -> out += R (1.2, 1.6, 0) = (1.2, 3.2, 2.8)
    diff, *_ = toy_pass(Intervention(latent=0, alpha=2.0), sae_dir)
    assert torch.allclose(diff, torch.tensor([1.2, 3.2, 2.8])[None, :, None, None].expand(2, 3, 1, 2), atol=1e-6)
    # direction atom = W_dec[0] / input_scale = (0.3, 0.4, 0); α = 2 -> R (0.6, 0.8, 0) = (0.6, 1.6, 1.4)
    diff, *_ = toy_pass(Intervention(latent=0, alpha=2.0, direction="atom"), sae_dir)
    assert torch.allclose(diff[:, :, 0, 1], torch.tensor([0.6, 1.6, 1.4]).expand(2, 3), atol=1e-6)
    # where active: latent 0 fires at position 0 only (x_0 = 1.5 > 0; −1 there is ReLU'd away)
    diff, *_ = toy_pass(Intervention(latent=0, alpha=2.0, where="active"), sae_dir)
    assert torch.allclose(diff[:, :, 0, 0], torch.tensor([1.2, 3.2, 2.8]).expand(2, 3), atol=1e-6)
    assert torch.equal(diff[:, :, 0, 1], torch.zeros(2, 3))
    # conditional branch only: rows [uncond, cond] -> row 0 untouched
    diff, *_ = toy_pass(Intervention(latent=0, alpha=2.0, cfg_branch="cond"), sae_dir, guided=True)
    assert torch.equal(diff[0], torch.zeros(3, 1, 2))
    assert torch.allclose(diff[1], torch.tensor([1.2, 3.2, 2.8])[:, None, None].expand(3, 1, 2), atol=1e-6)
    # outside the window: untouched
    _, out, base, hook = toy_pass(Intervention(latent=0, alpha=2.0, t_max=400, t_min=0), sae_dir)
    assert torch.equal(out, base) and hook.edited_passes == 0


def test_planted_toy_clamp_and_ablate_by_hand(tmp_path):
    sae_dir = save_sae(tmp_path / "sae", 3, scale=2.0, **PLANTED)
    # z_0 = 2 · 1.5 = 3 at position 0, 0 at position 1. Clamp to the current value: identity.
    _, out, base, hook = toy_pass(Intervention(latent=0, mode="clamp", value=3.0, where="active"), sae_dir)
    assert torch.equal(out, base) and hook.edited_passes == 0
    # clamp to 5: Δz = 2 -> mid += 2 (0.6, 0.8, 0) / 2 = (0.6, 0.8, 0) -> out += (0.6, 1.6, 1.4); position 1 untouched
    diff, *_ = toy_pass(Intervention(latent=0, mode="clamp", value=5.0, where="active"), sae_dir)
    assert torch.allclose(diff[:, :, 0, 0], torch.tensor([0.6, 1.6, 1.4]).expand(2, 3), atol=1e-6)
    assert torch.equal(diff[:, :, 0, 1], torch.zeros(2, 3))
    # ablate: Δz = −3 -> mid += −3 (0.3, 0.4, 0) = (−0.9, −1.2, 0) -> out += (−0.9, −2.4, −2.1)
    diff, *_ = toy_pass(Intervention(latent=0, mode="ablate"), sae_dir)
    assert torch.allclose(diff[:, :, 0, 0], torch.tensor([-0.9, -2.4, -2.1]).expand(2, 3), atol=1e-6)
    # the same as decode(z') − decode(z) through the SAE's own (sparse) decoder
    sae = SteeringSAE.load(sae_dir)
    v = toy_input()[:, :, 0, 0] * 2.0
    vals, idx = sae.sae.encode(v)
    vals2 = torch.where(idx == 0, torch.zeros_like(vals), vals)
    ref = (sae.sae.decode(vals2, idx) - sae.sae.decode(vals, idx)) / 2.0
    assert torch.allclose(ref, torch.tensor([-0.9, -1.2, 0.0]).expand(2, 3), atol=1e-6)


def test_pooled_sae_edits_the_pooled_vector(tmp_path):
    """A pooled SAE reads z from the mean over positions and spreads the edit evenly."""
    sae_dir = save_sae(tmp_path / "sae", 3, scale=2.0, samples="pooled", **PLANTED)
    x = toy_input()
    x[:, 0, 0, 1] = 0.5  # mean of channel 0 = (1.5 + 0.5) / 2 = 1 -> z_0 = 2
    # ablate: Δz = −2 -> Δ pooled = −2 (0.3, 0.4, 0) = (−0.6, −0.8, 0) at every position -> out += (−0.6, −1.6, −1.4)
    diff, *_ = toy_pass(Intervention(latent=0, mode="ablate"), sae_dir, x=x)
    assert torch.allclose(diff, torch.tensor([-0.6, -1.6, -1.4])[None, :, None, None].expand(2, 3, 1, 2), atol=1e-6)
    _, out, base, _ = toy_pass(Intervention(latent=0, mode="clamp", value=2.0), sae_dir, x=x)
    assert torch.equal(out, base)


def test_planted_toy_through_one_ddim_step(tmp_path):
    """The whole sampler: one DDIM step t=0 -> clean, so x0 = (x_t − sqrt(1 − ᾱ_0) ε) / sqrt(ᾱ_0) and a
    steering change Δε = R α d moves the image by −sqrt(1 − ᾱ_0) / sqrt(ᾱ_0) · Δε (ᾱ_0 = 1 − β_0 = 0.9999)."""
    from diffusers import DDIMScheduler

    from diffatlas.models.diffusion import NoiseSchedule

    sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                          clip_sample=False)
    toy = Toy().double()  # float64, so the float32 rounding of ~1 values does not hide a 1e-6 check
    handle = SimpleNamespace(
        scheduler=sched, schedule=NoiseSchedule.from_scheduler(sched), denoiser=toy, latent_channels=3, latent_size=2,
        num_train_timesteps=1000, device=torch.device("cpu"), dtype=torch.float64,
        conditioning=lambda prompts: {},
        model_output=lambda x, t, cond: toy(x, torch.as_tensor(t).expand(x.shape[0])).sample,
    )
    sae_dir = save_sae(tmp_path / "sae", 3, scale=2.0, **PLANTED)
    spec = Intervention(latent=0, alpha=2.0, t_max=0, t_min=0)
    base = sample(handle, ["", ""], seed=0, steps=1, guidance_scale=1.0)
    hook = InterventionHook(toy, MID, spec, SteeringSAE.load(sae_dir), guided=False)
    out = sample(handle, ["", ""], seed=0, steps=1, guidance_scale=1.0, hook=hook)
    a0 = float(torch.tensor(1.0) - torch.tensor(1e-4))  # ᾱ_0 = 1 − β_0 as diffusers stores it (float32)
    factor = -math.sqrt(1 - a0) / math.sqrt(a0)
    expected = factor * torch.tensor([1.2, 3.2, 2.8], dtype=torch.float64)[None, :, None, None].expand(2, 3, 2, 2)
    assert hook.edited_passes == 1
    assert torch.allclose(out - base, expected, atol=1e-8)


# ------------------------------------------------------------------ latent j's code without the full TopK
@pytest.mark.parametrize("gather", [True, False])
def test_code_of_one_latent_equals_the_saes_topk_code(tmp_path, gather):
    """z_j by rank (only at pre_j > 0 when gathering) equals column j of the SAE's dense TopK codes."""
    torch.manual_seed(0)
    d, n, k = 12, 48, 5
    sae_dir = save_sae(tmp_path / "sae", d, n=n, k=k, scale=0.7)
    sae = SteeringSAE.load(sae_dir)
    with torch.no_grad():
        sae.sae.b_enc.normal_(0, 0.3)
        sae.sae.b_pre.normal_(0, 0.2)
    sae._cache.clear()
    x = torch.randn(3, 20, d)  # [B, P, C]
    dense = sae.sae.codes(x.reshape(-1, d) * 0.7).reshape(3, 20, n)  # brute force: topk of every vector
    rows = torch.tensor([True, False, True])
    for j in range(n):
        z = sae.code(x, j, gather=gather)
        assert torch.allclose(z, dense[..., j], atol=1e-5), j
        zr = sae.code(x, j, where=rows[:, None].expand(3, 20), gather=gather)
        assert torch.allclose(zr[rows], dense[rows][..., j], atol=1e-5) and torch.equal(zr[1], torch.zeros(20))
    # one latent per vector
    per = torch.randint(0, n, (3, 20))
    z = sae.code(x, per, gather=gather)
    assert torch.allclose(z, dense.gather(-1, per[..., None])[..., 0], atol=1e-5)
    assert (dense > 0).any(-1).any() and (dense == 0).any()


# ------------------------------------------------------------------ bad input
def test_bad_input_names_the_artifact(handles, tmp_path):
    handle, _ = handles["pixel"]
    d = layer_channels(handle, "mid_block")
    sae_dir = save_sae(tmp_path / "sae", d)
    ok = dict(model="tiny", steps=4, guidance_scale=3.0)
    with pytest.raises(UserError, match=r"latent 16 is out of range .*sae.*allowed: 0\.\.15"):
        prepare(handle, sae_dir, "mid", Intervention(latent=16, alpha=1.0), **ok)
    with pytest.raises(UserError, match=r"cfg.json was trained on model 'tiny'.*hooked model is 'other'"):
        prepare(handle, sae_dir, "mid", Intervention(latent=1, alpha=1.0), **{**ok, "model": "other"})
    with pytest.raises(UserError, match=r"cfg.json was trained on layer 'mid'.*hooked layer is 'up_ft1'"):
        prepare(handle, sae_dir, "up_ft1", Intervention(latent=1, alpha=1.0), **ok)
    with pytest.raises(UserError, match=r"window t_max.*1200.*out of range.*0\.\.999"):
        prepare(handle, sae_dir, "mid", Intervention(latent=1, alpha=1.0, t_max=1200), **ok)
    with pytest.raises(UserError, match=r"window t700\.\.t600 .* holds none of the sampler's 4 timesteps"):
        prepare(handle, sae_dir, "mid", Intervention(latent=1, alpha=1.0, t_max=700, t_min=600), **ok)
    with pytest.raises(UserError, match="t_max = 1 < t_min = 5"):
        Intervention(latent=1, t_max=1, t_min=5)
    with pytest.raises(UserError, match="mode = 'steeer' is not allowed"):
        Intervention(latent=1, mode="steeer")
    wrong = save_sae(tmp_path / "sae7", d + 1)
    hook, *_ = prepare(handle, wrong, "mid", Intervention(latent=1, alpha=1.0), **ok)
    with pytest.raises(UserError, match=r"sae7/cfg.json takes vectors of d_in = %d .* outputs %d" % (d + 1, d)):
        sample(handle, ["a red circle"], seed=0, steps=1, guidance_scale=1.0, hook=hook)
    with pytest.raises(UserError, match="no SAE at"):
        prepare(handle, tmp_path / "nothing", "mid", Intervention(latent=1, alpha=1.0), **ok)


# ------------------------------------------------------------------ the command
def test_intervene_command_writes_the_artifact(handles, tmp_path, capsys):
    handle, model_dir = handles["pixel"]
    sae_dir = save_sae(tmp_path / "sae", layer_channels(handle, "mid_block"))
    out = tmp_path / "out"
    common = ["intervene", "--model", str(model_dir), "--model-name", "tiny", "--sae", str(sae_dir), "--layer", "mid",
              "--latent", "3", "--prompt", "a red circle", "--prompt", "a blue square", "--steps", "2", "--seed", "7",
              "--device", "cpu", "--threads", "1", "--out", str(out)]
    assert cli([*common, "--mode", "steer", "--alpha", "10", "--cfg-branch", "cond", "--t-max", "600"]) == 0
    info = json.loads((out / "intervention.json").read_text())
    assert info["intervention"] == {"latent": 3, "mode": "steer", "alpha": 10.0, "value": 0.0, "direction": "unit",
                                    "where": "all", "t_max": 600, "t_min": 0, "cfg_branch": "cond"}
    assert (info["model"], info["layer"], info["module_path"], info["seed"]) == ("tiny", "mid", "mid_block", 7)
    assert info["prompts"] == ["a red circle", "a blue square"] and info["device"] == "cpu" and info["dtype"] == "float32"
    assert info["window"]["sampler_timesteps"] == [500, 0] and info["window"]["sampler_timesteps_inside"] == [500, 0]
    assert info["sae"]["granularity"] == "position" and info["cfg"]["branch"] == "cond" and info["edited_passes"] == 2
    imgs = load_file(str(out / "images.safetensors"))
    assert imgs["baseline"].shape == (2, 32, 32, 3) and imgs["baseline"].dtype == torch.uint8
    assert not torch.equal(imgs["baseline_x0"], imgs["intervened_x0"])
    # bad input through the CLI: one line, exit status 2, nothing written
    bad = tmp_path / "bad"
    rc = cli([*common[:-1], str(bad), "--latent", "99", "--alpha", "1"])
    assert rc == 2 and not bad.exists()
    assert "latent 99 is out of range for SAE" in capsys.readouterr().err
