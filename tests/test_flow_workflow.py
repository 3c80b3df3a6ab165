"""Per-model time lists with a flow-matching model: a UNet at steps and SD3 at sigmas side by
side in one run's extraction (dry run: the planned jobs and their --timestep arguments)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_extraction_takes_a_flow_models_sigmas_and_sae_still_refuses_them(tmp_path):
    """A UNet at steps and SD3 at sigmas in one config: extraction (parsed first) plans SD3's
    sigmas, so the run is stopped by the SAE stage, which supports training steps only (SAE and
    Diff-C train on every extracted model: lifting that is issue 21 item 5)."""
    from diffatlas.models.tiny import make_tiny_model

    cfg = yaml.safe_load((ROOT / "tests" / "workflow" / "tiny_config.yaml").read_text())
    cfg["results"] = str(tmp_path / "results")
    cfg["models"] = {"unet": {"path": str(make_tiny_model("pixel", tmp_path / "pixel"))},
                     "sd3": {"path": str(make_tiny_model("sd3", tmp_path / "sd3")), "timesteps": ["s0.250", "s0.800"]}}
    cfg["extract"].update(models=["unet", "sd3"], timesteps=[100])
    for section in ("geometry", "daam"):
        cfg[section]["models"] = ["unet"]
    cfg["geometry"]["meaning_models"] = []
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, DIFFATLAS_NO_PROGRESS="1")
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    proc = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--cores", "1", "--configfile", str(path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "model sd3: sae times ['s0.250', 's0.800'] are flow-matching sigmas" in out, out[-3000:]
    assert "extraction times" not in out and "Traceback" not in out, out[-3000:]
