"""DAAM on joint-attention transformers (tiny SD3 and Flux): exact maps against attention
computed by hand, unchanged outputs, the daam-generate command end to end, and bad input."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from diffatlas.cli import main as cli
from diffatlas.daam.trace import AttentionTracer, trace_generation
from diffatlas.errors import UserError
from diffatlas.models.loader import load_model
from diffatlas.models.tiny import make_tiny_model
from joint_oracles import capture_attention_inputs, hand_maps

FAMILIES = ("sd3", "flux")
PROMPTS = ["a red circle left of a blue square", "a small green triangle"]


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("daam_joint")
    return {fam: make_tiny_model(fam, root / fam) for fam in FAMILIES}


@pytest.fixture(scope="module")
def handles(paths):
    return {fam: load_model(p) for fam, p in paths.items()}


@pytest.mark.parametrize("family", FAMILIES)
def test_traced_maps_equal_attention_by_hand_and_outputs_are_unchanged(handles, family):
    h = handles[family]
    cond = h.conditioning(PROMPTS)
    text_len = cond["encoder_hidden_states"].shape[1]
    g = torch.Generator().manual_seed(3)
    x = torch.randn(len(PROMPTS), h.latent_channels, h.latent_size, h.latent_size, generator=g)
    tracer = AttentionTracer(h.denoiser, model_name=family)
    names = sorted(tracer.modules)
    expected_blocks = {"sd3": ["transformer_blocks.0.attn", "transformer_blocks.1.attn"],
                       "flux": ["single_transformer_blocks.0.attn", "transformer_blocks.0.attn"]}[family]
    assert names == expected_blocks  # every joint block (Flux: double- and single-stream)

    calls, hooks = capture_attention_inputs(h.denoiser, names)
    with torch.no_grad():
        plain = h.model_output(x, 0.6, cond)
    for hk in hooks:
        hk.remove()
    with tracer, torch.no_grad():
        traced = h.model_output(x, 0.6, cond)
        acc = tracer.accumulator
        (key,) = list(acc.sums)
        got = acc.sums[key]
    assert torch.equal(plain, traced)  # the traced model computes exactly what the plain one does
    grid = (8, 8)  # 16x16 latents, patch 2 (SD3) / 2x2 packing (Flux)
    assert key == (0, *grid) and got.shape == (len(PROMPTS), 64, text_len)
    heads = h.denoiser.config.num_attention_heads
    assert acc.counts[key] == heads * len(names)
    with torch.no_grad():
        want = hand_maps(family, calls, text_len)
    assert (want - got.double()).abs().max().item() < 2e-6
    # Joint softmax, not renormalised over text: an image query's text columns sum to less
    # than one per head (the rest goes to image keys), and differ by query.
    per_query = got.sum(-1)
    assert (per_query < heads * len(names) - 1e-3).all() and per_query.std() > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_traced_generation_equals_plain_generation(handles, family):
    h = handles[family]
    kw = dict(prompt=PROMPTS[:1], num_inference_steps=2, guidance_scale=3.0, output_type="np",
              max_sequence_length=h.t5_length, height=h.image_size, width=h.image_size)
    plain = h.pipeline(generator=torch.Generator().manual_seed(0), **kw).images
    with AttentionTracer(h.denoiser) as tr:
        traced = h.pipeline(generator=torch.Generator().manual_seed(0), **kw).images
        assert tr.accumulator.n_steps == 2
    np.testing.assert_array_equal(plain, traced)


def test_cfg_rows_sd3_conditional_half_flux_all_rows(handles):
    from diffatlas.daam.trace import layout_from_pipeline

    run = {fam: trace_generation(handles[fam], PROMPTS[:1], steps=2, guidance=3.0) for fam in FAMILIES}
    # SD3 with guidance batches [negative, conditional]; Flux-dev style guidance is an
    # embedding: no negative rows, every row conditional.
    assert run["sd3"].info["cfg"] is True and layout_from_pipeline(handles["sd3"].pipeline, 1).cond_rows == (1,)
    assert run["flux"].info["cfg"] is False and layout_from_pipeline(handles["flux"].pipeline, 1).cond_rows == (0,)
    sd3, flux = run["sd3"].maps[0], run["flux"].maps[0]
    # SD3: the CLIP block ([start] words [end]); Flux: T5 (words from position 0, then </s>)
    assert sd3.tokens.tokens[0] == "<start>" and sd3.tokens.find("circle")[0].positions == (3,)
    assert flux.tokens.start_token is False and flux.tokens.find("circle")[0].positions == (2,)
    with pytest.raises(UserError, match="no start token"):
        flux.start_map()
    for m in (sd3, flux):
        assert m.token_maps.shape[1:] == (32, 32) and (m.word_map("circle") >= 0).all()
    assert run["flux"].info["joint_attention"]["text_stream"] == "t5"
    assert run["sd3"].info["joint_attention"]["text_tokenisations"] == ["clip_l", "clip_g"]
    assert run["flux"].info["sigmas"][0] == pytest.approx(1.0)


def test_daam_generate_command_on_sd3_and_flux(paths, tmp_path):
    cfg = json.dumps({"steps": 2, "batch_size": 2, "n_images": 1, "time_resolved": True,
                      "prompt_sets": {"caps": {"kind": "shapesworld_captions", "n_prompts": 2}}})
    for fam in FAMILIES:
        out = tmp_path / fam
        args = ["daam-generate", "--model", str(paths[fam]), "--model-name", f"tiny-{fam}", "--prompt-set", "caps",
                "--out", str(out), "--config-json", cfg, "--device", "cpu", "--threads", "1"]
        assert cli(args) == 0
        info = json.loads((out / "run" / "info.json").read_text())
        ja = info["joint_attention"]
        assert info["model"]["family"] == fam and ja["family"] == fam and ja["blocks"]
        assert ja["text_stream"] == {"sd3": "clip", "flux": "t5"}[fam]
        summary = pd.read_csv(out / "summary.csv")
        assert "daam" in set(summary["method"])
        from diffatlas.daam.words import TracedRun

        run = TracedRun.load(out / "run")
        assert len(run) == 2 and run.maps[0].tokens.start_token == (fam == "sd3")
        import zarr

        g = zarr.open_group(str(out / "run" / "maps.zarr"), mode="r")
        # per-step maps on the 8x8 token grid; steps on the sigma*1000 scale (Flux's input is sigma)
        assert g["steps__8x8"].shape[:3] == (2, 2, g["token_maps"].shape[1])
        assert [round(s * 1000) for s in info["sigmas"]] == g["timestep"][:].tolist()


def test_bad_input_names_the_word_or_prompt(handles):
    h = handles["flux"]
    long_prompt = " ".join(["red"] * 40)
    with pytest.raises(UserError, match="T5 tokens .* reads at most 32"):
        trace_generation(h, [long_prompt], steps=1)
    sd3 = handles["sd3"]
    t5 = sd3.tokenizers[2]
    old = t5.model_max_length
    t5.model_max_length = 200  # a T5 window past CLIP's 77, as on the real SD3
    try:
        with pytest.raises(UserError, match="word .circle. \\(word 75 .*no token in the clip_l tokenisation"):
            trace_generation(sd3, [" ".join(["red"] * 75 + ["circle"])], steps=1)
    finally:
        t5.model_max_length = old
    with pytest.raises(UserError, match="match none of the joint attention modules"):
        AttentionTracer(h.denoiser, layers=["up_blocks.*attn2"])
    from diffatlas.daam.realimage import trace_real_images

    # real images on a flow model start from a sigma; a training step is refused by name
    with pytest.raises(UserError, match="start time = 400 is not allowed for model .*flow-matching model, whose times are sigmas"):
        trace_real_images(sd3, np.zeros((1, 32, 32, 3), np.uint8), ["a red circle"], t_start=400)


def test_kernel_lse_and_the_by_hand_fallback_agree_with_softmax():
    from diffatlas.daam.joint import attention_with_lse, image_text_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 40, 8, generator=g) for _ in range(3))
    out, lse = attention_with_lse(q, k, v)
    assert torch.equal(out, torch.nn.functional.scaled_dot_product_attention(q, k, v))
    p = torch.softmax(q.double() @ k.double().transpose(-1, -2) / math.sqrt(8), -1)  # text = keys 30..39
    want = p[:, :, :30, 30:].sum(1)
    for given in (lse[:, :, :30], None):  # the kernel's LSE, or computed from all keys
        got = image_text_attention(q[:, :, :30], k[:, :, 30:], given, k)
        assert (got.double() - want).abs().max().item() < 1e-6
