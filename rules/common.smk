# Helpers shared by every stage: config validation, the results/ path grammar, model paths,
# wildcard constraints. Stage files append their final targets to ALL_TARGETS.

import os
import sys
from pathlib import Path

# Import the package from this checkout, so the workflow and the library never disagree.
sys.path.insert(0, str(Path(workflow.basedir) / "src"))

from diffatlas.config import LAYER_WILDCARD, NAME_WILDCARD, check_model_layers, check_revisions, check_timesteps, layers_for, validate_config
from diffatlas.daam.config import DAAMConfig
from diffatlas.diffc.config import DiffCConfig
from diffatlas.errors import UserError
from diffatlas.geometry.config import GeometryConfig
from diffatlas.sae.config import SAEConfig
from diffatlas.world.config import FidelityConfig

try:
    _validated = validate_config(config, Path(workflow.basedir) / "config.schema.yaml")
except UserError as _err:
    raise WorkflowError(str(_err)) from None
config.clear()
config.update(_validated)

RESULTS = config["results"]
ALL_TARGETS = []

# `snakemake --report` refuses an output marked with report() that does not exist, so on a
# partial run (some stages not run yet) the report's default target is the targets that exist.
# Snakemake exposes no report flag to the Snakefile at parse time: read its command line.
REPORT_MODE = any(a == "--report" or a.startswith("--report=") for a in sys.argv)
REPORTABLE_TARGETS = lambda wc: [t for t in ALL_TARGETS if Path(t).exists()]

# Rules call the package's console script `diffatlas`, so every step also runs by hand.
# The conda envs (envs/*.yaml, for cluster users) install this checkout from DIFFATLAS_ROOT.
# Kept for rules written as {DIFFATLAS}; prefer the plain command (snakemake --lint).
DIFFATLAS = "diffatlas"
os.environ.setdefault("DIFFATLAS_ROOT", str(Path(workflow.basedir).resolve()))


# The same character sets the schema's name and layer patterns admit (diffatlas.config;
# tests/test_hardening_shell.py checks they agree), so a name that validates is never a
# MissingInputException later.
wildcard_constraints:
    model=NAME_WILDCARD,
    dataset=NAME_WILDCARD,
    layer=LAYER_WILDCARD,
    timestep="[0-9]+",


def log_path(rule_name, *parts):
    """results/logs/{rule}/{parts}.log: every rule logs here."""
    return str(Path(RESULTS, "logs", rule_name, *parts)) + ".log"


def bench_path(rule_name, *parts):
    """results/benchmarks/{rule}/{parts}.tsv: every rule's Snakemake benchmark."""
    return str(Path(RESULTS, "benchmarks", rule_name, *parts)) + ".tsv"


def world_model_trained_dir():
    return str(Path(RESULTS, "world_model", "model"))


def model_path(name):
    """Directory (or hub id) the loader reads for model ``name``.

    The ShapesWorld model comes from the committed checkpoint unless
    world_model.source is 'trained', in which case train_world_model builds it.
    """
    path = config["models"][name]["path"]
    if name == "shapesworld" and config["world_model"]["source"] == "trained":
        return world_model_trained_dir()
    return path


def model_args(name):
    """Options of model ``name`` besides its path, one list item per argument, so a rule's
    ``{params.model_args:q}`` quotes each value on its own: ``--revision REV`` when set,
    ``--allow-pickle-weights`` when its config allows .bin weights."""
    entry = config["models"][name]
    args = ["--revision", entry["revision"]] if entry.get("revision") else []
    return args + (["--allow-pickle-weights"] if entry.get("allow_pickle_weights") else [])


def model_args_arg(wc):
    """:func:`model_args` of the ``{model}`` wildcard (a params function; pass as ``{params.model_args:q}``)."""
    return model_args(wc.model)


def model_input(name):
    """Input files a rule needs for model ``name`` (the trained model dir, if any)."""
    if name == "shapesworld" and config["world_model"]["source"] == "trained":
        return [world_model_trained_dir()]
    local = Path(config["models"][name]["path"])
    return [str(local / "model_index.json")] if (local / "model_index.json").exists() else []


try:
    check_timesteps(config, {name: model_path(name) for name in config["models"]})
    check_revisions(config, {name: model_path(name) for name in config["models"]})
    check_model_layers(config, {name: model_path(name) for name in config["models"]})
except UserError as _err:
    raise WorkflowError(str(_err)) from None


def dataset_dir(name):
    return str(Path(RESULTS, "data", name))


# Datasets larger than extract.shard_size are written and extracted in shards
# (diffatlas.data.shards): planned here, from the config (ShapesWorld) or a listing of the
# source (image folder, manifest; no image is opened). A dataset with one shard keeps the plain
# layout and today's jobs.
from diffatlas.data.shards import INDEX as DATASET_INDEX, SHARDS as DATASET_SHARDS_DIR, plan_shards, shard_section

