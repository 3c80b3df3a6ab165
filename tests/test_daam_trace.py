"""Bookkeeping during generation: conditional rows under CFG on/off, several prompts and images
per prompt, outputs unchanged by tracing, save/load with time-resolved maps, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffatlas.daam.trace import AttentionTracer, CFGLayout, TracedRun, layout_from_pipeline, trace_generation
from diffatlas.errors import UserError

torch.set_num_threads(1)


@pytest.fixture(scope="module", params=["pixel", "sd"])
def handle(request, tmp_path_factory):
    from diffatlas.models.loader import load_model
    from diffatlas.models.tiny import make_tiny_model

    path = tmp_path_factory.mktemp(request.param) / "model"
    make_tiny_model(request.param, path, seed=0)
    return load_model(path)


PROMPTS = ["a red circle", "a blue square and a small triangle"]


def step0(raw) -> dict:
    """Per-resolution maps of the first denoising step, items in order."""
    return {(h, w): m.float() for (s, h, w), m in raw.per_step.items() if s == 0}


def test_cfg_on_and_off_give_the_conditional_maps(handle):
    on = trace_generation(handle, PROMPTS, n_images=2, steps=2, guidance=4.0, time_resolved=True)
    off = trace_generation(handle, PROMPTS, n_images=2, steps=2, guidance=1.0, time_resolved=True)
    assert on.info["cfg"] is True and off.info["cfg"] is False
    a, b = step0(on.time_resolved[0][1]), step0(off.time_resolved[0][1])
    assert sorted(a) == sorted(b) and len(a) >= 2
    for hw in a:  # same latents at step 0, so the conditional maps must agree
        torch.testing.assert_close(a[hw], b[hw], rtol=1e-3, atol=1e-3)
    # Taking the unconditional half instead (blind halving the wrong way) would not agree.
    pipe = handle.pipeline
    with AttentionTracer(handle.denoiser, time_resolved=True) as tracer:  # noqa: SIM117
        pipe(prompt=PROMPTS, num_images_per_prompt=2, num_inference_steps=2, guidance_scale=4.0,
             generator=[torch.Generator().manual_seed(k) for k in range(4)], output_type="np")
        right = tracer.collect(layout_from_pipeline(pipe, 4))
        wrong = tracer.collect(CFGLayout(8, (0, 1, 2, 3), True))
    hw = right.resolutions[0]
    torch.testing.assert_close(step0(right)[hw], b[hw], rtol=1e-3, atol=1e-3)
    assert (step0(wrong)[hw] - b[hw]).abs().max() > 1e-2


def test_items_follow_prompts_and_seeds_whatever_the_batch(handle):
    run = trace_generation(handle, PROMPTS, n_images=2, steps=3, guidance=3.0, seed=5, batch_size=4)
    assert [(it["prompt_index"], it["image_index"], it["seed"]) for it in run.items] == [
        (0, 0, 5), (0, 1, 6), (1, 0, 7), (1, 1, 8)
    ]
    assert [m.prompt for m in run.maps] == [PROMPTS[0]] * 2 + [PROMPTS[1]] * 2
    # item 3 = prompt 1 with seed 8: alone in its own run it gives the same image and maps
    alone = trace_generation(handle, [PROMPTS[1]], n_images=1, steps=3, guidance=3.0, seed=8)
    np.testing.assert_allclose(alone.images[0].astype(int), run.images[3].astype(int), atol=1)
    np.testing.assert_allclose(alone.maps[0].word_map("square"), run.maps[3].word_map("square"), rtol=1e-3, atol=1e-4)
    # maps are image-sized and non-negative
    assert run.maps[0].token_maps.shape[1:] == (handle.image_size, handle.image_size)
    assert (run.maps[0].token_maps >= 0).all()


def test_tracing_leaves_the_images_unchanged(handle):
    pipe = handle.pipeline
    kwargs = dict(prompt=PROMPTS, num_images_per_prompt=1, num_inference_steps=3, guidance_scale=3.0, output_type="np")
    ref = pipe(generator=[torch.Generator().manual_seed(k) for k in range(2)], **kwargs).images
    traced = trace_generation(handle, PROMPTS, n_images=1, steps=3, guidance=3.0, seed=0)
    np.testing.assert_allclose(traced.images.astype(int), (np.clip(ref, 0, 1) * 255 + 0.5).astype(int), atol=1)


def test_save_load_round_trip_with_time_resolved_maps(handle, tmp_path):
    import zarr

    run = trace_generation(handle, PROMPTS, n_images=1, steps=2, guidance=3.0, time_resolved=True)
    run.save(tmp_path / "run")
    back = TracedRun.load(tmp_path / "run")
    assert len(back) == 2 and back.images.shape == run.images.shape
    np.testing.assert_allclose(back.maps[1].word_map("triangle"), run.maps[1].word_map("triangle"), rtol=2e-3)
    g = zarr.open_group(str(tmp_path / "run" / "maps.zarr"), mode="r")
    steps = [k for k in g.array_keys() if k.startswith("steps__")]
    assert steps, "time-resolved arrays missing"
    arr = g[steps[0]]
    assert arr.shape[:2] == (2, 2) and arr.metadata.dimension_names[:3] == ("step", "item", "token")
    assert list(g["timestep"][:]) == [int(t) for t in run.info["timesteps"]] and len(run.info["timesteps"]) == 2
    # the stored steps of a resolution add up to that resolution's total
    _, raw = run.time_resolved[0]
    h, w = map(int, steps[0].split("__")[1].split("x"))
    total = np.asarray(arr[:]).astype(np.float32).sum(0)  # [item, token, h, w]
    n = total.shape[1]
    np.testing.assert_allclose(total, raw.maps[(h, w)][:, :n].numpy(), rtol=5e-3, atol=5e-3)


def test_bad_input_is_named(handle, tmp_path):
    with pytest.raises(UserError, match="prompt 1 is empty"):
        trace_generation(handle, ["a red circle", "  "], steps=1)
    with pytest.raises(UserError, match="prompt set is empty"):
        trace_generation(handle, [], steps=1)
    with pytest.raises(UserError, match="not a DAAM run"):
        TracedRun.load(tmp_path)


def test_dit_is_rejected_by_name(tmp_path):
    from diffatlas.models.loader import load_model
    from diffatlas.models.tiny import make_tiny_model

    make_tiny_model("dit", tmp_path / "dit")
    dit = load_model(tmp_path / "dit")
    with pytest.raises(UserError, match="'tinydit' is a dit model without text cross-attention"):
        trace_generation(dit, ["a red circle"], steps=1, model_name="tinydit")
