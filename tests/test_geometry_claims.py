"""Park et al.'s claims measured (issue 18): each new formula against a hand-computed oracle."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from diffatlas.errors import UserError
from diffatlas.geometry.claims import claims_table, run_claims, verdict
from diffatlas.geometry.meaning import (FACTORS, agreement, chance_agreement, edit_quality, quality_summary,
                                        saturation)
from diffatlas.geometry.measures import (end_over_middle, mean_frequency, radial_psd, spectral_flatness,
                                         top_energy_fraction)

torch.set_num_threads(1)
WILSON_0_OF_6 = 3.841458820694124 / (6 + 3.841458820694124)  # z²/(n + z²): upper Wilson bound of 0/n


def test_saturation_of_a_hand_made_image():
    """2x2 RGB image with 12 values: 0 and 255 count, 1 and 254 do not."""
    img = np.array([[[0, 255, 1], [254, 128, 0]], [[16, 16, 16], [255, 255, 255]]], dtype=np.uint8)
    assert saturation(img) == pytest.approx(6 / 12)
    both = saturation(np.stack([img, np.full_like(img, 40)]))
    assert both.tolist() == pytest.approx([0.5, 0.0])
    with pytest.raises(ValueError, match="uint8 RGB"):
        saturation(img.astype(np.float32))


def test_edit_quality_and_its_summary_on_a_hand_judge():
    """A fake judge keyed on the image's first value: found / blob / plausible per image, rates and
    Wilson bounds by hand (0/6 -> [0, z²/(6+z²)], 6/6 -> [6/(6+z²), 1])."""
    verdicts = {10: (1, 0), 11: (0, 0), 12: (1, 1), 13: (2, 0)}  # key -> (n_objects, n_background_blobs)

    def judge(image):
        n_obj, n_blob = verdicts[int(image[0, 0, 0])]
        return {"n_objects": n_obj, "n_background_blobs": n_blob}

    images = np.full((2, 1, 3, 4, 4, 3), 40, np.uint8)  # [E, m, S, H, W, 3]
    images[0, 0, :, 0, 0, 0] = [10, 11, 12]
    images[1, 0, :, 0, 0, 0] = [10, 13, 12]
    images[1, 0, 2, 1:, :, :] = 255  # saturation 36 of 48 values
    rows = pd.DataFrame(edit_quality(images, [-1.0, 0.0, 1.0], judge_fn=judge))
    assert rows["found"].tolist() == [1, 0, 1, 1, 1, 1]
    assert rows["blob"].tolist() == [0, 0, 1, 0, 0, 1]
    assert rows["plausible"].tolist() == [1, 0, 0, 1, 1, 0]
    assert rows["saturation"].tolist() == pytest.approx([0, 0, 0, 0, 0, 0.75])
    rows.insert(0, "mode", "linear")
    rows.insert(0, "timestep", 999)
    rows.insert(0, "model", "m")
    summ = quality_summary(rows).set_index("strength")
    assert summ.loc[1.0, "n"] == 2 and summ.loc[1.0, "blob_k"] == 2 and summ.loc[1.0, "plausible_k"] == 0
    assert summ.loc[1.0, "plausible_high"] == pytest.approx(3.841458820694124 / (2 + 3.841458820694124))
    assert summ.loc[1.0, "saturation"] == pytest.approx(0.375)
    assert summ.loc[0.0, "found_rate"] == pytest.approx(0.5)


def test_agreement_on_a_hand_table():
    """Majority factor = most samples changed it; ties go to the first factor; NaN = not changed."""
    nan = math.nan
    # columns: position, size, colour, shape, count
    t = [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 1, 0, 0, 0], [nan, nan, nan, nan, 1]]
    assert agreement(np.array(t)) == (0, 2, 4)  # position and size tie at 2: position first
    t[3] = [nan, 1, nan, nan, 1]
    assert agreement(np.array(t)) == (1, 3, 4)  # size now in 3 of 4
    assert agreement(np.zeros((3, len(FACTORS)))) == (0, 0, 3)  # nothing changed: k = 0


def test_chance_agreement_of_two_samples_and_two_groups():
    """Both samples change factor 0 in group 0 and factor 1 in group 1 (agreement 1). Shuffled, the
    groups line up with probability 1/2 (agreement 1) or cross (1/2 each group: a tie): chance 3/4."""
    c = np.zeros((2, 2, 2))
    c[:, 0, 0] = 1
    c[:, 1, 1] = 1
    assert chance_agreement(c, n_perm=4000, seed=1) == pytest.approx(0.75, abs=0.02)
    same = np.zeros((3, 4, 2))
    same[..., 0] = 1  # every edit changes factor 0: chance agreement 1
    assert chance_agreement(same, n_perm=10) == pytest.approx(1.0)


def test_spectral_flatness_and_top_energy_on_known_spectra():
    """σ = (3, 1): energies (9, 1), geometric mean 3, arithmetic 5 -> 0.6; top-1 share 0.9."""
    s = torch.tensor([[3.0, 1.0], [2.0, 2.0]], dtype=torch.float64)
    assert spectral_flatness(s).tolist() == pytest.approx([0.6, 1.0])
    assert top_energy_fraction(s).tolist() == pytest.approx([0.9, 0.5])
    assert float(top_energy_fraction(torch.tensor([4.0, 2.0, 1.0]), k=2)) == pytest.approx(20 / 21)


def test_psd_centroid_of_a_pure_sinusoid():
    """cos(2π k x / W) puts all power on the ring of radius k: centroid k (k = 5 and 11, 32x32)."""
    x = torch.arange(32, dtype=torch.float64)
    for k in (5, 11):
        v = torch.cos(2 * math.pi * k * x / 32)[None, None, :].expand(1, 32, 32)  # [C=1, H, W]
        assert float(mean_frequency(radial_psd(v))) == pytest.approx(k, abs=1e-9)


def test_end_over_middle_by_hand():
    seg = np.array([[3, 1, 1, 1, 1, 1, 1, 3], [1, 1, 2, 2, 2, 2, 1, 1]], dtype=float)  # L = 8: quarters of 2
    assert end_over_middle(seg).tolist() == pytest.approx([2.0, 0.5])


def test_verdict_rules():
    assert verdict(0.3, 0.1, 0.5, 0.0) == ("supported", "as claimed")
    assert verdict(0.3, -0.1, 0.5, 0.0) == ("not supported", "as claimed")
    assert verdict(-0.3, -0.5, -0.1, 0.0) == ("not supported", "opposite")
    assert verdict(1.2, 1.1, 1.3, 1.0) == ("supported", "as claimed")
    assert verdict(float("nan"), float("nan"), float("nan"), 0.0) == ("not measured", "none")


def _tables():
    """Hand-made result tables: slerp shorter than lerp in every pair by exactly 1, geodesic longest,
    flatness rising as t -> 0 by 0.2 in every sample, PSD centroid falling by 1."""
    lengths = pd.DataFrame([{"model": "m", "pair": p, "method": m, "segments": 4, "semantic_length": v}
                            for p in range(3) for m, v in (("lerp", 3.0 + p), ("slerp", 2.0 + p), ("geodesic", 9.0))])
    profile = {"lerp": [2.0, 1.0, 1.0, 2.0], "slerp": [1, 1, 1, 1], "geodesic": [1, 1, 1, 1]}
    segments = pd.DataFrame([{"pair": p, "method": m, "segment": k, "d_geo": d}
                             for p in range(3) for m in profile for k, d in enumerate(profile[m])])
    samples = pd.DataFrame([{"model": "m", "timestep": t, "alpha_bar": 0.5, "sample": i,
                             "flatness": 0.5 + i * 0.01 + (0.2 if t == 100 else 0.0),
                             "top1_energy": 0.5, "psd_centroid": 3.0 - (1.0 if t == 100 else 0.0)}
                            for t in (999, 100) for i in range(4)])
    return lengths, segments, samples


def test_claims_from_hand_tables():
    lengths, segments, samples = _tables()
    table = claims_table(lengths=lengths, segments=segments, samples=samples).set_index("claim")
    r = table.loc["slerp_shorter"]
    assert (r.value, r.low, r.high, r.n, r.verdict) == (1.0, 1.0, 1.0, 3, "supported")
    r = table.loc["lerp_ends_highest"]
    assert r.value == pytest.approx(2.0) and r.verdict == "supported"
    r = table.loc["geodesic_shortest"]  # min(lerp, slerp) - geodesic = 2 + p - 9
    assert r.value == pytest.approx(-6.0) and (r.verdict, r.direction) == ("not supported", "opposite")
    r = table.loc["spectra_flatten"]
    assert r.value == pytest.approx(0.2) and r.n == 4 and r.verdict == "supported"
    r = table.loc["psd_shifts_up"]
    assert r.value == pytest.approx(-1.0) and (r.verdict, r.direction) == ("not supported", "opposite")
    for claim in ("normalised_plausible", "semantic_vs_random", "global_agreement"):
        assert set(table.loc[[claim], "verdict"]) == {"not measured"}


def test_normalised_and_random_claims_pair_the_edits():
    """Per (timestep, sample, direction, γ): normalised plausible 3 of 4 at |γ| = 8, plain 1 of 4 ->
    paired difference 0.5; random damaged 2 of 4 at γ != 0, semantic 0."""
    rows = []
    for s, g in ((0, -8.0), (1, -8.0), (0, 8.0), (1, 8.0)):
        for mode, plaus, sat in (("linear", int(s == 0 and g > 0), 0.2), ("normalised", int(not (s == 1 and g > 0)), 0.05),
                                 ("random", int(s == 0), 0.0)):
            rows.append({"model": "m", "timestep": 999, "mode": mode, "sample": s, "direction": 0, "strength": g,
                         "found": 1, "blob": 1 - plaus, "plausible": plaus, "saturation": sat})
    q = pd.DataFrame(rows)
    table = claims_table(quality=q)
    norm = table[table["claim"] == "normalised_plausible"].reset_index()
    assert norm.loc[0, "value"] == pytest.approx(0.5) and norm.loc[0, "n"] == 4
    assert norm.loc[1, "value"] == pytest.approx(0.15) and norm.loc[1, "verdict"] == "supported"
    dmg = table[(table["claim"] == "semantic_vs_random") & table["measure"].str.startswith("damaged")].iloc[0]
    # units (s, γ) = (0, -8), (1, -8), (0, 8), (1, 8): random plausible 1, 0, 1, 0; plain 0, 0, 1, 0
    # -> damaged random - plain: -1, 0, 0, 0
    assert dmg["value"] == pytest.approx(-0.25) and dmg["n"] == 4 and dmg["direction"] == "opposite"


def test_run_claims_writes_csv_and_markdown_and_names_a_missing_file(tmp_path):
    lengths, segments, samples = _tables()
    paths = {}
    for name, df in (("lengths", lengths), ("segments", segments), ("samples", samples)):
        paths[name] = tmp_path / f"{name}.csv"
        df.to_csv(paths[name], index=False)
    out = tmp_path / "claims.csv"
    table = run_claims(out, **paths)
    back = pd.read_csv(out)
    assert list(back["claim"]) == list(table["claim"])
    md = (tmp_path / "claims.md").read_text()
    assert "| slerp_shorter: slerp is shorter than lerp" in md and "**supported**" in md
    with pytest.raises(UserError, match="nope.csv not found"):
        run_claims(out, lengths=tmp_path / "nope.csv")


def test_measures_job_writes_the_spectra_trend_from_basis_files(tmp_path):
    """Two hand-made timestep directories: singular values (3, 1) at t=999 and (2, 2) at t=100,
    directions cos(2π k x / 8) with k = 1 at t=999 and k = 3 at t=100: flatness 0.6 -> 1, centroid 1 -> 3,
    and the claims job reads both trends as supported (paired per sample, zero spread)."""
    import json

    from safetensors.torch import save_file

    from diffatlas.geometry.run import run_measures

    N, n = 3, 2
    x = torch.arange(8, dtype=torch.float64)
    runs = []
    for t, s, k in ((999, [3.0, 1.0], 1), (100, [2.0, 2.0], 3)):
        v = torch.cos(2 * math.pi * k * x / 8)[None, None, None, None, :].expand(N, n, 1, 8, 8).float().contiguous()
        u = torch.eye(4)[:n].expand(N, n, 4).contiguous()
        d = tmp_path / f"t{t}"
        d.mkdir()
        save_file({"v": v, "u": u, "s": torch.tensor(s).expand(N, n).contiguous()}, str(d / "basis.safetensors"))
        (d / "meta.json").write_text(json.dumps({"model": "m", "timestep": t, "alpha_bar": 0.5}))
        runs.append(str(d))
    run_measures(runs, tmp_path / "psd.csv", tmp_path / "dist.csv")
    samples = pd.read_csv(tmp_path / "spectra_samples.csv")
    by_t = samples.groupby("timestep")
    assert by_t["flatness"].mean().to_dict() == pytest.approx({100: 1.0, 999: 0.6})
    assert by_t["top1_energy"].mean().to_dict() == pytest.approx({100: 0.5, 999: 0.9})
    assert by_t["psd_centroid"].mean().to_dict() == pytest.approx({100: 3.0, 999: 1.0})
    trend = pd.read_csv(tmp_path / "spectra_trend.csv").set_index("timestep")
    assert trend.loc[999, "n"] == N and trend.loc[999, "flatness_low"] == pytest.approx(0.6)
    table = claims_table(samples=samples).set_index("claim")
    assert table.loc["spectra_flatten", "value"] == pytest.approx(0.4)
    assert table.loc["psd_shifts_up", "value"] == pytest.approx(2.0)
    assert set(table.loc[["spectra_flatten", "psd_shifts_up"], "verdict"]) == {"supported"}