SHARD_SIZE = config["extract"].get("shard_size")
try:
    DATASET_SHARDS = {name: plan_shards(section, name, SHARD_SIZE) or [] for name, section in config["datasets"].items()}
except UserError as _err:
    raise WorkflowError(str(_err)) from None
SHARD_PLAN = {(name, p.name): p for name, plans in DATASET_SHARDS.items() for p in plans}


def names_pattern(names):
    """A wildcard constraint matching exactly ``names`` (none: a pattern that matches nothing)."""
    return "|".join(names) or "(?!)"


SHARDED_DATASETS = names_pattern([n for n, plans in DATASET_SHARDS.items() if plans])
PLAIN_DATASETS = names_pattern([n for n, plans in DATASET_SHARDS.items() if not plans])


def dataset_input(name):
    """What a job reading dataset ``name`` depends on and passes as its path (the dataset
    directory, or a sharded dataset's index.json; diffatlas.data.dataset.load_dataset reads both)."""
    return str(Path(dataset_dir(name), DATASET_INDEX)) if DATASET_SHARDS[name] else dataset_dir(name)


def flow_scale(model):
    """T of a flow-matching model (SD3, Flux: its times are sigmas), None for a DDPM-family one."""
    from diffatlas.config import scheduler_config
    from diffatlas.models.diffusion import time_convention

    sched = scheduler_config(model_path(model))
    return int(sched.get("num_train_timesteps", 1000)) if time_convention(sched) == "sigma" else None


def time_arg(wc):
    """The --timestep of an extraction job: the step, or for a flow-matching model the sigma
    's0.500' whose scheduler timestep sigma * T names the store (t500)."""
    scale = flow_scale(wc.model)
    return wc.timestep if scale is None else f"s{int(wc.timestep) / scale:.3f}"


#: Stages that run a flow-matching model at its sigmas. Their results are named, like the
#: extraction stores they read, by the scheduler's timestep sigma * T (t250 for s0.250), and
#: every artifact records sigma beside it (the store's ``sigma`` coordinate); the maths is the
#: same as at a training step (geometry samples and edits with the core's Euler flow step).
SIGMA_STAGES = ("extraction", "sae", "diffc", "geometry")


def store_time(model, time, where):
    """The training-scale name (t{name}) of ``time`` (a diffatlas Time) on ``model``: the step,
    or for a flow-matching model its scheduler timestep sigma * T, which must be an integer."""
    scale = flow_scale(model)
    if time.kind == "step" or scale is None:
        return time.value
    named = time.value * scale
    if abs(named - round(named)) > 1e-6:
        raise WorkflowError(f"model {model}: {where} sigma {time} times T = {scale} is not an integer "
                            f"timestep; allowed: sigmas on the 1/{scale} grid")
    return int(round(named))


def time_label(model, timestep):
    """A stored time in ``model``'s own convention, for messages: 't250', or 's0.250' for a
    flow-matching model (whose stores are named by sigma * T)."""
    scale = flow_scale(model)
    return f"t{timestep}" if scale is None else f"s{int(timestep) / scale:.3f}"


def step_times(model, section, stage, drop_from):
    """The times ``stage`` runs ``model`` at, as the integers its results are named by (t{timestep}):
    ``models.<model>.timesteps`` if set, else ``<section>.timesteps``
    (diffatlas.models.diffusion.timesteps_for). A flow-matching model's sigmas are named by its
    scheduler's timestep sigma * T (t500 for s0.500; the store records sigma beside it) in the
    stages of SIGMA_STAGES; any other stage refuses a sigma naming the model rather than
    skipping it; ``drop_from`` is the key to remove it from.
    """
    from diffatlas.models.diffusion import timesteps_for

    times = timesteps_for(config, model, section)
    sigmas = [str(t) for t in times if t.kind != "step"]
    if sigmas and stage not in SIGMA_STAGES:
        raise WorkflowError(
            f"model {model}: {stage} times {sigmas} are flow-matching sigmas; {stage} supports "
            f"training steps (DDPM-family models) only: drop the model from {drop_from}"
        )
    return [store_time(model, t, f"{stage} time") for t in times]


