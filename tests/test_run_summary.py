"""The end-of-run summary (diffatlas summary) and the world model's fidelity record.

The summary is built on a results/ tree made here with known numbers: it must name exactly
the files that exist, and quote each compared number with its interval (hand-computed)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml

from diffatlas.run_summary import paths_to_open, stages_run, summarise_run

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "resources" / "models" / "shapesworld"
PNG = b"\x89PNG\r\n\x1a\n"


def _diffc_metrics(path: Path, layer: str, t: int, n_correct: int, n_test: int = 100) -> Path:
    acc = n_correct / n_test
    method = {"accuracy": acc, "n_correct": n_correct, "n_test": n_test, "macro_f1": acc, "chance_uniform": 0.5,
              "warnings": []}  # fmt: skip
    m = {"model": "m", "dataset": "d", "layer": layer, "timestep": t, "alpha_bar": 0.5,
         "split": {"n_train": 300, "n_val": 50, "n_test": n_test},
         "results": {"coarse": {"classes": ["a", "b"], "majority_baseline": 0.5, "diffc": method, "probe": method}}}  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(m))
    return path


@pytest.fixture
def results(tmp_path):
    from diffatlas.diffc.summary import build_summary

    res = tmp_path / "results"
    paths = [
        _diffc_metrics(res / "diffc" / "m" / "d" / "mid" / "t50" / "metrics.json", "mid", 50, 50),
        _diffc_metrics(res / "diffc" / "m" / "d" / "up_ft1" / "t50" / "metrics.json", "up_ft1", 50, 45),
        _diffc_metrics(res / "diffc" / "m" / "d" / "up_ft1" / "t500" / "metrics.json", "up_ft1", 500, 30),
    ]
    build_summary(paths).to_csv(res / "diffc" / "summary.csv", index=False)
    for rel in ("figures/data/d_preview.png", "figures/diffc/m/d/accuracy_vs_layer.png", "figures/geometry/m/psd.png"):
        (res / rel).parent.mkdir(parents=True, exist_ok=True)
        (res / rel).write_bytes(PNG)
    daam = res / "daam" / "m" / "real" / "d"
    daam.mkdir(parents=True)
    pd.DataFrame({"source": "real", "method": ["daam", "whole_image", "centre_prior"], "words": "shape", "tau": 0.4,
                  "miou": [0.37, 0.12, 0.20], "ci95": [0.04, 0.01, 0.03], "n": 44, "best_tau": 0.4,
                  "best_miou": [0.37, 0.12, 0.21]}).to_csv(daam / "summary.csv", index=False)  # fmt: skip
    return res


def test_summary_lists_exactly_the_files_that_exist(results):
    listed = paths_to_open(results)
    assert sorted(listed) == sorted(results.joinpath("figures").rglob("*.png"))
    (results / "figures" / "geometry" / "m" / "psd.png").unlink()
    (results / "report.html").write_text("<html></html>")
    text = summarise_run(results)
    assert "psd.png" not in text and "report.html" in text
    assert f"{results / 'figures' / 'diffc' / 'm' / 'd'}/: accuracy_vs_layer.png" in text
    assert "open (3 files):" in text
    # stages: only those with output
    assert stages_run(results) == ["diffc", "daam"]


def test_summary_quotes_numbers_with_their_intervals(results):
    text = summarise_run(results)
    # best cell: mid t=50, 50/100 right -> Wilson 0.40-0.60 (by hand: 0.5 ± 0.0962); up_ft1 t=50 (0.45)
    # lies inside that interval, up_ft1 t=500 (0.30) does not.
    assert "m/d coarse diffc: mid t=50  0.50 [0.40, 0.60] (n=100, chance 0.50; 1 other cell(s) inside the interval)" in text
    assert "daam 0.37 ± 0.04; whole_image 0.12 ± 0.01; centre_prior 0.20 ± 0.03" in text


def test_summary_of_the_shipped_fidelity_record(tmp_path):
    text = summarise_run(tmp_path / "empty", SHIPPED / "fidelity.json")
    assert "stages with output: world_model" in text
    assert f"recorded with the model ({SHIPPED / 'fidelity.json'})" in text
    assert "shape 0.98 [0.89, 1.00] (47/48)" in text and "gate PASS" in text


def test_summary_command_prints(results, capsys):
    from diffatlas.cli import main

    assert main(["summary", "--results", str(results), "--rules", str(ROOT / "rules")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("diffatlas: what this run made") and "accuracy_vs_layer.png" in out


# -------------------------------------------------------------------------- the fidelity record
def test_shipped_record_answers_the_default_config():
    """The demo reads the record instead of sampling for minutes: it must match config.yaml."""
    from diffatlas.world.record import recorded_fidelity

    cfg = yaml.safe_load((ROOT / "config.yaml").read_text())
    assert recorded_fidelity(SHIPPED, cfg["world_model"]["fidelity"]) == (
        str(SHIPPED / "fidelity.json"), str(SHIPPED / "fidelity_samples.npy"))  # fmt: skip
    # the record holds the numbers the model's README reports (47/48, 47/48, 30/48)
    rec = json.loads((SHIPPED / "fidelity.json").read_text())
    assert [(rec[k]["k"], rec[k]["n"]) for k in ("shape_accuracy", "colour_accuracy", "two_object_rate")] == [
        (47, 48), (47, 48), (30, 48)]  # fmt: skip
    import numpy as np

    assert np.load(SHIPPED / "fidelity_samples.npy").shape == (96, 32, 32, 3)


def test_record_is_ignored_for_other_settings_or_without_samples(tmp_path):
    from diffatlas.world.record import recorded_fidelity

    section = yaml.safe_load((ROOT / "config.yaml").read_text())["world_model"]["fidelity"]
    assert recorded_fidelity(SHIPPED, {**section, "n_single": 96}) is None  # scoring settings differ
    assert recorded_fidelity(SHIPPED, {**section, "batch_size": 8}) is not None  # batching does not score
    copy = tmp_path / "model"
    copy.mkdir()
    shutil.copy(SHIPPED / "fidelity.json", copy)
    assert recorded_fidelity(copy, section) is None  # no samples beside it
    (copy / "fidelity_samples.npy").write_bytes(b"")
    (copy / "fidelity.json").write_text("{not json")
    assert recorded_fidelity(copy, section) is None
    assert recorded_fidelity(tmp_path / "nowhere", section) is None
