"""Workflow configuration: JSON Schema validation with clear messages, then dataclasses.

The Snakefile calls :func:`validate_config` before any job runs. Errors name the key path
(``extract.layers[2]``), the bad value and what is allowed. Defaults from the schema are
filled in, so the rest of the workflow sees a complete config. Each stage turns its section
into its own dataclass (``diffatlas.<stage>.config``), which re-checks values in
``__post_init__`` so the library is safe to call without Snakemake too.
"""

from __future__ import annotations

import copy
import difflib
import os
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from diffatlas.errors import UserError

SCHEMA_PATH = Path(__file__).resolve().parents[2] / "config.schema.yaml"

#: Characters of names (models, datasets, prompt sets): the schema's propertyNames pattern
#: and the {model}/{dataset} wildcard constraints (rules/common.smk) both use this set.
NAME_WILDCARD = "[A-Za-z0-9_-]+"
#: Characters of a layer name or module-path glob as a {layer} wildcard (rules/common.smk).
#: Every string the schema's layer patterns admit is made of these (checked by a test), so
#: a layer that validates is always a path the workflow can build.
LAYER_WILDCARD = r"[A-Za-z0-9_.*?\[\]-]+"


def load_schema(path: str | os.PathLike | None = None) -> dict[str, Any]:
    path = Path(path) if path else SCHEMA_PATH
    with open(path) as fh:
        return yaml.safe_load(fh)


def _key_path(parts: Any) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "(top level)"


def _allowed(schema: dict[str, Any]) -> str:
    if "x-allowed" in schema:
        return schema["x-allowed"]
    if "enum" in schema:
        return ", ".join(map(str, schema["enum"]))
    if "const" in schema:
        return str(schema["const"])
    bits = []
    if "type" in schema:
        bits.append(f"type {schema['type']}")
    if "minimum" in schema:
        bits.append(f">= {schema['minimum']}")
    if "maximum" in schema:
        bits.append(f"<= {schema['maximum']}")
    if "pattern" in schema:
        bits.append(f"matching {schema['pattern']}")
    return ", ".join(bits) or "see config.schema.yaml"


def _explain(err: jsonschema.ValidationError) -> str:
    key = _key_path(err.absolute_path)
    if err.validator == "additionalProperties":
        allowed = sorted(err.schema.get("properties", {}))
        extra = sorted(set(err.instance) - set(allowed))
        hints = []
        for e in extra:
            close = difflib.get_close_matches(e, allowed, n=1)
            hints.append(f"{e!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        where = "" if key == "(top level)" else f" in {key}"
        return f"unknown config key {', '.join(hints)}{where}; allowed keys: {', '.join(allowed)}"
    if err.validator == "required":
        return f"config {key} is missing a required key: {err.message}"
    if err.validator in ("minItems", "minProperties") and not err.instance:
        n, what = err.validator_value, ("item" if err.validator == "minItems" else "entry")
        items = err.schema.get("items")
        each = f"; each {_allowed(items)}" if isinstance(items, dict) else ""
        return f"config {key} must not be empty; give at least {n} {what}{'s' if n != 1 else ''}{each}"
    if err.validator == "minLength" and err.instance == "":
        return f"config {key} must not be an empty string; allowed: {_allowed(err.schema)}"
    if err.validator == "propertyNames":
        return f"config {key}: name {err.instance!r} is not allowed ({_allowed(err.schema)})"
    return f"config {key} = {err.instance!r} is not allowed; allowed: {_allowed(err.schema)}"


def _fill_defaults(instance: Any, schema: dict[str, Any]) -> None:
    """Insert schema defaults for absent keys (recursively, including if/then branches)."""
    if not isinstance(instance, dict):
        return
    for key, sub in schema.get("properties", {}).items():
        if key not in instance and "default" in sub:
            instance[key] = copy.deepcopy(sub["default"])
        if key in instance:
            _fill_defaults(instance[key], sub)
    extra = schema.get("additionalProperties")
    if isinstance(extra, dict):
        for key, value in instance.items():
            if key not in schema.get("properties", {}):
                _fill_defaults(value, extra)
    for branch in schema.get("allOf", []):
        cond = branch.get("if")
        if cond is None or jsonschema.Draft202012Validator(cond).is_valid(instance):
            _fill_defaults(instance, branch.get("then", branch))


def validate_config(config: dict[str, Any], schema_path: str | os.PathLike | None = None) -> dict[str, Any]:
    """Validate ``config`` against the schema; return a copy with defaults filled in.

    Raises :class:`UserError` naming the first bad key (all problems are listed).
    """
    schema = load_schema(schema_path)
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: (len(e.absolute_path), list(map(str, e.absolute_path))))
    # if/then failures repeat the inner error; keep the most specific ones.
    errors = [e for e in errors if e.validator not in ("if", "allOf")] or errors
    if errors:
        lines = []
        for err in errors:
            leaves = [err]
            if err.context:
                leaves = sorted(err.context, key=lambda e: -len(e.absolute_path))[:1]
            for leaf in leaves:
                msg = _explain(leaf)
                if msg not in lines:
                    lines.append(msg)
        raise UserError("invalid configuration:\n  " + "\n  ".join(lines))
    out = copy.deepcopy(config)
    _fill_defaults(out, schema)
    _check_references(out)
    return out


