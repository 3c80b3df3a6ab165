"""The geometry commands end to end on the tiny pixel model: artifacts, provenance, figures."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from diffatlas.cli import main as cli

torch.set_num_threads(1)

CFG = {
    "n_samples": 2, "n_directions": 2, "oversample": 1, "tol": 0.05, "ddim_steps": 2,
    "edit_strengths": [-3.0, 3.0], "edit_directions": 1, "edit_samples": 2,
    "iterative_substeps": 1, "iterative_directions": 1, "iterative_timesteps": [400],
    "global_samples": 2, "path_pairs": 2, "path_segments": 4,
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from diffatlas.models.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("geometry")
    model = make_tiny_model("pixel", root / "model")
    cfg = json.dumps(CFG)
    out = {}
    for t in (999, 400):
        d = root / "geometry" / f"t{t}"
        rc = cli(["geometry", "--model", str(model), "--model-name", "tiny", "--timestep", str(t), "--out", str(d),
                  "--config-json", cfg, "--device", "cpu", "--threads", "1"])
        assert rc == 0
        out[t] = d
    return root, model, out


def test_basis_and_edit_artifacts(runs):
    root, _, out = runs
    b = load_file(str(out[400] / "basis.safetensors"))
    assert b["v"].shape == (2, 2, 3, 32, 32) and b["u"].shape == (2, 2, 32) and b["s"].shape == (2, 2)
    v = b["v"].reshape(2, 2, -1)
    gram = v @ v.transpose(1, 2)
    assert torch.allclose(gram, torch.eye(2).expand(2, 2, 2), atol=1e-4)  # orthonormal directions
    assert (b["s"][:, 0] >= b["s"][:, 1]).all()
    # Sample i is the same trajectory at both timesteps: same x_T.
    b999 = load_file(str(out[999] / "basis.safetensors"))
    assert torch.equal(b999["x_T"], b["x_T"]) and torch.equal(b999["x_t"], b999["x_T"])
    meta = json.loads((out[400] / "meta.json").read_text())
    for key in ("model", "layer", "module_path", "timestep", "alpha_bar", "seed", "pooling", "prompt", "config"):
        assert key in meta
    assert (meta["model"], meta["layer"], meta["module_path"], meta["timestep"]) == ("tiny", "mid", "mid_block", 400)
    assert 0 < meta["alpha_bar"] < 1
    e = load_file(str(out[400] / "edits.safetensors"))
    assert e["strengths"].tolist() == [-3.0, 0.0, 3.0]
    assert e["linear"].shape == (2, 1, 3, 32, 32, 3) and e["linear"].dtype == torch.uint8
    assert e["normalised"].shape == e["linear"].shape
    assert torch.equal(e["linear"][:, :, 1], e["normalised"][:, :, 1])  # γ = 0 is the same image
    assert e["iterative"].shape == (1, 3, 32, 32, 3) and e["iterative_strengths"].tolist() == [-3.0, 0.0, 3.0]
    # One-step and iterative edits at the first strength coincide (the first step is the one-step edit).
    assert torch.equal(e["iterative"][0], e["linear"][0, 0])
    assert "iterative" not in load_file(str(out[999] / "edits.safetensors"))  # only at iterative_timesteps
    # The ablation's control: one random unit direction per edited v, the same one-step edit.
    assert e["random"].shape == e["linear"].shape and e["random"].dtype == torch.uint8
    assert torch.equal(e["random"][:, :, 1], e["linear"][:, :, 1])  # γ = 0: the unedited image (shared)
    assert not torch.equal(e["random"][:, :, 0], e["linear"][:, :, 0])
    r = e["random_directions"]
    assert r.shape == (2, 1, 3, 32, 32) and r.dtype == torch.float32
    r = r.reshape(2, 1, -1).double()
    assert torch.allclose(r.norm(dim=-1), torch.ones(2, 1, dtype=torch.float64), atol=1e-6)
    # Not in the span of the basis beyond chance: a uniform unit vector in D = 3072 dimensions has
    # E||P r||² = n / D onto an n-dim subspace (D·||P r||² ~ χ²_n); 40 n / D is exceeded with p < 1e-15.
    D = r.shape[-1]
    proj = (r @ v.double().transpose(1, 2)).pow(2).sum(-1)  # [E, m]: ||P_span(v) r||²
    assert (proj < 40 * 2 / D).all(), proj
    assert not torch.equal(r[0], r[1])  # one draw per edited direction


def test_bad_timestep_is_a_clear_error(runs, capsys):
    root, model, _ = runs
    rc = cli(["geometry", "--model", str(model), "--timestep", "1000", "--out", str(root / "bad"), "--device", "cpu"])
    assert rc == 2
    assert "1000" in capsys.readouterr().err
    assert not (root / "bad").exists()


def test_cross_timestep_outputs_and_figures(runs):
    root, model, out = runs
    g = root / "geometry"
    cfg = json.dumps(CFG)
    assert cli(["geometry-global", "--model", str(model), "--model-name", "tiny", "--basis", str(out[999]),
                "--out", str(g / "global"), "--config-json", cfg, "--device", "cpu"]) == 0
    gl = load_file(str(g / "global" / "global.safetensors"))
    assert gl["directions"].shape == (2, 1, 3, 32, 32) and gl["directions_h"].shape == (2, 32) and gl["images"].shape == (2, 1, 3, 32, 32, 3)
    assert (gl["kept"] > 0).all() and (gl["kept"] <= 1 + 1e-5).all()

    assert cli(["geometry-paths", "--model", str(model), "--model-name", "tiny", "--out", str(g / "paths.csv"),
                "--config-json", cfg, "--device", "cpu"]) == 0
    paths = pd.read_csv(g / "paths.csv")
    assert len(paths) == 6 and set(paths["method"]) == {"lerp", "slerp", "geodesic"}
    assert (paths["semantic_length"] > 0).all() and (paths["floor"] >= 0).all()
    segs = pd.read_csv(g / "path_segments.csv")
    assert len(segs) == 2 * 3 * 4 and (segs["d_geo"] >= 0).all()
    # The semantic length is the sum of the segments' D_geo.
    sums = segs.groupby(["pair", "method"])["d_geo"].sum()
    for _, row in paths.iterrows():
        assert sums[(row["pair"], row["method"])] == pytest.approx(row["semantic_length"], rel=1e-6)
    assert (paths[paths.method == "slerp"]["min_norm_ratio"] > 0.95).all()
    assert (paths[paths.method == "lerp"]["min_norm_ratio"] < 0.8).all()

    runs_args = [str(out[999]), str(out[400])]
    assert cli(["geometry-measures", "--runs", *runs_args, "--psd", str(g / "psd.csv"),
                "--distances", str(g / "dist.csv")]) == 0
    psd = pd.read_csv(g / "psd.csv")
    assert set(psd["timestep"]) == {999, 400} and (psd["power"] >= 0).all()
    dist = pd.read_csv(g / "dist.csv")
    assert set(dist["kind"]) == {"across_samples", "across_timesteps"}

    assert cli(["geometry-meaning", "--runs", *runs_args, "--out", str(g / "meaning.csv"),
                "--summary", str(g / "meaning_summary.csv"), "--global-dir", str(g / "global")]) == 0
    summary = pd.read_csv(g / "meaning_summary.csv")
    assert set(summary["mode"]) == {"linear", "normalised", "iterative", "random"}
    abl = pd.read_csv(g / "meaning_random.csv")
    table = pd.read_csv(g / "meaning.csv")
    assert set(abl["mode"]) <= {"linear", "random"} and set(abl["strength"]) <= {-3.0, 3.0}
    for _, row in abl.iterrows():  # n counts the judged edits whose reference shows an object
        sel = table[(table["mode"] == row["mode"]) & (table["timestep"] == row["timestep"])
                    & (table["strength"] == row["strength"]) & (table["n_ref"] > 0)]
        assert row["n"] == len(sel) and row["lost_k"] == int((sel["n_edit"] == 0).sum())
    # Plain vs normalised vs random: one row per edited image (2 samples x 1 direction x 3 strengths each).
    quality = pd.read_csv(g / "edit_quality.csv")
    assert len(quality) == 2 * 3 * 2 * 3 and set(quality["mode"]) == {"linear", "normalised", "random"}
    qsum = pd.read_csv(g / "edit_quality_summary.csv")
    assert (qsum["n"] == 2).all() and (qsum["found_low"] <= qsum["found_rate"]).all()
    agree = pd.read_csv(g / "global_agreement.csv")
    pooled = agree[agree["direction"].astype(str) == "all"].iloc[0]
    assert pooled["n"] == 2 * 1 * 2 and pooled["k"] == agree["k"].iloc[:-1].sum()
    assert cli(["geometry-claims", "--meaning", str(g / "meaning.csv"), "--quality", str(g / "edit_quality.csv"),
                "--agreement", str(g / "global_agreement.csv"), "--lengths", str(g / "paths.csv"),
                "--segments", str(g / "path_segments.csv"), "--samples", str(g / "spectra_samples.csv"),
                "--out", str(g / "claims.csv")]) == 0
    claims = pd.read_csv(g / "claims.csv")
    assert set(claims["claim"]) == {"normalised_plausible", "semantic_vs_random", "global_agreement", "slerp_shorter",
                                    "lerp_ends_highest", "geodesic_shortest", "spectra_flatten", "psd_shifts_up"}
    assert set(claims["verdict"]) <= {"supported", "not supported"} and (g / "claims.md").is_file()

    figs = root / "figures"
    for args in (["spectra", "--runs", *runs_args], ["edits", "--run", str(out[400])],
                 ["global", "--global-dir", str(g / "global")],
                 ["psd", "--psd", str(g / "psd.csv"), "--distances", str(g / "dist.csv")],
                 ["meaning", "--summary", str(g / "meaning_summary.csv")],
                 ["paths", "--segments", str(g / "path_segments.csv"), "--summary", str(g / "paths.json")]):
        path = figs / f"{args[0]}.png"
        assert cli(["geometry-figures", *args, "--out", str(path)]) == 0
        assert path.stat().st_size > 1000
