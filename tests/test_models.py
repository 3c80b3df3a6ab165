"""Models: tokenizer, tiny models of each family, the loader and the ShapesWorld pipeline.

Every tiny model is written to disk with ``make_tiny_model`` and read back with
``load_model``, so the real diffusers loading path is exercised. Oracles: the denoiser called
directly, diffusers' own ``encode_prompt``, the scheduler's own formulas, a hand-written DDIM
loop, and a reference BPE.
"""

from __future__ import annotations

import json
import random
import shutil

import numpy as np
import pytest
import torch

from diffatlas.errors import UserError
from diffatlas.models.loader import CLASS_TO_FAMILY, load_model, weights_hash
from diffatlas.models.tiny import DDPM_FAMILIES as FAMILIES  # SD3 / Flux: tests/test_flow_models.py
from diffatlas.models.tiny import FLOW_FAMILIES, make_tiny_model
from diffatlas.models.tokenizer import BASE_CHARS, EOS, SUFFIX, _bpe, build_vocab_and_merges, build_world_tokenizer

torch.set_num_threads(1)

WORDS = "a the and small large red green blue yellow circle square triangle left of".split()


# ---------------------------------------------------------------------------- tokenizer
@pytest.fixture(scope="module")
def tok():
    return build_world_tokenizer(WORDS)


def test_vocabulary_words_are_single_tokens(tok):
    vocab = tok.get_vocab()
    for w in WORDS:
        assert tok(w, add_special_tokens=False).input_ids == [vocab[w + SUFFIX]]
    ids = tok("A Small RED circle").input_ids
    assert tok.convert_ids_to_tokens(ids) == ["<|startoftext|>", "a</w>", "small</w>", "red</w>", "circle</w>", EOS]
    assert tok.bos_token_id == len(tok) - 2 and tok.eos_token_id == tok.pad_token_id == len(tok) - 1
    assert tok.model_max_length == 77


def test_unknown_words_split_into_pieces_that_spell_them(tok):
    for word in ["squares", "zebra", "circles", "reddish"]:
        pieces = tok.convert_ids_to_tokens(tok(word, add_special_tokens=False).input_ids)
        assert len(pieces) > 1, pieces
        assert "".join(pieces) == word + SUFFIX
        assert tok.unk_token not in pieces
    # A character outside the alphabet becomes <|unk|> and never raises.
    ids = tok("red é circle", add_special_tokens=False).input_ids
    assert tok.unk_token_id in ids
    assert ids[0] == tok.get_vocab()["red</w>"] and ids[-1] == tok.get_vocab()["circle</w>"]


def test_reference_bpe_matches_tokenizers_library(tok):
    vocab, merges = build_vocab_and_merges(WORDS)
    ranks = {m: i for i, m in enumerate(merges)}
    inv = {i: t for t, i in vocab.items()}
    rng = random.Random(0)
    letters = "abcdeilnorstuqy"
    for _ in range(200):
        word = "".join(rng.choice(letters) for _ in range(rng.randint(1, 9)))
        got = [inv[i] for i in tok(word, add_special_tokens=False).input_ids]
        assert got == _bpe(word, ranks), word


