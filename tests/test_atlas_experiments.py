"""The atlas pages of the judged interventions experiment and of the cross-method links, on
hand-made artifact tables: the test writes the tables (the formats of
diffatlas.interventions.experiment and diffatlas.links as written), builds the atlas, and reads
the numbers back out of the HTML with the standard library's parser (tests/atlas_checks.py).
The oracle is the hand-written rows, never the atlas code: every rate, interval, n, IoU,
agreement and chance on the pages must be the table's value, in the row the table puts it.
"""

from __future__ import annotations

import csv
import functools
import json
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from atlas_checks import check_links, parse, values

from diffatlas.atlas import build_atlas

CELL = {"model": "m", "layer": "mid", "timestep": 500}
#: The steering SAE's latents the experiment chose (red: 7, circle: 3) and an unchosen one.
STEER_LATENTS = {7: 0.8125, 3: 0.6875, 11: 0.25}


def write_csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path) as fh:
        return list(csv.DictReader(fh))


def latents_table(purity: dict[int, float], ranked: set[int]) -> pd.DataFrame:
    """A latents.parquet with the columns a latent page reads; purity_colour is the marker value."""
    ids = sorted(purity)
    return pd.DataFrame({
        "latent": ids, "rank": [i if j in ranked else -1 for i, j in enumerate(ids)], "n_active": [20] * len(ids),
        "mean_act": [1.5] * len(ids), "top_sample_ids": [[0, 1]] * len(ids), "top_values": [[2.0, 1.0]] * len(ids),
        "top_labels_fine": [["red circle", "red square"]] * len(ids),
        "purity_fine": [0.5] * len(ids), "entropy_fine": [1.0] * len(ids), "purity_coarse": [1.0] * len(ids),
        "entropy_coarse": [0.0] * len(ids), "majority_fine": ["red circle"] * len(ids),
        "majority_colour": ["red"] * len(ids), "purity_colour": [purity[j] for j in ids],
        "entropy_colour": [0.0] * len(ids), "purity_active_colour": [0.5] * len(ids),
    })


