"""Diff-C building blocks against oracles: metrics vs scikit-learn, the split, the
classifier on every map size, the config, the summary table, the figures and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import accuracy_score, f1_score
from sklearn.metrics import confusion_matrix as sk_confusion

from diffatlas.diffc.config import DiffCConfig
from diffatlas.diffc.figures import plot_models, plot_vs_layer, plot_vs_timestep
from diffatlas.diffc.metrics import classification_metrics
from diffatlas.diffc.model import DiffC, DiffCArch, conv_widths, load_diffc, save_diffc
from diffatlas.diffc.split import stratified_split
from diffatlas.diffc.summary import COLUMNS, build_summary
from diffatlas.errors import UserError

torch.set_num_threads(1)


# ------------------------------------------------------------------ metrics


def test_metrics_match_scikit_learn():
    rng = np.random.default_rng(0)
    classes = ["ant", "bee", "cat", "dog"]
    y_true = rng.integers(0, 4, 200)
    y_pred = np.where(rng.random(200) < 0.6, y_true, rng.integers(0, 4, 200))
    m = classification_metrics(y_true, y_pred, classes)
    assert m["accuracy"] == accuracy_score(y_true, y_pred)
    assert m["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, average="macro"))
    np.testing.assert_array_equal(m["confusion_matrix"]["matrix"], sk_confusion(y_true, y_pred, labels=range(4)))
    for i, c in enumerate(classes):
        assert m["per_class_accuracy"][c] == pytest.approx((y_pred[y_true == i] == i).mean())
    assert m["n_test"] == 200 and m["chance_uniform"] == 0.25 and m["warnings"] == []


def test_metrics_hand_computed_case():
    # true: a a b b c ; pred: a b b b a  -> cm [[1,1,0],[0,2,0],[1,0,0]]
    m = classification_metrics(np.array([0, 0, 1, 1, 2]), np.array([0, 1, 1, 1, 0]), ["a", "b", "c"])
    assert m["confusion_matrix"]["matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    assert m["accuracy"] == 3 / 5
    assert m["per_class_accuracy"] == {"a": 0.5, "b": 1.0, "c": 0.0}
    # F1: a = 2*1/(2+1+1) = 0.5; b = 2*2/(4+1+0) = 0.8; c = 0
    assert m["macro_f1"] == pytest.approx((0.5 + 0.8 + 0.0) / 3)


def test_metrics_class_without_test_samples_warns_and_single_class_fails():
    m = classification_metrics(np.array([0, 0, 1]), np.array([0, 2, 1]), ["a", "b", "c"])
    assert m["per_class_accuracy"]["c"] is None
    assert m["macro_f1_classes"] == 2
    assert m["warnings"] == [
        "class 'c' has no test samples: its per-class accuracy is undefined (null) and it is left out of macro_f1; "
        "it was still predicted 1 time(s)"
    ]
    assert m["macro_f1"] == pytest.approx(f1_score([0, 0, 1], [0, 2, 1], labels=[0, 1], average="macro"))
    with pytest.raises(UserError, match="at least 2 classes, found only 'a'"):
        classification_metrics(np.array([0, 0]), np.array([0, 0]), ["a"])
    with pytest.raises(UserError, match="test split is empty"):
        classification_metrics(np.array([], int), np.array([], int), ["a", "b"])


# ------------------------------------------------------------------ split


def test_split_is_exact_disjoint_stratified_and_seeded():
    rng = np.random.default_rng(1)
    fine = rng.choice(["r c", "g c", "r s", "g s", "b t"], size=237, p=[0.3, 0.25, 0.2, 0.2, 0.05])
    coarse = np.asarray([f.split()[1] for f in fine])
    s = stratified_split([coarse, fine], 0.15, 0.2, seed=3)
    parts = [s.train, s.val, s.test]
    assert sorted(np.concatenate(parts).tolist()) == list(range(237))
    assert len(s.test) == round(237 * 0.2) and len(s.val) == round(237 * 0.15)
    for cls in np.unique(fine):
        n_c = (fine == cls).sum()
        assert abs((fine[s.test] == cls).sum() - n_c * 0.2) <= 1
        assert abs((fine[s.val] == cls).sum() - n_c * 0.15) <= 1
        assert (fine[s.train] == cls).sum() >= 1
    again = stratified_split([coarse, fine], 0.15, 0.2, seed=3)
    np.testing.assert_array_equal(again.test, s.test)
    assert not np.array_equal(stratified_split([coarse, fine], 0.15, 0.2, seed=4).test, s.test)


def test_split_keeps_tiny_classes_in_training():
    labels = np.asarray(["a"] * 10 + ["b"] * 10 + ["solo"])
    s = stratified_split([labels], 0.2, 0.3, seed=0)
    assert 20 in s.train  # the single 'solo' sample
    assert len(s.test) == round(21 * 0.3)


# ------------------------------------------------------------------ model


@pytest.mark.parametrize(
    "shape",
    [(8, 1, 1), (8, 2, 2), (6, 3, 5), (8, 7, 7), (16, 16, 16), (4, 32, 32), (3, 1, 9)],
    ids=lambda s: "x".join(map(str, s)),
)
def test_diffc_adapts_to_any_map_size(shape):
    c, h, w = shape
    model = DiffC(DiffCArch(c, h, w, n_classes=5, n_convs=4, feature_dim=32)).eval()
    x = torch.randn(3, c, h, w)
    assert model(x).shape == (3, 5)
    assert model.features(x).shape == (3, 32)
    # Each block halves the axes longer than 1 (rounding up) and stops at 1.
    eh, ew = h, w
    for _ in range(4):
        eh, ew = -(-eh // 2), -(-ew // 2)
    assert model.out_size == (eh, ew)
    # A 1-long axis gets a 1-wide kernel (no weights that only ever see padding).
    first = model.blocks[0][0]
    assert first.kernel_size == (3 if h > 1 else 1, 3 if w > 1 else 1)


def test_conv_widths_double_up_to_feature_dim():
    assert conv_widths(4, 1024) == [128, 256, 512, 1024]
    assert conv_widths(4, 64) == [16, 16, 32, 64]
    assert conv_widths(2, 8) == [8, 8]


def test_diffc_input_standardisation_and_roundtrip(tmp_path):
    torch.manual_seed(0)
    model = DiffC(DiffCArch(3, 4, 4, 2, 2, 16)).eval()
    model.set_input_stats(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([2.0, 0.0, 1.0]))
    x = torch.randn(5, 3, 4, 4)
    assert model.input_std[1] == pytest.approx(1e-6)  # a constant channel cannot divide by zero
    save_diffc(str(tmp_path / "w.safetensors"), {"fine": model}, {"fine": ["x", "y"]}, {"layer": "mid"})
    loaded, classes = load_diffc(str(tmp_path / "w.safetensors"), "fine")
    assert classes == ["x", "y"]
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    with pytest.raises(UserError, match="holds no 'coarse' Diff-C; it has: \\['fine'\\]"):
        load_diffc(str(tmp_path / "w.safetensors"), "coarse")


@pytest.mark.parametrize("fused", [False, True] if hasattr(torch, "_fused_adam_") else [False])
def test_adamw_matches_torch_adamw(fused):
    from diffatlas.optim import Adam

    torch.manual_seed(0)
    ours, ref = DiffC(DiffCArch(4, 8, 8, 3, 3, 16)), DiffC(DiffCArch(4, 8, 8, 3, 3, 16))
    ref.load_state_dict(ours.state_dict())
    opt_ours = Adam(ours.parameters(), lr=1e-2, weight_decay=0.05, fused=fused)
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.05)
    x, y = torch.randn(16, 4, 8, 8), torch.randint(0, 3, (16,))
    for _ in range(15):
        for model, opt in ((ours, opt_ours), (ref, opt_ref)):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    for p, q in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    assert not torch.equal(ours.head.weight, DiffC(DiffCArch(4, 8, 8, 3, 3, 16)).head.weight)  # it moved


# ------------------------------------------------------------------ config


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"epochs": 0}, r"diffc.epochs = 0 .*integer >= 1"),
        ({"lr": -1.0}, r"diffc.lr = -1.0"),
        ({"granularities": ["medium"]}, r"diffc.granularities"),
        ({"granularities": []}, r"diffc.granularities"),
        ({"val_fraction": 0.5, "test_fraction": 0.5}, r"leaves no training samples"),
        ({"early_stopping": True, "val_fraction": 0.0}, r"early_stopping needs validation"),
        ({"dropout": 1.0}, r"diffc.dropout"),
        ({"seeds": 0}, r"diffc.seeds = 0 .*integer >= 1"),
    ],
)
def test_config_rejects_bad_values(bad, match):
    with pytest.raises(UserError, match=match):
        DiffCConfig(**bad)


def test_config_from_workflow_section():
    cfg = DiffCConfig.from_dict({"epochs": 3, "layers": ["mid"], "timesteps": None, "threads": 1})
    assert cfg.epochs == 3 and cfg.feature_dim == 1024 and cfg.lr == 1e-4  # paper defaults elsewhere
    with pytest.raises(UserError, match="unknown config key.*in diffc: epoch;"):
        DiffCConfig.from_dict({"epoch": 3})


# ------------------------------------------------------------------ summary, figures, CLI


def _fake_metrics(model, layer, t, acc):
    def method(a):
        return {"accuracy": a, "macro_f1": a / 2, "train_accuracy": 1.0, "val_accuracy": a, "chance_uniform": 0.5,
                "warnings": []}  # fmt: skip

    return {
        "model": model, "dataset": "ds", "layer": layer, "module_path": f"x.{layer}", "timestep": t, "alpha_bar": 0.5,
        "split": {"n_train": 10, "n_val": 2, "n_test": 4},
        "results": {g: {"classes": ["a", "b"], "majority_baseline": 0.5, "diffc": method(acc), "probe": method(acc - 0.1)}
                    for g in ("coarse", "fine")},
    }  # fmt: skip


@pytest.fixture
def summary(tmp_path):
    paths = []
    for model in ("m1", "m2"):
        for i, layer in enumerate(("mid", "up_ft1")):
            for j, t in enumerate((50, 500)):
                p = tmp_path / model / layer / f"t{t}" / "metrics.json"
                p.parent.mkdir(parents=True)
                p.write_text(json.dumps(_fake_metrics(model, layer, t, 0.9 - 0.1 * i - 0.2 * j - (model == "m2") * 0.05)))
                paths.append(p)
    return build_summary(paths)


def test_summary_table(summary):
    assert list(summary.columns) == COLUMNS
    assert len(summary) == 2 * 2 * 2 * 2 * 2
    row = summary[(summary.model == "m1") & (summary.layer == "up_ft1") & (summary.timestep == 500)
                  & (summary.granularity == "fine") & (summary.method == "probe")]  # fmt: skip
    assert row["accuracy"].item() == pytest.approx(0.9 - 0.1 - 0.2 - 0.1)
    assert row["n_test"].item() == 4 and row["n_classes"].item() == 2


def _curves(ax):
    """{label: (x, y)} of an axes' error-bar series (the data line of each container)."""
    return {c.get_label(): (c.lines[0].get_xdata(), c.lines[0].get_ydata()) for c in ax.containers}