def _check_references(config: dict[str, Any]) -> None:
    """Names used in stage sections must exist in ``models`` / ``datasets``."""
    models, datasets = set(config.get("models", {})), set(config.get("datasets", {}))
    for section in ("extract", "daam", "geometry"):
        for i, name in enumerate(config.get(section, {}).get("models", [])):
            if name not in models:
                raise UserError(f"config {section}.models[{i}] = {name!r} is not a configured model; allowed: {', '.join(sorted(models))}")
    for section in ("extract", "daam"):
        for i, name in enumerate(config.get(section, {}).get("datasets", [])):
            if name not in datasets:
                raise UserError(f"config {section}.datasets[{i}] = {name!r} is not a configured dataset; allowed: {', '.join(sorted(datasets))}")


def refuse_local_revision(path: str | os.PathLike, revision: str | None, name: str | None = None) -> None:
    """A revision selects a snapshot of a hub id in the local cache; a local directory has
    none, so a revision there would be recorded but never checked: refuse it."""
    if revision and Path(os.path.expanduser(str(path))).is_dir():
        key = f"models.{name}.revision" if name else "the revision"
        raise UserError(
            f"model {name or path!r}: revision {revision!r} is set but its path {path} is a local directory; "
            f"a revision only selects a cached snapshot of a hub id ('owner/name'). Remove {key} "
            "(a local directory is recorded by the hash of its weight files)"
        )


def check_revisions(config: dict[str, Any], model_paths: dict[str, str]) -> None:
    """:func:`refuse_local_revision` for every configured model (the workflow calls this)."""
    for name, entry in config.get("models", {}).items():
        refuse_local_revision(model_paths.get(name, entry.get("path", "")), entry.get("revision"), name)


def load_config(path: str | os.PathLike, schema_path: str | os.PathLike | None = None) -> dict[str, Any]:
    """Read a YAML config file and validate it (used by commands run outside Snakemake)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"config file not found: {path}")
    with open(path) as fh:
        try:
            data = yaml.safe_load(fh) or {}
        except yaml.YAMLError as err:
            raise UserError(f"{path} is not valid YAML: {err}") from err
    try:
        return validate_config(data, schema_path)
    except UserError as err:
        raise UserError(f"{path}: {err}") from None


def scheduler_config(model_dir: str | os.PathLike) -> dict[str, Any]:
    """A model's ``scheduler/scheduler_config.json`` (``{}`` for hub ids and models not built yet)."""
    cfg = Path(model_dir) / "scheduler" / "scheduler_config.json"
    if cfg.exists():
        import json

        return json.loads(cfg.read_text())
    return {}


def num_train_timesteps(model_dir: str | os.PathLike, default: int = 1000) -> int:
    """T of a model in diffusers layout, read from its scheduler config without loading it.

    Hub ids and models not built yet (the ShapesWorld model when it is trained by the
    workflow) fall back to ``default``; the extraction step re-checks after loading.
    """
    return int(scheduler_config(model_dir).get("num_train_timesteps", default))


def _time_kind(value: Any) -> str | None:
    """``"step"`` / ``"sigma"`` of a configured time, None when it does not parse (check_time names it)."""
    from diffatlas.models.diffusion import Time

    try:
        return Time.parse(value).kind
    except UserError:
        return None