def intervene_tree(results: Path, where: bool) -> None:
    """One experiment cell (mid, t = 500): red steers at α = 16, circle does not; green has no latent.

    ``where``: the tables carry the ``where`` column of ``intervene.where: both`` (as
    diffatlas.interventions.judged writes it): steering rows in each mode, the baseline once as
    ``none``, the ablations once as ``active``; one verdict per word and mode.
    """
    modes = ["everywhere", "active"] if where else [None]
    rates, verdicts = [], []
    for m, mode in enumerate(modes):
        extra = {} if mode is None else {"where": mode}
        for attr, value, latent, steers in (("colour", "red", 7, True), ("shape", "circle", 3, False)):
            word = {"attribute": attr, "value": value, "latent": latent}
            # distinct values per (word, mode, condition, alpha): a mix-up shows
            base = 0.01 * (1 + m) + (0.1 if value == "circle" else 0.0)
            for cond, alpha, k in (("baseline", 0.0, 1), ("latent", 4.0, 3), ("latent", 16.0, 12), ("random_latent", 4.0, 2),
                                   ("random_latent", 16.0, 1), ("random_direction", 4.0, 2), ("random_direction", 16.0, 3)):
                if cond == "baseline" and m > 0:
                    continue  # one baseline, shared by the modes
                r = base + k / 20 + alpha / 1000
                mode_of = {} if mode is None else {"where": "none" if cond == "baseline" else mode}
                rates.append({**word, "experiment": "steer", "condition": cond, "alpha": alpha, "outcome": "present", "n": 16,
                              "k": k + m, "rate": r, "ci_low": r - 0.0625, "ci_high": r + 0.125, **mode_of, **CELL})
            for cond, k in (("baseline", 0), ("latent", 5), ("random_latent", 1)) if m == 0 else ():
                r = base + k / 16 + 0.003
                rates.append({**word, "experiment": "ablate", "condition": cond, "alpha": 0.0, "outcome": "absent", "n": 8,
                              "k": k, "rate": r, "ci_low": r - 0.03125, "ci_high": r + 0.25,
                              **({} if mode is None else {"where": "active"}), **CELL})
            verdicts.append({**word, "status": "chosen", "steers": steers and m == 0, "best_alpha": 16.0, "rate_best": 0.0,
                             "ci_low_best": 0.0, "ci_high_best": 0.0, "baseline_rate": 0.0, "control_rate_best": 0.0,
                             "removes": value == "circle", "ablated_absent_rate": 0.0, "baseline_absent_rate": 0.0,
                             "control_absent_rate": 0.0, **extra, **CELL})
        verdicts.append({"attribute": "colour", "value": "green", "latent": -1, "status": "no latent", "steers": False,
                         "best_alpha": "", "rate_best": "", "ci_low_best": "", "ci_high_best": "", "baseline_rate": "",
                         "control_rate_best": "", "removes": False, "ablated_absent_rate": "", "baseline_absent_rate": "",
                         "control_absent_rate": "", **extra, **CELL})
    run = results / "intervene" / "m" / "experiment" / "mid" / "t500"
    write_csv(run / "rates.csv", rates)
    write_csv(run / "verdicts.csv", verdicts)
    write_csv(run / "selection.csv", [
        {"attribute": "colour", "value": "red", "latent": 7, "status": "chosen", "purity": 0.8125, "purity_active": 0.5,
         "n_active": 20, "mean_act": 1.5, "n_candidates": 2, **CELL},
        {"attribute": "colour", "value": "green", "latent": -1, "status": "no latent", "purity": "", "purity_active": "",
         "n_active": 0, "mean_act": "", "n_candidates": 0, **CELL},
        {"attribute": "shape", "value": "circle", "latent": 3, "status": "chosen", "purity": 0.6875, "purity_active": 0.5,
         "n_active": 20, "mean_act": 1.5, "n_candidates": 1, **CELL}])
    (run / "record.json").write_text(json.dumps({
        **CELL, "window": {"t_min": 400, "t_max": 600, "sampler_timesteps_inside": [499]},
        "cfg": {"guidance_scale": 3.0, "guided": True, "branch": "both"},
        "sae": {"samples": "spatial", "mine_on": "train", "conditioning": "caption", "dataset": "d"},
        "settings": {"alphas": [4.0, 16.0], "n_prompts": 16}, "alpha_unit": "α × mean act", "images": 96, "seed": 0,
        "device": "cpu", "dtype": "float32"}))
    sae = results / "intervene" / "m" / "sae" / "mid" / "t500"
    sae.mkdir(parents=True)
    latents_table(STEER_LATENTS, set(STEER_LATENTS)).to_parquet(sae / "latents.parquet")
    write_csv(results / "intervene" / "m" / "summary.csv", [
        {**CELL, "attribute": "colour", "words": 2, "with_latent": 1, "steer": 1, "ablate": 0, "steering_words": "red",
         "not_steering_words": "green", "removed_words": "", "n_steer": 16, "n_ablate": 8, "mean_purity": 0.8125},
        {**CELL, "attribute": "shape", "words": 1, "with_latent": 1, "steer": 0, "ablate": 1, "steering_words": "",
         "not_steering_words": "circle", "removed_words": "circle", "n_steer": 16, "n_ablate": 8, "mean_purity": 0.6875}])


#: The grid SAE's latents (mid, t = 50): 2 is ranked; 9 is not, but directions.csv names it.
GRID_LATENTS = {2: 0.9375, 5: 0.5625, 9: 0.4375}


