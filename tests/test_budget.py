"""The time budget's bookkeeping and the paper-size configs (fast; the budget of a real run is
checked on the tiny workflow's benchmark files in tests/test_workflow.py)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from diffatlas.budget import DEMO_BUDGET_S, STAGE_BUDGET_S, budget, rule_stages
from diffatlas.config import validate_config
from diffatlas.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def _merge(base: dict, over: dict) -> dict:
    """Snakemake's --configfile: nested mappings are updated key by key."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def test_every_rule_has_a_stage_with_a_budget():
    stages = rule_stages(ROOT / "rules")
    assert stages["make_dataset"] == "data" and stages["train_diffc"] == "diffc" and stages["world_fidelity"] == "world_model"
    assert set(stages.values()) <= set(STAGE_BUDGET_S), set(stages.values()) - set(STAGE_BUDGET_S)
    # the shares (job-seconds) may exceed the wall budget by the 2-core overlap, not by more
    assert sum(STAGE_BUDGET_S.values()) <= 2 * DEMO_BUDGET_S


def test_budget_of_a_results_tree_without_benchmarks_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="no benchmark files under .*run the workflow first"):
        budget(tmp_path, ROOT / "rules")
    bad = tmp_path / "benchmarks" / "extract" / "m" / "d.tsv"
    bad.parent.mkdir(parents=True)
    bad.write_text("not a benchmark\n")
    with pytest.raises(UserError, match="d.tsv is not a Snakemake benchmark file"):
        budget(tmp_path, ROOT / "rules")


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("paper-*.yaml")), ids=lambda p: p.name)
def test_paper_configs_are_valid_over_the_default(path):
    base = yaml.safe_load((ROOT / "config.yaml").read_text())
    over = yaml.safe_load(path.read_text())
    cfg = validate_config(_merge(base, over), ROOT / "config.schema.yaml")
    for section, values in over.items():  # every key it sets arrives
        for key, value in (values.items() if isinstance(values, dict) else []):
            if not isinstance(value, dict):
                assert cfg[section][key] == value, (section, key)


def test_paper_configs_exist_for_each_stage_with_a_demo_size():
    names = {p.stem for p in (ROOT / "configs").glob("paper-*.yaml")}
    assert {"paper-diffc", "paper-sae", "paper-daam", "paper-geometry", "paper-activations", "paper-world-fidelity"} <= names