def check_timesteps(config: dict[str, Any], model_paths: dict[str, str]) -> None:
    """Every configured time must fit every model it is used with, in that model's convention.

    Checked: extract.timesteps, diffc.timesteps (a subset of extract's), geometry.timesteps,
    geometry.iterative_timesteps (each model the entries of its own kind), geometry.global_timestep
    (step models; flow models take geometry.global_sigma), and a model's own list
    ``models.<name>.timesteps`` (:func:`diffatlas.models.diffusion.timesteps_for`). The
    convention (integer steps with ᾱ, or flow-matching sigmas) and T come from the model's
    scheduler config (:func:`diffatlas.models.diffusion.check_time`); a model is not refused
    for lacking ``alphas_cumprod``, only for times it cannot take.
    """
    from diffatlas.models.diffusion import check_time, time_convention

    def model_time(name: str) -> tuple[str, int | None]:
        sched = scheduler_config(model_paths[name])
        conv = time_convention(sched)
        return conv, (None if conv == "sigma" else int(sched.get("num_train_timesteps", 1000)))

    for name, block in (config.get("models") or {}).items():
        own = (block or {}).get("timesteps")
        if own is None or name not in model_paths:
            continue
        conv, T = model_time(name)
        for i, t in enumerate(own):
            check_time(t, conv, T, f"models.{name}.timesteps[{i}]", name)
    for section, key in (("extract", "timesteps"), ("diffc", "timesteps"), ("geometry", "timesteps"),
                         ("geometry", "iterative_timesteps"), ("geometry", "global_timestep")):
        block = config.get(section) or {}
        value = block.get(key)
        if value is None:
            continue
        values = value if isinstance(value, (list, tuple)) else [value]
        models = block.get("models") or (config.get("extract") or {}).get("models", [])
        for name in models:
            if name not in model_paths:
                continue  # unknown model names are reported by the reference check
            if (section, key) in (("extract", "timesteps"), ("geometry", "timesteps")) and (
                ((config.get("models") or {}).get(name) or {}).get("timesteps") is not None
            ):
                continue  # the model's own list replaces the global one
            conv, T = model_time(name)
            if (section, key) == ("geometry", "global_timestep") and conv == "sigma":
                continue  # a flow-matching model's global time is geometry.global_sigma
            for i, t in enumerate(values):
                if (section, key) == ("geometry", "iterative_timesteps") and _time_kind(t) not in (None, conv):
                    continue  # an entry for the other convention's models
                where = f"{section}.{key}" + (f"[{i}]" if isinstance(value, (list, tuple)) else "")
                check_time(t, conv, T, where, name)


def layers_for(config: dict[str, Any], model: str, section: str = "extract") -> list[str]:
    """The layers a stage runs ``model`` at: ``models.<model>.layers`` if set, else ``<section>.layers``.

    The one place the per-model default lives (as :func:`diffatlas.models.diffusion.timesteps_for`
    for times): a UNet's ``mid`` / ``up_ft1`` do not exist on SD3 or Flux (``block{i}``,
    ``block{i}.image``, ``single_block{i}``), so a run holding both names each model's own list.
    """
    own = ((config.get("models") or {}).get(model) or {}).get("layers")
    return list(own if own is not None else (config.get(section) or {}).get("layers") or [])


def _meta_denoiser(model_dir: Path) -> Any:
    """The denoiser of a diffusers model directory built from its config on the meta device
    (no weights read, no memory): enough to list its layer aliases and module paths."""
    import json

    import diffusers
    import torch

    index = json.loads((model_dir / "model_index.json").read_text())
    for sub in ("unet", "transformer"):
        entry = index.get(sub)
        if isinstance(entry, list) and len(entry) == 2 and entry[1] and (model_dir / sub / "config.json").exists():
            cls = getattr(diffusers, entry[1], None)
            if cls is None:
                return None
            with torch.device("meta"):
                return cls.from_config(cls.load_config(str(model_dir / sub)))
    return None


def check_model_layers(config: dict[str, Any], model_paths: dict[str, str]) -> None:
    """Each model's own ``models.<name>.layers`` must name layers that model has.

    Checked when the workflow is planned, on the denoiser built from its config on the meta
    device, with the extraction's own resolver (:func:`diffatlas.activations.layers.resolve_layers`),
    so the error lists the aliases of that model's family. Hub ids and models not built yet
    (a trained world model) are checked by the extraction job when the model loads.
    """
    from diffatlas.activations.layers import resolve_layers

    for name, block in (config.get("models") or {}).items():
        own = (block or {}).get("layers")
        local = Path(os.path.expanduser(str(model_paths.get(name, ""))))
        if own is None or not (local / "model_index.json").exists():
            continue
        denoiser = _meta_denoiser(local)
        if denoiser is None:
            continue
        try:
            resolve_layers(denoiser, own)
        except UserError as err:
            raise UserError(f"config models.{name}.layers = {own!r} (model {name!r}): {err}") from None
