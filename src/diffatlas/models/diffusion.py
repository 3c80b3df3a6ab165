"""The one diffusion core: the sampling maths every stage uses, written once.

Nothing here imports a stage; every stage imports from here. The formulas follow the DDIM
paper (Song et al., 2021, eq. 12) in the variance-preserving parameterisation of DDPM-family
schedulers, with ``a = ᾱ_t`` the cumulative product of ``1 - β``::

    forward noising   x_t = sqrt(a) x0 + sqrt(1 - a) ε                          (add_noise)
    ε-prediction      x0 = (x_t - sqrt(1 - a) ε) / sqrt(a)
    v-prediction      v = sqrt(a) ε - sqrt(1 - a) x0  =>  x0 = sqrt(a) x_t - sqrt(1 - a) v,
                                                          ε  = sqrt(a) v + sqrt(1 - a) x_t
    x0-prediction     ε = (x_t - sqrt(a) x0) / sqrt(1 - a)
    DDIM step a -> a' x_{t'} = sqrt(a') x0 + sqrt(1 - a' - σ²) ε + σ z,
                      σ = η sqrt((1 - a') / (1 - a)) sqrt(1 - a / a')

**Clipping.** Where the scheduler clips x0 (``clip_sample``), the sampling step re-derives ε
from the clipped x0 (diffusers' ``DDIMScheduler.step(..., use_clipped_model_output=True)``):
a clipped x0 next to the model's own ε pushes the sample against a strongly guided change
(colours flip on the ShapesWorld model). The inversion step clips x0 but keeps the model's ε,
exactly as diffusers' ``DDIMInverseScheduler.step`` does.

**Classifier-free guidance.** One batch layout everywhere: the unconditional rows come
first, the conditional rows second (``[uncond_0..uncond_{N-1}, cond_0..cond_{N-1}]``), as in
diffusers' ``StableDiffusionPipeline``; :func:`cfg_combine` mixes
``out_u + w (out_c - out_u)`` (w <= 1: no guidance, conditional pass only).

**Time** is a type (:class:`Time`): a model's own convention, an integer training step
(with ᾱ) for DDPM-family schedulers, or σ in [0, 1] for flow-matching schedulers (SD3, Flux).
Its one string form for paths and wildcards is ``t250`` / ``s0.500``.

**Flow matching** (rectified flow, Esser et al. 2024 / SD3; Flux) uses the straight path
between data and noise, and the network predicts its velocity::

    forward noising   x_σ = (1 - σ) x0 + σ ε                                   (flow_add_noise)
    velocity          v = dx_σ/dσ = ε - x0                                     (flow_velocity)
                      =>  x0 = x_σ - σ v,   ε = x_σ + (1 - σ) v                (flow_eps_x0)
    Euler step σ -> σ' x_σ' = x_σ + (σ' - σ) v                                  (flow_step)

The same Euler step with σ' > σ is the flow inversion (:func:`flow_invert`). This is
diffusers' ``FlowMatchEulerDiscreteScheduler`` (``scale_noise``, ``step``), which reports
``σ · num_train_timesteps`` as its "timestep" (:func:`flow_scheduler_timestep`); artifacts
record both, and the noising rule (:data:`FLOW_NOISING_RULE`).

Shapes: ``x``, ``x_t``, ``x0``, ``ε`` and model outputs are ``[B, C, h, w]``; ᾱ is a Python
float (one level for the whole batch) or a ``[B]`` tensor (one level per row).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from diffatlas.errors import UserError

#: The ``prediction_type`` values of diffusers' DDPM-family schedulers.
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")

#: Scheduler classes whose time axis is σ in [0, 1] (flow matching).
FLOW_MATCHING_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler")

#: The forward process of flow-matching models, recorded with their artifacts.
FLOW_NOISING_RULE = "x_sigma = (1 - sigma) * x0 + sigma * eps; model output v = eps - x0"

#: The forward process of DDPM-family models, recorded with their artifacts.
DDPM_NOISING_RULE = "x_t = sqrt(alpha_bar_t) * x0 + sqrt(1 - alpha_bar_t) * eps"

CLEAN = -1
"""The clean end of a trajectory (no noise): start of an inversion, end of a denoising run."""


# ---------------------------------------------------------------------------------- time
@dataclass(frozen=True, order=True)
class Time:
    """A point on a model's noise axis, in the model's own convention.

    ``kind = "step"``: an integer training step 0..T-1 of a DDPM-family scheduler (the model
    is conditioned on it; its noise level is ᾱ = ``alphas_cumprod[value]``).
    ``kind = "sigma"``: σ in [0, 1] of a flow-matching scheduler (x_σ = (1 - σ) x0 + σ ε).

    ``str(time)`` is the one form used in paths and wildcards: ``t250`` / ``s0.500``
    (σ with three decimals); :meth:`parse` reads it back (and a bare integer as a step).
    """

    kind: str
    value: int | float

    def __post_init__(self) -> None:
        if self.kind == "step":
            if isinstance(self.value, bool) or int(self.value) != self.value or self.value < 0:
                raise UserError(f"time step {self.value!r} is not allowed; allowed: integers >= 0 (training scale)")
            object.__setattr__(self, "value", int(self.value))
        elif self.kind == "sigma":
            v = float(self.value)
            if not 0.0 <= v <= 1.0:
                raise UserError(f"time sigma {self.value!r} is not allowed; allowed: numbers in [0, 1]")
            object.__setattr__(self, "value", round(v, 3))  # the string form is the identity
        else:
            raise UserError(f"time kind {self.kind!r} is not allowed; allowed: step, sigma")

    @classmethod
    def step(cls, t: int) -> "Time":
        return cls("step", t)

    @classmethod
    def sigma(cls, s: float) -> "Time":
        return cls("sigma", s)

    def __str__(self) -> str:
        return f"t{self.value}" if self.kind == "step" else f"s{self.value:.3f}"

    #: Regex of the string form (for wildcard constraints): ``t<int>`` or ``s<0..1>``.
    PATTERN = r"t[0-9]+|s(?:0(?:\.[0-9]+)?|1(?:\.0+)?)"

    @classmethod
    def parse(cls, text: "str | int | Time") -> "Time":
        """``"t250"`` / ``250`` -> step 250; ``"s0.500"`` -> σ 0.5. Anything else: UserError."""
        if isinstance(text, Time):
            return text
        if isinstance(text, (int, np.integer)) and not isinstance(text, bool):
            return cls.step(int(text))
        s = str(text).strip()
        if re.fullmatch(r"[0-9]+", s):
            return cls.step(int(s))
        if re.fullmatch(cls.PATTERN, s):
            return cls.step(int(s[1:])) if s[0] == "t" else cls.sigma(float(s[1:]))
        raise UserError(
            f"time {text!r} is not allowed; allowed: a training step 't250' (or the integer 250) "
            f"or a flow-matching sigma 's0.500' in [0, 1]"
        )


def time_convention(scheduler_config: dict[str, Any] | Any) -> str:
    """``"sigma"`` for flow-matching schedulers, ``"step"`` for every other (DDPM-family) one.

    ``scheduler_config``: the scheduler's config dict (``_class_name`` read from it) or the
    scheduler object itself.
    """
    if not isinstance(scheduler_config, dict):
        name = type(scheduler_config).__name__
    else:
        name = str(scheduler_config.get("_class_name", ""))
    return "sigma" if name in FLOW_MATCHING_SCHEDULERS else "step"


def check_time(time: Time | str | int, convention: str, num_train_timesteps: int | None, where: str, model: str) -> Time:
    """Parse ``time`` and check it fits a model of ``convention`` with T = ``num_train_timesteps``.

    ``where`` names the config key, ``model`` the model, in the error.
    """
    try:
        t = Time.parse(time)
    except UserError as err:
        raise UserError(f"config {where} (model {model!r}): {err}") from None
    if convention == "sigma":
        if t.kind != "sigma":
            raise UserError(
                f"config {where} = {time!r} is not allowed for model {model!r}: it is a flow-matching model, "
                f"whose times are sigmas; allowed: 's0.000'..'s1.000'"
            )
        return t
    if t.kind != "step":
        raise UserError(
            f"config {where} = {time!r} is not allowed for model {model!r}: its scheduler counts integer "
            f"training steps; allowed: integers 0..{(num_train_timesteps or 1000) - 1}"
        )
    if num_train_timesteps is not None and not 0 <= t.value < num_train_timesteps:
        raise UserError(
            f"config {where} = {time!r} is out of range for model {model!r}; allowed: integers "
            f"0..{num_train_timesteps - 1} (training scale, T = {num_train_timesteps} from its scheduler config)"
        )
    return t


def timesteps_for(config: dict[str, Any], model: str, section: str = "extract") -> list[Time]:
    """The times a stage runs ``model`` at: ``models.<model>.timesteps`` if set, else ``<section>.timesteps``.

    The per-model list speaks the model's own convention (steps or sigmas); the global list
    stays the default for every model that does not set one.
    """
    own = ((config.get("models") or {}).get(model) or {}).get("timesteps")
    values = own if own is not None else (config.get(section) or {}).get("timesteps") or []
    return [Time.parse(v) for v in values]


# ------------------------------------------------------------------------------ schedule
def prediction_type_of(scheduler: Any, model: str = "") -> str:
    """The scheduler's ``prediction_type``, checked: an unknown one is a UserError naming the model."""
    kind = getattr(scheduler.config, "prediction_type", "epsilon") if hasattr(scheduler, "config") else scheduler
    if kind not in PREDICTION_TYPES:
        raise UserError(
            f"model {model or '(unnamed)'}: scheduler prediction_type {kind!r} is not supported; "
            f"allowed: {', '.join(PREDICTION_TYPES)}"
        )
    return str(kind)


