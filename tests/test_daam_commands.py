"""The DAAM commands end to end on a tiny model: outputs, tables, figures, and errors by name."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from diffatlas.cli import main as cli


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import torch

    from diffatlas.data.dataset import write_dataset
    from diffatlas.data.shapesworld import generate_shapesworld
    from diffatlas.models.tiny import make_tiny_model

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("daam_cmd")
    make_tiny_model("pixel", root / "model")
    data = generate_shapesworld({"n_samples": 4, "two_object_fraction": 0.5})
    write_dataset(root / "data", data.images, data.meta, data.masks)
    meta = data.meta.copy()
    meta.loc[1, "caption"] = ""
    write_dataset(root / "nocap", data.images, meta, data.masks)
    cfg = {
        "n_real": 3,
        "steps": 2,
        "batch_size": 4,
        "prompt_sets": {
            "caps": {"kind": "shapesworld_captions", "n_prompts": 2},
            "ent": {"kind": "entanglement", "n_pairs": 1, "n_seeds": 1, "nouns": ["square"], "adjectives": ["red", "blue"]},
        },
    }
    return root, json.dumps(cfg)


def test_real_generate_and_figures(setup):
    root, cfg = setup
    real, caps, ent = root / "out" / "real", root / "out" / "caps", root / "out" / "ent"
    common = ["--model", str(root / "model"), "--model-name", "tiny", "--config-json", cfg, "--device", "cpu", "--threads", "1"]
    assert cli(["daam-real", "--dataset", str(root / "data"), "--out", str(real), *common]) == 0
    assert cli(["daam-generate", "--prompt-set", "caps", "--out", str(caps), *common]) == 0
    assert cli(["daam-generate", "--prompt-set", "ent", "--out", str(ent), *common]) == 0
    summary = pd.read_csv(real / "summary.csv")
    assert set(summary["method"]) == {"daam", "whole_image", "centre_prior"} and (summary["n"] > 0).all()
    curve = pd.read_csv(real / "threshold_curve.csv")
    assert sorted(curve["tau"].unique()) == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9])
    assert {"amod", "det"} <= set(pd.read_csv(real / "relations.csv")["relation"])
    items = pd.read_parquet(real / "run" / "items.parquet")
    assert items["sample_id"].tolist() == [0, 1, 2]
    info = json.loads((real / "run" / "info.json").read_text())
    assert info["mode"] == "real-noise" and info["timesteps"][0] == 400 and info["model"]["family"] == "pixel"
    coh = pd.read_csv(ent / "cohyponym.csv")
    assert sorted(coh["group"]) == ["cohyponym", "non_cohyponym"]
    assert len(pd.read_csv(ent / "adjective_swaps.csv")) == 1  # red vs blue, one seed
    assert json.loads((caps / "eval.json").read_text())["parse_source"] == "shapesworld-grammar"
    figs = root / "figs"
    for args in (
        ["overlays", "--inputs", str(real)],
        ["miou", "--inputs", str(real), str(caps)],
        ["relations", "--inputs", str(real), str(caps)],
        ["entanglement", "--inputs", str(ent)],
    ):
        out = figs / f"{args[0]}.png"
        assert cli(["daam-figure", *args, "--out", str(out)]) == 0
        assert out.stat().st_size > 1000


def test_errors_name_the_bad_input(setup, capsys):
    root, cfg = setup
    common = ["--model", str(root / "model"), "--config-json", cfg, "--device", "cpu", "--threads", "1"]
    assert cli(["daam-generate", "--prompt-set", "nope", "--out", str(root / "x"), *common]) == 2
    assert "prompt set 'nope' is not configured; allowed: caps, ent" in capsys.readouterr().err
    assert cli(["daam-real", "--dataset", str(root / "nocap"), "--out", str(root / "y"), *common]) == 2
    assert "without a caption (sample ids [1]" in capsys.readouterr().err
    assert not (root / "y").exists()  # nothing half-written
    assert cli(["daam-generate", "--prompt-set", "caps", "--out", str(root / "z"), *common[:2], "--config-json", '{"tau": 3}']) == 2
    assert "daam.tau = 3" in capsys.readouterr().err
    assert cli(["daam-figure", "miou", "--inputs", str(root), "--out", str(root / "f.png")]) == 2
    assert "not a finished daam-generate / daam-real output" in capsys.readouterr().err
