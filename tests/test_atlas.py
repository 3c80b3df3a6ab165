"""The atlas on hand-made results trees: a partial tree never fails and says what is missing,
and the numbers on the grid page are the CSV's (read here with the csv module).

The atlas of a real run (the tiny workflow) is checked in tests/test_workflow.py: content
against its results files, links, and the headless-browser walk.
"""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from atlas_checks import check_links, parse, values

from diffatlas.atlas import build_atlas
from diffatlas.errors import UserError


def test_empty_results_tree_lists_every_stage_missing(tmp_path):
    (tmp_path / "results").mkdir()
    index = build_atlas(tmp_path / "results", tmp_path / "atlas")
    text = index.read_text()
    for stage in ("k-SAE and Diff-C", "DAAM", "geometry", "world model fidelity"):
        assert f"{stage}: " in text, stage
    assert check_links(tmp_path / "atlas") == 1


def test_missing_results_folder_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="is not a directory"):
        build_atlas(tmp_path / "nope", tmp_path / "atlas")


def test_grid_shows_the_summary_values(tmp_path):
    """A Diff-C summary alone (no SAE, DAAM, geometry): the grid's numbers are the CSV's."""
    results = tmp_path / "results"
    (results / "diffc").mkdir(parents=True)
    rows = [
        {"model": "m", "dataset": "d", "layer": layer, "timestep": t, "granularity": g, "method": meth, "accuracy": acc}
        for (layer, t, g, meth, acc) in [
            ("mid", 50, "fine", "diffc", 0.71875), ("mid", 50, "fine", "probe", 0.8),
            ("mid", 250, "coarse", "diffc", 1 / 3), ("up_ft1", 50, "fine", "diffc", 0.123456789),
        ]
    ]
    with open(results / "diffc" / "summary.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    fidelity = {"judge": "hand", "shape_accuracy": {"rate": 0.75, "k": 3, "n": 4, "ci95": [0.3, 0.95]}, "samples": []}
    (results / "world_model").mkdir()
    (results / "world_model" / "fidelity.json").write_text(json.dumps(fidelity))
    build_atlas(results, tmp_path / "atlas")
    grid = tmp_path / "atlas" / "sae" / "m" / "d" / "grid.html"
    with open(results / "diffc" / "summary.csv") as fh:
        for r in csv.DictReader(fh):
            where = {"data-layer": r["layer"], "data-timestep": r["timestep"], "data-metric": f"{r['method']}_{r['granularity']}"}
            ((value, shown),) = values(grid, where)
            assert value == float(r["accuracy"]) and shown == f"{float(r['accuracy']):.3f}"
    # a cell that was not measured shows nothing, and no SAE page is linked without an SAE
    assert values(grid, {"data-layer": "up_ft1", "data-timestep": "250"}) == []
    assert not [link for link in parse(grid).links if link.endswith("index.html") and "/t" in link]
    (((value, shown),)) = values(tmp_path / "atlas" / "world.html", {"data-measure": "shape_accuracy", "data-metric": "rate"})
    assert value == 0.75 and shown == "0.750"
    assert "DAAM: " in (tmp_path / "atlas" / "index.html").read_text()
    check_links(tmp_path / "atlas")


def test_overlay_keeps_small_images_small(tmp_path):
    from PIL import Image

    from diffatlas.atlas.images import overlay

    image = np.zeros((32, 32, 3), np.uint8)
    heat = np.zeros((8, 8), np.float32)
    heat[0, 0] = 1.0
    out = overlay(image, heat, tmp_path / "o.png")
    pix = np.asarray(Image.open(out))
    assert pix.shape == (32, 32, 3)
    # where the map is 0 the black image stays black; the hot corner is coloured
    assert pix[31, 31].max() == 0 and pix[0, 0].max() > 100
