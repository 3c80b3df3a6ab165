"""``diffatlas train-sae`` / ``sae-summary`` / ``sae-figures`` on small synthetic stores."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest
import torch

from diffatlas.activations.store import ActivationStore, LayerSpec, open_writer
from diffatlas.cli import main as cli
from diffatlas.sae.model import TopKSAE
from diffatlas.sae.train import split_samples

torch.set_num_threads(1)

SHAPES = ["circle", "square", "triangle"]
COLOURS = ["red", "green"]
N, D, HW = 120, 16, 3


def _labels(n=N):
    fine = [f"{COLOURS[i % 2]} {SHAPES[(i // 2) % 3]}" for i in range(n)]
    return fine, [f.split()[1] for f in fine]


def make_store(path, *, n=N, nan_at=None, timesteps=(10, 500)):
    """Two layers (mid with spatial maps, up_ft0 pooled only) whose vectors are class atoms + noise."""
    rng = np.random.default_rng(0)
    fine, coarse = _labels(n)
    cls = np.arange(n) % 6
    layers = [LayerSpec("mid", "mid_block", D, HW, HW, True), LayerSpec("up_ft0", "up_blocks.0", 2 * D, HW, HW, False)]
    with open_writer(
        path, timesteps=list(timesteps), alpha_bar=[0.98, 0.3][: len(timesteps)], sample_ids=list(range(100, 100 + n)),
        labels=fine, coarse_labels=coarse, layers=layers,
        attrs={"model_name": "toy", "dataset_name": "toyset", "pooling": "mean", "prompt": ""}, batch_size=32,
    ) as w:
        for ti in range(len(timesteps)):
            for spec in layers:
                atoms = rng.normal(size=(6, spec.channels)) * 2
                pooled = (atoms[cls] + 0.3 * rng.normal(size=(n, spec.channels))).astype(np.float32)
                if nan_at is not None and spec.name == "mid":
                    pooled[nan_at, 0] = np.nan
                maps = None
                if spec.spatial:
                    maps = (pooled[:, :, None, None] + 0.2 * rng.normal(size=(n, spec.channels, HW, HW))).astype(np.float32)
                w.write(spec.name, ti, 0, pooled, maps)
    return path


def make_dataset_dir(path, n=N):
    """A dataset directory in the documented layout: images.npy, metadata.parquet, info.json."""
    path.mkdir()
    rng = np.random.default_rng(1)
    images = rng.integers(0, 255, size=(n, 8, 8, 3), dtype=np.uint8)
    np.save(path / "images.npy", images)
    fine, coarse = _labels(n)
    pd.DataFrame({"sample_id": np.arange(100, 100 + n), "label": fine, "coarse_label": coarse, "caption": [""] * n}).to_parquet(
        path / "metadata.parquet", index=False
    )
    (path / "info.json").write_text(json.dumps({"name": "toyset", "kind": "fake", "n_samples": n}))
    return images


FAST = ["--set", "steps=120", "--set", "batch_size=32", "--set", "warmup=10", "--set", "k=4", "--set", "expansion=3",
        "--set", "lr=0.003", "--set", "top_latents=10", "--threads", "1", "--device", "cpu"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("act") / "toyset.zarr")


@pytest.fixture(scope="module")
def run_dir(store, tmp_path_factory):
    out = tmp_path_factory.mktemp("sae") / "mid" / "t10"
    rc = cli(["train-sae", "--store", str(store), "--layer", "mid", "--timestep", "10", "--out", str(out),
              "--config-json", json.dumps({"k": 32, "seed": 3})] + FAST)
    assert rc == 0
    return out


def test_train_sae_writes_consistent_artifacts(store, run_dir):
    assert sorted(p.name for p in run_dir.iterdir()) == ["cfg.json", "curve.csv", "latents.parquet", "metrics.json", "sae.safetensors"]
    cfg = json.loads((run_dir / "cfg.json").read_text())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert (cfg["d_in"], cfg["n_latents"], cfg["k"], cfg["k_aux"]) == (D, 3 * D, 4, D // 2)
    assert (cfg["model"], cfg["dataset"], cfg["layer"], cfg["timestep"], cfg["seed"]) == ("toy", "toyset", "mid", 10, 3)
    assert cfg["alpha_bar"] == pytest.approx(0.98) and cfg["module_path"] == "mid_block"
    assert cfg["split"]["n_val"] == 24 and cfg["sae_config"]["k"] == 4  # --set overrides the JSON

    # input_scale makes the training split's mean squared norm equal to d
    st = ActivationStore(store)
    x = st.pooled("mid", 10)
    is_val = split_samples(N, 0.2, 3)
    assert np.mean(np.sum((x[~is_val] * cfg["input_scale"]) ** 2, axis=1)) == pytest.approx(D, rel=1e-5)

    # reload the SAE and recompute the validation metrics by hand
    sae, _ = TopKSAE.load(run_dir)
    xv = torch.from_numpy(x[is_val] * cfg["input_scale"])
    with torch.no_grad():
        out = sae(xv)
    nmse = float(((out.x_hat - xv) ** 2).sum() / ((xv - xv.mean(0)) ** 2).sum())
    val = metrics  # validation metrics sit at the top level
    assert val["nmse"] == pytest.approx(nmse, rel=1e-4)
    assert val["fve"] == pytest.approx(1 - nmse, rel=1e-4)
    assert val["l0"] == pytest.approx(float((out.vals > 0).sum(1).float().mean()))
    assert val["l0"] <= 4 and val["fve"] > 0.5

    # the curve: a row every eval_every (100) steps up to the cap of 120, and metrics.json says
    # the cap stopped it (two checks cannot make a plateau of patience 5)
    curve = pd.read_csv(run_dir / "curve.csv")
    assert list(curve.columns) == ["step", "lr", "train_loss", "train_mse", "train_aux", "val_fve", "dead_fraction"]
    assert list(curve["step"]) == [100, 120]
    assert metrics["training"]["converged"] is False and metrics["training"]["stopped"] == "cap"
    assert metrics["training"]["steps_run"] == 120 and metrics["training"]["step_cap"] == 120
    assert curve["val_fve"].between(0, 1).all() and curve["dead_fraction"].between(0, 1).all()
    assert np.allclose(curve["train_loss"], curve["train_mse"] + curve["train_aux"] / 32)

    latents = pd.read_parquet(run_dir / "latents.parquet")
    assert len(latents) == 3 * D and (latents["latent"] == np.arange(3 * D)).all()
    fine = dict(zip(range(100, 100 + N), _labels()[0]))
    for row in latents[latents["eligible"]].itertuples():
        assert len(row.top_sample_ids) == 10 and np.all(np.diff(row.top_values) <= 0)
        assert [fine[s] for s in row.top_sample_ids] == list(row.top_labels_fine)
    # the synthetic classes are separable: top latents are far purer than chance
    labels = metrics["labels"]
    assert labels["purity_fine"] > labels["chance_purity_fine"] + 0.3
    assert labels["purity_coarse"] >= labels["purity_fine"] - 1e-9  # a coarse label is never less pure


def test_spatial_samples_and_second_layer(store, tmp_path):
    out = tmp_path / "sp"
    assert cli(["train-sae", "--store", str(store), "--layer", "mid", "--timestep", "500", "--out", str(out),
                "--set", "samples=spatial"] + FAST) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["samples"] == "spatial" and metrics["n_vectors"] == 24 * HW * HW
    out2 = tmp_path / "up"
    assert cli(["train-sae", "--store", str(store), "--layer", "up_ft0", "--timestep", "500", "--out", str(out2)] + FAST) == 0
    assert json.loads((out2 / "cfg.json").read_text())["n_latents"] == 3 * 2 * D


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--layer", "up_ft9", "--timestep", "10"], "layer 'up_ft9' is not in"),
        (["--layer", "mid", "--timestep", "77"], "timestep 77 is not in"),
        (["--layer", "mid", "--timestep", "10", "--set", "k=0"], "sae.k = 0"),
        (["--layer", "mid", "--timestep", "10", "--set", "k=48"], "sae.k = 48 .*n_latents = 48"),
        (["--layer", "mid", "--timestep", "10", "--set", "batch_size=200"], "sae.batch_size = 200 .* 96 training vectors"),
        (["--layer", "up_ft0", "--timestep", "10", "--set", "samples=spatial"], "without spatial maps"),
        (["--layer", "mid", "--timestep", "10", "--config-json", "[1]"], "must be a JSON object"),
    ],
)
def test_bad_input_is_named(store, tmp_path, capsys, args, message):
    out = tmp_path / "bad"
    rc = cli(["train-sae", "--store", str(store), "--out", str(out)] + FAST[:-4] + args)
    assert rc == 2
    assert re.search(message, capsys.readouterr().err)
    assert not out.exists()  # nothing half-written


def test_nan_activations_are_refused(tmp_path, capsys):
    bad = make_store(tmp_path / "nan.zarr", nan_at=7)
    rc = cli(["train-sae", "--store", str(bad), "--layer", "mid", "--timestep", "10", "--out", str(tmp_path / "o")] + FAST)
    assert rc == 2
    err = capsys.readouterr().err
    assert "NaN/Inf" in err and "[107]" in err and "layer 'mid'" in err


def test_summary_and_figures(store, run_dir, tmp_path):
    summary = tmp_path / "summary.csv"
    other = tmp_path / "mid" / "t500"
    assert cli(["train-sae", "--store", str(store), "--layer", "mid", "--timestep", "500", "--out", str(other)] + FAST) == 0
    assert cli(["sae-summary", "--out", str(summary), str(run_dir), str(other)]) == 0
    table = pd.read_csv(summary)
    assert list(table["timestep"]) == [10, 500]
    m = json.loads((run_dir / "metrics.json").read_text())
    assert table.loc[0, "fve"] == pytest.approx(m["fve"])
    assert table.loc[0, "purity_fine"] == pytest.approx(m["labels"]["purity_fine"])
    assert [table.loc[0, "purity_fine_ci_low"], table.loc[0, "purity_fine_ci_high"]] == pytest.approx(m["labels"]["purity_fine_ci95"])

    for sub, extra in (("vs-layer", ["--summary", str(summary)]),
                       ("across-models", ["--summary", str(summary), str(summary)]),
                       ("curves", ["--runs", str(run_dir), str(other)])):
        png = tmp_path / f"{sub}.png"
        assert cli(["sae-figures", sub, *extra, "--out", str(png)]) == 0
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_training_figure_draws_the_saved_curve(run_dir, tmp_path):
    from diffatlas.sae.figures import plot_training

    curve = pd.read_csv(run_dir / "curve.csv")
    fig = plot_training({"mid t10": (curve, False)})
    lines = {ax.get_ylabel(): ax.get_lines() for ax in fig.axes}
    for col, (label, line) in zip(("train_loss", "val_fve", "dead_fraction"), lines.items()):
        np.testing.assert_array_equal(line[0].get_xdata(), curve["step"])
        np.testing.assert_array_equal(line[0].get_ydata(), curve[col])
        assert line[1].get_marker() == "x"  # stopped at the cap
    png = tmp_path / "training.png"
    assert cli(["sae-figures", "training", "--runs", str(run_dir), "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_gallery_shows_the_top_images(run_dir, tmp_path):
    from diffatlas.sae.figures import gallery_gaps, plot_gallery

    images = make_dataset_dir(tmp_path / "data")
    latents = pd.read_parquet(run_dir / "latents.parquet")
    fig = plot_gallery(latents, tmp_path / "data", n_latents=3)
    top = latents[latents["rank"] >= 0].sort_values("rank").head(3)
    mosaic = np.asarray(fig.axes[0].images[0].get_array())
    pad_y, pad_x = gallery_gaps(8)
    for r, row in enumerate(top.itertuples()):
        for c, sid in enumerate(row.top_sample_ids):
            cell = mosaic[r * (8 + pad_y) : r * (8 + pad_y) + 8, c * (8 + pad_x) : c * (8 + pad_x) + 8]
            np.testing.assert_array_equal(cell, images[sid - 100])
    # no ranked latent (tiny data): the gallery falls back to the most active latents
    unranked = latents.assign(rank=-1)
    fig = plot_gallery(unranked, tmp_path / "data", n_latents=2)
    assert "no latent met min_active" in fig.axes[0].get_title()
    most = unranked.sort_values(["n_active", "latent"], ascending=[False, True]).iloc[0]
    cell = np.asarray(fig.axes[0].images[0].get_array())[:8, :8]
    np.testing.assert_array_equal(cell, images[int(most["top_sample_ids"][0]) - 100])
    png = tmp_path / "gallery.png"
    assert cli(["sae-figures", "gallery", "--run", str(run_dir), "--dataset", str(tmp_path / "data"), "--out", str(png)]) == 0
    assert png.stat().st_size > 1000
    rc = cli(["sae-figures", "gallery", "--run", str(run_dir), "--dataset", str(tmp_path / "nowhere"), "--out", str(png)])
    assert rc == 2