def links_tree(results: Path) -> None:
    sae = results / "sae" / "m" / "d" / "mid" / "t50"
    sae.mkdir(parents=True)
    latents_table(GRID_LATENTS, {2, 5}).to_parquet(sae / "latents.parquet")
    (sae / "metrics.json").write_text(json.dumps({"fve": 0.5, "labels": {"n_top_latents": 2}}))
    links = results / "links" / "m" / "d"
    write_csv(links / "sae_daam_summary.csv", [
        {"layer": "mid", "timestep": 50, "latent": j, "word": w, "attribute": "colour", "purity": GRID_LATENTS[j], "rank": r,
         "n": n, "active": 0.75, "iou_sae_daam": a, "iou_sae_daam_low": a - 0.1, "iou_sae_daam_high": a + 0.05,
         "iou_sae_true": b, "iou_sae_true_low": b - 0.2, "iou_sae_true_high": b + 0.025,
         "iou_daam_true": 0.546875, "iou_daam_true_low": 0.47, "iou_daam_true_high": 0.63}
        for j, w, r, n, a, b in ((2, "red", 0, 12, 0.3828125, 0.390625), (5, "blue", 1, 7, 0.078125, 0.140625))])
    (links / "sae_daam.json").write_text(json.dumps({"tau": 0.4, "n_images": 32, "min_purity": 0.5, "latents_per_word": 2}))
    write_csv(links / "directions.csv", [
        {"mode": "normalised", "measure": meas, "layer": "mid", "timestep": 50, "geo_timestep": 500, "direction": d,
         "factor": f, "scored": f != "none", "top_latents": tops, "top_changes": "0.5,0.25", "top_attributes": "colour,shape",
         "agree": ag, "agree_share_top": ag, "chance": ch}
        for meas, d, f, tops, ag, ch in (("raw", 0, "colour", "2,9", 1.0, 0.1875), ("raw", 1, "none", "5,2", "", ""),
                                         ("relative", 0, "colour", "9,5", 0.0, 0.1875))])
    write_csv(links / "directions_agreement.csv", [
        {"measure": meas, "layer": layer, "timestep": t, "k": k, "n": n, "n_directions": 1, "agreement": a, "low": lo,
         "high": hi, "interval": how, "chance": 0.1875, "agree_share_top": a, "not_scored": 1}
        for meas, layer, t, k, n, a, lo, hi, how in (
            ("raw", "mid", 50, 1, 1, 1.0, 0.2065, 1.0, "wilson"), ("raw", "all", "all", 1, 1, 1.0, 1.0, 1.0, "bootstrap over directions"),
            ("relative", "mid", 50, 0, 1, 0.0, 0.0, 0.7935, "wilson"))])
    (links / "directions.json").write_text(json.dumps({"edit_mode": "normalised", "top_changed": 2}))
    # the geometry page the directions point at: normalised edits at t = 500, 1 sample x 2 directions x 3 strengths
    from safetensors.numpy import save_file

    geo = results / "geometry" / "m" / "t500"
    geo.mkdir(parents=True)
    save_file({"normalised": np.zeros((1, 2, 3, 8, 8, 3), np.uint8), "strengths": np.array([-1.0, 0.0, 1.0], np.float32)},
              str(geo / "edits.safetensors"))
    write_csv(results / "geometry" / "m" / "meaning_summary.csv", [
        {"timestep": 500, "mode": "normalised", "direction": d, "dominant": f} for d, f in ((0, "colour"), (1, "none"))])


