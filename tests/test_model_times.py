"""A model's own time list (models.<name>.timesteps) drives its extract, SAE, Diff-C and
geometry jobs; the global lists stay the default for the others (issue 14, item 1).

Dry runs only: the planned jobs' wildcards are read from Snakemake's own output and compared
with the lists written into the config by hand.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from dryrun import planned_jobs

ROOT = Path(__file__).resolve().parents[1]


def _dry_run(cfg: dict, tmp: Path) -> subprocess.CompletedProcess:
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, DIFFATLAS_NO_PROGRESS="1")
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    cmd = [sys.executable, "-m", "snakemake", "-n", "--cores", "1", "--configfile", str(path)]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)



@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    """The tiny workflow config with two tiny models: 'own' sets its own times, 'plain' not."""
    from diffatlas.models.tiny import make_tiny_model

    tmp = tmp_path_factory.mktemp("model_times")
    model = make_tiny_model("pixel", tmp / "tiny_model", seed=0)
    cfg = yaml.safe_load((ROOT / "tests" / "workflow" / "tiny_config.yaml").read_text())
    cfg["results"] = str(tmp / "results")
    cfg["models"] = {"own": {"path": str(model), "timesteps": [100]}, "plain": {"path": str(model)}}
    cfg["extract"].update(models=["own", "plain"], timesteps=[300, 600])
    cfg["geometry"].update(models=["own", "plain"], timesteps=[800, 500], global_timestep=999, meaning_models=[])
    cfg["daam"]["models"] = ["plain"]
    return cfg, tmp


def test_a_models_own_times_drive_its_jobs(two_models):
    cfg, tmp = two_models
    proc = _dry_run(cfg, tmp)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    planned: dict[tuple[str, str], set[str]] = {}
    for rule, wc in planned_jobs(proc.stdout + proc.stderr):
        if rule in ("extract", "train_sae", "train_diffc", "geometry_basis"):
            planned.setdefault((rule, wc["model"]), set()).add(wc["timestep"])
    # own: [100] for every stage (+ global_timestep 999 for geometry); plain: the global lists
    assert planned == {
        ("extract", "own"): {"100"},
        ("train_sae", "own"): {"100"},
        ("train_diffc", "own"): {"100"},
        ("geometry_basis", "own"): {"100", "999"},
        ("extract", "plain"): {"300", "600"},
        ("train_sae", "plain"): {"300", "600"},
        ("train_diffc", "plain"): {"300", "600"},
        ("geometry_basis", "plain"): {"800", "500", "999"},
    }, planned


def test_section_list_wins_and_must_be_extracted_for_the_model(two_models):
    cfg, tmp = two_models
    cfg = yaml.safe_load(yaml.safe_dump(cfg))
    cfg["sae"]["timesteps"] = [600]  # extracted for plain, not for own (whose list is [100])
    proc = _dry_run(cfg, tmp)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "sae.timesteps = [600] are not extracted for model own" in out, out[-3000:]


def _flow_matching_copy(model: str, tmp: Path) -> str:
    """The tiny model with a flow-matching scheduler config, whose times are sigmas."""
    flow = tmp / "tiny_flow_model"
    if not flow.exists():
        shutil.copytree(model, flow)
        sched = flow / "scheduler" / "scheduler_config.json"
        sched.write_text(json.dumps({**json.loads(sched.read_text()), "_class_name": "FlowMatchEulerDiscreteScheduler"}))
    return str(flow)


def test_a_flow_models_sigmas_name_its_sae_and_diffc_jobs_by_sigma_times_T(two_models):
    """SAE and Diff-C run a flow-matching model at its sigmas, named like its stores by the
    scheduler's timestep sigma * T (s0.500 -> t500; T = 1000 from the scheduler config)."""
    cfg, tmp = two_models
    cfg = yaml.safe_load(yaml.safe_dump(cfg))
    cfg["models"]["own"] = {"path": _flow_matching_copy(cfg["models"]["own"]["path"], tmp), "timesteps": ["s0.500"]}
    cfg["geometry"]["models"] = ["plain"]  # geometry noises with ᾱ: training steps only
    proc = _dry_run(cfg, tmp)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    planned = {(rule, wc["timestep"]) for rule, wc in planned_jobs(out)
               if rule in ("extract", "train_sae", "train_diffc") and wc.get("model") == "own"}
    assert planned == {("extract", "500"), ("train_sae", "500"), ("train_diffc", "500")}, planned

