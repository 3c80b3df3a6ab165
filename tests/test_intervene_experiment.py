"""The judged steering experiment: the choice of latents against a hand-made latents table, the
dose-response counts and Wilson intervals against hand values, per-image edits against the
single-latent edit done row by row, a shared sampler prefix that is bit-identical, and the whole
chain (store, SAE, experiment, summary) through the CLI on a tiny model."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from diffatlas.cli import main as cli
from diffatlas.errors import UserError
from diffatlas.interventions.config import InterventionConfig
from diffatlas.interventions.edit import SteeringSAE, edit_delta
from diffatlas.interventions.experiment import PerImageSAE, word_prompts
from diffatlas.interventions.judged import rate_table, select_latents, verdicts
from diffatlas.interventions.spec import Intervention
from diffatlas.sae.config import SAEArch
from diffatlas.sae.model import TopKSAE


# ------------------------------------------------------------------ choice of latents
def hand_latents() -> pd.DataFrame:
    """Eight latents; the comments say which one each colour must get and why."""
    return pd.DataFrame({
        "latent":                 [0,     1,     2,     3,     4,      5,     6,     7],
        "n_active":               [50,    5,     40,    40,    60,     30,    30,    0],
        "mean_act":               [1.0,   2.0,   0.5,   0.7,   1.5,    0.9,   0.8,   0.0],
        "purity_colour":          [0.7,   1.0,   0.9,   0.9,   0.8,    np.nan, 0.6,  np.nan],
        "majority_colour":        ["red", "red", "blue", "blue", "red", "green", "green", ""],
        "purity_active_colour":   [0.5,   0.9,   0.4,   0.6,   0.3,    0.9,   0.2,   np.nan],
    })
    # red: latent 1 is purest but fires on 5 < 10 images -> latent 4 (0.8 > 0.7 of latent 0)
    # blue: latents 2 and 3 tie at 0.9 -> the higher purity_active, latent 3
    # green: latent 5 has no purity (top-n not full) -> latent 6
    # yellow: no latent has it as majority -> none, reported


def test_select_latents_against_a_hand_table():
    sel = select_latents(hand_latents(), "colour", ["red", "blue", "green", "yellow"], min_active=10).set_index("value")
    assert sel.loc["red", "latent"] == 4 and sel.loc["red", "purity"] == 0.8 and sel.loc["red", "n_candidates"] == 2
    assert sel.loc["blue", "latent"] == 3 and sel.loc["blue", "n_candidates"] == 2
    assert sel.loc["green", "latent"] == 6 and sel.loc["green", "n_candidates"] == 1
    assert sel.loc["yellow", "latent"] == -1 and sel.loc["yellow", "status"] == "no latent"
    # with min_active 5 the purest red latent qualifies
    assert select_latents(hand_latents(), "colour", ["red"], min_active=5).loc[0, "latent"] == 1


def test_select_latents_names_a_missing_attribute():
    with pytest.raises(UserError, match="purity_shape"):
        select_latents(hand_latents(), "shape", ["circle"], min_active=1)


# ------------------------------------------------------------------ rates and verdicts
def judged_rows(value, experiment, condition, alpha, present):
    return [{"attribute": "colour", "value": value, "latent": 4, "experiment": experiment, "condition": condition,
             "alpha": alpha, "present": p} for p in present]


def test_rate_table_counts_and_wilson_against_hand_values():
    rows = (judged_rows("red", "steer", "baseline", 0.0, [False] * 5)
            + judged_rows("red", "steer", "latent", 4.0, [True, True, True, False, False])
            + judged_rows("red", "ablate", "latent", 0.0, [True, False, False, False]))
    rates = rate_table(pd.DataFrame(rows)).set_index(["experiment", "condition"])
    # steer counts images with the value: 3 of 5; Wilson 95% of 3/5 = [0.2307, 0.8824] (tables; by hand:
    # p = .6, z^2 = 3.8415, centre (.6 + .38415) / 1.76829 = .55655, half 1.95996 * sqrt(.048 + .038415) / 1.76829)
    r = rates.loc[("steer", "latent")]
    assert (r["n"], r["k"], r["outcome"]) == (5, 3, "present") and r["rate"] == 0.6
    assert r["ci_low"] == pytest.approx(0.2307, abs=1e-4) and r["ci_high"] == pytest.approx(0.8824, abs=1e-4)
    # ablate counts images without it: 3 of 4; Wilson 3/4 = [0.3006, 0.9544]
    a = rates.loc[("ablate", "latent")]
    assert (a["n"], a["k"], a["outcome"]) == (4, 3, "absent")
    assert a["ci_low"] == pytest.approx(0.3006, abs=1e-4) and a["ci_high"] == pytest.approx(0.9544, abs=1e-4)
    # 0 of 5: [0, 0.4345]
    b = rates.loc[("steer", "baseline")]
    assert b["k"] == 0 and b["ci_low"] == 0.0 and b["ci_high"] == pytest.approx(0.4345, abs=1e-4)


def test_verdicts_need_the_interval_above_baseline_and_both_controls():
    sel = pd.DataFrame({"attribute": ["colour", "colour"], "value": ["red", "blue"], "latent": [4, 3],
                        "status": ["chosen", "chosen"]})
    rows = []
    for value, latent_hits, ctrl_hits in (("red", 10, 0), ("blue", 10, 9)):
        rows += judged_rows(value, "steer", "baseline", 0.0, [False] * 10)
        rows += judged_rows(value, "steer", "latent", 8.0, [True] * latent_hits + [False] * (10 - latent_hits))
        rows += judged_rows(value, "steer", "random_latent", 8.0, [True] * ctrl_hits + [False] * (10 - ctrl_hits))
        rows += judged_rows(value, "steer", "random_direction", 8.0, [False] * 10)
        rows += judged_rows(value, "ablate", "baseline", 0.0, [True] * 10)
        rows += judged_rows(value, "ablate", "latent", 0.0, [False] * 10)
        rows += judged_rows(value, "ablate", "random_latent", 0.0, [True] * 10)
    v = verdicts(rate_table(pd.DataFrame(rows)), sel).set_index("value")
    # red: 10/10 (Wilson [0.7225, 1]) clears 0/10 ([0, 0.2775]); blue: the random latent's 9/10 ([0.596, 0.982]) overlaps
    assert bool(v.loc["red", "steers"]) and not bool(v.loc["blue", "steers"])
    assert v.loc["red", "ci_low_best"] == pytest.approx(0.7225, abs=1e-4) and v.loc["blue", "control_rate_best"] == 0.9
    # ablation removes the value in 10/10 vs 0/10 for baseline and control
    assert bool(v.loc["red", "removes"]) and v.loc["red", "ablated_absent_rate"] == 1.0


def test_verdicts_compare_the_latent_with_the_controls_of_its_own_mode():
    """Steering where active clears its own controls; everywhere it does not (a control of that mode steers too)."""
    sel = pd.DataFrame({"attribute": ["colour"], "value": ["red"], "latent": [4], "status": ["chosen"]})
    rows = judged_rows("red", "steer", "baseline", 0.0, [False] * 10)
    for where, ctrl in (("everywhere", 10), ("active", 0)):
        for condition, hits in (("latent", 10), ("random_latent", ctrl), ("random_direction", 0)):
            rows += [{**r, "where": where} for r in judged_rows("red", "steer", condition, 8.0, [True] * hits + [False] * (10 - hits))]
    rates = rate_table(pd.DataFrame(rows))
    assert set(rates["where"]) == {"none", "everywhere", "active"}
    v = verdicts(rates, sel, ["everywhere", "active"]).set_index("where")
    assert not bool(v.loc["everywhere", "steers"]) and bool(v.loc["active", "steers"])
    assert v.loc["everywhere", "control_rate_best"] == 1.0 and v.loc["active", "control_rate_best"] == 0.0
    assert v.loc["active", "baseline_rate"] == 0.0
    with pytest.raises(UserError, match="steering where"):
        verdicts(rates, sel, ["inside"])


def test_verdicts_at_small_n_say_no_when_intervals_overlap():
    """2/2 against 0/2: Wilson [0.342, 1] and [0, 0.658] overlap, so no verdict of causation."""
    sel = pd.DataFrame({"attribute": ["colour"], "value": ["red"], "latent": [4], "status": ["chosen"]})
    rows = (judged_rows("red", "steer", "baseline", 0.0, [False] * 2) + judged_rows("red", "steer", "latent", 8.0, [True] * 2)
            + judged_rows("red", "steer", "random_latent", 8.0, [False] * 2)
            + judged_rows("red", "steer", "random_direction", 8.0, [False] * 2))
    v = verdicts(rate_table(pd.DataFrame(rows)), sel).iloc[0]
    assert not bool(v["steers"]) and v["rate_best"] == 1.0 and v["ci_low_best"] == pytest.approx(0.3424, abs=1e-4)
    assert math.isnan(v["ablated_absent_rate"]) and not bool(v["removes"])


# ------------------------------------------------------------------ per-image edits
def make_sae(d=4, n=6, k=2, scale=0.5, seed=0):
    sae = TopKSAE(SAEArch(d_in=d, n_latents=n, k=k, k_aux=n), seed=seed)
    return SteeringSAE(sae.eval(), {"samples": "spatial"}, None, scale, "position")


def test_per_image_edits_equal_the_single_latent_edit_row_by_row():
    torch.manual_seed(0)
    base = make_sae()
    x = torch.randn(2, 3, 4) * 3  # [B, P, C]
    # ablate: image 0 its latent 1, image 1 latent 4; oracle: the library's one-latent edit on each row alone
    spec = Intervention(latent=0, mode="ablate")
    lat = []
    for b in range(2):
        active = [j for j in range(base.n_latents) if bool((base.code(x[b:b + 1], j) > 0).any())]
        lat.append(active[b % len(active)])
    got = edit_delta(x, torch.ones(2, dtype=torch.bool), spec, PerImageSAE.of(base, lat))
    for b in range(2):
        want = edit_delta(x[b:b + 1], torch.ones(1, dtype=torch.bool), Intervention(latent=lat[b], mode="ablate"), base)
        assert torch.equal(got[b:b + 1], want)
        # by hand: -z_j a_j / scale where z_j > 0
        z = base.code(x[b:b + 1], lat[b])[0]
        hand = -z[:, None] * base.sae.W_dec[lat[b]].detach()[None] / base.scale
        assert torch.allclose(got[b], hand, atol=1e-6)
    # steer: each image gets its own vector at every position; a CFG batch [uncond, cond] repeats them
    vec = torch.tensor([[1.0, 0, 0, 0], [0, 0, 2.0, 0]])
    steer = Intervention(latent=0, mode="steer", alpha=1.0)
    got = edit_delta(torch.cat([x, x]), torch.ones(4, dtype=torch.bool), steer, PerImageSAE.of(base, [0, 0], vec))
    assert torch.equal(got, torch.cat([vec, vec])[:, None, :].expand(4, 3, 4))
    # steer where active: image b's vector only at the positions where its own latent fires (by hand from
    # the SAE's dense TopK codes, row by row)
    where = Intervention(latent=0, mode="steer", alpha=1.0, where="active")
    got = edit_delta(torch.cat([x, x]), torch.ones(4, dtype=torch.bool), where, PerImageSAE.of(base, lat, vec))
    for b in range(2):
        fires = base.sae.codes(x[b] * base.scale)[:, lat[b]] > 0  # [P]
        assert fires.any() and not fires.all()
        hand = fires[:, None].float() * vec[b][None]
        assert torch.equal(got[b], hand) and torch.equal(got[2 + b], hand)


def test_word_prompts_name_or_avoid_the_value():
    steer = word_prompts("colour", "red", names_it=False, n=20, seed=0)
    ablate = word_prompts("shape", "circle", names_it=True, n=5, seed=0)
    assert len(steer) == 20 and not any("red" in p for p in steer) and len(set(steer)) == 9  # 3 colours x 3 shapes
    assert all(p.endswith("circle") for p in ablate) and len(set(ablate)) == 4


def test_config_checks_the_sae_overrides():
    with pytest.raises(UserError, match="intervene.sae"):
        InterventionConfig(sae={"sample": "spatial"})
    with pytest.raises(UserError, match="intervene.sae"):
        InterventionConfig(sae={"samples": "everywhere"})
    with pytest.raises(UserError, match="intervene.alphas"):
        InterventionConfig(alphas=[0.0])
    with pytest.raises(UserError, match=r"intervene.where = 'inside' is not allowed; allowed: one of everywhere, active"):
        InterventionConfig(where="inside")
    with pytest.raises(UserError, match=r"intervene.where"):
        InterventionConfig(where=["active", "active"])
    assert InterventionConfig(where=["active", "everywhere"]).where_modes == ["active", "everywhere"]
    assert InterventionConfig().where_modes == ["everywhere"]
    store = json.loads(InterventionConfig(layers=["up_ft1"]).store_json({"layers": ["mid"], "conditioning": "empty"}))
    assert store["layers"] == ["up_ft1"] and store["conditioning"] == "caption" and store["spatial_max_size"] is None
    sae = json.loads(InterventionConfig().sae_json({"k": 4, "samples": "pooled"}))
    assert sae["k"] == 4 and sae["samples"] == "spatial" and sae["mine_on"] == "train"


# ------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def tiny_chain(tmp_path_factory):
    """A tiny pixel model and a 48-image ShapesWorld, its caption-conditioned store and spatial SAE."""
    from diffatlas.models.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("judged")
    model = make_tiny_model("pixel", root / "model", seed=0)
    ds = {"kind": "shapesworld", "n_samples": 48, "image_size": 32, "seed": 0, "two_object_fraction": 0.0}
    assert cli(["make-dataset", "--name", "shapes", "--config-json", json.dumps(ds), "--out", str(root / "ds")]) == 0
    cfg = InterventionConfig(timesteps=[600], sae={"samples": "spatial", "mine_on": "train", "k": 4, "expansion": 2,
                                                   "steps": 20, "batch_size": 16, "warmup": 2})
    store = root / "store" / "t600.zarr"
    assert cli(["extract", "--model", str(model), "--dataset", str(root / "ds"), "--out", str(store), "--timestep", "600",
                "--config-json", cfg.store_json({"batch_size": 16}), "--device", "cpu", "--model-name", "tiny",
                "--dataset-name", "shapes"]) == 0
    sae = root / "sae"
    assert cli(["train-sae", "--store", str(store), "--layer", "mid", "--timestep", "600", "--out", str(sae),
                "--model-name", "tiny", "--dataset-name", "shapes", "--config-json", cfg.sae_json({}), "--device", "cpu"]) == 0
    return root, model, sae


def test_experiment_and_summary_through_the_cli(tiny_chain, capsys):
    root, model, sae = tiny_chain
    cfg = {"alphas": [4.0, 64.0], "n_prompts": 2, "steps": 3, "window": 100, "min_active": 1, "where": ["everywhere", "active"]}
    out = root / "exp" / "mid" / "t600"
    assert cli(["intervene-experiment", "--model", str(model), "--model-name", "tiny", "--sae", str(sae), "--layer", "mid",
                "--timestep", "600", "--config-json", json.dumps(cfg), "--device", "cpu", "--out", str(out)]) == 0
    rates, judged = pd.read_csv(out / "rates.csv"), pd.read_csv(out / "judged.csv")
    sel = pd.read_csv(out / "selection.csv", keep_default_na=False, na_values=[""])
    record = json.loads((out / "record.json").read_text())
    assert len(sel) == 7 and set(sel["value"]) == {"red", "green", "blue", "yellow", "circle", "square", "triangle"}
    chosen = sel[sel["latent"] >= 0]
    # one image per prompt: steer = baseline + 2 modes x 2 alphas x 3 conditions, ablate = baseline + 2 conditions
    assert len(judged) == len(chosen) * 2 * (1 + 2 * 2 * 3 + 1 + 2)
    assert set(judged["where"]) == {"none", "everywhere", "active"} and record["where"]["modes"] == ["everywhere", "active"]
    # recount every rate from judged.csv (the images' verdicts)
    for r in rates.itertuples():
        rows = judged[(judged["value"] == r.value) & (judged["experiment"] == r.experiment)
                      & (judged["condition"] == r.condition) & (judged["alpha"] == r.alpha) & (judged["where"] == r.where)]
        hits = rows["present"].sum() if r.experiment == "steer" else (~rows["present"]).sum()
        assert (r.n, r.k) == (2, hits)
        p, z = r.k / r.n, 1.959963984540054
        centre = (p + z * z / (2 * r.n)) / (1 + z * z / r.n)
        half = z * math.sqrt(p * (1 - p) / r.n + z * z / (4 * r.n ** 2)) / (1 + z * z / r.n)
        assert r.ci_low == pytest.approx(max(0.0, centre - half)) and r.ci_high == pytest.approx(min(1.0, centre + half))
    # the steering prompts never name the value, the ablation prompts always do
    steer = judged[judged["experiment"] == "steer"]
    assert not any(v in p for v, p in zip(steer["value"], steer["prompt"]))
    assert all(v in p for v, p in zip(judged.loc[judged["experiment"] == "ablate", "value"],
                                      judged.loc[judged["experiment"] == "ablate", "prompt"]))
    # controls share the latent's norm; the provenance is recorded
    assert (chosen["steer_norm_per_alpha"] > 0).all() and (chosen["random_latent"] != chosen["latent"]).all()
    assert record["window"]["t_max"] == 700 and record["window"]["t_min"] == 500
    assert record["window"]["sampler_timesteps_inside"] and record["sae"]["mine_on"] == "train"
    assert record["sae"]["conditioning"] == "caption" and record["sae"]["samples"] == "spatial"
    # at alpha 64 along a decoder direction every edited image differs from the baseline somewhere
    from safetensors.torch import load_file

    images = load_file(str(out / "images.safetensors"))["images"].numpy()
    assert images.shape[0] == len(judged)
    base = images[((judged["experiment"] == "steer") & (judged["condition"] == "baseline")).to_numpy()]
    big = images[((judged["condition"] == "latent") & (judged["alpha"] == 64.0) & (judged["where"] == "everywhere")).to_numpy()]
    assert (base != big).reshape(len(base), -1).any(1).all()

    table, fig = root / "summary.csv", root / "fig" / "dose.png"
    assert cli(["intervene-summary", "--table", str(table), "--figure", str(fig), str(out)]) == 0
    summary = pd.read_csv(table, keep_default_na=False)
    assert list(summary["attribute"]) == ["colour", "colour", "shape", "shape"] and list(summary["words"]) == [4, 4, 3, 3]
    assert list(summary["where"]) == ["everywhere", "active"] * 2
    assert (summary["n_steer"] == 2).all()
    # every word is listed as steering or not
    for row in summary.itertuples():
        words = set(row.steering_words.split()) | set(row.not_steering_words.split())
        assert words == set(sel.loc[sel["attribute"] == row.attribute, "value"])
    assert fig.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_experiment_refuses_an_sae_of_another_time(tiny_chain, capsys):
    root, model, sae = tiny_chain
    code = cli(["intervene-experiment", "--model", str(model), "--sae", str(sae), "--layer", "mid", "--timestep", "300",
                "--device", "cpu", "--out", str(root / "bad")])
    assert code == 2 and "trained at timestep 600" in capsys.readouterr().err
    assert not (root / "bad").exists()


def test_shared_prefix_is_bit_identical(tiny_chain):
    from diffatlas.interventions.generate import sample
    from diffatlas.models.loader import load_model

    _, model, _ = tiny_chain
    handle = load_model(model, device="cpu")
    prompts = ["a red circle", "a blue square"]
    full = sample(handle, prompts, seed=3, steps=4, guidance_scale=3.0)
    x = sample(handle, prompts, seed=3, steps=4, guidance_scale=3.0, stop=2)
    assert torch.equal(sample(handle, prompts, seed=3, steps=4, guidance_scale=3.0, start=(2, x)), full)


def test_job_settings_are_blind_to_the_grid():
    """Adding a model, layer or timestep to the grid leaves each finished experiment's settings as they were."""
    cfg = InterventionConfig().to_dict()
    grown = {**cfg, "models": ["shapesworld", "sd15"], "layers": ["mid", "up_ft1"], "timesteps": [500, 900]}
    assert InterventionConfig.job_json(cfg, "experiment") == InterventionConfig.job_json(grown, "experiment")
    assert InterventionConfig.job_json(cfg, "experiment") != InterventionConfig.job_json({**cfg, "alphas": [1.0]}, "experiment")
    assert InterventionConfig().sae_json({}) == InterventionConfig(layers=["up_ft1"], alphas=[9.0]).sae_json({})


