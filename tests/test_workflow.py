"""Snakemake itself, end to end, on a tiny config: every stage that exists runs.

A tiny random ShapesWorld-architecture model stands in for the shipped checkpoint, so the
test exercises the real rules, CLIs and artifacts in a couple of minutes on 2 cores.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from dryrun import planned_jobs

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.workflow


#: The tiny model is served as a Hugging Face cache entry of this commit, and the config names
#: it by hub id and revision: every model-loading job (extraction, DAAM, geometry, fidelity)
#: must pass --revision and load it from the cache.
HUB_ID, REVISION = "diffatlas-test/tiny-world", "0123456789abcdef0123456789abcdef01234567"
HUB_CACHE = {}


def _snakemake(*args: str, cwd: Path = ROOT, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, DIFFATLAS_NO_PROGRESS="1", **HUB_CACHE)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    cmd = [sys.executable, "-m", "snakemake", "--cores", "2", *args]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=1500)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


@pytest.fixture(scope="module")
def tiny_run():
    from diffatlas.models.tiny import make_tiny_model

    # Its own temporary directory: pytest's numbered base dirs are pruned by other pytest
    # processes on the same machine, which must not pull the workflow's files away mid-run.
    holder = tempfile.TemporaryDirectory(prefix="diffatlas-wf-")
    tmp = Path(holder.name)
    model = make_tiny_model("pixel", tmp / "tiny_world_model", seed=0)
    snapshot = tmp / "hub" / ("models--" + HUB_ID.replace("/", "--")) / "snapshots" / REVISION
    shutil.copytree(model, snapshot)
    HUB_CACHE["HF_HUB_CACHE"] = str(tmp / "hub")
    cfg = yaml.safe_load((ROOT / "tests" / "workflow" / "tiny_config.yaml").read_text())
    cfg["results"] = str(tmp / "results")
    cfg["models"] = {"shapesworld": {"path": HUB_ID, "revision": REVISION}}
    cfg_path = tmp / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    proc = _snakemake("--configfile", str(cfg_path))
    yield tmp / "results", cfg_path, proc
    HUB_CACHE.clear()
    holder.cleanup()


def test_dry_run_lists_every_stage(tmp_path):
    # planned into an empty results folder, so a demo already run in this checkout changes nothing
    empty = ("--config", f"results={tmp_path / 'results'}")
    proc = _snakemake("-n", "--quiet", "rules", *empty)
    listed = proc.stdout + proc.stderr
    for rule in ("make_dataset", "extract", "train_sae", "train_diffc", "daam_generate", "world_samples_figure"):
        assert rule in listed, f"rule {rule} missing from the planned DAG:\n{listed[-3000:]}"
    # The shipped model carries its fidelity record: the demo does not sample it again...
    assert "world_fidelity " not in listed, listed[-3000:]
    # ...unless asked, by the named target.
    proc = _snakemake("-n", "world_fidelity", "--quiet", "rules", *empty)
    assert "world_fidelity" in proc.stdout + proc.stderr


def test_end_to_end_outputs(tiny_run):
    results, _, _ = tiny_run
    # data
    meta = pd.read_parquet(results / "data" / "shapesworld" / "metadata.parquet")
    assert len(meta) == 48
    # activations
    from diffatlas.activations.store import ActivationStore

    store = ActivationStore(results / "activations" / "shapesworld" / "shapesworld")  # its times as one store
    assert store.layers == ["mid", "up_ft1"] and list(store.timesteps) == [100, 600]
    assert store.pooled("mid", 100).shape[0] == 48
    assert (store.labels("fine") == meta["label"].to_numpy()).all()
    # SAE metrics: L0 equals k on post-TopK codes
    metrics = json.loads((results / "sae" / "shapesworld" / "shapesworld" / "mid" / "t100" / "metrics.json").read_text())
    assert metrics["l0"] == pytest.approx(4.0)
    # Diff-C: the confusion matrix sums to the test size
    dm = json.loads((results / "diffc" / "shapesworld" / "shapesworld" / "mid" / "t600" / "metrics.json").read_text())
    for gran in ("coarse", "fine"):
        for method in ("diffc", "probe"):
            m = dm["results"][gran][method]
            assert sum(map(sum, m["confusion_matrix"]["matrix"])) == dm["split"]["n_test"] > 0
    assert dm["timestep"] == 600 and 0 < dm["alpha_bar"] < 1
    # every figure target exists and is a PNG
    figures = sorted((results / "figures").rglob("*.png"))
    stages = {p.relative_to(results / "figures").parts[0] for p in figures}
    assert {"data", "sae", "diffc", "daam", "geometry", "world_model", "intervene"} <= stages, stages
    # the judged steering experiment: every word of the tiny run is in the table, each rate over its n prompts
    verdicts = pd.read_csv(results / "intervene" / "shapesworld" / "experiment" / "mid" / "t600" / "verdicts.csv")
    assert len(verdicts) == 7
    summary = pd.read_csv(results / "intervene" / "shapesworld" / "summary.csv")
    assert list(summary["attribute"]) == ["colour", "shape"] and list(summary["words"]) == [4, 3]
    for fig in figures:
        assert fig.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", fig
    # every model-loading stage loaded the configured revision from the cache
    assert store.attrs["revision"] == REVISION
    for run in ("prompts/captions", "real/shapesworld"):
        info = json.loads((results / "daam" / "shapesworld" / run / "run" / "info.json").read_text())
        assert info["model"]["revision"] == REVISION, run
    geo = json.loads((results / "geometry" / "shapesworld" / "t999" / "meta.json").read_text())
    assert geo["model_info"]["revision"] == REVISION
    fid = json.loads((results / "world_model" / "fidelity.json").read_text())
    assert fid["model"]["revision"] == REVISION
    # no temporary leftovers from atomic writes
    assert not [p for p in results.rglob(".*.tmp-*")]


def test_end_of_run_summary_names_what_was_made(tiny_run):
    results, _, proc = tiny_run
    from diffatlas.run_summary import paths_to_open

    out = proc.stdout
    assert f"diffatlas: what this run made ({results}/)" in out, out[-3000:]
    # a random tiny model has no fidelity record: this run measured it
    assert "stages with output: data, world_model, activations, sae, diffc, daam, geometry" in out
    assert f"measured by this run ({results / 'world_model' / 'fidelity.json'})" in out
    assert "Diff-C and linear probe:" in out and "[" in out.split("Diff-C and linear probe:")[1].splitlines()[2]
    # every figure that exists, and nothing else, under its folder
    figures = paths_to_open(results)
    pngs = [p for p in figures if p.suffix == ".png"]
    assert pngs == sorted((results / "figures").rglob("*.png")) and pngs
    assert results / "atlas" / "index.html" in figures  # the atlas is part of the default run
    for fig in figures:
        assert fig.name in out
    assert f"open ({len(figures)} files):" in out


def test_budget_from_the_runs_benchmark_files(tiny_run):
    """The budget table sums Snakemake's own benchmark files (read here with the csv module)."""
    import csv

    results, _, _ = tiny_run
    from diffatlas.budget import budget, format_budget

    files = sorted((results / "benchmarks").rglob("*.tsv"))
    per_rule: dict[str, float] = {}
    for f in files:
        rel = f.relative_to(results / "benchmarks")
        rule = rel.parts[0] if len(rel.parts) > 1 else f.stem
        with open(f) as fh:
            (row,) = list(csv.DictReader(fh, delimiter="\t"))
        per_rule[rule] = per_rule.get(rule, 0.0) + float(row["s"])
    b = budget(results, ROOT / "rules")
    assert b.stages["jobs"].sum() == len(files)
    assert set(b.stages["stage"]) == {"data", "world_model", "extract", "sae", "diffc", "daam", "geometry", "intervene", "links", "atlas"}
    stage_of = {"make_dataset": "data", "world_fidelity": "world_model", "extract": "extract", "train_diffc": "diffc"}
    for rule, stage in stage_of.items():
        assert b.rules.set_index("rule").loc[rule, "stage"] == stage
        assert b.rules.set_index("rule").loc[rule, "seconds"] == pytest.approx(per_rule[rule])
    assert b.stages["seconds"].sum() == pytest.approx(sum(per_rule.values()))
    assert 0 < b.span_s
    table = format_budget(b, per_rule=True)
    assert "| stage | jobs | job-seconds |" in table and "| train_diffc |" in table
    from diffatlas.budget import format_comparison

    both = format_comparison(b, b)
    total = sum(per_rule.values())
    (row,) = [line for line in both.splitlines() if line.startswith("| total |")]
    cells = [c.strip() for c in row.strip("|").split("|")]
    # before and after are the same run: jobs and job-seconds (printed to 0.1 s) twice over
    assert int(cells[1]) == int(cells[4]) == len(files)
    assert float(cells[2]) == float(cells[5]) == pytest.approx(total, abs=0.051)