def test_tokenizer_round_trip_and_padding(tmp_path, tok):
    from transformers import AutoTokenizer, CLIPTokenizerFast

    build_world_tokenizer(WORDS, tmp_path / "tok")
    assert (tmp_path / "tok" / "tokenizer.json").is_file()
    for cls in (CLIPTokenizerFast, AutoTokenizer):
        re = cls.from_pretrained(tmp_path / "tok")
        for s in ["a small red circle and a blue square", "squares, zebras!", ""]:
            assert re(s).input_ids == tok(s).input_ids
        assert re.model_max_length == 77
    batch = tok(["a red circle", "blue"], padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    assert batch.input_ids.shape == (2, 77)
    assert (batch.input_ids[1, 3:] == tok.pad_token_id).all()
    long = tok(" ".join(["red"] * 200), truncation=True, max_length=77).input_ids
    assert len(long) == 77 and long[-1] == tok.eos_token_id


def test_tokenizer_rejects_words_outside_alphabet():
    with pytest.raises(UserError, match="outside the allowed alphabet"):
        build_world_tokenizer(["red", "grün"])
    assert "a" in BASE_CHARS and "z" in BASE_CHARS


# ---------------------------------------------------------------------------- tiny models
@pytest.fixture(scope="module")
def handles(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {f: load_model(make_tiny_model(f, root / f, seed=0)) for f in FAMILIES}


EXPECTED = {
    # family: (denoiser class, latent channels, latent size, #tokenizers, has vae)
    "pixel": ("UNet2DConditionModel", 3, 32, 1, False),
    "sd": ("UNet2DConditionModel", 4, 16, 1, True),
    "sd-v": ("UNet2DConditionModel", 4, 16, 1, True),
    "sdxl": ("UNet2DConditionModel", 4, 16, 2, True),
    "dit": ("DiTTransformer2DModel", 4, 16, 0, True),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_model_loads_with_expected_attributes(handles, family):
    h = handles[family]
    cls, c, s, n_tok, has_vae = EXPECTED[family]
    assert h.family == ("sd" if family == "sd-v" else family)
    assert h.prediction_type == ("v_prediction" if family == "sd-v" else "epsilon")
    assert type(h.denoiser).__name__ == cls
    assert (h.latent_channels, h.latent_size, h.image_size) == (c, s, 32)
    assert len(h.tokenizers) == len(h.text_encoders) == n_tok
    assert (h.vae is not None) == has_vae
    assert h.revision == weights_hash(h.local_path) and len(h.revision) == 12
    assert h.num_train_timesteps == 1000 and h.alphas_cumprod.shape == (1000,)
    # ᾱ_t from the scheduler config, computed independently.
    cfg = h.scheduler.config
    if cfg.beta_schedule == "scaled_linear":
        betas = torch.linspace(cfg.beta_start**0.5, cfg.beta_end**0.5, 1000, dtype=torch.float64) ** 2
    else:
        betas = torch.linspace(cfg.beta_start, cfg.beta_end, 1000, dtype=torch.float64)
    torch.testing.assert_close(h.alphas_cumprod.double(), torch.cumprod(1 - betas, 0), atol=1e-6, rtol=1e-5)
    assert not any(p.requires_grad for p in h.denoiser.parameters())


@pytest.mark.parametrize("family", FAMILIES)
def test_predict_noise_matches_direct_denoiser_call(handles, family):
    h = handles[family]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, h.latent_channels, h.latent_size, h.latent_size, generator=g)
    prompts = ["", "red circle"] if family == "dit" else ["", "a red circle"]
    cond = h.conditioning(prompts)
    eps = h.predict_noise(x, 500, cond)
    assert eps.shape == x.shape
    t = torch.tensor([500, 500])
    if family == "dit":
        assert cond["class_labels"].tolist() == [1000, 0]  # null class, then "red circle"
        raw = h.denoiser(x, t, class_labels=cond["class_labels"]).sample
        assert raw.shape[1] == 2 * x.shape[1]  # learned sigma
        ref = raw[:, : x.shape[1]]
    else:
        ref = h.denoiser(x, t, **cond).sample
    if family == "sd-v":  # v = sqrt(ᾱ) ε - sqrt(1 - ᾱ) x0  =>  ε = sqrt(ᾱ) v + sqrt(1 - ᾱ) x_t
        torch.testing.assert_close(h.model_output(x, 500, cond), ref)
        a = float(h.scheduler.alphas_cumprod[500])
        ref = a**0.5 * ref + (1 - a) ** 0.5 * x
    torch.testing.assert_close(eps, ref)
    # Conditioning matters: the empty and non-empty prompt give different predictions.
    assert (eps[0] - eps[1]).abs().max() > 1e-6
    # A batch-1 conditioning broadcasts, and per-sample timesteps are honoured.
    one = h.conditioning(prompts[1:])
    torch.testing.assert_close(h.predict_noise(x[1:], 500, one), eps[1:], atol=1e-5, rtol=1e-4)
    tt = torch.tensor([10, 900])
    both = h.predict_noise(x, tt, h.conditioning([prompts[1]]))
    torch.testing.assert_close(both[1:], h.predict_noise(x[1:], 900, one), atol=1e-5, rtol=1e-4)


def test_sd_and_sdxl_conditioning_match_diffusers_encode_prompt(handles):
    sd = handles["sd"]
    prompts = ["a red circle", ""]
    ours = sd.conditioning(prompts)["encoder_hidden_states"]
    ref = sd.pipeline.encode_prompt(prompts, torch.device("cpu"), 1, False)[0]
    assert ours.shape == (2, 77, 32)
    torch.testing.assert_close(ours, ref)

    xl = handles["sdxl"]
    cond = xl.conditioning(prompts)
    emb, _, pooled, _ = xl.pipeline.encode_prompt(prompts, device=torch.device("cpu"), do_classifier_free_guidance=False)
    assert cond["encoder_hidden_states"].shape == (2, 77, 64)
    torch.testing.assert_close(cond["encoder_hidden_states"], emb)
    torch.testing.assert_close(cond["added_cond_kwargs"]["text_embeds"], pooled)
    assert cond["added_cond_kwargs"]["time_ids"].tolist() == [[32, 32, 0, 0, 32, 32]] * 2


def test_default_conditioning_is_the_empty_prompt(handles):
    h = handles["pixel"]
    torch.testing.assert_close(h.conditioning()["encoder_hidden_states"], h.conditioning([""])["encoder_hidden_states"])
    assert not torch.allclose(h.conditioning()["encoder_hidden_states"], h.conditioning(["red"])["encoder_hidden_states"])


def test_dit_class_labels(handles):
    h = handles["dit"]
    assert h.num_classes == 1000 and h.id2label[4] == "red square"
    assert h.conditioning(None)["class_labels"].tolist() == [1000]
    assert h.conditioning(["Blue Square", "green circle"])["class_labels"].tolist() == [6, 1]
    assert h.conditioning(["x", "y"], class_labels=[3, 7])["class_labels"].tolist() == [3, 7]
    with pytest.raises(UserError, match="not a class name"):
        h.conditioning(["purple hexagon"])
    with pytest.raises(UserError, match="out of range"):
        h.conditioning(class_labels=[1001])


@pytest.mark.parametrize("family", FAMILIES)
def test_encode_decode_and_add_noise(handles, family):
    h = handles[family]
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1
    x0 = h.encode_images(x)
    assert x0.shape == (2, h.latent_channels, h.latent_size, h.latent_size)
    if h.vae is None:
        torch.testing.assert_close(x0, x)
        torch.testing.assert_close(h.decode(x0), x)
    else:
        ref = h.vae.encode(x).latent_dist.mean * h.vae.config.scaling_factor
        torch.testing.assert_close(x0, ref)
        img = h.decode(x0)
        assert img.shape == (2, 3, 32, 32) and img.min() >= -1 and img.max() <= 1
    noise = torch.randn_like(x0)
    t = torch.tensor([0, 999])
    torch.testing.assert_close(h.add_noise(x0, noise, t), h.scheduler.add_noise(x0, noise, t))


@pytest.mark.parametrize("family", FAMILIES)
def test_pipeline_generates_with_and_without_cfg(handles, family):
    h = handles[family]
    kw = {"class_labels": [1, 2]} if family == "dit" else {"prompt": ["a red circle", "a blue square"]}
    for g in (1.0, 4.0):
        out = h.pipeline(**kw, num_inference_steps=2, guidance_scale=g, generator=torch.Generator().manual_seed(0),
                     output_type="np")
        assert out.images.shape == (2, 32, 32, 3)
        assert np.isfinite(out.images).all() and out.images.min() >= 0 and out.images.max() <= 1


def test_make_tiny_model_is_deterministic_in_seed(tmp_path):
    a = make_tiny_model("pixel", tmp_path / "a", seed=5)
    b = make_tiny_model("pixel", tmp_path / "b", seed=5)
    c = make_tiny_model("pixel", tmp_path / "c", seed=6)
    assert weights_hash(a) == weights_hash(b) != weights_hash(c)
    with pytest.raises(UserError, match="unknown model family"):
        make_tiny_model("gan", tmp_path / "d")


# ---------------------------------------------------------------------------- ShapesWorld pipeline
def _record_unet_calls(unet):
    calls = []
    hook = unet.register_forward_pre_hook(
        lambda mod, args, kwargs: calls.append((args[0].shape[0], kwargs["encoder_hidden_states"].clone())),
        with_kwargs=True,
    )
    return calls, hook


@pytest.mark.parametrize("guidance", [1.0, 3.0, 7.5])
def test_shapesworld_pipeline_matches_manual_ddim_and_reports_cfg_layout(handles, guidance):
    h = handles["pixel"]
    pipe = h.pipeline
    prompts = ["a red circle", "a blue square"]
    noise = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    calls, hook = _record_unet_calls(h.denoiser)
    try:
        out = pipe(prompts, num_inference_steps=3, guidance_scale=guidance, num_images_per_prompt=2,
                   latents=noise, output_type="pt")
    finally:
        hook.remove()
    layout = pipe.last_cfg_layout
    assert layout["do_cfg"] == (guidance > 1)
    assert layout["prompts"] == ["a red circle", "a red circle", "a blue square", "a blue square"]
    assert len(calls) == 3 and all(b == layout["batch_size"] for b, _ in calls)
    assert layout["batch_size"] == (8 if guidance > 1 else 4)

    # The rows the layout names conditional hold the prompts' embeddings, the others "".
    cond = h.conditioning(layout["prompts"])["encoder_hidden_states"]
    seen = calls[0][1]
    torch.testing.assert_close(seen[layout["cond_slice"]], cond)
    if guidance > 1:
        empty = h.conditioning([""] * 4)["encoder_hidden_states"]
        torch.testing.assert_close(seen[layout["uncond_slice"]], empty)

    # Oracle: DDIM (eta 0) written out, with separate conditional / unconditional passes. The
    # predicted x0 is clipped to [-1, 1] and the noise re-derived from the clipped x0, so the
    # step stays consistent under strong guidance.
    sched = pipe.scheduler
    sched.set_timesteps(3)
    assert sched.config.clip_sample and layout["timesteps"] == [int(t) for t in sched.timesteps]
    abar = sched.alphas_cumprod
    x = noise.clone()
    c_cond, c_unc = h.conditioning(layout["prompts"]), h.conditioning([""])
    clipped = 0
    with torch.no_grad():
        for t in sched.timesteps:
            e = h.predict_noise(x, t, c_cond)
            if guidance > 1:
                e_u = h.predict_noise(x, t, c_unc)
                e = e_u + guidance * (e - e_u)
            prev = int(t) - sched.config.num_train_timesteps // 3
            a, a_prev = abar[int(t)], (abar[prev] if prev >= 0 else torch.tensor(1.0))
            x0 = (x - (1 - a).sqrt() * e) / a.sqrt()
            x0_c = x0.clamp(-1, 1)
            clipped += int((x0_c != x0).any())
            e = (x - a.sqrt() * x0_c) / (1 - a).sqrt()
            x = a_prev.sqrt() * x0_c + (1 - a_prev).sqrt() * e
    assert clipped > 0  # the clipped branch is exercised
    torch.testing.assert_close(out.images, (x / 2 + 0.5).clamp(0, 1), atol=1e-5, rtol=1e-4)
    assert out.images.shape == (4, 3, 32, 32)


def test_world_architecture_puts_attention_at_16_and_8_only():
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from diffatlas.models.architecture import world_text_encoder_config, world_unet_config

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**world_unet_config(32))
    n = sum(p.numel() for p in unet.parameters())
    assert 1_000_000 < n < 2_500_000, n
    seen = {}
    hooks = [
        m.register_forward_pre_hook(lambda mod, args, name=name: seen.__setitem__(name, args[0].shape[1]))
        for name, m in unet.named_modules() if name.endswith("attn2")
    ]
    te = CLIPTextModel(CLIPTextConfig(**world_text_encoder_config(50, hidden_size=64)))
    ctx = te(torch.tensor([[48, 3, 49] + [49] * 74])).last_hidden_state
    assert ctx.shape == (1, 77, 64)
    with torch.no_grad():
        out = unet(torch.randn(1, 3, 32, 32), 10, encoder_hidden_states=ctx).sample
    for hk in hooks:
        hk.remove()
    assert out.shape == (1, 3, 32, 32)
    assert set(seen.values()) == {16 * 16, 8 * 8}  # query lengths: no attention at 32x32
    assert any(k.startswith("mid_block") for k in seen)
    with pytest.raises(UserError, match="divisible"):
        world_unet_config(30)


# ---------------------------------------------------------------------------- loader errors
def test_loader_errors_name_the_problem(tmp_path, handles):
    with pytest.raises(UserError, match="not found"):
        load_model(tmp_path / "missing" / "model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"empty has no model_index.json"):
        load_model(tmp_path / "empty")
    bad = tmp_path / "bad"
    shutil.copytree(handles["pixel"].local_path, bad)
    (bad / "model_index.json").write_text(json.dumps({"_class_name": "FooPipeline"}))
    with pytest.raises(UserError, match="'FooPipeline' is not a supported pipeline; allowed: StableDiffusionPipeline"):
        load_model(bad)
    with pytest.raises(UserError, match="nothing is downloaded"):
        load_model("nobody-diffatlas/not-a-model", cache_dir=tmp_path / "hf")
    assert set(CLASS_TO_FAMILY.values()) == set(FAMILIES + FLOW_FAMILIES) - {"sd-v"}  # sd-v loads as sd


def test_unknown_prediction_type_is_refused_at_load(tmp_path, handles):
    bad = tmp_path / "badpred"
    shutil.copytree(handles["sd"].local_path, bad)
    cfg_path = bad / "scheduler" / "scheduler_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["prediction_type"] = "flow"
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(UserError, match=rf"model {bad}: scheduler prediction_type 'flow' is not supported; "
                                        r"allowed: epsilon, v_prediction, sample"):
        load_model(bad)


def test_hub_id_resolves_from_local_cache_with_commit_as_revision(tmp_path, handles):
    repo = tmp_path / "hf" / "models--me--tiny-pixel"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(handles["pixel"].local_path, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    h = load_model("me/tiny-pixel", cache_dir=tmp_path / "hf")
    assert (h.family, h.model_id, h.revision) == ("pixel", "me/tiny-pixel", commit)
