"""The ``daam`` config section as dataclasses, and the prompt sets it names.

``config.yaml``::

    daam:
      models: [shapesworld]
      datasets: [shapesworld]          # real-image mode (captions; masks to score against)
      prompt_sets:
        captions: {kind: shapesworld_captions, n_prompts: 16}
        entanglement: {kind: entanglement}
        # mine: {kind: list, prompts: ["a photo of a dog on a bench"]}
      steps: 20
      guidance: 3.0
      ...

Prompt-set kinds:

* ``shapesworld_captions``: ``n_prompts`` captions drawn from the world's grammar (seeded;
  one or two objects), so the parse and the objects of every prompt are known.
* ``list``: the user's ``prompts`` (free text; relations from spaCy when installed).
* ``entanglement``: the prompts of the two entanglement studies. *Cohyponym*: pairs of
  objects whose descriptions differ only in the noun ("a red circle and a red square": sister
  terms under "red shape") against *non-cohyponym* controls that differ in noun and colour
  ("a red circle and a blue square"). ShapesWorld has a single noun category (shapes), so
  closeness of two descriptions is the number of attributes they share; with other models
  give ``cohyponym`` / ``non_cohyponym`` prompt lists yourself (e.g. "a giraffe and a zebra"
  vs "a giraffe and a chair"). *Adjective swaps*: ``adjective_template`` for every adjective
  and noun, ``n_seeds`` seeds each (the same seeds for every adjective).

``__post_init__`` re-checks every value so the library is safe to call without Snakemake.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from diffatlas.errors import UserError
from diffatlas.sections import ConfigSection

if TYPE_CHECKING:
    from diffatlas.models.diffusion import Time

PROMPT_KINDS = ("shapesworld_captions", "list", "entanglement")
REAL_MODES = ("noise", "invert")


def _int(key: str, value: Any, lo: int, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
        upper = f" and <= {hi}" if hi is not None else ""
        raise UserError(f"config daam.{key} = {value!r} is not allowed; allowed: an integer >= {lo}{upper}")
    return value


def _num(key: str, value: Any, lo: float, hi: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < lo or (hi is not None and value > hi):
        upper = f" and <= {hi}" if hi is not None else ""
        raise UserError(f"config daam.{key} = {value!r} is not allowed; allowed: a number >= {lo}{upper}")
    return float(value)


@dataclass
class PromptSet:
    """One entry of ``daam.prompt_sets``."""

    name: str
    kind: str = "shapesworld_captions"
    """shapesworld_captions | list | entanglement."""
    n_prompts: int = 16
    """shapesworld_captions: number of captions."""
    seed: int = 1
    """shapesworld_captions / entanglement: seed of the caption draw."""
    two_object_fraction: float = 0.5
    """shapesworld_captions: share of two-object captions."""
    prompts: list[str] = field(default_factory=list)
    """list: the prompts."""
    cohyponym: list[str] | None = None
    """entanglement: cohyponym prompts (default: ShapesWorld pairs differing only in the noun)."""
    non_cohyponym: list[str] | None = None
    """entanglement: control prompts (default: ShapesWorld pairs differing in noun and colour)."""
    n_pairs: int = 6
    """entanglement: number of default pairs per group."""
    adjectives: list[str] = field(default_factory=lambda: ["red", "green", "blue"])
    """entanglement: adjectives swapped in adjective_template."""
    nouns: list[str] = field(default_factory=lambda: ["square", "circle"])
    """entanglement: nouns of the adjective swaps."""
    adjective_template: str = "a {adjective} {noun}"
    """entanglement: prompt of an adjective swap."""
    n_seeds: int = 2
    """entanglement: images per prompt (same seeds across adjectives)."""

    def __post_init__(self) -> None:
        where = f"prompt_sets.{self.name}"
        if self.kind not in PROMPT_KINDS:
            raise UserError(f"config daam.{where}.kind = {self.kind!r} is not allowed; allowed: {', '.join(PROMPT_KINDS)}")
        _int(f"{where}.n_prompts", self.n_prompts, 1)
        _int(f"{where}.seed", self.seed, 0)
        _int(f"{where}.n_pairs", self.n_pairs, 1)
        _int(f"{where}.n_seeds", self.n_seeds, 1)
        _num(f"{where}.two_object_fraction", self.two_object_fraction, 0.0, 1.0)
        if self.kind == "list":
            if not self.prompts:
                raise UserError(f"config daam.{where}: kind list needs a non-empty 'prompts' list")
            for i, p in enumerate(self.prompts):
                if not isinstance(p, str) or not p.strip():
                    raise UserError(f"config daam.{where}.prompts[{i}] = {p!r} is empty; every prompt needs a word")
        if self.kind == "entanglement":
            if "{adjective}" not in self.adjective_template or "{noun}" not in self.adjective_template:
                raise UserError(f"config daam.{where}.adjective_template must contain {{adjective}} and {{noun}}")

    def build(self) -> tuple[list[str], list[dict[str, Any]]]:
        """The prompts and, per prompt, what it is (group, adjective, noun...)."""
        if self.kind == "list":
            return list(self.prompts), [{"group": "list"} for _ in self.prompts]
        if self.kind == "shapesworld_captions":
            from diffatlas.data.shapesworld import generate_shapesworld

            data = generate_shapesworld(
                {"n_samples": self.n_prompts, "seed": self.seed, "two_object_fraction": self.two_object_fraction, "image_size": 32}
            )
            caps = list(data.meta["caption"])
            return caps, [{"group": "captions"} for _ in caps]
        return self._entanglement()

    def _entanglement(self) -> tuple[list[str], list[dict[str, Any]]]:
        from diffatlas.data.shapesworld import COLOURS, SHAPES

        prompts: list[str] = []
        meta: list[dict[str, Any]] = []
        shape_pairs = list(itertools.permutations(SHAPES, 2))
        colour_pairs = list(itertools.permutations(COLOURS, 2))
        coh = self.cohyponym
        if coh is None:
            coh = [
                f"a {COLOURS[i % len(COLOURS)]} {a} and a {COLOURS[i % len(COLOURS)]} {b}"
                for i, (a, b) in zip(range(self.n_pairs), itertools.cycle(shape_pairs))
            ]
        non = self.non_cohyponym
        if non is None:
            non = [
                f"a {c1} {a} and a {c2} {b}"
                for i, ((a, b), (c1, c2)) in zip(range(self.n_pairs), zip(itertools.cycle(shape_pairs), itertools.cycle(colour_pairs[::3])))
            ]
        for group, ps in (("cohyponym", coh), ("non_cohyponym", non)):
            for p in ps:
                prompts.append(p)
                meta.append({"group": group})
        for noun in self.nouns:
            for adj in self.adjectives:
                prompts.append(self.adjective_template.format(adjective=adj, noun=noun))
                meta.append({"group": "adjective", "adjective": adj, "noun": noun})
        return prompts, meta


#: DAAM's traced layers: the cross-attention of the down and up blocks, as the reference
#: implementation (Tang et al., ACL 2023) locates them; it leaves the mid block out (its maps
#: are the coarsest, 8x8 on SD at 512 px) unless attention heads are saved or loaded.
PAPER_LAYERS = ("down_blocks.*attn2", "up_blocks.*attn2")


@dataclass
class DAAMConfig(ConfigSection):
    """The ``daam`` section (config.schema.yaml is checked against these defaults)."""

    SECTION = "daam"
    _TRACE = ("steps", "seed", "tau", "taus", "layers", "time_resolved", "batch_size")
    #: daam-generate gets its own prompt set only; daam-real none. The grid (models, datasets,
    #: other prompt sets) and the figures' overlay_items reach no job.
    JOB_FREE_KEYS = ("models", "datasets")
    JOBS = {
        "generate": _TRACE + ("prompt_sets", "n_images", "guidance", "map_size"),
        "real": _TRACE + ("n_real", "real_mode", "real_t", "real_sigma", "real_guidance"),
        "figure": ("overlay_items",),
    }

    models: list[str] = field(default_factory=lambda: ["shapesworld"])
    """Models to trace (names from ``models``)."""
    datasets: list[str] = field(default_factory=lambda: ["shapesworld"])
    """Datasets for real-image mode (names from ``datasets``; need captions, masks to score)."""
    prompt_sets: dict[str, dict[str, Any]] = field(
        default_factory=lambda: {"captions": {"kind": "shapesworld_captions", "n_prompts": 16}}
    )
    """Prompt sets by name (the {prompt_set} wildcard)."""
    n_images: int = 1
    """Images per prompt (shapesworld_captions and list sets)."""
    steps: int = 20
    """DDIM steps of generation and of the real-image schedule."""
    guidance: float = 3.0
    """CFG scale of generation (<= 1: no CFG)."""
    seed: int = 0
    """Image k of a run uses seed + k."""
    tau: float = 0.4
    """Threshold of the binary masks (DAAM paper: 0.4)."""
    taus: list[float] = field(default_factory=lambda: [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9])
    """Threshold sweep."""
    layers: list[str] = field(default_factory=lambda: list(PAPER_LAYERS))
    """Module-path globs of the traced cross-attention modules (default: the down and up blocks', as DAAM)."""
    time_resolved: bool = False
    """Also store maps per timestep and resolution (zarr)."""
    batch_size: int = 16
    """Images per pipeline call."""
    map_size: int | None = None
    """Side of the stored maps in generation mode (null: the image size)."""
    n_real: int = 32
    """Real-image mode: the first n dataset images with a caption."""
    real_mode: str = "noise"
    """noise: noise the image to its start time; invert: invert it there (DDIM, or Euler flow inversion)."""
    real_t: int | str = 400
    """DDPM-family models: training-scale timestep real images are noised/inverted to (400 or 't400')."""
    real_sigma: float | str = "s0.600"
    """Flow-matching models (SD3, Flux): sigma real images are noised/inverted to ('s0.600' or 0.6)."""
    real_guidance: float = 1.0
    """CFG scale while denoising real images (1: conditional only)."""
    overlay_items: int = 6
    """Images shown in each overlay grid."""
    extra: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.reject_unknown()
        for key in ("models", "datasets", "layers"):
            val = getattr(self, key)
            if not isinstance(val, list) or not all(isinstance(v, str) and v for v in val):
                raise UserError(f"config daam.{key} = {val!r} is not allowed; allowed: a list of names")
        if not self.layers:
            raise UserError("config daam.layers is empty; allowed: module-path globs such as 'up_blocks.*attn2'")
        _int("n_images", self.n_images, 1)
        _int("steps", self.steps, 1)
        _num("guidance", self.guidance, 0.0)
        _int("seed", self.seed, 0)
        _num("tau", self.tau, 0.0, 1.0)
        for i, t in enumerate(self.taus):
            _num(f"taus[{i}]", t, 0.0, 1.0)
        if not self.taus:
            raise UserError("config daam.taus is empty; allowed: numbers in [0, 1]")
        _int("batch_size", self.batch_size, 1)
        if self.map_size is not None:
            _int("map_size", self.map_size, 1)
        _int("n_real", self.n_real, 1)
        if self.real_mode not in REAL_MODES:
            raise UserError(f"config daam.real_mode = {self.real_mode!r} is not allowed; allowed: {', '.join(REAL_MODES)}")
        self.real_start("step")  # both start times parse, each in its own convention
        self.real_start("sigma")
        _num("real_guidance", self.real_guidance, 0.0)
        _int("overlay_items", self.overlay_items, 1)
        if not isinstance(self.prompt_sets, dict):
            raise UserError("config daam.prompt_sets must map names to prompt-set settings")
        for name, spec in self.prompt_sets.items():
            if not isinstance(spec, dict):
                raise UserError(f"config daam.prompt_sets.{name} must be a mapping with a 'kind'")
            self.prompt_set(name)  # validates the entry

    def real_start(self, convention: str) -> "Time":
        """The start time of real-image DAAM for a model of ``convention`` (``"step"``: ``real_t``;
        ``"sigma"``: ``real_sigma``), as a :class:`~diffatlas.models.diffusion.Time`.

        The one place that picks the key: the daam-real job and the workflow's checks ask here.
        """
        from diffatlas.models.diffusion import Time

        key, value = ("real_sigma", self.real_sigma) if convention == "sigma" else ("real_t", self.real_t)
        allowed = ("a flow-matching sigma in (0, 1]: 's0.600' or 0.6" if convention == "sigma"
                   else "a training step: an integer >= 0 or 't400'")
        try:
            if convention == "sigma" and isinstance(value, (int, float)) and not isinstance(value, bool):
                t = Time.sigma(value)
            elif isinstance(value, bool) or not isinstance(value, (int, str)):
                raise UserError("not a time")
            else:
                t = Time.parse(value)
        except UserError:
            t = None
        if t is None or t.kind != convention or (t.kind == "sigma" and t.value <= 0):
            raise UserError(f"config daam.{key} = {value!r} is not allowed; allowed: {allowed}")
        return t

    def real_start_key(self, convention: str) -> str:
        """The config key :meth:`real_start` reads for ``convention`` (named in errors)."""
        return "daam.real_sigma" if convention == "sigma" else "daam.real_t"

    def prompt_set(self, name: str) -> PromptSet:
        if name not in self.prompt_sets:
            raise UserError(f"daam prompt set {name!r} is not configured; allowed: {', '.join(self.prompt_sets)}")
        spec = dict(self.prompt_sets[name])
        known = {f for f in PromptSet.__dataclass_fields__ if f != "name"}
        unknown = sorted(set(spec) - known)
        if unknown:
            raise UserError(f"config daam.prompt_sets.{name}: unknown key(s) {unknown}; allowed: {', '.join(sorted(known))}")
        return PromptSet(name=name, **spec)