def test_single_figure_target_rebuilds_alone(tiny_run):
    results, cfg_path, _ = tiny_run
    fig = results / "figures" / "data" / "shapesworld_preview.png"
    fig.unlink()
    proc = _snakemake(str(fig), "--configfile", str(cfg_path))
    assert fig.exists()
    assert "dataset_preview" in proc.stdout + proc.stderr
    assert "make_dataset" not in [l.strip() for l in (proc.stdout + proc.stderr).splitlines() if l.startswith("rule ")]



def test_new_timestep_plans_only_its_jobs(tiny_run):
    """Adding a timestep plans one extraction job, its SAE/Diff-C jobs and the summaries and
    figures that read them: no finished extraction, SAE or Diff-C job re-runs."""
    cfg_path = tiny_run[1]
    cfg = yaml.safe_load(cfg_path.read_text())
    layers, new = cfg["extract"]["layers"], 350
    assert new not in cfg["extract"]["timesteps"]
    cfg["extract"]["timesteps"] = [*cfg["extract"]["timesteps"], new]
    grown = cfg_path.with_name("config_new_timestep.yaml")
    grown.write_text(yaml.safe_dump(cfg))
    proc = _snakemake("-n", "--configfile", str(grown))
    jobs = planned_jobs(proc.stdout + proc.stderr)
    by_rule: dict[str, int] = {}
    for rule, _ in jobs:
        by_rule[rule] = by_rule.get(rule, 0) + 1
    per_time = {"extract", "check_sae", "train_sae", "train_diffc", "sae_gallery", "sae_spatial"}
    assert {rule: by_rule.get(rule) for rule in ("extract", "check_sae", "train_sae", "train_diffc")} == {
        "extract": 1, "check_sae": len(layers), "train_sae": len(layers), "train_diffc": len(layers)}, by_rule
    for rule, wildcards in jobs:
        if rule in per_time:
            assert wildcards.get("timestep") == str(new), (rule, wildcards)
        else:  # readers of the whole grid only
            assert rule in ("all", "atlas") or rule.startswith(("sae_summary", "sae_figure_", "diffc_summary", "diffc_figure_", "links_")), rule


