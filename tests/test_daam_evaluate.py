"""Scoring against known answers: IoU/IoD/IoH on hand-made masks, mIoU vs true and detected
objects with baselines, relations, entanglement measures, and the real-image tracer."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from diffatlas.daam.entanglement import evaluate_adjective_swaps, evaluate_cohyponyms
from diffatlas.daam.measures import intersection_over, iou
from diffatlas.daam.objects import evaluate_generated, evaluate_real, summarize, summarize_by_role
from diffatlas.daam.parses import parses_for_run
from diffatlas.daam.syntax import relation_rows, summarize_relations
from diffatlas.daam.words import TracedRun, WordMaps, align_prompt
from diffatlas.data.shapesworld import caption_for, generate_shapesworld, render_scene
from diffatlas.errors import UserError


@pytest.fixture(scope="module")
def tok():
    from diffatlas.data.shapesworld import VOCABULARY
    from diffatlas.models.tokenizer import build_world_tokenizer

    return build_world_tokenizer(list(VOCABULARY))


def oracle_maps(tok, prompt: str, words: list[dict], masks: np.ndarray, shrink_adjectives: bool = False) -> WordMaps:
    """Token maps that are exactly each word's object mask (adjectives optionally its left half)."""
    aligned = align_prompt(tok, prompt)
    h, w = masks.shape[1:]
    maps = np.full((aligned.n_positions, h, w), 0.5, np.float32)
    for word, info in zip(aligned.words, words):
        obj = int(info["object"])
        m = masks[obj].astype(np.float32) if obj >= 0 else np.full((h, w), 0.5, np.float32)
        if shrink_adjectives and info["role"] in ("colour", "size") and obj >= 0:
            cols = np.nonzero(masks[obj].any(0))[0]
            m = m.copy()
            m[:, cols[len(cols) // 2] :] = 0.0
        for p in word.positions:
            maps[p] = m
    return WordMaps(maps, aligned)


def test_set_measures_known_answers():
    a = np.zeros((4, 4), bool)
    a[:2, :2] = True  # 4 pixels
    b = np.zeros((4, 4), bool)
    b[:2, :] = True  # 8 pixels, contains a
    assert iou(a, b) == pytest.approx(0.5)
    assert intersection_over(b, a) == 1.0  # all of a is inside b
    assert intersection_over(a, b) == 0.5
    assert iou(np.zeros_like(a), np.zeros_like(a)) == 0.0


def test_real_mode_scores_oracle_maps_and_baselines(tok):
    data = generate_shapesworld({"n_samples": 12, "two_object_fraction": 0.5})
    maps = [oracle_maps(tok, c, json.loads(wj), data.masks[i]) for i, (c, wj) in enumerate(zip(data.meta["caption"], data.meta["words"]))]
    run = TracedRun(data.images, maps, [{"sample_id": int(s)} for s in data.meta["sample_id"]], {})
    rows = evaluate_real(run, data.meta, data.masks, taus=[0.4, 0.7])
    nouns = rows[(rows.role == "shape") & (rows.method == "daam")]
    n_objects = int(data.meta["n_objects"].sum())
    assert len(nouns) == 2 * n_objects and np.allclose(nouns["iou"], 1.0)
    whole = rows[(rows.role == "shape") & (rows.method == "whole_image") & (rows.tau == 0.4)]
    areas = [data.masks[i, o].mean() for i in range(12) for o in range(int(data.meta["n_objects"][i]))]
    np.testing.assert_allclose(sorted(whole["iou"]), sorted(areas))
    table = summarize(rows, 0.4)
    by = table.set_index(["source", "method"])["miou"]
    assert by[("real", "daam")] == pytest.approx(1.0)
    assert by[("real", "whole_image")] == pytest.approx(np.mean(areas))
    assert by[("real", "daam")] > by[("real", "centre_prior")]
    # One row per (role, method); oracle maps are exact for nouns, and each role's whole-image
    # baseline is the mean area of the objects its words name.
    per_role = summarize_by_role(rows, 0.4).set_index(["words", "method"])
    assert set(per_role.index.get_level_values(0)) >= {"shape", "colour"}
    assert per_role.loc[("shape", "daam"), "miou"] == pytest.approx(1.0)
    assert per_role.loc[("shape", "whole_image"), "miou"] == pytest.approx(np.mean(areas))
    colour_rows = rows[(rows.role == "colour") & (rows.method == "daam") & (rows.tau == 0.4)]
    assert per_role.loc[("colour", "daam"), "miou"] == pytest.approx(colour_rows["iou"].mean())
    assert per_role.loc[("colour", "daam"), "n"] == len(colour_rows)


def test_relations_iod_ioh_known_answers(tok):
    objects = [{"shape": "square", "colour": "red", "size": "large", "x": 0.5, "y": 0.5}]
    cap = caption_for(objects, size_words=False)  # "a red square"
    _, masks = render_scene(objects, 32)
    maps = oracle_maps(tok, cap.text, cap.words, masks, shrink_adjectives=True)
    run = TracedRun(np.zeros((1, 32, 32, 3), np.uint8), [maps], [{"sample_id": -1}], {})
    parses, source = parses_for_run(run)
    assert source == "shapesworld-grammar" and ["amod", 2, 1] in parses[0]
    rel = summarize_relations(relation_rows(run, parses, 0.4, "x")).set_index("relation")
    # the adjective's mask is the left half of the noun's: all of D inside H, half of H covered
    assert rel.loc["amod", "miod"] == pytest.approx(1.0)
    assert rel.loc["amod", "mioh"] == pytest.approx(0.5, abs=0.05)
    assert rel.loc["amod", "miou"] == pytest.approx(rel.loc["amod", "mioh"])


def test_generated_mode_uses_detected_objects_and_reports_missing(tok):
    objects = [
        {"shape": "circle", "colour": "red", "size": "large", "x": 0.3, "y": 0.3},
        {"shape": "square", "colour": "blue", "size": "small", "x": 0.75, "y": 0.75},
    ]
    cap = caption_for(objects)
    image, masks = render_scene(objects, 32)
    good = oracle_maps(tok, cap.text, cap.words, masks)
    # a prompt naming a triangle the image does not contain
    missing_prompt = "a large red circle and a small blue triangle"
    bad = oracle_maps(tok, missing_prompt, caption_for([objects[0], {**objects[1], "shape": "triangle"}]).words, masks)
    run = TracedRun(np.stack([image, image]), [good, bad], [{}, {}], {})
    rows, found = evaluate_generated(run, taus=[0.4])
    # the triangle is not there: only the blue square is, matched by colour, not shape
    assert found["match"].tolist() == ["exact", "exact", "exact", "colour"]
    daam = rows[(rows.method == "daam") & (rows.role == "shape")]
    assert len(daam) == 4 and np.allclose(daam["iou"], 1.0)
    only_shape = TracedRun(image[None], [oracle_maps(tok, "a triangle", [{"object": 0, "role": "det"}, {"object": 0, "role": "shape"}], masks)], [{}], {})
    _, found2 = evaluate_generated(only_shape, taus=[0.4])
    assert found2["match"].tolist() == ["none"] and not found2["found"].any()


def test_cohyponym_and_adjective_swap_measures(tok):
    pair = [
        {"shape": "circle", "colour": "red", "size": "large", "x": 0.3, "y": 0.3},
        {"shape": "square", "colour": "red", "size": "large", "x": 0.72, "y": 0.72},
    ]
    both, masks = render_scene(pair, 32)
    only_first, _ = render_scene(pair[:1], 32)
    cap = caption_for(pair, size_words=False)
    maps = oracle_maps(tok, cap.text, cap.words, masks)
    red, m1 = render_scene([{"shape": "square", "colour": "red", "size": "large", "x": 0.5, "y": 0.5}], 32)
    green, _ = render_scene([{"shape": "square", "colour": "green", "size": "large", "x": 0.5, "y": 0.5}], 32)
    adj_red = oracle_maps(tok, "a red square", caption_for([{"shape": "square", "colour": "red"}], size_words=False).words, m1)
    adj_green = oracle_maps(tok, "a green square", caption_for([{"shape": "square", "colour": "green"}], size_words=False).words, m1)
    run = TracedRun(
        np.stack([both, only_first, red, green]),
        [maps, maps, adj_red, adj_green],
        [{"prompt_index": 0}, {"prompt_index": 0}, {"prompt_index": 1}, {"prompt_index": 2}],
        {},
    )
    coh = evaluate_cohyponyms(run, {"cohyponym": [0]}, tau=0.4)
    assert coh["both_present"].tolist() == [True, False]
    assert coh["first_present"].tolist() == [True, True]
    assert np.allclose(coh["noun_mask_iou"], 0.0)  # disjoint objects, oracle maps
    swaps = evaluate_adjective_swaps(run, {"square": {"red": [2], "green": [3]}}, tau=0.4)
    assert len(swaps) == 1
    row = swaps.iloc[0]
    assert row["change_outside"] == pytest.approx(0.0)  # same background everywhere else
    expected = np.abs(np.array([220, 40, 40]) - np.array([40, 190, 60])).mean() / 255
    assert row["change_inside"] == pytest.approx(expected, rel=1e-5)
    assert row["adjective_outside_noun"] == pytest.approx(0.0)


def test_real_image_tracing_on_a_tiny_model(tmp_path):
    import torch

    from diffatlas.daam.realimage import ddim_timesteps, trace_real_images
    from diffatlas.models.loader import load_model
    from diffatlas.models.tiny import make_tiny_model

    torch.set_num_threads(1)
    assert ddim_timesteps(1000, 20, 400) == [400, 350, 300, 250, 200, 150, 100, 50, 0]
    make_tiny_model("pixel", tmp_path / "m")
    handle = load_model(tmp_path / "m")
    data = generate_shapesworld({"n_samples": 3})
    caps = list(data.meta["caption"])
    a = trace_real_images(handle, data.images, caps, steps=5, t_start=300, batch_size=3, seed=1)
    b = trace_real_images(handle, data.images, caps, steps=5, t_start=300, batch_size=2, seed=1)
    assert [it["sample_id"] for it in a.items] == [0, 1, 2]
    assert a.info["timesteps"] == [300, 200, 0]
    np.testing.assert_allclose(a.maps[2].word_map(-1 + len(a.maps[2].words)), b.maps[2].word_map(len(b.maps[2].words) - 1), rtol=1e-4, atol=1e-5)
    inv = trace_real_images(handle, data.images[:1], caps[:1], steps=5, t_start=300, mode="invert")
    assert inv.maps[0].token_maps.shape[1:] == (32, 32) and inv.info["mode"] == "real-invert"
    with pytest.raises(UserError, match="sample 7 has no caption"):
        trace_real_images(handle, data.images[:2], [caps[0], ""], sample_ids=[3, 7])
    with pytest.raises(UserError, match="mode 'bogus'"):
        trace_real_images(handle, data.images[:1], caps[:1], mode="bogus")
    with pytest.raises(UserError, match="needs a dataset with object masks"):
        evaluate_real(a, data.meta, None, taus=[0.4])
    assert isinstance(a.items, list) and isinstance(pd.DataFrame(a.items), pd.DataFrame)
