"""The judge reads rendered ShapesWorld images with known labels (>= 98%), and scores fidelity."""

from __future__ import annotations

import json

import numpy as np
import pytest

from diffatlas.data.shapesworld import generate_shapesworld, render_scene
from diffatlas.errors import UserError
from diffatlas.world.judge import classify_shape, judge_images, matches_caption


def _accuracy(data, verdicts):
    """Per-object accuracies: each true object is matched to the found object nearest its centre."""
    count = shape = colour = size = centroid = total = 0
    for (_, row), v in zip(data.meta.iterrows(), verdicts):
        objects = json.loads(row["objects"])
        count += v["n_objects"] == len(objects)
        for o in objects:
            total += 1
            if not v["objects"]:
                continue
            f = min(v["objects"], key=lambda f: (f["centroid"][0] - o["x"]) ** 2 + (f["centroid"][1] - o["y"]) ** 2)
            shape += f["shape"] == o["shape"]
            colour += f["colour"] == o["colour"]
            size += f["size"] == o["size"]
            centroid += abs(f["centroid"][0] - o["x"]) < 0.05 and abs(f["centroid"][1] - o["y"]) < 0.08
    n = len(data.meta)
    return {"count": count / n, "shape": shape / total, "colour": colour / total, "size": size / total,
            "centroid": centroid / total}


@pytest.mark.parametrize("image_size", [32, 64])
def test_judge_on_rendered_images(image_size):
    data = generate_shapesworld({"n_samples": 240, "image_size": image_size, "seed": 11, "two_object_fraction": 0.5})
    acc = _accuracy(data, judge_images(data.images))
    assert min(acc.values()) >= 0.98, acc


def test_judge_on_noisy_and_blurred_images():
    """Generated images are not crisp: Gaussian pixel noise and a soft edge must not fool it."""
    from scipy import ndimage

    data = generate_shapesworld({"n_samples": 240, "image_size": 32, "seed": 5, "two_object_fraction": 0.5})
    rng = np.random.default_rng(0)
    noisy = np.clip(data.images + rng.normal(0, 25, data.images.shape), 0, 255).astype(np.uint8)
    acc = _accuracy(data, judge_images(noisy))
    assert min(acc.values()) >= 0.98, acc
    blurred = ndimage.gaussian_filter(data.images.astype(np.float32), sigma=(0, 0.6, 0.6, 0))
    acc = _accuracy(data, judge_images(np.clip(blurred, 0, 255).astype(np.uint8)))
    assert min(acc.values()) >= 0.98, acc


def test_float_input_and_touching_objects_are_split():
    # Two squares of different colours side by side, touching: one foreground component.
    image, _ = render_scene([
        {"shape": "square", "colour": "red", "size": "large", "x": 0.3, "y": 0.5},
        {"shape": "square", "colour": "blue", "size": "large", "x": 0.3 + 14 / 32, "y": 0.5},
    ])
    v = judge_images(image.astype(np.float32) / 255.0, return_masks=True)[0]
    assert v["n_objects"] == 2
    assert sorted(o["colour"] for o in v["objects"]) == ["blue", "red"]
    assert all(o["shape"] == "square" and o["size"] == "large" and o["area"] == 196 for o in v["objects"])
    assert v["objects"][0]["mask"].sum() == 196
    # The empty scene has no objects; bad shapes are refused.
    blank, _ = render_scene([])
    assert judge_images(blank)[0] == {"n_objects": 0, "n_background_blobs": 0, "objects": []}
    # A coloured background is not an object; the object on it still is.
    tinted, _ = render_scene([{"shape": "triangle", "colour": "yellow", "size": "large", "x": 0.5, "y": 0.5}])
    tinted[(tinted == 16).all(-1)] = (40, 80, 200)  # blue-ish background
    v = judge_images(tinted)[0]
    assert v["n_background_blobs"] == 1 and v["n_objects"] == 1
    assert (v["objects"][0]["colour"], v["objects"][0]["shape"]) == ("yellow", "triangle")
    with pytest.raises(UserError, match="RGB"):
        judge_images(np.zeros((2, 32, 32)))


def test_shape_templates_score_themselves_best():
    for shape in ("circle", "square", "triangle"):
        for size in ("small", "large"):
            _, masks = render_scene([{"shape": shape, "colour": "red", "size": size, "x": 0.5, "y": 0.5}], 64)
            best, scores = classify_shape(masks[0])
            assert best == shape and scores[shape] > 0.85, (shape, size, scores)


def test_matches_caption():
    red_circle = {"shape": "circle", "colour": "red", "size": "small"}
    blue_square = {"shape": "square", "colour": "blue", "size": "large"}
    v1 = {"n_objects": 1, "objects": [red_circle]}
    assert matches_caption(v1, [{"shape": "circle", "colour": "red"}]) == {
        "count": True, "shape": True, "colour": True, "all": True}
    assert matches_caption(v1, [{"shape": "square", "colour": "red"}]) == {
        "count": True, "shape": False, "colour": True, "all": False}
    v2 = {"n_objects": 2, "objects": [blue_square, red_circle]}
    named = [{"shape": "circle", "colour": "red", "size": "small"}, {"shape": "square", "colour": "blue"}]
    assert matches_caption(v2, named) == {"count": True, "all": True}
    assert matches_caption(v2, [named[0], {"shape": "square", "colour": "green"}])["all"] is False
    assert matches_caption({"n_objects": 0, "objects": []}, [{"shape": "circle"}])["shape"] is False


def test_fidelity_scores_and_wilson_interval():
    from scipy.stats import binomtest

    from diffatlas.world.config import FidelityConfig
    from diffatlas.world.fidelity import fidelity_captions, score, wilson

    for k, n in ((8, 10), (0, 12), (47, 48)):
        ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
        assert wilson(k, n) == pytest.approx([ci.low, ci.high], abs=1e-3)
    single, two = fidelity_captions(FidelityConfig(n_single=24, n_two=10, seed=3))
    assert [c["caption"] for c in single[:13:12]] == ["a red circle", "a red circle"]
    assert all(c["objects"][0] != c["objects"][1] for c in two)
    # Verdicts: render each caption's objects exactly -> every rate is 1, except the ones we break.
    def render(objs):
        placed = [{**o, "size": "small", "x": 0.25 + 0.5 * i, "y": 0.5} for i, o in enumerate(objs)]
        return render_scene(placed)[0]

    imgs_s = np.stack([render(c["objects"]) for c in single])
    imgs_t = np.stack([render(c["objects"]) for c in two])
    imgs_s[:6] = render([{"shape": "square", "colour": "green"}])  # the first 6 show a green square instead
    vs, vt = judge_images(imgs_s), judge_images(imgs_t)
    vt[:3] = judge_images(imgs_s[12:15])  # three single-object images for two-object captions
    m = score(single, two, vs, vt)
    expected_shape = sum(c["objects"][0]["shape"] == "square" for c in single[:6]) + 18
    expected_colour = sum(c["objects"][0]["colour"] == "green" for c in single[:6]) + 18
    assert m["shape_accuracy"]["k"] == expected_shape and m["shape_accuracy"]["n"] == 24
    assert m["colour_accuracy"]["k"] == expected_colour
    assert m["two_object_rate"]["rate"] == pytest.approx(0.7)
    assert m["gate"]["passed"] is False and m["gate"]["values"]["two_object_rate"] == pytest.approx(0.7)
