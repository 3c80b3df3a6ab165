"""ShapesWorld: determinism and ground truth (masks, captions, parses, labels, detector)."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from diffatlas.data import shapesworld as sw
from diffatlas.data.config import ShapesWorldConfig, dataset_config_from_dict
from diffatlas.errors import UserError

CFG = {"n_samples": 96, "image_size": 32, "seed": 3, "two_object_fraction": 0.5, "size_word_prob": 0.5}


@pytest.fixture(scope="module")
def data():
    return sw.generate_shapesworld(CFG)


def _objects(row):
    return json.loads(row["objects"])


def test_same_config_gives_byte_identical_arrays(data):
    again = sw.generate_shapesworld(dict(CFG))
    assert again.images.tobytes() == data.images.tobytes()
    assert again.masks.tobytes() == data.masks.tobytes()
    assert again.meta.equals(data.meta)


def test_other_seed_differs_and_prefix_is_stable(data):
    other = sw.generate_shapesworld({**CFG, "seed": 4})
    assert (other.images != data.images).any(axis=(1, 2, 3)).mean() > 0.5
    assert other.meta["caption"].tolist() != data.meta["caption"].tolist()
    # sample i depends on (seed, i) only: a shorter dataset is a prefix of a longer one
    short = sw.generate_shapesworld({**CFG, "n_samples": 30})
    assert short.images.tobytes() == data.images[:30].tobytes()
    assert short.meta.equals(data.meta.iloc[:30].reset_index(drop=True))


def test_layout_dtypes_and_shapes(data):
    assert data.images.dtype == np.uint8 and data.images.shape == (96, 32, 32, 3)
    assert data.masks.dtype == np.bool_ and data.masks.shape == (96, sw.MAX_OBJECTS, 32, 32)
    assert data.meta["sample_id"].tolist() == list(range(96))
    counts = Counter(data.meta["n_objects"])
    assert set(counts) == {1, 2} and 30 <= counts[2] <= 66  # fraction 0.5 of 96


def test_masks_are_exactly_the_painted_pixels(data):
    background = np.array(sw.BACKGROUND, dtype=np.uint8)
    for i, row in data.meta.iterrows():
        objects, image, masks = _objects(row), data.images[i], data.masks[i]
        assert not masks[len(objects) :].any()  # unused slots are empty
        for k, obj in enumerate(objects):
            m = masks[k]
            assert m.sum() > 20
            assert (image[m] == sw.PALETTE[obj["colour"]]).all()
        union = masks.any(0)
        assert (masks.sum(0) <= 1).all()  # disjoint
        painted = (image != background).any(-1)
        assert (painted == union).all()  # every non-background pixel belongs to some mask
        assert (image[~union] == background).all()
        if len(objects) == 2:  # a one-pixel gap keeps the objects separate components
            assert not (sw._dilate(masks[0]) & masks[1]).any()


def test_geometry_matches_the_object_attributes(data):
    """Position and size semantics: bounding box side = diameter, centred at (x, y)."""
    s = 32
    assert (sw.diameter("small", s), sw.diameter("large", s)) == (10, 14)
    for i, row in data.meta.iterrows():
        for k, obj in enumerate(_objects(row)):
            ys, xs = np.nonzero(data.masks[i, k])
            d = sw.diameter(obj["size"], s)
            cx, cy = obj["x"] * s, obj["y"] * s
            # columns span the full diameter for every shape; a triangle's first row is empty
            assert xs.min() == cx - d / 2 and xs.max() + 1 == cx + d / 2
            assert ys.max() + 1 == cy + d / 2
            area = len(xs)
            if obj["shape"] == "square":
                assert area == d * d and ys.min() == cy - d / 2
            elif obj["shape"] == "circle":
                assert abs(area - np.pi * d * d / 4) < 0.08 * d * d
            else:
                assert area == d * d // 2


def test_sizes_are_clearly_distinguishable():
    for shape in sw.SHAPES:
        _, small = sw.render_object(shape, "red", "small")
        _, large = sw.render_object(shape, "red", "large")
        assert large.sum() / small.sum() > 1.8


def test_palette_colours_are_far_apart():
    refs = np.array([sw.BACKGROUND, *sw.PALETTE.values()], dtype=float)
    dist = np.linalg.norm(refs[:, None] - refs[None], axis=-1)
    assert dist[np.triu_indices(len(refs), 1)].min() > 150


def test_labels_follow_the_first_named_object(data):
    for _, row in data.meta.iterrows():
        first = _objects(row)[0]
        assert row["label"] == f"{first['colour']} {first['shape']}"
        assert row["coarse_label"] == first["shape"] == row["shape"]
        assert (row["colour"], row["size"]) == (first["colour"], first["size"])
        assert row["n_objects"] == len(_objects(row))
        # the caption's first noun names the first object
        words = json.loads(row["words"])
        assert next(w["word"] for w in words if w["role"] == "shape") == first["shape"]
    # balanced: each of the 12 fine classes 8 times in 96 samples
    assert Counter(data.meta["label"]) == {c: 8 for c in sw.FINE_CLASSES}


def test_parses_match_captions(data):
    for _, row in data.meta.iterrows():
        objects, words, relations = _objects(row), json.loads(row["words"]), json.loads(row["relations"])
        caption = row["caption"]
        assert " ".join(w["word"] for w in words) == caption
        assert all(w["word"] in sw.VOCABULARY for w in words)
        for w in words:
            if w["role"] == "cc":
                assert w["word"] == "and" and w["object"] == -1
            elif w["role"] == "det":
                assert w["word"] == "a"
            else:  # a noun or adjective names an attribute of the object it refers to
                assert objects[w["object"]][w["role"]] == w["word"]
        nouns = [j for j, w in enumerate(words) if w["role"] == "shape"]
        assert [words[j]["object"] for j in nouns] == list(range(len(objects)))
        for rel, head, dep in relations:
            assert head in nouns
            if rel == "det":
                assert words[dep]["word"] == "a" and words[dep]["object"] == words[head]["object"]
            elif rel == "amod":
                assert words[dep]["role"] in ("size", "colour") and words[dep]["object"] == words[head]["object"]
            elif rel == "conj":
                assert head == nouns[0] and dep in nouns[1:]
            elif rel == "cc":
                # "and" opens the phrase of the noun it attaches to
                assert words[dep]["word"] == "and" and dep < head
                assert words[dep + 1]["word"] == "a" and words[dep + 1]["object"] == words[head]["object"]
            else:
                pytest.fail(f"unexpected relation {rel}")
        kinds = Counter(r[0] for r in relations)
        assert kinds["det"] == len(objects) and kinds["conj"] == kinds["cc"] == len(objects) - 1
        assert kinds["amod"] == sum(w["role"] in ("size", "colour") for w in words)
        # the parser recovers the same structure from the text alone
        parsed, named = sw.parse_caption(caption)
        assert parsed.words == words and parsed.relations == relations
        for obj, nm in zip(objects, named):
            assert all(obj[k] == v for k, v in nm.items())
    # size words appear in some captions but not all (size_word_prob = 0.5)
    with_size = data.meta["caption"].str.contains("small|large").mean()
    assert 0.3 < with_size < 0.95


def test_caption_for_known_answer():
    objs = [
        {"shape": "circle", "colour": "red", "size": "small"},
        {"shape": "square", "colour": "blue", "size": "large"},
    ]
    cap = sw.caption_for(objs, size_words=[True, False])
    assert cap.text == "a small red circle and a blue square"
    assert [w["object"] for w in cap.words] == [0, 0, 0, 0, -1, 1, 1, 1]
    assert sorted(map(tuple, cap.relations)) == sorted(
        [("det", 3, 0), ("amod", 3, 1), ("amod", 3, 2), ("det", 7, 5), ("amod", 7, 6), ("conj", 3, 7), ("cc", 7, 4)]
    )
    assert sw.caption_for(objs[:1], colour_words=False, size_words=False).text == "a circle"


def test_vocabulary_is_every_caption_word():
    assert set(sw.VOCABULARY) == {"a", "and", *sw.SHAPES, *sw.COLOURS, *sw.SIZES}
    assert len(sw.VOCABULARY) == len(set(sw.VOCABULARY)) == 11


@pytest.mark.parametrize("text", ["a purple circle", "a red small circle", "red circle", "a red circle or a square", "a"])
def test_parse_rejects_text_outside_the_grammar(text):
    with pytest.raises(UserError, match="not in the ShapesWorld grammar"):
        sw.parse_caption(text)


def test_render_scene_validates_and_later_objects_hide_earlier():
    with pytest.raises(UserError, match="colour = 'purple'.*allowed: red, green, blue, yellow"):
        sw.render_scene([{"shape": "circle", "colour": "purple", "size": "small", "x": 0.5, "y": 0.5}])
    with pytest.raises(UserError, match="shape = 'star'"):
        sw.render_object("star", "red", "small")
    big = {"shape": "square", "colour": "red", "size": "large", "x": 0.5, "y": 0.5}
    small = {"shape": "square", "colour": "blue", "size": "small", "x": 0.5, "y": 0.5}
    image, masks = sw.render_scene([big, small])
    assert masks[0].sum() == 14 * 14 - 10 * 10 and masks[1].sum() == 100
    assert (image[masks[0]] == sw.PALETTE["red"]).all() and (image[masks[1]] == sw.PALETTE["blue"]).all()


def test_detector_recovers_rendered_objects_exactly(data):
    for i, row in data.meta.iterrows():
        objects = _objects(row)
        found = sw.detect_objects(data.images[i])
        assert len(found) == len(objects)
        for k, obj in enumerate(objects):
            ious = [(f["mask"] & data.masks[i, k]).sum() / (f["mask"] | data.masks[i, k]).sum() for f in found]
            best = found[int(np.argmax(ious))]
            assert max(ious) == 1.0
            assert best["colour"] == obj["colour"] and best["shape"] == obj["shape"]
            assert best["area"] == data.masks[i, k].sum()
            if obj["shape"] != "triangle":  # symmetric shapes: centroid is the centre
                assert best["centroid"] == pytest.approx((obj["x"], obj["y"]))


def test_detector_tolerates_noise():
    rng = np.random.default_rng(0)
    objs = [
        {"shape": "triangle", "colour": "yellow", "size": "large", "x": 0.3, "y": 0.3},
        {"shape": "circle", "colour": "green", "size": "small", "x": 0.75, "y": 0.75},
    ]
    image, masks = sw.render_scene(objs, 32)
    noisy = np.clip(image + rng.normal(0, 12, image.shape), 0, 255).astype(np.uint8)
    found = sw.detect_objects(noisy)
    assert [f["colour"] for f in found] == ["yellow", "green"]
    for f, m in zip(found, masks):
        assert (f["mask"] & m).sum() / (f["mask"] | m).sum() > 0.95


def test_detector_on_empty_image_finds_nothing():
    blank = np.full((32, 32, 3), sw.BACKGROUND, dtype=np.uint8)
    assert sw.detect_objects(blank) == []


def test_other_image_sizes_render_all_shapes_distinctly():
    for s in (16, 64):
        d = sw.generate_shapesworld({"n_samples": 24, "image_size": s, "two_object_fraction": 1.0})
        assert d.images.shape == (24, s, s, 3)
        assert (d.meta["n_objects"] == 2).all()
        for i, row in d.meta.iterrows():
            found = sw.detect_objects(d.images[i])
            assert sorted((f["colour"], f["shape"]) for f in found) == sorted((o["colour"], o["shape"]) for o in _objects(row))


def test_config_validation_names_key_and_allowed_values():
    with pytest.raises(UserError, match=r"image_size = 8 .*>= 16"):
        ShapesWorldConfig(image_size=8)
    with pytest.raises(UserError, match=r"two_object_fraction = 1.5 .*\[0, 1\]"):
        ShapesWorldConfig(two_object_fraction=1.5)
    with pytest.raises(UserError, match=r"'n_sample'.*datasets.toy.*allowed keys: .*n_samples"):
        dataset_config_from_dict({"kind": "shapesworld", "n_sample": 3}, "toy")
    with pytest.raises(UserError, match=r"datasets.toy.kind = 'cifar'.*shapesworld, image_folder, manifest"):
        dataset_config_from_dict({"kind": "cifar"}, "toy")
    with pytest.raises(UserError, match=r"datasets.toy.on_bad_image = 'ignore'.*error, skip"):
        dataset_config_from_dict({"kind": "image_folder", "path": "x", "on_bad_image": "ignore"}, "toy")
