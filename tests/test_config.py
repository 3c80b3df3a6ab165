"""The workflow config is checked by JSON Schema with messages that name the key."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from diffatlas.config import check_timesteps, load_config, validate_config
from diffatlas.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def default_config() -> dict:
    return yaml.safe_load((ROOT / "config.yaml").read_text())


def test_default_config_is_valid_and_gets_defaults(default_config):
    cfg = validate_config(default_config)
    assert cfg["results"] == "results"
    # defaults from the schema are filled in, and the given values are kept
    assert cfg["extract"]["pooling"] in ("mean", "sum")
    assert cfg["extract"]["layers"] == default_config["extract"]["layers"]
    assert cfg["datasets"]["shapesworld"]["image_size"] == 32
    # the input is not modified
    assert default_config == yaml.safe_load((ROOT / "config.yaml").read_text())


def _error(cfg: dict) -> str:
    with pytest.raises(UserError) as info:
        validate_config(cfg)
    return str(info.value)


def test_typo_key_is_named_with_suggestion(default_config):
    cfg = copy.deepcopy(default_config)
    cfg["extract"]["lyaers"] = cfg["extract"].pop("layers")
    msg = _error(cfg)
    assert "'lyaers'" in msg and "did you mean 'layers'" in msg and "in extract" in msg


def test_top_level_typo(default_config):
    cfg = copy.deepcopy(default_config)
    cfg["devise"] = "cpu"
    msg = _error(cfg)
    assert "'devise'" in msg and "'device'" in msg


def test_wrong_type_names_key_and_type(default_config):
    cfg = copy.deepcopy(default_config)
    cfg["extract"]["batch_size"] = "big"
    msg = _error(cfg)
    assert "extract.batch_size" in msg and "'big'" in msg and "integer" in msg


def test_unknown_layer_alias_lists_allowed(default_config):
    cfg = copy.deepcopy(default_config)
    cfg["extract"]["layers"] = ["mid", "up_ft9"]
    msg = _error(cfg)
    assert "extract.layers[1]" in msg and "'up_ft9'" in msg and "up_ft0..up_ft3" in msg
    cfg["extract"]["layers"] = ["mdi"]
    assert "extract.layers[0] = 'mdi'" in _error(cfg)


def test_module_path_glob_is_a_valid_layer(default_config):
    cfg = copy.deepcopy(default_config)
    cfg["extract"]["layers"] = ["up_blocks.1.attentions.*", "block3", "down_ft0"]
    assert validate_config(cfg)["extract"]["layers"][0] == "up_blocks.1.attentions.*"


def test_timestep_out_of_range(default_config, tmp_path):
    cfg = copy.deepcopy(default_config)
    cfg["extract"]["timesteps"] = [10, -1]
    msg = _error(cfg)
    assert "extract.timesteps[1]" in msg and "-1" in msg and "0..T-1" in msg
    # The upper end depends on the model: T is read from its scheduler config.
    model = tmp_path / "m"
    (model / "scheduler").mkdir(parents=True)
    (model / "scheduler" / "scheduler_config.json").write_text('{"num_train_timesteps": 500}')
    cfg["extract"]["timesteps"] = [10, 499, 500]
    with pytest.raises(UserError) as info:
        check_timesteps(validate_config(cfg), {"shapesworld": str(model)})
    assert "extract.timesteps[2] = 500" in str(info.value) and "0..499" in str(info.value)
    cfg["extract"]["timesteps"] = [10, 999]
    check_timesteps(validate_config(cfg), {"shapesworld": str(tmp_path / "not-built-yet")})  # T defaults to 1000


def test_geometry_timesteps_are_checked_against_the_model(default_config, tmp_path):
    model = tmp_path / "m"
    (model / "scheduler").mkdir(parents=True)
    (model / "scheduler" / "scheduler_config.json").write_text('{"num_train_timesteps": 500}')
    cfg = copy.deepcopy(default_config)
    cfg["extract"]["timesteps"] = [10]
    cfg["geometry"].update(timesteps=[100], iterative_timesteps=[100], global_timestep=499)
    check_timesteps(validate_config(cfg), {"shapesworld": str(model)})  # all inside 0..499
    cfg["geometry"]["global_timestep"] = 999
    with pytest.raises(UserError) as info:
        check_timesteps(validate_config(cfg), {"shapesworld": str(model)})
    assert "geometry.global_timestep = 999" in str(info.value) and "0..499" in str(info.value)
    cfg["geometry"].update(global_timestep=499, iterative_timesteps=[100, 700])
    with pytest.raises(UserError) as info:
        check_timesteps(validate_config(cfg), {"shapesworld": str(model)})
    assert "geometry.iterative_timesteps[1] = 700" in str(info.value)


def test_bad_enum_lists_allowed(default_config):
    cfg = copy.deepcopy(default_config)
    cfg["extract"]["pooling"] = "max"
    msg = _error(cfg)
    assert "extract.pooling" in msg and "mean, sum" in msg


def test_dataset_kind_specific_keys(default_config):
    cfg = copy.deepcopy(default_config)
    cfg["datasets"]["photos"] = {"kind": "image_folder"}
    assert "'path' is a required property" in _error(cfg)
    cfg["datasets"]["photos"] = {"kind": "image_folder", "path": "/x", "n_samples": 3}
    assert "'n_samples'" in _error(cfg)
    cfg["datasets"]["photos"] = {"kind": "image_folder", "path": "/x", "on_bad_image": "ignore"}
    assert "error, skip" in _error(cfg)


def test_reference_to_unknown_model(default_config):
    cfg = copy.deepcopy(default_config)
    cfg["extract"]["models"] = ["sd15"]
    msg = _error(cfg)
    assert "extract.models[0]" in msg and "'sd15'" in msg and "shapesworld" in msg


def test_load_config_names_the_file(tmp_path):
    bad = tmp_path / "c.yaml"
    bad.write_text("datasets: {a: {kind: shapesworld}}\nmodels: {m: {path: x}}\nextract: {timesteps: [-1], models: [m], datasets: [a]}\n")
    with pytest.raises(UserError, match=str(bad)):
        load_config(bad)
    with pytest.raises(UserError, match="not found"):
        load_config(tmp_path / "missing.yaml")
