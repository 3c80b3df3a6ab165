"""One run with a UNet at training steps and flow-matching models (SD3, Flux) at sigmas, each
with its own layer list: the real workflow (not a dry run) through extraction, SAE and Diff-C
on tiny models (issue 21, items 2 and 5).

Checked: the planned grid follows each model's own layers and times; every artifact records
the model's time (sigma and the scheduler's timestep sigma * T, or the step with its ᾱ); the
SD3 store equals a plain forward pass with a hook on the block, at the input noised by hand with
the flow rule x_σ = (1 − σ) x0 + σ ε; Diff-C's recorded accuracy equals a recount of its
predictions.csv; a per-model layer the family lacks is refused naming the key and its aliases.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from dryrun import planned_jobs

ROOT = Path(__file__).resolve().parents[1]

SD3_LAYERS = ["block1.image", "block0.text"]  # block1 is SD3's last: it has no .text
FLUX_LAYERS = ["single_block0"]
SD3_SIGMAS = {"s0.250": 250, "s0.800": 800}  # sigma -> the store's name, sigma * T (T = 1000)
FLUX_SIGMAS = {"s0.500": 500}


def _snakemake(cfg: dict, tmp: Path, *args: str) -> subprocess.CompletedProcess:
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, DIFFATLAS_NO_PROGRESS="1", OMP_NUM_THREADS="1")
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    cmd = [sys.executable, "-m", "snakemake", "--cores", "2", *args, "--configfile", str(path)]  # --configfile takes several
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def flow_run(tmp_path_factory):
    """The tiny workflow config with a tiny UNet, SD3 and Flux, each with its own lists."""
    from diffatlas.models.tiny import make_tiny_model

    tmp = tmp_path_factory.mktemp("flow_workflow")
    cfg = yaml.safe_load((ROOT / "tests" / "workflow" / "tiny_config.yaml").read_text())
    cfg["results"] = str(tmp / "results")
    cfg["datasets"]["shapesworld"]["n_samples"] = 40
    cfg["models"] = {
        "unet": {"path": str(make_tiny_model("pixel", tmp / "pixel"))},
        "sd3": {"path": str(make_tiny_model("sd3", tmp / "sd3")), "timesteps": list(SD3_SIGMAS), "layers": SD3_LAYERS},
        "flux": {"path": str(make_tiny_model("flux", tmp / "flux")), "timesteps": list(FLUX_SIGMAS), "layers": FLUX_LAYERS},
    }
    cfg["extract"].update(models=["unet", "sd3", "flux"], layers=["mid"], timesteps=[100])
    # DAAM on all three (joint attention on SD3 and Flux); geometry (tests/test_geometry_flow.py)
    # and steering stay on the UNet here
    cfg["daam"].update(models=["unet", "sd3", "flux"], real_sigma="s0.700")
    for section in ("geometry", "intervene"):
        cfg[section]["models"] = ["unet"]
    cfg["intervene"]["dataset"] = "shapesworld"
    cfg["geometry"]["meaning_models"] = []
    return cfg, tmp


def test_the_plan_follows_each_models_layers_and_times(flow_run):
    cfg, tmp = flow_run
    proc = _snakemake(cfg, tmp, "-n")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    planned: dict[tuple[str, str], set[tuple[str, str]]] = {}
    for rule, wc in planned_jobs(out):
        if rule in ("train_sae", "train_diffc", "sae_spatial"):
            planned.setdefault((rule, wc["model"]), set()).add((wc["layer"], wc["timestep"]))
        elif rule == "extract":
            planned.setdefault((rule, wc["model"]), set()).add(("*", wc["timestep"]))
    grid = lambda layers, times: {(l, str(t)) for l in layers for t in times}
    assert planned[("extract", "sd3")] == grid(["*"], SD3_SIGMAS.values())
    assert planned[("extract", "flux")] == grid(["*"], FLUX_SIGMAS.values())
    assert planned[("extract", "unet")] == grid(["*"], [100])
    assert planned[("train_sae", "sd3")] == grid(SD3_LAYERS, SD3_SIGMAS.values())
    assert planned[("train_sae", "flux")] == grid(FLUX_LAYERS, FLUX_SIGMAS.values())
    assert planned[("train_sae", "unet")] == grid(["mid"], [100])
    # the text-token stream has no map: no Diff-C, no spatial SAE maps on it
    assert planned[("train_diffc", "sd3")] == grid(["block1.image"], SD3_SIGMAS.values())
    assert planned[("sae_spatial", "sd3")] == grid(["block1.image"], SD3_SIGMAS.values())
    assert planned[("train_diffc", "flux")] == grid(FLUX_LAYERS, FLUX_SIGMAS.values())


def test_extraction_sae_and_diffc_run_on_flow_stores(flow_run):
    cfg, tmp = flow_run
    res = Path(cfg["results"])
    targets = [str(res / "diffc" / "summary.csv"), str(res / "figures" / "diffc" / "shapesworld" / "models_accuracy_vs_timestep.png"),
               str(res / "figures" / "sae" / "shapesworld" / "label_stats_across_models.png")]
    for m, layers, times in (("sd3", SD3_LAYERS[:1], SD3_SIGMAS.values()), ("flux", FLUX_LAYERS, FLUX_SIGMAS.values())):
        targets += [str(res / "sae" / m / "shapesworld" / l / f"t{t}" / "spatial.json") for l in layers for t in times]
        targets.append(str(res / "figures" / "sae" / m / "shapesworld" / "label_stats_vs_timestep.png"))
        # DAAM on real images (noised to daam.real_sigma) and on generated captions, scored
        targets += [str(res / "daam" / m / "real" / "shapesworld"), str(res / "daam" / m / "prompts" / "captions"),
                    str(res / "figures" / "daam" / m / "miou.png")]
    proc = _snakemake(cfg, tmp, *targets)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    for t in targets:
        assert Path(t).exists(), t
    for m in ("sd3", "flux"):
        for run in ("real/shapesworld", "prompts/captions"):
            assert (res / "daam" / m / run / "summary.csv").exists(), (m, run)
    # the DAAM runs traced the joint attention of their own family, from the configured sigma
    for m in ("sd3", "flux"):
        info = json.loads((res / "daam" / m / "real" / "shapesworld" / "run" / "info.json").read_text())
        assert info["joint_attention"]["family"] == m
        assert info["sigma_start"] == pytest.approx(0.7)
        generated = json.loads((res / "daam" / m / "prompts" / "captions" / "run" / "info.json").read_text())
        assert generated["joint_attention"]["family"] == m

    # every artifact records the model's own time: sigma and sigma * T, or the step and ᾱ
    for m, layers, times in (("sd3", SD3_LAYERS, SD3_SIGMAS), ("flux", FLUX_LAYERS, FLUX_SIGMAS), ("unet", ["mid"], {"t100": 100})):
        for layer in layers:
            for name, step in times.items():
                run = res / "sae" / m / "shapesworld" / layer / f"t{step}"
                records = [json.loads((run / "metrics.json").read_text()), json.loads((run / "cfg.json").read_text())]
                if (run / "spatial.json").exists():
                    records.append(json.loads((run / "spatial.json").read_text()))
                if not layer.endswith(".text"):
                    records.append(json.loads((res / "diffc" / m / "shapesworld" / layer / f"t{step}" / "metrics.json").read_text()))
                for rec in records:
                    assert rec["timestep"] == step and rec["time"] == name, (m, layer, rec.get("time"))
                    if m == "unet":
                        assert rec["sigma"] is None and 0 < rec["alpha_bar"] < 1 and "alpha_bar" in rec["noising_rule"]
                    else:
                        assert rec["sigma"] == pytest.approx(step / 1000) and rec["alpha_bar"] is None
                        assert rec["time_convention"] == "sigma" and "(1 - sigma) * x0" in rec["noising_rule"]
    summary = pd.read_csv(res / "sae" / "sd3" / "shapesworld" / "summary.csv")
    assert set(zip(summary["layer"], summary["timestep"], summary["sigma"])) == {
        (l, t, t / 1000) for l in SD3_LAYERS for t in SD3_SIGMAS.values()}
    diffc = pd.read_csv(res / "diffc" / "summary.csv")
    flux = diffc[diffc["model"] == "flux"]
    assert set(zip(flux["layer"], flux["timestep"], flux["sigma"])) == {(l, 500, 0.5) for l in FLUX_LAYERS}
    assert diffc[diffc["model"] == "unet"]["sigma"].isna().all()

    # Diff-C's recorded test accuracy is the share of its test predictions that are right
    for m, layer, step in (("sd3", "block1.image", 800), ("flux", "single_block0", 500)):
        run = res / "diffc" / m / "shapesworld" / layer / f"t{step}"
        metrics = json.loads((run / "metrics.json").read_text())
        pred = pd.read_csv(run / "predictions.csv")
        for gran, entry in metrics["results"].items():
            test = pred[(pred["split"] == "test") & (pred["granularity"] == gran)]
            for method in ("diffc", "probe"):
                assert entry[method]["accuracy"] == pytest.approx(float((test["true"] == test[method]).mean()))

    _sd3_store_is_a_hooked_forward_at_the_flow_noised_input(cfg, res)


def _sd3_store_is_a_hooked_forward_at_the_flow_noised_input(cfg: dict, res: Path) -> None:
    """Oracle for the store the workflow wrote: x_σ = (1 − σ) x0 + σ ε written out here, one
    plain forward pass with a hook on transformer_blocks[1], its image tokens averaged."""
    from diffatlas.activations.noise import sample_noise
    from diffatlas.activations.store import ActivationStore
    from diffatlas.data.dataset import load_dataset
    from diffatlas.models.diffusion import images_to_tensor
    from diffatlas.models.loader import load_model

    store = ActivationStore(res / "activations" / "sd3" / "shapesworld")
    assert store.timesteps.tolist() == [250, 800] and store.sigma.tolist() == [0.25, 0.8]
    assert store.layers == SD3_LAYERS and not store.has_spatial("block0.text")
    data = load_dataset(res / "data" / "shapesworld")
    rows = [0, 1, 2]
    ids = [int(store.sample_ids[r]) for r in rows]
    where = {int(s): i for i, s in enumerate(data.sample_ids)}
    images = np.stack([data.images[where[i]] for i in ids])
    h = load_model(cfg["models"]["sd3"]["path"])
    sigma = 0.8
    x0 = h.encode_images(images_to_tensor(images, cfg["datasets"]["shapesworld"]["image_size"]))
    eps = sample_noise(ids, 800, tuple(x0.shape[1:]), seed=cfg["extract"].get("seed", 0))
    x_t = (1 - sigma) * x0 + sigma * eps
    seen = []
    hook = h.denoiser.transformer_blocks[1].register_forward_hook(lambda mod, i, o: seen.append(o[1]))
    try:
        with torch.no_grad():
            h.model_output(x_t, sigma, h.conditioning([""] * len(rows)))
    finally:
        hook.remove()
    torch.testing.assert_close(torch.as_tensor(store.pooled("block1.image", "s0.800")[rows]), seen[0].mean(1), rtol=1e-4, atol=1e-5)


def test_a_per_model_layer_the_family_lacks_is_refused(flow_run):
    cfg, tmp = flow_run
    cfg = yaml.safe_load(yaml.safe_dump(cfg))
    cfg["models"]["sd3"]["layers"] = ["block0", "mid"]  # a UNet's block
    proc = _snakemake(cfg, tmp, "-n")
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "models.sd3.layers" in out and "'mid'" in out and "block0.image" in out and "block1.image" in out, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
