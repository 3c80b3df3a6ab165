"""Links between methods (diffatlas.links): IoU and threshold of latent maps against hand-made
masks, bicubic upsampling against a brute-force cubic-convolution oracle, the labelling and the
agreement rate against hand tables, a planted SAE-DAAM link end to end, and the edited-image
activations against the extraction store itself."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from diffatlas.intervals import wilson
from diffatlas.links.directions import agreement, latent_attributes, latent_change, relative_change, score_directions
from diffatlas.links.sae_daam import labelled_latents, latent_mask, link_run, pooled, score_image, upsample

torch.set_num_threads(1)


# -- threshold and IoU ----------------------------------------------------------------------------
def test_score_image_against_hand_masks():
    latent = np.array([[0.0, 0.3], [0.5, 1.0]])  # min-max: same; > 0.4 -> bottom row
    daam = np.array([[1.0, 0.0], [0.9, 0.2]])  # > 0.4 -> left column
    truth = np.array([[False, False], [True, False]])
    s = score_image(latent, daam, truth, 0.4)
    assert s["iou_sae_daam"] == pytest.approx(1 / 3)  # {(1,0)} / {(0,0),(1,0),(1,1)}
    assert s["iou_sae_true"] == pytest.approx(1 / 2)
    assert s["iou_daam_true"] == pytest.approx(1 / 2)
    assert s["active"] and s["sae_area"] == 0.5
    # the threshold is DAAM's min-max scaling: a map shifted and scaled gives the same mask
    assert (latent_mask(3 * latent + 2, (2, 2), 0.4) == latent_mask(latent, (2, 2), 0.4)).all()
    assert latent_mask(latent, (2, 2), 0.2).sum() == 3  # 0.3 now passes
    # a latent that does not fire: empty mask, IoU 0, kept as inactive
    off = score_image(np.zeros((2, 2)), daam, truth, 0.4)
    assert (off["iou_sae_true"], off["iou_sae_daam"], off["active"]) == (0.0, 0.0, False)


def _cubic_weights(t, a=-0.75):
    """Keys' cubic convolution weights of the 4 neighbours at fractional offset t (PyTorch's a)."""
    def k(x):
        x = abs(x)
        if x <= 1:
            return (a + 2) * x**3 - (a + 3) * x**2 + 1
        if x < 2:
            return a * x**3 - 5 * a * x**2 + 8 * a * x - 4 * a
        return 0.0
    return [k(t + 1), k(t), k(1 - t), k(2 - t)]


def _bicubic_1d(v, n_out):
    """Brute force: half-pixel centres, border replicated."""
    n = len(v)
    out = np.zeros(n_out)
    for i in range(n_out):
        src = (i + 0.5) * n / n_out - 0.5
        f = int(np.floor(src))
        w = _cubic_weights(src - f)
        out[i] = sum(wj * v[min(max(f - 1 + j, 0), n - 1)] for j, wj in enumerate(w))
    return out


def test_upsample_matches_cubic_convolution_and_clamps():
    rng = np.random.default_rng(0)
    m = rng.normal(size=(3, 4))
    rows = np.stack([_bicubic_1d(r, 8) for r in m])
    expect = np.stack([_bicubic_1d(c, 6) for c in rows.T]).T
    np.testing.assert_allclose(upsample(m, (6, 8)), np.clip(expect, 0, None), atol=1e-5)
    np.testing.assert_allclose(upsample(np.full((2, 2), 3.0), (5, 7)), 3.0, rtol=1e-6)  # weights sum to 1
    np.testing.assert_array_equal(upsample(m, (3, 4)), np.clip(m, 0, None).astype(np.float32))  # same size: no resampling


# -- labels -----------------------------------------------------------------------------------------
def _latents_table():
    return pd.DataFrame({
        "latent": [0, 1, 2, 3, 4],
        "rank": [0, 1, 2, -1, 3],
        "majority_colour": ["red", "red", "blue", "red", "red"],
        "purity_colour": [0.6, 0.9, 0.8, 1.0, 0.4],
        "majority_shape": ["circle", "square", "square", "circle", "circle"],
        "purity_shape": [0.3, 0.5, 0.9, 1.0, 0.9],
        "majority_size": ["small"] * 5,
        "purity_size": [0.5, 0.5, 0.5, 0.5, 0.55],
        "majority_position": ["top"] * 5,
        "purity_position": [0.2, 0.2, 0.2, 0.2, 0.2],
    })


def test_labelled_latents_hand_table():
    got = labelled_latents(_latents_table(), [("red", "colour"), ("square", "shape"), ("circle", "shape")], top_latents=10)
    # red: 1 (0.9) then 0 (0.6); 3 is unranked, 4 below purity 0.5. square: 2 (0.9), 1 (0.5). circle: 4 (0.9); 0 too impure
    assert list(zip(got["word"], got["latent"])) == [("red", 1), ("red", 0), ("square", 2), ("square", 1), ("circle", 4)]
    # top_latents limits the ranked set: rank 3 (latent 4) drops out
    got = labelled_latents(_latents_table(), [("circle", "shape")], top_latents=3)
    assert got.empty


def test_latent_attributes_hand_table():
    chance = {"colour": 0.3, "shape": 0.4, "size": 0.5, "position": 0.25}
    got = latent_attributes(_latents_table(), chance, top_latents=10)
    # margins: 0: colour .3, shape -.1, size 0, pos -.05 -> colour; 1: colour .6 -> colour;
    # 2: colour .5, shape .5 -> first (colour); 3: unranked; 4: colour .1, shape .5, size .05 -> shape
    assert got.to_dict() == {0: "colour", 1: "colour", 2: "colour", 3: "unlabelled", 4: "shape"}


def test_change_agreement_and_chance_hand_table():
    # E=1 sample, m=3 directions, S=3 strengths (-1, 0, 1), n=4 latents
    z = np.zeros((1, 3, 3, 4))
    z[0, 0, :, 1] = [2.0, 1.0, 0.0]  # direction 0 moves latent 1 by 1 on each side -> change 1
    z[0, 0, :, 2] = [1.0, 1.0, 1.5]  # latent 2: change (0 + 0.5) / 2 = 0.25
    z[0, 1, :, 3] = [0.0, 0.0, 4.0]  # direction 1 moves latent 3: change 2
    z[0, 2, :, 0] = [0.0, 3.0, 3.0]  # direction 2 moves latent 0: change 1.5
    change = latent_change(z, [-1.0, 0.0, 1.0])
    np.testing.assert_allclose(change[0], [0, 1, 0.25, 0])
    np.testing.assert_allclose(change[1], [0, 0, 0, 2])
    # relative change: by the latent's mean activation when active; no scale (never active) -> left out (0)
    np.testing.assert_allclose(relative_change(change, np.array([3.0, 4.0, 0.05, np.nan])), [[0, 0.25, 5.0, 0], [0, 0, 0, 0],
                                                                                          [0.5, 0, 0, 0]])
    attribute = pd.Series({0: "shape", 1: "colour", 2: "shape", 3: "unlabelled"})
    active = np.array([True, True, True, False])
    table = score_directions(change, active, attribute, ["colour", "shape", "count"], top=2)
    assert table["top_latents"].tolist() == ["1,2", "3,0", "0,1"]
    assert table["agree"].iloc[0] == 1.0 and table["agree"].iloc[1] == 0.0 and np.isnan(table["agree"].iloc[2])
    assert table["agree_share_top"].iloc[:2].tolist() == [0.5, 0.5]
    # chance: share of the 3 active latents (0, 1, 2) whose attribute is the factor
    assert table["chance"].iloc[:2].tolist() == pytest.approx([1 / 3, 2 / 3])
    table.insert(0, "layer", "mid")
    table.insert(1, "timestep", 50)
    table.insert(2, "geo_timestep", 999)
    # a second SAE run that sees the same directions and agrees on both
    other = table.assign(layer="up_ft1", agree=[1.0, 1.0, np.nan])
    agree = agreement(pd.concat([table, other], ignore_index=True)).set_index("layer")
    run = agree.loc["mid"]
    assert (run.k, run.n, run.not_scored, run.interval) == (1, 2, 1, "wilson")
    assert run.chance == pytest.approx(0.5)
    # Wilson 95% of 1/2 by hand: centre 0.5, half-width z sqrt(1/8 + z^2/16) / (1 + z^2/2)
    z95 = 1.959963984540054
    half = z95 * np.sqrt(0.25 / 2 + z95**2 / 16) / (1 + z95**2 / 2)
    assert [run.low, run.high] == pytest.approx([0.5 - half, 0.5 + half])
    assert [run.low, run.high] == pytest.approx(wilson(1, 2))
    pooled = agree.loc["all"]
    assert (pooled.k, pooled.n, pooled.n_directions, pooled.not_scored) == (3, 4, 2, 2)
    # over the 2 directions: agreement means 1 (direction 0) and 0.5 (direction 1); resampling 2 clusters
    # gives means 1, 0.75 or 0.5 (probabilities 1/4, 1/2, 1/4): the 95% percentile interval is [0.5, 1]
    assert pooled.interval == "bootstrap over directions" and [pooled.low, pooled.high] == pytest.approx([0.5, 1.0])


# -- a planted SAE-DAAM link, end to end through store, SAE and masks ---------------------------
class _Word:
    def __init__(self, positions):
        self.positions = positions


class _Maps:
    """Stands in for a DAAM WordMaps: word maps by word index."""

    def __init__(self, word_maps):
        self._maps = word_maps
        self.words = [_Word((i + 1,)) for i in range(len(word_maps))]

    def word_map(self, i):
        return self._maps[i]


class _Run:
    def __init__(self, items, maps):
        self.items, self.maps = items, maps


def _block(rows, cols, hw=4):
    m = np.zeros((hw, hw), dtype=np.float32)
    m[rows, cols] = 1.0
    return m


def test_planted_link_run(tmp_path):
    from diffatlas.activations.store import LayerSpec, open_writer
    from diffatlas.sae.config import SAEArch
    from diffatlas.sae.model import TopKSAE

    # store: layer mid, 2 channels, 4x4 maps (= the image size, so no resampling)
    n = 3
    spatial = np.zeros((n, 2, 4, 4), dtype=np.float32)
    spatial[0, 0, :2, :2] = 1.0  # sample 100: channel 0 on the red square (top-left 2x2)
    spatial[0, 1, 0, :] = 0.5  # channel 1 on the top row
    spatial[1, 0, 3, 3] = 1.0
    store = tmp_path / "t50.zarr"
    with open_writer(store, timesteps=[50], alpha_bar=[0.9], sample_ids=[100, 101, 102], labels=["red square", "blue circle", "x"],
                     coarse_labels=None, layers=[LayerSpec("mid", "mid_block", 2, 4, 4, True)], attrs={"pooling": "mean"},
                     batch_size=8) as w:
        w.write("mid", 0, 0, spatial.mean(axis=(2, 3)), spatial)
    # SAE: latent j reads channel j (k = 1)
    sae = TopKSAE(SAEArch(d_in=2, n_latents=2, k=1, k_aux=1))
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(2))
        sae.W_dec.copy_(torch.eye(2))
    run_dir = tmp_path / "sae"
    sae.save(run_dir, {"layer": "mid", "timestep": 50, "store": str(store), "input_scale": 1.0, "sae_config": {"top_latents": 10}})
    pd.DataFrame({"latent": [0, 1], "rank": [0, 1], "majority_colour": ["red", "blue"], "purity_colour": [0.8, 0.3],
                  "majority_shape": ["circle", "square"], "purity_shape": [0.2, 0.9]}).to_parquet(run_dir / "latents.parquet")
    words = lambda a, b: json.dumps([{"word": "a", "role": "det", "object": -1}, {"word": a, "role": "colour", "object": 0},
                                     {"word": b, "role": "shape", "object": 0}])
    meta = pd.DataFrame({"sample_id": [100, 101, 102], "words": [words("red", "square"), words("blue", "circle"), words("red", "circle")]})
    masks = np.zeros((3, 1, 4, 4), dtype=bool)
    masks[0, 0, :2, :2] = True
    masks[1, 0, 3, 3] = True
    daam = _Run([{"sample_id": 100}, {"sample_id": 101}], [
        _Maps([np.zeros((4, 4)), _block(slice(0, 3), slice(0, 3)), _block(slice(None), 0)]),  # red: 3x3, square: column 0
        _Maps([np.zeros((4, 4)), _block(3, 3), _block(3, 3)]),
    ])
    rows = link_run(run_dir, None, daam, meta, masks, tau=0.4)
    # sample 100: red -> latent 0 (map = the 2x2 block), square -> latent 1 (map = (0,2),(0,3): 0.5 where
    # channel 0 does not win the top-1). Sample 101 names blue (latent 1's colour purity 0.3 < 0.5) and circle (none).
    got = {(r.word, r.latent): (r.iou_sae_daam, r.iou_sae_true, r.iou_daam_true) for r in rows.itertuples()}
    assert set(got) == {("red", 0), ("square", 1)} and (rows["sample_id"] == 100).all()
    assert got["red", 0] == pytest.approx((4 / 9, 1.0, 4 / 9))
    assert got["square", 1] == pytest.approx((0.0, 0.0, 2 / 6))
    # the links section's purity threshold: latent 0's red purity 0.8 < 0.85 drops red; square (0.9) stays
    from diffatlas.links.config import LinksConfig

    strict = link_run(run_dir, None, daam, meta, masks, tau=0.4, links=LinksConfig(min_purity=0.85))
    assert set(zip(strict["word"], strict["latent"])) == {("square", 1)}


def test_links_config_names_the_key_and_allowed_values():
    from diffatlas.errors import UserError
    from diffatlas.links.config import LinksConfig

    with pytest.raises(UserError, match=r"config links.min_purity = 1.5 is not allowed; allowed: a number in \[0, 1\]"):
        LinksConfig(min_purity=1.5)
    with pytest.raises(UserError, match=r"config links.noise_draws = 0 is not allowed; allowed: an integer >= 1"):
        LinksConfig(noise_draws=0)
    with pytest.raises(UserError, match=r"config links.edit_mode = 'iterative' is not allowed; allowed: normalised, linear"):
        LinksConfig(edit_mode="iterative")
    # each job's settings hold only the keys it reads
    assert json.loads(LinksConfig.job_json(LinksConfig().to_dict(), "sae_daam")) == {"latents_per_word": 2, "min_purity": 0.5, "seed": 0}


def test_pooled_averages_per_image_first():
    rows = pd.DataFrame({"layer": "mid", "timestep": 50, "attribute": "colour", "latent": [0, 1, 0],
                         "sample_id": [7, 7, 8], "iou_sae_daam": [0.2, 0.4, 0.9], "iou_sae_true": [0.0, 0.0, 1.0],
                         "iou_daam_true": [0.5, 0.5, 0.1]})
    p = pooled(rows).iloc[0]
    # image 7: (0.2 + 0.4) / 2 = 0.3, image 8: 0.9 -> 0.6; DAAM's own IoU counted once per image: (0.5 + 0.1) / 2
    assert (p.n, p.n_images, p.latents) == (3, 2, 2)
    assert (p.iou_sae_daam, p.iou_sae_true, p.iou_daam_true) == pytest.approx((0.6, 0.5, 0.3))
    # two images: bootstrap means 0.3, 0.6, 0.9 -> the 95% percentile interval is [0.3, 0.9]
    assert [p.iou_sae_daam_low, p.iou_sae_daam_high] == pytest.approx([0.3, 0.9])


# -- the edited images' activations are the store's ---------------------------------------------
def test_pooled_activations_equal_extraction(tmp_path):
    from diffatlas.activations.config import ExtractConfig
    from diffatlas.activations.extract import extract_activations
    from diffatlas.activations.store import ActivationStore
    from diffatlas.links.directions import pooled_activations
    from diffatlas.models.loader import load_model
    from diffatlas.models.tiny import make_tiny_model

    handle = load_model(make_tiny_model("pixel", tmp_path / "m"))
    s = int(handle.image_size)
    images = np.random.default_rng(0).integers(0, 255, size=(3, s, s, 3), dtype=np.uint8)
    cfg = ExtractConfig(layers=["mid", "up_ft0"], timesteps=[200], spatial=False, batch_size=2)
    extract_activations(handle, images=images, sample_ids=[5, 6, 7], labels=["a"] * 3, coarse_labels=None, captions=None,
                        cfg=cfg, out=tmp_path / "s.zarr", background=False)
    store = ActivationStore(tmp_path / "s.zarr")
    got = pooled_activations(handle, images, np.array([5, 6, 7]), cfg)
    for layer in ("mid", "up_ft0"):
        np.testing.assert_allclose(got[layer], store.pooled(layer, 200), rtol=1e-5, atol=1e-6)
    # one noise id for two copies of an image: identical activations; another id: different
    twin = pooled_activations(handle, images[[0, 0, 0]], np.array([5, 5, 6]), cfg)["mid"]
    np.testing.assert_array_equal(twin[0], twin[1])
    assert not np.allclose(twin[0], twin[2])


def test_store_of_another_model_is_refused(tmp_path):
    from diffatlas.errors import UserError
    from diffatlas.links.directions import check_model

    class _Store:
        path = tmp_path / "t50.zarr"
        attrs = {"model_name": "sd15"}

    check_model(_Store(), "sd15")
    check_model(_Store(), None)  # nothing to compare
    with pytest.raises(UserError, match=r"holds activations of model 'sd15', but .* model 'shapesworld'"):
        check_model(_Store(), "shapesworld")
