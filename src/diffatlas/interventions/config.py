"""Settings of the judged steering experiment (the ``intervene`` section of config.yaml).

The experiment (issue 20 item 2) steers with SAE latents trained on activations taken as
generation takes them, so the section says which store and SAE it uses: a store extracted from
``dataset`` with ``conditioning`` (the caption by default, as generation conditions), one job per
(model, timestep) capturing ``layers`` with full-size spatial maps; and an SAE per (layer,
timestep) trained on it with the ``sae`` section's settings overridden by ``sae`` here
(``samples: spatial`` to edit position by position, ``mine_on: train`` so latents are chosen on
the training split). Each timestep is also the centre of the steering window
(``t ± window``). :class:`InterventionConfig` mirrors the section key for key; the schema
(config.schema.yaml) documents the same keys with the same defaults.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from diffatlas.errors import UserError
from diffatlas.interventions.spec import CFG_BRANCHES
from diffatlas.sections import ConfigSection

#: Attributes the judge reads from an image (:mod:`diffatlas.world.judge`): the words steered.
JUDGED_ATTRIBUTES = ("colour", "shape")
#: Where the steering vector is added (``intervene.where``): at every position, or only where
#: the chosen latent is active (z_j > 0 at that position and pass); the spec's names for them.
STEER_WHERE = {"everywhere": "all", "active": "active"}
#: Store conditionings (:data:`diffatlas.activations.config.CONDITIONINGS`).
STORE_CONDITIONINGS = ("empty", "class_template", "caption")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _bad(key: str, value: Any, allowed: str) -> UserError:
    return UserError(f"config intervene.{key} = {value!r} is not allowed; allowed: {allowed}")


@dataclass(frozen=True)
class InterventionConfig(ConfigSection):
    """The judged steering experiment (defaults: the demo's small grid)."""

    SECTION = "intervene"
    # The grid: jobs get their model, layer and timestep as wildcards.
    JOB_FREE_KEYS = ("models", "dataset", "layers", "timesteps")
    JOBS = {
        "store": ("conditioning",),
        "sae": ("sae",),
        "experiment": ("attributes", "alphas", "where", "n_prompts", "window", "steps", "guidance", "cfg_branch", "min_active",
                       "seed"),
        "summary": (),
    }

    models: list[str] = field(default_factory=lambda: ["shapesworld"])
    """Models to steer (names under models; workflow grid)."""
    dataset: str = "shapesworld"
    """Dataset (a name under datasets, with captions and attributes) the steering SAE's store is extracted from."""
    layers: list[str] = field(default_factory=lambda: ["mid"])
    """Layers steered, each with its own SAE (workflow grid)."""
    timesteps: list[int] = field(default_factory=lambda: [500])
    """Training-scale timesteps (workflow grid): the SAE's store time and the centre of the steering window."""
    window: int = 100
    """Half width of the steering window in training steps: edits are live for t - window <= step <= t + window."""
    conditioning: str = "caption"
    """Conditioning of the store's extraction (empty, class_template or caption); caption is what generation sees."""
    sae: dict[str, Any] = field(default_factory=lambda: {"samples": "spatial", "mine_on": "train"})
    """Keys of the sae section overridden for the steering SAE (samples: spatial edits per position; mine_on: train
    chooses latents on the training split)."""
    attributes: list[str] = field(default_factory=lambda: ["colour", "shape"])
    """Attributes whose words are steered (colour, shape: what the judge reads)."""
    alphas: list[float] = field(default_factory=lambda: [2.0, 4.0, 8.0])
    """Steering strengths, in multiples of the chosen latent's mean activation when active (latents.parquet mean_act):
    the edit adds alpha x mean_act x W_dec[j] / input_scale at every position (alpha = 0, the baseline, is always run)."""
    where: Any = "everywhere"
    """Where the steering vector is added: everywhere (every position) or active (only where the chosen latent is active,
    z_j > 0; the controls are added at the same positions), or a list of both to run each (the tables' where column)."""
    n_prompts: int = 3
    """Prompts per word and experiment: the n of every rate (each prompt its own seed)."""
    steps: int = 10
    """DDIM steps of generation."""
    guidance: float = 3.0
    """CFG scale of generation (<= 1: no CFG)."""
    cfg_branch: str = "both"
    """CFG rows edited: both branches or cond (the conditional one only)."""
    min_active: int = 10
    """A latent is chosen only if it fires on at least this many mined (training) images."""
    seed: int = 0
    """Seed of the prompt draw, the noise, the random-latent and the random-direction controls."""
    extra: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        for key in ("models", "layers"):
            value = getattr(self, key)
            if not isinstance(value, list) or not value or not all(isinstance(x, str) and x for x in value):
                raise _bad(key, value, "a non-empty list of names")
        if not isinstance(self.dataset, str) or not self.dataset:
            raise _bad("dataset", self.dataset, "a dataset name")
        if not isinstance(self.timesteps, list) or not self.timesteps or not all(_is_int(t) and t >= 0 for t in self.timesteps):
            raise _bad("timesteps", self.timesteps, "a non-empty list of integers 0..T-1 (training scale)")
        for key, low in (("window", 0), ("n_prompts", 1), ("steps", 1), ("min_active", 1), ("seed", 0)):
            value = getattr(self, key)
            if not _is_int(value) or value < low:
                raise _bad(key, value, f"an integer >= {low}")
        if self.conditioning not in STORE_CONDITIONINGS:
            raise _bad("conditioning", self.conditioning, ", ".join(STORE_CONDITIONINGS))
        if not isinstance(self.sae, dict):
            raise _bad("sae", self.sae, "a mapping of sae-section keys to values")
        if not isinstance(self.attributes, list) or not self.attributes or any(a not in JUDGED_ATTRIBUTES for a in self.attributes) \
                or len(set(self.attributes)) != len(self.attributes):
            raise _bad("attributes", self.attributes, f"a non-empty list of distinct values from {', '.join(JUDGED_ATTRIBUTES)}")
        if not isinstance(self.alphas, list) or not self.alphas or not all(
                isinstance(a, (int, float)) and not isinstance(a, bool) and math.isfinite(a) and a > 0 for a in self.alphas):
            raise _bad("alphas", self.alphas, "a non-empty list of finite numbers > 0 (alpha = 0 is always run)")
        modes = self.where if isinstance(self.where, list) else [self.where]
        if not modes or any(m not in STEER_WHERE for m in modes) or len(set(modes)) != len(modes):
            raise _bad("where", self.where, f"one of {', '.join(STEER_WHERE)}, or a non-empty list of distinct values from them")
        if isinstance(self.guidance, bool) or not isinstance(self.guidance, (int, float)) or not math.isfinite(self.guidance):
            raise _bad("guidance", self.guidance, "a finite number (<= 1: no CFG)")
        if self.cfg_branch not in CFG_BRANCHES:
            raise _bad("cfg_branch", self.cfg_branch, ", ".join(CFG_BRANCHES))
        self.reject_unknown()
        self.sae_config({})  # the overrides must be sae keys with valid values

    @property
    def where_modes(self) -> list[str]:
        """:attr:`where` as a list (everywhere / active), in the order given."""
        return list(self.where) if isinstance(self.where, list) else [self.where]

    def sae_config(self, sae_section: dict[str, Any]) -> "Any":
        """The steering SAE's settings: ``sae_section`` with :attr:`sae` on top (an :class:`SAEConfig`)."""
        from diffatlas.sae.config import SAEConfig

        unknown = sorted(set(self.sae) - set(SAEConfig.field_names()))
        if unknown:
            raise _bad("sae", self.sae, f"keys of the sae section ({', '.join(SAEConfig.field_names())}); unknown: {', '.join(unknown)}")
        if sae_section:
            SAEConfig.from_dict(sae_section)  # a bad value of the sae section itself is named there
        try:
            return SAEConfig.from_dict({**sae_section, **self.sae})
        except UserError as err:
            # the sae section's message, re-keyed to where the value came from (intervene.sae.<key>)
            msg = str(err).replace("config sae.", "config intervene.sae.").replace("in sae:", "in intervene.sae:")
            raise UserError(f"{msg} (the steering SAE's overrides of the sae section)") from None

    def sae_json(self, sae_section: dict[str, Any]) -> str:
        """``--config-json`` of the steering SAE's training job (:meth:`sae_config` less the grid keys)."""
        from diffatlas.sae.config import SAEConfig

        return SAEConfig.job_json(self.sae_config(sae_section).to_dict())

    def store_json(self, extract_section: dict[str, Any]) -> str:
        """``--config-json`` of the store's extraction job: the extract section's job keys with this
        section's layers and conditioning, and full-size spatial maps of every layer (a spatial SAE
        then sees the vectors the hook edits, position for position)."""
        from diffatlas.activations.config import ExtractConfig

        section = {**extract_section, "layers": list(self.layers), "conditioning": self.conditioning, "spatial": True,
                   "spatial_layers": None, "spatial_max_size": None}
        ExtractConfig.from_dict({k: section[k] for k in ExtractConfig.field_names() if k in section})  # checks it
        return ExtractConfig.job_json(section)