def test_experiment_refuses_a_time_outside_the_schedule(tiny_chain, capsys):
    root, model, sae = tiny_chain
    code = cli(["intervene-experiment", "--model", str(model), "--sae", str(sae), "--layer", "mid", "--timestep", "5000",
                "--device", "cpu", "--out", str(root / "bad2")])
    err = capsys.readouterr().err
    assert code == 2 and "outside model" in err and "allowed: 0..999" in err


def test_run_summary_reports_the_intervene_table(tmp_path):
    from diffatlas.run_summary import stages_run, summarise_run

    (tmp_path / "intervene" / "m").mkdir(parents=True)
    pd.DataFrame([
        {"model": "m", "layer": "mid", "timestep": 500, "attribute": "colour", "words": 4, "with_latent": 3, "steer": 1,
         "ablate": 0, "steering_words": "red", "not_steering_words": "green blue yellow", "removed_words": "",
         "n_steer": 60, "n_ablate": 60, "mean_purity": 0.8},
    ]).to_csv(tmp_path / "intervene" / "m" / "summary.csv", index=False)
    assert stages_run(tmp_path) == ["intervene"]
    text = summarise_run(tmp_path)
    assert "m mid t500 colour: 1 of 3 latents steer (red), 0 removed by ablation (of 4 words; n = 60 images per rate)" in text
    # with both steering modes (intervene.where: both) each line names its mode
    pd.DataFrame([
        {"model": "m", "layer": "mid", "timestep": 500, "attribute": "colour", "words": 4, "with_latent": 3, "steer": s,
         "ablate": 0, "steering_words": w, "not_steering_words": "", "removed_words": "", "n_steer": 60, "n_ablate": 60,
         "mean_purity": 0.8, "where": where} for s, w, where in ((1, "red", "everywhere"), (0, "", "active"))
    ]).to_csv(tmp_path / "intervene" / "m" / "summary.csv", index=False)
    text = summarise_run(tmp_path)
    assert "m mid t500 colour steered everywhere: 1 of 3 latents steer (red)" in text
    assert "m mid t500 colour steered active: 0 of 3 latents steer, 0 removed" in text