def trained_times(model, section):
    """The times ``section`` (sae or diffc) trains ``model`` at, named as its stores are:
    ``<section>.timesteps`` when set (each must be extracted for the model; steps, or sigmas
    for a flow-matching model), else the model's extraction times (models.<model>.timesteps,
    else extract.timesteps)."""
    from diffatlas.models.diffusion import Time

    extracted = step_times(model, "extract", section, "extract.models")
    own = config[section].get("timesteps")
    if not own:
        return extracted
    named = []
    for i, t in enumerate(own):
        try:
            named.append(store_time(model, Time.parse(t), f"{section}.timesteps"))
        except UserError as err:
            raise WorkflowError(f"config {section}.timesteps[{i}] (model {model}): {err}") from None
    missing = [t for t, n in zip(own, named) if n not in extracted]
    if missing:
        raise WorkflowError(
            f"config {section}.timesteps = {missing} are not extracted for model {model}; allowed: its "
            f"extraction times {[time_label(model, t) for t in extracted]} (models.{model}.timesteps, else extract.timesteps)"
        )
    return named


def is_text_stream(layer):
    """A joint block's text-token stream (block{i}.text): pooled over the tokens, no map."""
    from diffatlas.activations.layers import is_text_stream as _text

    return _text(layer)


def trained_layers(model, section):
    """The layers ``section`` (sae or diffc) trains ``model`` at: ``<section>.layers`` when set
    (each must be extracted for the model), else the model's extraction layers
    (models.<model>.layers, else extract.layers; diffatlas.config.layers_for)."""
    extracted = layers_for(config, model)
    own = config[section].get("layers")
    if not own:
        return extracted
    missing = [l for l in own if l not in extracted]
    if missing:
        raise WorkflowError(
            f"config {section}.layers = {missing} are not extracted for model {model}; allowed: its "
            f"extraction layers {extracted} (models.{model}.layers, else extract.layers)"
        )
    return list(own)


def extract_section(model):
    """The extract section as ``model``'s jobs see it: its own layers (models.<model>.layers)
    in place of extract.layers, extract.spatial_layers narrowed to them (spatial_layers names
    layers; a model without one keeps no map of it). Unchanged for a model without own layers."""
    section = dict(config["extract"])
    own = config["models"][model].get("layers")
    if own is not None:
        section["layers"] = list(own)
        if section.get("spatial_layers") is not None:
            section["spatial_layers"] = [l for l in section["spatial_layers"] if l in own]
    return section


def layers_with_maps(model):
    """The extraction layers of ``model`` that keep spatial maps (ExtractConfig.layers_with_maps:
    extract.spatial, extract.spatial_layers), less text-token streams, which never have one."""
    from diffatlas.activations.config import ExtractConfig

    key = f"models.{model}.layers" if config["models"][model].get("layers") is not None else "extract.layers"
    try:
        section = ExtractConfig.from_dict(extract_section(model))
    except UserError as err:
        raise WorkflowError(f"model {model}: {key} = {layers_for(config, model)!r}: {err}") from None
    return [l for l in section.layers_with_maps if not is_text_stream(l)]


def diffc_layers(model):
    """Diff-C's layers of ``model``: diffc.layers when set (each extracted for the model, with
    maps), else its extraction layers that keep maps (a text-token stream has none)."""
    layers = trained_layers(model, "diffc")
    if config["diffc"].get("layers"):
        bare = [l for l in layers if is_text_stream(l)]
        if bare:
            raise WorkflowError(
                f"config diffc.layers = {bare} are text-token streams (pooled over tokens, no spatial map), but "
                f"Diff-C trains on spatial maps; allowed: layers with maps of model {model}: {layers_with_maps(model)}"
            )
        return layers
    return [l for l in layers if not is_text_stream(l)]


def geometry_times(model):
    """The geometry timesteps of ``model``, latest first: its own models.<model>.timesteps, else
    geometry.timesteps, plus geometry.global_timestep. A flow-matching model runs at sigmas (plus
    geometry.global_sigma); like extraction's stores its results are named by the scheduler's
    timestep sigma * T (t500 for s0.500; the job gets the sigma back through time_arg)."""
    times = step_times(model, "geometry", "geometry", "geometry.models")
    return sorted(set(times) | {geometry_global_name(model)}, reverse=True)


def geometry_global_name(model):
    """The training-scale name of ``model``'s global geometry time: geometry.global_timestep, or
    for a flow-matching model geometry.global_sigma * T."""
    from diffatlas.models.diffusion import Time

    if flow_scale(model) is None:
        return store_time(model, Time.step(config["geometry"]["global_timestep"]), "geometry.global_timestep")
    return store_time(model, Time.sigma(config["geometry"]["global_sigma"]), "geometry.global_sigma")


def geometry_section(model):
    """config['geometry'] as ``model`` runs it: h is models.<model>.geometry_layer when set (a
    UNet's mid does not exist on SD3 or Flux), else geometry.layer."""
    own = config["models"][model].get("geometry_layer")
    return config["geometry"] if own is None else {**config["geometry"], "layer": own}
