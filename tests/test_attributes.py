"""Per-sample categorical attributes (ShapesWorld: colour, shape, size, position) from the
dataset through the activation store (and its sharded gather) to per-attribute SAE label
statistics.

Oracles: the pixels of the rendered images (colour by nearest palette entry, size from the
object's pixel extent, position from the mask's bounding-box centre) and the generator's own
scene spec; the strings written, for the store round trip and the gather; a brute-force numpy
count over dense SAE codes, for the statistics.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from diffatlas.activations.gather import gather_stores
from diffatlas.activations.store import ActivationStore, ActivationWriter, LayerSpec
from diffatlas.data.build import make_dataset
from diffatlas.data.dataset import load_dataset, write_dataset
from diffatlas.data.shards import plan_shards, shard_section, write_index
from diffatlas.errors import UserError
from diffatlas.sae import analysis
from diffatlas.sae.config import SAEArch, SAEConfig
from diffatlas.sae.model import TopKSAE
from diffatlas.sae.stats import summary_row

torch.set_num_threads(1)

# Hand-copied from the ShapesWorld docstring, not imported: 10 px and 14 px objects at 32x32,
# and the palette's RGB values.
PX = {"small": 10, "large": 14}
RGB = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (40, 90, 230), "yellow": (235, 215, 50)}


def _cell(centre_px: float) -> int:
    """Third of the 32-px side holding a centre given in pixels."""
    return min(2, int(centre_px // (32 / 3)))


# -- the dataset ----------------------------------------------------------------------------------
def test_shapesworld_attributes_match_the_pixels_and_the_scene(tmp_path):
    make_dataset({"kind": "shapesworld", "n_samples": 48, "seed": 5, "two_object_fraction": 0.5}, tmp_path / "d", "d")
    ds = load_dataset(tmp_path / "d")
    assert ds.attribute_names == ["colour", "shape", "size", "position"]
    attrs = ds.attributes()
    rows = ["top", "middle", "bottom"]
    cols = ["left", "centre", "right"]
    n_two = 0
    for i in range(len(ds)):
        mask = ds.masks[i, 0]  # the first-named object: the one the attributes describe
        pixels = ds.images[i][mask]
        assert len(pixels) and (pixels == pixels[0]).all()
        colour = min(RGB, key=lambda c: np.abs(np.asarray(RGB[c]) - pixels[0].astype(int)).sum())
        assert attrs["colour"][i] == colour
        ys, xs = np.nonzero(mask)
        width = xs.max() - xs.min() + 1
        assert attrs["size"][i] == {10: "small", 14: "large"}[width]
        # shape from how much of its bounding box it fills: 1 square, ~0.79 circle, ~0.5 triangle
        fill = mask.sum() / (width * (ys.max() - ys.min() + 1))
        assert attrs["shape"][i] == ("square" if fill > 0.9 else "circle" if fill > 0.65 else "triangle")
        # the column is exact for every shape (symmetric left-right); the row for the
        # up-down symmetric ones (a triangle's pixel box may lose its apex row)
        col = _cell((xs.min() + xs.max() + 1) / 2)
        row, col_name = attrs["position"][i].split("-")
        assert col_name == cols[col]
        if attrs["shape"][i] != "triangle":
            assert row == rows[_cell((ys.min() + ys.max() + 1) / 2)]
        # and the generator's own scene spec of the first object
        first = json.loads(ds.meta["objects"][i])[0]
        assert [attrs[a][i] for a in ("colour", "shape", "size")] == [first["colour"], first["shape"], first["size"]]
        assert attrs["position"][i] == f"{rows[min(2, int(first['y'] * 3))]}-{cols[min(2, int(first['x'] * 3))]}"
        assert ds.meta["label"][i] == f"{colour} {attrs['shape'][i]}"
        n_two += int(ds.meta["n_objects"][i]) == 2
    assert 0 < n_two < len(ds)  # both kinds of scene were checked
    assert ds.info["attribute_classes"]["size"] == ["large", "small"]
    assert len(set(attrs["position"])) > 3


def test_sharded_dataset_keeps_attributes_and_unites_their_classes(tmp_path):
    section = {"kind": "shapesworld", "n_samples": 14, "seed": 1}
    make_dataset(section, tmp_path / "plain", "sw")
    plans = plan_shards(section, "sw", 5)
    for p in plans:
        make_dataset(shard_section(section), tmp_path / "sh" / "shards" / p.name, "sw", rows=(p.start, p.stop), digest=p.digest)
    index = write_index(tmp_path / "sh", [p.name for p in plans], section, "sw", 5)
    plain, sharded = load_dataset(tmp_path / "plain"), load_dataset(tmp_path / "sh")
    assert sharded.attribute_names == plain.attribute_names
    for a, values in plain.attributes().items():
        assert sharded.attributes()[a].tolist() == values.tolist()
        assert index["attribute_classes"][a] == sorted(set(values.tolist()))
    # the last shard (4 samples) lacks some positions the others have: a real union
    last = load_dataset(tmp_path / "sh" / "shards" / plans[-1].name)
    assert set(last.info["attribute_classes"]["position"]) < set(index["attribute_classes"]["position"])


def test_datasets_without_attributes_and_bad_attribute_names(tmp_path):
    import pandas as pd

    images = np.zeros((2, 4, 4, 3), np.uint8)
    meta = pd.DataFrame({"sample_id": [0, 1], "label": ["a", "b"], "coarse_label": ["a", "b"], "caption": ["", ""],
                         "fine": ["x", "y"], "texture": ["dots", None]})
    write_dataset(tmp_path / "old", images, meta)
    assert load_dataset(tmp_path / "old").attributes() == {}
    write_dataset(tmp_path / "new", images, meta, info={"attributes": ["texture"]})
    ds = load_dataset(tmp_path / "new")
    assert ds.attributes()["texture"].tolist() == ["dots", ""]  # missing value: the empty class
    for bad in (["fine"], ["Texture"], ["texture", "texture"], "texture", ["active_x"], ["label"]):
        with pytest.raises(UserError, match="attribute|allowed"):
            write_dataset(tmp_path / "bad", images, meta, info={"attributes": bad})
    with pytest.raises(ValueError, match="lacks columns"):
        write_dataset(tmp_path / "bad", images, meta, info={"attributes": ["weight"]})


# -- the store and its gather ---------------------------------------------------------------------
def _write(path, ids, labels, attributes, values=None, batch=4):
    n = len(ids)
    values = np.arange(n * 2, dtype=np.float32).reshape(n, 2) if values is None else values
    w = ActivationWriter(path, timesteps=[3], alpha_bar=[0.5], sample_ids=ids, labels=labels, coarse_labels=None,
                         layers=[LayerSpec("mid", "mid_block", values.shape[1], 0, 0, False)], attrs={"model": "m"},
                         batch_size=batch, attributes=attributes)
    for s in range(0, n, batch):
        w.write("mid", 0, s, values[s : s + batch])
    w.close()
    return path


def test_store_round_trips_attributes(tmp_path):
    colour = ["red", "blue", "red", "green", "blue"]
    size = ["small", "small", "large", "small", "large"]
    store = ActivationStore(_write(tmp_path / "s.zarr", list(range(5)), ["x"] * 5, {"size": size, "colour": colour}))
    got = store.attributes()
    assert list(got) == ["size", "colour"] == store.attribute_names  # the dataset's order
    codes, classes = got["colour"]
    assert classes == ["blue", "green", "red"] and codes.tolist() == [2, 0, 2, 1, 0]
    assert [got["size"][1][c] for c in got["size"][0]] == size
    import xarray as xr

    assert xr.open_zarr(str(tmp_path / "s.zarr"))["attribute_code__colour"].dims == ("sample",)
    assert ActivationStore(_write(tmp_path / "old.zarr", [0, 1], ["x", "y"], None)).attributes() == {}
    with pytest.raises(UserError, match="attribute 'size' has 2 values for 5 samples"):
        _write(tmp_path / "bad.zarr", list(range(5)), ["x"] * 5, {"size": ["a", "b"]})


def test_gather_renumbers_attribute_codes_over_all_shards(tmp_path):
    # shard 0 knows red and blue, shard 1 green and red: codes differ per shard
    a = _write(tmp_path / "a.zarr", [0, 1, 2, 3], list("pqpq"), {"colour": ["red", "blue", "blue", "red"], "size": list("SLSL")})
    b = _write(tmp_path / "b.zarr", [4, 5, 6, 7], list("qqqr"), {"colour": ["green", "red", "green", "green"], "size": list("SSSS")})
    assert ActivationStore(a).attributes()["colour"][1] == ["blue", "red"]
    assert ActivationStore(b).attributes()["colour"][1] == ["green", "red"]
    store = ActivationStore(gather_stores([a, b], tmp_path / "g.zarr"))
    codes, classes = store.attributes()["colour"]
    assert classes == ["blue", "green", "red"]
    assert codes.tolist() == [2, 0, 0, 2, 1, 2, 1, 1]
    assert store.attributes()["size"][1] == ["L", "S"] and store.attributes()["size"][0].tolist() == [1, 0, 1, 0, 1, 1, 1, 1]
    assert list(store.labels("fine")) == list("pqpqqqqr")
    # shards carrying other attributes are refused, naming the shard
    c = _write(tmp_path / "c.zarr", [8, 9, 10, 11], list("pppp"), {"colour": ["red"] * 4})
    with pytest.raises(UserError, match=r"shard c .*attributes \['colour'\].*\['colour', 'size'\]"):
        gather_stores([a, c], tmp_path / "g2.zarr")
    assert not (tmp_path / "g2.zarr").exists()


# -- per-attribute SAE statistics vs brute force ------------------------------------------------------
N, C, CHUNK = 41, 5, 6


def _integer_sae(rng) -> TopKSAE:
    sae = TopKSAE(SAEArch(d_in=C, n_latents=9, k=3, k_aux=3))
    with torch.no_grad():
        sae.W_enc.copy_(torch.from_numpy(rng.integers(-1, 2, size=(9, C)).astype(np.float32)))
        sae.W_dec.copy_(torch.from_numpy(rng.integers(-1, 2, size=(9, C)).astype(np.float32)))
        sae.b_enc.copy_(torch.from_numpy(rng.integers(-1, 2, size=9).astype(np.float32)))
        sae.b_pre.zero_()
    return sae


@pytest.mark.parametrize("seed", [0, 1])
def test_per_attribute_statistics_equal_brute_force(tmp_path, seed):
    rng = np.random.default_rng(seed)
    names = {"colour": np.array(["red", "green", "blue"]), "size": np.array(["small", "large"])}
    drawn = {a: v[rng.integers(0, len(v), N)] for a, v in names.items()}
    x = rng.integers(-3, 4, size=(N, C)).astype(np.float32)
    store = ActivationStore(_write(tmp_path / "s.zarr", list(range(200, 200 + N)), [f"f{i % 3}" for i in range(N)],
                                   {a: v.tolist() for a, v in drawn.items()}, values=x, batch=CHUNK))
    sae = _integer_sae(rng)
    is_val = np.zeros(N, bool)
    is_val[rng.permutation(N)[:10]] = True
    top_n = 4
    cfg = SAEConfig(k=3, expansion=2, samples="pooled", top_n=top_n, min_active=2, top_latents=4, mine_on="train")
    data = analysis.StoreSamples(store, "mid", 3, "pooled", scale=1.0, is_val=is_val)
    metrics, latents = analysis.analyse(sae, data, cfg)

    # brute force: dense codes of every sample, mined rows only, full sort per latent
    with torch.no_grad():
        z = sae.codes(torch.from_numpy(x)).numpy()
    z = np.where(~is_val[:, None], z, 0.0)
    checked = 0
    for row in latents.itertuples():
        j = row.latent
        active = np.nonzero(z[:, j] > 0)[0]
        top = active[np.lexsort((active, -z[active, j]))][:top_n]
        for a, values in drawn.items():
            assert getattr(row, f"top_labels_{a}") == values[top].tolist()
            if len(top) == top_n:
                uniq, counts = np.unique(values[top], return_counts=True)
                assert getattr(row, f"purity_{a}") == counts.max() / top_n
                # ties go to the alphabetically first value (the lowest code)
                assert getattr(row, f"majority_{a}") == uniq[counts == counts.max()][0]
                p = counts / top_n
                assert getattr(row, f"entropy_{a}") == pytest.approx(-(p * np.log2(p)).sum())
                checked += 1
            else:
                assert np.isnan(getattr(row, f"purity_{a}")) and getattr(row, f"majority_{a}") == ""
            if len(active):
                uniq, counts = np.unique(values[active], return_counts=True)
                assert getattr(row, f"purity_active_{a}") == counts.max() / len(active)
                assert getattr(row, f"majority_active_{a}") == uniq[counts == counts.max()][0]
            else:
                assert np.isnan(getattr(row, f"purity_active_{a}"))
        assert f"sigma_label_{a}" not in latents.columns
    assert checked > 4
    # the per-attribute summary: the mean over the top-ranked latents
    n_top = metrics["labels"]["n_top_latents"]
    assert n_top > 0
    ranked = latents[(latents["rank"] >= 0) & (latents["rank"] < n_top)]
    for a in drawn:
        summary = metrics["labels"]["attributes"][a]
        assert summary["n_classes"] == len(set(drawn[a]))
        assert summary["purity"] == pytest.approx(ranked[f"purity_{a}"].mean())
        assert summary["purity_active"] == pytest.approx(ranked[f"purity_active_{a}"].mean())
        assert summary["purity_ci95"][0] <= summary["purity"] <= summary["purity_ci95"][1]
        assert summary_row(metrics)[f"purity_{a}"] == summary["purity"]
    # the granularities' columns are those of a store without attributes
    plain = ActivationStore(_write(tmp_path / "p.zarr", list(range(200, 200 + N)), [f"f{i % 3}" for i in range(N)],
                                   None, values=x, batch=CHUNK))
    _, base = analysis.analyse(sae, analysis.StoreSamples(plain, "mid", 3, "pooled", scale=1.0, is_val=is_val), cfg)
    assert list(latents.columns[: len(base.columns)]) == list(base.columns)
    assert latents[base.columns].equals(base)


def test_manifest_columns_become_attributes(tmp_path):
    from PIL import Image

    for i in range(4):
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(tmp_path / f"{i}.png")
    (tmp_path / "m.csv").write_text("path,label,texture,view\n0.png,a,dots,front\n1.png,b,,side\n2.png,a,dots,side\n3.png,b,stripes,front\n")
    section = {"kind": "manifest", "path": str(tmp_path / "m.csv"), "image_size": 8, "attributes": ["texture", "view"]}
    make_dataset(section, tmp_path / "d", "d")
    ds = load_dataset(tmp_path / "d")
    assert ds.attribute_names == ["texture", "view"]
    assert ds.attributes()["texture"].tolist() == ["dots", "", "dots", "stripes"]
    assert ds.info["attribute_classes"]["view"] == ["front", "side"]
    # a manifest without the option keeps the plain layout, and the shard digests of a
    # manifest without attributes are what they were before attributes existed
    make_dataset({**section, "attributes": []}, tmp_path / "plain", "plain")
    assert load_dataset(tmp_path / "plain").attributes() == {}
    from diffatlas.data.config import dataset_config_from_dict
    from diffatlas.data.ingest import candidates_of

    c = candidates_of(dataset_config_from_dict({**section, "attributes": []}, "d"))[0]
    assert c.fingerprint() == json.dumps([0, "0.png", "a", "a", "", ""])
    with pytest.raises(UserError, match=r"lacks column\(s\) \['weight'\]"):
        make_dataset({**section, "attributes": ["weight"]}, tmp_path / "bad", "bad")
    with pytest.raises(UserError, match="attribute name 'fine' is not allowed"):
        make_dataset({**section, "attributes": ["fine"]}, tmp_path / "bad", "bad")


def test_position_buckets_by_hand():
    from diffatlas.data.shapesworld import position_bucket

    assert position_bucket(0.1, 0.1) == "top-left" and position_bucket(0.9, 0.5) == "middle-right"
    assert position_bucket(0.5, 0.99) == "bottom-centre" and position_bucket(1.0, 0.0) == "top-right"
    # a centre exactly on an edge (possible at 48 px: 16/48) goes right / down
    assert position_bucket(16 / 48, 32 / 48) == "bottom-centre"
    assert position_bucket(15.5 / 48, 31.5 / 48) == "middle-left"