def test_report_holds_every_figure(tiny_run, tmp_path):
    """`snakemake --report` packs every figure and summary table of the run, with captions."""
    import zipfile

    results, cfg_path, _ = tiny_run
    report = tmp_path / "report.zip"
    _snakemake("--configfile", str(cfg_path), "--report", str(report))
    names = zipfile.ZipFile(report).namelist()
    packed = Counter(Path(n).name for n in names if n.endswith((".png", ".csv")))
    figures = Counter(p.name for p in (results / "figures").rglob("*.png"))
    assert figures and all(packed[name] >= n for name, n in figures.items()), figures - packed
    for table in ("summary.csv", "path_lengths.csv", "meaning_summary.csv"):
        assert packed[table] >= 1, table
    # the rendered report carries the captions, with config values filled in by Jinja
    html = "".join(zipfile.ZipFile(report).read(n).decode("utf-8", "replace") for n in names if n.endswith((".html", ".js")))
    assert "k = 4" in html and "How to read it" in html


def _spatial_oracle(results: Path, run: Path):
    """Brute force with numpy: each latent's map on its top images, and the FVE per position."""
    from safetensors.numpy import load_file

    from diffatlas.activations.store import ActivationStore
    from diffatlas.sae.train import split_samples

    cfg = json.loads((run / "cfg.json").read_text())
    w = load_file(str(run / "sae.safetensors"))
    store = ActivationStore(cfg["store"])
    maps = store.spatial(cfg["layer"], cfg["timestep"]).astype(np.float64)  # [N, C, h, w]
    n, c, h, wd = maps.shape
    x = maps.reshape(n, c, h * wd).transpose(0, 2, 1) * cfg["input_scale"]  # [N, P, C]
    pre = (x - w["b_pre"]) @ w["W_enc"].T.astype(np.float64) + w["b_enc"]  # [N, P, n_latents]
    kth = np.sort(pre, axis=-1)[..., -cfg["k"]][..., None]
    z = np.where(pre >= kth, np.maximum(pre, 0), 0.0)
    x_hat = z @ w["W_dec"].astype(np.float64) + w["b_pre"]
    val = split_samples(n, cfg["split"]["val_fraction"], cfg["split"]["seed"])
    xv, xh = x[val].reshape(-1, c), x_hat[val].reshape(-1, c)
    fve = 1 - ((xv - xh) ** 2).sum() / ((xv - xv.mean(0)) ** 2).sum()
    row = {int(s): i for i, s in enumerate(store.sample_ids)}
    return z, row, fve, (h, wd)


