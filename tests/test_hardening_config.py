"""Config hardening (issue 13): layer globs the workflow can use, named errors, a schema fuzz test."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from diffatlas.config import LAYER_WILDCARD, NAME_WILDCARD, load_schema, validate_config
from diffatlas.errors import UserError

sys.path.insert(0, str(Path(__file__).parent))
from test_hardening_shell import base_config, dry_run, key_name, string_keys, workflow_copy  # noqa: E402

SCHEMA = load_schema()
MINIMAL = {"datasets": {"shapesworld": {"kind": "shapesworld"}}, "models": {"shapesworld": {"path": "p"}}}


def _layer_patterns() -> dict[str, str]:
    """Every schema pattern of a layer name, by key."""
    out = {}
    for path, node in string_keys(SCHEMA, base_config(Path("/nonexistent")), with_schema=True):
        if "layer" in key_name(path) and "pattern" in node:
            out[key_name(path)] = node["pattern"]
    return out


def test_every_layer_key_has_a_pattern():
    assert set(_layer_patterns()) >= {"extract.layers[0]", "extract.spatial_layers[0]", "sae.layers[0]",
                                     "diffc.layers[0]", "daam.layers[0]", "geometry.layer"}


@pytest.mark.parametrize("key", ["extract.layers[0]", "extract.spatial_layers[0]", "sae.layers[0]", "diffc.layers[0]", "geometry.layer"])
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_schema_layer_patterns_admit_only_what_the_wildcard_admits(key, data):
    """Agreement of schema and rules/common.smk: any string a layer pattern admits is a
    {layer} wildcard value (so it never ends in a MissingInputException)."""
    layer = data.draw(st.from_regex(_layer_patterns()[key], fullmatch=True))
    assert re.fullmatch(LAYER_WILDCARD, layer), (key, layer)


@settings(max_examples=40, deadline=None)
@given(name=st.from_regex(SCHEMA["properties"]["models"]["propertyNames"]["pattern"], fullmatch=True))
def test_schema_name_pattern_admits_only_what_the_wildcard_admits(name):
    assert re.fullmatch(NAME_WILDCARD, name)


def test_bracket_glob_validates_and_the_workflow_plans_it(tmp_path):
    """The exact glob that used to pass the schema and then fail inside Snakemake."""
    glob = "up_blocks.[01].attentions.*"
    cfg = base_config(tmp_path)
    cfg["extract"]["layers"] = ["mid", glob]
    validate_config(cfg)
    proc = dry_run(workflow_copy(tmp_path / "wf", strip=False), cfg)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert f"/{glob}/t600/metrics.json" in proc.stdout + proc.stderr


@pytest.mark.parametrize("glob", ["up_blocks.{1}", "up_blocks.1 attentions", "up_blocks.[!0]"])
def test_layer_glob_the_workflow_cannot_use_is_refused_naming_the_characters(glob):
    cfg = {**MINIMAL, "extract": {"layers": [glob]}}
    with pytest.raises(UserError) as err:
        validate_config(cfg)
    assert "extract.layers[0]" in str(err.value) and "* ? [ ]" in str(err.value)


@pytest.mark.parametrize("key, section", [("extract.layers", {"extract": {"layers": []}}),
                                          ("daam.taus", {"daam": {"taus": []}}),
                                          ("datasets", {"datasets": {}})])
def test_empty_list_or_map_says_it_must_not_be_empty(key, section):
    with pytest.raises(UserError) as err:
        validate_config({**MINIMAL, **section})
    msg = str(err.value)
    assert f"config {key} must not be empty" in msg and "type array" not in msg


def test_revision_with_shell_characters_is_refused_naming_the_key():
    cfg = {**MINIMAL, "models": {"shapesworld": {"path": "owner/name", "revision": "main$(touch /tmp/marker)"}}}
    with pytest.raises(UserError, match=r"models\.shapesworld\.revision = .*branch, tag or commit"):
        validate_config(cfg)
    validate_config({**MINIMAL, "models": {"shapesworld": {"path": "owner/name", "revision": "refs/pr/1"}}})


# ----------------------------------------------------------------------------- fuzz

_JUNK = st.one_of(st.none(), st.booleans(), st.integers(-3, 2000), st.floats(allow_nan=True),
                  st.text(max_size=8), st.lists(st.integers(0, 3), max_size=2), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))


def _mostly(good: st.SearchStrategy, bad: st.SearchStrategy, one_in: int = 10) -> st.SearchStrategy:
    """``bad`` one time in ``one_in``, else ``good``."""
    return st.integers(1, one_in).flatmap(lambda i: bad if i == 1 else good)


def _from_schema(schema: dict, depth: int = 0) -> st.SearchStrategy:
    """Configs near the schema: mostly well-typed values, sometimes junk, unknown keys,
    missing required keys and empty containers."""
    if depth > 6:
        return _JUNK
    if "enum" in schema:
        good = st.sampled_from(schema["enum"])
    elif "const" in schema:
        good = st.just(schema["const"])
    elif schema.get("properties") or isinstance(schema.get("additionalProperties"), dict) or schema.get("type") == "object":
        props = {k: _from_schema(v, depth + 1) for k, v in schema.get("properties", {}).items()}
        extra = schema.get("additionalProperties")
        if not props and isinstance(extra, dict):
            # a map of names (datasets, models, prompt sets): a valid name most of the time
            branches = [b for b in extra.get("allOf", []) if "if" in b]
            value = st.one_of([_from_schema(b["then"], depth + 1) for b in branches]) if branches else _from_schema(extra, depth + 1)
            name = _mostly(st.sampled_from(["shapesworld", "m1"]), st.sampled_from(["", "a b", "x$(y)"]))
            good = _mostly(st.dictionaries(name, value, min_size=1, max_size=2), st.just({}))
        else:
            required = schema.get("required", [])
            good = st.fixed_dictionaries({k: v for k, v in props.items() if k in required},
                                         optional={k: v for k, v in props.items() if k not in required})
            typo = st.tuples(good, st.sampled_from(["typo_key", "layer", "kind"]), _JUNK).map(lambda t: {**t[0], t[1]: t[2]})
            good = _mostly(good, typo)
    else:
        types = schema.get("type", [])
        types = types if isinstance(types, list) else [types]
        choices = []
        if "integer" in types:
            choices.append(st.integers(schema.get("minimum", -5) - 2, (schema.get("maximum") or 1000) + 2))
        if "number" in types:
            choices.append(st.floats(-2, 1001, allow_nan=False))
        if "string" in types:
            choices.append(st.one_of(st.text(max_size=12), st.sampled_from(["mid", "up_ft1", "*attn2", "a {label}", "main", " "])))
        if "boolean" in types:
            choices.append(st.booleans())
        if "null" in types:
            choices.append(st.none())
        if "array" in types:
            items = schema.get("items", {})
            choices.append(st.lists(_from_schema(items, depth + 1) if items else _JUNK, max_size=3))
        good = st.one_of(choices) if choices else _JUNK
    return _mostly(good, _JUNK, one_in=4 * (depth + 2)) if depth else good


NAMES_A_KEY = re.compile(r"(config [A-Za-z_][\w.\[\]-]*|unknown config key|\(top level\))")


def _one_section_changed() -> st.SearchStrategy:
    """A valid minimal config with one top-level section drawn from the schema (mostly valid)."""
    keys = sorted(SCHEMA["properties"])
    return st.sampled_from(keys).flatmap(
        lambda k: _from_schema(SCHEMA["properties"][k], 1).map(lambda v: {**MINIMAL, k: v}))


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(cfg=st.one_of(_from_schema(SCHEMA), _one_section_changed()))
def test_fuzzed_configs_validate_or_fail_naming_a_key(cfg):
    try:
        out = validate_config(cfg)
    except UserError as err:
        assert NAMES_A_KEY.search(str(err)), str(err)
    else:
        assert isinstance(out, dict) and set(cfg) <= set(out)
        yaml.safe_dump(out)  # a validated config is plain data
