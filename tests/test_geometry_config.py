"""GeometryConfig: defaults, validation messages, the config.yaml section."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from diffatlas.errors import UserError
from diffatlas.geometry.config import GeometryConfig

ROOT = Path(__file__).resolve().parents[1]


def test_config_yaml_section_is_valid():
    section = yaml.safe_load((ROOT / "config.yaml").read_text())["geometry"]
    cfg = GeometryConfig.from_dict(section)
    assert 0.0 in cfg.strengths and cfg.strengths == sorted(cfg.strengths)


@pytest.mark.parametrize(
    "key,value,needle",
    [
        ("pooling", "max", "geometry.pooling"),
        ("n_directions", 0, "geometry.n_directions"),
        ("kappa", 1.5, "geometry.kappa"),
        ("tol", 0, "geometry.tol"),
        ("timesteps", [999, -5], "geometry.timesteps"),
        ("edit_directions", 9, "geometry.edit_directions"),
        ("batching", "threads", "geometry.batching"),
    ],
)
def test_bad_values_name_the_key(key, value, needle):
    with pytest.raises(UserError, match=needle):
        GeometryConfig.from_dict({key: value})


def test_unknown_key_and_overrides():
    with pytest.raises(UserError, match="n_direction"):
        GeometryConfig.from_dict({"n_direction": 3})
    cfg = GeometryConfig.from_args('{"n_directions": 5}', ["tol=1e-4", "layer=up_ft0"])
    assert (cfg.n_directions, cfg.tol, cfg.layer) == (5, 1e-4, "up_ft0")
    with pytest.raises(UserError, match="not valid JSON"):
        GeometryConfig.from_args("{bad", [])
