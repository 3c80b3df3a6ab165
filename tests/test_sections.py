"""Every config section: config.schema.yaml agrees with its dataclass (the one source of the
defaults), every key is documented in both, and the rules' per-job key lists cover every key.

The oracle is the schema file as the user reads it, parsed by yaml, against the dataclass
defaults; no value is copied into this test.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
from pathlib import Path

import pytest
import yaml

from diffatlas.activations.config import ExtractConfig
from diffatlas.daam.config import DAAMConfig
from diffatlas.diffc.config import DiffCConfig
from diffatlas.errors import UserError
from diffatlas.geometry.config import GeometryConfig
from diffatlas.interventions.config import InterventionConfig
from diffatlas.links.config import LinksConfig
from diffatlas.sae.config import SAEConfig
from diffatlas.sections import ConfigSection
from diffatlas.world.config import FidelityConfig, WorldModelConfig

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = yaml.safe_load((ROOT / "config.schema.yaml").read_text())
SECTIONS = [ExtractConfig, SAEConfig, DiffCConfig, DAAMConfig, GeometryConfig, InterventionConfig, LinksConfig, WorldModelConfig, FidelityConfig]


def schema_properties(section: str) -> dict:
    node = SCHEMA
    for part in section.split("."):
        node = node["properties"][part]
    return node["properties"]


def field_docstrings(cls) -> dict[str, str]:
    """The string literal under each field of the dataclass body (its documentation)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, after in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant):
            docs[node.target.id] = str(after.value.value)
    return docs


def test_every_section_dataclass_is_listed_here():
    """A new ConfigSection subclass must join SECTIONS (so the checks below cover it)."""
    import diffatlas.activations.config, diffatlas.daam.config, diffatlas.diffc.config  # noqa: F401, E401
    import diffatlas.geometry.config, diffatlas.sae.config, diffatlas.world.config  # noqa: F401, E401
    import diffatlas.interventions.config  # noqa: F401

    def subclasses(c):
        return set(c.__subclasses__()).union(*(subclasses(s) for s in c.__subclasses__()))

    assert {c for c in subclasses(ConfigSection) if dataclasses.is_dataclass(c)} == set(SECTIONS)
    # and they are the schema's sections: the top level's objects with fixed keys
    top = {k for k, v in SCHEMA["properties"].items() if v.get("type") == "object" and "properties" in v}
    assert top == {c.SECTION.split(".")[0] for c in SECTIONS}
    assert set(SCHEMA["properties"]["world_model"]["properties"]) - {"source"} == {"train", "fidelity"}


@pytest.mark.parametrize("cls", SECTIONS, ids=lambda c: c.SECTION)
def test_schema_keys_and_defaults_are_the_dataclass(cls):
    props = schema_properties(cls.SECTION)
    assert set(props) == set(cls.field_names()), cls.SECTION
    defaults = cls.defaults()
    for key, spec in props.items():
        assert "default" in spec, f"{cls.SECTION}.{key} has no default in the schema"
        assert spec["default"] == defaults[key], f"{cls.SECTION}.{key}: schema {spec['default']!r} vs dataclass {defaults[key]!r}"


@pytest.mark.parametrize("cls", SECTIONS, ids=lambda c: c.SECTION)
def test_every_key_is_documented_in_both(cls):
    props = schema_properties(cls.SECTION)
    docs = field_docstrings(cls)
    for key in cls.field_names():
        assert props[key].get("description", "").strip(), f"{cls.SECTION}.{key}: no description in the schema"
        assert docs.get(key, "").strip(), f"{cls.SECTION}.{key}: no docstring on the dataclass field"


@pytest.mark.parametrize("cls", SECTIONS, ids=lambda c: c.SECTION)
def test_validated_config_yaml_sections_build(cls):
    """The shipped config.yaml (with the schema's defaults filled in) builds every section."""
    from diffatlas.config import validate_config

    cfg = validate_config(yaml.safe_load((ROOT / "config.yaml").read_text()), ROOT / "config.schema.yaml")
    section = cfg
    for part in cls.SECTION.split("."):
        section = section[part]
    built = cls.from_dict(section)
    assert built.to_dict() == {k: section[k] for k in cls.field_names()}


@pytest.mark.parametrize("cls", SECTIONS, ids=lambda c: c.SECTION)
def test_unknown_key_names_section_and_allowed_keys(cls):
    with pytest.raises(UserError, match=rf"unknown config key\(s\) in {cls.SECTION}: no_such_key; allowed keys: "):
        cls.from_dict({"no_such_key": 1})


@pytest.mark.parametrize("cls", [c for c in SECTIONS if c.JOBS or c.JOB_FREE_KEYS], ids=lambda c: c.SECTION)
def test_job_keys_cover_every_key(cls):
    """Each key reaches some job or is declared job-free: a new key cannot be forgotten by the rules."""
    fields = set(cls.field_names())
    used = set(cls.JOB_FREE_KEYS).union(*cls.JOBS.values()) if cls.JOBS else fields
    assert used == fields, f"{cls.SECTION}: keys no job reads and not declared job-free: {sorted(fields - used)}"
    assert set(cls.JOB_FREE_KEYS) <= fields


def test_job_json_is_blind_to_the_grid():
    """Adding a layer or a timestep to the grid leaves each finished job's settings unchanged."""
    import json

    sae = SAEConfig().to_dict()
    grown = {**sae, "layers": ["mid", "up_ft1"], "timesteps": [50, 250, 999]}
    assert SAEConfig.job_json(sae) == SAEConfig.job_json(grown)
    assert "layers" not in json.loads(SAEConfig.job_json(sae))
    assert SAEConfig.job_json({**sae, "k": 8}) != SAEConfig.job_json(sae)

    diffc = DiffCConfig().to_dict()
    assert DiffCConfig.job_json(diffc) == DiffCConfig.job_json({**diffc, "timesteps": [1, 2], "threads": 4})

    geo = GeometryConfig().to_dict()
    grown = {**geo, "timesteps": geo["timesteps"] + [250], "models": ["a", "b"]}
    for t in geo["timesteps"]:
        basis = [
            GeometryConfig.job_json(g, "basis", iterative_timesteps=GeometryConfig.iterative_slice(g["iterative_timesteps"], t))
            for g in (geo, grown)
        ]
        assert basis[0] == basis[1]
    # the slice keeps the job's iterative edits: on at 999 (the default list), off elsewhere
    assert json.loads(basis[0])["iterative_timesteps"] == ([] if t != 999 else [999])
    assert GeometryConfig.iterative_slice(None, 500) is None
    assert GeometryConfig.job_json(geo, "paths") == GeometryConfig.job_json({**geo, "n_samples": 9}, "paths")

    daam = DAAMConfig().to_dict()
    more = {**daam, "prompt_sets": {**daam["prompt_sets"], "mine": {"kind": "list", "prompts": ["a dog"]}}}
    own = {"captions": daam["prompt_sets"]["captions"]}
    assert DAAMConfig.job_json(daam, "generate", prompt_sets=own) == DAAMConfig.job_json(more, "generate", prompt_sets=own)
    assert DAAMConfig.job_json(daam, "real") == DAAMConfig.job_json({**more, "guidance": 7.5}, "real")
    # a key a job reads does change its settings
    assert DAAMConfig.job_json(daam, "real") != DAAMConfig.job_json({**daam, "tau": 0.5}, "real")
