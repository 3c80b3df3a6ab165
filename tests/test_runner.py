"""The one command runner: every command parses the shared flags the same way, model commands
take ``--revision`` and load that revision, and a revision that is not cached is one clear error."""

from __future__ import annotations

import importlib
import json
import shutil

import pytest

from diffatlas.cli import available_commands, main as cli
from diffatlas.errors import UserError
from diffatlas.runner import Runner

COMMIT = "0123456789abcdef0123456789abcdef01234567"
MODEL_COMMANDS = ("extract", "daam-generate", "daam-real", "geometry", "geometry-global", "geometry-paths", "world-fidelity")
SECTION_COMMANDS = MODEL_COMMANDS + ("train-sae", "train-diffc", "train-world-model", "daam-figure")


def _runner(name):
    return importlib.import_module(f"diffatlas.commands.{name.replace('-', '_')}").RUNNER


def test_every_command_builds_its_parser_through_the_runner():
    for name in available_commands():
        r = _runner(name)
        assert isinstance(r, Runner) and r.prog == name
        opts = {o for a in r.parser()._actions for o in a.option_strings}
        if name in MODEL_COMMANDS:
            assert {"--model", "--model-name", "--revision", "--device", "--threads"} <= opts, name
        if name in SECTION_COMMANDS:
            assert {"--config-json", "--config", "--set"} <= opts, name


def test_section_from_json_yaml_set_and_own_flags(tmp_path):
    from diffatlas.sae.config import SAEConfig

    r = Runner("x", section=SAEConfig)
    args = r.parser().parse_args(["--config-json", '{"k": 8, "lr": 0.01}', "--set", "k=16", "--set", "samples=spatial"])
    cfg = r.config(args, {"steps": 7, "seed": None})
    assert (cfg.k, cfg.lr, cfg.samples, cfg.steps, cfg.seed) == (16, 0.01, "spatial", 7, SAEConfig().seed)
    (tmp_path / "c.yaml").write_text(
        "datasets: {shapesworld: {kind: shapesworld}}\nmodels: {shapesworld: {path: x}}\nsae: {k: 5}\nworld_model: {fidelity: {n_two: 3}}\n"
    )
    assert r.config(r.parser().parse_args(["--config", str(tmp_path / "c.yaml")])).k == 5
    from diffatlas.world.config import FidelityConfig

    rf = Runner("y", section=FidelityConfig)
    assert rf.config(rf.parser().parse_args(["--config", str(tmp_path / "c.yaml")])).n_two == 3
    with pytest.raises(UserError, match="--set 'k' is not key=value"):
        r.config(r.parser().parse_args(["--set", "k"]))
    with pytest.raises(UserError, match="not valid JSON"):
        r.config(r.parser().parse_args(["--config-json", "{k"]))
    with pytest.raises(UserError, match=r"unknown config key\(s\) in sae: kk"):
        r.config(r.parser().parse_args(["--set", "kk=1"]))


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory):
    """A tiny model laid out as the Hugging Face cache stores a download of one commit."""
    from diffatlas.models.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("hub")
    model = make_tiny_model("pixel", root / "model", seed=0)
    snap = root / "hub" / "models--diffatlas-test--tiny-world" / "snapshots" / COMMIT
    shutil.copytree(model, snap)
    return root


def test_daam_generate_loads_the_given_revision(hub_cache, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub_cache / "hub"))
    out = hub_cache / "out"
    cfg = json.dumps({"steps": 2, "batch_size": 2, "prompt_sets": {"caps": {"kind": "shapesworld_captions", "n_prompts": 2}}})
    common = ["--model", "diffatlas-test/tiny-world", "--revision", COMMIT, "--model-name", "tiny",
              "--config-json", cfg, "--device", "cpu", "--threads", "1"]
    assert cli(["daam-generate", "--prompt-set", "caps", "--out", str(out), *common]) == 0
    info = json.loads((out / "run" / "info.json").read_text())
    assert info["model"]["revision"] == COMMIT


def test_uncached_revision_is_one_clear_error(hub_cache, monkeypatch, capsys):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub_cache / "hub"))
    bad = "f" * 40
    rc = cli(["geometry", "--model", "diffatlas-test/tiny-world", "--revision", bad, "--timestep", "999",
              "--out", str(hub_cache / "g"), "--device", "cpu", "--threads", "1"])
    err = capsys.readouterr().err
    assert rc == 2
    assert f"revision '{bad}' of model 'diffatlas-test/tiny-world' is not in the local Hugging Face cache" in err
    assert COMMIT in err  # the cached revision is named
    assert not (hub_cache / "g").exists()
