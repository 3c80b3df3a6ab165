"""Ingestion of real images: conversions, bad files, label alignment, manifests."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from diffatlas.data.build import make_dataset
from diffatlas.data.config import ImageFolderConfig
from diffatlas.data.dataset import load_dataset
from diffatlas.data.ingest import list_image_folder, load_image, to_rgb
from diffatlas.errors import UserError

S = 16


def _solid(mode, size, value):
    return Image.new(mode, size, value)


@pytest.fixture()
def folder(tmp_path):
    """Three classes; every image is one flat colour, so each row can be checked against its file.

    Returns (root, expected RGB per relative path, the corrupt file's relative path).
    """
    root = tmp_path / "imgs"
    expected = {}

    def put(rel, img, rgb):
        f = root / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        img.save(f)
        expected[rel] = rgb

    put("cat/a_rgb.png", _solid("RGB", (S, S), (200, 30, 40)), (200, 30, 40))
    put("cat/b_wide.jpg", _solid("RGB", (50, 30), (20, 180, 60)), (20, 180, 60))  # odd size, JPEG
    put("dog/a_gray.png", _solid("L", (S, S), 77), (77, 77, 77))
    put("dog/b_rgba.png", _solid("RGBA", (S, S), (200, 100, 50, 128)), (100, 50, 25))  # on black
    put("dog/c_gray16.png", _solid("I;16", (20, 24), 40000), (156, 156, 156))  # 16-bit gray
    pal = _solid("RGB", (S, S), (10, 20, 230)).quantize(4)
    put("zebra/b_palette.png", pal, (10, 20, 230))
    corrupt = "zebra/a_corrupt.png"
    (root / corrupt).write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png" * 3)
    (root / "zebra/notes.txt").write_text("not an image")  # ignored: not an image extension
    return root, expected, corrupt


def _assert_rows_match_files(ds, root, expected):
    """Each image is its own file's colour and each label its own folder: nothing shifted."""
    for i, row in ds.meta.iterrows():
        assert row["label"] == row["path"].split("/")[0]
        img = ds.images[i]
        assert np.abs(img.astype(int) - np.array(expected[row["path"]])).max() <= 2, row["path"]


def test_bad_image_stops_the_job_naming_the_file(folder, tmp_path):
    root, _, corrupt = folder
    out = tmp_path / "out"
    with pytest.raises(UserError) as err:
        make_dataset({"kind": "image_folder", "path": str(root), "image_size": S}, out, name="real")
    assert str(root / corrupt) in str(err.value) and "on_bad_image: skip" in str(err.value)
    assert not out.exists() and not any(p.name.startswith(".out") for p in tmp_path.iterdir())


def test_skip_drops_the_bad_file_and_keeps_labels_aligned(folder, tmp_path):
    root, expected, corrupt = folder
    out = tmp_path / "out"
    make_dataset({"kind": "image_folder", "path": str(root), "image_size": S, "on_bad_image": "skip"}, out, name="real")
    ds = load_dataset(out)
    assert len(ds) == 6 and ds.images.shape == (6, S, S, 3) and ds.images.dtype == np.uint8
    assert ds.masks is None
    assert ds.info["n_skipped"] == 1 and ds.info["skipped"][0]["path"] == corrupt
    assert ds.info["n_candidates"] == 7
    # sorted paths; sample ids are positions among all 7 candidates, so the skipped one leaves a gap
    assert ds.meta["path"].tolist() == sorted(expected)
    assert ds.meta["sample_id"].tolist() == [0, 1, 2, 3, 4, 6]  # zebra/a_corrupt.png was id 5
    assert ds.labels("fine").tolist() == ["cat", "cat", "dog", "dog", "dog", "zebra"]
    assert ds.labels("coarse").tolist() == ds.labels("fine").tolist()
    assert ds.captions == [""] * 6
    assert ds.info["classes"] == ["cat", "dog", "zebra"]
    _assert_rows_match_files(ds, root, expected)
    # decoding on several threads changes nothing
    out2 = tmp_path / "out2"
    make_dataset({"kind": "image_folder", "path": str(root), "image_size": S, "on_bad_image": "skip"}, out2, name="real", threads=3)
    ds2 = load_dataset(out2)
    assert ds2.images.tobytes() == ds.images.tobytes() and ds2.meta.equals(ds.meta)


def test_rgba_composites_on_the_chosen_background():
    img = _solid("RGBA", (4, 4), (200, 100, 50, 128))
    black = np.asarray(to_rgb(img, "black"))[0, 0]
    white = np.asarray(to_rgb(img, "white"))[0, 0]
    a = 128 / 255
    assert np.abs(black - np.array([200, 100, 50]) * a).max() <= 1
    assert np.abs(white - (np.array([200, 100, 50]) * a + 255 * (1 - a))).max() <= 1
    transparent = np.asarray(to_rgb(_solid("RGBA", (4, 4), (200, 100, 50, 0)), "white"))
    assert (transparent == 255).all()


def test_odd_sizes_are_centre_cropped(tmp_path):
    # three vertical bands; the centre crop of a 60x20 image is exactly the middle band
    arr = np.zeros((20, 60, 3), dtype=np.uint8)
    arr[:, :20] = (255, 0, 0)
    arr[:, 20:40] = (0, 255, 0)
    arr[:, 40:] = (0, 0, 255)
    f = tmp_path / "bands.png"
    Image.fromarray(arr).save(f)
    out = load_image(f, 10)
    assert out.shape == (10, 10, 3) and out.dtype == np.uint8
    assert (np.abs(out[:, 2:8].astype(int) - (0, 255, 0)).max()) <= 3
    tall = tmp_path / "tall.png"
    Image.fromarray(np.ascontiguousarray(arr.transpose(1, 0, 2))).save(tall)
    assert (np.abs(load_image(tall, 10)[2:8].astype(int) - (0, 255, 0)).max()) <= 3


def test_empty_and_missing_sources_are_clear_errors(tmp_path):
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(UserError, match="no images found in .*empty"):
        make_dataset({"kind": "image_folder", "path": str(tmp_path / "empty")}, tmp_path / "o1")
    with pytest.raises(UserError, match="is not a directory"):
        make_dataset({"kind": "image_folder", "path": str(tmp_path / "nope")}, tmp_path / "o2")
    with pytest.raises(UserError, match="manifest file not found"):
        make_dataset({"kind": "manifest", "path": str(tmp_path / "nope.csv")}, tmp_path / "o3")
    (tmp_path / "bad" / "cls").mkdir(parents=True)
    (tmp_path / "bad" / "cls" / "x.png").write_bytes(b"junk")
    with pytest.raises(UserError, match="all 1 images .* are unreadable"):
        make_dataset({"kind": "image_folder", "path": str(tmp_path / "bad"), "on_bad_image": "skip"}, tmp_path / "o4")
    assert not (tmp_path / "o4").exists()


def test_coarse_labels_mapping(folder):
    root, _, _ = folder
    cfg = ImageFolderConfig(path=str(root), coarse_labels={"cat": "pet", "dog": "pet", "zebra": "wild"})
    cands = list_image_folder(cfg)
    assert [(c.label, c.coarse_label) for c in cands][:3] == [("cat", "pet"), ("cat", "pet"), ("dog", "pet")]
    with pytest.raises(UserError, match=r"no entry for class folder\(s\) \['zebra'\]"):
        list_image_folder(ImageFolderConfig(path=str(root), coarse_labels={"cat": "pet", "dog": "pet"}))


def _manifest_table(folder):
    root, expected, corrupt = folder
    rows = [
        # relative to the manifest's folder (tmp_path), in a deliberately unsorted order
        {"path": "imgs/dog/a_gray.png", "label": "NA", "coarse_label": "", "caption": "a gray square"},
        {"path": "imgs/cat/a_rgb.png", "label": "cat", "coarse_label": "animal", "caption": "a red photo"},
        {"path": "imgs/" + corrupt, "label": "zebra", "coarse_label": "animal", "caption": ""},
        {"path": str((root / "dog/b_rgba.png").resolve()), "label": "dog", "coarse_label": "animal", "caption": "x"},
        {"path": "imgs/missing.png", "label": "ghost", "coarse_label": "", "caption": ""},
    ]
    return pd.DataFrame(rows)


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_manifest_keeps_row_order_and_resolves_relative_paths(folder, tmp_path, fmt):
    root, expected, corrupt = folder
    table = _manifest_table(folder)
    manifest = tmp_path / f"manifest.{fmt}"
    table.to_csv(manifest, index=False) if fmt == "csv" else table.to_parquet(manifest, index=False)
    section = {"kind": "manifest", "path": str(manifest), "image_size": S}
    with pytest.raises(UserError, match="cannot read image .*a_corrupt.png"):
        make_dataset(section, tmp_path / "out")
    make_dataset({**section, "on_bad_image": "skip"}, tmp_path / "out", name="m")
    ds = load_dataset(tmp_path / "out")
    assert ds.meta["sample_id"].tolist() == [0, 1, 3]  # rows 2 (corrupt) and 4 (missing) skipped
    assert ds.labels().tolist() == ["NA", "cat", "dog"]  # "NA" stays a label, not a missing value
    assert ds.labels("coarse").tolist() == ["NA", "animal", "animal"]  # empty coarse_label -> label
    assert ds.captions == ["a gray square", "a red photo", "x"]
    assert ds.info["n_skipped"] == 2
    assert [s["reason"] for s in ds.info["skipped"]][1] == "file not found"
    for i, rel in enumerate(["dog/a_gray.png", "cat/a_rgb.png", "dog/b_rgba.png"]):
        assert np.abs(ds.images[i].astype(int) - np.array(expected[rel])).max() <= 2


def test_csv_and_parquet_manifests_give_identical_datasets(folder, tmp_path):
    table = _manifest_table(folder).drop(index=[2, 4])
    table.to_csv(tmp_path / "m.csv", index=False)
    table.to_parquet(tmp_path / "m.parquet", index=False)
    a = make_dataset({"kind": "manifest", "path": str(tmp_path / "m.csv"), "image_size": S}, tmp_path / "a")
    b = make_dataset({"kind": "manifest", "path": str(tmp_path / "m.parquet"), "image_size": S}, tmp_path / "b")
    da, db = load_dataset(a), load_dataset(b)
    assert da.images.tobytes() == db.images.tobytes()
    assert da.meta.equals(db.meta)
    assert json.loads(json.dumps(da.info["sha256"])) == db.info["sha256"]


def test_manifest_missing_columns_and_empty_cells(tmp_path):
    pd.DataFrame({"file": ["a.png"], "label": ["x"]}).to_csv(tmp_path / "m.csv", index=False)
    with pytest.raises(UserError, match=r"lacks column\(s\) \['path'\].*found: file, label"):
        make_dataset({"kind": "manifest", "path": str(tmp_path / "m.csv")}, tmp_path / "o")
    pd.DataFrame({"path": ["a.png", "b.png"], "label": ["x", ""]}).to_csv(tmp_path / "m2.csv", index=False)
    with pytest.raises(UserError, match="row 1 has an empty label"):
        make_dataset({"kind": "manifest", "path": str(tmp_path / "m2.csv")}, tmp_path / "o")
    with pytest.raises(UserError, match="extension '.json'"):
        make_dataset({"kind": "manifest", "path": str(tmp_path / "m.json")}, tmp_path / "o")