class Rows(HTMLParser):
    """The table rows of a page: each row's attributes and its cells' (data-column, text)."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[dict[str, str], dict[str, str], dict[str, list[str]]]] = []
        self.cell: str | None = None

    def handle_starttag(self, tag, attrs):
        a = {k: v or "" for k, v in attrs}
        if tag == "tr":
            self.rows.append((a, {}, {}))
        elif tag == "td" and self.rows:
            self.cell = a.get("data-column", "")
            self.rows[-1][1][self.cell] = ""
        elif tag == "a" and self.cell is not None and self.rows:
            self.rows[-1][2].setdefault(self.cell, []).append(a["href"])

    def handle_data(self, data):
        if self.cell is not None:
            self.rows[-1][1][self.cell] += data

    def handle_endtag(self, tag):
        if tag == "td":
            self.cell = None


def rows_of(page: Path, **attrs: str) -> list[tuple[dict[str, str], dict[str, list[str]]]]:
    parser = Rows()
    parser.feed(page.read_text(encoding="utf-8"))
    return [(cells, links) for a, cells, links in parser.rows if all(a.get(f"data-{k}") == v for k, v in attrs.items())]


@functools.lru_cache(maxsize=8)
def numbers(page: Path) -> list[tuple[dict[str, str], float, str]]:
    """The numbers of a page (atlas_checks.parse), read once: the pages do not change after the build."""
    return parse(page).values


def one(page: Path, where: dict[str, str]) -> float:
    """The one number on ``page`` whose enclosing elements carry every attribute in ``where``."""
    (value,) = [v for ctx, v, _ in numbers(page) if all(ctx.get(k) == str(x) for k, x in where.items())]
    return value


@pytest.fixture(scope="module", params=[False, True], ids=["as-on-main", "with-where-column"])
def built(request, tmp_path_factory):
    """The hand-made tree and its atlas, built once per table format."""
    tmp = tmp_path_factory.mktemp("atlas-experiments")
    results = tmp / "results"
    intervene_tree(results, where=request.param)
    links_tree(results)
    build_atlas(results, tmp / "atlas")
    return results, tmp / "atlas", request.param


def test_intervene_page_shows_every_rate_with_interval_and_n(built):
    results, atlas, where = built
    page = atlas / "intervene" / "m.html"
    assert "intervene/m.html" in parse(atlas / "index.html").links
    run = results / "intervene" / "m" / "experiment" / "mid" / "t500"
    rates = read_csv(run / "rates.csv")
    assert len(rates) == (32 if where else 20)  # 2 words x (7 steer + 3 ablate), the 6 non-baseline steers per mode
    for r in rates:
        key = {"data-attribute": r["attribute"], "data-word": r["value"], "data-experiment": r["experiment"],
               "data-condition": r["condition"], "data-alpha": str(float(r["alpha"]))}
        if where:
            key["data-where"] = r["where"]
        for column, metric, field in (("rate", "value", "rate"), ("rate", "low", "ci_low"), ("rate", "high", "ci_high")):
            assert one(page, {**key, "data-column": column, "data-metric": metric}) == float(r[field])
        assert one(page, {**key, "data-column": "n"}) == float(r["n"])
        assert one(page, {**key, "data-column": "k"}) == float(r["k"])
    # the layer x timestep table is summary.csv's
    for s in read_csv(results / "intervene" / "m" / "summary.csv"):
        cell = {"data-layer": s["layer"], "data-timestep": s["timestep"], "data-attribute": s["attribute"]}
        for key in ("steer", "with_latent", "ablate", "n_steer", "n_ablate"):
            assert one(page, {**cell, "data-metric": key}) == float(s[key])
    text = page.read_text()
    assert "A latent <b>steers</b> only when" in text and "both controls" in text


def test_intervene_verdicts_sit_beside_the_rates_they_rest_on(built):
    results, atlas, where = built
    page = atlas / "intervene" / "m.html"
    run = results / "intervene" / "m" / "experiment" / "mid" / "t500"
    rates = read_csv(run / "rates.csv")
    verdicts = read_csv(run / "verdicts.csv")
    for v in verdicts:
        key = {"attribute": v["attribute"], "word": v["value"], **({"where": v["where"]} if where else {})}
        ((cells, links),) = [(c, ln) for c, ln in rows_of(page, **key) if "steers" in c]
        assert cells["steers"] == ("steers" if v["steers"] == "True" else "does not steer")
        assert cells["removes"] == ("removed" if v["removes"] == "True" else "not removed")
        if v["latent"] == "-1":
            assert cells["latent"] == "no latent" and "latent" not in links
            continue
        # the chosen latent links to its page, which is the steering SAE's latent (its purity marker)
        (href,) = links["latent"]
        assert href == f"../intervene/m/sae/mid/t500/latent{v['latent']}.html"
        ((marker, _),) = values(page.parent / href, {"data-attribute": "colour", "data-metric": "purity"})
        assert marker == STEER_LATENTS[int(v["latent"])]
        # each shown rate is the rates.csv row of that word, condition and alpha (best alpha: 16)
        mine = [r for r in rates if r["attribute"] == v["attribute"] and r["value"] == v["value"]
                and (not where or r["where"] in (v["where"], "none") or r["experiment"] == "ablate")]
        expect = {
            "latent_rate": ("steer", "latent", "16.0"), "baseline": ("steer", "baseline", None),
            "random_latent": ("steer", "random_latent", "16.0"), "random_direction": ("steer", "random_direction", "16.0"),
            "ablated": ("ablate", "latent", None), "ablate_baseline": ("ablate", "baseline", None),
            "ablate_random": ("ablate", "random_latent", None)}
        for column, (exp, cond, alpha) in expect.items():
            (r,) = [r for r in mine if r["experiment"] == exp and r["condition"] == cond and (alpha is None or r["alpha"] == alpha)]
            # shown as "rate [low, high] k/n", three decimals
            expect_text = f"{float(r['rate']):.3f} [{float(r['ci_low']):.3f}, {float(r['ci_high']):.3f}] {r['k']}/{r['n']}"
            assert " ".join(cells[column].split()) == expect_text, column
            where_attrs = {f"data-{k}": val for k, val in key.items()}
            assert [v for ctx, v, _ in numbers(page) if all(ctx.get(k) == x for k, x in {**where_attrs, "data-column": column}.items())] == [
                float(r["rate"]), float(r["ci_low"]), float(r["ci_high"]), float(r["k"]), float(r["n"])]


def test_links_page_shows_ious_agreement_and_chance(built):
    results, atlas, _ = built
    page = atlas / "links" / "m" / "d.html"
    assert "links/m/d.html" in parse(atlas / "index.html").links
    links = results / "links" / "m" / "d"
    for r in read_csv(links / "sae_daam_summary.csv"):
        key = {"data-layer": r["layer"], "data-timestep": r["timestep"], "data-latent": r["latent"], "data-word": r["word"]}
        for iou in ("iou_sae_daam", "iou_sae_true", "iou_daam_true"):
            for metric, field in (("value", iou), ("low", f"{iou}_low"), ("high", f"{iou}_high")):
                assert one(page, {**key, "data-column": iou, "data-metric": metric}) == float(r[field])
        assert one(page, {**key, "data-column": "n"}) == float(r["n"])
        ((cells, hrefs),) = rows_of(page, layer=r["layer"], timestep=r["timestep"], latent=r["latent"], word=r["word"])
        assert hrefs["latent"] == [f"../../sae/m/d/mid/t50/latent{r['latent']}.html"]
    for r in read_csv(links / "directions_agreement.csv"):
        key = {"data-table": "agreement", "data-measure": r["measure"], "data-layer": r["layer"], "data-timestep": r["timestep"]}
        for metric, field in (("value", "agreement"), ("low", "low"), ("high", "high")):
            assert one(page, {**key, "data-column": "agreement", "data-metric": metric}) == float(r[field])
        for field in ("k", "n", "chance"):
            assert one(page, {**key, "data-column": field}) == float(r[field])
    geometry = (atlas / "geometry" / "m.html").read_text()
    for r in read_csv(links / "directions.csv"):
        ((cells, hrefs),) = rows_of(page, measure=r["measure"], layer=r["layer"], timestep=r["timestep"],
                                    direction=r["direction"])
        assert cells["factor"] == r["factor"]
        assert [h.rsplit("latent", 1)[1] for h in hrefs["top_latents"]] == [f"{j}.html" for j in r["top_latents"].split(",")]
        (direction,) = hrefs["direction"]
        assert direction == f"../../geometry/m.html#t{r['geo_timestep']}-{r['mode']}-d{r['direction']}"
        assert f'id="t{r["geo_timestep"]}-{r["mode"]}-d{r["direction"]}"' in geometry
        if r["chance"]:
            assert one(page, {"data-table": "directions", "data-measure": r["measure"], "data-direction": r["direction"], "data-column": "chance"}) == float(r["chance"])
    # latent 9 is not ranked, yet named by directions.csv: it has its page (its purity marker)
    ((marker, _),) = values(atlas / "sae" / "m" / "d" / "mid" / "t50" / "latent9.html", {"data-attribute": "colour", "data-metric": "purity"})
    assert marker == GRID_LATENTS[9]
    check_links(atlas)


def test_no_pages_without_the_stages(tmp_path):
    """A results tree without intervene/ and links/ builds, and says they did not run."""
    (tmp_path / "results").mkdir()
    index = build_atlas(tmp_path / "results", tmp_path / "atlas").read_text()
    assert "judged interventions: " in index and "cross-method links: " in index
    assert not (tmp_path / "atlas" / "intervene").exists() and not (tmp_path / "atlas" / "links").exists()


@pytest.mark.parametrize("built", [False], indirect=True, ids=["as-on-main"])
def test_pages_in_a_headless_browser(built, tmp_path):
    """The new pages in chromium: reached from the index, images load, links resolve, no console error."""
    from atlas_checks import browser_walk

    atlas = built[1]
    visited = browser_walk(atlas, tmp_path / "shots", [
        ("index", None), ("intervene", r"/intervene/m\.html$"), ("steering_latent", r"/intervene/m/sae/.+/latent\d+\.html$"),
        ("index", r"/index\.html$"), ("links", r"/links/m/d\.html$"), ("linked_latent", r"/sae/m/d/.+/latent9\.html$")])
    assert len(visited) == 6
