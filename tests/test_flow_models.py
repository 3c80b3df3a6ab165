"""SD3 and Flux (joint attention, flow matching): the offline T5 tokenizer, the tiny models'
``from_pretrained`` round trip, the loader's conditioning and velocity, extraction into an
activation store, and bad input.

Oracles: diffusers' own pipelines (``StableDiffusion3Pipeline`` / ``FluxPipeline.__call__``
with given latents, read back as Euler steps of our velocity), diffusers'
``FlowMatchEulerDiscreteScheduler.scale_noise`` for the noised input of extraction, and
token grids laid out by explicit loops.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from diffatlas.activations.config import ExtractConfig
from diffatlas.activations.extract import extract_activations
from diffatlas.activations.layers import layer_aliases, resolve_layers
from diffatlas.activations.noise import sample_noise
from diffatlas.activations.store import ActivationStore
from diffatlas.errors import UserError
from diffatlas.models.diffusion import Time, flow_step, images_to_tensor
from diffatlas.models.loader import load_model, weights_hash
from diffatlas.models.tiny import TINY_WORDS, make_tiny_model
from diffatlas.models.tokenizer import T5_SPACE, build_t5_tokenizer

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("flow_models")
    return {fam: make_tiny_model(fam, root / fam) for fam in ("sd3", "flux")}


@pytest.fixture(scope="module")
def handles(paths):
    return {fam: load_model(p) for fam, p in paths.items()}


# ------------------------------------------------------------------------------ T5 tokenizer
def test_t5_tokenizer_layout_and_round_trip(tmp_path):
    from transformers import T5TokenizerFast

    tok = build_t5_tokenizer(["red", "circle", "a"], path=tmp_path / "t5")
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)  # T5's layout
    pieces = tok.convert_ids_to_tokens(tok("a red circle").input_ids)
    assert pieces == [T5_SPACE + "a", T5_SPACE + "red", T5_SPACE + "circle", "</s>"]  # no BOS, EOS appended
    # an unknown word (and a capitalised one: T5 is case-sensitive) is spelled in characters
    pieces = tok.convert_ids_to_tokens(tok("Red zebra", add_special_tokens=False).input_ids)
    assert pieces == [T5_SPACE + "R", "e", "d", T5_SPACE + "z", "e", "b", "r", "a"]
    assert tok.convert_ids_to_tokens(tok("\u00e9", add_special_tokens=False).input_ids)[-1] == "<unk>"
    again = T5TokenizerFast.from_pretrained(str(tmp_path / "t5"))
    for p in ("a red circle", "a Red zebra!", ""):
        assert again(p).input_ids == tok(p).input_ids
    assert again.model_max_length == tok.model_max_length


# ------------------------------------------------------------------------------ models
def test_tiny_models_round_trip_through_from_pretrained(paths, handles, tmp_path):
    import diffusers

    for fam, cls in (("sd3", diffusers.StableDiffusion3Pipeline), ("flux", diffusers.FluxPipeline)):
        h = handles[fam]
        assert h.family == fam and h.time_convention == "sigma" and h.alphas_cumprod is None
        assert (h.image_size, h.latent_size, h.latent_channels) == (32, 16, 4)
        pipe = cls.from_pretrained(str(paths[fam]), local_files_only=True)
        ref = dict(pipe.transformer.state_dict())
        for k, v in h.denoiser.state_dict().items():
            assert torch.equal(v, ref[k]), k
        # same seed, same weights; another seed, others
        assert weights_hash(make_tiny_model(fam, tmp_path / f"{fam}_again")) == weights_hash(paths[fam])
        assert weights_hash(make_tiny_model(fam, tmp_path / f"{fam}_seed1", seed=1)) != weights_hash(paths[fam])
    assert len(handles["sd3"].tokenizers) == 3 and len(handles["flux"].tokenizers) == 2


@pytest.mark.parametrize("fam", ["sd3", "flux"])
def test_velocity_reproduces_the_diffusers_pipeline(handles, fam):
    """Two Euler steps of ``model_output`` (σ in, velocity out) from the same latents equal the
    pipeline's own sampling loop: conditioning, time convention and Flux's packing all agree."""
    h = handles[fam]
    pipe = h.pipeline
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    prompts = ["a red circle", "a blue square left of a green triangle"]
    if fam == "sd3":
        out = pipe(prompts, num_inference_steps=2, height=32, width=32, latents=x, output_type="latent",
                   guidance_scale=1.0, max_sequence_length=h.t5_length).images
    else:  # guidance-distilled: the embedded guidance 3.5, no negative branch
        out = pipe(prompts, num_inference_steps=2, height=32, width=32, latents=pipe._pack_latents(x, 2, 4, 16, 16),
                   output_type="latent", guidance_scale=3.5, max_sequence_length=h.t5_length).images
        out = pipe._unpack_latents(out, 32, 32, 2)
    sig = [float(s) for s in pipe.scheduler.sigmas]
    cond = h.conditioning(prompts)
    y = x
    with torch.no_grad():
        for i in range(2):
            y = flow_step(h.model_output(y, sig[i], cond), y, sig[i], sig[i + 1])
    torch.testing.assert_close(y, out, rtol=1e-5, atol=1e-5)
    # predict_noise is eps = x + (1 - sigma) v; a Time works as the time
    with torch.no_grad():
        v = h.model_output(x, Time.sigma(0.5), cond)
        torch.testing.assert_close(h.predict_noise(x, 0.5, cond), x + 0.5 * v)


def test_flow_models_refuse_step_times_and_long_prompts(handles):
    h = handles["sd3"]
    cond = h.conditioning([""])
    x = torch.zeros(1, 4, 16, 16)
    with pytest.raises(UserError, match="sigma"):
        h.model_output(x, 500, cond)  # a training step, not a sigma
    with pytest.raises(UserError, match="sigma"):
        h.model_output(x, Time.step(500), cond)
    with pytest.raises(UserError, match="T5 tokens"):
        h.conditioning([" ".join(["circle"] * (h.t5_length + 1))])
    # exactly the budget (words + end-of-text) is fine
    assert h.conditioning([" ".join(["circle"] * (h.t5_length - 1))])["encoder_hidden_states"].shape[0] == 1
    with pytest.raises(UserError, match="T5 tokens"):
        handles["flux"].conditioning(["a red circle", " ".join(TINY_WORDS * 2)])


# ------------------------------------------------------------------------------ layer aliases
def test_layer_aliases_of_the_joint_families(handles):
    sd3 = layer_aliases(handles["sd3"].denoiser)
    # two joint blocks; the last is context_pre_only (no text output) as in SD3
    assert sorted(sd3) == ["block0", "block0.image", "block0.text", "block1", "block1.image"]
    flux = layer_aliases(handles["flux"].denoiser)
    assert sorted(flux) == ["block0", "block0.image", "block0.text",
                            "single_block0", "single_block0.image", "single_block0.text"]
    lays = resolve_layers(handles["flux"].denoiser, ["block0", "block0.image", "single_block0.text"])
    # block0 and block0.image are one output: kept once
    assert [(x.name, x.module_path, x.stream) for x in lays] == [
        ("block0", "transformer_blocks.0", "image"), ("single_block0.text", "single_transformer_blocks.0", "text")]
    for fam, bad in (("sd3", "block1.text"), ("sd3", "single_block0"), ("sd3", "mid"), ("flux", "block1"),
                     ("flux", "up_ft0")):
        with pytest.raises(UserError, match="available aliases: block0") as err:
            resolve_layers(handles[fam].denoiser, [bad])
        assert repr(bad) in str(err.value)


# ------------------------------------------------------------------------------ extraction
def _grid(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """[B, N, C] row-major patch tokens -> [B, C, h, w], by explicit loops."""
    out = torch.empty(tokens.shape[0], tokens.shape[2], h, w)
    for i in range(h):
        for j in range(w):
            out[:, :, i, j] = tokens[:, i * w + j, :]
    return out


@pytest.mark.parametrize("fam,layers", [("sd3", ["block0", "block0.text", "block1"]),
                                         ("flux", ["block0.image", "block0.text", "single_block0"])])
def test_extraction_on_flow_models(handles, tmp_path, fam, layers):
    h = handles[fam]
    imgs = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    captions = ["a red circle", "a blue square", "a red circle"]
    cfg = ExtractConfig(layers=layers, timesteps=["s0.700", "s0.250"], batch_size=2, spatial_max_size=None,
                        conditioning="caption", seed=3)
    out = extract_activations(h, images=imgs, sample_ids=[5, 6, 7], labels=["a", "b", "a"], coarse_labels=None,
                              captions=captions, cfg=cfg, out=tmp_path / "store.zarr")
    st = ActivationStore(out)
    assert st.timesteps.tolist() == [700, 250]  # the scheduler's timesteps sigma * T, next to sigma
    assert st.sigma.tolist() == [0.7, 0.25] and np.isnan(st.alpha_bar).all()
    assert st.attrs["time_convention"] == "sigma" and "(1 - sigma) * x0" in st.attrs["noising_rule"]

    # oracle: x_sigma from diffusers' scale_noise with the same seeded noise, one plain forward
    # with a plain hook on each block, tokens laid out by loops
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000)
    x0 = h.encode_images(images_to_tensor(imgs, 32))
    noise = sample_noise([5, 6, 7], 250, (4, 16, 16), seed=3)
    x_t = sched.scale_noise(x0, torch.full((3,), 250.0), noise)
    seen = {}
    hooks = [h.denoiser.get_submodule(p).register_forward_hook(lambda m, i, o, p=p: seen.__setitem__(p, o))
             for p in ("transformer_blocks.0", "transformer_blocks.1", "single_transformer_blocks.0")
             if p in dict(h.denoiser.named_modules())]
    try:
        with torch.no_grad():
            h.model_output(x_t, 0.25, h.conditioning(captions))
    finally:
        for k in hooks:
            k.remove()
    g = 8  # 16x16 latents: SD3 patch 2, Flux 2x2 packing
    img = seen["transformer_blocks.0"][1]
    txt = seen["transformer_blocks.0"][0]
    name0 = layers[0]
    torch.testing.assert_close(torch.as_tensor(st.spatial(name0, "s0.250")).float(), _grid(img, g, g).half().float())
    torch.testing.assert_close(torch.as_tensor(st.pooled(name0, "s0.250")), img.mean(1), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.as_tensor(st.pooled("block0.text", Time.sigma(0.25))), txt.mean(1),
                               rtol=1e-4, atol=1e-5)
    assert st.has_spatial(name0) and not st.has_spatial("block0.text")  # text tokens have no grid
    last = "transformer_blocks.1" if fam == "sd3" else "single_transformer_blocks.0"
    torch.testing.assert_close(torch.as_tensor(st.spatial(layers[2], "s0.250")).float(),
                               _grid(seen[last][1], g, g).half().float())


def test_flow_extraction_bad_input(handles, tmp_path):
    imgs = np.zeros((2, 32, 32, 3), dtype=np.uint8)

    def run(handle, **kw):
        cfg = ExtractConfig(**{"layers": ["block0"], "timesteps": ["s0.500"], "batch_size": 2, **kw})
        return extract_activations(handle, images=imgs, sample_ids=[0, 1], labels=["a", "b"], coarse_labels=None,
                                   captions=None, cfg=cfg, out=tmp_path / "bad.zarr")

    with pytest.raises(UserError, match="flow-matching model, whose times are sigmas"):
        run(handles["sd3"], timesteps=[250])
    with pytest.raises(UserError, match="text-token streams"):
        run(handles["flux"], layers=["block0.text"], spatial_layers=["block0.text"])
    with pytest.raises(UserError, match="no such block"):
        run(handles["flux"], layers=["single_block3"])
    with pytest.raises(UserError, match="extract.timesteps"):
        ExtractConfig(timesteps=["s1.5"])
    assert not (tmp_path / "bad.zarr").exists()


def test_flow_inversion_extraction_runs_and_differs_from_forward_noise(handles, tmp_path):
    h = handles["sd3"]
    imgs = np.random.default_rng(1).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    stores = {}
    for noise in ("forward", "inversion"):
        cfg = ExtractConfig(layers=["block1"], timesteps=["s0.500"], batch_size=2, noise=noise, inversion_steps=4)
        stores[noise] = ActivationStore(extract_activations(
            h, images=imgs, sample_ids=[0, 1], labels=["a", "b"], coarse_labels=None, captions=None, cfg=cfg,
            out=tmp_path / f"{noise}.zarr"))
    a, b = (np.asarray(stores[k].pooled("block1", "s0.500")) for k in ("forward", "inversion"))
    assert a.shape == b.shape == (2, 16) and np.isfinite(b).all() and not np.allclose(a, b)
    assert stores["inversion"].attrs["inversion_steps"] == 4


def test_cli_make_tiny_model_and_extract_at_a_sigma(tmp_path):
    import json

    import pandas as pd

    from diffatlas.cli import main
    from diffatlas.data.dataset import write_dataset

    assert main(["make-tiny-model", "sd3", str(tmp_path / "sd3")]) == 0
    imgs = np.random.default_rng(2).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    meta = pd.DataFrame({"sample_id": [0, 1], "label": ["a", "b"], "coarse_label": ["a", "b"],
                         "caption": ["a red circle", "a blue square"]})
    write_dataset(tmp_path / "data", imgs, meta)
    out = tmp_path / "s.zarr"
    cfg = {"layers": ["block0", "block0.text"], "batch_size": 2, "conditioning": "caption"}
    args = ["extract", "--model", str(tmp_path / "sd3"), "--dataset", str(tmp_path / "data"), "--out", str(out),
            "--config-json", json.dumps(cfg), "--threads", "1"]
    assert main(args + ["--timestep", "s0.400"]) == 0
    st = ActivationStore(out)
    assert st.sigma.tolist() == [0.4] and st.timesteps.tolist() == [400]
    assert st.spatial_shape("block0") == (16, 8, 8) and not st.has_spatial("block0.text")
    assert main(args + ["--timestep", "400"]) == 2  # a step on a flow-matching model: a clear error


def test_flow_shards_gather_with_their_sigmas(handles, tmp_path):
    """Sharded extraction of a flow model: the gathered store keeps sigma (and NaN alpha_bar)
    and equals one unsharded extraction."""
    from diffatlas.activations.gather import gather_stores

    h = handles["flux"]
    imgs = np.random.default_rng(4).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    cfg = ExtractConfig(layers=["block0", "block0.text"], timesteps=["s0.600"], batch_size=2)

    def run(rows, out):
        return extract_activations(h, images=imgs[rows], sample_ids=list(range(4))[rows], labels=["a", "b", "a", "b"][rows],
                                   coarse_labels=None, captions=None, cfg=cfg, out=tmp_path / out)

    whole = ActivationStore(run(slice(0, 4), "whole.zarr"))
    parts = [run(slice(0, 2), "p0.zarr"), run(slice(2, 4), "p1.zarr")]
    got = ActivationStore(gather_stores(parts, tmp_path / "t600.zarr"))
    assert got.sigma.tolist() == [0.6] and got.timesteps.tolist() == [600] and np.isnan(got.alpha_bar).all()
    for layer in ("block0", "block0.text"):
        np.testing.assert_array_equal(got.pooled(layer, "s0.600"), whole.pooled(layer, "s0.600"))
    np.testing.assert_array_equal(got.spatial("block0", "s0.600"), whole.spatial("block0", "s0.600"))


# ------------------------------------------------------------------------------ word positions
def test_word_positions_in_the_joint_text_sequence(handles):
    from diffatlas.models.text_tokens import word_tokens

    sd3 = word_tokens(handles["sd3"], "a red zebra")
    # hand-computed: CLIP puts <|startoftext|> at 0; SD3's T5 block starts at 77 without one;
    # "zebra" is not in the tiny vocabularies: CLIP spells z,e,b,r,a</w>, T5 ▁z,e,b,r,a
    assert [(w.word, w.positions) for w in sd3] == [
        ("a", {"clip_l": (1,), "clip_g": (1,), "t5": (77,)}),
        ("red", {"clip_l": (2,), "clip_g": (2,), "t5": (78,)}),
        ("zebra", {"clip_l": (3, 4, 5, 6, 7), "clip_g": (3, 4, 5, 6, 7), "t5": (79, 80, 81, 82, 83)}),
    ]
    flux = word_tokens(handles["flux"], "a red zebra")
    assert [w.positions for w in flux] == [{"t5": (0,)}, {"t5": (1,)}, {"t5": (2, 3, 4, 5, 6)}]
    # the positions index the conditioning: its length is 77 + T5 window (SD3) or the T5 window (Flux)
    assert handles["sd3"].conditioning(["a"])["encoder_hidden_states"].shape[1] == 77 + handles["sd3"].t5_length
    assert handles["flux"].conditioning(["a"])["encoder_hidden_states"].shape[1] == handles["flux"].t5_length


def test_a_word_absent_from_one_tokenisation_is_refused(handles):
    from diffatlas.models.text_tokens import word_tokens

    h = handles["flux"]
    # the tiny T5 keeps 31 content tokens (+ </s>): the 32nd word is not read
    prompt = " ".join(["red"] * 31 + ["circle"])
    with pytest.raises(UserError, match="word 'circle' \\(word 31 of prompt .*no token in the t5 tokenisation"):
        word_tokens(h, prompt)
    assert word_tokens(h, " ".join(["red"] * 31))[-1].positions == {"t5": (30,)}
    with pytest.raises(UserError, match="no words"):
        word_tokens(h, " , ")
    with pytest.raises(UserError, match="no joint text-image attention"):
        word_tokens(type("H", (), {"family": "sd", "model_id": "m", "tokenizers": []})(), "a red circle")


def test_a_word_cut_off_by_clip_but_read_by_t5_is_refused():
    """SD3 with a real-sized T5 window (256): CLIP keeps 75 words, T5 all 80."""
    from diffatlas.models.text_tokens import word_tokens
    from diffatlas.models.tokenizer import build_world_tokenizer

    clip = build_world_tokenizer(["red"])
    fake = type("H", (), {"family": "sd3", "model_id": "sd3-256", "t5_length": 256,
                          "tokenizers": [clip, clip, build_t5_tokenizer(["red"], model_max_length=256)]})()
    with pytest.raises(UserError, match="word 'red' \\(word 75 of .*no token in the clip_l tokenisation"):
        word_tokens(fake, " ".join(["red"] * 80))
    last = word_tokens(fake, " ".join(["red"] * 75))[-1]
    assert last.positions == {"clip_l": (75,), "clip_g": (75,), "t5": (77 + 74,)}


def test_flow_noise_ensemble_is_the_mean_over_draws(handles, tmp_path):
    """noise_ensemble = 2 at s0.400: the stored activation is the mean of two forward passes on
    diffusers' scale_noise of the two seeded draws."""
    h = handles["sd3"]
    imgs = np.random.default_rng(5).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    cfg = ExtractConfig(layers=["block1"], timesteps=["s0.400"], batch_size=2, noise_ensemble=2, seed=7,
                        spatial=False)
    st = ActivationStore(extract_activations(h, images=imgs, sample_ids=[3, 4], labels=["a", "b"], coarse_labels=None,
                                             captions=None, cfg=cfg, out=tmp_path / "ens.zarr"))
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000)
    x0 = h.encode_images(images_to_tensor(imgs, 32))
    cond = h.conditioning([""])
    seen = []
    hook = h.denoiser.transformer_blocks[1].register_forward_hook(lambda m, i, o: seen.append(o[1].mean(1)))
    try:
        with torch.no_grad():
            for draw in (0, 1):
                x_t = sched.scale_noise(x0, torch.full((2,), 400.0), sample_noise([3, 4], 400, (4, 16, 16), 7, draw))
                h.model_output(x_t, 0.4, cond)
    finally:
        hook.remove()
    want = (seen[0] + seen[1]) / 2
    torch.testing.assert_close(torch.as_tensor(st.pooled("block1", "s0.400")), want, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(seen[0], seen[1])
