"""Ingest hardening (issue 13): odd file names and silent choices get a named answer."""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from diffatlas.cli import main as cli_main
from diffatlas.data.build import make_dataset
from diffatlas.data.dataset import load_dataset
from diffatlas.errors import UserError

S = 8


def _png(path, rgb):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (S, S), rgb).save(path)


@pytest.fixture()
def bad_name_folder(tmp_path):
    """cat/ok.png plus cat/<ff fe>.png: a file name that is not UTF-8 (bytes ff fe)."""
    root = tmp_path / "imgs"
    _png(root / "cat" / "ok.png", (10, 200, 30))
    raw = os.path.join(os.fsencode(root / "cat"), b"\xff\xfe.png")
    Image.new("RGB", (S, S), (200, 0, 0)).save(os.fsdecode(raw), format="PNG")
    assert os.path.exists(raw)
    return root


def _section(root, **kw):
    return {"kind": "image_folder", "path": str(root), "image_size": S, **kw}


def test_non_utf8_file_name_is_skipped_and_reported_escaped(bad_name_folder, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        out = make_dataset(_section(bad_name_folder, on_bad_image="skip"), tmp_path / "ds", threads=1)
    ds = load_dataset(out)
    assert ds.meta["path"].tolist() == ["cat/ok.png"]
    assert np.abs(ds.images[0].astype(int) - [10, 200, 30]).max() <= 2
    info = json.loads((out / "info.json").read_text())
    assert info["n_skipped"] == 1 and info["skipped"][0]["path"] == "cat/\\xff\\xfe.png"
    assert "UTF-8" in info["skipped"][0]["reason"]
    assert "\\xff\\xfe" in caplog.text


def test_non_utf8_file_name_is_a_named_error_not_a_traceback(bad_name_folder, tmp_path, capsys):
    with pytest.raises(UserError, match=r"cat/\\xff\\xfe\.png in .*not valid UTF-8"):
        make_dataset(_section(bad_name_folder), tmp_path / "ds")
    rc = cli_main(["make-dataset", "--name", "x", "--config-json", json.dumps(_section(bad_name_folder)),
                   "--out", str(tmp_path / "ds2")])
    err = capsys.readouterr().err
    assert rc == 2 and "\\xff\\xfe" in err and "Traceback" not in err
    assert not (tmp_path / "ds").exists() and not (tmp_path / "ds2").exists()


def test_empty_class_folder_is_logged_and_recorded(tmp_path, caplog):
    root = tmp_path / "imgs"
    _png(root / "cat" / "a.png", (1, 2, 3))
    (root / "dog").mkdir()
    (root / "dog" / "readme.txt").write_text("no images here")
    with caplog.at_level(logging.WARNING):
        out = make_dataset(_section(root), tmp_path / "ds")
    info = json.loads((out / "info.json").read_text())
    assert info["classes"] == ["cat"]
    assert info["empty_classes"]["folders"] == ["dog"]
    assert "dog" in caplog.text and "no images" in caplog.text


def test_blank_class_folder_is_a_named_error(tmp_path):
    root = tmp_path / "imgs"
    _png(root / " " / "a.png", (1, 2, 3))
    with pytest.raises(UserError, match="class folder ' '.*only spaces"):
        make_dataset(_section(root), tmp_path / "ds")


@pytest.fixture()
def images(tmp_path):
    for name, rgb in (("a.png", (255, 0, 0)), ("b.png", (0, 255, 0))):
        _png(tmp_path / name, rgb)
    return tmp_path


def _manifest(dir_, rows, name="m.csv"):
    f = dir_ / name
    df = pd.DataFrame(rows)
    df.to_parquet(f) if name.endswith(".parquet") else df.to_csv(f, index=False)
    return {"kind": "manifest", "path": str(f), "image_size": S}


DUP_ROWS = [{"path": "a.png", "label": "red"}, {"path": "./a.png", "label": "red"}, {"path": "b.png", "label": "green"}]


def test_duplicated_manifest_row_is_an_error_by_default(images, tmp_path):
    with pytest.raises(UserError, match=r"row 1 repeats row 0 \(\./a\.png\).*on_duplicate"):
        make_dataset(_manifest(images, DUP_ROWS), tmp_path / "ds")


@pytest.mark.parametrize("mode, ids", [("drop", [0, 2]), ("keep", [0, 1, 2])])
def test_duplicated_manifest_rows_drop_or_keep_are_recorded(images, tmp_path, mode, ids, caplog):
    with caplog.at_level(logging.WARNING):
        out = make_dataset({**_manifest(images, DUP_ROWS), "on_duplicate": mode}, tmp_path / "ds")
    ds = load_dataset(out)
    assert ds.sample_ids.tolist() == ids
    dup = ds.info["duplicates"]
    assert dup["policy"] == mode and dup["n_rows"] == 1 and dup["rows"][0]["row"] == 1 and dup["rows"][0]["first_row"] == 0
    assert "duplicated row" in caplog.text


def test_nan_coarse_label_defaults_to_the_label_by_a_recorded_rule(images, tmp_path, caplog):
    rows = [{"path": "a.png", "label": "red", "coarse_label": None}, {"path": "b.png", "label": "green", "coarse_label": "colour"}]
    with caplog.at_level(logging.INFO):
        out = make_dataset(_manifest(images, rows, "m.parquet"), tmp_path / "ds")
    ds = load_dataset(out)
    assert ds.labels("coarse").tolist() == ["red", "colour"]
    assert ds.info["defaulted"]["coarse_label"]["rows"] == 1 and ds.info["defaulted"]["coarse_label"]["first_rows"] == [0]
    assert "coarse label is their label" in caplog.text


@pytest.mark.parametrize("column", ["label", "coarse_label"])
def test_label_of_one_space_is_a_named_error(images, tmp_path, column):
    rows = [{"path": "a.png", "label": "red", "coarse_label": "x"}, {"path": "b.png", "label": "green", "coarse_label": "y"}]
    rows[1][column] = " "
    with pytest.raises(UserError, match=rf"row 1 has .*{column} ' '.*only spaces"):
        make_dataset(_manifest(images, rows), tmp_path / "ds")


def test_blank_coarse_label_in_config_is_refused():
    from diffatlas.config import validate_config

    cfg = {"datasets": {"f": {"kind": "image_folder", "path": "x", "coarse_labels": {"cat": " "}}}, "models": {"m": {"path": "p"}}}
    with pytest.raises(UserError, match=r"datasets\.f\.coarse_labels\.cat = ' '.*not empty or only spaces"):
        validate_config(cfg)
