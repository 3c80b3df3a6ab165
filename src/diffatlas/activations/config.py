"""Settings of activation extraction (the ``extract`` section of config.yaml).

:class:`ExtractConfig` mirrors the section key for key (see config.schema.yaml for the same
documentation) and re-checks every value in ``__post_init__``, so the library is safe to
call without Snakemake. Checks that need the model (layer names, ``timesteps < T``) happen
in :func:`diffatlas.activations.extract.extract` once the model is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from diffatlas.accel import DTYPES
from diffatlas.errors import UserError
from diffatlas.sections import ConfigSection

POOLINGS = ("mean", "sum")
NOISE_MODES = ("forward", "inversion")
CONDITIONINGS = ("empty", "class_template", "caption")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _bad(key: str, value: Any, allowed: str) -> UserError:
    return UserError(f"config extract.{key} = {value!r} is not allowed; allowed: {allowed}")


@dataclass(frozen=True)
class ExtractConfig(ConfigSection):
    """What to extract and how (defaults: the ShapesWorld demo)."""

    SECTION = "extract"
    # The workflow grid: a job extracts one (model, dataset, timestep), given as paths and
    # ``--timestep``, so adding a timestep re-runs no finished job.
    # shard_size cuts the grid further (which samples a job gets, as its dataset shard).
    JOB_FREE_KEYS = ("models", "datasets", "timesteps", "shard_size")

    models: list[str] = field(default_factory=lambda: ["shapesworld"])
    """Names from ``models`` to extract (workflow grid)."""
    datasets: list[str] = field(default_factory=lambda: ["shapesworld"])
    """Names from ``datasets`` to extract (workflow grid)."""
    layers: list[str] = field(default_factory=lambda: ["mid", "up_ft0", "up_ft1"])
    """Aliases (mid, up_ft{i}, down_ft{i}, block{i}; SD3/Flux: block{i}.image, block{i}.text,
    single_block{i}[.image|.text]) or module-path globs."""
    timesteps: list[int | str] = field(default_factory=lambda: [50, 250, 500])
    """Training-scale timesteps 0..T-1 (or 't250'); flow-matching models (SD3, Flux): sigmas 's0.500'."""
    pooling: str = "mean"
    """Spatial pooling of the pooled arrays: mean or sum."""
    spatial: bool = True
    """Also store spatial maps (float16) of every layer (unless spatial_layers narrows it)."""
    spatial_layers: list[str] | None = None
    """Only these layers keep spatial maps (names as in ``layers``); null = all when spatial."""
    spatial_max_size: int | None = 16
    """Cap on each side of a stored map (average pooling); null keeps full size."""
    batch_size: int = 64
    """Images per forward pass."""
    shard_size: int | None = None
    """Samples per shard: a larger dataset is ingested in shards of this many candidates and
    extracted one job per (model, dataset, timestep, shard), then gathered into one store; a
    multiple of batch_size lets the gather link chunks instead of copying them. null = one shard."""
    seed: int = 0
    """Seed of the per-(image, timestep) noise."""
    noise: str = "forward"
    """forward: seeded forward noising; inversion: deterministic DDIM inversion with the model."""
    noise_ensemble: int = 1
    """Forward noise only: activations are averaged over this many noise draws."""
    inversion_steps: int = 50
    """DDIM inversion: a grid of ``steps`` equally spaced timesteps over 0..T-1; the path to t
    follows the grid points below t, then steps onto t (so t's result depends on t alone)."""
    conditioning: str = "empty"
    """empty prompt (Revelio's default), class_template (prompt_template with the label) or caption."""
    prompt_template: str = "a {label}"
    """Prompt for conditioning=class_template; ``{label}`` is the fine class name."""
    guidance_scale: float = 1.0
    """Classifier-free guidance of the inversion's noise prediction (1 = none). The captured
    pass is always the conditional one."""
    dtype: str = "auto"
    """Compute dtype: auto (float16 autocast on CUDA, float32 on CPU), float32, float16, bfloat16."""
    extra: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        for key in ("models", "datasets", "layers"):
            value = getattr(self, key)
            if not isinstance(value, list) or not all(isinstance(x, str) and x for x in value):
                raise _bad(key, value, "a list of names")
        if not self.layers:
            raise _bad("layers", self.layers, "at least one layer (mid, up_ft0..3, down_ft0..3, block{i} or a module path)")
        if len(set(self.layers)) != len(self.layers):
            raise _bad("layers", self.layers, "each layer once")
        allowed_times = "a non-empty list of integers 0..T-1 (training scale), or flow-matching sigmas 's0.500' in [0, 1]"
        if not isinstance(self.timesteps, list) or not self.timesteps:
            raise _bad("timesteps", self.timesteps, allowed_times)
        from diffatlas.models.diffusion import Time

        for t in self.timesteps:
            if isinstance(t, bool) or not isinstance(t, (int, str)) or (_is_int(t) and t < 0):
                raise _bad("timesteps", self.timesteps, allowed_times)
            try:
                Time.parse(t)
            except UserError:
                raise _bad("timesteps", self.timesteps, allowed_times) from None
        if len({str(Time.parse(t)) for t in self.timesteps}) != len(self.timesteps):
            raise _bad("timesteps", self.timesteps, "each timestep once")
        if self.pooling not in POOLINGS:
            raise _bad("pooling", self.pooling, ", ".join(POOLINGS))
        if not isinstance(self.spatial, bool):
            raise _bad("spatial", self.spatial, "true, false")
        if self.spatial_layers is not None:
            if not isinstance(self.spatial_layers, list) or not all(isinstance(x, str) for x in self.spatial_layers):
                raise _bad("spatial_layers", self.spatial_layers, "null or a list of names from extract.layers")
            unknown = [x for x in self.spatial_layers if x not in self.layers]
            if unknown:
                raise _bad("spatial_layers", unknown, f"names from extract.layers ({', '.join(self.layers)})")
        if self.spatial_max_size is not None and (not _is_int(self.spatial_max_size) or self.spatial_max_size < 1):
            raise _bad("spatial_max_size", self.spatial_max_size, "null or an integer >= 1")
        for key, low in (("batch_size", 1), ("seed", 0), ("noise_ensemble", 1), ("inversion_steps", 1)):
            value = getattr(self, key)
            if not _is_int(value) or value < low:
                raise _bad(key, value, f"an integer >= {low}")
        if self.shard_size is not None and (not _is_int(self.shard_size) or self.shard_size < 1):
            raise _bad("shard_size", self.shard_size, "null (one shard) or an integer >= 1")
        if self.noise not in NOISE_MODES:
            raise _bad("noise", self.noise, ", ".join(NOISE_MODES))
        if self.noise == "inversion" and self.noise_ensemble != 1:
            raise _bad("noise_ensemble", self.noise_ensemble, "1 with noise: inversion (DDIM inversion is deterministic)")
        if self.conditioning not in CONDITIONINGS:
            raise _bad("conditioning", self.conditioning, ", ".join(CONDITIONINGS))
        if not isinstance(self.prompt_template, str) or "{label}" not in self.prompt_template:
            raise _bad("prompt_template", self.prompt_template, "a string containing {label}")
        try:
            self.prompt_template.format(label="x")
        except (KeyError, IndexError, ValueError) as err:
            raise _bad("prompt_template", self.prompt_template, f"a format string whose only field is {{label}} ({err})") from None
        if isinstance(self.guidance_scale, bool) or not isinstance(self.guidance_scale, (int, float)) or self.guidance_scale < 0:
            raise _bad("guidance_scale", self.guidance_scale, "a number >= 0 (1 = no guidance)")
        if self.dtype not in DTYPES:
            raise _bad("dtype", self.dtype, ", ".join(DTYPES))
        self.reject_unknown()

    @property
    def layers_with_maps(self) -> list[str]:
        """Layer names (as in ``layers``) that keep spatial maps."""
        if self.spatial_layers is not None:
            return list(self.spatial_layers)
        return list(self.layers) if self.spatial else []