def test_spatial_maps_match_brute_force(tiny_run):
    from safetensors.numpy import load_file

    results = tiny_run[0]
    runs = sorted((results / "sae" / "shapesworld" / "shapesworld").glob("*/t*/spatial.json"))
    assert len(runs) == 4
    checked = 0
    for rec_path in runs:
        run = rec_path.parent
        rec = json.loads(rec_path.read_text())
        z, row, fve, shape = _spatial_oracle(results, run)
        assert rec["per_position"]["fve"] == pytest.approx(fve, abs=1e-4)
        assert rec["map_shape"] == list(shape) and rec["sae_samples"] == "pooled"
        got = load_file(str(run / "spatial_maps.safetensors"))
        latents = pd.read_parquet(run / "latents.parquet")
        ranked = latents[latents["rank"] >= 0].sort_values("rank")["latent"].tolist()[: len(got["latents"])]
        assert got["latents"].tolist() == ranked
        for i, lat in enumerate(got["latents"]):
            for j, sid in enumerate(got["sample_ids"][i]):
                if sid >= 0:
                    np.testing.assert_allclose(got["maps"][i, j], z[row[int(sid)], :, lat].reshape(shape), atol=1e-4)
                    checked += 1
    assert checked > 0


def test_atlas_pages_show_the_results_numbers(tiny_run):
    from atlas_checks import check_links, values

    results = tiny_run[0]
    atlas = results / "atlas"
    assert check_links(atlas) > 10
    grid = atlas / "sae" / "shapesworld" / "shapesworld" / "grid.html"
    summary = pd.read_csv(results / "sae" / "shapesworld" / "shapesworld" / "summary.csv")
    for r in summary.to_dict("records"):
        for key in ("fve", "dead_fraction", "purity_fine"):
            where = {"data-layer": r["layer"], "data-timestep": r["timestep"], "data-metric": key}
            ((value, shown),) = values(grid, where)
            assert (np.isnan(value) and np.isnan(r[key])) or (value == pytest.approx(r[key], rel=1e-12) and shown == f"{r[key]:.3f}")
    diffc = pd.read_csv(results / "diffc" / "summary.csv")
    for r in diffc.to_dict("records"):
        where = {"data-layer": r["layer"], "data-timestep": r["timestep"], "data-metric": f"{r['method']}_{r['granularity']}"}
        ((value, _),) = values(grid, where)
        assert value == pytest.approx(r["accuracy"], rel=1e-12)
    # a latent page: purity and entropy are latents.parquet's
    run = results / "sae" / "shapesworld" / "shapesworld" / "mid" / "t600"
    latents = pd.read_parquet(run / "latents.parquet").set_index("latent")
    pages = sorted((atlas / "sae" / "shapesworld" / "shapesworld" / "mid" / "t600").glob("latent*.html"))
    assert pages
    for page in pages:
        lat = int(page.stem.removeprefix("latent"))
        for key in ("purity_fine", "entropy_fine", "purity_coarse"):
            ((value, _),) = values(page, {"data-metric": key})
            # nan_ok: a latent the links tables name gets a page even when unranked (no top-n statistics)
            assert value == pytest.approx(latents.loc[lat, key], rel=1e-12, nan_ok=True)
        for attr in ("colour", "shape", "size", "position"):  # ShapesWorld's attributes, one row each
            for key in ("purity", "purity_active"):
                ((value, _),) = values(page, {"data-attribute": attr, "data-metric": key})
                assert value == pytest.approx(latents.loc[lat, f"{key}_{attr}"], rel=1e-12, nan_ok=True)
    # DAAM: the mIoU column equals summary.csv's; world: fidelity rates equal the JSON's
    daam = pd.read_csv(results / "daam" / "shapesworld" / "real" / "shapesworld" / "summary.csv")
    shown = [v for v, _ in values(atlas / "daam" / "shapesworld" / "real_shapesworld.html", {"data-metric": "miou"})]
    assert shown == pytest.approx(daam["miou"].tolist(), rel=1e-12)
    fid = json.loads((results / "world_model" / "fidelity.json").read_text())
    for key in ("shape_accuracy", "colour_accuracy", "two_object_rate"):
        ((value, _),) = values(atlas / "world.html", {"data-measure": key, "data-metric": "rate"})
        assert value == fid[key]["rate"]
    # geometry: each strip's factor is the judge's (meaning_summary.csv)
    meaning = pd.read_csv(results / "geometry" / "shapesworld" / "meaning_summary.csv")
    html = (atlas / "geometry" / "shapesworld.html").read_text()
    for r in meaning.to_dict("records"):
        marker = f'data-timestep="{r["timestep"]}" data-mode="{r["mode"]}" data-direction="{r["direction"]}"'
        assert marker in html
        part = html.split(marker, 1)[1]
        assert part.split('data-metric="factor">', 1)[1].startswith(str(r["dominant"]))
    # geometry: the claims table carries claims.csv's values and verdicts, row by row
    claims = pd.read_csv(results / "geometry" / "shapesworld" / "claims.csv")
    table = html.split('id="claims"', 1)[1].split("</table>", 1)[0]
    shown = [float(v) for v in re.findall(r'data-column="value" data-value="([^"]+)"', table)]
    assert shown == pytest.approx(claims["value"].tolist(), nan_ok=True) and len(shown) == len(claims)
    assert re.findall(r'data-column="verdict">([^<]+)<', table) == claims["verdict"].tolist()
    # interventions: every rate of the experiment's rates.csv, with its interval, in its row
    page = atlas / "intervene" / "shapesworld.html"
    rates = pd.read_csv(results / "intervene" / "shapesworld" / "experiment" / "mid" / "t600" / "rates.csv")
    for r in rates.to_dict("records"):
        row = {"data-attribute": r["attribute"], "data-word": r["value"], "data-experiment": r["experiment"],
               "data-condition": r["condition"], "data-alpha": str(float(r["alpha"])), "data-column": "rate"}
        assert [v for v, _ in values(page, row)] == pytest.approx([r["rate"], r["ci_low"], r["ci_high"]], rel=1e-12)
    # links: the agreement rows are directions_agreement.csv's
    agree = pd.read_csv(results / "links" / "shapesworld" / "shapesworld" / "directions_agreement.csv", dtype={"timestep": str})
    page = atlas / "links" / "shapesworld" / "shapesworld.html"
    for r in agree.to_dict("records"):
        row = {"data-table": "agreement", "data-measure": r["measure"], "data-layer": r["layer"], "data-timestep": r["timestep"]}
        shown = [v for v, _ in values(page, {**row, "data-column": "agreement"})]
        assert shown == pytest.approx([r["agreement"], r["low"], r["high"]], rel=1e-12, nan_ok=True)


