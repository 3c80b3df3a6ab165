"""Configuration of the latent-geometry stage (the ``geometry`` section of config.yaml).

:class:`GeometryConfig` holds every knob of the pullback-geometry analyses (Park et al.,
NeurIPS 2023): which feature map ``f: x_t -> h`` is pulled back, how its top singular
vectors are found, how samples are drawn, and how edits are made. It is validated in
``__post_init__`` so the library is safe to call without Snakemake; values that depend on
the model (timesteps within ``0..T-1``, ``n_directions`` within the input dimension, the
layer) are checked once the model is loaded, with the same kind of message.

The defaults are the CPU demo (a few samples, few directions, few DDIM steps); users scale
up by config.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from diffatlas.accel import DTYPES
from diffatlas.errors import UserError
from diffatlas.models.diffusion import Time
from diffatlas.sections import ConfigSection

POOLINGS = ("sum", "mean", "none")
BATCHING = ("vmap", "loop")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _bad(key: str, value: Any, allowed: str) -> UserError:
    return UserError(f"config geometry.{key} = {value!r} is not allowed; allowed: {allowed}")


def _is_time(x: Any) -> bool:
    """A training step (int >= 0) or a flow-matching sigma token ``"s0.500"``."""
    if _is_int(x):
        return x >= 0
    try:
        return isinstance(x, str) and Time.parse(x).kind == "sigma"
    except UserError:
        return False


@dataclass(frozen=True)
class GeometryConfig(ConfigSection):
    """Settings of the pullback-geometry stage (defaults: the CPU demo)."""

    SECTION = "geometry"
    _PULLBACK = ("layer", "pooling", "prompt", "seed", "dtype", "attention_chunk")
    _SAMPLING = ("n_samples", "guidance_scale", "ddim_steps")
    _BASIS = ("n_directions", "oversample", "tol", "max_iters", "batching", "chunk_size", "conv_tf32")
    _EDITS = ("edit_strengths", "edit_directions", "kappa")
    #: Keys each geometry job reads (the grid: models, timesteps, meaning_models; the figure's
    #: global_direction reach none). A basis job gets iterative_timesteps cut to its own
    #: timestep (:meth:`iterative_slice`), so adding a timestep re-runs no finished job.
    JOB_FREE_KEYS = ("models", "timesteps", "meaning_models", "global_direction")
    JOBS = {
        "basis": _PULLBACK + _SAMPLING + _BASIS + _EDITS
        + ("edit_samples", "iterative_substeps", "iterative_directions", "iterative_timesteps"),
        "global": _PULLBACK + _SAMPLING + _EDITS + ("n_directions", "global_timestep", "global_sigma", "global_samples"),
        # edit_directions rides along only because it is validated against n_directions.
        "paths": _PULLBACK + _BASIS + ("global_timestep", "global_sigma", "path_pairs", "path_segments", "edit_directions"),
    }

    models: list[str] = field(default_factory=lambda: ["shapesworld"])
    """Models to analyse (workflow grid; names of config ``models``)."""
    timesteps: list[int] = field(default_factory=lambda: [999, 500, 100])
    """Training-scale timesteps (0..T-1) at which the geometry is computed (workflow grid)."""
    layer: str = "mid"
    """Feature map h: a layer alias (``mid`` = U-Net bottleneck, Park et al.'s h-space) or one module path."""
    pooling: str = "sum"
    """How h is reduced over space: sum (Park et al.), mean, or none (the full map, flattened)."""
    n_directions: int = 4
    """Top singular directions kept per sample (n)."""
    oversample: int = 2
    """Extra vectors in the iteration block (block = n + oversample): faster, safer convergence."""
    tol: float = 1e-2
    """Stop when every kept direction's relative residual ||J^T u_i - σ_i v_i|| / σ_i is below this
    (1e-3 or less for publication-grade vectors; a residual r bounds a vector's angle by ~r σ_i / gap)."""
    max_iters: int = 40
    """Iteration cap of the block subspace iteration (a run that hits it is marked not converged)."""
    batching: str = "vmap"
    """vmap: one batched JVP and one batched VJP per round (fast); loop: one per direction (reference)."""
    chunk_size: int | None = None
    """Directions per vmapped chunk (null = all at once); lower it when memory is tight."""
    conv_tf32: bool = True
    """CUDA only: let cuDNN convolutions of the Jacobian passes use TensorFloat-32 (matmuls stay
    float32). Its rounding (σ rel. 1.6e-4 at SD1.5 size) is far below ``tol``, and cuDNN's strict
    float32 algorithms nearly triple the peak (18.8 vs 6.5 GiB at 512 px); false for strict float32."""
    attention_chunk: int | None = 64
    """Tokens per block of the Jacobian's exact attention and transformer feed-forward (null = the
    whole attention matrix per tangent at once, 4096x4096 per head at SD1.5's 512 px, and the
    feed-forward over all tokens); lower it when memory is tight."""
    dtype: str = "auto"
    """Compute dtype of the no-grad denoiser passes (DDIM sampling, edits): auto = float16 autocast
    on CUDA, float32 on CPU; float32 | float16 | bfloat16. The Jacobian is always float32."""
    n_samples: int = 3
    """Samples (x_T ~ N(0, I), DDIM to t) whose local basis is computed per timestep."""
    seed: int = 0
    """Seed of the samples' x_T and of the iteration's start block."""
    prompt: str = ""
    """Conditioning prompt of every denoiser call ("" = the empty prompt)."""
    guidance_scale: float = 1.0
    """CFG weight of the DDIM sampling (1 = no guidance; the Jacobian always uses the prompt alone)."""
    ddim_steps: int = 8
    """DDIM steps over the whole range T-1 -> 0; a segment t -> s takes its proportional share (>= 1)."""
    edit_strengths: list[float] = field(default_factory=lambda: [-8.0, -4.0, 4.0, 8.0])
    """Edit strengths γ of x' = x + γ v (v unit norm in x_t space); 0 (no edit) is always added."""
    edit_directions: int = 3
    """Top directions edited per sample (<= n_directions)."""
    edit_samples: int | None = 2
    """Samples edited per timestep (null = all n_samples)."""
    kappa: float = 0.99
    """κ of Park et al.'s x0-normalised edit x_t' = x_t + sqrt(ᾱ)/(1 - κ sqrt(1-ᾱ)) (x0' - x0(x_t)): the slope taken
    for the noise prediction in the first-order update, in [0, 1) (Park et al.: 0.99)."""
    iterative_substeps: int = 1
    """Geodesic-shooting steps between consecutive positive strengths (0 = no iterative edits)."""
    iterative_directions: int = 1
    """Top directions edited iteratively (parallel transport), for the first sample."""
    iterative_timesteps: list[int | str] | None = field(default_factory=lambda: [999])
    """Times at which iterative edits are made (null = every time; each costs a few basis recomputations):
    training steps, and for flow-matching models sigmas ``"s1.000"``; a model uses the entries of its own kind."""
    global_timestep: int = 999
    """Timestep of the global directions and path lengths on DDPM-family models (Park et al.: t = T-1)."""
    global_sigma: float = 1.0
    """σ of the global directions and path lengths on flow-matching models (SD3, Flux): 1 = pure noise,
    where their generation starts (the counterpart of t = T-1)."""
    global_samples: int = 3
    """Samples a global direction is applied to in the global-direction figure."""
    global_direction: int = 0
    """Which global direction (rank) the figure shows."""
    path_pairs: int = 2
    """Pairs of Gaussian latents of the semantic path-length table (Park et al.: 50). Each pair costs a
    tangent basis at every path point: 3 (path_segments - 1) + 3 bases."""
    path_segments: int = 6
    """Segments of each path, lerp, slerp and geodesic shooting (Park et al.: 30)."""
    meaning_models: list[str] = field(default_factory=lambda: ["shapesworld"])
    """Models whose edits are judged with the ShapesWorld detector (which factor each direction changes)."""
    extra: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("n_directions", "max_iters", "n_samples", "ddim_steps", "edit_directions", "path_pairs",
                     "path_segments", "global_samples"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise _bad(name, value, "an integer >= 1")
        for name in ("oversample", "seed", "iterative_substeps", "iterative_directions", "global_direction", "global_timestep"):
            value = getattr(self, name)
            if not _is_int(value) or value < 0:
                raise _bad(name, value, "an integer >= 0")
        if self.chunk_size is not None and (not _is_int(self.chunk_size) or self.chunk_size < 1):
            raise _bad("chunk_size", self.chunk_size, "null or an integer >= 1")
        if self.dtype not in DTYPES:
            raise _bad("dtype", self.dtype, ", ".join(DTYPES))
        if self.attention_chunk is not None and (not _is_int(self.attention_chunk) or self.attention_chunk < 1):
            raise _bad("attention_chunk", self.attention_chunk, "null or an integer >= 1")
        if self.edit_samples is not None and (not _is_int(self.edit_samples) or self.edit_samples < 1):
            raise _bad("edit_samples", self.edit_samples, "null or an integer >= 1")
        if not isinstance(self.models, (list, tuple)) or not all(isinstance(m, str) for m in self.models):
            raise _bad("models", self.models, "a list of model names")
        if not isinstance(self.meaning_models, (list, tuple)) or not all(isinstance(m, str) for m in self.meaning_models):
            raise _bad("meaning_models", self.meaning_models, "a list of model names")
        if self.iterative_timesteps is not None and (
            not isinstance(self.iterative_timesteps, (list, tuple))
            or not all(_is_time(t) for t in self.iterative_timesteps)
        ):
            raise _bad("iterative_timesteps", self.iterative_timesteps,
                       "null or a list of integers >= 0 (steps) and sigmas 's0.500' (flow-matching models)")
        if not isinstance(self.timesteps, (list, tuple)) or not self.timesteps:
            raise _bad("timesteps", self.timesteps, "a non-empty list of integers >= 0")
        for t in self.timesteps:
            if not _is_time(t):
                raise _bad("timesteps", self.timesteps, "a non-empty list of integers >= 0 (training scale 0..T-1) "
                           "or sigmas 's0.500' (flow-matching models)")
        if not _is_num(self.global_sigma) or not 0 <= self.global_sigma <= 1:
            raise _bad("global_sigma", self.global_sigma, "a number in [0, 1] (1 = pure noise, where flow sampling starts)")
        if not isinstance(self.layer, str) or not self.layer:
            raise _bad("layer", self.layer, "a layer alias (mid, up_ft0, ...) or a module path")
        if self.pooling not in POOLINGS:
            raise _bad("pooling", self.pooling, ", ".join(POOLINGS))
        if self.batching not in BATCHING:
            raise _bad("batching", self.batching, ", ".join(BATCHING))
        if not _is_num(self.tol) or not self.tol > 0:
            raise _bad("tol", self.tol, "a number > 0")
        if not _is_num(self.guidance_scale) or self.guidance_scale < 0:
            raise _bad("guidance_scale", self.guidance_scale, "a number >= 0 (<= 1 means no guidance)")
        if not _is_num(self.kappa) or not 0 <= self.kappa < 1:
            raise _bad("kappa", self.kappa, "a number in [0, 1) (the noise prediction's slope in the x0 update)")
        if not isinstance(self.prompt, str):
            raise _bad("prompt", self.prompt, "a string")
        if not isinstance(self.edit_strengths, (list, tuple)) or not self.edit_strengths:
            raise _bad("edit_strengths", self.edit_strengths, "a non-empty list of numbers")
        if not all(_is_num(g) for g in self.edit_strengths):
            raise _bad("edit_strengths", self.edit_strengths, "a non-empty list of numbers")
        if self.edit_directions > self.n_directions:
            raise _bad("edit_directions", self.edit_directions, f"an integer <= n_directions ({self.n_directions})")
        if self.iterative_directions > self.n_directions:
            raise _bad("iterative_directions", self.iterative_directions, f"an integer <= n_directions ({self.n_directions})")
        if self.global_direction >= self.n_directions:
            raise _bad("global_direction", self.global_direction, f"an integer < n_directions ({self.n_directions})")
        self.reject_unknown()

    # ------------------------------------------------------------------ derived values
    @property
    def strengths(self) -> list[float]:
        """Sorted edit strengths with 0 (the unedited reference) included once."""
        return sorted({0.0, *(float(g) for g in self.edit_strengths)})

    def iterative_at(self, timestep: "int | str | Time") -> bool:
        """Whether iterative edits are made at ``timestep`` (a step, or a Time / ``"s0.500"``)."""
        return self.iterative_substeps > 0 and self.iterative_directions > 0 and (
            self.iterative_timesteps is None
            or Time.parse(timestep) in {Time.parse(t) for t in self.iterative_timesteps}
        )

    def global_time(self, convention: str) -> Time:
        """The time of the global directions and path lengths for a model of ``convention``
        (``"step"``: ``global_timestep``; ``"sigma"``: ``global_sigma``)."""
        return Time.sigma(self.global_sigma) if convention == "sigma" else Time.step(self.global_timestep)

    @staticmethod
    def iterative_slice(iterative_timesteps: list[int | str] | None, timestep: "int | str | Time") -> list | None:
        """``iterative_timesteps`` as one basis job at ``timestep`` needs it: null stays null
        (every timestep), a list becomes ``[timestep]`` (as the list writes it) or ``[]``; the job's
        edits are the same."""
        if iterative_timesteps is None:
            return None
        own = Time.parse(timestep)
        return [t for t in iterative_timesteps if Time.parse(t) == own][:1]

    @property
    def n_edit_samples(self) -> int:
        return min(self.n_samples, self.edit_samples or self.n_samples)

    # ------------------------------------------------------------------ (de)serialisation
    def replace(self, **changes: Any) -> "GeometryConfig":
        return dataclasses.replace(self, **changes)
