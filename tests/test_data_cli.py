"""`diffatlas make-dataset` / `preview-dataset` write the layout that load_dataset reads back."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from PIL import Image

from diffatlas.cli import main
from diffatlas.data import shapesworld as sw
from diffatlas.data.dataset import load_dataset
from diffatlas.errors import UserError

SECTION = {"kind": "shapesworld", "n_samples": 40, "image_size": 32, "seed": 7, "two_object_fraction": 0.4}


def test_make_dataset_writes_the_layout_and_reads_back(tmp_path, capsys):
    out = tmp_path / "results" / "data" / "toy"
    rc = main(["make-dataset", "--name", "toy", "--config-json", json.dumps(SECTION), "--out", str(out)])
    assert rc == 0
    assert "toy: 40 images 32x32, 12 classes, 3 coarse classes" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["images.npy", "info.json", "masks.npy", "metadata.parquet"]
    assert not any(p.name.startswith(".toy.tmp") for p in out.parent.iterdir())

    ds = load_dataset(out)
    ref = sw.generate_shapesworld({k: v for k, v in SECTION.items() if k != "kind"})
    assert len(ds) == 40 and ds.image_size == 32
    assert ds.images.tobytes() == ref.images.tobytes() and ds.masks.tobytes() == ref.masks.tobytes()
    assert ds.meta.equals(ref.meta)
    assert ds.labels("fine").tolist() == ref.meta["label"].tolist()
    assert ds.labels("coarse").tolist() == ref.meta["coarse_label"].tolist()
    assert ds.captions == ref.meta["caption"].tolist()
    assert ds.sample_ids.tolist() == list(range(40))
    info = ds.info
    assert info["name"] == "toy" and info["kind"] == "shapesworld" and info["config"]["seed"] == 7
    assert info["vocabulary"] == list(sw.VOCABULARY) and info["max_objects"] == 2
    assert info["sha256"]["images.npy"] == hashlib.sha256((out / "images.npy").read_bytes()).hexdigest()
    with pytest.raises(UserError, match="allowed: fine, coarse"):
        ds.labels("medium")

    # same config again: byte-identical arrays
    out2 = tmp_path / "again"
    assert main(["make-dataset", "--name", "toy", "--config-json", json.dumps(SECTION), "--out", str(out2)]) == 0
    assert load_dataset(out2).info["sha256"] == info["sha256"]

    mm = load_dataset(out, mmap=True)
    assert isinstance(mm.images, np.memmap) and (np.asarray(mm.images[3]) == ds.images[3]).all()


def test_preview_dataset_draws_a_grid(tmp_path):
    data = tmp_path / "data"
    assert main(["make-dataset", "--name", "toy", "--config-json", json.dumps(SECTION), "--out", str(data)]) == 0
    fig = tmp_path / "figures" / "toy_preview.png"
    assert main(["preview-dataset", "--data", str(data), "--out", str(fig), "--n", "8"]) == 0
    with Image.open(fig) as img:
        w, h = img.size
        assert img.format == "PNG" and w > 300 and h > 150


def test_bad_config_exits_2_naming_the_key(tmp_path, capsys):
    bad = json.dumps({"kind": "shapesworld", "n_sampels": 4})
    assert main(["make-dataset", "--name", "toy", "--config-json", bad, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "'n_sampels'" in err and "n_samples" in err
    assert main(["make-dataset", "--name", "toy", "--config-json", "{not json", "--out", str(tmp_path / "o")]) == 2
    assert "not valid JSON" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_load_dataset_errors_name_the_path(tmp_path):
    with pytest.raises(UserError, match="dataset directory not found: .*nowhere"):
        load_dataset(tmp_path / "nowhere")
    (tmp_path / "half").mkdir()
    np.save(tmp_path / "half" / "images.npy", np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(UserError, match="incomplete: metadata.parquet is missing"):
        load_dataset(tmp_path / "half")