def test_atlas_in_a_headless_browser(tiny_run, tmp_path):
    from atlas_checks import browser_check

    visited = browser_check(tiny_run[0] / "atlas", tmp_path / "screenshots")
    assert len(visited) == 8  # index, grid, SAE run, latent, DAAM, geometry, interventions, links
    assert all((tmp_path / "screenshots" / f"{n}.png").stat().st_size > 1000
               for n in ("index", "latent", "daam", "geometry", "intervene", "links"))


def test_links_tables_agree_with_their_sources(tiny_run):
    """The links stage on the tiny run: its DAAM-vs-truth IoUs are the DAAM stage's own, and the
    direction table covers every (measure, SAE run, geometry timestep, direction)."""
    results = tiny_run[0]
    links = results / "links" / "shapesworld" / "shapesworld"
    rows = pd.read_parquet(links / "sae_daam.parquet")
    daam = pd.read_parquet(results / "daam" / "shapesworld" / "real" / "shapesworld" / "iou_rows.parquet")
    daam = daam[(daam["method"] == "daam") & np.isclose(daam["tau"], 0.4)]
    own = {(int(r.sample_id), str(r.word).lower(), int(r.object)): r.iou for r in daam.itertuples()}
    # DAAM scored its float32 maps; the run stores them as float16, which the link reads: pixels at
    # the threshold may flip (one pixel of a 32x32 mask moves an IoU by ~1e-3), nothing more
    diff = np.array([abs(r.iou_daam_true - own[(r.sample_id, r.word, r.object)]) for r in rows.itertuples()])
    assert len(rows) == 0 or diff.max() < 0.01, diff
    for r in rows.itertuples():
        assert 0 <= r.iou_sae_daam <= 1 and 0 <= r.iou_sae_true <= 1
    table = pd.read_csv(links / "directions.csv")
    # 2 measures x (2 layers x 2 SAE times) x 2 geometry times (999, 500) x 1 edit direction
    assert len(table) == 16 and set(table["measure"]) == {"raw", "relative"}
    agree = pd.read_csv(links / "directions_agreement.csv")
    for measure, part in table.groupby("measure"):
        pooled = agree[(agree["measure"] == measure) & (agree["layer"] == "all")].iloc[0]
        scored = part[part["scored"]]
        assert (pooled.n, pooled.not_scored, pooled.k) == (len(scored), len(part) - len(scored), int(scored["agree"].sum()))