def test_figures_plot_the_summary_values(summary):
    fig = plot_vs_layer(summary, "m1", "ds")
    coarse_ax = fig.axes[0]
    assert coarse_ax.get_title().startswith("coarse")
    lines = {k: y for k, (_, y) in _curves(coarse_ax).items()}
    np.testing.assert_allclose(lines["Diff-C, t=50"], [0.9, 0.8])
    np.testing.assert_allclose(lines["linear probe, t=500"], [0.6, 0.5])
    fig = plot_vs_timestep(summary, "m2", "ds")
    lines = _curves(fig.axes[1])
    np.testing.assert_allclose(lines["Diff-C, mid"][0], [50, 500])
    np.testing.assert_allclose(lines["Diff-C, mid"][1], [0.85, 0.65])
    fig = plot_models(summary, "ds")
    lines = {k: y for k, (_, y) in _curves(fig.axes[0]).items()}
    np.testing.assert_allclose(lines["Diff-C, m1"], [0.9, 0.7])  # best layer (mid) at each timestep
    np.testing.assert_allclose(lines["linear probe, m2"], [0.75, 0.55])
    with pytest.raises(UserError, match="no rows for model = 'm3'; it has: m1, m2"):
        plot_vs_layer(summary, "m3", "ds")


def test_figure_error_bars_are_the_wilson_intervals(tmp_path):
    """One job, 50 of 100 test images right: the bar spans Wilson's 0.404-0.596 (hand-computed)."""
    m = _fake_metrics("m", "mid", 50, 0.5)
    m["split"]["n_test"] = 100
    p = tmp_path / "metrics.json"
    p.write_text(json.dumps(m))
    table = build_summary([p])
    row = table[(table.granularity == "coarse") & (table.method == "diffc")].iloc[0]
    assert (row["n_correct"], row["n_test"]) == (50, 100)
    assert (row["accuracy_ci_low"], row["accuracy_ci_high"]) == pytest.approx((0.4038, 0.5962), abs=1e-4)
    fig = plot_vs_layer(table, "m", "ds")
    container = next(c for c in fig.axes[0].containers if c.get_label() == "Diff-C, t=50")
    (bars,) = container.lines[2]
    (segment,) = bars.get_segments()
    np.testing.assert_allclose(segment[:, 1], [0.4038, 0.5962], atol=1e-4)


def test_cli_summary_and_figure(tmp_path, summary):
    from diffatlas.cli import main

    paths = sorted(set(summary["metrics_path"]))
    out = tmp_path / "summary.csv"
    assert main(["diffc-summary", "--out", str(out), *paths]) == 0
    pd.testing.assert_frame_equal(pd.read_csv(out), summary.reset_index(drop=True), check_dtype=False)
    png = tmp_path / "fig" / "layer.png"
    assert main(["diffc-figure", "--summary", str(out), "--kind", "layer", "--model", "m1", "--dataset", "ds",
                 "--out", str(png)]) == 0  # fmt: skip
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["diffc-figure", "--summary", str(out), "--kind", "timestep", "--dataset", "ds", "--out", str(png)]) == 2
    assert main(["train-diffc", "--store", str(tmp_path / "missing.zarr"), "--layer", "mid", "--timestep", "1",
                 "--out", str(tmp_path / "o")]) == 2  # fmt: skip