@dataclass(frozen=True)
class NoiseSchedule:
    """What a DDPM-family scheduler says about noise levels and the model's output.

    Attributes:
        alphas_cumprod: ᾱ_t for t = 0..T-1 (float64, CPU).
        final_alpha_cumprod: ᾱ of the clean end (:data:`CLEAN`): 1 with ``set_alpha_to_one``
            (diffusers' DDIM default), else ᾱ_0; it is also the start of DDIM inversion.
        prediction_type: ``"epsilon"``, ``"v_prediction"`` or ``"sample"``.
        clip_sample_range: clip x0 to [-r, r] in the DDIM steps, or None (no clipping).
    """

    alphas_cumprod: torch.Tensor
    final_alpha_cumprod: float
    prediction_type: str = "epsilon"
    clip_sample_range: float | None = None

    @classmethod
    def from_scheduler(cls, scheduler: Any, model: str = "") -> "NoiseSchedule":
        """Read a diffusers scheduler. UserError for an unknown prediction type, dynamic
        thresholding, or a scheduler without ``alphas_cumprod`` (flow matching)."""
        cfg = scheduler.config
        alphas = getattr(scheduler, "alphas_cumprod", None)
        if alphas is None:
            raise UserError(
                f"model {model or '(unnamed)'}: scheduler {type(scheduler).__name__} has no alphas_cumprod "
                f"(a flow-matching model?); this stage needs a DDPM-family scheduler (DDIM, DDPM, PNDM, Euler, ...)"
            )
        if getattr(cfg, "thresholding", False):
            raise UserError(
                f"model {model or '(unnamed)'}: scheduler uses dynamic thresholding, which diffatlas' DDIM does "
                f"not implement; allowed: thresholding false"
            )
        ab = torch.as_tensor(alphas, device="cpu").detach().to(torch.float64).clone()  # host copy, whatever the default device
        final = 1.0 if getattr(cfg, "set_alpha_to_one", True) else float(ab[0])
        clip = float(getattr(cfg, "clip_sample_range", 1.0)) if getattr(cfg, "clip_sample", False) else None
        return cls(ab, final, prediction_type_of(scheduler, model), clip)

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    def alpha_bar(self, t: int | Time) -> float:
        """ᾱ at training step ``t``; :data:`CLEAN` gives :attr:`final_alpha_cumprod`."""
        t = t.value if isinstance(t, Time) else int(t)
        return self.final_alpha_cumprod if t == CLEAN else float(self.alphas_cumprod[t])

    def alpha_bars(self, t: torch.Tensor | int, like: torch.Tensor) -> torch.Tensor | float:
        """ᾱ for an int (a float) or a ``[B]`` tensor of steps (a ``[B, 1, ..]`` tensor shaped for ``like``)."""
        if not torch.is_tensor(t) or t.ndim == 0:
            return self.alpha_bar(int(t))
        # float32 on the device (float64 is missing on some accelerators), float64 for float64 inputs.
        dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
        a = self.alphas_cumprod.to(like.device, dtype)[t.long().to(like.device)]
        return a.view(-1, *([1] * (like.ndim - 1)))

    def split(self, output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor | int) -> tuple[torch.Tensor, torch.Tensor]:
        """Model output at step(s) ``t`` -> (ε, x0), unclipped."""
        return eps_x0(output, x_t, self.alpha_bars(t, x_t), self.prediction_type)

    def ddim_step(
        self, output: torch.Tensor, x_t: torch.Tensor, t: int, t_prev: int, eta: float = 0.0,
        noise: torch.Tensor | None = None, generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """One DDIM step from step ``t`` to ``t_prev < t`` (:data:`CLEAN` = the clean end)."""
        return ddim_step(output, x_t, self.alpha_bar(t), self.alpha_bar(t_prev), self.prediction_type,
                         clip_range=self.clip_sample_range, eta=eta, noise=noise, generator=generator)

    def ddim_invert_step(self, output: torch.Tensor, x: torch.Tensor, t: int, t_next: int, clip: bool = True) -> torch.Tensor:
        """One DDIM inversion step from ``t`` (:data:`CLEAN` allowed) up to ``t_next > t``."""
        return ddim_invert_step(output, x, self.alpha_bar(t), self.alpha_bar(t_next), self.prediction_type,
                                clip_range=self.clip_sample_range if clip else None)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        """Forward noising to step(s) ``t`` (int or ``[B]``)."""
        return add_noise(x0, noise, self.alpha_bars(t, x0))


# ------------------------------------------------------------------------------ formulas
def _sqrt(a: float | torch.Tensor) -> float | torch.Tensor:
    return a.sqrt() if torch.is_tensor(a) else math.sqrt(a)


def _cast(a: float | torch.Tensor, like: torch.Tensor) -> float | torch.Tensor:
    return a.to(like.dtype) if torch.is_tensor(a) else a


def eps_x0(
    output: torch.Tensor, x_t: torch.Tensor, alpha_bar: float | torch.Tensor, prediction_type: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Model ``output`` at noise level ᾱ -> (ε, x0) for ``epsilon`` / ``v_prediction`` / ``sample``."""
    a = _cast(alpha_bar, x_t)
    sa, sb = _sqrt(a), _sqrt(1 - a)
    if prediction_type == "epsilon":
        return output, (x_t - sb * output) / sa
    if prediction_type == "v_prediction":
        return sa * output + sb * x_t, sa * x_t - sb * output
    if prediction_type == "sample":
        return (x_t - sa * output) / sb, output
    raise UserError(f"prediction_type {prediction_type!r} is not supported; allowed: {', '.join(PREDICTION_TYPES)}")


def clip_x0(x0: torch.Tensor, clip_range: float | None) -> torch.Tensor:
    """x0 clamped to [-r, r] (the scheduler's ``clip_sample``), or x0 itself when ``r`` is None."""
    return x0 if clip_range is None else x0.clamp(-clip_range, clip_range)


def ddim_step(
    output: torch.Tensor,
    x_t: torch.Tensor,
    alpha_bar: float,
    alpha_bar_prev: float,
    prediction_type: str = "epsilon",
    *,
    clip_range: float | None = None,
    eta: float = 0.0,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One DDIM step from ᾱ to ᾱ_prev (the less noisy level).

    Equals ``DDIMScheduler.step(output, t, x_t, eta, use_clipped_model_output=True)``: x0 is
    clipped when ``clip_range`` is set and ε is re-derived from it. ``eta > 0`` adds
    ``σ z`` with z = ``noise``, or drawn from ``generator`` as diffusers draws it (same shape,
    device and dtype as ``output``), so the same generator gives the same sample.
    """
    eps, x0 = eps_x0(output, x_t, alpha_bar, prediction_type)
    if clip_range is not None:  # (unclipped, the re-derived ε is the model's ε already)
        x0 = clip_x0(x0, clip_range)
        eps = (x_t - math.sqrt(alpha_bar) * x0) / math.sqrt(1.0 - alpha_bar)
    var = 0.0
    if eta > 0:
        var = (1.0 - alpha_bar_prev) / (1.0 - alpha_bar) * (1.0 - alpha_bar / alpha_bar_prev)
    std = eta * math.sqrt(max(var, 0.0))
    x_prev = math.sqrt(alpha_bar_prev) * x0 + math.sqrt(max(1.0 - alpha_bar_prev - std**2, 0.0)) * eps
    if eta > 0:
        if noise is None:
            # drawn where the generator lives (a CPU generator with CUDA tensors, as diffusers'
            # randn_tensor does), then moved: the same generator gives the same sample anywhere
            where = generator.device if generator is not None else output.device
            noise = torch.randn(output.shape, generator=generator, device=where, dtype=output.dtype)
        x_prev = x_prev + std * noise.to(x_prev.device, x_prev.dtype)
    return x_prev


def ddim_invert_step(
    output: torch.Tensor,
    x: torch.Tensor,
    alpha_bar: float,
    alpha_bar_next: float,
    prediction_type: str = "epsilon",
    *,
    clip_range: float | None = None,
) -> torch.Tensor:
    """One deterministic DDIM inversion step from ᾱ up to ᾱ_next (the noisier level).

    ``output`` is the model's output read at level ᾱ (where ``x`` is). Equals
    ``DDIMInverseScheduler.step``: x0 clipped when ``clip_range`` is set, the model's ε kept.
    """
    eps, x0 = eps_x0(output, x, alpha_bar, prediction_type)
    x0 = clip_x0(x0, clip_range)
    return math.sqrt(alpha_bar_next) * x0 + math.sqrt(1.0 - alpha_bar_next) * eps


def ddim_invert(
    eps_fn: Callable[[torch.Tensor, int], torch.Tensor],
    x: torch.Tensor,
    path: Sequence[int],
    alphas_cumprod: torch.Tensor | np.ndarray,
    start: int = CLEAN,
    clean_alpha: float = 1.0,
) -> torch.Tensor:
    """DDIM-invert ``x`` (at step ``start``, or :data:`CLEAN`) up through the steps ``path``.

    Each step reads the noise ``eps_fn(x, t_cur)`` at the level it starts from (step 0 for
    the clean start, whose ᾱ is ``clean_alpha``: the clean input itself has ᾱ = 1) and moves
    with :func:`ddim_invert_step`. ``path`` ascends above ``start``; an empty path returns
    ``x``; a path run in pieces gives the same result as one call. Scalars are float64.
    """
    ab = np.asarray(alphas_cumprod.detach().cpu() if isinstance(alphas_cumprod, torch.Tensor) else alphas_cumprod,
                    dtype=np.float64)
    t_cur = int(start)
    a_cur = float(clean_alpha) if t_cur == CLEAN else float(ab[t_cur])
    for t_next in path:
        if t_next <= t_cur:
            raise ValueError(f"inversion path must ascend above {t_cur}, got {t_next}")
        a_next = float(ab[t_next])
        eps = eps_fn(x, max(t_cur, 0)).to(x.dtype)
        x = ddim_invert_step(eps, x, a_cur, a_next, "epsilon")
        t_cur, a_cur = int(t_next), a_next
    return x


def add_noise(x0: torch.Tensor, noise: torch.Tensor, alpha_bar: float | torch.Tensor) -> torch.Tensor:
    """Forward process ``sqrt(ᾱ) x0 + sqrt(1 - ᾱ) ε`` (ᾱ a float, or ``[B, 1, ...]``)."""
    a = _cast(alpha_bar, x0)
    return _sqrt(a) * x0 + _sqrt(1 - a) * noise.to(x0.device, x0.dtype)


# ------------------------------------------------------------------------ flow matching
def _sigma_like(sigma: float | torch.Tensor, like: torch.Tensor) -> float | torch.Tensor:
    """σ as a float, or a ``[B]`` tensor shaped ``[B, 1, ...]`` on ``like``'s device and dtype."""
    if torch.is_tensor(sigma) and sigma.ndim > 0:
        return sigma.to(like.device, like.dtype).view(-1, *([1] * (like.ndim - 1)))
    return float(sigma)


def flow_add_noise(x0: torch.Tensor, noise: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
    """Flow-matching forward process ``x_σ = (1 - σ) x0 + σ ε`` (σ a float or ``[B]``)."""
    s = _sigma_like(sigma, x0)
    return (1 - s) * x0 + s * noise.to(x0.device, x0.dtype)


def flow_velocity(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The velocity ``v = ε - x0`` of the straight path (the flow model's training target)."""
    return noise.to(x0.device, x0.dtype) - x0


def flow_eps_x0(v: torch.Tensor, x_t: torch.Tensor, sigma: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Velocity ``v = ε - x0`` at level σ -> (ε, x0): ``ε = x_σ + (1 - σ) v``, ``x0 = x_σ - σ v``."""
    s = _sigma_like(sigma, x_t)
    return x_t + (1 - s) * v, x_t - s * v


def flow_step(v: torch.Tensor, x_t: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
    """One Euler step of the flow ODE ``dx/dσ = v`` from σ to ``sigma_next``.

    Towards the data (``sigma_next < σ``) it equals ``FlowMatchEulerDiscreteScheduler.step``;
    away from it (``sigma_next > σ``) it is one step of Euler flow inversion.
    """
    return x_t + (float(sigma_next) - float(sigma)) * v


def flow_invert(
    v_fn: Callable[[torch.Tensor, float], torch.Tensor],
    x: torch.Tensor,
    path: Sequence[float],
    start: float = 0.0,
) -> torch.Tensor:
    """Euler flow inversion of ``x`` (at σ = ``start``, 0 = the clean input) up through ``path``.

    Each step reads the velocity ``v_fn(x, σ_cur)`` where ``x`` is and moves with
    :func:`flow_step`; ``path`` ascends above ``start``; an empty path returns ``x``.
    """
    s_cur = float(start)
    for s_next in path:
        if not s_next > s_cur:
            raise ValueError(f"flow inversion path must ascend above sigma {s_cur}, got {s_next}")
        x = flow_step(v_fn(x, s_cur).to(x.dtype), x, s_cur, float(s_next))
        s_cur = float(s_next)
    return x


def flow_inversion_path(target: float, steps: int) -> list[float]:
    """σ values flow inversion visits from the clean input to ``target``: the grid
    ``1/steps, 2/steps, ...`` below the target, then the target (depends on the target alone)."""
    if steps < 1:
        raise ValueError("inversion steps must be >= 1")
    grid = [k / steps for k in range(1, steps)]
    return [g for g in grid if g < float(target) - 1e-9] + [float(target)]


def flow_scheduler_timestep(sigma: float, num_train_timesteps: int = 1000) -> float:
    """The "timestep" a ``FlowMatchEulerDiscreteScheduler`` reports for σ: ``σ · T``."""
    return float(sigma) * int(num_train_timesteps)


# ------------------------------------------------------------------------------------ CFG
def cfg_combine(out_uncond: torch.Tensor, out_cond: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """Classifier-free guidance: ``out_u + w (out_c - out_u)`` (Ho & Salimans, 2022)."""
    return out_uncond + guidance_scale * (out_cond - out_uncond)


def uses_cfg(guidance_scale: float) -> bool:
    """Guidance runs an unconditional pass only when ``w > 1`` (w = 1 is the conditional model)."""
    return float(guidance_scale) > 1.0


def cfg_batch(x: torch.Tensor) -> torch.Tensor:
    """The CFG input batch ``[x (uncond rows), x (cond rows)]``: unconditional first."""
    return torch.cat([x, x])


def cfg_split(output: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """Output of a :func:`cfg_batch` batch (unconditional half first) -> the guided output."""
    out_u, out_c = output.chunk(2)
    return cfg_combine(out_u, out_c, guidance_scale)


# ------------------------------------------------------------------------- image -> input
def images_to_tensor(images: np.ndarray, size: int | None = None, device: torch.device | str = "cpu",
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 images ``[B, H, W, 3]`` -> ``[B, 3, S, S]`` in [-1, 1] (the pixel range every
    diffusers model and VAE takes), resized to ``size`` (bilinear, antialiased) if needed.

    The latent models' entry continues with the VAE: ``ModelHandle.encode_images``.
    """
    x = torch.from_numpy(np.array(images, dtype=np.uint8, copy=True)).to(device).permute(0, 3, 1, 2)
    x = x.to(torch.float32) / 127.5 - 1.0
    if size is not None and tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x.to(dtype)
