"""``diffatlas check-sae`` (rule check_sae): an SAE setting that cannot work fails from the store's
metadata, before the GPU job; a setting that works gives the architecture training will use."""

from __future__ import annotations

import json
import re

import pytest
from test_sae_cli import D, FAST, N, make_store

from diffatlas.cli import main as cli


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("act") / "toyset.zarr")


@pytest.mark.parametrize("layer, channels", [("mid", D), ("up_ft0", 2 * D)])
def test_check_records_the_architecture_of_the_stored_layer(store, tmp_path, layer, channels):
    out = tmp_path / "arch.json"
    # make_store wrote mid with D channels and up_ft0 with 2D: n_latents = expansion x that,
    # k_aux = channels // 2 (aux_k: null)
    rc = cli(["check-sae", "--store", str(store), "--layer", layer, "--timestep", "500", "--out", str(out),
              "--set", "k=5", "--set", "expansion=3"])
    assert rc == 0
    arch = json.loads(out.read_text())
    assert (arch["d_in"], arch["n_latents"], arch["k"], arch["k_aux"]) == (channels, 3 * channels, 5, channels // 2)
    assert arch["n_samples"] == N and arch["positions_per_sample"] == 1


def test_check_counts_positions_of_spatial_samples(store, tmp_path):
    out = tmp_path / "arch.json"
    rc = cli(["check-sae", "--store", str(store), "--layer", "mid", "--timestep", "10", "--out", str(out),
              "--set", "samples=\"spatial\""])
    assert rc == 0
    assert json.loads(out.read_text())["positions_per_sample"] == 3 * 3  # make_store's HW x HW maps


@pytest.mark.parametrize(
    "args, message",
    [
        # k equal to n_latents = 3 x 16: what a retry with more time and memory cannot fix
        (["--layer", "mid", "--timestep", "10", "--set", "k=48", "--set", "expansion=3"],
         r"sae\.k = 48 .*n_latents = 48 \(sae\.expansion 3 × 16 channels of layer 'mid'\)"),
        (["--layer", "mid", "--timestep", "10", "--set", "k=4", "--set", "aux_k=49", "--set", "expansion=3"],
         r"sae\.aux_k = 49 .*<= n_latents = 48"),
        (["--layer", "nope", "--timestep", "10"], r"layer 'nope' is not in .*stored layers: mid, up_ft0"),
        (["--layer", "mid", "--timestep", "77"], r"timestep 77 is not in .*stored timesteps: 10, 500"),
        (["--layer", "up_ft0", "--timestep", "10", "--set", "samples=\"spatial\""], r"without spatial maps"),
    ],
)
def test_check_refuses_what_training_would_refuse(store, tmp_path, capsys, args, message):
    out = tmp_path / "arch.json"
    rc = cli(["check-sae", "--store", str(store), "--out", str(out), *args])
    err = capsys.readouterr().err
    assert rc == 2 and re.search(message, err), err
    assert "Traceback" not in err and not out.exists()
    # train-sae, given the same settings, fails the same way (only later, on the GPU node)
    rc = cli(["train-sae", "--store", str(store), "--out", str(tmp_path / "sae"), *FAST[:-4], *args])
    err = capsys.readouterr().err
    assert rc == 2 and re.search(message, err), err
    assert not (tmp_path / "sae").exists()
